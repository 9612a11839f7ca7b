"""LVM2 physical volumes: the linear logical volumes in them, each returned as a Volume.

Read from the PV itself, as LVM does: the label ("LABELONE" in one of the first four sectors,
checksummed), the PV header (UUID and metadata areas), each metadata area's header
(checksummed) and the text of the newest committed metadata (checksummed; the one with the
highest seqno when there are several areas). Nothing else of the PV is ever called free: its
label, metadata areas, unallocated extents and every logical volume not returned here stay used,
because only the filesystems inside returned volumes report free space.

A logical volume is returned only when it is certain that its bytes are a plain block device
holding its own data: visible, made only of linear segments ("striped" with one stripe) on this
PV, and not named by any other LV. That leaves out thin pools and thin volumes, snapshots *and
their origins* (an old snapshot reads unchanged blocks from its origin, so a block free in the
origin's filesystem may still hold the snapshot's data), RAID, mirror, cache, VDO and integrity
volumes, LVs being moved by pvmove, striped LVs (they span several PVs) and LVs spread over
several PVs. Overlapping extents mean damaged metadata: UsageError.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any

from vmbak.usage.model import UsageError, Volume

NAME = "lvm"
SECTOR = 512
LABEL_SCAN_SECTORS = 4
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 0x1
MAX_METADATA = 64 << 20  # bytes of metadata text we are willing to parse
MAX_DEPTH = 32


def lvm_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """LVM's checksum: CRC-32 (the zlib polynomial) without the final inversion."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _find_label(vol: Volume) -> tuple[int, bytes] | None:
    for s in range(LABEL_SCAN_SECTORS):
        if (s + 1) * SECTOR > vol.size:
            break
        sec = vol.read(s * SECTOR, SECTOR)
        if sec[:8] == b"LABELONE":
            return s, sec
    return None


def probe(vol: Volume) -> bool:
    return _find_label(vol) is not None


# ---------------------------------------------------------------------------- metadata text
_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>-?[0-9]+(?:\.[0-9]+)?(?![A-Za-z0-9_.+\-]))
  | (?P<word>[A-Za-z0-9_.+\-/:@%]+)
  | (?P<punct>[={}\[\],])
