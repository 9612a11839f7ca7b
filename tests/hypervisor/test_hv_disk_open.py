"""Issue 13: one way to open a disk path for everybody, and one type from every DiskReader.

* The Python API backs up an image file as its virtual disk, exactly as the CLI does.
* ``vmbak usage IMAGE`` reads the virtual disk, not the container.
* The usage analysis gives the same answer through every kind of reader (raw file, image
  file through QEMU, NBD export, ``vmbak track`` checkpoint, QEMU point-in-time view, libvirt
  pull-mode backup) on an MBR disk, a GPT disk and an LVM disk, and every reader's ``pread``
  returns ``bytes``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hvutil import B, MiB, qemu_img, to_raw

import vmbak
from vmbak.disks.base import DiskReader
from vmbak.usage import analyze

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "usage"))
from fatlvm_util import PhysicalVolume, build_fat, garbage_file, make_files, place, sfdisk, write_lv  # noqa: E402

SIZE = 16 * MiB
TOOLS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def _tool(name: str) -> str:
    found = shutil.which(name) or next((os.path.join(d, name) for d in TOOLS
                                        if os.access(os.path.join(d, name), os.X_OK)), None)
    assert found, f"{name} is not installed"
    return found


def _ext4(path: Path, size: int, tree: Path) -> Path:
    garbage_file(path, size, seed=7)
    subprocess.run([_tool("mkfs.ext4"), "-q", "-F", "-E", "nodiscard", "-d", str(tree), str(path),
                    f"{size // 1024}k"], check=True, capture_output=True)
    return path


def _partitioned(tmp: Path, label: str) -> Path:
    """A 16 MiB disk (free space holds garbage) with one ext4 partition of 12 MiB at 1 MiB."""
    tree = tmp / f"tree-{label}"
    make_files(tree, seed=3, nfiles=4, max_size=100_000)
    fs = _ext4(tmp / f"fs-{label}.img", 12 * MiB, tree)
    disk = garbage_file(tmp / f"{label}.raw", SIZE, seed=11)
    ptype = "83" if label == "dos" else "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    sfdisk(disk, f"label: {label}\nstart=2048, size={12 * MiB // 512}, type={ptype}\n")
    place(disk, fs, MiB)
    return disk


def _lvm_disk(tmp: Path) -> Path:
    """A whole-disk LVM physical volume with one LV holding a FAT16 filesystem."""
    pvf = tmp / "lvm.raw"
    with PhysicalVolume(tmp, pvf, 24 * MiB, f"vgr{secrets.token_hex(2)}", extent="4m", seed=5) as pv:
        pv.create("fat", "12m")
        layout = pv.layout()
    fs = tmp / "fat.img"
    make_files(tmp / "tree-lvm", seed=1, nfiles=3, max_size=50_000)
    build_fat(fs, 12 * MiB, 16, tmp / "tree-lvm", seed=2, label="INLV")
    write_lv(pvf, layout["fat"], fs)
    return pvf


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("disks")
    return {"mbr": _partitioned(tmp, "dos"), "gpt": _partitioned(tmp, "gpt"), "lvm": _lvm_disk(tmp)}


def _usage(reader: DiskReader) -> dict:
    """The usage report of a reader, without the parts that name the reader."""
    assert type(reader.pread(4096, 0)) is bytes, f"{type(reader).__name__}.pread returns {type(reader.pread(1, 0))}"
    rep = analyze(reader).to_json()
    rep.pop("disk", None)
    return rep


def _check_expected(kind: str, rep: dict) -> None:
    names = {v["name"]: v for v in rep["volumes"]}
    if kind == "mbr":
        assert rep["partition_table"] == "mbr" and names["p1"]["filesystem"] == "ext4", rep
    elif kind == "gpt":
        assert rep["partition_table"] == "gpt" and names["p1"]["filesystem"] == "ext4", rep
    else:
        assert names["disk"]["filesystem"] == "lvm" and any(n.endswith("/fat") for n in names), rep
    assert rep["free_bytes"] > 4 * MiB, rep


# ---------------------------------------------------------------------------- defects 2 and 8
def test_api_backs_up_an_image_as_its_virtual_disk(tmp_path: Path, disks: dict[str, Path], run_vmbak) -> None:
    """vmbak.backup(repo, "x.qcow2") stores the 16 MiB virtual disk (as the CLI does), not
    the qcow2 container, and restores to the virtual disk's bytes."""
    img = tmp_path / "gpt.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disks["gpt"], img)
    assert os.path.getsize(img) != SIZE
    repo = vmbak.Repository.init(str(tmp_path / "repo"), password=None, encryption="none")
    m = vmbak.backup(repo, img, name="x", block_size=B)
    assert m.disk_size == SIZE, "the API backed up the image container, not its virtual disk"
    assert m.extra.get("image", {}).get("format") == "qcow2"
    cli = json.loads(run_vmbak("-r", tmp_path / "repo", "--json", "backup", img, "--name", "y").stdout.splitlines()[-1])
    assert cli["disk_size"] == m.disk_size and cli["change_id"] == m.change_id
    vmbak.restore(repo, m, tmp_path / "r.raw")
    assert (tmp_path / "r.raw").read_bytes()[:MiB] == to_raw(img, tmp_path / "t.raw").read_bytes()[:MiB]
    with vmbak.open_disk(img) as d:
        assert d.size == SIZE


