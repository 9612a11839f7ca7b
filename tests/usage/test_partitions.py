"""Partition tables: GPT primary/backup, protective MBR, damaged tables never free used space."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from usage_helpers import usage_helpers  # tests/usage is on sys.path (it has no __init__.py)

from vmbak.usage.model import subtract, total

MiB = 1 << 20


def _gpt_disk(tmp, build_ext, file_tree, seed=1):
    disk = tmp / "disk.img"
    disk.write_bytes(np.random.default_rng(seed).bytes(40 * MiB))
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, size=32768, type=L\n"
                   "start=34816, size=32768, type=L\n", text=True, check=True, capture_output=True)
    file_tree(tmp / "tree", seed=seed, nfiles=5)
    for i, start in enumerate((2048, 34816)):
        fs = build_ext(tmp / f"p{i}.img", 16 * MiB, ["-t", "ext4", "-b", "1024"], tmp / "tree", seed=i)
        subprocess.run(["dd", f"if={fs}", f"of={disk}", "bs=1M", f"seek={start * 512}", "oflag=seek_bytes",
                        "conv=notrunc", "status=none"], check=True)
    return disk


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory):
    h = usage_helpers()
    tmp = tmp_path_factory.mktemp("gpt")
    return _gpt_disk(tmp, h.build_ext_image, h.make_tree)


def test_gpt_primary_damaged_uses_backup(gpt_disk, tmp_path, analyze_image):
    good = analyze_image(gpt_disk)
    assert good.scheme == "gpt" and [e.fstype for e in good.entries] == ["ext4", "ext4"]
    data = bytearray(gpt_disk.read_bytes())
    data[512 + 60] ^= 0xFF  # the disk GUID, inside the primary header: its CRC fails
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    u = analyze_image(bad)
    assert u.scheme == "gpt" and any("backup" in n for n in u.notes)
    assert np.array_equal(u.free, good.free)
    # both headers gone: a protective MBR with nothing behind it is all used
    data[len(data) - 512 + 60] ^= 0xFF
    bad.write_bytes(bytes(data))
    u = analyze_image(bad)
    assert u.free_bytes == 0 and u.notes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["mbr", "gpt-header", "gpt-entries", "backup"]), pos=st.integers(0, 1 << 16),
       nbytes=st.integers(1, 16), seed=st.integers(0, 2**32 - 1), both=st.booleans())
def test_damaged_tables_never_free_used_blocks(gpt_disk, tmp_path, analyze_image, where, pos, nbytes,
                                               seed, both):
    baseline = analyze_image(gpt_disk).free
    data = bytearray(gpt_disk.read_bytes())
    size = len(data)
    regions = {"mbr": (0, 512), "gpt-header": (512, 1024), "gpt-entries": (1024, 1024 + 128 * 128),
               "backup": (size - 512 - 128 * 128, size)}
    rng = np.random.default_rng(seed)
    targets = [regions[where]] + ([regions["backup"]] if both and where != "backup" else [])
    for a, b in targets:
        off = a + pos % (b - a)
        n = min(nbytes, b - off)
        data[off:off + n] = rng.bytes(n)
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    u = analyze_image(bad)
    assert total(subtract(u.free, baseline)) == 0, (where, u.notes, [e.notes for e in u.entries])


def test_mbr_loop_and_out_of_range_entries(tmp_path, analyze_image):
    disk = tmp_path / "loop.img"
    disk.write_bytes(bytes(8 * MiB))
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: dos\nstart=2048, type=5\nstart=4096, size=2048, type=83\n"
                   "start=8192, size=2048, type=83\n", text=True, check=True, capture_output=True)
    data = bytearray(disk.read_bytes())
    # point the second logical partition's "next" link back at the first EBR: a loop
    ebr2 = None
    for lba in range(2048, 16384):
        sec = data[lba * 512: lba * 512 + 512]
        if sec[510:512] == b"\x55\xaa" and lba != 2048 and sec[446 + 4] == 0x83:
            ebr2 = lba
            break
    assert ebr2 is not None
    data[ebr2 * 512 + 462: ebr2 * 512 + 478] = bytes([0, 0, 0, 0, 5, 0, 0, 0]) + (ebr2 - 2048).to_bytes(4, "little") + \
        (100).to_bytes(4, "little")
    disk.write_bytes(bytes(data))
    u = analyze_image(disk)
    assert u.scheme == "mbr" and any("loops" in n for n in u.notes)
    assert u.free_bytes == 0
