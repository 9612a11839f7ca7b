"""Bad input: exactly one line on stderr (``vmbak: error: ...``), a non-zero exit, and
never a traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess

import pytest

MiB = 1 << 20
BLOCK = 64 * 1024
PASSWORD = "errors-test-password"


@pytest.fixture(scope="module")
def world(tmp_path_factory, init_repo, new_disk):
    """An encrypted and an unencrypted repository, each holding a full and an incremental
    of the disk "web" (1 MiB + 3000 bytes). Tests must not change them: copy first."""
    base = tmp_path_factory.mktemp("errors")
    disk = new_disk(base, "web.raw", MiB + 3000, seed=51)
    enc = init_repo(base / "enc", "aes-256-gcm", password=PASSWORD)
    plain = init_repo(base / "plain", "none")
    snaps = {}
    for r in (enc, plain):
        snaps[r.encryption] = [r.backup(disk, "web")]
    disk.write_random(0, 10, seed=52)
    for r in (enc, plain):
        snaps[r.encryption].append(r.backup(disk, "web"))
    disk.write_random(0, 10, seed=51)  # back to the first version's bytes
    return {"base": base, "disk": disk, "enc": enc, "plain": plain, "snaps": snaps}


def copy_repo(repo, dest):
    shutil.copytree(repo.path, dest)
    return dataclasses.replace(repo, path=dest)


# ---------------------------------------------------------------------------- disks
def test_missing_disk(world, assert_cli_error, tmp_path):
    p = world["plain"].run("backup", tmp_path / "no-such.raw", "--name", "x", check=False)
    assert_cli_error(p, "no-such.raw")


def test_directory_as_disk(world, assert_cli_error, tmp_path):
    p = world["plain"].run("backup", tmp_path, "--name", "x", check=False)
    assert_cli_error(p, str(tmp_path))


@pytest.mark.parametrize("name", ["a/b", "a:b", "a@b", ""])
def test_bad_backup_name(world, assert_cli_error, name):
    p = world["plain"].run("backup", world["disk"].path, "--name", name, check=False)
    assert_cli_error(p, "name")


@pytest.mark.parametrize("bs", ["1000", "2048", "8388608"])
def test_bad_block_size(world, assert_cli_error, bs):
    p = world["plain"].run("backup", world["disk"].path, "--name", "x", "--block-size", bs, check=False)
    assert_cli_error(p, "block size")


# ---------------------------------------------------------------------------- repositories
@pytest.mark.parametrize("command", [["snapshots"], ["check"], ["stats"], ["restore", "web:latest", "OUT"],
                                     ["backup", "DISK", "--name", "web"]])
def test_uninitialised_directory_as_repository(world, run_vmbak, assert_cli_error, tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(tmp_path / "out.raw") if a == "OUT" else str(world["disk"].path) if a == "DISK" else a
            for a in command]
    p = run_vmbak("-r", empty, *args, env={"VMBAK_PASSWORD": PASSWORD}, check=False)
    assert_cli_error(p, "not a vmbak repository", str(empty))
    assert os.listdir(empty) == [], "opening must not create anything"
    assert not (tmp_path / "out.raw").exists()


def test_repository_that_does_not_exist(world, run_vmbak, assert_cli_error, tmp_path):
    p = run_vmbak("-r", tmp_path / "nowhere", "snapshots", check=False)
    assert_cli_error(p, "does not exist")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("config", [None, b'{"format": "restic", "version": 2}\n', b"\x00\xffgarbage",
                                    b"[1, 2, 3]"])
def test_foreign_directory_as_repository(run_vmbak, assert_cli_error, tmp_path, config):
    foreign = tmp_path / "foreign"
    (foreign / "data").mkdir(parents=True)
    (foreign / "notes.txt").write_text("my holiday photos\n")
    (foreign / "data" / "x").write_bytes(b"12345")
    if config is not None:
        (foreign / "config").write_bytes(config)
    for args in (["snapshots"], ["check", "--read-data"], ["stats"]):
        p = run_vmbak("-r", foreign, *args, env={"VMBAK_PASSWORD": PASSWORD}, check=False)
        assert_cli_error(p, "not a vmbak repository")
    assert sorted(os.listdir(foreign)) == sorted(["data", "notes.txt"] + (["config"] if config else []))


def test_init_in_non_empty_directory(run_vmbak, assert_cli_error, tmp_path):
    d = tmp_path / "stuff"
    d.mkdir()
    (d / "keep.txt").write_text("precious\n")
    p = run_vmbak("-r", d, "init", "--encryption", "none", check=False)
    assert_cli_error(p, "non-empty")
    assert os.listdir(d) == ["keep.txt"] and (d / "keep.txt").read_text() == "precious\n"


def test_init_over_existing_repository(world, run_vmbak, assert_cli_error):
    repo = world["plain"]
    before = sorted(p.name for p in repo.path.rglob("*"))
    p = run_vmbak("-r", repo.path, "init", "--encryption", "none", check=False)
    assert_cli_error(p, "already exists")
    assert sorted(p.name for p in repo.path.rglob("*")) == before


def test_init_encrypted_without_password(run_vmbak, assert_cli_error, tmp_path):
    p = run_vmbak("-r", tmp_path / "r", "init", check=False, stdin=subprocess.DEVNULL)
    assert_cli_error(p, "password")
    assert not (tmp_path / "r").exists()


def test_newer_repository_version(world, assert_cli_error, tmp_path):
    repo = copy_repo(world["enc"], tmp_path / "v99")
    cfg = json.loads((repo.path / "config").read_text())
    cfg["version"] = 99
    (repo.path / "config").write_text(json.dumps(cfg))
    for args in (["snapshots"], ["check"], ["restore", "web:latest", tmp_path / "o.raw"],
                 ["backup", world["disk"].path, "--name", "web"]):
        assert_cli_error(repo.run(*args, check=False), "version 99")
    assert not (tmp_path / "o.raw").exists()


def test_missing_repository_option(run_vmbak, assert_cli_error, world, tmp_path):
    for args in (["snapshots"], ["init"], ["backup", world["disk"].path, "--name", "x"],
                 ["restore", "web:latest", tmp_path / "o.raw"], ["check"], ["stats"]):
        p = run_vmbak(*args, env={"VMBAK_PASSWORD": PASSWORD}, check=False)
        assert_cli_error(p, "repository")


# ---------------------------------------------------------------------------- passwords and keys
def test_wrong_password(world, assert_cli_error):
    p = world["enc"].run("snapshots", env={"VMBAK_PASSWORD": "not-the-password"}, check=False)
    assert_cli_error(p, "wrong password")


def test_no_password_for_encrypted_repository(world, assert_cli_error):
    p = world["enc"].run("snapshots", env={"VMBAK_PASSWORD": None}, stdin=subprocess.DEVNULL, check=False)
    assert_cli_error(p, "password")


def test_password_file(world, assert_cli_error, tmp_path):
    pf = tmp_path / "pw"
    pf.write_text(PASSWORD + "\n")
    p = world["enc"].run("snapshots", "--json", "--password-file", pf, env={"VMBAK_PASSWORD": None})
    assert len(json.loads(p.stdout)) == 2
    p = world["enc"].run("snapshots", "--password-file", tmp_path / "missing", env={"VMBAK_PASSWORD": None},
                         check=False)
    assert_cli_error(p, "password file")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad-fields", "empty"])
def test_corrupt_key_file(world, assert_cli_error, tmp_path, damage):
    repo = copy_repo(world["enc"], tmp_path / "badkey")
    (key,) = list((repo.path / "keys").iterdir())
    raw = key.read_bytes()
    if damage == "truncate":
        key.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        key.write_bytes(os.urandom(300))
    elif damage == "bad-fields":
        doc = json.loads(raw)
        doc["salt"] = "!!not base64!!"
        doc["n"] = "many"
        key.write_text(json.dumps(doc))
    else:
        key.write_bytes(b"")
    assert_cli_error(repo.run("snapshots", check=False), "key")


def test_corrupt_manifest(world, assert_cli_error, tmp_path):
    repo = copy_repo(world["enc"], tmp_path / "badsnap")
    snap = world["snaps"]["aes-256-gcm"][0]
    f = repo.path / "snapshots" / snap["id"]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 1
    f.write_bytes(bytes(raw))
    # the damaged snapshot is left out and named in one warning line (tests/maintenance/test_damage.py)
    p = repo.run("snapshots")
    assert p.stderr.startswith(f"vmbak: warning: snapshot {snap['id']} is damaged") and len(p.stderr.splitlines()) == 1
    assert_cli_error(repo.run("restore", snap["short_id"], tmp_path / "o.raw", check=False), snap["short_id"],
                     "damaged")


def test_truncated_pack(world, assert_cli_error, tmp_path):
    repo = copy_repo(world["plain"], tmp_path / "trunc")
    for pack in (repo.path / "data").rglob("*"):
        if pack.is_file():
            os.truncate(pack, pack.stat().st_size // 2)  # cuts into the chunk data
    out = tmp_path / "o.raw"
    assert_cli_error(repo.run("restore", "web:latest", out, check=False))
    assert not out.exists()
    p = repo.run("check", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr


# ---------------------------------------------------------------------------- snapshots and targets
@pytest.mark.parametrize("spec", ["deadbeef", "nosuchname", "nosuchname:latest", "web@1999-01-01",
                                  "0000000000000000000000000000000000000000000000000000000000000000"])
def test_unknown_snapshot(world, assert_cli_error, tmp_path, spec):
    repo = world["plain"]
    assert_cli_error(repo.run("restore", spec, tmp_path / "o.raw", check=False), "snapshot")
    assert_cli_error(repo.run("stats", spec, check=False), "snapshot")
    assert_cli_error(repo.run("diff", spec, "web:latest", check=False), "snapshot")
    assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("spec", ["web:oldest", "web:latest:latest", "web@yesterday", "web@2026-13-45",
                                  "web@"])
def test_bad_snapshot_specification(world, assert_cli_error, tmp_path, spec):
    p = world["plain"].run("restore", spec, tmp_path / "o.raw", check=False)
    assert_cli_error(p)
    assert not (tmp_path / "o.raw").exists()


def test_ambiguous_id_prefix(world, assert_cli_error, tmp_path):
    """Two snapshots whose ids share a 4-digit prefix: the prefix is refused as ambiguous.

    The snapshots are real copies of a real snapshot, differing only in their ``extra``
    field. Ids are computed ahead (a keyed BLAKE3 of the manifest; checked against what
    the library saves) so that only the colliding pair is written."""
    import blake3

    from vmbak.repo.manifest import encode_manifest

    repo = copy_repo(world["plain"], tmp_path / "ambiguous")
    lib = repo.open()
    base = lib.manifests()[0]

    def copy(i: int):  # noqa: ANN202
        return dataclasses.replace(base, extra={"copy": i}, id="")

    def sid_of(i: int) -> str:
        return blake3.blake3(encode_manifest(copy(i)), key=lib.sealer.id_key).hexdigest()

    assert lib.save_manifest(copy(0)) == sid_of(0), "snapshot ids are no longer computed this way"
    seen = {sid_of(0)[:4]: 0}
    for i in range(1, 70000):  # pigeonhole: a 4-hex-digit prefix repeats within 65537 ids
        sid = sid_of(i)
        if sid[:4] in seen:
            break
        seen[sid[:4]] = i
    j = seen[sid[:4]]
    ids = {lib.save_manifest(copy(k)) for k in (i, j)}
    assert len(ids) == 2 and len({x[:4] for x in ids}) == 1
    prefix = sid[:4]
    assert_cli_error(repo.run("restore", prefix, tmp_path / "o.raw", check=False), "ambiguous")
    assert_cli_error(repo.run("stats", prefix, check=False), "ambiguous")
    assert not (tmp_path / "o.raw").exists()
    # A longer prefix is unique again.
    for x in ids:
        assert repo.json("stats", x[:12])["snapshot"]["id"] == x


def test_restore_target_exists_without_overwrite(world, assert_cli_error, tmp_path):
    target = tmp_path / "existing.raw"
    target.write_bytes(b"keep me" * 1000)
    p = world["plain"].run("restore", "web:latest", target, check=False)
    assert_cli_error(p, "exists", "--overwrite")
    assert target.read_bytes() == b"keep me" * 1000


def test_restore_target_too_small(world, assert_cli_error, tmp_path):
    target = tmp_path / "small.raw"
    target.write_bytes(b"\x01" * (MiB // 2))
    p = world["plain"].run("restore", "web:latest", target, "--overwrite", check=False)
    assert_cli_error(p, "too small")
    assert target.read_bytes() == b"\x01" * (MiB // 2), "a too-small target is not touched"


def test_restore_target_is_directory_or_in_missing_directory(world, assert_cli_error, tmp_path):
    assert_cli_error(world["plain"].run("restore", "web:latest", tmp_path, check=False), "directory")
    p = world["plain"].run("restore", "web:latest", tmp_path / "no" / "such" / "dir.raw", check=False)
    assert_cli_error(p, "directory")


def test_diff_of_different_geometry(world, assert_cli_error, tmp_path, new_disk):
    repo = copy_repo(world["plain"], tmp_path / "geom")
    other = new_disk(tmp_path, "other.raw", 2 * MiB, seed=3)
    repo.backup(other, "other")
    assert_cli_error(repo.run("diff", "web:latest", "other:latest", check=False))


def test_unknown_command_and_option_fail_cleanly(run_vmbak):
    for args in (["frobnicate"], ["backup", "--no-such-option"], ["snapshots", "extra-arg"]):
        p = run_vmbak(*args, check=False)
        assert p.returncode != 0 and "Traceback" not in p.stdout + p.stderr


# ---------------------------------------------------------------------------- size changes
def test_disk_size_change_makes_a_full_backup_with_a_message(make_repo, make_disk, tmp_path, assert_same_file):
    repo = make_repo()
    disk = make_disk("grow.raw", 2 * MiB, seed=61)
    disk.save("small")
    s0 = repo.backup(disk, "grow")
    disk.resize(3 * MiB + 512)
    disk.write_random(2 * MiB + 100, 4096, seed=62)
    disk.save("large")
    p = repo.run("backup", disk.path, "--name", "grow", "--json")
    s1 = json.loads(p.stdout.splitlines()[-1])
    assert s1["type"] == "full" and s1["parent"] is None, s1
    assert "size" in p.stderr and "full" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert any("size" in n for n in s1["notes"]), s1["notes"]
    disk.resize(MiB)
    disk.save("shrunk")
    s2 = repo.backup(disk, "grow")
    assert s2["type"] == "full"
    for label, snap in (("small", s0), ("large", s1), ("shrunk", s2)):
        out = tmp_path / f"{label}.out"
        repo.restore(snap["id"], out)
        assert_same_file(out, disk.version(label))
    # An explicit incremental after a size change is also a full, with the message.
    disk.resize(MiB + BLOCK)
    p = repo.run("backup", disk.path, "--name", "grow", "--mode", "incremental", "--json")
    assert json.loads(p.stdout.splitlines()[-1])["type"] == "full" and "size" in p.stderr
