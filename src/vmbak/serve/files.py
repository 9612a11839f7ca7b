"""Browsing the filesystems inside a backup: ls, cat and extract over a SnapshotView.

The disk's partitions (MBR, GPT) and LVM logical volumes are found with vmbak.usage and
appear as top-level directories (``/p1``, ``/p2``, ``/vg0/root``, or ``/disk`` when there is
no partition table). Inside each, the dissect parsers (dissect.extfs, .xfs, .ntfs, .fat,
.btrfs) or, for exFAT, vmbak.serve.exfat read the filesystem through a file-like view of
the volume, so only the chunks holding the metadata and file data asked for are fetched
from the repository.

``extract`` never writes outside its target directory: every name from the backup is
checked (no ``/``, no ``.`` or ``..``, no NUL), every file and directory is created relative
to an open directory descriptor with O_NOFOLLOW and O_EXCL, so no symlink (from the backup
or planted beside it) is ever followed, and symlinks are recreated as they are, never
written through. Files stream in pieces.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

from vmbak.engine.common import human
from vmbak.engine.view import RangeFile, SnapshotView, volume_file
from vmbak.errors import VmbakError, printable
from vmbak.usage import _is_luks, _volumes
from vmbak.usage import swap as usage_swap
from vmbak.usage.model import UsageError, Volume
from vmbak.usage.partitions import Table, read_table

PIECE = 4 << 20


class BrowseError(VmbakError):
    """A path inside a backup that does not exist or cannot be read."""


@dataclass
class Node:
    """One entry of a filesystem inside a backup."""

    name: str
    kind: str  # "file", "dir", "symlink", "other"
    size: int = 0
    mode: int = 0  # permission bits
    mtime_ns: int = 0
    target: str | None = None  # symlink target
    ident: Any = None  # filesystem-specific identity (inode number), for loop detection
    obj: Any = field(default=None, repr=False)
    error: str | None = None  # kind "error": the entry is named but cannot be read (why)

    def to_json(self, path: str) -> dict:
        return {"name": self.name, "path": path, "type": self.kind, "size": self.size,
                "mode": f"{self.mode:04o}", "mtime": _iso(self.mtime_ns), "target": self.target}


def _iso(ns: int) -> str | None:
    if not ns:
        return None
    try:
        return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (OverflowError, OSError, ValueError):  # a damaged timestamp
        return None


def _dt_ns(dt: datetime | None) -> int:
    if dt is None:
        return 0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1_000_000) * 1000


def _kind(fmt: int) -> str:
    if fmt == stat.S_IFREG:
        return "file"
    if fmt == stat.S_IFDIR:
        return "dir"
    if fmt == stat.S_IFLNK:
        return "symlink"
    return "other"


# ---------------------------------------------------------------------------- filesystems
class Filesystem:
    """What every filesystem adapter provides."""

    fstype = "unknown"

    def root(self) -> Node:
        raise NotImplementedError

    def listdir(self, node: Node) -> Iterable[Node]:
        """The entries of directory ``node`` (lazily, perhaps). An entry that is named but
        cannot be read is a Node of kind "error" (``entry()`` makes one)."""
        raise NotImplementedError

    def open(self, node: Node) -> BinaryIO:
        raise NotImplementedError

    def data_ranges(self, node: Node) -> list[tuple[int, int]] | None:
        """The (offset, length) ranges of a file that hold data (the rest are holes), when
        the filesystem tells; None when it does not (then the whole file is read)."""
        return None

    def extents(self, node: Node) -> list[tuple[int, int, int]] | None:
        """Where a file's data lies in its volume: (file offset, volume offset, length) runs
        in file order (holes left out), when the filesystem tells cheaply; None when it does
        not (inline data, or a filesystem without this)."""
        return None

    @staticmethod
    def entry(name: str, make: Callable[..., Node], *args: Any) -> Node:
        """``make(name, *args)``, or an "error" node naming what went wrong."""
        try:
            return make(name, *args)
        except VmbakError:
            raise
        except Exception as e:  # noqa: BLE001 - one damaged entry must not hide its siblings
            return Node(name, "error", error=_why(e))


class _InodeFs(Filesystem):
    """ext2/3/4 and XFS: inodes with a mode, listdir() returning name -> inode."""

    def __init__(self, fs: Any, fstype: str, volume_size: int = 0) -> None:
        self.fs = fs
        self.fstype = fstype
        self.volume_size = volume_size

    def _check(self, node: Node) -> None:
        """Refuse what would make the parser allocate without bound: on ext, a directory
        larger than its volume (directories have no holes), or a block-mapped (not
        extent-mapped) file larger than its volume (dissect lists every block of it)."""
        if self.fstype != "ext" or not self.volume_size:
            return
        size = int(node.obj.size)
        if size <= self.volume_size:
            return
        if node.kind == "dir":
            raise BrowseError(f"directory size {size} is larger than the volume ({self.volume_size} bytes)")
        flags = int(node.obj.inode.i_flags)
        if not flags & 0x80000 and not flags & 0x10000000:  # neither EXTENTS_FL nor INLINE_DATA_FL
            raise BrowseError(f"a block-mapped file of {size} bytes is larger than the volume "
                              f"({self.volume_size} bytes)")

    def _node(self, name: str, ino: Any) -> Node:
        mode = int(ino.inode.di_mode if self.fstype == "xfs" else ino.inode.i_mode)
        kind = _kind(stat.S_IFMT(mode))
        n = Node(name, kind, int(ino.size) if kind != "dir" else 0, stat.S_IMODE(mode), int(ino.mtime_ns),
                 ident=int(ino.inum), obj=ino)
        if kind == "symlink":
            n.target = ino.link
        return n

    def root(self) -> Node:
        return self._node("/", self.fs.root)

    def listdir(self, node: Node) -> Iterator[Node]:
        self._check(node)
        # iterdir, not listdir: a damaged or hostile directory may hold one name twice
        for ino in node.obj.iterdir():
            if ino.filename not in (".", ".."):
                yield self.entry(ino.filename, self._node, ino)

    def open(self, node: Node) -> BinaryIO:
        self._check(node)
        return node.obj.open()

    def data_ranges(self, node: Node) -> list[tuple[int, int]] | None:
        if self.fstype != "ext":
            return None
        ino = node.obj
        if ino.inode.i_flags & 0x10000000:  # EXT4_INLINE_DATA_FL: the data is in the inode
            return None
        bs = int(self.fs.block_size)
        out: list[tuple[int, int]] = []
        pos = 0
        for block, count in ino.dataruns():
            if pos >= node.size:
                break
            n = min(int(count) * bs, node.size - pos)
            if block is not None and n > 0:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((pos, n))
            pos += int(count) * bs
        return out


    def extents(self, node: Node) -> list[tuple[int, int, int]] | None:
        if self.fstype != "ext" or node.obj.inode.i_flags & 0x10000000:  # not ext, or inline data
            return None
        bs = int(self.fs.block_size)
        out: list[tuple[int, int, int]] = []
        pos = 0
        for block, count in node.obj.dataruns():
            if pos >= node.size:
                break
            n = min(int(count) * bs, node.size - pos)
            if block is not None and n > 0:
                out.append((pos, int(block) * bs, n))
            pos += int(count) * bs
        return out


class _NtfsFs(Filesystem):
    fstype = "ntfs"

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _node(self, name: str, rec: Any) -> Node:
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

        mtime = 0
        try:
            si = rec.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION]
            if si:
                mtime = int(si[0].last_modification_time_ns)
        except (AttributeError, KeyError, IndexError, TypeError):
            pass
        if rec.is_symlink() or rec.is_mount_point():
            try:
                target = rec.reparse_point_substitute_name
            except Exception:  # noqa: BLE001 - damaged reparse data: show it as other
                return Node(name, "other", 0, 0o777, mtime, ident=rec.segment, obj=rec)
            return Node(name, "symlink", 0, 0o777, mtime, target=target, ident=rec.segment, obj=rec)
        if rec.is_dir():
            return Node(name, "dir", 0, 0o755, mtime, ident=rec.segment, obj=rec)
        try:
            size = int(rec.size())
        except FileNotFoundError:
            size = 0
        return Node(name, "file", size, 0o644, mtime, ident=rec.segment, obj=rec)

    def root(self) -> Node:
        return self._node("/", self.fs.mft.get(5))

    def listdir(self, node: Node) -> Iterator[Node]:
        top = node.name == "/"
        for name, entry in node.obj.listdir(ignore_dos=True).items():
            if name in (".", "..") or (top and name.startswith("$")):
                continue
            yield self.entry(name, lambda n, e: self._node(n, e.dereference()), entry)

    def open(self, node: Node) -> BinaryIO:
        try:
            return node.obj.open()
        except FileNotFoundError:
            import io

            return io.BytesIO(b"")


class _FatFs(Filesystem):
    fstype = "fat"

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _node(self, name: str, d: Any) -> Node:
        ro = d.is_readonly()
        if d.is_directory():
            return Node(name, "dir", 0, 0o555 if ro else 0o755, _dt_ns(d.mtime), ident=d.cluster or None, obj=d)
        return Node(name, "file", int(d.size), 0o444 if ro else 0o644, _dt_ns(d.mtime), ident=None, obj=d)

    def root(self) -> Node:
        return Node("/", "dir", 0, 0o755, 0, ident=0, obj=self.fs.root)

    @staticmethod
    def _name(d: Any) -> str:
        """The long name, or the short name with the lower-case flags Windows NT and mtools set."""
        if d.ldirents or d.name != d.short_name:
            return d.name
        flags = int(getattr(d.dirent, "DIR_NTRes", 0))
        base, dot, ext = d.short_name.partition(".")
        if flags & 0x08:
            base = base.lower()
        if flags & 0x10:
            ext = ext.lower()
        return base + dot + ext

    def listdir(self, node: Node) -> Iterator[Node]:
        for d in node.obj.iterdir():
            if d.name not in (".", "..") and not d.is_volume_id():
                yield self.entry(self._name(d), self._node, d)

    def open(self, node: Node) -> BinaryIO:
        return node.obj.open()


class _BtrfsFs(Filesystem):
    fstype = "btrfs"

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _node(self, name: str, ino: Any) -> Node:
        mode = int(ino.mode)
        kind = _kind(stat.S_IFMT(mode))
        n = Node(name, kind, int(ino.size) if kind == "file" else 0, stat.S_IMODE(mode), int(ino.mtime_ns),
                 ident=(int(ino.subvolume.objectid), int(ino.inum)), obj=ino)
        if kind == "symlink":
            n.target = ino.link
        return n

    def root(self) -> Node:
        return self._node("/", self.fs.get("/"))

    def listdir(self, node: Node) -> Iterator[Node]:
        for name, ino in node.obj.iterdir():
            if name not in (".", ".."):
                yield self.entry(name, self._node, ino)

    def open(self, node: Node) -> BinaryIO:
        return node.obj.open()


def _detect(f: RangeFile) -> str | None:
    def at(off: int, n: int) -> bytes:
        if off + n > f.size:
            return b""
        f.seek(off)
        return f.read(n)

    if at(0x438, 2) == b"\x53\xef":
        return "ext"
    if at(0, 4) == b"XFSB":
        return "xfs"
    if at(3, 8) == b"NTFS    ":
        return "ntfs"
    if at(3, 8) == b"EXFAT   ":
        return "exfat"
    if at(0x10040, 8) == b"_BHRfS_M":
        return "btrfs"
    boot = at(0, 512)
    if len(boot) == 512 and boot[510:512] == b"\x55\xaa" and (boot[0x36:0x39] == b"FAT" or boot[0x52:0x55] == b"FAT"):
        return "fat"
    return None


class _NoFilesFs(Filesystem):
    """A volume that holds no files: a Linux swap area ("swap"), or one whose every block
    reads as zeros ("empty": never formatted, a new disk). It browses as an empty directory,
    not as a volume that cannot be read, which would make every search of the disk partial."""

    def __init__(self, fstype: str) -> None:
        self.fstype = fstype

    def root(self) -> Node:
        return Node("/", "dir", 0, 0o555, 0, ident=0)

    def listdir(self, node: Node) -> Iterable[Node]:
        return []

    def open(self, node: Node) -> BinaryIO:
        raise BrowseError(f"this volume holds no files ({self.fstype})")


def open_filesystem(f: RangeFile, where: str) -> Filesystem:
    """The filesystem in the volume file ``f``; raise BrowseError if there is none we can read."""
    kind = _detect(f)
    if kind is None:
        raise BrowseError(f"{where}: no filesystem vmbak can browse (ext2/3/4, XFS, NTFS, FAT, exFAT, btrfs)")
    try:
        if kind == "exfat":
            from vmbak.serve.exfat import ExfatFs

            try:
                return ExfatFs(f)
            except BrowseError as e:
                raise BrowseError(f"{where}: {e}") from None
        if kind == "ext":
            from dissect.extfs import ExtFS

            return _InodeFs(ExtFS(f), "ext", f.size)
        if kind == "xfs":
            from dissect.xfs import XFS

            return _InodeFs(XFS(f), "xfs")
        if kind == "ntfs":
            from dissect.ntfs import NTFS

            return _NtfsFs(NTFS(f))
        if kind == "fat":
            from dissect.fat import FATFS

            return _FatFs(FATFS(f))
        from dissect.btrfs import Btrfs

        return _BtrfsFs(Btrfs(f))
    except VmbakError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure on damaged metadata
        raise BrowseError(f"{where}: the {kind} filesystem cannot be read ({_why(e)})") from None


def _why(e: BaseException) -> str:
    try:
        text = str(e).strip()
    except Exception:  # noqa: BLE001 - an exception that cannot even describe itself
        text = ""
    msg = printable(text.splitlines()[0]) if text else ""
    if not msg and isinstance(e, EOFError):
        msg = "the metadata ends early"
    return f"{type(e).__name__}: {msg}"[:200] if msg else type(e).__name__


# ---------------------------------------------------------------------------- the snapshot tree
class _ParserNotes(logging.Handler):
    """What the dissect parsers log (at warning level and above) while a guarded operation
    runs in this thread: damage they noticed and stepped over (a zero-length directory
    entry ends a listing early, for one). It becomes part of the problem reported for the
    path, instead of a stray line on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(self.local, "notes", None)
        if notes is not None and len(notes) < 8:
            try:
                notes.append(printable(record.getMessage()))
            except Exception:  # noqa: BLE001 - a message that cannot be formatted
                notes.append(record.msg if isinstance(record.msg, str) else "parser warning")


