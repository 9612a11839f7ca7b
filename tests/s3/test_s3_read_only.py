"""An S3 key that may only read (a user allowed s3:Get* and s3:List* only):
``--no-lock`` restores and checks with it; without it, the refused lock says so in one
line that names --no-lock; a backup with it stops at its lock."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

MiB = 1 << 20


READ_ACTIONS = ["s3:Get*", "s3:List*"]


def _read_only_key(s3, bucket: str) -> dict[str, str]:  # noqa: ANN001 - the S3Server fixture
    """AWS_* variables of a new user that may only read ``bucket``: on moto an IAM user
    whose policy allows s3:Get* and s3:List* (moto checks IAM policies); on the radosgw of
    ``make test-ceph`` a user made with radosgw-admin, to whom the bucket's policy grants the
    same (radosgw has no IAM users of its own)."""
    user = f"reader-{uuid.uuid4().hex[:8]}"
    if s3.kind == "moto":
        import boto3

        iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1",
                           aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": READ_ACTIONS, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    conf = os.environ.get("VMBAK_TEST_CEPH_CONF")
    assert conf, "an external S3 server needs VMBAK_TEST_CEPH_CONF (make test-ceph) to make a read-only user"
    access, secret = uuid.uuid4().hex[:20].upper(), uuid.uuid4().hex
    subprocess.run(["radosgw-admin", "-c", conf, "user", "create", f"--uid={user}", f"--display-name={user}",
                    f"--access-key={access}", f"--secret={secret}"], check=True, capture_output=True, timeout=120)
    s3.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": [f"arn:aws:iam:::user/{user}"]}, "Action": READ_ACTIONS,
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}


def test_a_read_only_key_restores_and_checks_with_no_lock(make_s3_repo, make_disk, assert_cli_error,
                                                          assert_same_file, s3, tmp_path):
    repo = make_s3_repo(pack_size=MiB)
    disk = make_disk("d.raw", 3 * MiB, seed=51)
    repo.run("backup", disk.path, "--name", "d")
    ro = _read_only_key(s3, repo.bucket)
    before = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=repo.bucket).get("Contents", []))

    out = tmp_path / "r.raw"
    assert_cli_error(repo.run("restore", "d:latest", out, env=ro, check=False),
                     "S3 access denied", "locks/", "access that may only read can restore with --no-lock")
    assert not out.exists()
    p = repo.run("--no-lock", "restore", "d:latest", out, env=ro)
    assert "Traceback" not in p.stderr
    assert_same_file(out, disk.path)

    p = repo.run("--no-lock", "check", "--read-data", "--json", env=ro)
    rep = json.loads(p.stdout.splitlines()[-1])
    assert rep["errors"] == [] and rep["packs_read"] >= 1, rep
    assert any("cannot record verified packs" in w and "access denied" in w for w in rep["warnings"]), rep

    assert_cli_error(repo.run("--no-lock", "backup", disk.path, "--name", "d", env=ro, check=False),
                     "S3 access denied", "locks/")
    after = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=repo.bucket).get("Contents", []))
    assert after == before
