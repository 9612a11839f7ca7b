"""Restores that race for one target, and repository data that names paths (issue 18).

* Two real ``vmbak restore`` processes of two different snapshots to the same new path:
  whatever each one claims (exit 0, "restored snapshot X ... verified") must be what the
  path holds at the end; the loser fails with one line, and no partial or lock file is
  left beside the target.
"""

from __future__ import annotations

import json
import os
import subprocess

MiB = 1 << 20
SIZE = 8 * MiB
TRIALS = 5


def test_concurrent_restores_to_one_new_path(repo, make_disk, popen_vmbak, assert_cli_error, sha256_file,
                                             tmp_path) -> None:
    a = make_disk("a.raw", SIZE, seed=11)
    b = make_disk("b.raw", SIZE, seed=12)
    snap = {"a": repo.backup(a, "a")["id"], "b": repo.backup(b, "b")["id"]}
    want = {snap["a"]: sha256_file(a.path), snap["b"]: sha256_file(b.path)}
    out = tmp_path / "out"
    out.mkdir()
    for trial in range(TRIALS):
        target = out / f"t{trial}.raw"
        first, second = ("a", "b") if trial % 2 == 0 else ("b", "a")
        procs = [popen_vmbak("restore", f"{n}:latest", target, "--json", env=repo.env()) for n in (first, second)]
        results = [(p, *p.communicate(timeout=120)) for p in procs]
        winners = []
        for p, stdout, stderr in results:
            assert "Traceback" not in stdout + stderr, stderr
            if p.returncode == 0:
                r = json.loads(stdout.splitlines()[-1])  # the summary line
                assert r["verified"] and r["target"] == os.fspath(target)
                winners.append(r["snapshot"])
            else:
                line = assert_cli_error(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
                assert "in use by another restore" in line or "exists" in line or "appeared" in line, line
        assert winners, f"trial {trial}: neither restore succeeded: {[r[2] for r in results]}"
        got = sha256_file(target)
        for sid in winners:  # every success claims exactly what is at the path
            assert want[sid] == got, f"trial {trial}: a restore of {sid[:8]} said it succeeded, but " \
                                     f"{target} holds {'the other snapshot' if got in want.values() else 'neither'}"
        assert sorted(os.listdir(out)) == sorted(f"t{i}.raw" for i in range(trial + 1)), os.listdir(out)



def test_partial_of_a_killed_restore_is_removed_by_the_next(repo, make_disk, popen_vmbak, sha256_file,
                                                           tmp_path) -> None:
    """kill -9 leaves the partial file (named with the dead pid) and the lock file; the next
    restore to that path takes the lock (the kernel dropped it), removes both, and succeeds."""
    import signal
    import time

    disk = make_disk("big.raw", 24 * MiB, seed=21)
    sid = repo.backup(disk, "big")["id"]
    out = tmp_path / "out"
    out.mkdir()
    target = out / "t.raw"
    for _attempt in range(5):
        p = popen_vmbak("restore", sid, target, "-q", env=repo.env())
        while p.poll() is None and not any(".vmbak-partial." in n for n in os.listdir(out)):
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        if p.returncode == -signal.SIGKILL and not target.exists():
            break
        if target.exists():
            target.unlink()
    left = sorted(os.listdir(out))
    assert any(".vmbak-partial." in n and f".{p.pid}." in n for n in left), left
    repo.run("restore", sid, target)
    assert sorted(os.listdir(out)) == ["t.raw"]
    assert sha256_file(target) == sha256_file(disk.path)


# ---------------------------------------------------------------------------- paths from repository data
DOMAIN_XML = ("<domain type='kvm'><name>{name}</name><uuid>5e1c9a38-9c55-4a56-8f0d-6d1e54c9d0a1</uuid>"
              "<memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices>"
              "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
              "<source file='/var/lib/libvirt/images/{name}.raw'/><target dev='vda' bus='virtio'/></disk>"
              "</devices></domain>")


def _libvirt_snapshot(repo, make_disk, domain: str = "web", target: str = "vda",
                      source: str = "/var/lib/libvirt/images/web.raw") -> str:
    """A snapshot whose manifest claims to be one disk of a libvirt backup, written with the
    library by someone who holds the password (as a crafted repository would be)."""
    import dataclasses

    import vmbak

    disk = make_disk(f"lv-{os.urandom(4).hex()}.raw", 1 * MiB, seed=5)
    lib = repo.open()
    m = vmbak.backup(lib, os.fspath(disk.path), "plain")
    info = {"domain": domain, "uri": "qemu:///system", "prefix": "web", "target": target, "format": "raw",
            "source": source, "checkpoint": f"vmbak-20261202T000000-{os.urandom(4).hex()}", "disks": [target],
            "domain_xml": DOMAIN_XML.format(name="web")}
    crafted = dataclasses.replace(m, extra={"libvirt": info}, name=f"web-{target}", id="")
    with lib.lock(purpose="backup"):
        return lib.save_manifest(crafted)


def _files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def test_libvirt_restore_stays_in_its_directory(encrypted_repo, make_disk, tmp_path) -> None:
    repo = encrypted_repo
    out = tmp_path / "out"
    restore_dir = out / "a" / "b" / "dir"
    restore_dir.mkdir(parents=True)
    ok = _libvirt_snapshot(repo, make_disk)
    r = repo.json("restore", "--libvirt", ok, restore_dir)
    assert sorted(os.listdir(restore_dir)) == ["web-restored-vda.raw", "web-restored.xml"], r
    assert r["xml"] == os.fspath(restore_dir / "web-restored.xml")


def test_libvirt_restore_refuses_paths_from_a_crafted_manifest(encrypted_repo, make_disk, assert_cli_error,
                                                               tmp_path) -> None:
    repo = encrypted_repo
    out = tmp_path / "out"
    restore_dir = out / "a" / "b" / "dir"
    restore_dir.mkdir(parents=True)
    cases = [  # (manifest fields, restore into DIR?)
        ({"target": "x/../../../escaped"}, True),
        ({"target": ".."}, True),
        ({"target": "vda\0.raw"}, True),
        ({"domain": "../../escaped"}, True),
        ({"domain": "/tmp/escaped"}, True),
        ({"source": "../../escaped/web.raw"}, False),
        ({"source": "/var/lib/../../" + os.fspath(out).lstrip("/") + "/web.raw"}, False),
    ]
    for fields, into_dir in cases:
        sid = _libvirt_snapshot(repo, make_disk, **fields)
        before = _files_under(out)
        p = repo.run("restore", "--libvirt", sid, *([restore_dir] if into_dir else []), check=False,
                     cwd=restore_dir)
        line = assert_cli_error(p, f"snapshot {sid[:8]}")
        assert "libvirt" in line, line
        assert _files_under(out) == before, f"{fields}: files appeared: {_files_under(out) - before}"


def test_libvirt_restore_define_name_is_a_plain_name(repo, make_disk, assert_cli_error, tmp_path) -> None:
    sid = _libvirt_snapshot(repo, make_disk)
    p = repo.run("restore", "--libvirt", sid, tmp_path, "--define", "../x", check=False)
    assert_cli_error(p, "--define", "plain")
    assert set(os.listdir(tmp_path)) == {"repo", "disks"}  # nothing restored anywhere
    assert not os.path.exists(tmp_path.parent / "x-vda.raw")
