"""diff --files: the files added, removed and changed between two snapshots of one disk.

Both snapshots are read through :class:`vmbak.serve.files.SnapshotFiles` (same guards:
what cannot be read is reported through ``problem`` and left out of the comparison).

What counts as a change (restic's ``diff`` letters):

* ``+`` an entry only in B, ``-`` an entry only in A (below an added or removed directory,
  every entry is listed);
* ``T`` the same path is another type (file, dir, symlink, other) in B;
* ``M`` a regular file whose size or bytes differ, or a symlink whose target differs;
* ``U`` (only with ``metadata``) the same content, but another mode or modification time.

Content is decided without reading the files when the block hash tables prove it: a
volume laid out identically in both snapshots whose disk blocks all have the same hash
in A and B is unchanged as a whole (it is not walked at all); an ext file whose data lies
at the same places in both snapshots, on blocks whose hashes did not change, has the same
bytes. Any other file of equal size is read from both snapshots and compared (stopping at
the first difference).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vmbak.engine.common import resolve_bht
from vmbak.errors import VmbakError
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository
from vmbak.serve.files import BrowseError, Filesystem, Node, SnapshotFiles, VolumeInfo, _join


@dataclass
class Change:
    """One line of a file diff."""

    modifier: str  # "+", "-", "T", "M", "U"
    path: str
    kind: str  # the entry's type: in B, or in A for "-"
    what: list[str] = field(default_factory=list)  # for M and U: "size", "content", "target", "mode", "mtime"

    def to_json(self) -> dict:
        return {"modifier": self.modifier, "path": self.path, "type": self.kind, "what": self.what}


def changed_blocks(repo: Repository, a: Manifest, b: Manifest) -> np.ndarray | None:
    """Per disk block, whether its content differs between ``a`` and ``b`` (from the block
    hash tables; nothing is read), or None when the snapshots' geometries differ."""
    if a.disk_size != b.disk_size or a.block_size != b.block_size:
        return None
    ha = resolve_bht(repo, repo.chain(a))
    hb = resolve_bht(repo, repo.chain(b))
    return (ha != hb).any(axis=1)


