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
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

from vmbak.engine.view import RangeFile, SnapshotView, volume_file
from vmbak.errors import VmbakError
from vmbak.usage import _volumes
from vmbak.usage.model import UsageError
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

    def to_json(self, path: str) -> dict:
        return {"name": self.name, "path": path, "type": self.kind, "size": self.size,
                "mode": f"{self.mode:04o}", "mtime": _iso(self.mtime_ns), "target": self.target}


def _iso(ns: int) -> str | None:
    if not ns:
        return None
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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

    def listdir(self, node: Node) -> list[Node]:
        raise NotImplementedError

    def open(self, node: Node) -> BinaryIO:
        raise NotImplementedError


class _InodeFs(Filesystem):
    """ext2/3/4 and XFS: inodes with a mode, listdir() returning name -> inode."""

    def __init__(self, fs: Any, fstype: str) -> None:
        self.fs = fs
        self.fstype = fstype

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

    def listdir(self, node: Node) -> list[Node]:
        # iterdir, not listdir: a damaged or hostile directory may hold one name twice
        return [self._node(ino.filename, ino) for ino in node.obj.iterdir() if ino.filename not in (".", "..")]

    def open(self, node: Node) -> BinaryIO:
        return node.obj.open()


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

    def listdir(self, node: Node) -> list[Node]:
        out = []
        top = node.name == "/"
        for name, entry in node.obj.listdir(ignore_dos=True).items():
            if name in (".", "..") or (top and name.startswith("$")):
                continue
            out.append(self._node(name, entry.dereference()))
        return out

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
            return Node(name, "dir", 0, 0o555 if ro else 0o755, _dt_ns(d.mtime), ident=d.cluster or name, obj=d)
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

    def listdir(self, node: Node) -> list[Node]:
        return [self._node(self._name(d), d) for d in node.obj.iterdir()
                if d.name not in (".", "..") and not d.is_volume_id()]

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
                 ident=(id(ino.subvolume) if hasattr(ino, "subvolume") else 0, int(ino.inum)), obj=ino)
        if kind == "symlink":
            n.target = ino.link
        return n

    def root(self) -> Node:
        return self._node("/", self.fs.get("/"))

    def listdir(self, node: Node) -> list[Node]:
        return [self._node(name, ino) for name, ino in node.obj.listdir().items() if name not in (".", "..")]

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

            return _InodeFs(ExtFS(f), "ext")
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
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200] if msg else type(e).__name__


# ---------------------------------------------------------------------------- the snapshot tree
@dataclass
class VolumeInfo:
    name: str  # "p1", "disk", "vg0/root"
    kind: str
    start: int
    size: int
    segments: list[tuple[int, int, int]]
    ptype: str = ""


