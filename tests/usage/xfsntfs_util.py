"""Helpers for the XFS and NTFS usage tests: real images, built by the real tools, and oracles.

* ``make_files(root, seed, n, ...)`` -> {relative path: content}
* ``build_xfs(path, size, tree, mkfs_args, seed)``: ``mkfs.xfs -p PROTO`` on a garbage file, no mount
* ``mounted(img, fstype)``: a loop (XFS) or ntfs-3g FUSE mount, unmounted on exit
* ``build_ntfs(path, size, tree, mkntfs_args, seed)``: ``mkntfs`` on a garbage file, filled through
  an ntfs-3g FUSE mount
* ``xfs_db_free(img)``, ``ntfscluster_free_bytes(img)``: oracles
* ``xfs_agfl_ranges(img)``: byte ranges of the blocks on the AG free lists, from xfs_db
* ``xfs_db(img, *cmds)``

``garbage_file``, ``read_tree``, ``partclone_free``, ``analyze_path`` and ``corrupt`` come from
``fatlvm_util``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from fatlvm_util import garbage_file, read_tree, tool

from vmbak.usage.model import normalize, subtract, total

MiB = 1 << 20
# mkfs.xfs refuses filesystems under 300 MB unless it runs under fstests; these variables are
# how fstests tells it so (small test filesystems are exactly what we want here)
XFS_SMALL_ENV = {**os.environ, "TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def run(*args: object, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    cmd[0] = tool(cmd[0]) if "/" not in cmd[0] else cmd[0]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def make_files(root: Path, seed: int, n: int, max_size: int, small: int = 0, small_size: int = 700) -> dict[str, bytes]:
    """``n`` files of up to ``max_size`` bytes in a few directories, plus ``small`` tiny files
    (one block each) whose deletion, every other one, fragments the free space."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for i in range(n):
        size = int(rng.integers(0, max_size))
        files[f"d{i % 3}/f{i}.bin"] = rng.bytes(size) if i % 2 else (b"text %d " % i) * (size // 8)
    for i in range(small):
        files[f"small/s{i:05d}"] = rng.bytes(small_size)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def _protofile(tree: Path, out: Path) -> Path:
    """An mkfs.xfs prototype file describing ``tree`` (directories and regular files)."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        for p in sorted(d.iterdir()):
            ind = " " * depth
            if p.is_dir():
                lines.append(f"{ind}{p.name} d--755 0 0")
                walk(p, depth + 1)
                lines.append(f"{ind}$")
            else:
                lines.append(f"{ind}{p.name} ---644 0 0 {p}")

    walk(tree, 1)
    lines.append("$")
    out.write_text("\n".join(lines) + "\n")
    return out


def build_xfs(path: Path, size: int, tree: Path | None, mkfs_args: list[str], seed: int) -> Path:
    garbage_file(path, size, seed)
    args = [*mkfs_args]
    if tree is not None:
        args += ["-p", _protofile(tree, path.with_suffix(".proto"))]
    run("mkfs.xfs", "-q", "-f", "-K", *args, path, env=XFS_SMALL_ENV)
    return path


@contextlib.contextmanager
def mounted(img: Path, fstype: str, readonly: bool = False) -> Iterator[Path]:
    """Mount ``img``: XFS through a loop device, NTFS through ntfs-3g (FUSE)."""
    mnt = Path(tempfile.mkdtemp(prefix="vmbak-mnt-"))
    try:
        if fstype == "xfs":
            opts = "loop,ro,norecovery" if readonly else "loop"
            run("mount", "-t", "xfs", "-o", opts, img, mnt)
        else:
            run("ntfs-3g", *(["-o", "ro"] if readonly else []), img, mnt)
        try:
            yield mnt
        finally:
            if fstype == "xfs":
                run("umount", mnt)
            else:
                run("fusermount", "-u", mnt)
    finally:
        shutil.rmtree(mnt, ignore_errors=True)


def delete_every_other(root: Path, files: dict[str, bytes], subdir: str = "small") -> dict[str, bytes]:
    """Delete every other file under ``subdir`` (and every third big file); return what is left."""
    left = dict(files)
    smalls = sorted(k for k in files if k.startswith(subdir + "/"))
    bigs = sorted(k for k in files if not k.startswith(subdir + "/"))
    for rel in smalls[::2] + bigs[::3]:
        (root / rel).unlink()
        del left[rel]
    return left


def build_ntfs(path: Path, size: int, tree: Path, mkntfs_args: list[str], seed: int,
               files: dict[str, bytes] | None = None, quick: bool = True, delete: bool = True) -> dict[str, bytes]:
    """mkntfs on a garbage file (``quick``: -f, free space keeps its garbage; else mkntfs zeroes
    the volume), then copy ``tree`` in through ntfs-3g and (``delete``) delete every other small
    file and every third big one (holes). Returns what the filesystem holds."""
    garbage_file(path, size, seed)
    run("mkntfs", "-q", "-F", *(["-f"] if quick else []), *mkntfs_args, path)
    files = read_tree(tree) if files is None else files
    with mounted(path, "ntfs") as mnt:
        for rel, data in files.items():
            p = mnt / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        left = delete_every_other(mnt, files) if delete else dict(files)
    return left


def xfs_db(img: Path, *cmds: str) -> str:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    return run("xfs_db", "-r", *args, img).stdout


def xfs_geometry(img: Path) -> dict[str, int]:
    out = xfs_db(img, "sb 0", "p blocksize agblocks agcount dblocks")
    return {k: int(v) for k, v in re.findall(r"^(\w+) = (\d+)$", out, re.M)}


def xfs_db_free(img: Path) -> tuple[np.ndarray, int]:
    """Free byte ranges from ``xfs_db freesp -d`` (which includes the AGFL blocks), and how
    many blocks sit on the AG free lists."""
    g = xfs_geometry(img)
    out = xfs_db(img, "freesp -d")
    ranges = []
    for agno, agbno, length in re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M):
        start = (int(agno) * g["agblocks"] + int(agbno)) * g["blocksize"]
        ranges.append((start, start + int(length) * g["blocksize"]))
    agfl = 0
    for agno in range(g["agcount"]):
        agfl += int(re.search(r"flcount = (\d+)", xfs_db(img, f"agf {agno}", "p flcount")).group(1))
    return normalize(np.array(ranges, np.int64).reshape(-1, 2)), agfl


def xfs_agfl_ranges(img: Path) -> np.ndarray:
    """Byte ranges of the blocks on every AG's free list (flcount entries from flfirst, wrapping)."""
    g = xfs_geometry(img)
    cmds = [c for a in range(g["agcount"]) for c in (f"agf {a}", "p flfirst flcount", f"agfl {a}", "p bno")]
    out = xfs_db(img, *cmds)
    firsts = [int(x) for x in re.findall(r"^flfirst = (\d+)$", out, re.M)]
    counts = [int(x) for x in re.findall(r"^flcount = (\d+)$", out, re.M)]
    tables = re.findall(r"^bno\[0-(\d+)\] = (.*)$", out, re.M)
    assert len(firsts) == len(counts) == len(tables) == g["agcount"], out
    ranges = []
    for agno, (first, count, (last, row)) in enumerate(zip(firsts, counts, tables, strict=True)):
        slots = dict(item.split(":") for item in row.split())
        for k in range(count):
            agbno = int(slots[str((first + k) % (int(last) + 1))])
            start = (agno * g["agblocks"] + agbno) * g["blocksize"]
            ranges.append((start, start + g["blocksize"]))
    return normalize(np.array(ranges, np.int64).reshape(-1, 2))


def ntfscluster_free_bytes(img: Path) -> int:
    out = run("ntfscluster", "-i", img).stdout
    return int(re.search(r"bytes of free space\s*:\s*(\d+)", out).group(1))


def wrongly_free(ours: np.ndarray, oracle_free: np.ndarray) -> int:
    """Bytes we call free that the oracle calls used (must be 0)."""
    return total(subtract(ours, oracle_free))
