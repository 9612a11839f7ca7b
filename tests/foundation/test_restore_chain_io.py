"""The head of a chain of incrementals restores with about the system calls of a full: each
pack is opened once per restore thread (not once per chunk), and the disk is written in
large runs (the small chunks of the incrementals join the blocks around them) instead of
one write per chunk. Counted with strace on the real command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .strace_util import strace_calls

BLOCK = 64 * 1024
MiB = 1 << 20
WORKERS = 2


def _strace_calls(log: Path) -> list[str]:
    return [call for _, call in strace_calls(log)]


def test_chain_head_restore_opens_each_pack_once_per_thread_and_writes_long_runs(
        make_repo, make_disk, tmp_path, assert_same_file):
    repo = make_repo("aes-256-gcm")
    size = 32 * MiB
    disk = make_disk("c.raw", size, seed=11)  # random: every block holds data
    repo.backup(disk, "c")
    rng = np.random.default_rng(12)
    for k in range(6):  # six incrementals of 40 scattered 64 KiB chunks each
        for blk in np.sort(rng.choice(size // BLOCK, 40, replace=False)).tolist():
            disk.write_random(blk * BLOCK, BLOCK, seed=100 * k + blk)
        assert repo.backup(disk, "c")["type"] == "incremental"

    out = tmp_path / "out.raw"
    log = tmp_path / "strace.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.update({k: v for k, v in repo.env().items() if v is not None})
    subprocess.run(["strace", "-f", "-qq", "-o", log, "-e", "trace=openat,pwrite64,pwritev,pwritev2,write",
                    sys.executable, "-m", "vmbak.cli.main", "restore", "c:latest", out, "--workers", str(WORKERS)],
                   env=env, check=True, capture_output=True, timeout=300)
    assert_same_file(out, disk.path)

    calls = _strace_calls(log)
    data = re.escape(os.fspath(repo.path / "data"))
    opens = Counter(m.group(1) for c in calls
                    if (m := re.match(rf'openat\(AT_FDCWD, "({data}/[0-9a-f]{{2}}/[0-9a-f]{{64}})".*= \d+$', c)))
    assert len(opens) == len(repo.pack_files()), opens
    # Once by the main thread for the block hash tables, then once per restore thread.
    # Before: once per chunk read (each incremental's pack more than 40 times).
    assert max(opens.values()) <= WORKERS + 1, opens.most_common(3)

    fds = set()
    for c in calls:
        m = re.match(r'openat\(AT_FDCWD, "[^"]*\.out\.raw\.vmbak-partial\.[^"]*".*= (\d+)$', c)
        if m:
            fds.add(m.group(1))
    for c in calls:
        m = re.match(r'openat\(AT_FDCWD, "/proc/self/fd/(\d+)".*= (\d+)$', c)
        if m and m.group(1) in fds:
            fds.add(m.group(2))
    assert fds, "the target was not seen being opened"
    writes = [c for c in calls if (m := re.match(r"(?:pwrite64|pwritev2?|write)\((\d+),", c)) and m.group(1) in fds]
    # 32 MiB in runs of 1, 2 and 4 MiB (restore's _FIRST_GROUP_BYTES), then up to 8 MiB:
    # 7 writes (a little slack for where the runs are cut).
    # Before: about 500, one per chunk of an incremental and per piece of the full between them.
    assert 6 <= len(writes) <= 10, (len(writes), writes[:10])


def test_a_forged_chunk_in_a_chain_is_caught_by_the_block_hashes(make_repo, make_disk, tmp_path, assert_cli_error):
    """The blocks a task takes from several chunks are checked against the block hashes
    together: a chunk of an incremental whose envelope is valid but whose content is not
    what the snapshot's block hashes say stops the restore before anything of it is
    written, naming that chunk and block; with --ignore-errors only that block is lost."""
    repo = make_repo("none")
    size = 8 * MiB
    disk = make_disk("f.raw", size, seed=21)  # random: chunks are stored raw
    repo.backup(disk, "f")
    for blk in (3, 4, 40, 41, 42, 90):
        disk.write_random(blk * BLOCK, BLOCK, seed=blk)
    snap = repo.backup(disk, "f")
    expect = disk.read()
    r = repo.open()
    m = next(m for m in r.manifests() if m.id == snap["id"])
    k = int(np.flatnonzero(m.ext_start == 40)[0])
    cid = bytes(m.ext_id[k])
    assert int(m.ext_count[k]) == 3
    loc = r.index.get(cid)
    pack = repo.path / "data" / loc.pack[:2] / loc.pack
    blob = pack.read_bytes()[loc.offset:loc.offset + loc.length]
    payload = bytearray(r.sealer.open(blob, b"vmbak-chunk:" + cid, "test"))
    assert payload[0] == 0, "random data should be stored raw"
    payload[1 + BLOCK + 5] ^= 1  # block 41
    sealed = r.sealer.seal(bytes(payload), b"vmbak-chunk:" + cid)
    with open(pack, "r+b") as f:
        f.seek(loc.offset)
        f.write(sealed)

    out = tmp_path / "o.raw"
    line = assert_cli_error(repo.run("restore", "f:latest", out, check=False), "block hashes", cid.hex()[:16])
    assert "blocks 41 do not match" in line, line
    assert not out.exists()
    p = repo.run("restore", "f:latest", out, "--ignore-errors", "--json", check=False)
    assert p.returncode == 3, p.stderr
    rep = json.loads(p.stdout.splitlines()[-1])
    assert [(d["start_block"], d["blocks"]) for d in rep["damaged"]] == [(41, 1)], rep["damaged"]
    got = out.read_bytes()
    assert got[41 * BLOCK:42 * BLOCK] == bytes(BLOCK)
    assert got[:41 * BLOCK] == expect[:41 * BLOCK] and got[42 * BLOCK:] == expect[42 * BLOCK:]
