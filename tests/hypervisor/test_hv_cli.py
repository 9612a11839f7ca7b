"""Issue 4 through the real command line: image files of every format (thin areas never
read), overlays, QEMU dirty bitmaps over QMP, restores to every format checked with
qemu-img compare, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hvutil import FORMATS, B, MiB, compare, create, info, qemu_io, to_raw, write_random

SIZE = 16 * MiB


def rnd(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def allocated(path) -> int:  # noqa: ANN001
    """Bytes the image file occupies on disk (qemu-img info's actual-size: allocated blocks)."""
    return int(info(path)["actual-size"])


def bitmaps(q) -> list[str]:  # noqa: ANN001
    return [n for n in q.bitmaps() if n.startswith("vmbak-")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_file_backups_and_restores(tmp_path, repo, fmt) -> None:
    """`vmbak backup IMAGE --name N` for each format: the full reads only the allocated
    areas (vhdx reports none, so it is read whole), a scan incremental stores the change,
    and both restore (to the same format and to raw) equal to the image."""
    img = create(tmp_path / f"vm.{fmt}", fmt, SIZE)
    write_random(img, fmt, 0, 2 * MiB, 1, tmp_path)
    write_random(img, fmt, 9 * MiB, 1 * MiB, 2, tmp_path)
    t1 = to_raw(img, tmp_path / "t1.raw")
    m1 = repo.backup(img, "vm")
    assert m1["type"] == "full" and m1["disk_size"] == SIZE
    if fmt != "vhdx":
        assert m1["stats"]["read_bytes"] <= 4 * MiB, "unallocated areas were read"  # vpc: 2 MiB blocks
    assert m1["change_id"].startswith(f"image:vm.{fmt}@")

    write_random(img, fmt, 5 * MiB, 2 * B, 3, tmp_path)
    qemu_io(img, fmt, "write -z 0 64k")
    m2 = repo.backup(img, "vm")
    assert m2["type"] == "incremental" and m2["change_source"] == "scan"
    assert m2["stats"]["changed_bytes"] == 3 * B

    r2 = repo.restore("vm:latest", tmp_path / f"r2.{fmt}", "--format", fmt)
    assert r2["format"] == fmt and r2["verified"]
    compare(tmp_path / f"r2.{fmt}", img)
    assert info(tmp_path / f"r2.{fmt}")["format"] == fmt
    assert allocated(tmp_path / f"r2.{fmt}") <= 6 * MiB, "the restored image is not thin"
    r1 = repo.restore(m1["id"], tmp_path / "r1.raw")  # raw by default
    assert r1["format"] == "raw"
    compare(tmp_path / "r1.raw", t1)


def test_restore_to_every_format(tmp_path, repo, run_vmbak) -> None:
    """One snapshot to qcow2, raw, vhdx, vpc and vmdk: named by --format or by the target's
    extension, each thin and equal to the source (qemu-img compare)."""
    img = create(tmp_path / "db.qcow2", "qcow2", SIZE + 3 * 512)  # odd size: exact virtual sizes
    write_random(img, "qcow2", 1 * MiB, 1 * MiB, 4, tmp_path)
    write_random(img, "qcow2", SIZE - 4096, 4096 + 3 * 512, 5, tmp_path)
    repo.backup(img, "db")
    cases = [("r.qcow2", (), "qcow2"), ("r.vhdx", (), "vhdx"), ("r.vhd", (), "vpc"), ("r.vmdk", (), "vmdk"),
             ("r.img", (), "raw"), ("r2.img", ("--format", "vhd"), "vpc"), ("r3.disk", ("--format", "qcow2"), "qcow2")]
    for name, extra, fmt in cases:
        r = repo.restore("db:latest", tmp_path / name, *extra)
        assert r["format"] == fmt
        assert info(tmp_path / name)["format"] == fmt
        compare(tmp_path / name, img)
        assert allocated(tmp_path / name) <= 4 * MiB, f"{name} is not thin"
    text = repo.run("restore", "db:latest", tmp_path / "t.vmdk").stdout
    assert "(vmdk)" in text and "verified" in text
    p = repo.run("restore", "db:latest", tmp_path / "r.qcow2", check=False)
    assert p.returncode != 0 and "exists" in p.stderr
    repo.run("restore", "db:latest", tmp_path / "r.qcow2", "--format", "vmdk", "--overwrite")
    assert info(tmp_path / "r.qcow2")["format"] == "vmdk"
    compare(tmp_path / "r.qcow2", img)


def test_overlay_change_source(tmp_path, repo) -> None:
    """`--changes overlay`: only the top layer's clusters are read, while the previous
    backup is of the backing file; otherwise (the base changed after its backup, or no
    backing file) a scan, with a note."""
    base = create(tmp_path / "base.qcow2", "qcow2", SIZE)
    write_random(base, "qcow2", 0, 8 * MiB, 10, tmp_path)
    m0 = repo.backup(base, "db")
    layers = [base]
    for i in range(2):
        ov = create(tmp_path / f"ov{i}.qcow2", "qcow2", SIZE, "-b", layers[-1].name, "-F", "qcow2")
        write_random(ov, "qcow2", (2 + 5 * i) * MiB, 3 * B, 20 + i, tmp_path)
        qemu_io(ov, "qcow2", f"write -z {(4 + i) * MiB} 64k", f"discard {12 + i}M 64k")
        layers.append(ov)
        extra = ("--verify-changes",) if i == 1 else ()
        p = repo.run("backup", ov, "--name", "db", "--changes", "overlay", "--json", *extra)
        m = json.loads(p.stdout.splitlines()[-1])
        assert m["type"] == "incremental" and m["change_source"] == "overlay"
        assert m["stats"]["considered_bytes"] == (5 * B if i == 0 else SIZE)
        if i == 0:
            assert m["stats"]["read_bytes"] <= 3 * B
        else:
            assert m["stats"]["verify_missed_blocks"] == 0
        repo.restore(m["id"], tmp_path / f"r{i}.qcow2")
        compare(tmp_path / f"r{i}.qcow2", ov)
    assert m0["change_id"] != m["change_id"]

    # ov1 changes after its backup: an overlay on it no longer fits that backup
    write_random(layers[-1], "qcow2", 14 * MiB, B, 30, tmp_path)
    ov2 = create(tmp_path / "ov2.qcow2", "qcow2", SIZE, "-b", "ov1.qcow2", "-F", "qcow2")
    write_random(ov2, "qcow2", 1 * MiB, B, 31, tmp_path)
    p = repo.run("backup", ov2, "--name", "db", "--changes", "overlay", "--json")
    m = json.loads(p.stdout.splitlines()[-1])
    assert m["change_source"] == "scan" and "has change ID" in p.stderr  # the engine's check
    assert m["stats"]["changed_bytes"] == 2 * B  # the write to ov1 is not missed
    repo.restore("db:latest", tmp_path / "r2.qcow2")
    compare(tmp_path / "r2.qcow2", ov2)
    # an image that is not an overlay: scan, with a note
    p = repo.run("backup", base, "--name", "db", "--changes", "overlay", "--json")
    assert json.loads(p.stdout.splitlines()[-1])["change_source"] == "scan" and "no backing file" in p.stderr


def test_qemu_dirty_bitmaps(tmp_path, repo, qsd) -> None:
    """`--changes qemu:QMP:NODE` against a qemu-storage-daemon that runs its own NBD server
    (--nbd-server): full, bitmap incrementals (with --verify-changes), kill -9 of QEMU and
    the fallback; one vmbak bitmap left each time; every snapshot restores."""
    img = create(tmp_path / "vm.qcow2", "qcow2", SIZE)
    write_random(img, "qcow2", 0, 4 * MiB, 1, tmp_path)
    q = qsd(img)
    spec = f"qemu:{q.qmp}:disk0"
    args = ("--name", "vm", "--changes", spec, "--nbd-server", q.nbd_sock)
    dumps = [q.dump(tmp_path / "t0.raw", SIZE)]
    ms = [repo.json("backup", *args)]
    assert ms[0]["type"] == "full" and bitmaps(q) == [ms[0]["change_id"]]

    q.write(1 * MiB, rnd(2 * B, 2))
    q.zero(10 * MiB, B)
    dumps.append(q.dump(tmp_path / "t1.raw", SIZE))
    ms.append(repo.json("backup", *args))
    assert ms[1]["change_source"] == "qemu-dirty-bitmap" and ms[1]["reference"] == ms[0]["change_id"]
    assert ms[1]["stats"]["considered_bytes"] == 3 * B and ms[1]["stats"]["read_bytes"] <= 2 * B
    assert bitmaps(q) == [ms[1]["change_id"]] and q.leftovers() == {}

    q.write(7 * MiB + 512, rnd(4096, 3))
    dumps.append(q.dump(tmp_path / "t2.raw", SIZE))
    ms.append(repo.json("backup", *args, "--verify-changes"))
    assert ms[2]["change_source"] == "qemu-dirty-bitmap" and ms[2]["stats"]["verify_missed_blocks"] == 0

    q.restart()  # a clean stop saves the bitmap in the qcow2; the start loads it (in use)
    q.write(3 * MiB, rnd(B, 4))
    q.kill9()  # QEMU dies with the bitmap in use: it is inconsistent after the restart
    q.start()
    dumps.append(q.dump(tmp_path / "t3.raw", SIZE))
    p = repo.run("backup", *args, "--json")
    ms.append(json.loads(p.stdout.splitlines()[-1]))
    assert ms[3]["type"] == "incremental" and ms[3]["change_source"] == "scan"
    assert "inconsistent" in p.stderr and "scan" in p.stderr
    assert ms[3]["stats"]["changed_bytes"] == B
    assert bitmaps(q) == [ms[3]["change_id"]] and q.leftovers() == {}
    for m, want in zip(ms, dumps, strict=True):
        repo.restore(m["id"], tmp_path / f"r-{m['short_id']}.qcow2")
        compare(tmp_path / f"r-{m['short_id']}.qcow2", want)


def test_qemu_session_nbd_server(tmp_path, repo, qsd) -> None:
    """Without --nbd-server the backup starts and stops QEMU's NBD server itself; writes
    made while the daemon was down (by qemu-io, which keeps the persistent bitmap) count."""
    img = create(tmp_path / "vm.qcow2", "qcow2", SIZE)
    write_random(img, "qcow2", 0, 2 * MiB, 1, tmp_path)
    q = qsd(img, nbd=False)
    spec = f"qemu:{q.qmp}:disk0"
    m1 = repo.json("backup", "--name", "vm", "--changes", spec)
    q.stop()
    write_random(img, "qcow2", 6 * MiB, 2 * B, 2, tmp_path)
    q.start()
    m2 = repo.json("backup", "--name", "vm", "--changes", spec)
    assert m2["change_source"] == "qemu-dirty-bitmap" and m2["reference"] == m1["change_id"]
    assert m2["stats"]["considered_bytes"] == 2 * B
    q.stop()
    repo.restore("vm:latest", tmp_path / "r.qcow2")
    compare(tmp_path / "r.qcow2", img)


def test_errors_are_one_line(tmp_path, repo, qsd, assert_cli_error) -> None:
    img = create(tmp_path / "e.qcow2", "qcow2", 4 * MiB)
    run = repo.run

    def err(*args: object, frags: tuple[str, ...] = ()) -> str:
        return assert_cli_error(run(*args, check=False), *frags)

    for bad in ("qemu:", "qemu:/x", "qemu:/x:", "qemu::drive0"):
        err("backup", "--name", "e", "--changes", bad, frags=("QMP_SOCKET:NODE",))
    err("backup", "--name", "e", "--changes", "bogus", frags=("unknown change source",))
    err("backup", "--name", "e", "--changes", f"qemu:{tmp_path}/none.qmp:drive0", frags=("QMP socket not found",))
    err("backup", img, "--name", "e", "--changes", "qemu:/x.qmp:drive0", frags=("no DISK",))
    err("backup", "--name", "e", "--changes", "overlay", frags=("give the DISK",))
    err("backup", "--name", "e", frags=("give the DISK",))
    err("backup", img, frags=("--name",))
    err("backup", img, "--name", "a/b", frags=("bad backup name",))
    err("backup", img, "--name", "e", "--nbd-server", "/x", frags=("--nbd-server",))
    err("backup", img, "--name", "e", "--format", "bogus", frags=("unknown image format 'bogus'",))
    err("backup", img, "--name", "e", "--format", "vhdx", frags=("cannot open image",))
    err("backup", tmp_path / "missing.qcow2", "--name", "e", frags=("disk not found",))
    bad = create(tmp_path / "c.qcow2", "qcow2", 4 * MiB)
    with open(bad, "r+b") as f:
        f.seek(20)
        f.write((63).to_bytes(4, "big"))
    err("backup", bad, "--name", "e", frags=("cannot open image", "cluster size"))
    create(tmp_path / "b.qcow2", "qcow2", 4 * MiB)
    top = create(tmp_path / "t.qcow2", "qcow2", 4 * MiB, "-b", "b.qcow2", "-F", "qcow2")
    (tmp_path / "b.qcow2").unlink()
    err("backup", top, "--name", "e", "--changes", "overlay", frags=("backing file", "missing"))
    err("backup", top, "--name", "e", frags=("backing file", "missing"))

    q = qsd(img)
    err("backup", "--name", "e", "--changes", f"qemu:{q.qmp}:nope", "--nbd-server", q.nbd_sock,
        frags=("no block node or drive named 'nope'", "disk0"))
    err("backup", "--name", "e", "--changes", f"qemu:{q.qmp}:disk0", frags=("already runs an NBD server",))
    assert q.leftovers() == {} and bitmaps(q) == []
    assert repo.snapshots() == []
    q.stop()

    repo.backup(img, "e")
    err("restore", "e:latest", tmp_path / "x.qed", "--format", "qed", frags=("unknown image format 'qed'",))
    err("restore", "e:latest", frags=("TARGET",))
    err("restore", "e:latest", tmp_path / "x.raw", "--define", "n", frags=("--libvirt",))
    err("restore", "e:latest", tmp_path / "nodir" / "x.qcow2", frags=("directory does not exist",))
    assert not list(tmp_path.glob(".x.*"))


def test_help_shows_every_new_option(run_vmbak) -> None:
    b = run_vmbak("backup", "--help").stdout
    for s in ("--changes track:/run/vmbak/web.sock", "--verify-changes", "--changes qemu:/run/qemu/db.qmp:drive0",
              "--changes overlay", "--libvirt db", "--libvirt-uri", "--nbd-server", "--format raw",
              "db.qcow2 --name db"):
        assert s in b, f"{s!r} not in vmbak backup --help"
    r = run_vmbak("restore", "--help").stdout
    for s in ("--format qcow2", "/tmp/db.vhdx", "--libvirt db:latest --define db-restored", "--libvirt-uri"):
        assert s in r, f"{s!r} not in vmbak restore --help"
