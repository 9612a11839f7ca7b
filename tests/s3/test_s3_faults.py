"""Through a proxy that drops connections, delays and stalls responses, answers 500 and
503 and truncates bodies, backup, restore, copy and prune either complete correctly or
fail with one clear line; afterwards the repository passes check --read-data with
nothing lost."""

from __future__ import annotations

import vmbak

MiB = 1 << 20

FAULTS = {"drop": 0.03, "drop_after": 0.03, "error500": 0.04, "error503": 0.05, "truncate": 0.05,
          "delay": 0.05, "stall": 0.01}


def _run(repo, *args, assert_cli_error, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Run a command through the faults: success, or one clear error line, and then a
    rerun without faults is what finishes the work."""
    p = repo.run(*args, check=False, **kw)
    if p.returncode != 0:
        assert_cli_error(p)
    return p


def test_everything_survives_a_faulty_network(make_s3_repo, make_repo, make_disk, fault_proxy, tmp_path,
                                              assert_same_file, assert_cli_error):
    direct = make_s3_repo(encryption="aes-256-gcm", pack_size=MiB)
    via = direct.at(direct.location.replace(direct.server.endpoint, fault_proxy.endpoint))
    via.base_env.update(VMBAK_S3_TIMEOUT="1", VMBAK_S3_MULTIPART_THRESHOLD=str(5 * MiB))
    fault_proxy.set(stall_s=2.5, **FAULTS)
    disk = make_disk("d.raw", 8 * MiB, seed=3)
    ok = _run(via, "backup", disk.path, "--name", "d", assert_cli_error=assert_cli_error)
    assert ok.returncode == 0, ok.stderr  # ten tries per request: these rates never exhaust them
    disk.write_random(2 * MiB, 3 * MiB, seed=4)
    _run(via, "backup", disk.path, "--name", "d", assert_cli_error=assert_cli_error)
    out = tmp_path / "r.raw"
    p = _run(via, "restore", "d:latest", out, assert_cli_error=assert_cli_error)
    if p.returncode == 0:
        assert_same_file(out, disk.path)
    # copy from a local repository through the faults (re-keyed)
    local = make_repo("none", pack_size=MiB)
    other = make_disk("o.raw", 6 * MiB, seed=5)
    vmbak.backup(local.open(), other.path, "o")
    _run(via, "copy", "--from-repo", local.path, "--to-repo", via.location, assert_cli_error=assert_cli_error)
    # forget the first snapshot and prune through the faults
    _run(via, "forget", "--name", "d", "--keep-last", "1", assert_cli_error=assert_cli_error)
    _run(via, "prune", "--grace", "0", assert_cli_error=assert_cli_error)
    counts = dict(fault_proxy.counts)
    fault_proxy.clear()
    assert all(counts[k] > 0 for k in ("drop", "drop_after", "error500", "error503", "truncate")), counts
    # whatever happened, nothing committed is lost; reruns without faults finish the work
    direct.check(read_data=True)
    direct.run("copy", "--from-repo", local.path, "--to-repo", direct.location)
    direct.run("prune", "--grace", "0")
    direct.check(read_data=True)
    lib = direct.open()
    names = sorted(m.name for m in lib.manifests())
    assert names == ["d", "o"], names
    for spec, want in (("d:latest", disk.path), ("o:latest", other.path)):
        out = tmp_path / f"final-{spec[0]}.raw"
        vmbak.restore(lib, spec, out)
        assert_same_file(out, want)


def test_persistent_failure_is_one_clear_line(make_s3_repo, make_disk, fault_proxy, tmp_path, assert_cli_error,
                                              assert_same_file):
    direct = make_s3_repo(encryption="none", pack_size=MiB)
    via = direct.at(direct.location.replace(direct.server.endpoint, fault_proxy.endpoint))
    disk = make_disk("d.raw", 4 * MiB, seed=8)
    direct.backup(disk, "d")
    v0 = disk.save("v0")
    # the server keeps answering 503 SlowDown to uploads: the backup gives up, with one line
    disk.write_random(0, MiB, seed=9)
    fault_proxy.set(error503=1.0, only_methods=("PUT",))
    p = via.run("backup", disk.path, "--name", "d", check=False, env={"VMBAK_S3_RETRIES": "3"})
    line = assert_cli_error(p, "after 3 attempts")
    assert "SlowDown" in line or "503" in line
    # bodies cut short are noticed (Content-Length, Content-Range) and read again
    fault_proxy.set(truncate=0.2, only_methods=("GET",))
    out = tmp_path / "r.raw"
    via.restore("d:latest", out)
    assert_same_file(out, v0)  # the failed backup committed nothing
    assert fault_proxy.counts["truncate"] > 0
    fault_proxy.clear()
    direct.check(read_data=True)
    direct.backup(disk, "d")
    direct.check(read_data=True)
