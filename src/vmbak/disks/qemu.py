"""Image files (qcow2 with backing chains, vhdx, vpc/VHD, vmdk, ...) through QEMU.

Reading: ``open_image`` asks ``qemu-img info`` for the format. Raw files stay a
``RawDisk``. Any other format is opened read-only by a private ``qemu-storage-daemon``
that exports it over NBD on a unix socket in a private temporary directory; the
``ImageDisk`` reads it with libnbd (``NbdDisk``) and learns from ``base:allocation``
which ranges are unallocated or zero, so they are never read. The daemon is stopped
when the disk is closed, on errors and on KeyboardInterrupt; it lives in its own
session (a terminal's ^C reaches vmbak only) and, when started from the main thread,
dies with vmbak even if vmbak is killed.

Why QEMU and not a Python reader of the formats: QEMU is the reference
implementation of every one of them (compressed and zero clusters, subclusters,
backing chains of mixed formats, vmdk extents and stream-optimized grains, vhdx
logs that must be replayed), it reports allocation through NBD block status, and its
reads run in C threads outside the GIL.

Writing: ``ImageRestoreTarget`` builds a new image of the chosen format under a hidden
partial directory next to the target, writes it through a writable export of a
private daemon (zero blocks are never written: the image stays thin), and on commit
flushes, stops the daemon cleanly, checks the image and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator

from vmbak.disks.nbd import NbdDisk, NbdWriter
from vmbak.disks.raw import RawDisk, check_disk_path
from vmbak.engine.restore import (
    RestoreTarget,
    TargetLock,
    check_landed,
    partial_name,
    remove_dead_partials,
)
from vmbak.errors import DiskError
from vmbak.interrupts import deferred, register_cleanup, unregister_cleanup

# Formats read through QEMU. Raw is read directly.
READ_FORMATS = ("qcow2", "vhdx", "vpc", "vmdk", "qed", "vdi")
# Formats a restore can write.
WRITE_FORMATS = ("raw", "qcow2", "vhdx", "vpc", "vmdk")
# What the names users give mean in qemu's terms.
FORMAT_ALIASES = {"vhd": "vpc", "img": "raw"}
# Creation options per format: dynamic (thin) images, exact virtual size.
CREATE_OPTIONS = {
    "qcow2": {},
    "vhdx": {"subformat": "dynamic"},
    "vpc": {"subformat": "dynamic", "force_size": "on"},
    "vmdk": {"subformat": "monolithicSparse"},
}
_NAMED_LIKE = {".qcow2": "qcow2", ".qcow": "qcow2", ".vhdx": "vhdx", ".vhd": "vpc", ".vmdk": "vmdk",
               ".vdi": "vdi", ".qed": "qed"}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# Seconds a run of ``qemu-img SUBCOMMAND`` may take; $VMBAK_TOOL_TIMEOUT (seconds) replaces
# them all, e.g. for very slow storage. A run that takes longer is killed and reported.
TOOL_TIMEOUTS = {"info": 60.0, "map": 300.0, "create": 300.0, "check": 1800.0}
DEFAULT_TOOL_TIMEOUT = 300.0


def _tool(name: str) -> str:
    found = shutil.which(name) or next((os.path.join(d, name) for d in ("/usr/bin", "/usr/sbin", "/bin")
                                        if os.access(os.path.join(d, name), os.X_OK)), None)
    if not found:
        pkg = "qemu-system-common" if name == "qemu-storage-daemon" else "qemu-utils"
        raise DiskError(f"{name} is not installed (Debian package {pkg})")
    return found


def _qemu_message(text: str, tool: str = "") -> str:
    """The error of a QEMU tool's stderr as one line, without the tool's name prefix."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    out = []
    for ln in lines:
        for prefix in ("qemu-img: ", "qemu-storage-daemon: ", "qemu-nbd: ", f"{tool}: " if tool else "\0"):
            if ln.startswith(prefix):
                ln = ln[len(prefix):]
        if ln.startswith("--blockdev ") or ln.startswith("--export ") or ln.startswith("--nbd-server "):
            ln = ln.split(": ", 1)[1] if ": " in ln else ln
        out.append(ln)
    return " ".join(out) or "unknown error"


