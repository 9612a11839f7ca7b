#!/usr/bin/env bash
# A short end-to-end tour of vmbak on a small real ext4 disk image, built without
# mounting anything: full backup, change the disk, incremental backup, list, diff,
# restore, compare byte for byte, check and stats. Run by `make demo` after setup.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=$PWD
VMBAK="$ROOT/.venv/bin/vmbak"
PY="$ROOT/.venv/bin/python"
if [[ ! -x $VMBAK ]]; then
    echo "demo: $VMBAK not found; run 'bash scripts/setup.sh' (or 'make demo') first" >&2
    exit 1
fi
PATH="/usr/sbin:/sbin:$PATH"   # mkfs.ext4 lives in sbin
for tool in mkfs.ext4 dumpe2fs debugfs e2fsck cmp dd head; do
    command -v "$tool" >/dev/null || { echo "demo: $tool is missing" >&2; exit 1; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vmbak-demo.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

export VMBAK_REPOSITORY="$tmp/repo" VMBAK_PASSWORD=demo

step() { printf '\n==> %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "build a 96 MiB ext4 disk image (img.raw) with generated files"
mkdir -p src/docs src/data src/copies
# Compressible text: numbered log lines.
for i in $(seq 1 8); do
    for j in $(seq 1 4000); do
        printf '2026-11-22T10:%02d:%02d host%d service[%d]: request %d handled in %d ms\n' \
            $((j / 60 % 60)) $((j % 60)) "$i" $((1000 + i)) "$j" $((j * 7 % 991))
    done > "src/docs/log$i.txt"
done
# Incompressible data.
for i in 1 2 3 4; do
    head -c $((2 * 1024 * 1024 + i * 4096)) /dev/urandom > "src/data/blob$i.bin"
done
# Duplicates of some of the above.
cp src/data/blob1.bin src/copies/blob1-copy.bin
cp src/data/blob2.bin src/copies/blob2-copy.bin
cp src/docs/log1.txt src/copies/log1-copy.txt
# The image starts as random bytes (like a disk that held other data before),
# so blocks the filesystem does not use are not zeros.
head -c $((96 * 1024 * 1024)) /dev/urandom > img.raw
mkfs.ext4 -q -F -E nodiscard -d src img.raw
ls -l img.raw
du -sh src

step "init the repository"
run "$VMBAK" init

step "first backup (full)"
run "$VMBAK" backup img.raw --name demo

step "change the disk: overwrite 64 KiB inside 6 files (as a running VM would)"
# The offsets are 64 KiB-aligned windows that lie wholly inside the data of some
# files (found with debugfs), so the filesystem stays consistent.
mapfile -t offsets < <("$PY" - img.raw <<'EOF_PY'
import subprocess, sys
img = sys.argv[1]
out = subprocess.run(["dumpe2fs", "-h", img], capture_output=True, text=True, check=True).stdout
bs = int(next(ln.split(":")[1] for ln in out.splitlines() if ln.startswith("Block size:")))
per = 65536 // bs
for f in ("/data/blob1.bin", "/data/blob2.bin", "/data/blob3.bin", "/data/blob4.bin",
          "/docs/log3.txt", "/docs/log6.txt"):
    res = subprocess.run(["debugfs", "-R", f"blocks {f}", img], capture_output=True, text=True, check=True)
    blocks = {int(b) for b in res.stdout.split()}
    windows = [b for b in sorted(blocks) if b % per == 0 and all(b + i in blocks for i in range(per))]
    if not windows:
        sys.exit(f"no 64 KiB window inside {f}")
    print(windows[len(windows) // 2] * bs)
EOF_PY
)
if ((${#offsets[@]} != 6)); then
    echo "demo: could not find 6 places to change" >&2
    exit 1
fi
for off in "${offsets[@]}"; do
    dd if=/dev/urandom of=img.raw bs=64K count=1 seek=$((off / 65536)) conv=notrunc status=none
    echo "wrote 64 KiB of random bytes at offset $off"
done

step "second backup (incremental)"
run "$VMBAK" backup img.raw --name demo

step "list snapshots"
run "$VMBAK" snapshots
mapfile -t ids < <("$VMBAK" --json snapshots --name demo |
    "$PY" -c 'import json, sys; [print(m["id"]) for m in json.load(sys.stdin)]')
if ((${#ids[@]} != 2)); then
    echo "demo: expected 2 snapshots, found ${#ids[@]}" >&2
    exit 1
fi

step "diff the two snapshots"
run "$VMBAK" diff "${ids[0]:0:8}" "${ids[1]:0:8}"

step "restore the latest snapshot"
run "$VMBAK" restore demo:latest restored.raw

step "compare the restored image with the source"
printf '$ cmp img.raw restored.raw\n'
if cmp -s img.raw restored.raw; then
    echo "identical"
else
    # Blocks that no filesystem structure uses may come back as zeros; the
    # allocation bitmaps as dumpe2fs reads them are the independent judge.
    echo "not byte-identical; comparing every block the filesystem uses (dumpe2fs)"
    "$PY" - img.raw restored.raw <<'EOF_PY'
import re, subprocess, sys
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
out = subprocess.run(["dumpe2fs", src], capture_output=True, text=True, check=True).stdout
bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
a = np.fromfile(src, dtype=np.uint8)
b = np.fromfile(dst, dtype=np.uint8)
if a.size != b.size:
    sys.exit(f"size differs: {a.size} != {b.size}")
used = np.ones(a.size // bs, dtype=bool)
for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
    for part in filter(None, (p.strip() for p in m.group(1).split(","))):
        lo, _, hi = part.partition("-")
        used[int(lo):int(hi or lo) + 1] = False
a = a.reshape(-1, bs)
b = b.reshape(-1, bs)
diff = (a != b).any(axis=1)
bad_used = np.flatnonzero(diff & used)
bad_free = np.flatnonzero(diff & ~used & b.any(axis=1))
if bad_used.size or bad_free.size:
    sys.exit(f"MISMATCH: {bad_used.size} used blocks differ, {bad_free.size} free blocks hold other data")
print(f"identical in all {int(used.sum())} used {bs}-byte blocks; "
      f"{int((diff & ~used).sum())} unused blocks came back as zeros")
EOF_PY
fi
run e2fsck -fn restored.raw

step "check the repository, reading all data"
run "$VMBAK" check --read-data

step "repository statistics"
run "$VMBAK" stats

printf '\ndemo OK\n'