class SnapshotFiles:
    """The file trees of one snapshot: volumes at the top, filesystems below them."""

    def __init__(self, view: SnapshotView) -> None:
        self.view = view
        self._fs: dict[str, Filesystem] = {}
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

    def volume_file(self, vol: VolumeInfo) -> RangeFile:
        return volume_file(self.view.pread, vol.segments, f"/{vol.name}")

    def filesystem(self, vol: VolumeInfo) -> Filesystem:
        fs = self._fs.get(vol.name)
        if fs is None:
            fs = self._fs[vol.name] = open_filesystem(self.volume_file(vol), f"{self.label}:/{vol.name}")
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

    def resolve(self, path: str) -> tuple[Filesystem | None, VolumeInfo | None, Node, str]:
        """(filesystem, volume, node, normalised path) of ``path``; a virtual directory has no fs."""
        parts = self.split(path)
        if ".." in parts:
            raise BrowseError(f"{self.label}: '..' is not allowed in paths: {path}")
        for name, vol in self.volumes.items():
            vp = name.split("/")
            if parts[:len(vp)] == vp:
                fs = self.filesystem(vol)
                node = fs.root()
                node = Node(vp[-1], node.kind, node.size, node.mode, node.mtime_ns, node.target, node.ident, node.obj)
                walked = list(vp)
                for comp in parts[len(vp):]:
                    if node.kind != "dir":
                        raise BrowseError(f"{self.label}: not a directory: /{'/'.join(walked)}")
                    match = self._find(fs, node, comp)
                    if match is None:
                        raise BrowseError(f"{self.label}: no such file or directory: /{'/'.join(parts)}")
                    node = match
                    walked.append(comp)
                return fs, vol, node, "/" + "/".join(parts)
        if not parts or self._virtual_children(parts):
            return None, None, Node(parts[-1] if parts else "/", "dir", 0, 0o555), "/" + "/".join(parts)
        raise BrowseError(f"{self.label}: no such file or directory: /{'/'.join(parts)} "
                          f"(top-level entries: {', '.join('/' + n for n in self.volumes) or 'none'})")

    def _find(self, fs: Filesystem, node: Node, name: str) -> Node | None:
        entries = self._list(fs, node)
        for e in entries:
            if e.name == name:
                return e
        if fs.fstype in ("fat", "exfat", "ntfs"):  # case-insensitive filesystems
            for e in entries:
                if e.name.upper() == name.upper():
                    return e
        return None

    def _list(self, fs: Filesystem, node: Node) -> list[Node]:
        try:
            return fs.listdir(node)
        except BrowseError as e:
            raise BrowseError(f"{self.label}: directory {node.name} cannot be read ({e})") from None
        except VmbakError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged directory
            raise BrowseError(f"{self.label}: directory {node.name} cannot be read ({_why(e)})") from None

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
        return node, self.entries(fs, node, norm)

    def entries(self, fs: Filesystem, node: Node, path: str) -> list[tuple[str, Node]]:
        """The (path, node) entries of directory ``node`` at ``path``, sorted."""
        base = path.rstrip("/")
        return sorted(((f"{base}/{e.name}", e) for e in self._list(fs, node)), key=lambda t: t[0])

    def walk(self, fs: Filesystem, node: Node, path: str) -> Iterator[tuple[str, Node]]:
        seen: set[Any] = set()

        def rec(n: Node, p: str) -> Iterator[tuple[str, Node]]:
            yield p, n
            if n.kind != "dir":
                return
            if n.ident is not None:
                if n.ident in seen:
                    return
                seen.add(n.ident)
            for e in sorted(self._list(fs, n), key=lambda x: x.name):
                yield from rec(e, f"{p.rstrip('/')}/{e.name}")

        yield from rec(node, path)

    def open(self, path: str) -> tuple[Node, BinaryIO]:
        fs, _vol, node, norm = self.resolve(path)
        if fs is None or node.kind == "dir":
            raise BrowseError(f"{self.label}: is a directory: {norm}")
        if node.kind != "file":
            raise BrowseError(f"{self.label}: not a regular file ({node.kind}): {norm}")
        return node, self.open_node(fs, node, norm)

    def open_node(self, fs: Filesystem, node: Node, path: str) -> BinaryIO:
        try:
            return fs.open(node)
        except BrowseError as e:  # damaged metadata found by vmbak's own readers
            raise BrowseError(f"{self.label}: {path} cannot be read ({e})") from None
        except VmbakError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BrowseError(f"{self.label}: {path} cannot be read ({_why(e)})") from None

    def copy_out(self, fs: Filesystem, node: Node, path: str, write: Callable[[bytes], object]) -> int:
        """Stream a file's content to ``write`` in pieces; return the byte count."""
        f = self.open_node(fs, node, path)
        n = 0
        try:
            while n < node.size:
                piece = f.read(min(PIECE, node.size - n))
                if not piece:
                    break
                write(piece)
                n += len(piece)
        except BrowseError as e:
            raise BrowseError(f"{self.label}: {path} cannot be read ({e})") from None
        except VmbakError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BrowseError(f"{self.label}: {path} cannot be read ({_why(e)})") from None
        if n != node.size:
            raise BrowseError(f"{self.label}: {path} is shorter than its size ({n} of {node.size} bytes)")
        return n

    # -------------------------------------------------------------- extract
    def extract(self, paths: list[str], target: str, log: Callable[[str], None] | None = None) -> dict:
        """Copy ``paths`` (files, directories, symlinks) into the directory ``target``."""
        os.makedirs(target, exist_ok=True)
        report = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0, "skipped": [], "target": os.path.abspath(target)}
        resolved = [self.resolve(p) for p in paths]  # every path must exist before anything is written
        root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for fs, _vol, node, norm in resolved:
                if fs is None:  # a virtual directory: extract every volume below it
                    parts = self.split(norm)
                    for name in self.volumes:
                        if name.split("/")[:len(parts)] == parts:
                            vfs, _v, vnode, vnorm = self.resolve("/" + name)
                            assert vfs is not None
                            rel = name.split("/")[len(parts):] if parts else name.split("/")
                            self._extract_under(root_fd, rel, vfs, vnode, vnorm, report, log)
                    continue
                self._extract_under(root_fd, [node.name if norm != "/" else "root"], fs, node, norm, report, log)
        finally:
            os.close(root_fd)
        return report

    def _extract_under(self, root_fd: int, rel: list[str], fs: Filesystem, node: Node, path: str, report: dict,
                       log: Callable[[str], None] | None) -> None:
        dfd = os.dup(root_fd)
        try:
            for comp in rel[:-1]:  # the virtual directories above a volume (vg0/root)
                nfd = _mkdir_at(dfd, comp)
                os.close(dfd)
                dfd = nfd
            self._extract_node(dfd, rel[-1], fs, node, path, report, log, set())
        finally:
            os.close(dfd)

    def _extract_node(self, dfd: int, name: str, fs: Filesystem, node: Node, path: str, report: dict,
                      log: Callable[[str], None] | None, active: set) -> None:
        def skip(why: str) -> None:
            report["skipped"].append({"path": path, "reason": why})
            if log:
                log(f"skipped {path}: {why}")

        if not _safe_name(name):
            skip("unsafe name")
            return
        try:
            if node.kind == "dir":
                key = node.ident
                if key is not None and key in active:
                    skip("directory loop")
                    return
                sub = _mkdir_at(dfd, name)
                try:
                    report["dirs"] += 1
                    entries = sorted(self._list(fs, node), key=lambda x: x.name)
                    if key is not None:
                        active.add(key)
                    for e in entries:
                        self._extract_node(sub, e.name, fs, e, f"{path.rstrip('/')}/{e.name}", report, log, active)
                    if key is not None:
                        active.discard(key)
                    os.fchmod(sub, node.mode & 0o1777)
                    if node.mtime_ns:
                        os.utime(sub, ns=(node.mtime_ns, node.mtime_ns))
                finally:
                    os.close(sub)
            elif node.kind == "file":
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dfd)
                try:
                    report["bytes"] += self.copy_out(fs, node, path, lambda b: _write_all(fd, b))
                    os.fchmod(fd, node.mode & 0o1777)
                    if node.mtime_ns:
                        os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))
                finally:
                    os.close(fd)
                report["files"] += 1
            elif node.kind == "symlink":
                os.symlink(node.target or "", name, dir_fd=dfd)  # recreated as it is, never followed
                if node.mtime_ns:
                    try:
                        os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dfd, follow_symlinks=False)
                    except (OSError, NotImplementedError):
                        pass
                report["symlinks"] += 1
            else:
                skip("special file")
        except FileExistsError:
            skip("already exists")
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                skip("a symlink is in the way")
            else:
                raise BrowseError(f"cannot write {name} under the target: {e.strerror}") from None


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _mkdir_at(dfd: int, name: str) -> int:
    try:
        os.mkdir(name, 0o700, dir_fd=dfd)
    except FileExistsError:
        pass  # an existing real directory is reused; a symlink is refused by O_NOFOLLOW below
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
