"""find and dump: files across snapshots, and a file or a directory tree as a byte stream.

Both read through :class:`vmbak.serve.files.SnapshotFiles`, with its guards: whatever part
of a filesystem cannot be read becomes one problem (``SnapshotFiles.problem``) and the rest
goes on.

Patterns follow restic's ``find``: a pattern is split at ``/`` and each component is a
shell glob (``*``, ``?``, ``[...]``; ``*`` never crosses a ``/``); ``**`` matches any number
of components. A pattern that starts with ``/`` must match the whole path (``/p2/etc/*``);
any other pattern matches the end of the path (``*.conf`` matches every name ending in
``.conf`` at any depth, ``etc/*.conf`` such a name directly in a directory ``etc``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from vmbak.engine.common import resolve_bht
from vmbak.errors import VmbakError, printable
from vmbak.repo.repository import Repository
from vmbak.serve.files import PIECE, BrowseError, Filesystem, Node, SnapshotFiles, safe_name


# ---------------------------------------------------------------------------- patterns
class Pattern:
    """One restic-style path pattern (see the module docstring)."""

    def __init__(self, text: str, ignore_case: bool = False) -> None:
        if not text:
            raise VmbakError("an empty pattern matches nothing; use '*' for everything")
        self.text = text
        self.ignore_case = ignore_case
        parts = [p for p in text.split("/") if p]
        if not text.startswith("/"):
            parts = ["**", *parts]
        self.parts = [p.lower() for p in parts] if ignore_case else parts

    def match(self, path: str) -> bool:
        """Whether ``path`` (absolute, ``/``-separated) matches."""
        comps = [c for c in path.split("/") if c]
        if self.ignore_case:
            comps = [c.lower() for c in comps]
        return _match(self.parts, comps)[1]

    def may_match_below(self, path: str) -> bool:
        """Whether some path below the directory ``path`` could match."""
        comps = [c for c in path.split("/") if c]
        if self.ignore_case:
            comps = [c.lower() for c in comps]
        states, _ = _match(self.parts, comps)
        return bool(states)


def _match(pat: list[str], comps: list[str]) -> tuple[set[int], bool]:
    """Run the pattern over ``comps``: the pattern positions still open for a longer path
    (a prefix of it matched all of ``comps``), and whether the whole pattern matches."""
    states = {0}  # pattern positions reached after consuming a prefix of comps
    for c in comps:
        nxt: set[int] = set()
        for s in _closure(pat, states):
            if s < len(pat):
                if pat[s] == "**":
                    nxt.add(s)  # ** consumes this component and may go on
                elif fnmatch.fnmatchcase(c, pat[s]):
                    nxt.add(s + 1)
        states = nxt
        if not states:
            return set(), False
    final = _closure(pat, states)
    return {s for s in final if s < len(pat)}, len(pat) in final


def _closure(pat: list[str], states: set[int]) -> set[int]:
    """``states`` plus the positions after any ``**`` that matches nothing."""
    out = set(states)
    todo = list(states)
    while todo:
        s = todo.pop()
        if s < len(pat) and pat[s] == "**" and s + 1 not in out:
            out.add(s + 1)
            todo.append(s + 1)
    return out


# ---------------------------------------------------------------------------- find
@dataclass
class Match:
    """One entry found by :func:`find_in`."""

    path: str
    node: Node

    def to_json(self) -> dict:
        return self.node.to_json(self.path)


class WalkCache:
    """What :func:`find_in` found in each volume, by the volume's content: a volume whose
    disk blocks all have the same hashes (block hash tables) as one already searched, at
    the same place on the disk, holds the same files, so its matches and problems are
    taken over instead of walking it again. ``walked`` and ``reused`` count volumes."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.found: dict[bytes, tuple[list[Match], list[tuple[str, str]]]] = {}
        self.walked = 0
        self.reused = 0

    def fingerprints(self, files: SnapshotFiles) -> dict[str, bytes]:
        """Volume name -> a digest of its disk blocks' hashes and its layout; {} when the
        block hash tables cannot be read (then everything is walked)."""
        m = files.view.snapshot
        try:
            table = resolve_bht(self.repo, self.repo.chain(m))
        except VmbakError:
            return {}
        bs = m.block_size
        out = {}
        for name, vol in files.volumes.items():
            h = hashlib.blake2b(repr((bs, m.disk_size, vol.segments)).encode(), digest_size=32)
            for _v, d, n in vol.segments:
                h.update(np.ascontiguousarray(table[d // bs: -(-(d + n) // bs)]).tobytes())
            out[name] = h.digest()
        return out


def find_in(files: SnapshotFiles, patterns: list[Pattern], cache: WalkCache | None = None) -> Iterator[Match]:
    """Every entry of every volume of ``files`` whose path matches any of ``patterns``, in
    path order (volumes in table order, then depth first by name). Volumes and directories
    that cannot be read are reported through ``files.problem`` and skipped. With ``cache``
    (shared by the snapshots of one search), a volume already searched in another snapshot
    with the same content is not walked again: its matches and problems are repeated."""
    def descend(path: str) -> bool:
        return any(p.may_match_below(path) for p in patterns)

    fps = cache.fingerprints(files) if cache is not None else {}
    for name, vol in files.volumes.items():
        vpath = "/" + name
        if not any(p.match(vpath) or p.may_match_below(vpath) for p in patterns):
            continue  # an anchored pattern that cannot reach this volume: it is not even opened
        fp = fps.get(name)
        if cache is not None and fp is not None and fp in cache.found:
            cache.reused += 1
            matches, problems = cache.found[fp]
            for path, why in problems:
                files.problem(path, why)
            yield from matches
            continue
        first = len(files.problems)
        matches = []
        try:
            fs, root = files.volume_root(vol)
        except BrowseError as e:
            files.problem(vpath, str(e).removeprefix(f"{files.label}:{vpath}: "))
        else:
            for path, node in files.walk(fs, root, vpath, descend):
                if any(p.match(path) for p in patterns):
                    m = Match(path, node)
                    matches.append(m)
                    yield m
        if cache is not None:
            cache.walked += 1
            if fp is not None:
                cache.found[fp] = ([Match(m.path, _bare(m.node)) for m in matches], files.problems[first:])


def _bare(node: Node) -> Node:
    """``node`` without its parser object (kept in a cache for reporting only)."""
    return Node(node.name, node.kind, node.size, node.mode, node.mtime_ns, node.target, node.ident)


# ---------------------------------------------------------------------------- dump
def _sparse_stream(files: SnapshotFiles, fs: Filesystem, node: Node, path: str) -> Iterator[bytes]:
    """A file's bytes in order (holes as zeros), raising BrowseError where reading fails."""
    pos = 0
    for off, piece in files.pieces(fs, node, path, sparse=True):
        while pos < off:
            n = min(PIECE, off - pos)
            yield bytes(n)
            pos += n
        yield piece
        pos = off + len(piece)
    while pos < node.size:
        n = min(PIECE, node.size - pos)
        yield bytes(n)
        pos += n


class _Stream(io.RawIOBase):
    """``node.size`` bytes from a generator of byte strings; once the generator fails, the
    rest reads as zeros (the failure goes to ``fail``)."""

    def __init__(self, gen: Iterator[bytes], size: int, fail: Callable[[BrowseError], None]) -> None:
        self.gen = gen
        self.left = size
        self.buf = memoryview(b"")
        self.fail = fail
        self.broken = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.left <= 0:
            return 0
        if not self.buf:
            data = b""
            if not self.broken:
                try:
                    data = next(self.gen, b"")
                except BrowseError as e:
                    self.broken = True
                    self.fail(e)
            if not data:
                data = bytes(min(PIECE, self.left))  # failed, or shorter than its size: zeros
            self.buf = memoryview(data)
        n = min(len(b), len(self.buf), self.left)
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        self.left -= n
        return n


def _tar_name(path: str) -> str:
    return path.lstrip("/")


def _tree(files: SnapshotFiles, path: str) -> Iterator[tuple[Filesystem | None, str, Node]]:
    """What ``dump`` of the directory ``path`` holds: (filesystem, path, node), depth first."""
    fs, _vol, node, norm = files.resolve(path)
    if fs is not None:
        for p, n in files.walk(fs, node, norm):
            yield fs, p, n
        return
    # a virtual directory ("/", "/vg0"): itself, the directories above the volumes, the volumes
    parts = files.split(norm)
    if parts:  # "/" itself is no entry: tar -x would give its mode to the directory it extracts into
        yield None, norm, Node(node.name, "dir", 0, 0o755)
    made = {norm.rstrip("/") or "/"}
    for name, vol in files.volumes.items():
        vparts = name.split("/")
        if vparts[:len(parts)] != parts:
            continue
        for i in range(len(parts) + 1, len(vparts)):
            d = "/" + "/".join(vparts[:i])
            if d not in made:
                made.add(d)
                yield None, d, Node(vparts[i - 1], "dir", 0, 0o755)
        vpath = "/" + name
        try:
            vfs, root = files.volume_root(vol)
        except BrowseError as e:
            files.problem(vpath, str(e).removeprefix(f"{files.label}:{vpath}: "))
            continue
        for p, n in files.walk(vfs, root, vpath):
            yield vfs, p, n


def dump_tar(files: SnapshotFiles, path: str, out: BinaryIO) -> dict:
    """Write the directory ``path`` (and everything below it) to ``out`` as a POSIX (pax)
    tar stream; return counts. Entry names are the paths without the leading ``/``
    (``p2/etc/hostname``); mode and modification time are kept, symlinks are symlinks, uid
    and gid are 0. Device nodes, FIFOs and sockets, and names tar cannot hold (with NUL or
    ``/``), are left out (reported). A file that cannot be opened is left out, one that
    fails part-way keeps its promised size with zeros for the rest; either is reported
    through ``files.problem``."""
    report = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0, "skipped": []}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for fs, p, node in _tree(files, path):
            if not safe_name(node.name):
                report["skipped"].append({"path": p, "reason": "name tar cannot hold"})
                files.problem(p, "left out of the archive: tar cannot hold this name")
                continue
            info = tarfile.TarInfo(_tar_name(p))
            info.mode = node.mode & 0o7777
            info.mtime = max(0, node.mtime_ns // 1_000_000_000)
            info.uid = info.gid = 0
            if node.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                report["dirs"] += 1
            elif node.kind == "symlink":
                target = node.target or ""
                if "\0" in target:
                    files.problem(p, "left out of the archive: the symlink target holds NUL")
                    report["skipped"].append({"path": p, "reason": "symlink target holds NUL"})
                    continue
                info.type = tarfile.SYMTYPE
                info.linkname = target
                tar.addfile(info)
                report["symlinks"] += 1
            elif node.kind == "file" and fs is not None:
                try:
                    gen = _sparse_stream(files, fs, node, p)
                    first = next(gen, b"")  # a file that cannot be opened at all is left out
                except BrowseError as e:
                    files.problem(p, _short(files, p, e) + "; left out of the archive")
                    continue

                def fail(e: BrowseError, p: str = p) -> None:
                    files.problem(p, _short(files, p, e) + "; the rest of it is zeros in the archive")

                info.size = node.size
                tar.addfile(info, io.BufferedReader(_Stream(_chain(first, gen), node.size, fail), PIECE))
                report["files"] += 1
                report["bytes"] += node.size
            else:
                report["skipped"].append({"path": p, "reason": "special file"})
    return report


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _short(files: SnapshotFiles, path: str, e: BaseException) -> str:
    """A BrowseError's message without the snapshot label and the path (the warning names them)."""
    msg = str(e).removeprefix(f"{files.label}: ").removeprefix(f"{files.label}:")
    return msg.removeprefix(printable(path)).strip() or msg


def dump(files: SnapshotFiles, path: str, out: BinaryIO) -> dict:
    """Write ``path`` to ``out``: a regular file as its bytes (as ``cat``), a directory as a
    tar stream (:func:`dump_tar`). Returns {"type": "file"|"dir", ...counts}. Anything
    else (a symlink, a device node) is a BrowseError."""
    fs, _vol, node, norm = files.resolve(path)
    if fs is None or node.kind == "dir":
        return {"type": "dir", **dump_tar(files, norm, out)}
    if node.kind != "file":
        raise BrowseError(f"{files.label}: not a regular file or directory ({node.kind}): {printable(norm)}")
    n = files.copy_out(fs, node, norm, out.write)
    return {"type": "file", "files": 1, "bytes": n}

