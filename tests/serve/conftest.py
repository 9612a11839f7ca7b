"""Fixtures for the serve/browse/mount tests: real servers, real filesystem images.

* ``start_serve(repo, *args)`` -> (Popen, info dict): ``vmbak serve ... --json`` in the
  foreground, returned once it prints that it is ready; stopped with SIGTERM at test end
  (and asserted to exit 0)
* ``nbd_uri(sock)``; ``tool(name)``; ``run(*cmd)``
* ``build_fs(kind, path, size, files, symlinks)``: ext4 (mkfs.ext4 -d), xfs (mkfs.xfs -p
  protofile), ntfs (mkntfs + ntfs-3g FUSE mount), fat (mkfs.vfat + mcopy) images, without
  mounting anything but ntfs-3g
* ``assemble_disk(path, scheme, images)``: an MBR or GPT disk holding the images as
  partitions; returns their byte offsets
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MiB = 1 << 20
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
XFS_SMALL_ENV = {**os.environ, "TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def tool(name: str) -> str:
    found = shutil.which(name) or next((os.path.join(d, name) for d in TOOL_DIRS
                                        if os.access(os.path.join(d, name), os.X_OK)), None)
    assert found, f"{name} is not installed (scripts/setup.sh installs it)"
    return found


def run(*args: object, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    if "/" not in cmd[0]:
        cmd[0] = tool(cmd[0])
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def nbd_uri(sock: str | os.PathLike[str]) -> str:
    return f"nbd+unix:///?socket={os.fspath(sock)}"


# ---------------------------------------------------------------------------- filesystems
def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _protofile(tree: Path, out: Path) -> Path:
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        for p in sorted(d.iterdir()):
            ind = " " * depth
            if p.is_dir():
                lines.append(f"{ind}{p.name} d--750 0 0")
                walk(p, depth + 1)
                lines.append(f"{ind}$")
            else:
                lines.append(f"{ind}{p.name} ---640 0 0 {p}")

    walk(tree, 1)
    lines.append("$")
    out.write_text("\n".join(lines) + "\n")
    return out


def build_fs(kind: str, path: Path, size: int, files: dict[str, bytes],
             symlinks: dict[str, str] | None = None) -> Path:
    """A ``kind`` filesystem image of ``size`` bytes holding ``files`` (and, for ext4,
    ``symlinks``) on a file pre-filled with garbage."""
    import numpy as np

    path.write_bytes(np.random.default_rng(len(files) + size).bytes(size))
    src = Path(tempfile.mkdtemp(prefix="vmbak-src-", dir=path.parent))
    try:
        _write_tree(src, files)
        for rel, target in (symlinks or {}).items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, src / rel)
        if kind == "ext4":
            run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", src, path)
        elif kind == "xfs":
            run("mkfs.xfs", "-q", "-f", "-K", "-p", _protofile(src, path.with_suffix(".proto")), path,
                env=XFS_SMALL_ENV)
        elif kind == "fat":
            run("mkfs.vfat", "-F", "16", "-n", "VMBAKFAT", path)
            for d in sorted({str(Path(r).parent) for r in files if str(Path(r).parent) != "."}):
                parts = Path(d).parts
                for i in range(1, len(parts) + 1):
                    run("mmd", "-D", "s", "-i", path, "::/" + "/".join(parts[:i]), check=False)
            for rel in files:
                run("mcopy", "-m", "-i", path, src / rel, "::/" + rel)
        elif kind == "ntfs":
            run("mkntfs", "-q", "-F", "-f", path)
            mnt = Path(tempfile.mkdtemp(prefix="vmbak-mnt-"))
            try:
                run("ntfs-3g", path, mnt)
                try:
                    _write_tree(mnt, files)
                    for rel in files:  # mtimes as in the source tree
                        st = os.stat(src / rel)
                        os.utime(mnt / rel, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    run("fusermount", "-u", mnt)
            finally:
                shutil.rmtree(mnt, ignore_errors=True)
        else:
            raise ValueError(kind)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return path


def assemble_disk(path: Path, scheme: str, images: list[tuple[Path, str]]) -> list[int]:
    """A ``scheme`` ("gpt" or "mbr") disk with each (image, type) as a partition, 1 MiB
    aligned, with 1 MiB of zeros after the last one. Returns the partitions' byte offsets."""
    offsets = []
    pos = MiB
    lines = [f"label: {'gpt' if scheme == 'gpt' else 'dos'}"]
    for img, ptype in images:
        size = img.stat().st_size
        offsets.append(pos)
        lines.append(f"start={pos // 512}, size={size // 512}, type={ptype}")
        pos += (size + MiB - 1) // MiB * MiB
    total = pos + 2 * MiB
    with open(path, "wb") as f:
        f.truncate(total)
    subprocess.run([tool("sfdisk"), "-q", os.fspath(path)], input="\n".join(lines) + "\n", text=True,
                   check=True, capture_output=True)
    with open(path, "r+b") as f:
        for (img, _), off in zip(images, offsets, strict=True):
            f.seek(off)
            with open(img, "rb") as src:
                shutil.copyfileobj(src, f, 4 * MiB)
    return offsets


# ---------------------------------------------------------------------------- servers
_VMBAK = [sys.executable, "-m", "vmbak.cli.main"]


def _env(repo: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.update({k: v for k, v in repo.env().items() if v is not None})  # type: ignore[attr-defined]
    return env


@pytest.fixture
def start_serve() -> Iterator[Callable[..., tuple[subprocess.Popen[str], dict]]]:
    procs: list[subprocess.Popen[str]] = []

    def _start(repo: object, *args: object, expect_ready: bool = True) -> tuple[subprocess.Popen[str], dict]:
        cmd = [*_VMBAK, "serve", *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args), "--json"]
        p = subprocess.Popen(cmd, env=_env(repo), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not expect_ready:
            return p, {}
        assert line, f"vmbak serve did not start: {p.stderr.read() if p.stderr else ''}"
        return p, json.loads(line)

    yield _start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise AssertionError("vmbak serve did not stop on SIGTERM") from None
        if p.stdout:
            p.stdout.close()
        if p.stderr:
            p.stderr.close()


def stop_serve(p: subprocess.Popen[str]) -> str:
    """SIGTERM a server, assert a clean exit; return its stderr."""
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, f"vmbak serve exited {p.returncode}:\n{err}"
    assert "Traceback" not in err, err
    return err


@pytest.fixture(name="stop_serve")
def _stop_serve_fixture() -> Callable[[subprocess.Popen[str]], str]:
    return stop_serve


@pytest.fixture(name="fs_tools")
def _fs_tools() -> dict[str, Callable[..., object]]:
    return {"build_fs": build_fs, "assemble_disk": assemble_disk, "run": run, "nbd_uri": nbd_uri}
