#!/usr/bin/env python3
"""Foundation benchmark: vmbak against restic and borg on a 4 GiB ext4 disk image.

For each tool, each run: a full backup of v1.raw into a fresh repository, an
incremental backup of v2.raw (v1 with about 1% of the disk rewritten in scattered
64 KiB writes) under the same path, and a restore of the latest snapshot to a new
file, which is then verified. Each step's wall time, CPU time (user + system of
the child), peak RSS of the child and repository size (du -sb) are recorded.

A second part backs up a 64 GiB sparse file holding a few MiB of data with vmbak
and reports its time and peak RSS.

    .venv/bin/python bench/bench_foundation.py [--runs 3] [--workdir bench/work]
        [--only vmbak,restic,borg-lz4,borg-zstd,sparse64] [--rebuild-images]

See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

SEED = 20261122
IMAGE_SIZE = 4 * GIB
WRITE_SIZE = 64 * KIB
CHANGED_WRITES = 655  # about 1% of a 4 GiB disk in 64 KiB writes
TEXT_BYTES = 560 * MIB
RANDOM_BYTES = 500 * MIB
DUPLICATE_BYTES = 420 * MIB
SMALL_FILES = 1200
FS_UUID = "6d2c1f4e-9a3b-4c5d-8e7f-0a1b2c3d4e5f"
FAKE_EPOCH = 1795000000  # fixed timestamps for the generated files and the filesystem

SPARSE_SIZE = 64 * GIB
SPARSE_WRITES = 96  # 6 MiB of data in the 64 GiB file
SPARSE_CHANGES = 16

PASSWORD = "bench"
NAME = "bench"
TOOLS = ("vmbak", "vmbak-noskip", "restic", "borg-lz4", "borg-zstd")
STEPS = ("full", "incremental", "restore")
CHAIN_LENGTH = 30
FIXED_RUNS = 10  # `snapshots` runs per tool and run of the fixedcost part
ALL_PARTS = (*TOOLS, "sparse64", "chain30", "fixedcost", "physical")
# The physical references (part "physical"): what plain tools take to read the image and
# write it elsewhere, compressed where they can, with no repository, deduplication or
# encryption. Their rows have step "full" (the same image as the full backups).
PHYSICAL = ("partclone-zstd", "qemu-img-convert", "cp-sparse")

TARGETS = {
    "borg_lz4_full_over_vmbak_full": 2.5,
    "restic_incremental_over_vmbak_incremental": 4.0,
    "restic_restore_over_vmbak_restore": 3.0,
    # issue 16
    "restic_full_over_vmbak_full": 9.0,
    "restic_full_over_vmbak_noskip_full": 3.0,
    "restic_restore_over_vmbak_restore_issue16": 4.5,
}
REPO_BYTES_MAX_FRACTION = 1 / 3  # vmbak's repository after the full, of restic's
CHAIN_RESTORE_MAX = 1.10  # restore of a 30-incremental chain head / restore of one full of the same disk
FIXED_COST_MAX_S = 0.3  # `vmbak snapshots` on a small repository, scrypt included
RSS_LIMIT_MIB = 512


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sbin_path() -> str:
    return os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"


def tool_path(name: str) -> str | None:
    return shutil.which(name, path=sbin_path())


def run_quiet(cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=sbin_path(), **kw.pop("extra_env", {}))
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True, env=env, **kw)


# ---------------------------------------------------------------------------
# Test images


class TextGen:
    """Log-like text (zstd ratio about 3) from a fixed vocabulary, driven by a seeded generator."""

    SERVICES = ("nginx", "postgres", "sshd", "cron", "kernel", "systemd", "app-api", "app-worker")
    LEVELS = ("INFO",) * 6 + ("DEBUG",) * 3 + ("WARN", "ERROR")

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        syllables = ["ka", "to", "ri", "mo", "ne", "sa", "lu", "pe", "di", "go",
                     "ba", "zu", "fi", "ha", "qe", "wo", "xi", "ya", "ce", "ju"]
        self.vocab: list[str] = []
        for _ in range(3000):
            n = int(rng.integers(1, 5))
            self.vocab.append("".join(syllables[int(j)] for j in rng.integers(0, len(syllables), n)))
        self.clock = 0

    def chunk(self, lines: int) -> bytes:
        rng, vocab, svc, lvl = self.rng, self.vocab, self.SERVICES, self.LEVELS
        words = rng.integers(0, len(vocab), (lines, 6)).tolist()
        sv = rng.integers(0, len(svc), lines).tolist()
        lv = rng.integers(0, len(lvl), lines).tolist()
        ids = rng.integers(0, 2**32, lines).tolist()
        ms = rng.integers(0, 1000, lines).tolist()
        out = []
        t0 = self.clock
        for i in range(lines):
            s = t0 + i // 50
            w = words[i]
            out.append(
                f"2026-11-{1 + s // 86400 % 28:02d}T{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}."
                f"{ms[i]:03d}Z vm{sv[i]} {svc[sv[i]]}[{1000 + sv[i] * 7}]: {lvl[lv[i]]} "
                f"{vocab[w[0]]} {vocab[w[1]]} {vocab[w[2]]} {vocab[w[3]]} {vocab[w[4]]} {vocab[w[5]]} "
                f"req={ids[i]:08x} took={ms[i]}ms\n")
        self.clock = t0 + lines // 50 + 1
        return "".join(out).encode()

    def write(self, path: Path, size: int) -> None:
        left = size
        with open(path, "wb") as f:
            while left > 0:
                b = self.chunk(40000)[:left]
                f.write(b)
                left -= len(b)


def write_random(path: Path, size: int, rng: np.random.Generator) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MIB)
            f.write(rng.bytes(n))
            left -= n


def build_source(src: Path, rng: np.random.Generator) -> dict[str, int]:
    """About 1.5 GiB of files: log text, random data, small files, and copies of some of them."""
    text = TextGen(rng)
    big: list[Path] = []
    totals = {"text": 0, "random": 0, "small": 0, "duplicate": 0}
    (src / "var/log").mkdir(parents=True)
    i = 0
    while totals["text"] < TEXT_BYTES:
        size = min(int(rng.integers(8, 41)) * MIB, TEXT_BYTES - totals["text"])
        p = src / f"var/log/app{i:02d}.log"
        text.write(p, size)
        big.append(p)
        totals["text"] += size
        i += 1
    (src / "srv/data").mkdir(parents=True)
    i = 0
    while totals["random"] < RANDOM_BYTES:
        size = min(int(rng.integers(4, 49)) * MIB + int(rng.integers(0, 16)) * 4096,
                   RANDOM_BYTES - totals["random"])
        p = src / f"srv/data/blob{i:02d}.bin"
        write_random(p, size, rng)
        big.append(p)
        totals["random"] += size
        i += 1
    for i in range(SMALL_FILES):
        d = src / f"home/user{i % 12:02d}/files{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = int(rng.integers(1, 65)) * KIB + int(rng.integers(0, 1024))
        if i % 3 == 2:
            p = d / f"doc{i:04d}.bin"
            write_random(p, size, rng)
        else:
            p = d / f"doc{i:04d}.txt"
            text.write(p, size)
        totals["small"] += size
    (src / "backup/copies").mkdir(parents=True)
    order = rng.permutation(len(big))
    for j in order:
        if totals["duplicate"] >= DUPLICATE_BYTES:
            break
        p = big[int(j)]
        shutil.copyfile(p, src / "backup/copies" / f"{p.parent.name}-{p.name}")
        totals["duplicate"] += p.stat().st_size
    for dirpath, dirnames, filenames in os.walk(src, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), (FAKE_EPOCH, FAKE_EPOCH))
    return totals


def fs_block_size(image: Path) -> int:
    out = run_quiet(["dumpe2fs", "-h", str(image)]).stdout
    m = re.search(r"^Block size:\s+(\d+)", out, re.M)
    if not m:
        raise RuntimeError(f"dumpe2fs: no block size for {image}")
    return int(m.group(1))


def fs_used_blocks(image: Path) -> tuple[int, np.ndarray]:
    """(block size, bool per filesystem block: used) from the allocation bitmaps, read by dumpe2fs."""
    out = run_quiet(["dumpe2fs", str(image)]).stdout
    m = re.search(r"^Block size:\s+(\d+)", out, re.M)
    c = re.search(r"^Block count:\s+(\d+)", out, re.M)
    if not m or not c:
        raise RuntimeError(f"dumpe2fs: cannot read {image}")
    bs = int(m.group(1))
    used = np.ones(image.stat().st_size // bs, dtype=bool)
    for fm in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (x.strip() for x in fm.group(1).split(","))):
            lo, _, hi = part.partition("-")
            used[int(lo):int(hi or lo) + 1] = False
    return bs, used


def file_data_windows(image: Path, files: list[str], bs: int) -> np.ndarray:
    """Byte offsets of WRITE_SIZE-aligned windows that lie wholly inside the data of one of ``files``."""
    per = WRITE_SIZE // bs
    cmds = image.parent / "debugfs.cmds"
    cmds.write_text("".join(f"blocks {f}\n" for f in files))
    out = run_quiet(["debugfs", "-f", str(cmds), str(image)]).stdout
    cmds.unlink()
    starts: set[int] = set()
    for line in out.splitlines():
        if line.startswith("debugfs:") or not line.strip():
            continue
        blocks = np.array(line.split(), dtype=np.int64)
        if blocks.size < per:
            continue
        step = np.concatenate(([0], np.cumsum(np.diff(blocks) == 1)))
        # window [i, i + per) is contiguous iff all per-1 steps inside it are +1
        ok = (step[per - 1:] - step[:blocks.size - per + 1]) == per - 1
        first = blocks[:blocks.size - per + 1]
        starts.update(first[ok & (first % per == 0)].tolist())
    return np.array(sorted(starts), dtype=np.int64) * bs


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while b := f.read(8 * MIB):
            h.update(b)
    return h.hexdigest()


def build_images(imgdir: Path, rebuild: bool) -> dict[str, Any]:
    """v1.raw and v2.raw (and meta.json) in ``imgdir``; built only when missing."""
    imgdir.mkdir(parents=True, exist_ok=True)
    v1, v2, meta_path = imgdir / "v1.raw", imgdir / "v2.raw", imgdir / "meta.json"
    if rebuild:
        for p in (v1, v2, meta_path):
            p.unlink(missing_ok=True)
    meta: dict[str, Any] = {}
    if meta_path.exists() and v1.exists() and v2.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("seed") == SEED and meta.get("image_size") == IMAGE_SIZE:
            return meta
        meta = {}
    rng = np.random.Generator(np.random.PCG64(SEED))
    if not v1.exists():
        v2.unlink(missing_ok=True)
        t0 = time.perf_counter()
        src = imgdir / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        say(f"building {v1}: generating ~1.5 GiB of files ...")
        totals = build_source(src, rng)
        tmp = imgdir / "v1.raw.tmp"
        say(f"building {v1}: filling 4 GiB with random bytes ...")
        write_random(tmp, IMAGE_SIZE, rng)
        say(f"building {v1}: mkfs.ext4 -d ...")
        run_quiet(["mkfs.ext4", "-q", "-F", "-E", f"nodiscard,hash_seed={FS_UUID}", "-U", FS_UUID,
                   "-L", "benchdisk", "-d", str(src), str(tmp)],
                  extra_env={"E2FSPROGS_FAKE_TIME": str(FAKE_EPOCH), "SOURCE_DATE_EPOCH": str(FAKE_EPOCH)})
        os.utime(tmp, (FAKE_EPOCH, FAKE_EPOCH))
        tmp.rename(v1)
        meta["source_bytes"] = totals
        meta["v1_build_s"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(src)
    if not v2.exists():
        t0 = time.perf_counter()
        say(f"building {v2}: {CHANGED_WRITES} scattered 64 KiB writes inside file data ...")
        bs = fs_block_size(v1)
        names = _big_files(v1)
        windows = file_data_windows(v1, names, bs)
        if windows.size < CHANGED_WRITES:
            raise RuntimeError(f"only {windows.size} places to write in {v1}")
        rng2 = np.random.Generator(np.random.PCG64(SEED + 2))
        offsets = np.sort(rng2.choice(windows, CHANGED_WRITES, replace=False))
        tmp = imgdir / "v2.raw.tmp"
        shutil.copyfile(v1, tmp)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for off in offsets.tolist():
                os.pwrite(fd, rng2.bytes(WRITE_SIZE), off)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.utime(tmp, (FAKE_EPOCH + 86400, FAKE_EPOCH + 86400))
        tmp.rename(v2)
        meta["changed_offsets"] = len(offsets)
        meta["changed_bytes"] = len(offsets) * WRITE_SIZE
        meta["changed_candidates"] = int(windows.size)
        meta["v2_build_s"] = round(time.perf_counter() - t0, 1)
    say("hashing the images ...")
    meta.update(seed=SEED, image_size=IMAGE_SIZE, fs_block_size=fs_block_size(v1),
                v1_sha256=sha256_file(v1), v2_sha256=sha256_file(v2))
    bs, used = fs_used_blocks(v1)
    meta["v1_fs_used_bytes"] = int(used.sum()) * bs
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


def _big_files(image: Path) -> list[str]:
    """Paths of the generated files of at least 1 MiB inside the image."""
    out: list[str] = []
    for d in ("/var/log", "/srv/data", "/backup/copies"):
        listing = run_quiet(["debugfs", "-R", f"ls -p {d}", str(image)]).stdout
        # ls -p lines: /inode/mode/uid/gid/name/size/
        for line in listing.splitlines():
            parts = line.strip().strip("/").split("/")
            if len(parts) >= 6 and parts[4] not in (".", "..") and parts[5].isdigit() \
                    and int(parts[5]) >= MIB:
                out.append(f"{d}/{parts[4]}")
    return out


# ---------------------------------------------------------------------------
# Measuring one command


@dataclass
class Measure:
    tool: str
    step: str
    run: int
    wall_s: float = 0.0
    cpu_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    max_rss_kib: int = 0
    repo_bytes: int = 0
    rc: int = 0
    cmd: str = ""
    error: str = ""
    verify: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    load1: float = 0.0  # the 1-minute load average when the step started


def du_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return int(run_quiet(["du", "-sb", str(path)]).stdout.split()[0])


def warm(*paths: Path) -> None:
    """Read files (a directory: every file under it) so that they are in the page cache.

    Every timed step of every tool starts with its input warm: the image a backup reads, the
    repository a restore reads. Without it the order of the steps decides what is cached:
    vmbak writes its packs with O_DIRECT, which bypasses the page cache, while restic and
    borg write theirs through it; and an image read by one step may be evicted by the next.
    The page cache is not emptied first: see bench/README.md."""
    buf = bytearray(8 * MIB)
    for path in paths:
        files = [path] if path.is_file() else [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
        for f in files:
            try:
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
            except OSError:
                pass  # a file that went away or cannot be read: the step reports it


def measured(m: Measure, cmd: Sequence[str], env: dict[str, str], log: Path, cwd: Path | None = None,
             repo: Path | None = None, inputs: Sequence[Path] = ()) -> Measure:
    """Run ``cmd`` and record wall time, the child's rusage and the repository size into ``m``.
    ``inputs`` (what the step reads) are read into the page cache first (see ``warm``)."""
    warm(*inputs)
    m.cmd = shlex.join(cmd)
    out_path = log.with_suffix(".stdout")
    # Peak RSS comes from GNU time, a small process of its own: the kernel charges a child
    # the RSS its parent had when it forked, and this harness can be hundreds of MiB.
    rss_path = log.with_suffix(".rss")
    cmd = ["/usr/bin/time", "-q", "-f", "%M", "-o", str(rss_path), *cmd]
    os.sync()  # do not let the previous step's writeback land in this one's time
    m.load1 = os.getloadavg()[0]
    with open(log, "ab") as lf, open(out_path, "wb") as of:
        lf.write(f"\n$ {m.cmd}\n".encode())
        lf.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(list(cmd), stdout=of, stderr=lf, env=env, cwd=cwd, stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        m.wall_s = time.perf_counter() - t0
        p.returncode = m.rc = os.waitstatus_to_exitcode(status)
    text = out_path.read_text(errors="replace")
    with open(log, "a") as lf:
        lf.write(text)
    out_path.unlink()
    m.user_s, m.sys_s = ru.ru_utime, ru.ru_stime
    m.cpu_s = ru.ru_utime + ru.ru_stime
    try:
        m.max_rss_kib = int(rss_path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        m.max_rss_kib = ru.ru_maxrss
    rss_path.unlink(missing_ok=True)
    if text.lstrip().startswith(("{", "[")):
        try:  # one document, or JSON lines whose last is the summary (docs/json.md)
            m.output = json.loads(text)
        except ValueError:
            try:
                m.output = json.loads(text.strip().splitlines()[-1])
            except ValueError:
                pass
    if m.rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        m.error = f"exit status {m.rc}: " + " | ".join(tail)
    if repo is not None:
        m.repo_bytes = du_bytes(repo)
    return m


# ---------------------------------------------------------------------------
# Tools


@dataclass
class Tool:
    name: str
    env: dict[str, str]
    init: Callable[[Path], list[str]]
    backup: Callable[[Path, Path, str], list[str]]  # repo, disk, snapshot label
    restore: Callable[[Path, Path, Path], tuple[list[str], Path | None, Path]]  # repo, out dir, disk
    encryption: str
    version: str = ""


def make_tools(vmbak: str, workdir: Path, baseline: str | None = None) -> dict[str, Tool]:
    base = dict(os.environ, PATH=sbin_path(), LC_ALL="C.UTF-8")
    tools: dict[str, Tool] = {}
    if baseline:
        for name, extra in (("vmbak-base", []), ("vmbak-noskip-base", ["--no-skip-unused"])):  # see --baseline-vmbak
            tools[name] = Tool(
                name, dict(base, VMBAK_PASSWORD=PASSWORD),
                init=lambda repo: [baseline, "-r", str(repo), "init"],
                backup=lambda repo, disk, label, extra=extra: [
                    baseline, "-r", str(repo), "--json", "backup", str(disk), "--name", NAME, *extra],
                restore=lambda repo, out, disk: (
                    [baseline, "-r", str(repo), "--json", "restore", f"{NAME}:latest", str(out / "disk.raw")],
                    None, out / "disk.raw"),
                encryption=f"as vmbak{'-noskip' if extra else ''}, with the baseline executable {baseline}",
                version=_version([baseline, "--version"]),
            )

    tools["vmbak"] = Tool(
        "vmbak", dict(base, VMBAK_PASSWORD=PASSWORD),
        init=lambda repo: [vmbak, "-r", str(repo), "init"],
        backup=lambda repo, disk, label: [vmbak, "-r", str(repo), "--json", "backup", str(disk), "--name", NAME],
        restore=lambda repo, out, disk: (
            [vmbak, "-r", str(repo), "--json", "restore", f"{NAME}:latest", str(out / "disk.raw")],
            None, out / "disk.raw"),
        encryption="aes-256-gcm (vmbak default), zstd level 1",
        version=_version([vmbak, "--version"]),
    )
    tools["vmbak-noskip"] = Tool(
        "vmbak-noskip", tools["vmbak"].env, init=tools["vmbak"].init,
        backup=lambda repo, disk, label: [vmbak, "-r", str(repo), "--json", "backup", str(disk), "--name", NAME,
                                          "--no-skip-unused"],
        restore=tools["vmbak"].restore,
        encryption="as vmbak; every block read and stored (--no-skip-unused), byte-exact restore",
        version=tools["vmbak"].version,
    )
    restic = tool_path("restic")
    if restic:
        tools["restic"] = Tool(
            "restic", dict(base, RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(workdir / "cache/restic")),
            init=lambda repo: [restic, "-r", str(repo), "init"],
            backup=lambda repo, disk, label: [restic, "-r", str(repo), "backup", "--host", "bench", str(disk)],
            restore=lambda repo, out, disk: (
                [restic, "-r", str(repo), "restore", "latest", "--target", str(out)],
                None, out / disk.relative_to("/")),
            encryption="AES-256-CTR + Poly1305 (restic always encrypts), repository v2, compression auto",
            version=_version([restic, "version"]),
        )
    borg = tool_path("borg")
    if borg:
        for name, comp in (("borg-lz4", "lz4"), ("borg-zstd", "zstd,3")):
            tools[name] = Tool(
                name, dict(base, BORG_PASSPHRASE=PASSWORD, BORG_BASE_DIR=str(workdir / "cache" / name),
                           BORG_RELOCATED_REPO_ACCESS_IS_OK="yes"),
                init=lambda repo: [borg, "init", "--encryption=repokey", str(repo)],
                backup=lambda repo, disk, label, comp=comp: [
                    borg, "create", "--compression", comp, f"{repo}::{label}", str(disk)],
                restore=lambda repo, out, disk: (
                    [borg, "extract", "--sparse", f"{repo}::incremental"], out, out / disk.relative_to("/")),
                encryption=f"repokey (AES-256-CTR + HMAC-SHA256), --compression {comp}",
                version=_version([borg, "--version"]),
            )
    return tools


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def relink(target: Path, link: Path) -> None:
    """Point the backed-up path at another image: a hard link, so no 4 GiB copy between steps."""
    link.unlink(missing_ok=True)
    os.link(target, link)


# ---------------------------------------------------------------------------
# Verifying restores


def compare_images(expected: Path, actual: Path, used: np.ndarray | None, bs: int) -> dict[str, Any]:
    """Byte comparison; with ``used``, blocks the filesystem does not use may instead be zeros."""
    size = expected.stat().st_size
    if actual.stat().st_size != size:
        return {"ok": False, "reason": f"size {actual.stat().st_size} != {size}"}
    piece = 64 * MIB
    bad_used = bad_free = zeroed = 0
    with open(expected, "rb", buffering=0) as fa, open(actual, "rb", buffering=0) as fb:
        for off in range(0, size, piece):
            a = np.frombuffer(fa.read(piece), dtype=np.uint8)
            b = np.frombuffer(fb.read(piece), dtype=np.uint8)
            if a.size != b.size:
                return {"ok": False, "reason": f"short read at {off}"}
            if np.array_equal(a, b):
                continue
            if used is None:
                return {"ok": False, "reason": f"differs in the 64 MiB at offset {off}"}
            a2, b2 = a.reshape(-1, bs), b.reshape(-1, bs)
            diff = (a2 != b2).any(axis=1)
            u = used[off // bs: off // bs + a2.shape[0]]
            bad_used += int((diff & u).sum())
            bad_free += int((diff & ~u & b2.any(axis=1)).sum())
            zeroed += int((diff & ~u).sum())
    ok = bad_used == 0 and bad_free == 0
    res: dict[str, Any] = {"ok": ok, "exact": zeroed == 0 and ok}
    if used is not None:
        res.update(unused_blocks_zeroed=zeroed, used_blocks_differing=bad_used, free_blocks_other=bad_free)
    if not ok:
        res["reason"] = f"{bad_used} used blocks differ, {bad_free} unused blocks hold other data"
    return res


def verify_restore(tool: str, restored: Path, v2: Path, meta: dict[str, Any]) -> dict[str, Any]:
    if not restored.exists():
        return {"ok": False, "reason": f"{restored} missing"}
    if restored.stat().st_size == v2.stat().st_size and sha256_file(restored) == meta["v2_sha256"]:
        return {"ok": True, "exact": True}
    if not tool.startswith("vmbak"):
        return {"ok": False, "reason": "sha256 differs"}
    # vmbak may restore blocks that no filesystem uses as zeros (holes): judge by dumpe2fs.
    bs, used = fs_used_blocks(v2)
    return compare_images(v2, restored, used, bs)


# ---------------------------------------------------------------------------
# One run of one tool


def clean(*paths: Path) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def run_tool(tool: Tool, run: int, workdir: Path, v1: Path, v2: Path, meta: dict[str, Any],
             baseline: str | None = None) -> list[Measure]:
    repo = workdir / "repos" / tool.name
    out = workdir / "restore" / tool.name
    disk = workdir / "disk" / "disk.raw"
    cache = workdir / "cache" / tool.name
    log = workdir / "logs" / f"run{run}-{tool.name}.log"
    for p in (repo, out, cache, log):
        clean(p)
    for p in (repo.parent, out, disk.parent, log.parent):
        p.mkdir(parents=True, exist_ok=True)
    results: list[Measure] = []

    init = measured(Measure(tool.name, "init", run), tool.init(repo), tool.env, log)
    if init.rc != 0:
        init.step = "full"
        return [init]
    for step, image in (("full", v1), ("incremental", v2)):
        relink(image, disk)
        m = measured(Measure(tool.name, step, run), tool.backup(repo, disk, step), tool.env, log, repo=repo,
                     inputs=[image])
        results.append(m)
        say(f"  run {run} {tool.name:9} {step:11} {m.wall_s:7.1f} s  cpu {m.cpu_s:7.1f} s  "
            f"rss {m.max_rss_kib / KIB:7.0f} MiB  repo {m.repo_bytes / MIB:8.0f} MiB"
            + (f"  FAILED: {m.error}" if m.rc else ""))
        if m.rc:
            return results
    cmd, cwd, restored = tool.restore(repo, out, disk)
    # With --baseline, the same repository is also restored by the baseline vmbak (first in
    # odd runs, second in even ones).
    steps = [("restore", cmd)]
    if baseline and tool.name.startswith("vmbak"):
        steps.append(("restore-baseline", [baseline, *cmd[1:]]))
        if run % 2 == 0:
            steps.reverse()
    for step, c in steps:
        clean(out)
        out.mkdir(parents=True)
        m = measured(Measure(tool.name, step, run), c, tool.env, log, cwd=cwd, repo=repo, inputs=[repo])
        if m.rc == 0:
            m.verify = verify_restore(tool.name, restored, v2, meta)
            if not m.verify.get("ok"):
                m.error = "restore verification failed: " + m.verify.get("reason", "?")
        results.append(m)
        say(f"  run {run} {tool.name:9} {step:11} {m.wall_s:7.1f} s  cpu {m.cpu_s:7.1f} s  "
            f"rss {m.max_rss_kib / KIB:7.0f} MiB  verify {'ok' if m.verify.get('ok') else m.error}")
    clean(out, repo, cache, disk)
    return results


# ---------------------------------------------------------------------------
# 64 GiB sparse disk


def sparse_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        off = end


def compare_sparse(a: Path, b: Path) -> dict[str, Any]:
    """Compare two sparse files over the union of their data extents; holes in both are equal."""
    size = a.stat().st_size
    if b.stat().st_size != size:
        return {"ok": False, "reason": f"size {b.stat().st_size} != {size}"}
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        ranges = sorted(list(sparse_extents(fa, size)) + list(sparse_extents(fb, size)))
        compared = 0
        for off, length in ranges:
            pos = off
            while pos < off + length:
                n = min(4 * MIB, off + length - pos)
                if os.pread(fa, n, pos) != os.pread(fb, n, pos):
                    return {"ok": False, "reason": f"differs near offset {pos}"}
                pos += n
                compared += n
        return {"ok": True, "exact": True, "compared_bytes": compared}
    finally:
        os.close(fa)
        os.close(fb)


def run_sparse(tool: Tool, run: int, workdir: Path) -> list[Measure]:
    base = workdir / "sparse64"
    clean(base)
    base.mkdir(parents=True)
    repo, disk, out = base / "repo", base / "src" / "disk.raw", base / "restore"
    disk.parent.mkdir()
    out.mkdir()
    log = workdir / "logs" / f"run{run}-sparse64.log"
    clean(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(SEED + 64))
    blocks = SPARSE_SIZE // WRITE_SIZE
    with open(disk, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for b in np.sort(rng.choice(blocks, SPARSE_WRITES, replace=False)).tolist():
            f.seek(b * WRITE_SIZE)
            f.write(rng.bytes(WRITE_SIZE))
    results: list[Measure] = []
    init = measured(Measure("sparse64", "init", run), tool.init(repo), tool.env, log)
    if init.rc:
        init.step = "full"
        return [init]
    for step in ("full", "incremental"):
        if step == "incremental":
            with open(disk, "r+b") as f:
                for b in np.sort(rng.choice(blocks, SPARSE_CHANGES, replace=False)).tolist():
                    f.seek(b * WRITE_SIZE)
                    f.write(rng.bytes(WRITE_SIZE))
        m = measured(Measure("sparse64", step, run), tool.backup(repo, disk, step), tool.env, log, repo=repo)
        results.append(m)
        say(f"  run {run} sparse64  {step:11} {m.wall_s:7.1f} s  cpu {m.cpu_s:7.1f} s  "
            f"rss {m.max_rss_kib / KIB:7.0f} MiB" + (f"  FAILED: {m.error}" if m.rc else ""))
        if m.rc:
            return results
    cmd, _, restored = tool.restore(repo, out, disk)
    m = measured(Measure("sparse64", "restore", run), cmd, tool.env, log, repo=repo)
    if m.rc == 0:
        m.verify = compare_sparse(disk, restored)
        if not m.verify.get("ok"):
            m.error = "restore verification failed: " + m.verify.get("reason", "?")
    results.append(m)
    say(f"  run {run} sparse64  {'restore':11} {m.wall_s:7.1f} s  cpu {m.cpu_s:7.1f} s  "
        f"rss {m.max_rss_kib / KIB:7.0f} MiB  verify {'ok' if m.verify.get('ok') else m.error}")
    clean(base)
    return results


# ---------------------------------------------------------------------------
# A chain of 30 incrementals against one full of the same disk


def build_chain(tool: Tool, workdir: Path, v1: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """(chain repository, full repository, final disk, facts): a full backup of a copy of
    v1.raw and CHAIN_LENGTH incrementals, each after CHANGED_WRITES random 64 KiB writes
    inside the large files' data (as v2.raw), then one full backup of the final disk into
    a second repository. Built once per bench invocation."""
    base = workdir / "chain30"
    clean(base)
    base.mkdir(parents=True)
    disk, chain_repo, full_repo = base / "disk.raw", base / "chain-repo", base / "full-repo"
    log = workdir / "logs" / "chain30-build.log"
    clean(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say(f"chain30: copying {v1} and taking a full and {CHAIN_LENGTH} incremental backups ...")
    shutil.copyfile(v1, disk)
    bs = fs_block_size(v1)
    windows = file_data_windows(v1, _big_files(v1), bs)
    rng = np.random.Generator(np.random.PCG64(SEED + 30))
    for step in range(CHAIN_LENGTH + 1):
        if step == 0:
            m = measured(Measure("chain30", "init", 0), tool.init(chain_repo), tool.env, log)
            if m.rc:
                raise RuntimeError(f"chain30: init failed: {m.error}")
        else:
            fd = os.open(disk, os.O_WRONLY)
            try:
                for off in np.sort(rng.choice(windows, CHANGED_WRITES, replace=False)).tolist():
                    os.pwrite(fd, rng.bytes(WRITE_SIZE), off)
            finally:
                os.close(fd)
        m = measured(Measure("chain30", "build", step), tool.backup(chain_repo, disk, "chain"), tool.env, log)
        if m.rc:
            raise RuntimeError(f"chain30: backup {step} failed: {m.error}")
    for cmd in (tool.init(full_repo), tool.backup(full_repo, disk, "full")):
        m = measured(Measure("chain30", "build", 0), cmd, tool.env, log)
        if m.rc:
            raise RuntimeError(f"chain30: full of the final disk failed: {m.error}")
    facts = {"build_s": round(time.perf_counter() - t0, 1), "sha256": sha256_file(disk)}
    say(f"chain30: built in {facts['build_s']} s")
    return chain_repo, full_repo, disk, facts


def run_chain(tool: Tool, run: int, workdir: Path, built: tuple[Path, Path, Path, dict[str, Any]],
              baseline: str | None = None) -> list[Measure]:
    """Restore the head of the chain and the one full of the same disk (with ``baseline``,
    each also with that vmbak), each twice, in the order A B B A: the chain first in odd
    runs, the full first in even ones.

    In every run each kind comes once before and once after the other, whatever the
    number of runs. A restore's time depends on the step before it: in the 30 runs of six
    sets of 2026-12-04 and 05 (one of each, alternating which went first), the full took
    1.52 s (median) right after the chain's restore and 1.69 s as the first of the part,
    while the chain took 1.77 s first and 1.73 s second; with 5 runs, 3 had the chain
    first. Which kind is the part's first restore (often the slowest) still alternates
    from run to run."""
    chain_repo, full_repo, disk, facts = built
    out = workdir / "chain30" / "restore"
    log = workdir / "logs" / f"run{run}-chain30.log"
    clean(log)
    results = []
    order = [("restore-chain", chain_repo, None), ("restore-full", full_repo, None)]
    if baseline:
        order += [("restore-chain-baseline", chain_repo, baseline), ("restore-full-baseline", full_repo, baseline)]
    seq = order if run % 2 else order[::-1]
    for step, repo, exe in [*seq, *seq[::-1]]:
        clean(out)
        out.mkdir(parents=True)
        cmd, _, restored = tool.restore(repo, out, disk)
        if exe:
            cmd = [exe, *cmd[1:]]
        m = measured(Measure("chain30", step, run), cmd, tool.env, log, inputs=[repo])
        if m.rc == 0:
            if restored.stat().st_size == disk.stat().st_size and sha256_file(restored) == facts["sha256"]:
                m.verify = {"ok": True, "exact": True}
            else:
                bs, used = fs_used_blocks(disk)
                m.verify = compare_images(disk, restored, used, bs)
            if not m.verify.get("ok"):
                m.error = "restore verification failed: " + m.verify.get("reason", "?")
        results.append(m)
        say(f"  run {run} chain30   {step:13} {m.wall_s:7.2f} s  cpu {m.cpu_s:7.2f} s  "
            f"rss {m.max_rss_kib / KIB:7.0f} MiB  verify {'ok' if m.verify.get('ok') else m.error}")
    clean(out)
    return results


# ---------------------------------------------------------------------------
# Fixed cost of a command that does nothing


def build_fixed(tools: dict[str, Tool], workdir: Path) -> dict[str, Path]:
    """A small repository per tool (one backup of a 1 MiB file) for the fixed-cost part."""
    base = workdir / "fixedcost"
    clean(base)
    (base / "src").mkdir(parents=True)
    small = base / "src" / "small.raw"
    small.write_bytes(np.random.Generator(np.random.PCG64(SEED + 1)).bytes(MIB))
    log = workdir / "logs" / "fixedcost-build.log"
    clean(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    repos = {}
    for name in ("vmbak", "restic"):
        if name not in tools:
            continue
        repo = base / f"{name}-repo"
        for cmd in (tools[name].init(repo), tools[name].backup(repo, small, "small")):
            m = measured(Measure("fixedcost", "build", 0), cmd, tools[name].env, log)
            if m.rc:
                raise RuntimeError(f"fixedcost: {name} failed: {m.error}")
        repos[name] = repo
    return repos


def run_fixed(tools: dict[str, Tool], run: int, workdir: Path, repos: dict[str, Path],
              vmbak: str) -> list[Measure]:
    """FIXED_RUNS times, alternating: `vmbak snapshots` and `restic snapshots` on the small
    repositories (every vmbak run derives the key with scrypt, as every command does)."""
    log = workdir / "logs" / f"run{run}-fixedcost.log"
    clean(log)
    cmds = {"vmbak": [vmbak, "-r", str(repos.get("vmbak", "")), "snapshots"]}
    if "restic" in repos:
        cmds["restic"] = [tool_path("restic") or "restic", "-r", str(repos["restic"]), "snapshots"]
    results = []
    for _ in range(FIXED_RUNS):
        for name, cmd in cmds.items():
            m = measured(Measure(f"fixedcost-{name}", "snapshots", run), cmd, tools[name].env, log)
            results.append(m)
    for name in cmds:
        ms = [m for m in results if m.tool == f"fixedcost-{name}" and m.rc == 0]
        if ms:
            say(f"  run {run} fixedcost {name:9} snapshots median {statistics.median(m.wall_s for m in ms):.3f} s  "
                f"cpu {statistics.median(m.cpu_s for m in ms):.3f} s")
    return results


def run_physical(run: int, workdir: Path, v1: Path) -> list[Measure]:
    """The physical references on v1.raw, warm like every backup: ``partclone.ext4 -c |
    zstd -1 -T2`` (reads only the blocks ext4 uses, as vmbak does, and compresses them on
    both CPUs, without encryption), ``qemu-img convert -O raw`` and ``cp --sparse=always``
    (copy every byte of the image; holes only where it is zero). The size column is the
    output's."""
    base = workdir / "physical"
    clean(base)
    base.mkdir(parents=True)
    log = workdir / "logs" / f"run{run}-physical.log"
    clean(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=sbin_path(), LC_ALL="C.UTF-8")
    outs = {"partclone-zstd": base / "v1.pc.zst", "qemu-img-convert": base / "v1.qemu.raw",
            "cp-sparse": base / "v1.cp.raw"}
    pipe = (f"partclone.ext4 -c -q -L {shlex.quote(str(base / 'partclone.log'))} -s {shlex.quote(str(v1))} -o - "
            f"| zstd -1 -T2 -q -f -o {shlex.quote(str(outs['partclone-zstd']))}")
    cmds = {"partclone-zstd": ["bash", "-o", "pipefail", "-c", pipe],
            "qemu-img-convert": ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(v1), str(outs["qemu-img-convert"])],
            "cp-sparse": ["cp", "--sparse=always", str(v1), str(outs["cp-sparse"])]}
    needs = {"partclone-zstd": ("partclone.ext4", "zstd"), "qemu-img-convert": ("qemu-img",), "cp-sparse": ("cp",)}
    results = []
    for name in PHYSICAL:
        missing = [t for t in needs[name] if not tool_path(t)]
        if missing:
            say(f"  physical: {name} skipped, not installed: {', '.join(missing)}")
            continue
        m = measured(Measure(name, "full", run), cmds[name], env, log, repo=outs[name], inputs=[v1])
        results.append(m)
        say(f"  run {run} {name:16} {m.wall_s:7.1f} s  cpu {m.cpu_s:7.1f} s  output {m.repo_bytes / MIB:8.0f} MiB"
            + (f"  FAILED: {m.error}" if m.rc else ""))
        clean(outs[name])
    clean(base)
    return results


