"""Partition tables: MBR (with extended and logical partitions) and GPT.

Only the layout is taken from here; the tables themselves and every gap between partitions
count as used, because nothing here ever reports free space.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from vmbak.disks.base import DiskReader
from vmbak.usage.model import UsageError

SECTOR = 512
MBR_EXTENDED = {0x05, 0x0F, 0x85}
MAX_LOGICAL = 128  # guards against loops in a damaged EBR chain

MBR_TYPES = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x06: "FAT16", 0x07: "NTFS/exFAT", 0x0B: "FAT32",
    0x0C: "FAT32 LBA", 0x0E: "FAT16 LBA", 0x82: "Linux swap", 0x83: "Linux", 0x8E: "Linux LVM",
    0xEF: "EFI System", 0xFD: "Linux RAID",
}
GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
}


@dataclass
class Partition:
    number: int
    start: int  # bytes from the start of the disk
    size: int  # bytes
    ptype: str  # human-readable type
    type_id: str  # MBR type byte as hex, or the GPT type GUID
    name: str = ""


@dataclass
class Table:
    scheme: str  # "gpt", "mbr" or "none"
    partitions: list[Partition]
    notes: list[str]


def _read(disk: DiskReader, offset: int, length: int) -> bytes:
    if offset < 0 or offset + length > disk.size:
        raise UsageError(f"partition table points outside the disk (offset {offset})")
    data = disk.pread(length, offset)
    if len(data) != length:
        raise UsageError(f"short read at offset {offset}")
    return data


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(status, type, first LBA, sector count) of the four entries."""
    out = []
    for i in range(4):
        e = sector[446 + 16 * i: 462 + 16 * i]
        status, ptype = e[0], e[4]
        lba, count = struct.unpack_from("<II", e, 8)
        out.append((status, ptype, lba, count))
    return out


def looks_like_mbr(sector: bytes, disk_sectors: int) -> bool:
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return False
    entries = _mbr_entries(sector)
    any_used = False
    for status, ptype, lba, count in entries:
        if status not in (0x00, 0x80):
            return False
        if ptype == 0:
            continue
        if lba == 0 or count == 0:
            return False
        any_used = True
    return any_used


def _boot_sector_is_filesystem(sector: bytes) -> bool:
    """A FAT, NTFS or exFAT boot sector also ends in 55 AA; it is not a partition table."""
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return True
    if sector[0] in (0xEB, 0xE9):
        bps = struct.unpack_from("<H", sector, 11)[0]
        spc = sector[13]
        if bps in (512, 1024, 2048, 4096) and spc and (spc & (spc - 1)) == 0:
            return True
    return False


