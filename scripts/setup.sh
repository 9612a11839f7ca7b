#!/usr/bin/env bash
# Installs what vmbak needs on a bare Debian bookworm machine (as root), then
# creates the virtual environment at .venv with the project installed in it.
# Idempotent: packages already present are not installed again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the Python that owns python3-libnbd, filesystem tools for
# test images, QEMU utilities, and the peers the benchmarks compare against.
APT_PKGS=(python3 python3-venv python3-dev python3-libnbd libnbd-bin nbdkit nbdkit-plugin-python
          qemu-utils qemu-system-common e2fsprogs xfsprogs dosfstools mtools exfatprogs
          ntfs-3g btrfs-progs partclone fdisk lvm2 util-linux time fuse3 python3-pyfuse3
          libvirt-daemon-system libvirt-clients python3-libvirt qemu-system-x86 strace
          debootstrap zsh fish groff-base man-db ovmf swtpm swtpm-tools  # debootstrap: the bootable test guest (scripts/build-test-guest.sh); ovmf: UEFI guests and verify --boot --firmware uefi; swtpm: TPM guests
          chromium chromium-driver                 # the dashboard's browser tests (selenium)
          python3-rados python3-rbd   # librbd's bindings: rbd:POOL/IMAGE disks (docs/rbd.md)
          python3-openssl)  # as on hosts with borgbackup or virtnbdbackup: botocore imports it (s3.py's warning filter)
if [[ "${VMBAK_BENCH_DEPS:-0}" == 1 ]]; then
    APT_PKGS+=(restic borgbackup time virtnbdbackup)  # virtnbdbackup: bench/bench_vm.py (not on PyPI)
fi
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing Debian packages: ${missing[*]} (run as root or install them)" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    dpkg --configure -a >/dev/null 2>&1 || true  # finish what an interrupted install left half-done
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Without udev /dev/kvm stays root:root 0600 and libvirt re-probes QEMU on every start.
if [[ -c /dev/kvm && $(id -u) -eq 0 ]] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true
fi

# swtpm's local CA belongs to tss: libvirt runs swtpm_setup as tss. A libvirtd started before
# swtpm-tools made the tss user runs it as root and leaves root-owned files there, after which
# every TPM guest a later libvirtd starts fails ("Need read/write rights on
# /var/lib/swtpm-localca/.lock.swtpm-localca for user tss").
if [[ -d /var/lib/swtpm-localca && $(id -u) -eq 0 ]] && getent passwd tss >/dev/null; then
    chown -R tss:root /var/lib/swtpm-localca || true
fi

# Debian's python3 owns the libnbd, libvirt, rados and rbd bindings (compiled for its
# 3.11), so the venv is made by it and sees its site-packages.
PY=/usr/bin/python3
stamp=.venv/.vmbak-installed
# A setup interrupted while the venv was made or pip ran leaves a venv without a working
# pip (or without its python): start that venv again rather than fail on it forever.
if [[ -e .venv ]] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup: .venv is incomplete (an interrupted setup?); making it again"
    rm -rf .venv
fi
if [[ ! -x .venv/bin/python || ! -e $stamp || pyproject.toml -nt $stamp ]]; then
    [[ -x .venv/bin/python ]] || "$PY" -m venv --system-site-packages .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