# ---------------------------------------------------------------------------
# Report


def medians(results: list[Measure]) -> dict[tuple[str, str], dict[str, float]]:
    groups: dict[tuple[str, str], list[Measure]] = {}
    for m in results:
        if m.rc == 0 and not m.error and m.step not in ("init", "build"):
            groups.setdefault((m.tool, m.step), []).append(m)
    med: dict[tuple[str, str], dict[str, float]] = {}
    for key, ms in groups.items():
        med[key] = {
            "runs": len(ms),
            "wall_s": statistics.median(m.wall_s for m in ms),
            "cpu_s": statistics.median(m.cpu_s for m in ms),
            "max_rss_mib": statistics.median(m.max_rss_kib for m in ms) / KIB,
            "worst_rss_mib": max(m.max_rss_kib for m in ms) / KIB,
            "repo_bytes": statistics.median(m.repo_bytes for m in ms),
        }
    return med


def ratios(med: dict[tuple[str, str], dict[str, float]]) -> list[dict[str, Any]]:
    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float | None:
        if a in med and b in med and med[b]["wall_s"] > 0:
            return med[a]["wall_s"] / med[b]["wall_s"]
        return None

    rows: list[dict[str, Any]] = []
    for key, (num, den), label in (
        ("borg_lz4_full_over_vmbak_full", (("borg-lz4", "full"), ("vmbak", "full")),
         "borg-lz4 full wall / vmbak full wall"),
        ("restic_incremental_over_vmbak_incremental",
         (("restic", "incremental"), ("vmbak", "incremental")), "restic incremental wall / vmbak incremental wall"),
        ("restic_restore_over_vmbak_restore", (("restic", "restore"), ("vmbak", "restore")),
         "restic restore wall / vmbak restore wall"),
    ):
        r = ratio(num, den)
        rows.append({"name": key, "label": label, "value": r, "target": f">= {TARGETS[key]}",
                     "pass": None if r is None else r >= TARGETS[key]})
    for key, (num, den), label in (
        ("restic_full_over_vmbak_full", (("restic", "full"), ("vmbak", "full")),
         "restic full wall / vmbak full wall"),
        ("restic_full_over_vmbak_noskip_full", (("restic", "full"), ("vmbak-noskip", "full")),
         "restic full wall / vmbak --no-skip-unused full wall"),
        ("restic_restore_over_vmbak_restore_issue16", (("restic", "restore"), ("vmbak", "restore")),
         "restic restore wall / vmbak restore wall (issue 16)"),
    ):
        r = ratio(num, den)
        rows.append({"name": key, "label": label, "value": r, "target": f">= {TARGETS[key]}",
                     "pass": None if r is None else r >= TARGETS[key]})
    for tool in ("vmbak-base", "vmbak-noskip-base"):
        if (tool, "full") in med and ("restic", "full") in med:
            r = ratio(("restic", "full"), (tool, "full"))
            rows.append({"name": f"restic_full_over_{tool.replace('-', '_')}_full",
                         "label": f"restic full wall / {tool} full wall (the baseline, for comparison)",
                         "value": r, "target": "", "pass": None})
    if ("vmbak", "full") in med and ("restic", "full") in med and med[("restic", "full")]["repo_bytes"]:
        f = med[("vmbak", "full")]["repo_bytes"] / med[("restic", "full")]["repo_bytes"]
        rows.append({"name": "vmbak_full_bytes_over_restic", "label": "vmbak repository / restic repository after the full",
                     "value": f, "target": f"<= {REPO_BYTES_MAX_FRACTION:.3f}", "pass": f <= REPO_BYTES_MAX_FRACTION})
    r = ratio(("chain30", "restore-chain"), ("chain30", "restore-full"))
    rows.append({"name": "chain30_restore_over_full_restore",
                 "label": f"restore of a {CHAIN_LENGTH}-incremental chain / restore of one full (wall)",
                 "value": r, "target": f"<= {CHAIN_RESTORE_MAX}", "pass": None if r is None else r <= CHAIN_RESTORE_MAX})
    r = ratio(("chain30", "restore-chain-baseline"), ("chain30", "restore-full-baseline"))
    if r is not None:
        rows.append({"name": "chain30_baseline_restore_over_full_restore",
                     "label": f"baseline: restore of the {CHAIN_LENGTH}-incremental chain / of one full (wall)",
                     "value": r, "target": "(for comparison)", "pass": None})
    for key, (num, den), label in (
        ("vmbak_baseline_restore_over_restore", (("vmbak", "restore-baseline"), ("vmbak", "restore")),
         "baseline restore wall / vmbak restore wall"),
        ("vmbak_noskip_baseline_restore_over_restore", (("vmbak-noskip", "restore-baseline"), ("vmbak-noskip", "restore")),
         "baseline --no-skip-unused restore wall / vmbak's"),
        ("chain30_baseline_chain_over_chain", (("chain30", "restore-chain-baseline"), ("chain30", "restore-chain")),
         "baseline chain30 chain-head restore wall / vmbak's"),
        ("chain30_baseline_full_over_full", (("chain30", "restore-full-baseline"), ("chain30", "restore-full")),
         "baseline chain30 full restore wall / vmbak's"),
    ):
        r = ratio(num, den)
        if r is not None:
            rows.append({"name": key, "label": label, "value": r, "target": "(for comparison)", "pass": None})
    for what in ("wall_s", "cpu_s"):
        v = med.get(("fixedcost-vmbak", "snapshots"), {}).get(what)
        rows.append({"name": f"vmbak_snapshots_{what}", "label": f"vmbak snapshots on a small repository ({what})",
                     "value": v, "target": f"<= {FIXED_COST_MAX_S}", "pass": None if v is None else v <= FIXED_COST_MAX_S})
    for tool, label in (("vmbak", "vmbak peak RSS (MiB, worst step and run)"),
                        ("vmbak-noskip", "vmbak --no-skip-unused peak RSS (MiB, worst step and run)"),
                        ("sparse64", "vmbak peak RSS on the 64 GiB sparse disk (MiB)")):
        vals = [med[(tool, s)]["worst_rss_mib"] for s in STEPS if (tool, s) in med]
        v = max(vals) if vals else None
        rows.append({"name": f"{tool}_peak_rss_mib", "label": label, "value": v, "target": f"< {RSS_LIMIT_MIB}",
                     "pass": None if v is None else v < RSS_LIMIT_MIB})
    return rows


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def report(results: list[Measure], parts: list[str], runs: int, meta: dict[str, Any],
           tools: dict[str, Tool]) -> str:
    med = medians(results)
    disk = (f"disk {fmt_bytes(IMAGE_SIZE)} ext4 ({fmt_bytes(meta.get('v1_fs_used_bytes', 0))} used by the "
            f"filesystem), incremental = {meta.get('changed_offsets', CHANGED_WRITES)} x 64 KiB writes; "
            if meta else "")
    loads = [m.load1 for m in results if m.load1]
    load = f" 1-minute load average {min(loads):.1f}-{max(loads):.1f} at the steps' starts." if loads else ""
    lines = [f"Medians of {runs} run(s); {disk}{os.cpu_count()} CPUs, warm page cache.{load}", "",
             "| tool | step | wall s | CPU s | peak RSS MiB | repo after step | MB/s (disk size / wall) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    rows_of: list[tuple[str, str]] = []
    for part in parts:
        if part == "chain30":
            rows_of += [("chain30", "restore-chain"), ("chain30", "restore-full")]
            rows_of += [("chain30", s) for s in ("restore-chain-baseline", "restore-full-baseline")
                        if ("chain30", s) in med]
        elif part == "fixedcost":
            rows_of += [("fixedcost-vmbak", "snapshots"), ("fixedcost-restic", "snapshots")]
        elif part == "physical":
            rows_of += [(name, "full") for name in PHYSICAL]
        else:
            rows_of += [(part, step) for step in STEPS]
            if (part, "restore-baseline") in med:
                rows_of.append((part, "restore-baseline"))
    for part, step in rows_of:
        size = SPARSE_SIZE if part == "sparse64" else IMAGE_SIZE
        v = med.get((part, step))
        if v is None:
            lines.append(f"| {part} | {step} | failed or not run | | | | |")
            continue
        rate = "" if part.startswith("fixedcost") else f"{size / 1e6 / v['wall_s']:.0f}"
        lines.append(f"| {part} | {step} | {v['wall_s']:.2f} | {v['cpu_s']:.2f} | {v['max_rss_mib']:.0f} | "
                     f"{fmt_bytes(v['repo_bytes'])} | {rate} |")
    lines += ["", "| check | value | target | result |", "|---|---:|---|---|"]
    for r in ratios(med):
        val = "n/a" if r["value"] is None else f"{r['value']:.2f}"
        res = "n/a" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        lines.append(f"| {r['label']} | {val} | {r['target']} | {res} |")
    lines += ["", "Encryption and compression:"]
    for name in parts:
        t = tools.get(name)
        if t:
            lines.append(f"- {name}: {t.encryption} ({t.version})")
    failures = [m for m in results if m.rc or m.error]
    if failures:
        lines += ["", "Failures:"]
        lines += [f"- run {m.run} {m.tool} {m.step}: {m.error} (`{m.cmd}`)" for m in failures]
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark vmbak against restic and borg on a 4 GiB ext4 image.")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool (default 3); medians are reported")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work",
                    help="images, repositories, logs and results (default bench/work)")
    ap.add_argument("--only", default=",".join(ALL_PARTS),
                    help=f"comma-separated subset of {','.join(ALL_PARTS)} (default: all)")
    ap.add_argument("--rebuild-images", action="store_true", help="rebuild v1.raw and v2.raw")
    ap.add_argument("--vmbak", default=str(ROOT / ".venv" / "bin" / "vmbak"), help="vmbak executable")
    ap.add_argument("--baseline", default=None, metavar="VMBAK",
                    help="another vmbak executable (for example an older build) that also restores what "
                         "vmbak backed up, in the same runs: steps restore-baseline and chain30's "
                         "restore-*-baseline")
    ap.add_argument("--baseline-vmbak", metavar="PATH",
                    help="an older vmbak executable (for example a script running an older source tree): "
                         "vmbak and vmbak-noskip are also run with it, as vmbak-base and vmbak-noskip-base, "
                         "right after them in every run")
    args = ap.parse_args(argv)

    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown or not parts:
        ap.error(f"--only: unknown {unknown}; choose from {', '.join(ALL_PARTS)}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    for t in ("mkfs.ext4", "dumpe2fs", "debugfs", "du"):
        if not tool_path(t):
            say(f"bench: {t} not found (install e2fsprogs)")
            return 2
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tools = make_tools(args.vmbak, workdir, args.baseline_vmbak)
    if args.baseline_vmbak:
        if not os.access(args.baseline_vmbak, os.X_OK):
            say(f"bench: {args.baseline_vmbak} is not an executable")
            return 2
        with_base = []
        for p in parts:
            with_base.append(p)
            if p in ("vmbak", "vmbak-noskip"):
                with_base.append(f"{p}-base")
        parts = with_base
    if any(p in ("vmbak", "vmbak-noskip", "sparse64", "chain30", "fixedcost") for p in parts) \
            and not os.access(args.vmbak, os.X_OK):
        say(f"bench: {args.vmbak} not found; run scripts/setup.sh")
        return 2
    if args.baseline and not os.access(args.baseline, os.X_OK):
        say(f"bench: --baseline {args.baseline} is not an executable")
        return 2
    missing = [p for p in parts if p in TOOLS and p not in tools]
    if missing:
        say(f"bench: not installed, skipped: {', '.join(missing)} (apt-get install restic borgbackup)")
        parts = [p for p in parts if p not in missing]

    t0 = time.perf_counter()
    meta: dict[str, Any] = {}
    v1 = v2 = workdir / "images"
    if any(p in TOOLS or p in ("chain30", "physical") for p in parts):
        meta = build_images(workdir / "images", args.rebuild_images)
        v1, v2 = workdir / "images" / "v1.raw", workdir / "images" / "v2.raw"
        say(f"images ready: {v1} and {v2} ({meta.get('changed_offsets')} changed 64 KiB blocks)")

    chain = build_chain(tools["vmbak"], workdir, v1) if "chain30" in parts else None
    fixed = build_fixed(tools, workdir) if "fixedcost" in parts else None
    if chain:
        meta["chain30"] = chain[3]
    results: list[Measure] = []
    for run in range(1, args.runs + 1):
        for part in parts:
            if part == "sparse64":
                results += run_sparse(tools["vmbak"], run, workdir)
            elif part == "chain30":
                assert chain is not None
                results += run_chain(tools["vmbak"], run, workdir, chain, args.baseline)
            elif part == "fixedcost":
                assert fixed is not None
                results += run_fixed(tools, run, workdir, fixed, args.vmbak)
            elif part == "physical":
                results += run_physical(run, workdir, v1)
            else:
                results += run_tool(tools[part], run, workdir, v1, v2, meta, args.baseline)
    clean(workdir / "disk", workdir / "cache", workdir / "restore", workdir / "repos", workdir / "chain30",
          workdir / "fixedcost", workdir / "physical")

    table = report(results, parts, args.runs, meta, tools)
    print(table)
    med = medians(results)
    doc = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": args.runs,
        "parts": parts,
        "images": meta,
        "tools": {n: {"version": t.version, "encryption": t.encryption} for n, t in tools.items()},
        "baseline": args.baseline,
        "results": [asdict(m) for m in results],
        "medians": [{"tool": k[0], "step": k[1], **v} for k, v in sorted(med.items())],
        "checks": ratios(med),
        "table_markdown": table,
        "duration_s": round(time.perf_counter() - t0, 1),
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("results.json", f"results-{stamp}.json"):
        (workdir / name).write_text(json.dumps(doc, indent=2, default=str))
    say(f"results written to {workdir / 'results.json'} (and results-{stamp}.json)")
    return 1 if any(m.rc or m.error for m in results) else 0


if __name__ == "__main__":
    sys.exit(main())
