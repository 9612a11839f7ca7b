"""The upload tail on S3 (issue 13): a backup's status lines and its bar go on after the
reading ends, until the last packs are uploaded (docs/json.md, phase ``upload``)."""

from __future__ import annotations

import json

MiB = 1 << 20


def test_backup_status_shows_the_upload_tail(make_s3_repo, make_disk):
    repo = make_s3_repo(encryption="none", pack_size=4 * MiB)
    # 41 one-MiB chunks of random data: ten full packs and one chunk still in memory when
    # the reading ends, so at least that chunk is not uploaded yet at that moment
    disk = make_disk("tail.raw", 41 * MiB, seed=1311)
    p = repo.run("backup", disk.path, "--name", "tail", "--json", env={"VMBAK_PROGRESS_INTERVAL": "0.1"})
    msgs = [json.loads(line) for line in p.stdout.splitlines()]
    *status, summary = msgs
    assert summary["message_type"] == "summary" and summary["stats"]["read_bytes"] == 41 * MiB
    assert all(m["message_type"] == "status" for m in status)
    upload = [m for m in status if m["phase"] == "upload"]
    assert upload, [m["phase"] for m in status]
    first = upload[0]  # printed as the phase began: everything read, not everything stored
    assert first["bytes_done"] == first["total_bytes"] == 41 * MiB
    assert first["upload_bytes_done"] < first["upload_bytes_total"], first
    assert first["percent_done"] < 1 and status[-1]["phase"] == "upload"
    stored = summary["stats"]["new_stored_bytes"]
    assert 41 * MiB <= first["upload_bytes_total"] <= stored, (first, stored)
