"""Clear one-line errors: bad credentials, no credentials, a missing bucket, a bucket that
holds something else, an unreachable endpoint."""

from __future__ import annotations

import socket


def test_bad_credentials(make_s3_repo, assert_cli_error, s3):
    repo = make_s3_repo(encryption="none")
    p = repo.run("snapshots", check=False, env={"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0"})
    assert_cli_error(p, "credentials", "access key")
    p = repo.run("snapshots", check=False, env={"AWS_SECRET_ACCESS_KEY": "wrong" * 8})
    assert_cli_error(p, "credentials", "secret key")
    p = repo.run("snapshots", check=False, env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None})
    assert_cli_error(p, "no S3 credentials")


def test_missing_bucket(make_s3_repo, assert_cli_error, s3):
    repo = make_s3_repo(encryption="none", bucket="vmbak-no-such-bucket-here", init=False)
    p = repo.run("snapshots", check=False)
    assert_cli_error(p, "vmbak-no-such-bucket-here", "does not exist")


def test_init_creates_a_missing_bucket(make_s3_repo, s3):
    """As restic's init does: the bucket is created, and the repository works at once."""
    repo = make_s3_repo(encryption="none", bucket="vmbak-made-by-init", prefix="vm", init=False)
    out = repo.json("init", "--encryption", "none")
    assert out["created_bucket"] is True
    s3.client().head_bucket(Bucket="vmbak-made-by-init")
    assert repo.snapshots() == []
    again = make_s3_repo(encryption="none", bucket="vmbak-made-by-init", prefix="other", init=False)
    assert again.json("init", "--encryption", "none")["created_bucket"] is False


def test_foreign_bucket(make_s3_repo, s3_bucket, assert_cli_error, s3):
    bucket = s3_bucket()
    s3.client().put_object(Bucket=bucket, Key="photos/cat.jpg", Body=b"\xff\xd8 not a repository")
    repo = make_s3_repo(encryption="none", bucket=bucket, prefix="photos", init=False)
    p = repo.run("snapshots", check=False)
    assert_cli_error(p, "not a vmbak repository", "cat.jpg")
    p = repo.run("init", "--encryption", "none", check=False)
    assert_cli_error(p, "not empty")
    # an empty prefix of the same bucket is fine; a second init there is refused
    other = make_s3_repo(encryption="none", bucket=bucket, prefix="vmbak")
    p = other.run("init", "--encryption", "none", check=False)
    assert_cli_error(p, "already exists")


def test_unreachable_endpoint(make_s3_repo, assert_cli_error):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    repo = make_s3_repo(encryption="none", endpoint=f"http://127.0.0.1:{port}", bucket="anything", init=False)
    p = repo.run("snapshots", check=False, env={"VMBAK_S3_RETRIES": "2"})
    assert_cli_error(p, "cannot reach the S3 endpoint", f"127.0.0.1:{port}")


def test_bad_location(run_vmbak, assert_cli_error, s3_env):
    p = run_vmbak("-r", "s3:http://127.0.0.1:1/", "snapshots", check=False, env=s3_env)
    assert_cli_error(p, "no bucket")