""", re.X)


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise UsageError(f"LVM metadata: unexpected character at {pos}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        val = m.group(kind)
        if kind == "str":
            out.append(("str", re.sub(r"\\(.)", r"\1", val[1:-1])))
        elif kind == "num":
            out.append(("num", float(val) if "." in val else int(val)))
        elif kind == "word":
            out.append(("word", val))
        else:
            out.append((val, val))
    return out


def parse_metadata(text: str) -> dict[str, Any]:
    """LVM's text format: ``key = value``, ``section { ... }``, arrays ``[a, b]``, # comments."""
    toks = _tokens(text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        if pos >= len(toks):
            raise UsageError("LVM metadata ends inside a value")
        kind, val = toks[pos]
        if kind in ("str", "num"):
            pos += 1
            return val
        if kind == "[":
            pos += 1
            arr = []
            while True:
                if pos >= len(toks):
                    raise UsageError("LVM metadata ends inside an array")
                if toks[pos][0] == "]":
                    pos += 1
                    return arr
                kind2, v2 = toks[pos]
                if kind2 not in ("str", "num"):
                    raise UsageError("LVM metadata: bad array element")
                arr.append(v2)
                pos += 1
                if pos < len(toks) and toks[pos][0] == ",":
                    pos += 1
        raise UsageError(f"LVM metadata: unexpected {val!r}")

    def section(depth: int, closed: bool) -> dict[str, Any]:
        nonlocal pos
        if depth > MAX_DEPTH:
            raise UsageError("LVM metadata nests too deeply")
        out: dict[str, Any] = {}
        while pos < len(toks):
            kind, val = toks[pos]
            if kind == "}":
                if not closed:
                    raise UsageError("LVM metadata: unbalanced '}'")
                pos += 1
                return out
            if kind not in ("word", "num"):
                raise UsageError(f"LVM metadata: unexpected {val!r}")
            key = str(val)
            pos += 1
            if pos >= len(toks):
                raise UsageError("LVM metadata ends after a key")
            if toks[pos][0] == "=":
                pos += 1
                v = value()
            elif toks[pos][0] == "{":
                pos += 1
                v = section(depth + 1, True)
            else:
                raise UsageError(f"LVM metadata: expected '=' or '{{' after {key!r}")
            if key in out:
                raise UsageError(f"LVM metadata: {key!r} appears twice")
            out[key] = v
        if closed:
            raise UsageError("LVM metadata ends inside a section")
        return out

    return section(0, False)


# ---------------------------------------------------------------------------- on-disk structures
def _pv_header(vol: Volume) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """(PV UUID, data areas, metadata areas) from the label; UsageError when damaged."""
    found = _find_label(vol)
    if found is None:
        raise UsageError("no LVM label")
    s, sec = found
    sector_xl, crc, offset, = struct.unpack_from("<QII", sec, 8)
    if sector_xl != s:
        raise UsageError("LVM label records the wrong sector")
    if lvm_crc(sec[20:]) != crc:
        raise UsageError("LVM label has a bad checksum")
    if sec[24:32] != b"LVM2 001":
        raise UsageError(f"unknown LVM label type {sec[24:32]!r}")
    if not 32 <= offset <= SECTOR - 40:
        raise UsageError("LVM label points its header outside the sector")
    uuid = sec[offset:offset + 32].decode("ascii", "replace")
    pos = offset + 40
    lists: list[list[tuple[int, int]]] = [[], []]
    for which in range(2):
        while True:
            if pos + 16 > SECTOR:
                raise UsageError("LVM PV header runs past its sector")
            off, size = struct.unpack_from("<QQ", sec, pos)
            pos += 16
            if off == 0:
                break
            lists[which].append((off, size))
    return uuid, lists[0], lists[1]


def _read_mda(vol: Volume, off: int, size: int) -> tuple[int, str] | None:
    """(seqno, metadata text) of one metadata area, or None when it holds none."""
    if size < MDA_HEADER_SIZE * 2 or off + size > vol.size:
        raise UsageError("LVM metadata area lies outside the volume")
    hdr = vol.read(off, MDA_HEADER_SIZE)
    crc, = struct.unpack_from("<I", hdr, 0)
    if lvm_crc(hdr[4:]) != crc:
        raise UsageError("LVM metadata area header has a bad checksum")
    if hdr[4:20] != MDA_MAGIC:
        raise UsageError("LVM metadata area header has a bad magic")
    version, start, msize = struct.unpack_from("<IQQ", hdr, 20)
    if version != 1 or start != off or msize != size:
        raise UsageError("LVM metadata area header does not describe its own area")
    loff, lsize, lcrc, lflags = struct.unpack_from("<QQII", hdr, 40)
    if loff == 0 or lflags & RAW_LOCN_IGNORED:
        return None
    if lsize == 0 or lsize > min(MAX_METADATA, size - MDA_HEADER_SIZE) or not MDA_HEADER_SIZE <= loff < size:
        raise UsageError("LVM metadata location is out of range")
    first = min(lsize, size - loff)
    text = vol.read(off + loff, first)
    if first < lsize:  # the text wraps around the circular buffer
        text += vol.read(off + MDA_HEADER_SIZE, lsize - first)
    if lvm_crc(text) != lcrc:
        raise UsageError("LVM metadata text has a bad checksum")
    meta = _parse_vg(text)
    return meta[0], text.rstrip(b"\0").decode("utf-8", "replace")


def _parse_vg(text: bytes) -> tuple[int, str, dict[str, Any]]:
    try:
        s = text.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("LVM metadata is not text") from None
    tree = parse_metadata(s)
    vgs = [(k, v) for k, v in tree.items() if isinstance(v, dict)]
    if len(vgs) != 1:
        raise UsageError(f"LVM metadata holds {len(vgs)} volume groups")
    name, vg = vgs[0]
    seqno = vg.get("seqno")
    if not isinstance(seqno, int):
        raise UsageError("LVM metadata has no seqno")
    return seqno, name, vg


def _int(d: dict[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or v < 0:
        raise UsageError(f"LVM metadata: {what} has no valid {key}")
    return v


def read_vg(vol: Volume) -> tuple[str, dict[str, Any], str]:
    """(VG name, VG metadata, this PV's UUID without dashes) from the newest metadata."""
    uuid, _data, mdas = _pv_header(vol)
    best: tuple[int, str] | None = None
    for off, size in mdas:
        got = _read_mda(vol, off, size)
        if got is not None and (best is None or got[0] > best[0]):
            best = got
    if best is None:
        raise UsageError("LVM physical volume holds no metadata (not in a volume group, or in one "
                         "whose metadata lives on another PV)")
    seqno, name, vg = _parse_vg(best[1].encode())
    del seqno
    return name, vg, uuid


def volumes(vol: Volume) -> list[Volume]:
    """The linear logical volumes of the PV in ``vol``; disk-coordinate segments, named vg/lv."""
    vgname, vg, uuid = read_vg(vol)
    extent = _int(vg, "extent_size", "volume group") * SECTOR
    if extent == 0:
        raise UsageError("LVM extent size is zero")
    pvs = vg.get("physical_volumes")
    if not isinstance(pvs, dict):
        raise UsageError("LVM metadata lists no physical volumes")
    mine = [k for k, v in pvs.items()
            if isinstance(v, dict) and str(v.get("id", "")).replace("-", "") == uuid]
    if len(mine) != 1:
        raise UsageError("this physical volume is not listed in its volume group's metadata")
    pvname = mine[0]
    pv = pvs[pvname]
    pe_start = _int(pv, "pe_start", "physical volume") * SECTOR
    pe_count = _int(pv, "pe_count", "physical volume")
    if pe_start + pe_count * extent > vol.size:
        raise UsageError("physical volume's extents extend past the end of its volume")
    lvs = vg.get("logical_volumes", {})
    if not isinstance(lvs, dict):
        raise UsageError("LVM logical_volumes is not a section")

    # Which LVs other LVs name (pools, origins, COW stores, sub-LVs, pvmove...)
    referenced: set[str] = set()

    def strings(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [x for x in node if isinstance(x, str)]
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        return []

    for name, lv in lvs.items():
        if isinstance(lv, dict):
            for seg in lv.values():
                if isinstance(seg, dict):
                    referenced.update(s for s in strings(seg) if s in lvs and s != name)

    taken: list[tuple[int, int, str]] = []  # extents of this PV used by any LV segment
    out: list[Volume] = []
    for name, lv in lvs.items():
        if not isinstance(lv, dict):
            raise UsageError(f"LVM logical volume {name!r} is not a section")
        segs = [v for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)]
        linear = True
        pieces: list[tuple[int, int, int]] = []  # (lv extent, pv extent, count)
        for seg in segs:
            stripes = seg.get("stripes")
            on_pv = (seg.get("type") == "striped" and seg.get("stripe_count") == 1 and isinstance(stripes, list)
                     and len(stripes) == 2 and stripes[0] == pvname and isinstance(stripes[1], int))
            if isinstance(stripes, list):  # record every extent of this PV that any segment uses
                for i in range(0, len(stripes) - 1, 2):
                    if stripes[i] == pvname and isinstance(stripes[i + 1], int):
                        count = _int(seg, "extent_count", name)
                        sc = seg.get("stripe_count")
                        per = count // sc if isinstance(sc, int) and sc > 0 else count
                        taken.append((stripes[i + 1], stripes[i + 1] + per, name))
            if not on_pv:
                linear = False
                continue
            pieces.append((_int(seg, "start_extent", name), stripes[1], _int(seg, "extent_count", name)))
        status = lv.get("status", [])
        if (not linear or not pieces or name in referenced or not isinstance(status, list)
                or "VISIBLE" not in status):
            continue
        pieces.sort()
        pos = 0
        vpos = 0
        fixed: list[tuple[int, int, int]] = []
        for lv_ext, pv_ext, count in pieces:
            if lv_ext != pos or count == 0:
                raise UsageError(f"logical volume {name!r} has gaps or overlaps in its segments")
            if pv_ext + count > pe_count:
                raise UsageError(f"logical volume {name!r} uses extents past the end of its PV")
            sub = vol.sub(pe_start + pv_ext * extent, count * extent)
            if sub.size != count * extent:
                raise UsageError("logical volume extends past its physical volume")
            for _v, d, n in sub.segments:
                fixed.append((vpos, d, n))
                vpos += n
            pos += count
        le = lv.get("extent_count")
        if le is not None and le != pos:
            raise UsageError(f"logical volume {name!r} disagrees about its size")
        out.append(Volume(vol.disk, fixed, f"{vgname}/{name}"))
    taken.sort()
    for (_a0, a1, an), (b0, _b1, bn) in zip(taken, taken[1:], strict=False):
        if b0 < a1:
            raise UsageError(f"logical volumes {an!r} and {bn!r} share extents")
    for a0, a1, an in taken:
        if a0 < 0 or a1 > pe_count:
            raise UsageError(f"logical volume {an!r} uses extents past the end of its PV")
    return out
