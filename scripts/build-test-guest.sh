#!/usr/bin/env bash
# Builds the bootable Debian guest the VM tests share, once, into a cache outside the
# repository: ${VMBAK_TEST_GUEST_DIR:-/var/cache/vmbak-test-guest}/v$VERSION/ with
#
#   disk.qcow2   a 1 GiB disk: an MBR partition table and one ext4 partition (vda1), the root
#   vmlinuz      the guest's kernel and initrd, for direct kernel boot:
#   initrd.img     root=/dev/vda1 console=ttyS0
#   info.json    what was built, how long it took
#
# The guest (Debian bookworm, debootstrap --variant=minbase) runs systemd, udev,
# qemu-guest-agent (started by udev when the virtio-serial port org.qemu.guest_agent.0
# appears), a root getty on ttyS0 and vmbak-writer.service: it keeps writing files with
# random content into /var/lib/vmbak-writer/data/SEQ, fsyncs each one and then appends
# "SEQ SHA256 data/SEQ" to /var/lib/vmbak-writer/sums.log (fsynced), and logs "rm SEQ"
# before it removes an old file (it keeps the newest 200). After a restore, every file the
# log names (and does not remove) must have its logged sum. Once the first file is logged
# it prints VMBAK-GUEST-READY on the serial console, and again every 25 files (about 5 s):
# a single line could be lost when the serial getty opens ttyS0 at the same moment (its
# hangup drops what is being written), and then a boot test never saw it (v2; v1 printed it
# once).
#
# Idempotent: a complete build is left alone. The build runs in a temporary directory
# beside the cache and is renamed into place only when complete, so an interrupted build
# leaves nothing that counts; the next run removes its remains. Concurrent runs wait for
# each other (flock). Needs root, debootstrap, sfdisk, mkfs.ext4 and qemu-img.
set -euo pipefail

VERSION=2
BASE=${VMBAK_TEST_GUEST_DIR:-/var/cache/vmbak-test-guest}
OUT=$BASE/v$VERSION
SIZE_MIB=1024          # virtual disk size
PART_START_MIB=1       # partition 1 starts here and runs to the end of the disk
KEEP_FILES=200

say() { echo "build-test-guest: $*" >&2; }
complete() { [[ -s $OUT/disk.qcow2 && -s $OUT/vmlinuz && -s $OUT/initrd.img && -s $OUT/info.json ]]; }

if complete; then
    echo "$OUT"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { say "must run as root (debootstrap, chroot)"; exit 1; }
export PATH=/usr/sbin:/sbin:/usr/bin:/bin
for t in debootstrap sfdisk mkfs.ext4 qemu-img flock; do
    command -v "$t" >/dev/null || { say "$t is missing (scripts/setup.sh installs it)"; exit 1; }
done
mkdir -p "$BASE"
exec 9>"$BASE/.lock"
flock 9
if complete; then  # another run finished it while this one waited
    echo "$OUT"
    exit 0
fi
# Whatever an interrupted build left (we hold the lock: nobody else is building).
rm -rf "$BASE"/.build-* "$OUT"

t0=$(date +%s)
TMP=$(mktemp -d "$BASE/.build-XXXXXX")
trap 'rm -rf "$TMP"' EXIT
ROOT=$TMP/root

mirror() {
    local m=""
    if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $m && -r /etc/apt/sources.list ]]; then
        m=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
            /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=$(mirror)
say "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include=linux-image-amd64,systemd-sysv,udev,qemu-guest-agent,e2fsprogs \
    bookworm "$ROOT" "$MIRROR" >"$TMP/debootstrap.log" 2>&1 || {
    tail -n 30 "$TMP/debootstrap.log" >&2
    say "debootstrap failed"
    exit 1
}
t_boot=$(date +%s)

say "configuring"
echo vmbak-guest >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vmbak-guest\n' >"$ROOT/etc/hosts"
printf '/dev/vda1 / ext4 defaults,errors=remount-ro 0 1\n' >"$ROOT/etc/fstab"
chroot "$ROOT" passwd -d root >/dev/null
# a root login on the serial console
mkdir -p "$ROOT/etc/systemd/system/getty.target.wants"
ln -sf /lib/systemd/system/serial-getty@.service \
    "$ROOT/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"
mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
# no network, no timers that wake the guest for nothing
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$u"
done
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$ROOT/etc/systemd/journald.conf.d/vmbak.conf"

