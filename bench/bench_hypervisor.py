#!/usr/bin/env python3
"""Benchmarks of the hypervisor disk paths, all measured in one run on one machine.

1. Reading a 4 GiB qcow2 (fully allocated, incompressible):
   * ``qemu-img convert -O raw`` of it (QEMU's own reader, writing a raw file);
   * vmbak's ImageDisk (private qemu-storage-daemon + libnbd), 1 and 2 reader threads,
     with one NBD connection per thread (vmbak's design) and with one shared
     connection (libnbd serialises the requests of a handle);
   * a whole vmbak full backup of it (read, hash, compress, pack);
   * dissect.hypervisor's pure-Python qcow2 reader, when it is importable.
2. An incremental after 1% of the disk changed (655 random 64 KiB writes through
   QEMU's NBD export), from the same point-in-time view:
   * QEMU dirty bitmap (open_session: QMP transaction, fleecing, NBD block status;
     backup of the dirty blocks; commit);
   * scan (every block read and hashed against the parent).
3. A running libvirt domain (TCG) with the image as its disk: vmbak's checkpoint and
   pull-mode backup (full, then incrementals after 1% changed) beside Debian's
   virtnbdbackup doing the same (its own checkpoints, its stream format, no compression).

    .venv/bin/python bench/bench_hypervisor.py [--runs 3] [--size-gib 4] [--workdir bench/work/hypervisor]
                                               [--only reads,incremental] [--dissect-path DIR]

It needs about 3 x size free in the work directory and size + 1 GiB in /dev/shm (that
measurement is left out otherwise), and takes about 5 minutes at 4 GiB.

Results go to WORKDIR/results.json and a table on stdout (medians of the runs).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from vmbak.changes.qemu import open_session  # noqa: E402
from vmbak.disks.nbd import NbdDisk  # noqa: E402
from vmbak.disks.qemu import open_image  # noqa: E402
from vmbak.engine.backup import BackupOptions, backup  # noqa: E402
from vmbak.repo.crypto import ENC_NONE  # noqa: E402
from vmbak.repo.repository import Repository  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
B = 64 * 1024
READ = 4 * MiB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_image(work: Path, size: int) -> Path:
    img = work / "disk.qcow2"
    if img.exists() and json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                                                  capture_output=True, text=True).stdout)["virtual-size"] == size:
        return img
    raw = work / "disk.raw"
    log(f"building a {size / GiB:.0f} GiB image of random bytes")
    rng = np.random.default_rng(4242)
    with open(raw, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(rng.bytes(64 * MiB))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True)
    raw.unlink()
    return img


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_reader(disk, threads: int) -> int:  # noqa: ANN001
    pieces = []
    for off, ln in disk.data_extents():
        for o in range(off, off + ln, READ):
            pieces.append((o, min(READ, off + ln - o)))
    total = 0
    with cf.ThreadPoolExecutor(threads) as pool:
        for n in pool.map(lambda p: len(disk.pread(p[1], p[0])), pieces):
            total += n
    return total


class SharedHandle:
    """The alternative design: one libnbd connection shared by every thread."""

    def __init__(self, disk: NbdDisk) -> None:
        import nbd

        self.h = nbd.NBD()
        self.h.set_export_name(disk.export)
        self.h.connect_unix(disk.address)
        self.size = disk.size
        self._disk = disk

    def data_extents(self):  # noqa: ANN201
        return self._disk.data_extents()

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.h.pread(length, offset))


def dissect_read(img: Path) -> float | None:
    try:
        from dissect.hypervisor.disk.qcow2 import QCow2
    except ImportError:
        return None
    with open(img, "rb") as f:
        q = QCow2(f)
        stream = q.open()
        t = time.perf_counter()
        while stream.read(READ):
            pass
        return time.perf_counter() - t


def bench_reads(img: Path, work: Path, runs: int, size: int) -> dict:
    res: dict[str, list[float]] = {k: [] for k in ("qemu-img convert -O raw (file in workdir)",
                                                   "qemu-img convert -O raw (file in /dev/shm)",
                                                   "qemu-img convert to null-co (read only)",
                                                   "vmbak reader, 1 thread",
                                                   "vmbak reader, 2 threads", "one shared NBD handle, 2 threads",
                                                   "vmbak full backup (2 workers)",
                                                   "vmbak full backup of the same data as raw")}
    out = work / "convert.raw"
    for r in range(runs):
        log(f"reads: run {r + 1}/{runs}")
        res["qemu-img convert -O raw (file in workdir)"].append(
            timed(lambda: subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], check=True)))
        # the same data as a raw file, for the backup below
        repo_dir = work / "repo-full"
        shutil.rmtree(repo_dir, ignore_errors=True)
        repo = Repository.init(str(repo_dir), None, encryption=ENC_NONE)
        with open_image(out) as raw:
            res["vmbak full backup of the same data as raw"].append(
                timed(lambda repo=repo, raw=raw: backup(repo, raw, BackupOptions(name="b", skip_unused=False))))
        shutil.rmtree(repo_dir, ignore_errors=True)
        out.unlink()
        shm = Path("/dev/shm") / f"hvbench-{os.getpid()}.raw"
        if shutil.disk_usage("/dev/shm").free > size + GiB:
            res["qemu-img convert -O raw (file in /dev/shm)"].append(
                timed(lambda shm=shm: subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(shm)],
                                                     check=True)))
            shm.unlink()
        res["qemu-img convert to null-co (read only)"].append(
            timed(lambda: subprocess.run(["qemu-img", "convert", "-n", "--target-image-opts", str(img),
                                          f"driver=null-co,size={size}"], check=True)))
        with open_image(img) as d:
            assert d.size == size
            res["vmbak reader, 1 thread"].append(timed(lambda: read_reader(d, 1)))
            res["vmbak reader, 2 threads"].append(timed(lambda: read_reader(d, 2)))
            shared = SharedHandle(d._nbd)
            res["one shared NBD handle, 2 threads"].append(timed(lambda shared=shared: read_reader(shared, 2)))
            shared.h.shutdown()
            repo_dir = work / "repo-full"
            shutil.rmtree(repo_dir, ignore_errors=True)
            repo = Repository.init(str(repo_dir), None, encryption=ENC_NONE)
            res["vmbak full backup (2 workers)"].append(
                timed(lambda repo=repo: backup(repo, d, BackupOptions(name="b", skip_unused=False))))
            shutil.rmtree(repo_dir, ignore_errors=True)
    t = dissect_read(img)
    if t is not None:
        res["dissect.hypervisor QCow2 stream, 1 thread"] = [t]
    return {k: v for k, v in res.items() if v}


class Daemon:
    def __init__(self, img: Path, d: Path) -> None:
        self.qmp = str(d / "qmp.sock")
        self.nbd = str(d / "w.sock")
        node = {"driver": "qcow2", "node-name": "disk0", "file": {"driver": "file", "filename": str(img)}}
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev", json.dumps(node),
             "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=q0", "--monitor", "chardev=q0",
             "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
             "--export", "type=nbd,id=w,node-name=disk0,name=disk0,writable=on"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        while not (os.path.exists(self.qmp) and os.path.exists(self.nbd)):
            time.sleep(0.01)
        time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def bench_incremental(img: Path, work: Path, runs: int, size: int) -> dict:
    import nbd

    vm = work / "vm.qcow2"
    shutil.copyfile(img, vm)
    sd = Path("/tmp") / f"hvbench-{os.getpid()}"
    sd.mkdir(exist_ok=True)
    dm = Daemon(vm, sd)
    res: dict[str, list[float]] = {"QEMU dirty bitmap incremental (total)": [], "  of which open_session": [],
                                   "  of which backup": [], "  of which commit": [],
                                   "scan incremental": []}
    extra: dict[str, list] = {"bitmap read MiB": [], "scan read MiB": []}
    try:
        repo_a = Repository.init(str(work / "repo-bitmap"), None, encryption=ENC_NONE)
        repo_b = Repository.init(str(work / "repo-scan"), None, encryption=ENC_NONE)
        log("incremental: full backups of the first view")
        s = open_session(dm.qmp, "disk0", None, B, nbd_server=dm.nbd)
        backup(repo_a, s.reader, BackupOptions(name="vm", change_id=s.change_id, skip_unused=False))
        backup(repo_b, s.reader, BackupOptions(name="vm", skip_unused=False))
        s.commit()
        since = s.change_id
        h = nbd.NBD()
        h.set_export_name("disk0")
        h.connect_unix(dm.nbd)
        rng = np.random.default_rng(7)
        nblocks = size // B
        for r in range(runs):
            log(f"incremental: run {r + 1}/{runs}: 1% of the blocks change")
            for blk in rng.choice(nblocks, nblocks // 100, replace=False).tolist():
                h.pwrite(rng.bytes(B), blk * B)
            h.flush()
            t0 = time.perf_counter()
            s = open_session(dm.qmp, "disk0", since, B, nbd_server=dm.nbd)
            t1 = time.perf_counter()
            ma = backup(repo_a, s.reader, BackupOptions(name="vm", change_map=s.change_map,
                                                        change_id=s.change_id, skip_unused=False))
            t2 = time.perf_counter()
            # the scan reads the very same point-in-time view, before the session ends
            ts = time.perf_counter()
            mb = backup(repo_b, s.reader, BackupOptions(name="vm", skip_unused=False))
            te = time.perf_counter()
            s.commit()
            t3 = time.perf_counter()
            since = s.change_id
            assert ma.stats["changed_bytes"] == mb.stats["changed_bytes"], (ma.stats, mb.stats)
            res["QEMU dirty bitmap incremental (total)"].append((t1 - t0) + (t2 - t1) + (t3 - te))
            res["  of which open_session"].append(t1 - t0)
            res["  of which backup"].append(t2 - t1)
            res["  of which commit"].append(t3 - te)
            res["scan incremental"].append(te - ts)
            extra["bitmap read MiB"].append(ma.stats["read_bytes"] / MiB)
            extra["scan read MiB"].append(mb.stats["read_bytes"] / MiB)
        h.shutdown()
    finally:
        dm.stop()
        shutil.rmtree(sd, ignore_errors=True)
        vm.unlink()
        for d in ("repo-bitmap", "repo-scan"):
            shutil.rmtree(work / d, ignore_errors=True)
    return {"times": res, "extra": extra}


LIBVIRT_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <console type='pty'/>
  </devices>
</domain>"""


