"""Fixtures for the S3 tests: a real S3-protocol server on loopback.

By default a moto standalone server (``python -m moto.server``, from PyPI) is started
once per test session (per xdist worker) on a free loopback port, with authentication
on: the fixture creates an IAM user and access key in it, so wrong keys are refused as
on AWS. When ``VMBAK_TEST_S3_ENDPOINT`` is set (``make test-ceph`` sets it to a Ceph
radosgw started by scripts/ceph-rgw.sh), that server is used instead, with the keys in
``VMBAK_TEST_S3_ACCESS_KEY`` / ``VMBAK_TEST_S3_SECRET_KEY``.

Fixtures:

* ``s3`` (session): ``S3Server`` (``.endpoint``, ``.access_key``, ``.secret_key``,
  ``.client()`` a boto3 client, ``.kind`` "moto" or "external")
* ``s3_bucket()`` -> a new empty bucket name
* ``make_s3_repo(encryption=..., endpoint=None, bucket=None, prefix="repo", pack_size=None,
  init=True)`` -> ``S3Repo`` driving the real CLI (``.run``, ``.json``, ``.backup``,
  ``.restore``, ``.snapshots``, ``.check``, ``.open``, ``.objects``)
* ``fault_proxy`` -> a ``FaultProxy`` in front of the server (tests/s3/faultproxy.py)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from s3.faultproxy import FaultProxy

PASSWORD = "s3 test password"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    kind: str
    proc: subprocess.Popen | None = None

    def client(self, endpoint: str | None = None):  # noqa: ANN201 - a boto3 S3 client
        import boto3
        import botocore.config

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=botocore.config.Config(s3={"addressing_style": "path"},
                                                          request_checksum_calculation="when_required",
                                                          response_checksum_validation="when_required"))

    @property
    def hostport(self) -> tuple[str, int]:
        rest = self.endpoint.split("://", 1)[1]
        host, _, port = rest.partition(":")
        return host, int(port or 80)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> S3Server:
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")  # the first 3 requests set up IAM
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    import boto3

    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="vmbak")
    iam.put_user_policy(UserName="vmbak", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="vmbak")["AccessKey"]
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], "moto", proc)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    ext = os.environ.get("VMBAK_TEST_S3_ENDPOINT")
    if ext:
        server = S3Server(ext.rstrip("/"), os.environ.get("VMBAK_TEST_S3_ACCESS_KEY", ""),
                          os.environ.get("VMBAK_TEST_S3_SECRET_KEY", ""), "external")
    else:
        server = _start_moto()
    # vmbak subprocesses (and the library in this process) find the keys as AWS tools do.
    empty = tmp_path_factory.mktemp("aws")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED",
                                            "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                      AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(empty / "config"),
                      AWS_SHARED_CREDENTIALS_FILE=str(empty / "credentials"), AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if server.proc is not None:
            server.proc.terminate()
            try:
                server.proc.wait(1)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


@pytest.fixture
def s3_bucket(s3: S3Server) -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def _make() -> str:
        name = f"vmbak-{os.environ.get('PYTEST_XDIST_WORKER', 'gw')}-{uuid.uuid4().hex[:12]}"
        s3.client().create_bucket(Bucket=name)
        made.append(name)
        return name

    yield _make
    if s3.kind == "external":  # leave a real server as it was
        c = s3.client()
        for b in made:
            try:
                for page in c.get_paginator("list_objects_v2").paginate(Bucket=b):
                    for o in page.get("Contents", []):
                        c.delete_object(Bucket=b, Key=o["Key"])
                c.delete_bucket(Bucket=b)
            except Exception:  # noqa: BLE001 - best effort
                pass


def _result(stdout: str) -> object:
    """A --json command's result: its one document, or the summary line that ends its
    JSON lines (the conftest fixture ``json_result`` checks the stream in full)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return json.loads(stdout.splitlines()[-1])