class FileDiff:
    """Compare the file trees of two snapshots of one disk (see the module docstring).

    ``changes()`` yields the differences in path order; ``stats`` counts them and how each
    file's content was decided; problems go to the two SnapshotFiles' ``problem``."""

    def __init__(self, fa: SnapshotFiles, fb: SnapshotFiles, changed: np.ndarray | None, block_size: int,
                 metadata: bool = False) -> None:
        self.fa = fa
        self.fb = fb
        self.metadata = metadata
        self.block_size = block_size
        self._cum = None if changed is None else np.concatenate([[0], np.cumsum(changed, dtype=np.int64)])
        self.stats = {"volumes_unchanged": [], "files_proven_by_blocks": 0, "files_read_in_part": 0,
                      "files_read": 0, "bytes_read": 0}

    # -------------------------------------------------------------- blocks
    def _blocks_changed(self, segments: list[tuple[int, int, int]], vol_off: int, length: int) -> bool:
        """Whether any disk block under the volume range [vol_off, vol_off+length) changed."""
        assert self._cum is not None
        bs = self.block_size
        end = vol_off + length
        for v, d, n in segments:
            lo, hi = max(vol_off, v), min(end, v + n)
            if hi > lo:
                s = (d + lo - v) // bs
                e = min(-(-(d + hi - v) // bs), len(self._cum) - 1)
                if self._cum[e] - self._cum[s] > 0:
                    return True
        return False

    def _changed_parts(self, segments: list[tuple[int, int, int]],
                       extents: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        """The (file offset, length) ranges of a file laid out as ``extents`` (the same in
        both snapshots) that lie on disk blocks whose hash changed: only they can differ."""
        assert self._cum is not None
        bs = self.block_size
        nblocks = len(self._cum) - 1
        out: list[tuple[int, int]] = []
        for foff, voff, n in extents:
            for v, d, sn in segments:
                lo, hi = max(voff, v), min(voff + n, v + sn)
                if hi <= lo:
                    continue
                dlo, dhi = d + lo - v, d + hi - v  # this part of the extent on the disk
                b0, b1 = dlo // bs, min(-(-dhi // bs), nblocks)
                if self._cum[b1] - self._cum[b0] == 0:
                    continue
                b = b0
                while b < b1:
                    if self._cum[b + 1] - self._cum[b] == 0:
                        b += 1
                        continue
                    e = b
                    while e < b1 and self._cum[e + 1] - self._cum[e]:
                        e += 1
                    x0, x1 = max(dlo, b * bs), min(dhi, e * bs)
                    start = foff + (lo - voff) + (x0 - dlo)
                    if out and out[-1][0] + out[-1][1] == start:
                        out[-1] = (out[-1][0], out[-1][1] + x1 - x0)
                    else:
                        out.append((start, x1 - x0))
                    b = e
        return out

    def _volume_unchanged(self, va: VolumeInfo, vb: VolumeInfo) -> bool:
        if self._cum is None or va.segments != vb.segments:
            return False
        return not any(self._blocks_changed(va.segments, v, n) for v, _d, n in va.segments)

    # -------------------------------------------------------------- walk
    def changes(self) -> Iterator[Change]:
        """Every difference, volume by volume (A's order, then B's new volumes)."""
        names = list(self.fa.volumes) + [n for n in self.fb.volumes if n not in self.fa.volumes]
        for name in names:
            va, vb = self.fa.volumes.get(name), self.fb.volumes.get(name)
            vpath = "/" + name
            if va is None or vb is None:
                files = self.fb if va is None else self.fa
                root = self._root(files, vb if va is None else va, vpath)  # type: ignore[arg-type]
                if root is not None:
                    yield from self._all("+" if va is None else "-", files, *root, vpath)
                continue
            if self._volume_unchanged(va, vb):
                self.stats["volumes_unchanged"].append(vpath)
                continue
            ra = self._root(self.fa, va, vpath)
            rb = self._root(self.fb, vb, vpath)
            if ra is None or rb is None:
                continue
            yield from self._pair(vpath, ra[0], ra[1], rb[0], rb[1], va, vb, 0, set())

    @staticmethod
    def _root(files: SnapshotFiles, vol: VolumeInfo, vpath: str) -> tuple[Filesystem, Node] | None:
        try:
            return files.volume_root(vol)
        except BrowseError as e:
            files.problem(vpath, str(e).removeprefix(f"{files.label}:{vpath}: "))
            return None

    @staticmethod
    def _all(mod: str, files: SnapshotFiles, fs: Filesystem, node: Node, path: str) -> Iterator[Change]:
        for p, n in files.walk(fs, node, path):
            yield Change(mod, p, n.kind)

    def _pair(self, path: str, fsa: Filesystem, na: Node, fsb: Filesystem, nb: Node, va: VolumeInfo,
              vb: VolumeInfo, depth: int, active: set) -> Iterator[Change]:
        """The differences at and below ``path``, present in both snapshots."""
        if na.kind != nb.kind:
            yield Change("T", path, nb.kind, ["type"])
            if na.kind == "dir":
                yield from (c for c in self._all("-", self.fa, fsa, na, path) if c.path != path)
            if nb.kind == "dir":
                yield from (c for c in self._all("+", self.fb, fsb, nb, path) if c.path != path)
            return
        what: list[str] = []
        if na.kind == "file":
            what = self._file_content(path, fsa, na, fsb, nb, va, vb)
        elif na.kind == "symlink" and na.target != nb.target:
            what = ["target"]
        if what:
            yield Change("M", path, nb.kind, what)
        elif self.metadata:
            meta = [k for k, x, y in (("mode", na.mode, nb.mode), ("mtime", na.mtime_ns, nb.mtime_ns)) if x != y]
            if meta and not (na.kind == "dir" and meta == ["mtime"]):
                yield Change("U", path, nb.kind, meta)
        if na.kind != "dir":
            return
        key = (na.ident, nb.ident)
        if na.ident is not None and key in active:
            self.fb.problem(path, "directory loop (this directory was already compared); not compared again")
            return
        if depth >= self.fa.max_depth:
            self.fb.problem(path, f"more than {self.fa.max_depth} directory levels; not compared")
            return
        ea, bad_a, whole_a = self.fa.listing(fsa, na, path)
        eb, bad_b, whole_b = self.fb.listing(fsb, nb, path)
        active.add(key)
        try:
            bmap = {e.name: e for e in eb}
            amap = {e.name: e for e in ea}
            for name in sorted(set(amap) | set(bmap)):
                p = _join(path, name)
                a, b = amap.get(name), bmap.get(name)
                if b is None:
                    if whole_b and name not in bad_b:  # else: unknown in B (reported), not removed
                        yield from self._all("-", self.fa, fsa, a, p)  # type: ignore[arg-type]
                elif a is None:
                    if whole_a and name not in bad_a:
                        yield from self._all("+", self.fb, fsb, b, p)
                else:
                    yield from self._pair(p, fsa, a, fsb, b, va, vb, depth + 1, active)
        finally:
            active.discard(key)

    # -------------------------------------------------------------- content
    def _file_content(self, path: str, fsa: Filesystem, na: Node, fsb: Filesystem, nb: Node, va: VolumeInfo,
                      vb: VolumeInfo) -> list[str]:
        if na.size != nb.size:
            return ["size"]
        only: list[tuple[int, int]] | None = None
        if self._cum is not None and va.segments == vb.segments:
            try:
                xa = self.fa._guard(fsa.extents, na)
                xb = self.fb._guard(fsb.extents, nb)
            except BrowseError:
                xa = xb = None  # decided by reading, which reports what cannot be read
            if xa is not None and xa == xb:
                only = self._changed_parts(va.segments, xa)
                if not only:
                    self.stats["files_proven_by_blocks"] += 1
                    return []
                self.stats["files_read_in_part"] += 1
        if only is None:
            self.stats["files_read"] += 1
        try:
            same = _same_stream(_bytes(self.fa.pieces(fsa, na, path, only=only), self.stats, "A"),
                                _bytes(self.fb.pieces(fsb, nb, path, only=only), self.stats, "B"))
        except _SideError as e:
            files = self.fa if e.side == "A" else self.fb
            msg = str(e.error).removeprefix(f"{files.label}: ")
            why = msg.split(" cannot be read ", 1)[1] if " cannot be read " in msg else msg
            files.problem(path, f"cannot be read {why}; not compared")
            return []
        return [] if same else ["content"]


class _SideError(Exception):
    def __init__(self, side: str, error: BrowseError) -> None:
        super().__init__(str(error))
        self.side = side
        self.error = error


def _bytes(pieces: Iterator[tuple[int, bytes]], stats: dict, side: str) -> Iterator[bytes]:
    try:
        for _off, piece in pieces:
            if piece:
                stats["bytes_read"] += len(piece)
                yield piece
    except BrowseError as e:
        raise _SideError(side, e) from None


def _same_stream(a: Iterator[bytes], b: Iterator[bytes]) -> bool:
    """Whether two byte streams (cut into pieces anywhere) hold the same bytes."""
    bufa = bufb = b""
    while True:
        if not bufa:
            bufa = next(a, b"")
        if not bufb:
            bufb = next(b, b"")
        if not bufa or not bufb:
            return not bufa and not bufb
        n = min(len(bufa), len(bufb))
        if bufa[:n] != bufb[:n]:
            return False
        bufa, bufb = bufa[n:], bufb[n:]


def check_same_disk(a: Manifest, b: Manifest) -> None:
    """Raise a VmbakError unless ``a`` and ``b`` are snapshots of the same disk name."""
    if a.name != b.name:
        raise VmbakError(f"snapshots {a.short_id} ({a.name}) and {b.short_id} ({b.name}) are of different disks; "
                         "--files compares two snapshots of one disk")