cat >"$ROOT/usr/local/sbin/vmbak-writer" <<EOF
#!/bin/bash
# vmbak's test guest: keep writing files with known content (see scripts/build-test-guest.sh).
set -u
D=/var/lib/vmbak-writer
LOG=\$D/sums.log
KEEP=$KEEP_FILES
mkdir -p "\$D/data"
touch "\$LOG"
rm -f "\$D"/data/*.tmp
# go on numbering after the newest logged file (a restored guest continues its log)
seq=\$(awk '\$1 ~ /^[0-9]+\$/ {n = \$1 + 1} END {print n + 0}' "\$LOG")
n=0
while :; do
    f=data/\$seq
    head -c \$(( (RANDOM % 32 + 1) * 4096 )) /dev/urandom >"\$D/\$f.tmp"
    sync "\$D/\$f.tmp"
    mv "\$D/\$f.tmp" "\$D/\$f"
    sync "\$D/data"
    sum=\$(sha256sum <"\$D/\$f")
    echo "\$seq \${sum%% *} \$f" >>"\$LOG"
    sync "\$LOG"
    old=\$((seq - KEEP))
    if ((old >= 0)); then
        echo "rm \$old" >>"\$LOG"
        sync "\$LOG"
        rm -f "\$D/data/\$old"
    fi
    if ((n % 25 == 0)); then
        echo "VMBAK-GUEST-READY seq=\$seq" >/dev/ttyS0
    fi
    n=\$((n + 1))
    seq=\$((seq + 1))
    sleep 0.2
done
EOF
chmod 755 "$ROOT/usr/local/sbin/vmbak-writer"
cat >"$ROOT/etc/systemd/system/vmbak-writer.service" <<'EOF'
[Unit]
Description=vmbak test writer (files with logged sha256 sums)
After=local-fs.target

[Service]
ExecStart=/usr/local/sbin/vmbak-writer
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/vmbak-writer.service \
    "$ROOT/etc/systemd/system/multi-user.target.wants/vmbak-writer.service"

say "trimming"
KVER=$(basename "$(ls -d "$ROOT"/lib/modules/* | head -n 1)")
MODS=$ROOT/lib/modules/$KVER/kernel
keep=(drivers/virtio drivers/block/virtio_blk.ko drivers/char/virtio_console.ko drivers/char/hw_random
      fs/ext4 fs/jbd2 fs/mbcache.ko lib crypto arch)
mkdir "$TMP/keep"
for k in "${keep[@]}"; do
    if [[ -e $MODS/$k ]]; then
        mkdir -p "$TMP/keep/$(dirname "$k")"
        mv "$MODS/$k" "$TMP/keep/$k"
    fi
done
rm -rf "$MODS"
mv "$TMP/keep" "$MODS"
rm -rf "$ROOT/lib/firmware" "$ROOT/usr/share/doc" "$ROOT/usr/share/man" "$ROOT/usr/share/info" \
    "$ROOT/usr/share/locale" "$ROOT/usr/share/i18n" "$ROOT/usr/share/lintian" "$ROOT/usr/share/bug"
mkdir -p "$ROOT/usr/share/locale"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
    "$ROOT"/var/log/*.log "$ROOT"/var/cache/debconf/*-old
chroot "$ROOT" depmod -a "$KVER"
# the initrd again, with the modules that are left (MODULES=most takes what exists)
chroot "$ROOT" update-initramfs -u -k "$KVER" >"$TMP/initramfs.log" 2>&1 || {
    cat "$TMP/initramfs.log" >&2
    say "update-initramfs failed"
    exit 1
}
cp "$ROOT/boot/vmlinuz-$KVER" "$TMP/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$TMP/initrd.img"
rm -f "$ROOT/boot/initrd.img-$KVER"  # the guest boots from outside; keep the kernel package consistent
rm -f "$ROOT"/etc/machine-id && touch "$ROOT/etc/machine-id"

say "making the disk"
part_mib=$((SIZE_MIB - PART_START_MIB))
mkfs.ext4 -q -F -L vmbak-root -E nodiscard -d "$ROOT" "$TMP/part.img" "${part_mib}M" >&2
truncate -s "${SIZE_MIB}M" "$TMP/disk.raw"
printf 'label: dos\nstart=%s, type=83, bootable\n' $((PART_START_MIB * 2048)) | sfdisk -q "$TMP/disk.raw"
dd if="$TMP/part.img" of="$TMP/disk.raw" bs=1M seek="$PART_START_MIB" conv=notrunc,sparse status=none
qemu-img convert -f raw -O qcow2 "$TMP/disk.raw" "$TMP/disk.qcow2"
rm -f "$TMP/disk.raw" "$TMP/part.img"
rootfs_kib=$(du -sk "$ROOT" | cut -f1)
rm -rf "$ROOT"
t1=$(date +%s)
cat >"$TMP/info.json" <<EOF
{"version": $VERSION, "kernel": "$KVER", "mirror": "$MIRROR", "disk_mib": $SIZE_MIB,
 "partition_start_mib": $PART_START_MIB, "rootfs_kib": $rootfs_kib,
 "qcow2_bytes": $(stat -c %s "$TMP/disk.qcow2"), "debootstrap_s": $((t_boot - t0)), "build_s": $((t1 - t0))}
EOF
chmod 755 "$TMP"
chmod 644 "$TMP"/disk.qcow2 "$TMP"/vmlinuz "$TMP"/initrd.img "$TMP"/info.json
rm -f "$TMP/debootstrap.log" "$TMP/initramfs.log"
mv -T "$TMP" "$OUT"
trap - EXIT
say "built $OUT in $((t1 - t0)) s"
echo "$OUT"
