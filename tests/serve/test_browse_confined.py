"""extract never writes outside its target, whatever names the backed-up disk holds
(issue 18, defect 7: every path taken from repository data is confined).

A volume group's name becomes a directory of the extracted tree (``/VG/LV``). The image
here is made by LVM's own tools (a loop device, activation disabled) with the VG named
``zz``; its metadata text is then renamed to ``..`` (the same length), with LVM's
checksums recomputed, as a crafted or damaged disk could hold it. (This held before issue
18 too: paths with ``..`` are refused when resolved. The test keeps it that way.)
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from vmbak.usage.lvm import MDA_HEADER_SIZE, MDA_MAGIC, lvm_crc

from .conftest import build_fs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "usage"))
from fatlvm_util import PhysicalVolume, write_lv  # noqa: E402  (the usage tests' image builders)

MiB = 1 << 20


def _rename_vg(image: Path, old: bytes, new: bytes) -> int:
    """Rename the VG in every metadata area's text, fixing the checksums; return how many."""
    assert len(old) == len(new)
    data = bytearray(image.read_bytes())
    done = 0
    pos = 0
    while (pos := data.find(MDA_MAGIC, pos)) >= 0:
        hdr_off = pos - 4
        hdr = data[hdr_off:hdr_off + MDA_HEADER_SIZE]
        loff, lsize, _lcrc, _flags = struct.unpack_from("<QQII", hdr, 40)
        text_off = hdr_off + loff
        text = data[text_off:text_off + lsize]
        assert text.startswith(old + b" {"), text[:40]
        text[:len(old)] = new
        data[text_off:text_off + lsize] = text
        struct.pack_into("<I", data, hdr_off + 56, lvm_crc(bytes(text)))
        struct.pack_into("<I", data, hdr_off, lvm_crc(bytes(data[hdr_off + 4:hdr_off + MDA_HEADER_SIZE])))
        done += 1
        pos += len(MDA_MAGIC)
    image.write_bytes(bytes(data))
    return done


def test_extract_refuses_a_volume_group_named_dot_dot(repo, assert_cli_error, tmp_path) -> None:
    import vmbak

    pvf = tmp_path / "pv.img"
    with PhysicalVolume(tmp_path, pvf, 24 * MiB, "zz", extent="1m", seed=3) as pv:
        pv.create("lv", "8m")
        layout = pv.layout()
    write_lv(pvf, layout["lv"], build_fs("ext4", tmp_path / "lv.img", 8 * MiB, {"escaped.txt": b"out\n"}))
    assert _rename_vg(pvf, b"zz", b"..") >= 1
    sid = vmbak.backup(repo.open(), pvf, name="pv").id
    assert repo.run("ls", sid).stdout.split()[-1] == "../"  # the crafted name is what the disk holds
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    before = set(tmp_path.rglob("*"))
    p = repo.run("extract", sid, "/..", "--target", out, check=False)
    assert_cli_error(p, f"snapshot {sid[:8]}", "..")
    # The whole disk: the volume is named as unsafe (a warning naming it), nothing written,
    # and the exit status says the extract is partial.
    p = repo.run("extract", sid, "/", "--target", out, check=False)
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr
    assert "unsafe volume name '..'" in p.stderr, p.stderr
    assert set(tmp_path.rglob("*")) == before, "extract wrote something"
