"""Ceph RBD images as disks (changes/rbd.py, disks/rbd.py) against a real single-node cluster:
full and incremental backups from librbd's snapshot diff, --verify-changes, restore into a
new image compared byte for byte, the fallbacks (deleted reference snapshot, invalid object
map, rollback) and bad input."""

from __future__ import annotations

import random

import pytest

MiB = 1 << 20
pytestmark = [pytest.mark.xdist_group("ceph"), pytest.mark.timeout(900)]


def _backup(repo, ceph, image: str, name: str, *extra: object) -> dict:  # noqa: ANN001
    return repo.json("backup", f"rbd:{ceph.pool}/{image}", "--name", name, "--ceph-conf", ceph.conf, *extra)


def _restore_same(repo, ceph, spec: str, expected: bytes) -> dict:  # noqa: ANN001
    target = f"restored-{random.randrange(1 << 30):08x}"
    r = repo.json("restore", spec, f"rbd:{ceph.pool}/{target}", "--ceph-conf", ceph.conf)
    got = ceph.read(target)
    assert got == expected, "restored image differs from the source"
    assert r["verified"] and r["target"] == f"rbd:{ceph.pool}/{target}"
    # sparse: only the objects that hold non-zero data exist in the new image
    with ceph.image(target) as img:
        obj = 1 << img.stat()["order"]
        ext: list[tuple[int, int]] = []
        img.diff_iterate(0, len(expected), None, lambda o, ln, e: ext.append((o, ln)) if e else None,
                         whole_object=True)
    existing = {o // obj for o, ln in ext for o in range(o - o % obj, o + ln, obj)}
    nonzero = {o // obj for o in range(0, len(expected), obj) if any(expected[o:o + obj])}
    assert existing == nonzero
    assert not any(n.startswith(f".{target}") for n in _names(ceph))
    return r


def _names(ceph) -> list[str]:  # noqa: ANN001
    io, rbd = ceph.rbd()
    return list(rbd.RBD().list(io))


def _vmbak_snaps(ceph, image: str) -> list[str]:  # noqa: ANN001
    return [s for s in ceph.snaps(image) if s.startswith("vmbak.")]


def test_full_incremental_verify_restore(ceph, repo) -> None:  # noqa: ANN001
    rng = random.Random(17)
    img = ceph.new_image(40 * MiB)
    ceph.write(img, 1 * MiB, rng.randbytes(3 * MiB))
    ceph.write(img, 21 * MiB, rng.randbytes(MiB))
    full = _backup(repo, ceph, img, "db")
    assert full["type"] == "full"
    assert full["stats"]["read_bytes"] <= 8 * MiB  # only the two objects that hold data are read
    snaps = _vmbak_snaps(ceph, img)
    assert len(snaps) == 1 and full["change_id"].endswith(":" + snaps[0])
    state1 = ceph.read(img)

    # a small change: the incremental reads only the changed objects (fast-diff), and the
    # older snapshot goes once the new manifest is saved
    ceph.write(img, 30 * MiB + 12345, rng.randbytes(100_000))
    ceph.write(img, 2 * MiB, bytes(64 * 1024))  # zeros over data are a change too
    inc = _backup(repo, ceph, img, "db")
    assert inc["type"] == "incremental" and inc["change_source"] == "rbd-fast-diff"
    assert inc["reference"] == full["id"] or inc["parent"] == full["id"]
    assert inc["stats"]["read_bytes"] <= 8 * MiB
    snaps2 = _vmbak_snaps(ceph, img)
    assert len(snaps2) == 1 and snaps2 != snaps and inc["change_id"].endswith(":" + snaps2[0])
    state2 = ceph.read(img)

    ceph.write(img, 9 * MiB, rng.randbytes(5 * MiB))
    ver = _backup(repo, ceph, img, "db", "--verify-changes")
    assert ver["change_source"] == "rbd-fast-diff"
    assert ver["stats"]["verify_missed_blocks"] == 0
    state3 = ceph.read(img)

    _restore_same(repo, ceph, full["id"], state1)
    _restore_same(repo, ceph, inc["id"], state2)
    _restore_same(repo, ceph, "db:latest", state3)
    repo.check()


def test_deleted_reference_snapshot_falls_back(ceph, repo) -> None:  # noqa: ANN001
    rng = random.Random(18)
    img = ceph.new_image(24 * MiB)
    ceph.write(img, 0, rng.randbytes(6 * MiB))
    _backup(repo, ceph, img, "gone")
    with ceph.image(img) as h:
        for s in _vmbak_snaps(ceph, img):
            h.remove_snap(s)
    ceph.write(img, 5 * MiB, rng.randbytes(MiB))
    p = repo.run("backup", f"rbd:{ceph.pool}/{img}", "--name", "gone", "--ceph-conf", ceph.conf)
    assert "reference snapshot" in p.stderr and "is gone" in p.stderr and "scan" in p.stderr
    m = repo.json("snapshots", "--name", "gone")[-1]
    assert m["change_source"] == "scan"
    assert any("is gone" in n for n in m["notes"])
    _restore_same(repo, ceph, "gone:latest", ceph.read(img))
    # the fallback took a new reference: the next backup is a diff again
    ceph.write(img, 12 * MiB, rng.randbytes(MiB))
    nxt = _backup(repo, ceph, img, "gone", "--verify-changes")
    assert nxt["change_source"] == "rbd-fast-diff" and nxt["stats"]["verify_missed_blocks"] == 0
    _restore_same(repo, ceph, "gone:latest", ceph.read(img))


def test_rollback_is_read_whole_and_restores(ceph, repo) -> None:  # noqa: ANN001
    rng = random.Random(19)
    img = ceph.new_image(24 * MiB)
    ceph.write(img, 0, rng.randbytes(8 * MiB))
    with ceph.image(img) as h:
        h.create_snap("before-upgrade")  # the user's own snapshot
    at_user_snap = ceph.read(img)
    ceph.write(img, 4 * MiB, rng.randbytes(2 * MiB))
    _backup(repo, ceph, img, "rb")
    with ceph.image(img) as h:
        h.rollback_to_snap("before-upgrade")
    assert ceph.read(img) == at_user_snap
    p = repo.run("backup", f"rbd:{ceph.pool}/{img}", "--name", "rb", "--ceph-conf", ceph.conf,
                 "--verify-changes", "--json")
    assert "a rollback?" in p.stderr
    m = repo.json("snapshots", "--name", "rb")[-1]
    assert m["stats"]["verify_missed_blocks"] == 0
    assert any("a rollback?" in n for n in m["notes"])
    _restore_same(repo, ceph, "rb:latest", at_user_snap)
    assert "before-upgrade" in ceph.snaps(img)  # vmbak never touches the user's snapshots


def test_invalid_object_map_falls_back(ceph, repo) -> None:  # noqa: ANN001
    io, rbd = ceph.rbd()
    rng = random.Random(20)
    img = ceph.new_image(16 * MiB)
    ceph.write(img, 0, rng.randbytes(5 * MiB))
    _backup(repo, ceph, img, "om")
    with ceph.image(img) as h:  # turning the object map off and on again flags it invalid
        h.update_features(rbd.RBD_FEATURE_FAST_DIFF | rbd.RBD_FEATURE_OBJECT_MAP, False)
        h.update_features(rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF, True)
        assert h.flags() & rbd.RBD_FLAG_OBJECT_MAP_INVALID
    ceph.write(img, 8 * MiB, rng.randbytes(MiB))
    p = repo.run("backup", f"rbd:{ceph.pool}/{img}", "--name", "om", "--ceph-conf", ceph.conf)
    assert "flagged invalid" in p.stderr and "scan" in p.stderr
    m = repo.json("snapshots", "--name", "om")[-1]
    assert m["change_source"] == "scan"
    _restore_same(repo, ceph, "om:latest", ceph.read(img))


def test_bad_input_is_one_line(ceph, repo, assert_cli_error) -> None:  # noqa: ANN001
    img = ceph.new_image(4 * MiB)
    conf = ("--ceph-conf", ceph.conf)
    cases = [
        (("backup", "rbd:no-such-pool/x", "--name", "e", *conf), "pool 'no-such-pool' does not exist"),
        (("backup", f"rbd:{ceph.pool}/no-such-image", "--name", "e", *conf), "does not exist"),
        (("backup", f"rbd:{ceph.pool}/{img}", "--name", "e", *conf, "--ceph-id", "nobody"),
         "client.nobody"),
        (("backup", f"rbd:{ceph.pool}/{img}", "--name", "e", "--ceph-conf", "/nonexistent.conf"),
         "/nonexistent.conf does not exist"),
        (("backup", f"rbd:{ceph.pool}", "--name", "e", *conf), "use rbd:POOL/IMAGE"),
        (("backup", f"rbd:{ceph.pool}/{img}", "--name", "e", *conf, "--changes", "overlay"), "rbd diff"),
        (("backup", "/dev/null", "--name", "e", *conf), "go with an RBD image"),
    ]
    for args, frag in cases:
        assert_cli_error(repo.run(*args, check=False), frag)
    assert _vmbak_snaps(ceph, img) == []  # nothing left behind by the failures
    _backup(repo, ceph, img, "e")
    assert_cli_error(repo.run("restore", "e:latest", f"rbd:{ceph.pool}/{img}", *conf, check=False),
                     "exists")
    assert_cli_error(repo.run("restore", "e:latest", "rbd:no-such-pool/new", *conf, check=False),
                     "does not exist")


def test_differential_keeps_the_full_snapshot(ceph, repo) -> None:  # noqa: ANN001
    rng = random.Random(21)
    img = ceph.new_image(16 * MiB)
    ceph.write(img, 0, rng.randbytes(6 * MiB))
    full = _backup(repo, ceph, img, "df", "--mode", "differential")  # no full yet: a full
    assert full["type"] == "full"
    (full_snap,) = _vmbak_snaps(ceph, img)
    for i in range(2):
        ceph.write(img, (8 + 2 * i) * MiB, rng.randbytes(MiB))
        d = _backup(repo, ceph, img, "df", "--mode", "differential", "--verify-changes")
        assert d["type"] == "differential" and d["change_source"] == "rbd-fast-diff"
        assert d["stats"]["verify_missed_blocks"] == 0
        assert _vmbak_snaps(ceph, img) == [full_snap]  # the full's snapshot stays the reference
    _restore_same(repo, ceph, "df:latest", ceph.read(img))
    # an incremental after a differential: the differential's snapshot is gone, the full's
    # still serves (a diff since the full holds every change since the differential)
    ceph.write(img, 13 * MiB, rng.randbytes(MiB))
    p = repo.run("backup", f"rbd:{ceph.pool}/{img}", "--name", "df", "--ceph-conf", ceph.conf,
                 "--verify-changes", "--json")
    assert f"changed since the chain's older snapshot {full_snap}" in p.stderr, p.stderr
    inc = repo.json("snapshots", "--name", "df")[-1]
    assert inc["type"] == "incremental" and inc["change_source"] == "rbd-fast-diff"
    assert inc["stats"]["verify_missed_blocks"] == 0
    assert len(_vmbak_snaps(ceph, img)) == 1 and full_snap not in _vmbak_snaps(ceph, img)
    _restore_same(repo, ceph, "df:latest", ceph.read(img))


def test_what_killed_runs_leave_is_removed_and_nothing_else(ceph, repo, make_repo, tmp_path, popen_vmbak) -> None:  # noqa: ANN001
    """kill -9 of a backup right after its snapshot (from its --hook-post) and of a restore
    mid-write: the next backup of the chain removes the dead backup's snapshot and keeps the
    chain; the next restore into the pool removes the partial image. Another repository's
    snapshot of the same image, the user's own and a --mode full chain's are kept right."""
    io, rbd = ceph.rbd()
    rng = random.Random(22)
    img = ceph.new_image(48 * MiB)
    ceph.write(img, 0, rng.randbytes(40 * MiB))
    with ceph.image(img) as h:
        h.create_snap("users-own")
    full = _backup(repo, ceph, img, "kb")
    other = make_repo("none", name="other")
    _backup(other, ceph, img, "kb")  # another repository's chain on the same image
    (ours,) = [s for s in _vmbak_snaps(ceph, img) if full["change_id"].endswith(":" + s)]
    theirs = [s for s in _vmbak_snaps(ceph, img) if s != ours]
    assert len(theirs) == 1

    # kill -9 of a backup, from its post hook: right after its snapshot was taken
    killer = tmp_path / "kill-parent.sh"
    killer.write_text("#!/bin/sh\nkill -9 $PPID\n")
    killer.chmod(0o755)
    ceph.write(img, 3 * MiB, rng.randbytes(MiB))
    p = repo.run("backup", f"rbd:{ceph.pool}/{img}", "--name", "kb", "--ceph-conf", ceph.conf,
                 "--hook-post", killer, check=False)
    assert p.returncode == -9, (p.returncode, p.stderr)
    left = set(_vmbak_snaps(ceph, img)) - {ours, *theirs}
    assert len(left) == 1, _vmbak_snaps(ceph, img)

    ceph.write(img, 20 * MiB, rng.randbytes(MiB))
    p = repo.run("backup", f"rbd:{ceph.pool}/{img}", "--name", "kb", "--ceph-conf", ceph.conf,
                 "--verify-changes", "--json")
    assert f"removed snapshot rbd:{ceph.pool}/{img}@{left.pop()}, left by a killed backup" in p.stderr, p.stderr
    inc = repo.json("snapshots", "--name", "kb")[-1]
    assert inc["type"] == "incremental" and inc["change_source"] == "rbd-fast-diff"  # the chain held
    assert inc["stats"]["verify_missed_blocks"] == 0
    snaps = _vmbak_snaps(ceph, img)
    assert theirs[0] in snaps and ours not in snaps and len(snaps) == 2  # theirs, and our new reference
    assert "users-own" in ceph.snaps(img)
    _restore_same(repo, ceph, "kb:latest", ceph.read(img))

    # --mode full: the chain's earlier reference goes once the new full is saved
    _backup(repo, ceph, img, "kb", "--mode", "full")
    _backup(repo, ceph, img, "kb", "--mode", "full")
    snaps = _vmbak_snaps(ceph, img)
    assert theirs[0] in snaps and len(snaps) == 2, snaps
    with ceph.image(img) as h:  # each snapshot has one owner record, nothing more
        keys = sorted(k for k, _ in h.metadata_list())
    assert keys == sorted(f"vmbak.snap.{s}" for s in snaps), keys

    # kill -9 of a restore while it writes its partial image
    target = f"kr-{random.randrange(1 << 30):08x}"
    for _attempt in range(3):
        proc = popen_vmbak("restore", "kb:latest", f"rbd:{ceph.pool}/{target}", "--ceph-conf", ceph.conf,
                           env=repo.env())
        partial = None
        while proc.poll() is None and partial is None:
            partial = next((n for n in rbd.RBD().list(io) if n.startswith(f".{target}.vmbak-partial.")), None)
        if partial is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
            break
        proc.communicate()
        if target in _names(ceph):  # it finished first: try again with a new name
            target += "x"
    else:
        raise AssertionError("the restore always finished before it could be killed")
    assert partial in _names(ceph)
    r = repo.json("restore", "kb:latest", f"rbd:{ceph.pool}/{target}-2", "--ceph-conf", ceph.conf)
    assert f"removed rbd:{ceph.pool}/{partial}: the partial image of a killed restore" in r["warnings"]
    assert partial not in _names(ceph)
    assert ceph.read(f"{target}-2") == ceph.read(img)
    repo.check()