@dataclass
class S3Repo:
    """A repository in S3, driven through the real CLI."""

    location: str
    bucket: str
    prefix: str
    encryption: str
    password: str | None
    server: S3Server
    run_vmbak: Callable
    base_env: dict[str, str | None] = field(default_factory=dict)

    def env(self, **extra: str | None) -> dict[str, str | None]:
        e: dict[str, str | None] = {"VMBAK_REPOSITORY": self.location, **self.base_env}
        if self.password is not None:
            e["VMBAK_PASSWORD"] = self.password
        e.update(extra)
        return e

    def at(self, location: str) -> S3Repo:
        """The same repository reached at another location (e.g. through a proxy)."""
        return S3Repo(location, self.bucket, self.prefix, self.encryption, self.password, self.server,
                      self.run_vmbak, dict(self.base_env))

    def run(self, *args: object, env: dict[str, str | None] | None = None, check: bool = True, **kw):  # noqa: ANN003, ANN201
        return self.run_vmbak(*args, env={**self.env(), **(env or {})}, check=check, **kw)

    def json(self, *args: object, **kw) -> object:  # noqa: ANN003
        p = self.run(*args, "--json", **kw)
        return _result(p.stdout)

    def backup(self, disk, name: str, *extra: object, **kw) -> dict:  # noqa: ANN001
        path = getattr(disk, "path", disk)
        return self.json("backup", path, "--name", name, *extra, **kw)  # type: ignore[return-value]

    def restore(self, spec: str, target: str | os.PathLike[str], *extra: object, **kw) -> dict:  # noqa: ANN003
        return self.json("restore", spec, target, *extra, **kw)  # type: ignore[return-value]

    def snapshots(self) -> list[dict]:
        return self.json("snapshots")  # type: ignore[return-value]

    def check(self, read_data: bool = True, ok: bool = True) -> dict:
        p = self.run("check", "--json", *(["--read-data"] if read_data else []), check=False)
        rep = _result(p.stdout) if p.stdout.strip() else {}
        if ok:
            assert p.returncode == 0 and rep.get("ok"), f"check failed:\n{p.stdout}\n{p.stderr}"
        return rep

    def open(self):  # noqa: ANN201 - a vmbak.Repository in this process
        import vmbak

        return vmbak.Repository.open(self.location, self.password)

    def objects(self, under: str = "") -> dict[str, int]:
        """Every object of the repository (name relative to the prefix -> size)."""
        c = self.server.client()
        out: dict[str, int] = {}
        pre = f"{self.prefix}/{under}" if under else f"{self.prefix}/"
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=pre):
            for o in page.get("Contents", []):
                out[o["Key"][len(self.prefix) + 1:]] = o["Size"]
        return out


@pytest.fixture
def s3_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """Environment for vmbak subprocesses: a private cache, quick retries."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VMBAK_CACHE_DIR", str(cache))  # for the library in this process
    monkeypatch.setenv("VMBAK_S3_RETRY_DELAY", "0.05")
    return {"VMBAK_CACHE_DIR": str(cache), "VMBAK_S3_RETRY_DELAY": "0.05"}


@pytest.fixture
def make_s3_repo(s3: S3Server, s3_bucket: Callable[[], str], run_vmbak: Callable,
                 s3_env: dict[str, str | None]) -> Callable[..., S3Repo]:
    def _make(encryption: str = "aes-256-gcm", endpoint: str | None = None, bucket: str | None = None,
              prefix: str = "repo", pack_size: int | None = None, init: bool = True,
              password: str = PASSWORD) -> S3Repo:
        bucket = bucket or s3_bucket()
        loc = f"s3:{endpoint or s3.endpoint}/{bucket}/{prefix}"
        r = S3Repo(loc, bucket, prefix, encryption, password if encryption != "none" else None, s3, run_vmbak,
                   dict(s3_env))
        if init:
            r.run("init", "--encryption", encryption, *(["--pack-size", pack_size] if pack_size else []))
        return r

    return _make


@pytest.fixture
def fault_proxy(s3: S3Server) -> Iterator[FaultProxy]:
    p = FaultProxy(*s3.hostport, seed=int(os.environ.get("VMBAK_TEST_FAULT_SEED", "1")))
    try:
        yield p
    finally:
        p.close()
