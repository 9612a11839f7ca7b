"""Fixtures for the usage (unused block) tests: real filesystems and independent oracles.

* ``oracle_partclone(fs, image, offset=0)`` -> (n, 2) free byte ranges from ``partclone.<fs> -D``
  (its domain file marks the bytes it would not copy with ``?``), shifted by ``offset``
* ``oracle_dumpe2fs(image, offset=0)`` -> free byte ranges from dumpe2fs's per-group lists
* ``analyze_image(path)`` -> ``vmbak.usage.DiskUsage`` of a raw image
* ``assert_free_subset(ours, oracle, slack=...)`` -> bytes the oracle calls free and we do not;
  fails if we call free any byte the oracle calls used, or if we miss more than ``slack``
* ``build_ext(path, size, mkfs_args, files_root, seed)`` makes an ext2/3/4 filesystem in a file
  pre-filled with random bytes (so free space holds garbage), populated with ``mkfs -d``
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fatlvm_util import analyze_path, garbage_file, partclone_free, tool

from vmbak.usage import DiskUsage
from vmbak.usage.model import normalize, subtract, total


def dumpe2fs_free(image: str | os.PathLike[str], offset: int = 0) -> np.ndarray:
    out = subprocess.run([tool("dumpe2fs"), os.fspath(image)], check=True, capture_output=True, text=True).stdout
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
    cm = re.search(r"^Cluster size:\s+(\d+)", out, re.M)
    cluster = int(cm.group(1)) if cm else bs  # bigalloc lists a free cluster by its first block
    free = []
    for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
        for item in m.group(1).split(","):
            item = item.strip()
            if not item:
                continue
            a, _, b = item.partition("-")
            lo, hi = int(a), int(b or a)
            end = -(-((hi + 1) * bs) // cluster) * cluster
            free.append((lo * bs + offset, end + offset))
    return normalize(np.array(free, np.int64).reshape(-1, 2))


def check_free_subset(ours: np.ndarray, oracle: np.ndarray, slack: int) -> int:
    wrong = subtract(ours, oracle)
    assert total(wrong) == 0, f"vmbak calls {total(wrong)} used bytes free, first at {wrong[:3].tolist()}"
    missed = total(oracle) - total(ours)
    assert missed <= slack, f"vmbak misses {missed} free bytes (slack {slack})"
    return missed


def build_ext_image(path: Path, size: int, mkfs_args: list[str], files_root: Path | None, seed: int) -> Path:
    garbage_file(path, size, seed)
    cmd = [tool("mke2fs"), "-q", "-F", "-E", "nodiscard", *mkfs_args]
    if files_root is not None:
        cmd += ["-d", os.fspath(files_root)]
    subprocess.run([*cmd, os.fspath(path)], check=True, capture_output=True)
    return path


def make_tree(root: Path, seed: int, nfiles: int = 20, max_size: int = 400_000) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for i in range(nfiles):
        rel = f"d{i % 4}/sub{i % 3}/f{i}.bin"
        n = int(rng.integers(0, max_size))
        data = rng.bytes(n) if i % 2 else (b"line %d\n" % i) * (n // 8)
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[rel] = data
    return files


@pytest.fixture
def oracle_partclone() -> Callable[..., np.ndarray]:
    return partclone_free


@pytest.fixture
def oracle_dumpe2fs() -> Callable[..., np.ndarray]:
    return dumpe2fs_free


@pytest.fixture
def assert_free_subset() -> Callable[..., int]:
    return check_free_subset


@pytest.fixture
def analyze_image() -> Callable[[str | os.PathLike[str]], DiskUsage]:
    return analyze_path


@pytest.fixture
def build_ext() -> Callable[..., Path]:
    return build_ext_image


@pytest.fixture
def file_tree() -> Callable[..., dict[str, bytes]]:
    return make_tree