def _start_libvirtd() -> None:
    import socket

    def listening(p: str) -> bool:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(p)
            return True
        except OSError:
            return False
        finally:
            s.close()

    for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"), ("libvirtd", "/run/libvirt/libvirt-sock")):
        if not listening(sock):
            subprocess.run([shutil.which(daemon) or f"/usr/sbin/{daemon}", "-d"], check=True)
            while not listening(sock):
                time.sleep(0.05)


def bench_libvirt(img: Path, work: Path, runs: int, size: int) -> dict:
    """vmbak's libvirt pull-mode backup (full, then incrementals after 1% changes)
    beside virtnbdbackup's, on the same kind of domain and changes."""
    import libvirt
    import libvirt_qemu

    from vmbak.changes.libvirt import begin_backup

    _start_libvirtd()
    d = Path("/var/tmp") / f"vmbak-bench-lv-{os.getpid()}"
    d.mkdir(mode=0o755)
    conn = libvirt.open("qemu:///system")
    res: dict[str, list[float]] = {"vmbak full": [], "vmbak incremental (1%)": [],
                                   "virtnbdbackup full": [], "virtnbdbackup incremental (1%)": []}
    rng = np.random.default_rng(11)
    nblocks = size // B

    def change(dom) -> None:  # noqa: ANN001
        for blk in rng.choice(nblocks, nblocks // 100, replace=False).tolist():
            libvirt_qemu.qemuMonitorCommand(
                dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend '
                f'"write -P {blk % 251} {blk * B} {B}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    try:
        for tool in ("vmbak", "virtnbdbackup"):
            image = d / f"{tool}.qcow2"
            shutil.copyfile(img, image)
            dom = conn.createXML(LIBVIRT_XML.format(name=f"vmbak-bench-{tool}", image=image))
            try:
                if tool == "vmbak":
                    repo = Repository.init(str(work / "repo-libvirt"), None, encryption=ENC_NONE)

                    def run(since: str | None, repo=repo, dom=dom) -> str:  # noqa: ANN001
                        b = begin_backup(dom.name(), since, B)
                        for tgt, v in b.disks.items():
                            backup(repo, v.reader, BackupOptions(name=f"lv-{tgt}", change_map=v.change_map,
                                                                 change_id=b.change_id, skip_unused=False))
                        b.commit()
                        return b.change_id

                    t = time.perf_counter()
                    since = run(None)
                    res["vmbak full"].append(time.perf_counter() - t)
                    for r in range(runs):
                        log(f"libvirt: vmbak incremental {r + 1}/{runs}")
                        change(dom)
                        t = time.perf_counter()
                        since = run(since)
                        res["vmbak incremental (1%)"].append(time.perf_counter() - t)
                else:
                    out = work / "virtnbdbackup-out"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = ["virtnbdbackup", "-d", dom.name(), "-o", str(out), "-n"]
                    t = time.perf_counter()
                    subprocess.run([*cmd, "-l", "full"], check=True, capture_output=True)
                    res["virtnbdbackup full"].append(time.perf_counter() - t)
                    for r in range(runs):
                        log(f"libvirt: virtnbdbackup incremental {r + 1}/{runs}")
                        change(dom)
                        t = time.perf_counter()
                        subprocess.run([*cmd, "-l", "inc"], check=True, capture_output=True)
                        res["virtnbdbackup incremental (1%)"].append(time.perf_counter() - t)
                    shutil.rmtree(out, ignore_errors=True)
            finally:
                for cp in dom.listAllCheckpoints():
                    try:
                        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                    except libvirt.libvirtError:
                        pass
                dom.destroy()
                image.unlink()
    finally:
        conn.close()
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(work / "repo-libvirt", ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "work" / "hypervisor"))
    ap.add_argument("--only", default="reads,incremental,libvirt",
                    help="comma-separated subset of reads,incremental,libvirt")
    ap.add_argument("--dissect-path", help="a directory holding dissect.hypervisor (pip install --target DIR "
                    "dissect.hypervisor), to measure its pure-Python qcow2 reader too")
    args = ap.parse_args()
    if args.dissect_path:
        sys.path.insert(0, args.dissect_path)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_gib * GiB
    img = build_image(work, size)
    only = set(args.only.split(","))
    results: dict = {"size_bytes": size, "runs": args.runs, "cpus": os.cpu_count()}
    if "reads" in only:
        results["reads"] = bench_reads(img, work, args.runs, size)
    if "incremental" in only:
        results["incremental"] = bench_incremental(img, work, args.runs, size)
    if "libvirt" in only:
        results["libvirt"] = bench_libvirt(img, work, args.runs, size)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{size / GiB:.0f} GiB qcow2, fully allocated, random bytes; {os.cpu_count()} CPUs; "
          f"median of {args.runs} runs\n")
    if "reads" in results:
        print(f"{'read the whole image':48} {'seconds':>8} {'MB/s':>8}")
        for k, v in results["reads"].items():
            m = statistics.median(v)
            print(f"{k:48} {m:8.2f} {size / m / 1e6:8.0f}")
    if "incremental" in results:
        inc = results["incremental"]
        print(f"\n{'incremental after 1% changed':48} {'seconds':>8}")
        for k, v in inc["times"].items():
            print(f"{k:48} {statistics.median(v):8.2f}")
        for k, v in inc["extra"].items():
            print(f"{k:48} {statistics.median(v):8.1f}")
    if "libvirt" in results:
        print(f"\n{'libvirt domain, pull mode (TCG guest idle)':48} {'seconds':>8}")
        for k, v in results["libvirt"].items():
            print(f"{k:48} {statistics.median(v):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
