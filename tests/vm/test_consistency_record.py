"""The manifest's ``guest_consistency`` field and the hooks of a plain DISK backup (no guest needed).

Old manifests (without the field) stay readable; a malformed field is refused; a raw
file backed up with hooks records ``hooks``; the hooks' environment; the one-line errors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vmbak.errors import IntegrityError
from vmbak.repo.manifest import FULL, Manifest, decode_manifest, encode_manifest


def _manifest(**kw: object) -> Manifest:
    m = Manifest(name="d", kind=FULL, time="2026-01-01T00:00:00.000000Z", disk_size=1 << 20, block_size=1 << 16,
                 chunk_blocks=64, source="x", hostname="h", change_source="full", **kw)  # type: ignore[arg-type]
    m.used = np.ones(16, bool)
    return m


def test_manifest_consistency_roundtrip_and_old_manifests() -> None:
    c = {"level": "frozen", "freeze": "auto", "filesystems": 1, "frozen_s": 0.1}
    m = decode_manifest(encode_manifest(_manifest(guest_consistency=c)), "ab" * 32)
    assert m.guest_consistency == c and m.summary()["guest_consistency"] == c
    old = decode_manifest(encode_manifest(_manifest()), "cd" * 32)  # written without the field
    assert old.guest_consistency is None and old.summary()["guest_consistency"] is None
    for bad in ({"freeze": "auto"}, {"level": 3}):
        with pytest.raises(IntegrityError):
            decode_manifest(encode_manifest(dataclasses.replace(_manifest(), guest_consistency=bad)), "ef" * 32)


def test_file_backup_hooks(repo, make_disk, tmp_path, assert_cli_error) -> None:  # noqa: ANN001
    disk = make_disk("d.raw", 4 << 20)
    out = tmp_path / "env"
    out.mkdir()
    pre, post = tmp_path / "pre.sh", tmp_path / "post.sh"
    pre.write_text(f"#!/bin/sh\nenv | grep ^VMBAK_ | sort > {out}/pre\n")
    post.write_text(f"#!/bin/sh\nenv | grep ^VMBAK_ | sort > {out}/post\n")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\necho nope >&2\nexit 2\n")
    for f in (pre, post, bad):
        f.chmod(0o755)

    def env(name: str) -> dict[str, str]:
        return dict(ln.split("=", 1) for ln in (out / name).read_text().splitlines())

    r = repo.json("backup", disk.path, "--name", "d", "--hook-pre", pre, "--hook-post", post)
    assert r["guest_consistency"] == {"level": "hooks", "freeze": "auto", "hooks": ["pre"]}
    base = {"VMBAK_VM": "", "VMBAK_DISK": str(disk.path), "VMBAK_NAME": "d", "VMBAK_SOURCE": "file",
            "VMBAK_FREEZE": "auto"}
    assert env("pre") == {**base, "VMBAK_HOOK_PHASE": "pre"}
    assert env("post") == {**base, "VMBAK_HOOK_PHASE": "post", "VMBAK_STATUS": "ok", "VMBAK_CONSISTENCY": "hooks"}
    # no hooks: nothing recorded for a plain file; the listing shows "-"
    r2 = repo.json("backup", disk.path, "--name", "d")
    assert r2["guest_consistency"] is None
    snaps = repo.json("snapshots")
    assert [(s.get("guest_consistency") or {}).get("level") for s in snaps] == ["hooks", None]
    rows = repo.run("snapshots").stdout.splitlines()
    # CONSISTENCY is followed by TAGS, which is empty here: the last word of each row
    assert rows[0].split()[-2:] == ["CONSISTENCY", "TAGS"]
    assert rows[1].split()[-1] == "hooks" and rows[2].split()[-1] == "-"

    (out / "post").unlink()
    assert_cli_error(repo.run("backup", disk.path, "--name", "d", "--hook-pre", bad, "--hook-post", post,
                              check=False), "pre hook", "exit 2", "nope", "no backup taken")
    assert env("post")["VMBAK_STATUS"] == "failed"
    assert len(repo.snapshots()) == 2
    assert_cli_error(repo.run("backup", disk.path, "--name", "d", "--freeze", "always", check=False),
                     "--freeze always", "point-in-time")
    assert_cli_error(repo.run("backup", disk.path, "--name", "d", "--guest-agent", "/x.sock", check=False),
                     "--guest-agent")
    assert_cli_error(repo.run("backup", disk.path, "--name", "d", "--freeze-mountpoint", "/", check=False),
                     "--freeze-mountpoint")