_NOTES = _ParserNotes()
logging.getLogger("dissect").addHandler(_NOTES)


class _Overtime(BaseException):
    """Raised by the timer in the main thread when one filesystem operation runs too long
    (a BaseException, so a parser's own ``except Exception`` cannot swallow it)."""


class TargetError(VmbakError):
    """The extract target cannot be written (full, read-only...): the extract stops."""


# errors of the target that stop an extract; any other error affects one entry only
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE}

PARTIAL_SUFFIX = ".vmbak-partial"


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


@dataclass
class VolumeInfo:
    name: str  # "p1", "disk", "vg0/root"
    kind: str
    start: int
    size: int
    segments: list[tuple[int, int, int]]
    ptype: str = ""


class SnapshotFiles:
    """The file trees of one snapshot: volumes at the top, filesystems below them.

    Damaged filesystems: every operation on one directory or file (opening a volume, listing
    a directory, reading an entry, opening a file) runs guarded. What the parser raises
    (any exception) becomes a problem of that path: ``problem(path, why)`` records it and
    calls ``on_problem``, and the walk goes on with its siblings. Each operation is bounded
    (``metadata_budget`` bytes read, ``time_limit`` seconds in the main thread), a directory
    by ``max_dir_entries``, a walk by ``max_depth`` and ``max_entries``, and directory loops
    (one directory reached again below itself) are cut."""

    max_depth = 256
    max_dir_entries = 1 << 20
    max_entries = 1 << 24
    metadata_budget = 256 << 20
    time_limit = 60.0

    def __init__(self, view: SnapshotView) -> None:
        self.view = view
        self._fs: dict[str, Filesystem] = {}
        self.problems: list[tuple[str, str]] = []
        self.on_problem: Callable[[str, str], None] | None = None
        self._spent: int | None = None  # metadata bytes read by the current guarded operation
        self.notes: list[str] = []  # what the parser logged during the last guarded operation
        try:
            table = read_table(view)
        except UsageError:
            table = Table("none", [], [])
        if table.scheme not in ("gpt", "mbr"):
            table = Table("none", [], table.notes)
        self.scheme = table.scheme
        self.volumes: dict[str, VolumeInfo] = {}
        for vol, entry in _volumes(view, table):
            if entry.kind != "lv" and entry.fstype == "lvm":
                continue  # the physical volume: its logical volumes follow
            self.volumes[entry.name] = VolumeInfo(entry.name, entry.kind, entry.start, vol.size,
                                                  list(vol.segments), entry.ptype)

    @property
    def label(self) -> str:
        return f"snapshot {self.view.snapshot.short_id}"

    def problem(self, path: str, why: str) -> None:
        """Record that ``path`` (or part of it) could not be read, and go on."""
        self.problems.append((path, why))
        if self.on_problem is not None:
            self.on_problem(path, why)

    # -------------------------------------------------------------- guarded parser calls
    def _pread(self, length: int, offset: int) -> bytes:
        if self._spent is not None:
            self._spent += length
            if self._spent > self.metadata_budget:
                raise BrowseError(f"more than {human(self.metadata_budget)} of metadata read; given up")
        return self.view.pread(length, offset)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, bounded; whatever the parser raises becomes a BrowseError(why)."""
        if self._spent is not None:  # already guarded: the outer bound holds
            return fn(*args)
        import signal

        timer = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        armed = [False]
        old = None

        def overtime(_sig: int, _frame: object) -> None:
            if armed[0]:
                armed[0] = False
                raise _Overtime

        self._spent = 0
        _NOTES.local.notes = self.notes = []
        try:
            try:
                if timer:
                    old = signal.signal(signal.SIGALRM, overtime)
                    armed[0] = True
                    signal.setitimer(signal.ITIMER_REAL, self.time_limit)
                return fn(*args)
            finally:
                armed[0] = False  # an alarm from here on is ignored
                if timer:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except _Overtime:
            raise BrowseError(f"gave up after {self.time_limit:g} s") from None
        except BrowseError:
            raise
        except VmbakError:
            raise
        except Exception as e:  # noqa: BLE001 - any parser failure on damaged metadata
            raise BrowseError(_why(e)) from None
        finally:
            armed[0] = False
            self._spent = None
            _NOTES.local.notes = None
            if old is not None:
                signal.signal(signal.SIGALRM, old)

    def _no_files(self, vol: VolumeInfo, uvol: Volume) -> str | None:
        """"empty" if the snapshot holds no data in ``vol`` (every block a hole or zeros),
        "swap" if it is a swap area (as the unused-block parser finds one), else None."""
        if not any(next(self.view.data_extents(d, d + n), None) for _, d, n in vol.segments):
            return "empty"
        try:
            return "swap" if usage_swap.probe(uvol) else None
        except UsageError:
            return None

    def volume_file(self, vol: VolumeInfo) -> RangeFile:
        return volume_file(self._pread, vol.segments, f"/{vol.name}")

    def filesystem(self, vol: VolumeInfo) -> Filesystem:
        fs = self._fs.get(vol.name)
        if fs is None:
            where = f"{self.label}:/{vol.name}"
            try:
                uvol = Volume(self.view, vol.segments, vol.name)  # as the usage parsers read it
                kind = self._no_files(vol, uvol)
                if kind is not None:
                    fs = _NoFilesFs(kind)
                elif _is_luks(uvol):
                    raise BrowseError(f"{where}: encrypted (LUKS): its files cannot be browsed")
                else:
                    fs = self._guard(open_filesystem, self.volume_file(vol), where)
            except BrowseError as e:
                msg = str(e)
                raise BrowseError(msg if msg.startswith(where) else f"{where}: cannot be read ({msg})") from None
            self._fs[vol.name] = fs
        return fs

    # -------------------------------------------------------------- paths
    @staticmethod
    def split(path: str) -> list[str]:
        return [p for p in path.replace("\\", "/").split("/") if p and p != "."]

    def _virtual_children(self, parts: list[str]) -> list[str]:
        """Names below the virtual directory ``parts`` (a prefix of volume names)."""
        out: list[str] = []
        for name in self.volumes:
            vp = name.split("/")
            if len(vp) > len(parts) and vp[:len(parts)] == parts and vp[len(parts)] not in out:
                out.append(vp[len(parts)])
        return out

    def volume_root(self, vol: VolumeInfo) -> tuple[Filesystem, Node]:
        """The filesystem of ``vol`` and its root directory, named as the volume's last part."""
        fs = self.filesystem(vol)
        try:
            node = self._guard(fs.root)
        except BrowseError as e:
            raise BrowseError(f"{self.label}:/{vol.name}: the root directory cannot be read ({e})") from None
        name = vol.name.split("/")[-1]
        return fs, Node(name, node.kind, node.size, node.mode, node.mtime_ns, node.target, node.ident, node.obj)

    def resolve(self, path: str) -> tuple[Filesystem | None, VolumeInfo | None, Node, str]:
        """(filesystem, volume, node, normalised path) of ``path``; a virtual directory has no fs."""
        parts = self.split(path)
        if ".." in parts:
            raise BrowseError(f"{self.label}: '..' is not allowed in paths: {printable(path)}")
        for name, vol in self.volumes.items():
            vp = name.split("/")
            if parts[:len(vp)] == vp:
                fs, node = self.volume_root(vol)
                walked = list(vp)
                for comp in parts[len(vp):]:
                    here = "/" + "/".join(walked)
                    if node.kind != "dir":
                        raise BrowseError(f"{self.label}: not a directory: {printable(here)}")
                    match = self._find(fs, node, here, comp)
                    if match is None:
                        raise BrowseError(f"{self.label}: no such file or directory: /{printable('/'.join(parts))}")
                    node = match
                    walked.append(comp)
                return fs, vol, node, "/" + "/".join(parts)
        if not parts or self._virtual_children(parts):
            return None, None, Node(parts[-1] if parts else "/", "dir", 0, 0o555), "/" + "/".join(parts)
        raise BrowseError(f"{self.label}: no such file or directory: /{printable('/'.join(parts))} "
                          f"(top-level entries: {', '.join('/' + n for n in self.volumes) or 'none'})")

    def _find(self, fs: Filesystem, node: Node, path: str, name: str) -> Node | None:
        entries, err = self._read_dir(fs, node)
        found = next((e for e in entries if e.name == name), None)
        if found is None and fs.fstype in ("fat", "exfat", "ntfs"):  # case-insensitive filesystems
            found = next((e for e in entries if e.name.upper() == name.upper()), None)
        if found is None and err is not None:
            raise BrowseError(f"{self.label}: {printable(path)}: directory cannot be read ({err})")
        if found is not None and found.kind == "error":
            raise BrowseError(f"{self.label}: {printable(_join(path, found.name))}: cannot be read ({found.error})")
        return found

    def _read_dir(self, fs: Filesystem, node: Node) -> tuple[list[Node], str | None]:
        """The entries of a directory as far as they can be read, and why the rest cannot."""
        out: list[Node] = []

        def read() -> None:
            for e in fs.listdir(node):
                if len(out) >= self.max_dir_entries:
                    raise BrowseError(f"more than {self.max_dir_entries} entries; the rest are left out")
                out.append(e)

        try:
            self._guard(read)
        except BrowseError as e:
            return out, str(e)
        if self.notes:  # the parser stopped early on damage it noticed
            return out, self.notes[0]
        return out, None

    def _list(self, fs: Filesystem, node: Node, path: str, strict: bool = False) -> list[Node]:
        """The readable entries of directory ``node`` at ``path``, sorted by name; the
        directory's and the entries' problems are reported. With ``strict``, a directory of
        which nothing at all can be read raises BrowseError instead."""
        return self.listing(fs, node, path, strict)[0]

    def listing(self, fs: Filesystem, node: Node, path: str, strict: bool = False) -> tuple[list[Node], set[str], bool]:
        """As ``_list`` (problems reported), and also the names of the entries that cannot be
        read and whether the directory could be read to its end."""
        entries, err = self._read_dir(fs, node)
        if err is not None:
            if strict and not entries:
                raise BrowseError(f"{self.label}: {printable(path)}: directory cannot be read ({err})")
            self.problem(path, f"directory cannot be read{' completely' if entries else ''} ({err})")
        good = []
        bad: set[str] = set()
        for e in entries:
            if e.kind == "error":
                self.problem(_join(path, e.name), f"cannot be read ({e.error})")
                bad.add(e.name)
            else:
                good.append(e)
        return sorted(good, key=lambda x: x.name), bad, err is None

    def listdir(self, path: str) -> tuple[Node, list[tuple[str, Node]]]:
        """The node at ``path`` and, for a directory, its entries as (path, node), sorted."""
        fs, vol, node, norm = self.resolve(path)
        base = norm.rstrip("/")
        if fs is None:
            parts = self.split(path)
            out = []
            for child in self._virtual_children(parts):
                full = "/".join([*parts, child])
                if full in self.volumes:
                    v = self.volumes[full]
                    out.append((f"{base}/{child}", Node(child, "dir", v.size, 0o555)))
                else:
                    out.append((f"{base}/{child}", Node(child, "dir", 0, 0o555)))
            return node, out
        if node.kind != "dir":
            return node, [(norm, node)]
        return node, self.entries(fs, node, norm, strict=True)

    def entries(self, fs: Filesystem, node: Node, path: str, strict: bool = False) -> list[tuple[str, Node]]:
        """The (path, node) entries of directory ``node`` at ``path``, sorted; problems are
        reported (with ``strict``, a directory that cannot be read at all raises BrowseError)."""
        return [(_join(path, e.name), e) for e in self._list(fs, node, path, strict)]

    def walk(self, fs: Filesystem, node: Node, path: str,
             descend: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Node]]:
        """``node`` and everything below it, depth first, in name order. A directory met a
        second time (a loop, or a directory hard link) is listed once; depth and the entry
        count are bounded; problems are reported and the walk goes on. With ``descend``,
        a directory is listed only if ``descend(its path)`` is true (it is still yielded)."""
        seen: set[Any] = set()
        count = 0
        stack: list[tuple[str, Node, int]] = [(path, node, 0)]
        while stack:
            p, n, depth = stack.pop()
            yield p, n
            if n.kind != "dir" or (descend is not None and not descend(p)):
                continue
            if n.ident is not None:
                if n.ident in seen:
                    self.problem(p, "directory loop (this directory was already listed); not listed again")
                    continue
                seen.add(n.ident)
            if depth >= self.max_depth:
                self.problem(p, f"more than {self.max_depth} directory levels; not listed")
                continue
            entries = self.entries(fs, n, p)
            count += len(entries)
            if count > self.max_entries:
                self.problem(p, f"more than {self.max_entries} entries in all; the listing stops here")
                return
            stack.extend((ep, e, depth + 1) for ep, e in reversed(entries))

    def open(self, path: str) -> tuple[Node, BinaryIO]:
        fs, _vol, node, norm = self.resolve(path)
        if fs is None or node.kind == "dir":
            raise BrowseError(f"{self.label}: is a directory: {printable(norm)}")
        if node.kind != "file":
            raise BrowseError(f"{self.label}: not a regular file ({node.kind}): {printable(norm)}")
        return node, self.open_node(fs, node, norm)

    def open_node(self, fs: Filesystem, node: Node, path: str) -> BinaryIO:
        try:
            return self._guard(fs.open, node)
        except BrowseError as e:
            raise BrowseError(f"{self.label}: {printable(path)} cannot be read ({e})") from None

    def pieces(self, fs: Filesystem, node: Node, path: str, sparse: bool = False,
               only: list[tuple[int, int]] | None = None) -> Iterator[tuple[int, bytes]]:
        """A file's content as (offset, bytes) pieces of at most PIECE bytes, in order.
        With ``sparse``, ranges the filesystem says are holes are left out (they read as
        zeros); with ``only``, just these (offset, length) ranges are read. Raises
        BrowseError (naming ``path``) when the file cannot be read whole."""
        def fail(why: str) -> BrowseError:
            return BrowseError(f"{self.label}: {printable(path)} cannot be read ({why})")

        f = self.open_node(fs, node, path)
        ranges = None
        if sparse:
            try:
                ranges = self._guard(fs.data_ranges, node)
            except BrowseError as e:
                raise fail(str(e)) from None
        if ranges is None:
            ranges = [(0, node.size)] if only is None else only
        for start, length in ranges:
            pos, end = start, start + length
            try:
                f.seek(start)
            except Exception as e:  # noqa: BLE001
                raise fail(_why(e)) from None
            while pos < end:
                try:
                    piece = f.read(min(PIECE, end - pos))
                except VmbakError:
                    raise
                except Exception as e:  # noqa: BLE001 - damaged allocation metadata
                    raise fail(_why(e)) from None
                if not piece:
                    raise BrowseError(f"{self.label}: {printable(path)} is shorter than its size "
                                      f"({pos} of {node.size} bytes)")
                yield pos, piece
                pos += len(piece)

    def copy_out(self, fs: Filesystem, node: Node, path: str, write: Callable[[bytes], object]) -> int:
        """Stream a file's content to ``write`` in pieces; return the byte count."""
        n = 0
        for _off, piece in self.pieces(fs, node, path):
            write(piece)
            n += len(piece)
        return n

    # -------------------------------------------------------------- extract
    def extract(self, paths: list[str], target: str, log: Callable[[str], None] | None = None) -> dict:
        """Copy ``paths`` (files, directories, symlinks) into the directory ``target``.

        A file appears under its name only once it is whole: it is written to a hidden
        temporary name beside it (``.NAME.vmbak-partial``), flushed, and renamed into place;
        on an error or an interrupt the temporary file is removed, and one left by a killed
        run is removed by the next. An existing file with the same content is left as it is
        ("unchanged"); one that differs is replaced ("updated"), as restic restore does.
        Entries that cannot be read are reported (``errors``) and the rest goes on; a target
        that cannot be written (full, read-only) stops the extract with a TargetError."""
        os.makedirs(target, exist_ok=True)
        report = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0, "updated": 0, "unchanged": 0,
                  "skipped": [], "errors": [], "target": os.path.abspath(target)}
        resolved = [self.resolve(p) for p in paths]  # every path must exist before anything is written
        root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        state = {"count": 0, "log": log}
        first = len(self.problems)
        try:
            for fs, _vol, node, norm in resolved:
                if fs is None:  # a virtual directory: extract every volume below it
                    parts = self.split(norm)
                    for name, vol in self.volumes.items():
                        if name.split("/")[:len(parts)] == parts:
                            vpath = "/" + name
                            try:
                                vfs, vnode = self.volume_root(vol)
                            except BrowseError as e:
                                self._error(report, state, vpath, str(e).removeprefix(f"{self.label}:{vpath}: "))
                                continue
                            rel = name.split("/")[len(parts):] if parts else name.split("/")
                            self._extract_under(root_fd, rel, vfs, vnode, vpath, report, state)
                    continue
                self._extract_under(root_fd, [node.name if norm != "/" else "root"], fs, node, norm, report, state)
        finally:
            os.close(root_fd)
        report["errors"] = [{"path": p, "error": why} for p, why in self.problems[first:]]
        return report

    def _error(self, report: dict, state: dict, path: str, why: str) -> None:
        self.problem(path, why)

    def _extract_under(self, root_fd: int, rel: list[str], fs: Filesystem, node: Node, path: str, report: dict,
                       state: dict) -> None:
        bad = [c for c in rel[:-1] if not safe_name(c)]
        if bad:  # names from the disk (a volume group called ".."): never a path outside the target
            self._error(report, state, path, f"unsafe volume name {printable(bad[0])!r}: not extracted")
            return
        dfd = os.dup(root_fd)
        try:
            for comp in rel[:-1]:  # the virtual directories above a volume (vg0/root)
                nfd = _mkdir_at(dfd, comp)
                os.close(dfd)
                dfd = nfd
            self._extract_node(dfd, rel[-1], fs, node, path, report, state, set(), 0)
        finally:
            os.close(dfd)

    def _extract_node(self, dfd: int, name: str, fs: Filesystem, node: Node, path: str, report: dict,
                      state: dict, active: set, depth: int) -> None:
        log = state["log"]

        def skip(why: str) -> None:
            report["skipped"].append({"path": path, "reason": why})
            if log:
                log(f"skipped {printable(path)}: {why}")

        if node.kind == "error":
            self._error(report, state, path, f"cannot be read ({node.error})")
            return
        if not safe_name(name):
            skip("unsafe name")
            return
        state["count"] += 1
        if state["count"] > self.max_entries:
            if state["count"] == self.max_entries + 1:
                self._error(report, state, path, f"more than {self.max_entries} entries in all; the rest is left out")
            return
        try:
            if node.kind == "dir":
                key = node.ident
                if key is not None and key in active:
                    skip("directory loop")
                    return
                if depth >= self.max_depth:
                    self._error(report, state, path, f"more than {self.max_depth} directory levels; not extracted")
                    return
                sub = _mkdir_at(dfd, name)
                try:
                    report["dirs"] += 1
                    entries = self._list(fs, node, path)
                    if key is not None:
                        active.add(key)
                    for e in entries:
                        self._extract_node(sub, e.name, fs, e, _join(path, e.name), report, state, active, depth + 1)
                    if key is not None:
                        active.discard(key)
                    os.fchmod(sub, node.mode & 0o1777)
                    _set_mtime(sub, None, node.mtime_ns)
                finally:
                    os.close(sub)
            elif node.kind == "file":
                self._extract_file(dfd, name, fs, node, path, report)
            elif node.kind == "symlink":
                target = node.target or ""
                if "\0" in target:
                    skip("unsafe symlink target (holds NUL)")
                    return
                _place_symlink(dfd, name, target, node.mtime_ns, report)
            else:
                skip("special file")
        except BrowseError as e:  # the source: this entry cannot be read, the rest goes on
            if depth == 0 and node.kind != "dir":
                raise  # a file named on the command line: nothing else is asked for, an error
            self._error(report, state, path, str(e).removeprefix(f"{self.label}: ").removeprefix(f"{printable(path)} "))
        except FileExistsError:
            skip("already exists")
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                skip("a symlink is in the way" if _is_symlink(dfd, name) else "a file is in the way")
            elif e.errno == errno.EFBIG:
                self._error(report, state, path, f"cannot be written: its size ({node.size} bytes) is larger "
                                                 "than the target allows")
            elif e.errno in _FATAL_ERRNOS:
                raise TargetError(f"cannot write {printable(path)} under {report['target']}: {e.strerror}") from None
            else:
                self._error(report, state, path, f"cannot be written: {e.strerror}")
        except (ValueError, OverflowError) as e:  # a name or time the target cannot take
            self._error(report, state, path, f"cannot be written: {_why(e)}")

    def _extract_file(self, dfd: int, name: str, fs: Filesystem, node: Node, path: str, report: dict) -> None:
        """Write one file under a temporary name and rename it into place once whole; an
        existing file with the same content is left alone."""
        tmp = _partial_name(name)
        try:
            os.unlink(tmp, dir_fd=dfd)  # left by a run that was killed
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            pass  # not ours: O_EXCL below refuses it
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                raise FileExistsError(errno.EEXIST, "a directory is in the way")
        except FileNotFoundError:
            pass
        old = _open_existing(dfd, name)
        same = old is not None and os.fstat(old).st_size == node.size
        fd: int | None = None
        written = 0
        try:
            for off, piece in self.pieces(fs, node, path, sparse=True):
                if same:
                    assert old is not None
                    if os.pread(old, len(piece), off) == piece and _zeros_between(old, written, off):
                        written = off + len(piece)
                        continue
                    same = False
                if fd is None:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                 dir_fd=dfd)
                    if old is not None and written:  # the part already compared equal
                        _copy_range(old, fd, written)
                if piece.count(0) != len(piece):  # all-zero pieces stay holes
                    _pwrite_all(fd, piece, off)
                written = off + len(piece)
            if same:
                assert old is not None
                if _zeros_between(old, written, node.size):
                    os.fchmod(old, node.mode & 0o1777)
                    _set_mtime(old, None, node.mtime_ns)
                    report["unchanged"] += 1
                    return
            if fd is None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dfd)
            os.ftruncate(fd, node.size)
            os.fchmod(fd, node.mode & 0o1777)
            _set_mtime(fd, None, node.mtime_ns)
            os.fsync(fd)
            os.close(fd)
            fd = None
            try:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except IsADirectoryError:
                raise FileExistsError(errno.EEXIST, "a directory is in the way") from None
            report["files"] += 1
            report["bytes"] += node.size
            if old is not None:
                report["updated"] += 1
        except BaseException:
            if fd is not None:
                os.close(fd)
                fd = None
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        finally:
            if fd is not None:
                os.close(fd)
            if old is not None:
                os.close(old)


