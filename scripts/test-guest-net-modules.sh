#!/usr/bin/env bash
# The virtio-net driver of the test guest's kernel, for tests that give the guest a network
# (vmbak verify --boot --expect-port). The guest built by scripts/build-test-guest.sh keeps
# only the modules its disk and agent need; this fetches its kernel's package once
# (apt-get download, the same version the guest runs) and keeps the three modules that
# virtio-net needs, in load order:
#
#   ${VMBAK_TEST_GUEST_DIR:-/var/cache/vmbak-test-guest}/v2-netmods/<kernel>/
#       failover.ko net_failover.ko virtio_net.ko
#
# Prints that directory. Idempotent; concurrent runs wait for each other (flock); an
# interrupted run leaves nothing that counts (the directory is renamed into place whole).
set -euo pipefail

BASE=${VMBAK_TEST_GUEST_DIR:-/var/cache/vmbak-test-guest}
GUEST=$BASE/v2
say() { echo "test-guest-net-modules: $*" >&2; }

[[ -s $GUEST/info.json ]] || { say "no test guest in $GUEST (run scripts/build-test-guest.sh)"; exit 1; }
KVER=$(sed -n 's/.*"kernel": "\([^"]*\)".*/\1/p' "$GUEST/info.json")
[[ -n $KVER ]] || { say "cannot read the kernel version from $GUEST/info.json"; exit 1; }
OUT=$BASE/v2-netmods/$KVER
MODS=(kernel/net/core/failover.ko kernel/drivers/net/net_failover.ko kernel/drivers/net/virtio_net.ko)
complete() { [[ -s $OUT/failover.ko && -s $OUT/net_failover.ko && -s $OUT/virtio_net.ko ]]; }

if complete; then
    echo "$OUT"
    exit 0
fi
mkdir -p "$BASE/v2-netmods"
exec 9>"$BASE/v2-netmods/.lock"
flock 9
if complete; then
    echo "$OUT"
    exit 0
fi
rm -rf "$BASE"/v2-netmods/.tmp-*
TMP=$(mktemp -d "$BASE/v2-netmods/.tmp-XXXXXX")
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP"
(cd "$TMP" && apt-get download -q "linux-image-$KVER" >"$TMP/apt.log" 2>&1) || {
    cat "$TMP/apt.log" >&2
    say "apt-get download linux-image-$KVER failed"
    exit 1
}
dpkg-deb -x "$TMP"/linux-image-"$KVER"_*.deb "$TMP/x"
mkdir "$TMP/out"
for m in "${MODS[@]}"; do
    cp "$TMP/x/lib/modules/$KVER/$m" "$TMP/out/"
done
chmod 644 "$TMP"/out/*.ko
rm -rf "$OUT"
mv -T "$TMP/out" "$OUT"
say "kept the virtio-net modules of $KVER in $OUT"
echo "$OUT"
