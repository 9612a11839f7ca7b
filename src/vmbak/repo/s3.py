"""S3-compatible object storage (AWS S3, Ceph RGW, MinIO, ...) as a repository backend.

Locations::

    s3:http://HOST:PORT/BUCKET[/PREFIX]                   any S3 API at that endpoint (path-style)
    s3:https://s3.REGION.amazonaws.com/BUCKET[/PREFIX]    AWS (the region is taken from the host)
    s3:BUCKET[/PREFIX]                                    endpoint from --s3-endpoint / $VMBAK_S3_ENDPOINT,
                                                          else the AWS tools' own configuration

``vmbak init`` creates the bucket when it does not exist (in the client's region), as
restic does; every other command needs it to exist.

Each repository object is the S3 object ``PREFIX/<name>`` (the same names as in a local
repository directory). Credentials, region and profile come from where the AWS tools
find them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``).

Every request is retried with exponential backoff and jitter on throttling (SlowDown,
503, 429), other 5xx answers, connection errors, timeouts and truncated bodies (a body
shorter than its Content-Length, or than the range asked for). A PUT is atomic, so
``write`` is too; bodies carry Content-MD5, so the server refuses a damaged upload.
Large files (packs) go up as multipart uploads with several parts at once, and a backup
uploads several packs at once.

Tuning (environment): ``VMBAK_S3_CONCURRENCY`` (parts uploaded at once, default 4),
``VMBAK_S3_UPLOADS`` (packs a backup uploads at once, default 2),
``VMBAK_S3_PART_SIZE`` (default 8 MiB), ``VMBAK_S3_MULTIPART_THRESHOLD`` (default 16 MiB),
``VMBAK_S3_READ_WINDOW`` (chunks are read from packs through aligned windows of this
size, default 8 MiB, 8 kept), ``VMBAK_S3_RETRIES`` (attempts per request, default 10), ``VMBAK_S3_RETRY_DELAY`` (first
backoff in seconds, default 0.2), ``VMBAK_S3_TIMEOUT`` (socket timeout, default 60 s).

Bandwidth limits: ``VMBAK_S3_LIMIT_UPLOAD`` and ``VMBAK_S3_LIMIT_DOWNLOAD`` (KiB/s, like
restic's ``--limit-upload``; 0 or unset: no limit) cap the average rate of the bodies sent
and received, over all of the backend's threads together (see :class:`Throttle`).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures as cf
import hashlib
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from vmbak.errors import RepositoryError
from vmbak.repo.backend import AccessDenied, ObjectMissing, remove_dead_temp_files
from vmbak.repo.cache import ObjectCache, cache_root

T = TypeVar("T")
MiB = 1 << 20
RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
               "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
               "OperationAborted", "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch"}
AUTH_CODES = {"InvalidAccessKeyId": "the access key is unknown (InvalidAccessKeyId): check AWS_ACCESS_KEY_ID "
              "or AWS_PROFILE",
              "SignatureDoesNotMatch": "the secret key does not match (SignatureDoesNotMatch): check "
              "AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
              "InvalidToken": "the session token is invalid (InvalidToken): check AWS_SESSION_TOKEN",
              "ExpiredToken": "the session token has expired (ExpiredToken)",
              "InvalidSecurity": "the credentials were refused (InvalidSecurity)"}
STALE_UPLOAD_S = 24 * 3600


def _env_int(name: str, default: int, low: int) -> int:
    try:
        return max(low, int(os.environ.get(name, default)))
    except ValueError:
        raise RepositoryError(f"${name} must be an integer") from None


def _env_float(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        raise RepositoryError(f"${name} must be a number") from None


class Throttle:
    """Paces transfers to ``rate`` bytes per second on average, over every thread sharing it.

    Each transfer of n bytes books the next n/rate seconds of the link, after the transfers
    booked before it, and waits until its booking ends: n bytes take at least n/rate seconds,
    and over any stretch of time no more than rate × time bytes (plus one transfer per thread
    in flight) go through. Uploads wait before they send, downloads after they receive.
    ``rate`` 0: no limit.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link is free again (time.monotonic)

    def take(self, n: int) -> float:
        """Wait for ``n`` bytes' turn; return the seconds waited."""
        if self.rate <= 0 or n <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + n / self.rate
            wait = self._free_at - now
        if wait > 0:
            time.sleep(wait)
        return max(wait, 0.0)


