"""Shared fixtures for vmbak's tests: the real CLI, real repositories, real disk images.

Nothing here mocks vmbak. Commands run as subprocesses of the installed package
(``python -m vmbak.cli.main``, the same code as ``.venv/bin/vmbak``); disks are real files
(random data, sparse files, ext4 images built with ``mkfs.ext4 -d``).

Fixtures (use them as arguments; helpers are reached through fixtures, never imported
from this file, so several ``conftest.py`` files can live side by side):

* ``run_vmbak(*args, env=None, check=True, stdin=DEVNULL, timeout=...)`` -> CompletedProcess;
  ``popen_vmbak(*args, env=None, **popen_kw)`` -> Popen (env values of None unset a variable;
  VMBAK_* variables of the caller never leak in)
* ``assert_cli_error(proc, *fragments)``: exactly one line on stderr starting with
  ``vmbak: error:``, a non-zero exit and no traceback
* ``json_result(stdout)`` -> what a ``--json`` command printed: a reporting command's one
  document, or the ``summary`` message that ends a long-running command's JSON lines
  (checked: every line is one JSON object and all before the last are ``status``
  messages; see docs/json.md)
* ``make_repo(encryption="none", pack_size=None, password=...)`` -> ``VmbakRepo`` (``.run``,
  ``.json``, ``.backup``, ``.restore``, ``.snapshots``, ``.stats``, ``.check``, ``.open`` for
  the library, ``.pack_files``); ``repo`` (unencrypted) and ``encrypted_repo`` are ready-made;
  ``init_repo(path, ...)`` is the session-scoped form for wider-scoped fixtures
* ``make_disk(name, size, seed=..., fill="random"|"zero"|"sparse")`` -> ``DiskImage`` (``.write``,
  ``.write_random``, ``.write_zeros``, ``.punch_hole``, ``.resize``, ``.save(label)`` keeps a
  copy, ``.version(label)``); ``new_disk(directory, ...)`` is the session-scoped form
* ``make_ext4(name, size, seed=...)`` -> (``DiskImage``, {path: content}) of a real ext4
  filesystem built on a file pre-filled with random bytes (``mkfs.ext4 -q -F -E nodiscard -d``);
  ``debugfs(image, request, write=False)`` changes or reads it without mounting;
  ``e2fsck_clean(image)`` -> (ok, report)
* ``random_bytes(n, seed)`` -> bytes (numpy's PCG64, fast and reproducible)
* ``assert_same_file(a, b)``, ``changed_extents(a_bytes, b_bytes, bs)``, ``sha256_file(path)``
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest


def _worker_tmpdir() -> None:
    """Under pytest-xdist each worker gets its own short TMPDIR, so that checks for
    leftover private directories and daemons see only their own worker's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    d = f"/tmp/vmbak-t-{worker}"
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o1777)  # libvirt's QEMU (another user) must reach sockets under it
    os.environ["TMPDIR"] = d
    import tempfile

    tempfile.tempdir = None


_worker_tmpdir()

VMBAK_CMD = [sys.executable, "-m", "vmbak.cli.main"]
BLOCK = 64 * 1024
MiB = 1 << 20
DEFAULT_PASSWORD = "correct horse battery staple"
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


# ---------------------------------------------------------------------------- processes
def _base_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a vmbak subprocess: no VMBAK_* leaks in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
    return env