def normalize_format(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    fmt = fmt.strip().lower()
    return FORMAT_ALIASES.get(fmt, fmt)


def tool_timeout(subcommand: str) -> float:
    """How long ``qemu-img SUBCOMMAND`` may run (``TOOL_TIMEOUTS``, or $VMBAK_TOOL_TIMEOUT)."""
    env = os.environ.get("VMBAK_TOOL_TIMEOUT")
    if env:
        try:
            t = float(env)
        except ValueError:
            t = 0.0
        if not t > 0:
            raise DiskError(f"VMBAK_TOOL_TIMEOUT must be a number of seconds, not {env!r}")
        return t
    return TOOL_TIMEOUTS.get(subcommand, DEFAULT_TOOL_TIMEOUT)


def run_qemu_img(args: list[str], what: str) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img ARGS`` (stdin closed, output captured) under its timeout; a DiskError
    ``WHAT: qemu-img SUBCOMMAND did not finish within N s`` when it takes longer (it is
    killed). The exit status is the caller's to check."""
    timeout = tool_timeout(args[0])
    try:
        return subprocess.run([_tool("qemu-img"), *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DiskError(f"{what}: qemu-img {args[0]} did not finish within {timeout:g} s and was stopped "
                        "(is a file of the image a FIFO, or is its storage not answering?)") from None


def _run_qemu_img(args: list[str], what: str) -> subprocess.CompletedProcess[str]:
    p = run_qemu_img(args, what)
    if p.returncode != 0:
        raise DiskError(f"{what}: {_qemu_message(p.stderr, 'qemu-img')}")
    return p


def image_info(path: str, fmt: str | None = None, *, backing_chain: bool = False) -> dict | list:
    """``qemu-img info --output=json`` (with ``-U``: it never takes a lock)."""
    args = ["info", "--output=json", "-U"]
    if backing_chain:
        args.append("--backing-chain")
    if fmt:
        args += ["-f", fmt]
    p = _run_qemu_img([*args, "--", path], f"cannot open image {path}")
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        raise DiskError(f"cannot open image {path}: qemu-img info printed no JSON") from None


def _check_path(path: str) -> str:
    check_disk_path(path)  # never hand qemu-img a FIFO, socket, directory or character device
    if not os.access(path, os.R_OK):
        raise DiskError(f"cannot read disk {path}: permission denied")
    return os.path.abspath(path)


def _bad_backing(path: str, fmt: str | None) -> str | None:
    """Walk the backing chain file by file (each ``qemu-img info`` opens one file only);
    what is wrong with the first backing file that is missing or is not a file a disk
    can be read from, or None."""
    cur, cur_fmt = path, fmt
    try:
        for _ in range(64):
            info = image_info(cur, cur_fmt)
            assert isinstance(info, dict)
            full = info.get("full-backing-filename") or info.get("backing-filename")
            if not full or "://" in full or full.startswith("json:"):
                return None
            if not os.path.exists(full):
                return f"backing file of image {path} is missing: {full}"
            try:
                check_disk_path(full)
            except DiskError as e:
                return f"backing file of image {path}: {e}"
            cur, cur_fmt = full, info.get("backing-filename-format")
    except DiskError:
        return None
    return None


def image_chain(path: str, fmt: str | None = None) -> list[dict]:
    """``qemu-img info`` of the image and each of its backing files, top first.

    Raises DiskError naming the backing file when one is missing or is not a regular
    file or block device (a FIFO there would make ``qemu-img`` wait until its timeout).
    """
    path = _check_path(path)
    try:
        chain = image_info(path, fmt, backing_chain=True)
    except DiskError as e:
        bad = _bad_backing(path, fmt)
        if bad:
            raise DiskError(bad) from None
        raise e from None
    if isinstance(chain, dict):
        chain = [chain]
    return chain


# ---------------------------------------------------------------------------- the daemon
class StorageDaemon:
    """A private ``qemu-storage-daemon`` exporting one block node over NBD on a unix socket.

    ``blockdev`` is the QAPI dict of the node (its node-name must be ``img``). The
    daemon runs in its own session; when started from the main thread it gets
    SIGKILL if vmbak dies (``setpriv --pdeathsig``).
    """

    NODE = "img"
    EXPORT = "img"

    def __init__(self, blockdev: dict, *, writable: bool, what: str) -> None:
        self.what = what
        self.dir = _private_dir("vmbak-qsd-")
        self.socket = os.path.join(self.dir, "nbd.sock")
        self.proc: subprocess.Popen | None = None
        self._finalizer = weakref.finalize(self, _cleanup, [None], self.dir)
        cmd = [_tool("qemu-storage-daemon"),
               "--blockdev", json.dumps(blockdev, separators=(",", ":")),
               "--nbd-server", f"addr.type=unix,addr.path={self.socket}",
               "--export", f"type=nbd,id=exp0,node-name={self.NODE},name={self.EXPORT},"
               f"writable={'on' if writable else 'off'}"]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        errpath = os.path.join(self.dir, "stderr")
        try:
            with open(errpath, "wb") as err:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=err, start_new_session=True, close_fds=True)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _cleanup, [self.proc], self.dir)
            deadline = time.monotonic() + START_TIMEOUT
            while not _listening(self.socket):
                if self.proc.poll() is not None:
                    raise DiskError(f"{what}: {_qemu_message(self._stderr(), 'qemu-storage-daemon')}")
                if time.monotonic() > deadline:
                    raise DiskError(f"{what}: qemu-storage-daemon did not start within {START_TIMEOUT:.0f} s")
                time.sleep(0.005)
        except BaseException:
            self.kill()
            raise

    def _stderr(self) -> str:
        try:
            with open(os.path.join(self.dir, "stderr"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop cleanly (SIGTERM: the daemon flushes and closes its images); raise on failure."""
        if self.proc is None:
            return
        proc = self.proc
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise DiskError(f"{self.what}: qemu-storage-daemon did not stop within "
                                    f"{STOP_TIMEOUT:.0f} s and was killed") from None
            if proc.returncode != 0:
                msg = _qemu_message(self._stderr(), "qemu-storage-daemon")
                raise DiskError(f"{self.what}: qemu-storage-daemon failed (exit {proc.returncode}): {msg}")
        finally:
            self.proc = None
            self._finalizer()

    def kill(self) -> None:
        """Stop at once (no flush) and remove the private directory; never raises."""
        self.proc = None
        self._finalizer()


def _listening(path: str) -> bool:
    """True once a server accepts connections on the unix socket ``path`` (the
    socket file appears at bind(), before listen())."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _private_dir(prefix: str) -> str:
    base = tempfile.gettempdir()
    if len(base) > 60:  # unix socket paths are limited to 107 bytes
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def stop_process(proc: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM ``proc`` if it still runs, and SIGKILL it after ``grace`` seconds; reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cleanup(procs: list, directory: str) -> None:
    for proc in procs:
        if proc is None:
            continue
        try:
            stop_process(proc)
        except Exception:  # noqa: BLE001, S110 - best effort at exit
            pass
    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------- reading
class ImageDisk:
    """A DiskReader over an image file opened read-only by a private qemu-storage-daemon."""

    def __init__(self, path: str, fmt: str, chain: list[dict], *, force_share: bool = False) -> None:
        self.path = path
        self.format = fmt
        self.chain = chain
        self.backing_files = [c.get("filename", "") for c in chain[1:]]
        self.size = int(chain[0]["virtual-size"])
        self.description = path
        self._nbd: NbdDisk | None = None
        node: dict = {"driver": fmt, "node-name": StorageDaemon.NODE, "read-only": True,
                      "file": {"driver": "file", "filename": path, "aio": "threads"}}
        if force_share:
            node["force-share"] = True
        self._daemon = StorageDaemon(node, writable=False, what=f"cannot open image {path}")
        try:
            self._nbd = NbdDisk(self._daemon.socket, StorageDaemon.EXPORT, description=path)
            if self._nbd.size != self.size:
                raise DiskError(f"image {path}: QEMU exports {self._nbd.size} bytes, qemu-img info "
                                f"reported {self.size}")
        except BaseException:
            self.close()
            raise

    def source_state(self) -> tuple:
        """What changes whenever the image or one of its backing files is written (see
        ``RawDisk.source_state``): each file's inode, size, modification and change times."""
        out = []
        for f in [self.path, *self.backing_files]:
            try:
                st = os.stat(f)
                out.append((f, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except OSError as e:
                out.append((f, e.errno))
        return tuple(out)

    def pread(self, length: int, offset: int) -> bytes:
        if self._nbd is None:
            raise DiskError(f"image {self.path} is closed")
        return self._nbd.pread(length, offset)

    def pread_many(self, requests: list[tuple[int, int]]) -> list[bytes]:
        if self._nbd is None:
            raise DiskError(f"image {self.path} is closed")
        return self._nbd.pread_many(requests)

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        if self._nbd is None:
            raise DiskError(f"image {self.path} is closed")
        return self._nbd.data_extents(start, end)

    def close(self) -> None:
        if self._nbd is not None:
            self._nbd.close()
            self._nbd = None
        self._daemon.kill()  # read-only: nothing to flush

    def __enter__(self) -> ImageDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ImageDisk {self.path} {self.format} size={self.size}>"


def open_image(path: str | os.PathLike[str], fmt: str | None = None, *,
               force_share: bool = False) -> RawDisk | ImageDisk:
    """Open an image file for reading: a RawDisk for raw files and block devices, an
    ImageDisk (read through QEMU) for every other format. Use as a context manager.

    ``fmt`` skips probing (``raw`` is then read directly); ``force_share`` reads an
    image another process has open for writing (the view is not consistent then).
    """
    path = os.fspath(path)
    fmt = normalize_format(fmt)
    if fmt == "raw":
        return RawDisk(path)
    if fmt is not None and fmt not in READ_FORMATS:
        raise DiskError(f"unsupported image format {fmt!r} (vmbak reads raw, {', '.join(READ_FORMATS)})")
    apath = _check_path(path)
    chain = image_chain(apath, fmt)
    top = chain[0]
    found = top.get("format")
    if found == "raw" and fmt is None:
        base = os.path.basename(apath).lower()
        ext = os.path.splitext(base)[1]
        if ext in _NAMED_LIKE and not base.endswith("-flat.vmdk"):
            raise DiskError(f"{path} is named like a {_NAMED_LIKE[ext]} image but has no valid "
                            f"{_NAMED_LIKE[ext]} header (damaged?); pass the format raw to read it as a raw disk")
        return RawDisk(path)
    if found not in READ_FORMATS:
        raise DiskError(f"unsupported image format {found!r} in {path} "
                        f"(vmbak reads raw, {', '.join(READ_FORMATS)})")
    for layer in chain:
        if layer.get("encrypted"):
            raise DiskError(f"encrypted images are not supported: {layer.get('filename', path)}")
        if layer.get("format") not in (*READ_FORMATS, "raw"):
            raise DiskError(f"unsupported format {layer.get('format')!r} in the backing chain of {path}: "
                            f"{layer.get('filename')}")
    try:
        return ImageDisk(apath, found, chain, force_share=force_share)
    except DiskError as e:
        msg = str(e)
        if "lock" in msg and "Is another process using" in msg:
            raise DiskError(f"image {path} is in use by another process (a running VM?); back up a "
                            "running VM through QEMU (--changes qemu:...) instead") from None
        raise


# ---------------------------------------------------------------------------- writing
class ImageRestoreTarget(RestoreTarget):
    """A restore target that is a new image file of format ``fmt``.

    ``raw`` behaves exactly like RestoreTarget (a sparse file). Other formats are
    created with ``qemu-img create`` at the exact virtual size (vpc with
    ``force_size=on``), at a hidden partial directory next to ``path``, written
    through a private qemu-storage-daemon's NBD export (zero blocks are not written,
    so the image is thin), and renamed into place by ``commit`` after a clean stop
    of the daemon and ``qemu-img check``. ``discard`` (or ``close`` before commit)
    removes the partial image.
    """

    def __init__(self, path: str | os.PathLike[str], size: int, fmt: str = "raw", *, overwrite: bool = False,
                 options: dict[str, str] | None = None) -> None:
        path = os.fspath(path)
        fmt = normalize_format(fmt) or "raw"
        if fmt not in WRITE_FORMATS:
            raise DiskError(f"cannot restore to format {fmt!r} (choose {', '.join(WRITE_FORMATS)})")
        self.format = fmt
        self._writer: NbdWriter | None = None
        self._daemon: StorageDaemon | None = None
        self._partial_dir: str | None = None
        if fmt == "raw":
            super().__init__(path, size, overwrite)
            return
        self.size = size
        self.final_path = path
        self.created = False
        self.is_file = False  # written and verified through NBD, not through a file descriptor
        self.fd = -1
        self.path = path
        self.lock: TargetLock | None = None
        self._token: int | None = None
        if size <= 0 or size % 512:
            raise DiskError(f"{fmt} images hold whole 512-byte sectors; the disk has {size} bytes "
                            "(restore to raw instead)")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise DiskError(f"cannot use restore target {path}: {e.strerror}") from None
        if st is not None:
            if os.path.isdir(path):
                raise DiskError(f"restore target is a directory: {path}")
            if not os.path.isfile(path):
                raise DiskError(f"a {fmt} image can only be restored to a file, not to {path} "
                                "(restore to raw to write a device)")
            if not overwrite:
                raise DiskError(f"restore target exists: {path} (use --overwrite to replace it)")
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise DiskError(f"restore target directory does not exist: {d}")
        try:
            with deferred():
                self.lock = TargetLock(path)
                self._token = register_cleanup(self.close)
            remove_dead_partials(path)
            if os.path.lexists(path) and not overwrite:
                raise DiskError(f"restore target {path} appeared while the restore started; "
                                "run it again (with --overwrite to replace it)")
            with deferred():
                try:
                    pd = partial_name(path)
                    os.mkdir(pd, 0o700)
                except OSError as e:
                    raise DiskError(f"cannot create restore target {path}: {e.strerror}") from None
                self._partial_dir = pd
                # The image gets its final name inside the partial directory (a vmdk names
                # itself in its descriptor), and is renamed out of it on commit.
                self.path = os.path.join(self._partial_dir, os.path.basename(path))
                self.created = True
        except BaseException:
            with deferred():
                self.close()
            raise
        try:
            opts = {**CREATE_OPTIONS[fmt], **(options or {})}
            args = ["create", "-q", "-f", fmt]
            if opts:
                args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
            try:
                _run_qemu_img([*args, "--", self.path, str(size)], f"cannot create {fmt} image {path}")
            except DiskError as e:  # name the target, not the partial file
                raise DiskError(str(e).replace(f" {self.path}: ", " ").replace(self.path, path)) from None
            got = int(image_info(self.path, fmt)["virtual-size"])  # type: ignore[index]
            if got != size:
                raise DiskError(f"a {fmt} image cannot hold exactly {size} bytes (qemu-img made {got}); "
                                "restore to another format")
            node = {"driver": fmt, "node-name": StorageDaemon.NODE,
                    "file": {"driver": "file", "filename": self.path, "aio": "threads"}}
            self._daemon = StorageDaemon(node, writable=True, what=f"cannot write {fmt} image {path}")
            self._writer = NbdWriter(self._daemon.socket, StorageDaemon.EXPORT, description=path)
            if self._writer.size != size:
                raise DiskError(f"{fmt} image {path}: QEMU exports {self._writer.size} bytes, expected {size}")
        except BaseException:
            with deferred():
                self.close()
            raise

    # -- the RestoreTarget contract
    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self._writer is None:
            if self.format == "raw":
                return super().write(offset, data)
            raise DiskError(f"restore target {self.final_path} is closed")
        self._writer.pwrite(data, offset)

    def write_zeros(self, offset: int, length: int) -> None:
        if self._writer is None:
            if self.format == "raw":
                return super().write_zeros(offset, length)
            raise DiskError(f"restore target {self.final_path} is closed")
        self._writer.write_zeros(offset, length)

    def needs_zero_writes(self) -> bool:
        if self.format == "raw":
            return super().needs_zero_writes()
        return False  # a new image reads zeros wherever nothing was written

    def read(self, length: int, offset: int) -> bytes:
        if self._writer is None:
            if self.format == "raw":
                return super().read(length, offset)
            raise DiskError(f"restore target {self.final_path} is closed")
        return self._writer.pread(length, offset)

    def commit(self, sync: bool = False) -> None:
        if self.format == "raw":
            return super().commit(sync)
        if not self.created:
            return
        assert self._writer is not None and self._daemon is not None and self._partial_dir is not None
        self._writer.flush()
        self._writer.close()
        self._writer = None
        self._daemon.stop()  # clean stop: QEMU writes its metadata and closes the image
        self._daemon = None
        p = run_qemu_img(["check", "-q", "-f", self.format, "--", self.path],
                         f"cannot check restored {self.format} image {self.final_path}")
        if p.returncode not in (0, 63):  # 63: the format has no check
            raise DiskError(f"restored {self.format} image {self.final_path} fails qemu-img check: "
                            f"{_qemu_message(p.stderr + p.stdout, 'qemu-img')}")
        got = int(image_info(self.path, self.format)["virtual-size"])  # type: ignore[index]
        if got != self.size:
            raise DiskError(f"restored {self.format} image has {got} bytes, expected {self.size}")
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if sync:
                os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        with deferred():
            os.replace(self.path, self.final_path)
            shutil.rmtree(self._partial_dir, ignore_errors=True)
            self._partial_dir = None
            self.path = self.final_path
            self.created = False
        check_landed(self.final_path, st, sync)  # the image that was written and checked

    def discard(self) -> None:
        if self.format == "raw":
            return super().discard()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._daemon is not None:
            self._daemon.kill()
            self._daemon = None
        if self._partial_dir is not None:
            shutil.rmtree(self._partial_dir, ignore_errors=True)
            self._partial_dir = None

    def close(self) -> None:
        if self.format == "raw":
            return super().close()
        with deferred():
            if self.created:  # never committed: the partial image is of no use
                self.discard()
            elif self._daemon is not None:
                self._daemon.kill()
                self._daemon = None
            unregister_cleanup(self._token)
            self._token = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def __enter__(self) -> ImageRestoreTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