@dataclass(frozen=True)
class S3Location:
    endpoint: str | None  # scheme://host[:port], or None for the AWS tools' default
    bucket: str
    prefix: str           # "" or "some/prefix/"
    region: str | None

    def url(self) -> str:
        ep = self.endpoint or "aws"
        return f"s3:{ep}/{self.bucket}" + (f"/{self.prefix.rstrip('/')}" if self.prefix else "")


def parse_location(location: str, endpoint: str | None = None) -> S3Location:
    """Parse ``s3:...`` (see the module docstring)."""
    if not location.startswith("s3:"):
        raise RepositoryError(f"not an S3 location: {location}")
    rest = location[3:]
    if rest.startswith(("http://", "https://")):
        u = urllib.parse.urlsplit(rest)
        if not u.hostname:
            raise RepositoryError(f"bad S3 location {location!r} (use s3:http://HOST:PORT/BUCKET/PREFIX)")
        endpoint = f"{u.scheme}://{u.netloc}"
        path = u.path
    else:
        path = rest[2:] if rest.startswith("//") else rest
        endpoint = endpoint or os.environ.get("VMBAK_S3_ENDPOINT") or None
    bucket, _, prefix = path.lstrip("/").partition("/")
    if not bucket:
        raise RepositoryError(f"bad S3 location {location!r}: no bucket (use s3:http://HOST:PORT/BUCKET/PREFIX)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise RepositoryError(f"bad S3 bucket name {bucket!r}")
    prefix = prefix.strip("/")
    region = None
    if endpoint:
        host = urllib.parse.urlsplit(endpoint).hostname or ""
        m = re.fullmatch(r"(?:[a-z0-9-]+\.)?s3[.-](?:dualstack\.)?([a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com(?:\.cn)?",
                         host)
        if m:
            region = m.group(1)
        elif host == "s3.amazonaws.com":
            region = "us-east-1"
    return S3Location(endpoint, bucket, f"{prefix}/" if prefix else "", region)


class _Truncated(Exception):
    """A response body shorter than announced (retried)."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class S3Backend:
    """A repository under a prefix of an S3 bucket (see the module docstring)."""

    def __init__(self, location: str, endpoint: str | None = None) -> None:
        try:
            # Where Debian's python3-openssl is installed (borgbackup and virtnbdbackup pull
            # it in), botocore imports it through urllib3, and that old pyOpenSSL warns
            # against the newer cryptography at import: a two-line warning before every S3
            # command's output or one-line error. It says nothing about vmbak's data.
            import warnings

            from cryptography.utils import CryptographyDeprecationWarning

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                import boto3
                import botocore.config
                import botocore.exceptions as bx
        except ImportError:  # pragma: no cover - boto3 is a dependency
            raise RepositoryError("S3 repositories need boto3 (pip install boto3)") from None
        self._bx = bx
        self.loc = parse_location(location, endpoint)
        self.location = self.loc.url()
        self.bucket = self.loc.bucket
        self.prefix = self.loc.prefix
        self.created_bucket = False  # set by prepare_init when it had to create the bucket
        self.concurrency = _env_int("VMBAK_S3_CONCURRENCY", 4, 1)
        self.pack_writers = _env_int("VMBAK_S3_UPLOADS", 2, 1)  # read by ChunkWriter
        self.part_size = _env_int("VMBAK_S3_PART_SIZE", 8 * MiB, 5 * MiB)
        self.multipart_threshold = _env_int("VMBAK_S3_MULTIPART_THRESHOLD", 16 * MiB, 5 * MiB)
        self.attempts = _env_int("VMBAK_S3_RETRIES", 10, 1)
        self.retry_delay = _env_float("VMBAK_S3_RETRY_DELAY", 0.2)
        timeout = _env_float("VMBAK_S3_TIMEOUT", 60.0) or 60.0
        self.upload_limit = Throttle(_env_float("VMBAK_S3_LIMIT_UPLOAD", 0.0) * 1024)
        self.download_limit = Throttle(_env_float("VMBAK_S3_LIMIT_DOWNLOAD", 0.0) * 1024)
        self.retries_done = 0  # how many requests were retried (for tests and statistics)
        self.cache: ObjectCache | None = None
        self._sizes: dict[str, int] = {}  # sizes seen in the latest listings (cache validation)
        self._lock = threading.Lock()
        self._parts: cf.ThreadPoolExecutor | None = None
        # ranged reads of packs are served from aligned windows of this size (0: off)
        self.read_window = _env_int("VMBAK_S3_READ_WINDOW", 8 * MiB, 0)
        self.read_windows = _env_int("VMBAK_S3_READ_WINDOWS", 8, 1)
        self._windows: collections.OrderedDict[tuple[str, int], cf.Future] = collections.OrderedDict()
        self._tmpdir: str | None = None
        self._retryable_exc: tuple[type[BaseException], ...] = (
            bx.HTTPClientError, bx.IncompleteReadError, bx.ResponseStreamingError, _Truncated, ConnectionError,
            TimeoutError, socket.timeout)
        try:
            import urllib3.exceptions

            self._retryable_exc += (urllib3.exceptions.HTTPError,)
        except ImportError:  # pragma: no cover
            pass
        try:
            session = boto3.session.Session()
            region = (self.loc.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                      or session.region_name or "us-east-1")
            aws = self.loc.endpoint is None or self.loc.endpoint.endswith(".amazonaws.com")
            cfg = botocore.config.Config(
                region_name=region,
                retries={"total_max_attempts": 1},  # retries are ours (they also cover reading bodies)
                connect_timeout=min(10.0, timeout), read_timeout=timeout,
                max_pool_connections=max(10, 2 * self.concurrency + 8),
                s3={"addressing_style": "auto" if aws else "path"},
                request_checksum_calculation="when_required", response_checksum_validation="when_required",
                tcp_keepalive=True,
            )
            self.client = session.client("s3", endpoint_url=self.loc.endpoint, config=cfg)
        except bx.ProfileNotFound as e:
            raise RepositoryError(f"S3: {_one_line(e)} (check AWS_PROFILE and ~/.aws/config)") from None
        except (bx.BotoCoreError, ValueError) as e:
            raise RepositoryError(f"S3: cannot set up a client for {self.location}: {_one_line(e)}") from None

    # ------------------------------------------------------------------ plumbing
    def _key(self, name: str) -> str:
        return self.prefix + name

    def _error(self, e: Exception, name: str) -> RepositoryError:
        """A one-line error for a request that will not be retried."""
        bx = self._bx
        if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
            return RepositoryError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                   "or AWS_PROFILE (~/.aws/credentials)")
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            msg = " ".join(str(err.get("Message", "")).split())
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectMissing(f"repository object missing: {name}")
            if code == "NoSuchBucket":
                return RepositoryError(f"S3 bucket {self.bucket!r} does not exist at "
                                       f"{self.loc.endpoint or 'AWS'} ({self.location})")
            if code in AUTH_CODES:
                return RepositoryError(f"S3 refused the credentials for {self.location}: {AUTH_CODES[code]}")
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
                return AccessDenied(f"S3 access denied to {self.location} ({name}): check the credentials "
                                       "and the bucket policy")
            return RepositoryError(f"S3 error on {name} in {self.location}: {code or status} {msg}".rstrip())
        if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError):
            return RepositoryError(f"cannot reach the S3 endpoint {self.loc.endpoint or 'AWS'} "
                                   f"({self.location}): {_one_line(e)}")
        if isinstance(e, RepositoryError):
            return e
        return RepositoryError(f"S3 request for {name} in {self.location} failed: {_one_line(e)}")

    def _retryable(self, e: BaseException) -> bool:
        if isinstance(e, self._bx.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return code in RETRY_CODES or status in (429, 500, 502, 503, 504) or code in ("500", "502", "503", "504")
        return isinstance(e, self._retryable_exc)

    def _call(self, what: str, name: str, fn: Callable[[], T]) -> T:
        """Run one request (including reading its body) with retries and backoff."""
        last: BaseException | None = None
        for attempt in range(self.attempts):
            if attempt:
                delay = min(10.0, self.retry_delay * (2 ** (attempt - 1)))
                time.sleep(delay * random.uniform(0.5, 1.0))
                with self._lock:
                    self.retries_done += 1
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                if not self._retryable(e):
                    raise self._error(e, name) from None
                last = e
        assert last is not None
        if isinstance(last, self._bx.EndpointConnectionError | self._bx.ConnectTimeoutError):
            raise RepositoryError(f"cannot reach the S3 endpoint {self.loc.endpoint or 'AWS'} ({self.location}) "
                                  f"after {self.attempts} attempts: {_one_line(last)}") from None
        raise RepositoryError(f"S3 {what} of {name} in {self.location} failed after {self.attempts} attempts: "
                              f"{self._describe(last)}") from None

    def _describe(self, e: BaseException) -> str:
        if isinstance(e, self._bx.ClientError):
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return f"{err.get('Code') or status} {' '.join(str(err.get('Message', '')).split())}".strip()
        return _one_line(e)

    @staticmethod
    def _md5(data: bytes | memoryview) -> str:
        return base64.b64encode(hashlib.md5(data).digest()).decode()

    # ------------------------------------------------------------------ the Backend protocol
    def read(self, name: str) -> bytes:
        cache = self.cache
        if cache is not None and cache.cacheable(name):
            size = self._sizes.get(name)
            if size is not None:
                data = cache.get(name, size)
                if data is not None:
                    return data

        def get() -> bytes:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            body = r["Body"].read()
            if len(body) != int(r.get("ContentLength", len(body))):
                raise _Truncated(f"{name}: got {len(body)} of {r.get('ContentLength')} bytes")
            return body

        data = self._call("read", name, get)
        self.download_limit.take(len(data))
        if cache is not None and cache.cacheable(name):
            cache.put(name, data)
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        w = self.read_window
        if w and length < w and name.startswith("data/"):
            start = offset - offset % w
            if offset + length <= start + w:
                buf = self._window(name, start)
                return buf[offset - start:offset - start + length]
        return self._read_range(name, offset, length)

    def _window(self, name: str, start: int) -> bytes:
        """An aligned window of a pack (immutable), shared by the threads that read chunks
        from it: restores and copies read chunks in pack order, so one ranged GET serves
        many chunks. A few windows are kept (least recently used go first)."""
        key = (name, start)
        with self._lock:
            fut = self._windows.get(key)
            owner = fut is None
            if owner:
                fut = self._windows[key] = cf.Future()
                while len(self._windows) > self.read_windows:
                    self._windows.popitem(last=False)
            else:
                self._windows.move_to_end(key)
        assert fut is not None
        if owner:
            try:
                fut.set_result(self._read_range(name, start, self.read_window))
            except BaseException as e:
                fut.set_exception(e)
                with self._lock:
                    if self._windows.get(key) is fut:
                        del self._windows[key]
                raise
        return fut.result()

    def _read_range(self, name: str, offset: int, length: int) -> bytes:

        def get() -> bytes:
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(name),
                                           Range=f"bytes={offset}-{offset + length - 1}")
            except self._bx.ClientError as e:
                if e.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # entirely past the end, like pread
                raise
            body = r["Body"].read()
            cr = r.get("ContentRange")
            if cr:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", cr.strip())
                want = int(m.group(2)) - int(m.group(1)) + 1 if m else len(body)
                if m and int(m.group(1)) != offset:
                    raise _Truncated(f"{name}: asked for offset {offset}, got {cr}")
            else:  # the server ignored the range: it sent the whole object
                want = int(r.get("ContentLength", len(body)))
                if len(body) == want:
                    body = body[offset:offset + length]
                    want = len(body)
            if len(body) != want or len(body) > length:
                raise _Truncated(f"{name}: got {len(body)} of {want} bytes")
            return body

        body = self._call("read", name, get)
        self.download_limit.take(len(body))
        return body

    def _head(self, name: str) -> dict | None:
        def head() -> dict | None:
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            except self._bx.ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        return self._call("stat", name, head)

    def size(self, name: str) -> int:
        h = self._head(name)
        if h is None:
            raise ObjectMissing(f"repository object missing: {name}")
        return int(h["ContentLength"])

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def write(self, name: str, data: bytes) -> None:
        data = bytes(data)
        md5 = self._md5(data)
        self.upload_limit.take(len(data))
        self._call("write", name, lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(name), Body=data, ContentMD5=md5, ContentLength=len(data)))
        if self.cache is not None and self.cache.cacheable(name):
            self.cache.put(name, data)
            self._sizes[name] = len(data)

    def write_file(self, name: str, path: str) -> None:
        try:
            size = os.path.getsize(path)
            if size <= self.multipart_threshold:
                with open(path, "rb") as f:
                    data = f.read()
                self.write(name, data)
            else:
                self._multipart(name, path, size)
            os.unlink(path)
        except OSError as e:
            raise RepositoryError(f"cannot upload {name}: {e.strerror or e}") from None

    def _multipart(self, name: str, path: str, size: int) -> None:
        key = self._key(name)
        up = self._call("start upload", name,
                        lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=key))["UploadId"]
        nparts = (size + self.part_size - 1) // self.part_size
        fd = os.open(path, os.O_RDONLY)

        def part(i: int) -> dict[str, Any]:
            off = i * self.part_size
            data = os.pread(fd, min(self.part_size, size - off), off)
            md5 = self._md5(data)
            self.upload_limit.take(len(data))
            r = self._call("upload part", f"{name} (part {i + 1}/{nparts})", lambda: self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=up, PartNumber=i + 1, Body=data, ContentMD5=md5,
                ContentLength=len(data)))
            return {"ETag": r["ETag"], "PartNumber": i + 1}

        def complete() -> None:
            try:
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=up,
                                                      MultipartUpload={"Parts": parts})
            except self._bx.ClientError as e:
                # A retry after a completion whose answer was lost: the object is there.
                if e.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    h = self._head(name)
                    if h is not None and int(h["ContentLength"]) == size:
                        return
                raise

        try:
            with self._lock:
                if self._parts is None:
                    self._parts = cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="vmbak-s3-part")
                pool = self._parts
            parts = list(pool.map(part, range(nparts)))
            self._call("finish upload", name, complete)
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=up)
            except Exception:  # noqa: BLE001 - best effort; stale uploads are aborted later
                pass
            raise
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        self._call("delete", name, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(name)))
        self._sizes.pop(name, None)
        if self.cache is not None and self.cache.cacheable(name):
            self.cache.drop(name)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        directory = prefix.strip("/")
        full = self.prefix + (f"{directory}/" if directory else "")
        token: str | None = None
        seen: set[str] = set()
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("list", f"{directory or '/'}", lambda kw=kw: self.client.list_objects_v2(**kw))
            for obj in page.get("Contents", []) or []:
                name = obj["Key"][len(self.prefix):]
                if any(part.startswith(".") for part in name.split("/")) or name.endswith("/"):
                    continue
                size = int(obj["Size"])
                self._sizes[name] = size
                seen.add(name)
                yield name, size
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
            if not token:
                break
        if self.cache is not None and directory in ("index", "snapshots"):
            self.cache.retain(directory, seen)

    def temp_path(self, hint: str) -> str:
        if self._tmpdir is None:
            d = os.path.join(cache_root(), "tmp")
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
            except OSError:
                import tempfile

                d = tempfile.gettempdir()
            self._tmpdir = d
        host = socket.gethostname().replace("-", "_")
        return os.path.join(self._tmpdir, f"{hint}-{host}-{os.getpid()}-{os.urandom(6).hex()}")

    # ------------------------------------------------------------------ S3-only helpers
    def attach_cache(self, repo_id: str) -> None:
        """Cache index files and manifests of the repository with this id (see repo/cache.py)."""
        if re.fullmatch(r"[0-9a-f]{16,128}", repo_id) and os.environ.get("VMBAK_CACHE_DIR") != "off":
            self.cache = ObjectCache(os.path.join(cache_root(), repo_id))

    def check_bucket(self) -> None:
        """Raise a clear error unless the bucket exists and the credentials work."""
        def head() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except self._bx.ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchBucket", "NotFound"):
                    e.response["Error"]["Code"] = "NoSuchBucket"
                raise

        self._call("check", f"bucket {self.bucket}", head)

    def first_object(self) -> str | None:
        """The name of some object under the prefix, or None if there is none."""
        page = self._call("list", "/", lambda: self.client.list_objects_v2(
            Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1))
        for obj in page.get("Contents", []) or []:
            return obj["Key"][len(self.prefix):]
        return None

    def bucket_exists(self) -> bool:
        """Whether the bucket exists (a clear error if the credentials or the endpoint fail)."""
        missing = False

        def head() -> None:
            nonlocal missing
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except self._bx.ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket", "NotFound"):
                    missing = True
                    return
                raise

        self._call("check", f"bucket {self.bucket}", head)
        return not missing

    def create_bucket(self) -> None:
        """Create the bucket, in the client's region (as restic's init does)."""
        kw: dict[str, Any] = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        if region and region != "us-east-1":  # us-east-1 is the default, and refuses to be named
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}

        def create() -> None:
            try:
                self.client.create_bucket(**kw)
            except self._bx.ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) != "BucketAlreadyOwnedByYou":
                    raise

        self._call("create", f"bucket {self.bucket}", create)
        self.created_bucket = True

    def prepare_init(self) -> None:
        """Create the bucket if it does not exist; refuse to create a repository where
        something already is."""
        if not self.bucket_exists():
            self.create_bucket()
            return
        first = self.first_object()
        if first is not None:
            if self.exists("config"):
                raise RepositoryError(f"a repository already exists at {self.location}")
            raise RepositoryError(f"cannot create a repository at {self.location}: the bucket/prefix is not "
                                  f"empty (it holds {first!r}, not a vmbak repository)")

    def clean_stale_temp(self) -> int:
        """Remove local temp files of dead processes of this host and abort multipart uploads
        under the prefix that were started more than a day ago (a killed upload); return
        how many local files were removed."""
        if self._tmpdir is None:
            self.temp_path("probe")
        assert self._tmpdir is not None
        removed = remove_dead_temp_files(self._tmpdir)
        try:
            r = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
            now = datetime.now(UTC)
            for u in r.get("Uploads", []) or []:
                started = u.get("Initiated")
                if isinstance(started, datetime) and (now - started).total_seconds() > STALE_UPLOAD_S:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
        except Exception:  # noqa: BLE001 - housekeeping only
            pass
        return removed

    def close(self) -> None:
        if self._parts is not None:
            self._parts.shutdown(wait=False)
            self._parts = None