def run_vmbak(*args: object, env: dict[str, str | None] | None = None, check: bool = True,
              stdin: int | None = subprocess.DEVNULL, timeout: float = 300,
              cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real vmbak command line; with ``check``, fail the test on a non-zero exit."""
    cmd = [*VMBAK_CMD, *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args)]
    proc = subprocess.run(cmd, env=_base_env(env), stdin=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"vmbak {' '.join(cmd[3:])} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def popen_vmbak(*args: object, env: dict[str, str | None] | None = None, **kw) -> subprocess.Popen[str]:  # noqa: ANN003
    """Start the real vmbak command line without waiting for it."""
    cmd = [*VMBAK_CMD, *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args)]
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(cmd, env=_base_env(env), text=True, **kw)


def assert_cli_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """A user error: non-zero exit, exactly one line ``vmbak: error: ...`` on stderr, no
    traceback anywhere, and every fragment (case-insensitive) in that line. Returns the line."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, f"traceback:\n{out}"
    assert proc.returncode != 0, f"expected a failure, got exit 0\n{out}"
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("vmbak: error:"), f"error line has the wrong form: {line!r}"
    for frag in fragments:
        assert frag.lower() in line.lower(), f"{frag!r} not in error line {line!r}"
    return line


def json_result(stdout: str) -> object:
    """What a ``--json`` command printed (docs/json.md): the one JSON document of a
    reporting command, or the last line, the ``summary`` message, of a long-running
    command's JSON lines, after checking that every other line is a ``status`` message."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        pass
    try:
        msgs = [json.loads(line) for line in stdout.splitlines()]
    except json.JSONDecodeError as e:
        raise AssertionError(f"--json printed neither one JSON document nor JSON lines ({e}):\n{stdout}") from None
    assert msgs, "--json printed nothing"
    for m in msgs[:-1]:
        assert isinstance(m, dict) and m.get("message_type") == "status", f"not a status message: {m}"
    assert isinstance(msgs[-1], dict) and msgs[-1].get("message_type") == "summary", f"no summary last:\n{stdout}"
    return msgs[-1]


def tool(name: str) -> str:
    """Absolute path of a system tool (mkfs.ext4 lives in /usr/sbin, often not on PATH)."""
    found = shutil.which(name) or next((os.path.join(d, name) for d in TOOL_DIRS
                                        if os.access(os.path.join(d, name), os.X_OK)), None)
    assert found, f"{name} is not installed (scripts/setup.sh installs it)"
    return found


# ---------------------------------------------------------------------------- data
def random_bytes(n: int, seed: int) -> bytes:
    """``n`` reproducible incompressible bytes."""
    return np.random.default_rng(seed).bytes(n)


def text_bytes(n: int, seed: int) -> bytes:
    """``n`` reproducible compressible, text-like bytes."""
    rng = np.random.default_rng(seed)
    words = [b"block", b"vmbak", b"disk", b"sector", b"backup", b"extent", b"chunk", b"inode",
             b"journal", b"the", b"of", b"and", b"\n"]
    idx = rng.integers(0, len(words), size=n // 4 + 16)
    out = b" ".join(words[i] for i in idx.tolist())
    return out[:n]


def flip_byte(path: str | os.PathLike[str], offset: int, mask: int = 0x40) -> None:
    """Flip bits of one byte of a file in place (flipped again, the byte is as it was)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def changed_extents(a: bytes, b: bytes, bs: int = BLOCK) -> list[tuple[int, int]]:
    """The runs of ``bs``-blocks that differ between two equally long images, as
    (offset, length); the last run is cut at the end of the image."""
    assert len(a) == len(b)
    n = (len(a) + bs - 1) // bs
    diff = [a[i * bs:(i + 1) * bs] != b[i * bs:(i + 1) * bs] for i in range(n)]
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if diff[i]:
            j = i
            while j < n and diff[j]:
                j += 1
            out.append((i * bs, min(j * bs, len(a)) - i * bs))
            i = j
        else:
            i += 1
    return out


def first_difference(a: str | os.PathLike[str], b: str | os.PathLike[str], bs: int = BLOCK) -> str | None:
    """None if the files are identical, else a description of the first differing block."""
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa != sb:
        return f"sizes differ: {a} has {sa} bytes, {b} has {sb}"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                for i in range(0, len(x), bs):
                    if x[i:i + bs] != y[i:i + bs]:
                        return f"block {(off + i) // bs} (offset {off + i}) differs"
            if not x:
                return None
            off += len(x)


def assert_same_file(restored: str | os.PathLike[str], expected: str | os.PathLike[str]) -> None:
    d = first_difference(restored, expected)
    assert d is None, f"{restored} is not byte-identical to {expected}: {d}"


# ---------------------------------------------------------------------------- disks
@dataclass
class DiskImage:
    """A raw disk image file that tests change between backups; ``save(label)`` keeps a copy
    of the current content so restores can be compared with it later."""

    path: Path
    versions_dir: Path
    versions: dict[str, Path] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        finally:
            os.close(fd)

    def write_random(self, offset: int, length: int, seed: int) -> None:
        self.write(offset, random_bytes(length, seed))

    def write_zeros(self, offset: int, length: int) -> None:
        """Write zeros (the blocks stay allocated: zero detection must catch them)."""
        self.write(offset, bytes(length))

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range (it then reads as zeros and SEEK_DATA skips it)."""
        subprocess.run([tool("fallocate"), "--punch-hole", "--offset", str(offset), "--length",
                        str(length), os.fspath(self.path)], check=True)

    def resize(self, size: int) -> None:
        os.truncate(self.path, size)

    def allocated_bytes(self) -> int:
        return self.path.stat().st_blocks * 512

    def save(self, label: str) -> Path:
        """Keep a copy of the current content under ``label``; return its path."""
        dest = self.versions_dir / f"{self.path.name}.{label}"
        shutil.copyfile(self.path, dest)
        self.versions[label] = dest
        return dest

    def version(self, label: str) -> Path:
        return self.versions[label]


def _new_disk(directory: Path, name: str, size: int, seed: int, fill: str) -> DiskImage:
    path = directory / name
    vdir = directory / f"{name}.versions"
    vdir.mkdir(parents=True, exist_ok=True)
    if fill == "random":
        path.write_bytes(random_bytes(size, seed))
    elif fill == "zero":  # zeros actually written, not a hole
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 4 * MiB)
                f.write(bytes(n))
                left -= n
    elif fill == "sparse":
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        raise ValueError(fill)
    return DiskImage(path, vdir)


def make_ext4_tree(root: Path, seed: int, scale: int = 1) -> dict[str, bytes]:
    """Populate ``root`` with a mix of text, random, duplicate, empty and nested files;
    return {relative path: content}."""
    files = {
        "etc/hostname": b"web01\n",
        "etc/services.txt": text_bytes(300_000 * scale, seed),
        "var/log/syslog": text_bytes(700_000 * scale, seed + 1),
        "data/random-1.bin": random_bytes(2 * MiB * scale, seed + 2),
        "data/random-2.bin": random_bytes(1 * MiB * scale + 12_345, seed + 3),
        "data/copy-of-random-1.bin": random_bytes(2 * MiB * scale, seed + 2),
        "data/empty": b"",
        "home/user/deep/nested/dir/note.txt": b"hello from inside an ext4 image\n" * 100,
    }
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return files


def build_ext4_image(path: Path, size: int, srcdir: Path, seed: int) -> None:
    """A real ext4 image of ``srcdir`` on a file pre-filled with random bytes (so free
    space holds garbage, as on a used disk)."""
    path.write_bytes(random_bytes(size, seed))
    subprocess.run([tool("mkfs.ext4"), "-q", "-F", "-E", "nodiscard", "-d", os.fspath(srcdir),
                    os.fspath(path)], check=True, capture_output=True)


def debugfs(image: str | os.PathLike[str], request: str, write: bool = False) -> str:
    """Run one debugfs request on an unmounted ext4 image (changes it when ``write``)."""
    cmd = [tool("debugfs")] + (["-w"] if write else []) + ["-R", request, os.fspath(image)]
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return p.stdout


def e2fsck_clean(image: str | os.PathLike[str]) -> tuple[bool, str]:
    p = subprocess.run([tool("e2fsck"), "-fn", os.fspath(image)], capture_output=True, text=True)
    return p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------------------- repositories
@dataclass
class VmbakRepo:
    """A repository created with ``vmbak init``, driven through the real CLI."""

    path: Path
    encryption: str
    password: str | None
    # more environment for every command run on it (e.g. VMBAK_INDEX_PAGED_ROWS)
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str | None) -> dict[str, str | None]:
        e: dict[str, str | None] = {"VMBAK_REPOSITORY": os.fspath(self.path), **self.extra_env}
        if self.password is not None:
            e["VMBAK_PASSWORD"] = self.password
        e.update(extra)
        return e

    def run(self, *args: object, env: dict[str, str | None] | None = None, check: bool = True,
            **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
        return run_vmbak(*args, env={**self.env(), **(env or {})}, check=check, **kw)

    def json(self, *args: object, **kw) -> object:  # noqa: ANN003
        p = self.run(*args, "--json", **kw)
        return json_result(p.stdout)

    def backup(self, disk: DiskImage | str | os.PathLike[str], name: str, *extra: object) -> dict:
        path = disk.path if isinstance(disk, DiskImage) else disk
        return self.json("backup", path, "--name", name, *extra)  # type: ignore[return-value]

    def restore(self, spec: str, target: str | os.PathLike[str], *extra: object) -> dict:
        return self.json("restore", spec, target, *extra)  # type: ignore[return-value]

    def snapshots(self, *extra: object) -> list[dict]:
        return self.json("snapshots", *extra)  # type: ignore[return-value]

    def stats(self, snapshot: str | None = None) -> dict:
        return self.json("stats", *([snapshot] if snapshot else []))  # type: ignore[return-value]

    def check(self, read_data: bool = True, ok: bool = True) -> dict:
        p = self.run("check", "--json", *(["--read-data"] if read_data else []), check=False)
        rep = json_result(p.stdout)
        if ok:
            assert p.returncode == 0 and rep["ok"], f"check failed:\n{p.stdout}\n{p.stderr}"
        return rep

    def open(self):  # noqa: ANN201 - a vmbak.Repository, opened by the library in this process
        import vmbak

        return vmbak.Repository.open(os.fspath(self.path), self.password)

    def pack_files(self) -> list[Path]:
        return sorted(p for p in (self.path / "data").rglob("*") if p.is_file())

    def pack_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.pack_files())

    def take_blobs(self, lib) -> list[tuple[bytes, bytes, int]]:  # noqa: ANN001 - a vmbak.Repository of it
        """Every chunk's sealed blob (id, blob, raw length); then its packs and index files
        are deleted. The caller writes the blobs into new packs, which the next command
        finds through their headers (as after a crash)."""
        blobs = [(c, lib.backend.read_range(f"data/{lc.pack[:2]}/{lc.pack}", lc.offset, lc.length), lc.raw_length)
                 for c, lc in lib.index.items()]
        for p in self.pack_files():
            p.unlink()
        for p in (self.path / "index").iterdir():
            p.unlink()
        return blobs

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(name="run_vmbak")
def _run_vmbak_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_vmbak


@pytest.fixture(name="popen_vmbak")
def _popen_vmbak_fixture() -> Callable[..., subprocess.Popen[str]]:
    return popen_vmbak


@pytest.fixture(name="assert_cli_error")
def _assert_cli_error_fixture() -> Callable[..., str]:
    return assert_cli_error


@pytest.fixture(name="json_result")
def _json_result_fixture() -> Callable[[str], object]:
    return json_result


@pytest.fixture(name="random_bytes")
def _random_bytes_fixture() -> Callable[[int, int], bytes]:
    return random_bytes


def init_repo(path: str | os.PathLike[str], encryption: str = "none", pack_size: int | None = None,
              password: str | None = DEFAULT_PASSWORD, chunk_size: int | None = None,
              chunk_id: str | None = None) -> VmbakRepo:
    """``vmbak init`` a repository at ``path``; return a VmbakRepo driving it. ``chunk_id``
    "blake3" makes a version-2 repository (the chunk ids of earlier versions)."""
    pw = password if encryption != "none" else None
    args: list[object] = ["-r", path, "init", "--encryption", encryption]
    if chunk_id:
        args += ["--chunk-id", chunk_id]
    if pack_size:
        args += ["--pack-size", pack_size]
    if chunk_size:
        args += ["--chunk-size", chunk_size]
    run_vmbak(*args, env={"VMBAK_PASSWORD": pw} if pw else None)
    return VmbakRepo(Path(path), encryption, pw)


@pytest.fixture(scope="session", name="init_repo")
def _init_repo_fixture() -> Callable[..., VmbakRepo]:
    """``init_repo(path, encryption="none", pack_size=None, password=...)``: for module- or
    session-scoped fixtures (tmp_path_factory); tests use ``make_repo``."""
    return init_repo


@pytest.fixture(scope="session", name="new_disk")
def _new_disk_fixture() -> Callable[..., DiskImage]:
    """``new_disk(directory, name, size, seed=1, fill="random")``: for wider-scoped fixtures."""
    def _make(directory: str | os.PathLike[str], name: str, size: int, seed: int = 1,
              fill: str = "random") -> DiskImage:
        return _new_disk(Path(directory), name, size, seed, fill)

    return _make


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., VmbakRepo]:
    """Factory: ``make_repo(encryption="none"|"aes-256-gcm", pack_size=None, password=..., name="repo",
    chunk_size=None, chunk_id=None)``."""
    def _make(encryption: str = "none", pack_size: int | None = None, password: str | None = DEFAULT_PASSWORD,
              name: str = "repo", chunk_size: int | None = None, chunk_id: str | None = None) -> VmbakRepo:
        return init_repo(tmp_path / name, encryption, pack_size, password, chunk_size, chunk_id)

    return _make


@pytest.fixture
def repo(make_repo: Callable[..., VmbakRepo]) -> VmbakRepo:
    """An unencrypted repository (fast to open)."""
    return make_repo("none")


@pytest.fixture
def encrypted_repo(make_repo: Callable[..., VmbakRepo]) -> VmbakRepo:
    return make_repo("aes-256-gcm", name="enc-repo")


@pytest.fixture
def make_disk(tmp_path: Path) -> Callable[..., DiskImage]:
    """Factory: ``make_disk(name, size, seed=1, fill="random"|"zero"|"sparse")``."""
    d = tmp_path / "disks"
    d.mkdir(exist_ok=True)

    def _make(name: str, size: int, seed: int = 1, fill: str = "random") -> DiskImage:
        return _new_disk(d, name, size, seed, fill)

    return _make


@pytest.fixture
def make_ext4(tmp_path: Path) -> Callable[..., tuple[DiskImage, dict[str, bytes]]]:
    """Factory: ``make_ext4(name, size=32 MiB, seed=7)`` -> (DiskImage, {path: content})."""
    d = tmp_path / "disks"
    d.mkdir(exist_ok=True)

    def _make(name: str = "ext4.img", size: int = 32 * MiB, seed: int = 7,
              scale: int = 1) -> tuple[DiskImage, dict[str, bytes]]:
        src = tmp_path / f"{name}.src"
        files = make_ext4_tree(src, seed, scale)
        path = d / name
        build_ext4_image(path, size, src, seed + 100)
        vdir = d / f"{name}.versions"
        vdir.mkdir(exist_ok=True)
        return DiskImage(path, vdir), files

    return _make


@pytest.fixture(name="debugfs")
def _debugfs_fixture() -> Callable[..., str]:
    return debugfs


@pytest.fixture(name="e2fsck_clean")
def _e2fsck_fixture() -> Callable[..., tuple[bool, str]]:
    return e2fsck_clean


@pytest.fixture(name="assert_same_file")
def _assert_same_file_fixture() -> Callable[..., None]:
    return assert_same_file


@pytest.fixture(name="changed_extents")
def _changed_extents_fixture() -> Callable[..., list[tuple[int, int]]]:
    return changed_extents


@pytest.fixture(name="sha256_file")
def _sha256_fixture() -> Callable[..., str]:
    return sha256_file
