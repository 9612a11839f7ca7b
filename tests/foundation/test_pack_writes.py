"""Issue 16: packs are written through an aligned staging buffer, with O_DIRECT on a local
repository, so that a backup does not copy every stored byte into the page cache; the
pack's bytes are the same whichever way they were written (docs/repository-format.md).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import blake3

MiB = 1 << 20


def _o_direct_works(directory: Path) -> bool:
    fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(directory / "probe")


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, by util-linux's fincore (an independent oracle)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_backup_packs_bypass_the_page_cache(make_repo, make_disk, tmp_path, assert_same_file):
    repo = make_repo("aes-256-gcm")
    disk = make_disk("d.img", 24 * MiB + 4096 * 3 + 100, seed=3)  # random: stored as it is
    repo.backup(disk, "d", "--no-skip-unused")
    packs = repo.pack_files()
    stored = sum(p.stat().st_size for p in packs)
    assert stored > 24 * MiB
    resident = sum(_resident_bytes(p) for p in packs)
    if _o_direct_works(repo.path):
        # Only each pack's unaligned end (under 4 KiB, and the header) went through the cache.
        assert resident <= len(packs) * 64 * 1024, (resident, stored, len(packs))
    else:  # a filesystem without O_DIRECT: the same packs, written buffered
        assert resident > 0
    for p in packs:
        assert blake3.blake3(p.read_bytes()).hexdigest() == p.name  # the pack's name is its hash
    repo.check(read_data=True)
    repo.restore("d:latest", tmp_path / "r.img")
    assert_same_file(tmp_path / "r.img", disk.path)


def _write_pack(root: Path, sealer, blobs: list[bytes], direct: bool):  # noqa: ANN001, ANN202
    from vmbak.repo.backend import LocalBackend
    from vmbak.repo.pack import PackWriter

    backend = LocalBackend(str(root))
    backend.direct_writes = direct  # as a backend whose temp files are uploaded (S3) says
    pw = PackWriter(backend, sealer)
    offs = [pw.add(bytes([i]) * 32, b, len(b)) for i, b in enumerate(blobs)]
    direct = pw.direct
    fp = pw.finish()
    return backend, fp, offs, direct


def test_pack_bytes_do_not_depend_on_how_they_were_written(tmp_path):
    from vmbak.repo.crypto import ENC_NONE, MasterKey, Sealer
    from vmbak.repo.pack import STAGE_BYTES, pack_name, read_header

    sealer = Sealer(MasterKey.generate(), ENC_NONE)
    rnd = os.urandom(3 * STAGE_BYTES)
    # sizes around the staging buffer's and the alignment's edges, one larger than the buffer
    sizes = [1, 4095, 4096, 4097, STAGE_BYTES - 8193, STAGE_BYTES, 2 * STAGE_BYTES + 17, 123457, 0 + 5]
    blobs, o = [], 0
    for n in sizes:
        blobs.append(rnd[o:o + n])
        o = (o + n) % STAGE_BYTES
    expect_data = b"".join(blobs)
    results = []
    for direct in (True, False):
        root = tmp_path / f"direct-{direct}"
        backend, fp, offs, used_direct = _write_pack(root, sealer, blobs, direct)
        data = (root / pack_name(fp.pack_id)).read_bytes()
        results.append((fp.pack_id, data, used_direct))
        assert data[:len(expect_data)] == expect_data
        assert offs == [sum(sizes[:i]) for i in range(len(sizes))]
        assert fp.size == len(data)
        assert blake3.blake3(data).hexdigest() == fp.pack_id
        entries = read_header(backend, sealer, fp.pack_id)
        assert entries["off"].tolist() == offs and entries["len"].tolist() == sizes
        assert not list((root / "tmp").iterdir())  # the temp file was moved into place
    (id_direct, data_direct, used_direct), (id_buffered, data_buffered, used_buffered) = results
    assert used_direct == _o_direct_works(tmp_path) and used_buffered is False
    assert data_direct == data_buffered and id_direct == id_buffered


def test_finished_packs_wait_in_memory_up_to_the_queue_budget(tmp_path):
    """Issue 16: while the pack writers are busy (the disk slower than the pipeline, as in a
    stretch of random data), finished packs wait in memory up to ChunkWriter.QUEUE_BYTES,
    so that the pipeline goes on; beyond it, ``add`` waits for a writer. Every chunk still
    lands and is indexed. (Before, a fourth finished pack already made ``add`` wait.)"""
    import threading
    import time

    from vmbak.repo.repository import Repository

    repo = Repository.init(str(tmp_path / "repo"), None, encryption="none")
    repo.pack_size = 1 * MiB
    writer = repo.chunk_writer()
    writer.QUEUE_BYTES = 6 * MiB + MiB // 2
    held = threading.Event()
    started = threading.Semaphore(0)
    real_temp_path = repo.backend.temp_path

    def held_temp_path(hint: str) -> str:  # each pack writer stops here until released
        started.release()
        assert held.wait(60)
        return real_temp_path(hint)

    repo.backend.temp_path = held_temp_path
    chunks = [os.urandom(1 * MiB) for _ in range(12)]
    added = []

    def add_all() -> None:
        for data in chunks:
            cid = repo.sealer.chunk_id(data)
            writer.add(cid, bytes(repo.encode_chunk(cid, data)), len(data))
            added.append(cid)

    t = threading.Thread(target=add_all)
    t.start()
    try:
        for _ in range(2):  # both writers have taken a pack and are held
            assert started.acquire(timeout=30)
        # a chunk of 1 MiB fills a pack: the 2 packs in the writers' hands and 4 waiting
        # are within the budget; the 7th goes over it, and its ``add`` waits
        deadline = time.monotonic() + 30  # a loaded machine may take its time
        while len(added) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        t.join(1)
        assert t.is_alive()
        assert len(added) == 6, len(added)
    finally:
        held.set()
    t.join(60)
    assert not t.is_alive() and len(added) == len(chunks)
    writer.flush()
    assert all(loc is not None for loc in repo.index.get_many(added))
    for cid, data in zip(added, chunks, strict=True):
        assert repo.read_chunk(cid) == data