def safe_name(name: str) -> bool:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return False
    try:
        return len(os.fsencode(name)) <= 255
    except UnicodeError:
        return False


def _is_symlink(dfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _partial_name(name: str) -> str:
    tmp = f".{name}{PARTIAL_SUFFIX}"
    if len(os.fsencode(tmp)) > 255:
        import hashlib

        tmp = f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}{PARTIAL_SUFFIX}"
    return tmp


def _open_existing(dfd: int, name: str) -> int | None:
    """A read descriptor of the regular file ``name`` (never through a symlink), or None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _zeros_between(fd: int, start: int, end: int) -> bool:
    """Whether ``fd`` reads as zeros from ``start`` to ``end`` (holes skipped cheaply)."""
    pos = start
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return True
        if pos >= end:
            return True
        n = min(PIECE, end - pos)
        data = os.pread(fd, n, pos)
        if not data or data.count(0) != len(data):
            return not data
        pos += len(data)
    return True


def _copy_range(src: int, dst: int, length: int) -> None:
    pos = 0
    while pos < length:
        data = os.pread(src, min(PIECE, length - pos), pos)
        if not data:
            break
        if data.count(0) != len(data):
            _pwrite_all(dst, data, pos)
        pos += len(data)


def _set_mtime(fd: int | None, name: str | None, mtime_ns: int, dir_fd: int | None = None) -> None:
    if not mtime_ns:
        return
    try:
        if fd is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        else:
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
    except (OSError, NotImplementedError, OverflowError, ValueError):
        pass  # a time the target cannot hold (damaged metadata): the content still counts


def _place_symlink(dfd: int, name: str, target: str, mtime_ns: int, report: dict) -> None:
    """Create the symlink ``name`` -> ``target`` (never followed); an existing symlink with
    the same target is unchanged, any other non-directory is replaced."""
    try:
        if os.readlink(name, dir_fd=dfd) == target:
            report["unchanged"] += 1
            return
    except OSError:
        pass
    tmp = _partial_name(name)
    try:
        os.unlink(tmp, dir_fd=dfd)
    except FileNotFoundError:
        pass
    existed = True
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise FileExistsError(errno.EEXIST, "a directory is in the way")
    except FileNotFoundError:
        existed = False
    os.symlink(target, tmp, dir_fd=dfd)  # recreated as it is, never followed
    try:
        _set_mtime(None, tmp, mtime_ns, dir_fd=dfd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    report["symlinks"] += 1
    if existed:
        report["updated"] += 1


def _mkdir_at(dfd: int, name: str) -> int:
    try:
        os.mkdir(name, 0o700, dir_fd=dfd)
    except FileExistsError:
        pass  # an existing real directory is reused; a symlink is refused by O_NOFOLLOW below
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n