def _parse_gpt(disk: DiskReader, notes: list[str]) -> list[Partition] | None:
    for sector in (512, 4096):
        for which, lba in (("primary", 1), ("backup", disk.size // sector - 1)):
            if lba <= 0 or (lba + 1) * sector > disk.size:
                continue
            hdr = _read(disk, lba * sector, sector)
            if hdr[:8] != b"EFI PART":
                continue
            hsize = struct.unpack_from("<I", hdr, 12)[0]
            if not 92 <= hsize <= sector:
                continue
            crc = struct.unpack_from("<I", hdr, 16)[0]
            if zlib.crc32(hdr[:16] + b"\0\0\0\0" + hdr[20:hsize]) != crc:
                notes.append(f"GPT {which} header has a bad checksum")
                continue
            first_usable, last_usable = struct.unpack_from("<QQ", hdr, 40)
            entries_lba = struct.unpack_from("<Q", hdr, 72)[0]
            n, esize, ecrc = struct.unpack_from("<III", hdr, 80)
            if esize < 128 or esize % 8 or n > 65536:
                notes.append(f"GPT {which} header has an impossible entry size or count")
                continue
            try:
                table = _read(disk, entries_lba * sector, n * esize)
            except UsageError:
                notes.append(f"GPT {which} entry array lies outside the disk")
                continue
            if zlib.crc32(table) != ecrc:
                notes.append(f"GPT {which} entry array has a bad checksum")
                continue
            if which == "backup":
                notes.append("GPT primary header is damaged; using the backup header")
            parts = []
            for i in range(n):
                e = table[i * esize: (i + 1) * esize]
                if e[:16] == b"\0" * 16:
                    continue
                tguid = str(uuid.UUID(bytes_le=e[:16]))
                first, last = struct.unpack_from("<QQ", e, 32)
                name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
                if last < first:  # the last LBA is inclusive; last < first is damage
                    notes.append(f"GPT partition {i + 1} ends before it starts; ignored")
                    continue
                start, size = first * sector, (last - first + 1) * sector
                if start + size > disk.size:
                    notes.append(f"GPT partition {i + 1} extends past the end of the disk; clipped")
                    size = max(0, disk.size - start)
                parts.append(Partition(i + 1, start, size, GPT_TYPES.get(tguid, tguid), tguid, name))
            return parts
    return None


def _parse_mbr(disk: DiskReader, sector0: bytes, notes: list[str]) -> list[Partition]:
    parts: list[Partition] = []
    nsect = disk.size // SECTOR
    for i, (_status, ptype, lba, count) in enumerate(_mbr_entries(sector0)):
        if ptype == 0:
            continue
        if lba + count > nsect:
            notes.append(f"MBR partition {i + 1} extends past the end of the disk; clipped")
            count = max(0, nsect - lba)
        if ptype in MBR_EXTENDED:
            parts.extend(_parse_ebr_chain(disk, lba, count, notes))
            continue
        parts.append(Partition(i + 1, lba * SECTOR, count * SECTOR, MBR_TYPES.get(ptype, f"0x{ptype:02x}"),
                               f"0x{ptype:02x}"))
    return parts


def _parse_ebr_chain(disk: DiskReader, ext_lba: int, ext_count: int, notes: list[str]) -> list[Partition]:
    parts = []
    seen = set()
    ebr = ext_lba
    number = 5
    while ebr and len(parts) < MAX_LOGICAL:
        if ebr in seen:
            notes.append("extended partition chain loops; stopped")
            break
        seen.add(ebr)
        try:
            sec = _read(disk, ebr * SECTOR, SECTOR)
        except UsageError:
            notes.append("extended partition chain points outside the disk; stopped")
            break
        if sec[510:512] != b"\x55\xaa":
            notes.append("extended boot record without signature; chain stopped")
            break
        entries = _mbr_entries(sec)
        _s, ptype, lba, count = entries[0]
        if ptype and count:
            start = ebr + lba
            if start + count > ext_lba + ext_count:
                notes.append(f"logical partition {number} extends past its extended partition; clipped")
                count = max(0, ext_lba + ext_count - start)
            parts.append(Partition(number, start * SECTOR, count * SECTOR, MBR_TYPES.get(ptype, f"0x{ptype:02x}"),
                                   f"0x{ptype:02x}"))
            number += 1
        _s, ntype, nlba, _n = entries[1]
        ebr = ext_lba + nlba if ntype in MBR_EXTENDED and nlba else 0
    return parts


def read_table(disk: DiskReader) -> Table:
    """The disk's partitions. A disk without a table (or with one that is not understood) is one volume."""
    notes: list[str] = []
    if disk.size < SECTOR:
        return Table("none", [], notes)
    sector0 = _read(disk, 0, SECTOR)
    mbr_ok = looks_like_mbr(sector0, disk.size // SECTOR)
    protective = mbr_ok and any(t == 0xEE for _s, t, _l, _c in _mbr_entries(sector0))
    if protective or not mbr_ok:
        gpt = _parse_gpt(disk, notes)
        if gpt is not None:
            return Table("gpt", gpt, notes)
        if protective:
            notes.append("protective MBR without a readable GPT; the whole disk counts as used")
            return Table("unknown", [], notes)
    if mbr_ok and not _boot_sector_is_filesystem(sector0):
        return Table("mbr", _parse_mbr(disk, sector0, notes), notes)
    return Table("none", [], notes)
