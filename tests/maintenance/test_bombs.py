"""Decompression bombs (issue 18, item 6): a small crafted chunk, manifest, index file or
prune mark never makes a reader allocate more than its format allows. Each object is
sealed with the repository's own keys (as someone with write access to an unencrypted
repository can), and the peak memory of the real CLI is measured with GNU time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import blake3
import pytest
import zstandard

from vmbak.repo.index import INDEX_AAD, index_id
from vmbak.repo.manifest import MANIFEST_AAD, MANIFEST_MAGIC
from vmbak.repo.marks import MARK_AAD, MARK_VERSION, PRUNE_DIR
from vmbak.repo.pack import CODEC_ZSTD, PackWriter, chunk_aad

MiB = 1 << 20
BOMB = 1 << 30  # what the crafted frames decompress to; the old code allocated all of it
RSS_LIMIT_MIB = 450  # a vmbak command on these small repositories peaks near 120 MiB


def zeros_frame(n: int, content_size: bool = True) -> bytes:
    c = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    return c.compress(bytes(n))


def run_measured(repo, *args: object) -> tuple[subprocess.CompletedProcess[str], int]:  # noqa: ANN001
    """Run vmbak under GNU time; return the process and its peak RSS in MiB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.update({k: v for k, v in repo.env().items() if v is not None})
    cmd = ["/usr/bin/time", "-f", "maxrss=%M", sys.executable, "-m", "vmbak.cli.main", *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    m = re.search(r"maxrss=(\d+)", p.stderr)
    assert m, p.stderr
    p.stderr = p.stderr[:m.start()] + p.stderr[m.end() + 1:]
    return p, int(m.group(1)) // 1024


def no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in p.stderr, p.stderr


@pytest.fixture
def small(make_repo, make_disk):
    repo = make_repo("none")
    disk = make_disk("b.raw", MiB, seed=11)
    repo.backup(disk, "b")
    return repo, disk


@pytest.mark.parametrize("content_size", [True, False])
def test_chunk_bomb(small, tmp_path, content_size, assert_cli_error):
    repo, _ = small
    lib = repo.open()
    m = lib.manifests()[0]
    cid = bytes(m.ext_id[0])
    # Rewrite every chunk into one new pack, the target's blob replaced by a bomb, and
    # drop the index so the pack header is read (as after a crash).
    blobs = repo.take_blobs(lib)
    pw = PackWriter(lib.backend, lib.sealer)
    for c, blob, raw in blobs:
        if c == cid:
            raw = raw if content_size else BOMB
            blob = lib.sealer.seal(bytes((CODEC_ZSTD,)) + zeros_frame(BOMB, content_size), chunk_aad(cid))
        pw.add(c, blob, raw)
    pw.finish()
    for args in (("restore", "b:latest", tmp_path / "o.raw"), ("check", "--read-data")):
        p, rss = run_measured(repo, *args)
        no_traceback(p)
        assert p.returncode != 0
        assert cid.hex()[:16] in p.stderr + p.stdout
        assert rss < RSS_LIMIT_MIB, f"{args[0]} peaked at {rss} MiB"
    assert not (tmp_path / "o.raw").exists()


def _bomb_manifest(lib) -> str:  # noqa: ANN001
    """A manifest whose header describes a 1 MiB disk and whose frame then goes on with
    a GiB of zeros."""
    good = lib.manifests()[0]
    header = {"version": 1, "name": "bomb", "type": "full", "time": "2026-01-01T00:00:00.000000Z",
              "disk_size": MiB, "block_size": 65536, "chunk_blocks": 16, "source": "x", "hostname": "h",
              "change_source": "full", "parent": None, "reference": None, "change_id": None,
              "bht_count": 0, "stats": {}, "notes": [], "extra": {},
              "arrays": [{"name": "ext_start", "encoding": "<u8", "count": 0},
                         {"name": "ext_count", "encoding": "<u4", "count": 0},
                         {"name": "ext_id", "encoding": "V32", "count": 0},
                         {"name": "bht_chunks", "encoding": "V32", "count": 0}]}
    hj = json.dumps(header).encode()
    body = MANIFEST_MAGIC + len(hj).to_bytes(4, "little") + hj
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=len(body) + BOMB)
    plain = cobj.compress(body)
    zero = bytes(64 * MiB)
    for _ in range(BOMB // len(zero)):
        plain += cobj.compress(zero)
    plain += cobj.flush()
    sid = blake3.blake3(plain, key=lib.sealer.id_key).hexdigest()
    lib.backend.write(f"snapshots/{sid}", lib.sealer.seal(plain, MANIFEST_AAD))
    assert good.id != sid
    return sid


def test_manifest_bomb(small, tmp_path):
    repo, _ = small
    sid = _bomb_manifest(repo.open())
    for args in (("snapshots",), ("check",)):
        p, rss = run_measured(repo, *args)
        no_traceback(p)
        assert sid[:8] in p.stderr + p.stdout, p.stderr
        assert "longer than its header says" in p.stderr + p.stdout
        assert rss < RSS_LIMIT_MIB, f"{args[0]} peaked at {rss} MiB"


def test_manifest_with_hostile_geometry_is_refused(small):
    """Array counts are checked against the disk's block count before any is read."""
    repo, _ = small
    lib = repo.open()
    header = {"version": 1, "name": "g", "type": "full", "time": "2026-01-01T00:00:00.000000Z",
              "disk_size": MiB, "block_size": 65536, "chunk_blocks": 16, "source": "x", "hostname": "h",
              "change_source": "full", "parent": None, "reference": None, "change_id": None, "bht_count": 0,
              "arrays": [{"name": "ext_id", "encoding": "V4000000000", "count": 1}]}
    hj = json.dumps(header).encode()
    plain = zstandard.ZstdCompressor().compress(MANIFEST_MAGIC + len(hj).to_bytes(4, "little") + hj)
    sid = blake3.blake3(plain, key=lib.sealer.id_key).hexdigest()
    lib.backend.write(f"snapshots/{sid}", lib.sealer.seal(plain, MANIFEST_AAD))
    p, rss = run_measured(repo, "snapshots")
    no_traceback(p)
    assert sid[:8] in p.stderr and "unknown or malformed array" in p.stderr
    assert rss < RSS_LIMIT_MIB


def test_index_bomb(small, tmp_path):
    repo, _ = small
    lib = repo.open()
    blob = lib.sealer.seal(zeros_frame(BOMB), INDEX_AAD)
    iid = index_id(blob)
    lib.backend.write(f"index/{iid}", blob)
    p, rss = run_measured(repo, "restore", "b:latest", tmp_path / "o.raw")
    no_traceback(p)
    assert iid[:8] in p.stderr + p.stdout
    assert "more than the" in p.stderr + p.stdout
    assert rss < RSS_LIMIT_MIB, f"restore peaked at {rss} MiB"


def test_prune_mark_bomb(small):
    repo, _ = small
    lib = repo.open()
    name = f"{PRUNE_DIR}/mark-{os.urandom(16).hex()}"
    lib.backend.write(name, lib.sealer.seal(zeros_frame(BOMB), MARK_AAD))
    p, rss = run_measured(repo, "check")
    no_traceback(p)
    assert rss < RSS_LIMIT_MIB, f"check peaked at {rss} MiB"
    assert MARK_VERSION >= 1