def test_usage_reads_an_image_as_its_virtual_disk(tmp_path: Path, disks: dict[str, Path], run_vmbak) -> None:
    raw = json.loads(run_vmbak("usage", disks["gpt"], "--json").stdout)
    img = tmp_path / "gpt.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disks["gpt"], img)
    rep = json.loads(run_vmbak("usage", img, "--json").stdout)
    assert rep["partition_table"] == "gpt", rep
    assert rep["volumes"] == raw["volumes"] and rep["free_bytes"] == raw["free_bytes"]
    forced = json.loads(run_vmbak("usage", img, "--format", "raw", "--json").stdout)
    assert forced["partition_table"] == "none"  # --format raw reads the container, as backup does


# ---------------------------------------------------------------------------- defect 7
@contextmanager
def _raw_reader(path: Path) -> Iterator[object]:
    with vmbak.open_disk(path) as d:
        yield d


@contextmanager
def _image_reader(path: Path) -> Iterator[object]:
    img = path.with_suffix(".qcow2")
    if not img.exists():
        qemu_img("convert", "-f", "raw", "-O", "qcow2", path, img)
    d = vmbak.open_disk(img)
    try:
        assert type(d).__name__ == "ImageDisk"
        yield d
    finally:
        d.close()


@contextmanager
def _nbd_reader(q) -> Iterator[object]:  # noqa: ANN001 - an hvutil.Qsd
    from vmbak.disks.nbd import NbdDisk

    with NbdDisk(q.nbd_sock, "disk0") as d:
        yield d


@contextmanager
def _qemu_reader(q) -> Iterator[object]:  # noqa: ANN001 - an hvutil.Qsd
    from vmbak.changes.qemu import open_session

    with open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock) as s:
        yield s.reader


@contextmanager
def _tracker(path: Path, sockdir: Path) -> Iterator[str]:
    """A `vmbak track` of a copy of ``path``; yields its socket."""
    from vmbak.tracker import daemon

    copy = sockdir / f"{path.stem}.raw"
    shutil.copyfile(path, copy)
    sock = str(sockdir / f"{path.stem}.sock")
    st = daemon.start(str(copy), sock)
    try:
        yield sock
    finally:
        daemon.stop(sock)
        assert daemon.wait_gone(int(st["pid"]), 10)


@contextmanager
def _track_reader(path: Path, sockdir: Path) -> Iterator[object]:
    from vmbak.tracker.client import TrackerClient

    with _tracker(path, sockdir) as sock, TrackerClient(sock) as c:
        cp = c.checkpoint(None, B)
        try:
            yield cp.reader
        finally:
            cp.abort()


@pytest.mark.parametrize("kind", ["mbr", "gpt", "lvm"])
def test_usage_through_every_reader(kind: str, disks: dict[str, Path], qsd, sockdir: Path) -> None:
    """The same usage report from the raw file, the image, an NBD export, a tracker
    checkpoint and a QEMU point-in-time view (libvirt: the next test)."""
    path = disks[kind]
    with _raw_reader(path) as d:
        want = _usage(d)
    _check_expected(kind, want)
    served = sockdir / f"qsd-{path.name}"
    shutil.copyfile(path, served)
    q = qsd(served, fmt="raw")  # a qemu-storage-daemon: its NBD export, and its QMP for fleecing
    readers = {"image": lambda: _image_reader(path), "nbd": lambda: _nbd_reader(q),
               "tracker": lambda: _track_reader(path, sockdir), "qemu": lambda: _qemu_reader(q)}
    for name, opener in readers.items():
        with opener() as r:
            assert _usage(r) == want, f"{name} reader: usage differs from the raw file's"


def test_usage_through_libvirt_readers(disks: dict[str, Path]) -> None:
    """A running libvirt domain with the three disks: the pull-mode backup's readers."""
    import libvirt
    from test_hv_libvirt import URI, _fix_kvm, _start_libvirtd

    from vmbak.changes.libvirt import begin_backup

    want = {}
    for kind, path in disks.items():
        with _raw_reader(path) as d:
            want[kind] = _usage(d)
    _fix_kvm()
    _start_libvirtd()
    workdir = Path(f"/var/tmp/vmbak-test-lvr-{os.getpid()}-{secrets.token_hex(3)}")
    workdir.mkdir(mode=0o755)
    os.chmod(workdir, 0o755)
    targets = {"mbr": "vda", "gpt": "vdb", "lvm": "vdc"}
    xml_disks = ""
    for kind, tgt in targets.items():
        shutil.copyfile(disks[kind], workdir / f"{kind}.raw")
        xml_disks += (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                      f"<source file='{workdir / f'{kind}.raw'}'/><target dev='{tgt}' bus='virtio'/></disk>")
    name = f"vmbak-t-{os.getpid()}-{secrets.token_hex(3)}"
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices>"
           f"<emulator>/usr/bin/qemu-system-x86_64</emulator>{xml_disks}</devices></domain>")
    libvirt.registerErrorHandler(lambda *a: None, None)
    conn = libvirt.open(URI)
    dom = None
    try:
        dom = conn.defineXML(xml)
        dom.create()
        with begin_backup(name, None, B, uri=URI) as b:
            for kind, tgt in targets.items():
                assert _usage(b.disks[tgt].reader) == want[kind], f"libvirt reader of {tgt}: usage differs"
    finally:
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError:
                pass
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError:
                pass
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_track_backup_of_a_gpt_disk(disks: dict[str, Path], repo, sockdir: Path) -> None:
    """`vmbak backup --changes track:SOCK` of a GPT disk (it crashed in the partition parser
    on the tracker's bytearray) skips the free blocks like a backup of the file."""
    with _tracker(disks["gpt"], sockdir) as sock:
        m = repo.json("backup", "--name", "g", "--changes", f"track:{sock}")
    f = repo.backup(disks["gpt"], "f")
    assert m["disk_size"] == f["disk_size"] == SIZE
    assert m["stats"]["read_bytes"] == f["stats"]["read_bytes"] < SIZE - 4 * MiB
