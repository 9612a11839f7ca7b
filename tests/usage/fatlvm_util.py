"""Helpers for the FAT, exFAT, btrfs and LVM usage tests: real images built with real tools.

Images are files pre-filled with random bytes (free space holds garbage, as on a used disk),
then formatted and populated without mounting: ``mkfs.vfat`` + ``mcopy``, ``mkfs.exfat`` (+ the
entry writer in ``test_exfat.py``), ``mkfs.btrfs --rootdir``, ``sfdisk``, and LVM's own tools
on a loop device with activation disabled (no device-mapper here).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vmbak.disks.raw import RawDisk
from vmbak.usage import DiskUsage, analyze
from vmbak.usage.model import normalize, subtract, total

MiB = 1 << 20
TOOLS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def tool(name: str) -> str:
    for d in TOOLS:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    raise AssertionError(f"{name} is not installed; scripts/setup.sh must install it")


def run(*cmd: object, input: str | None = None, env: dict[str, str] | None = None) -> str:
    args = [os.fspath(c) if isinstance(c, os.PathLike) else str(c) for c in cmd]
    if not os.path.isabs(args[0]):
        args[0] = tool(args[0])
    p = subprocess.run(args, input=input, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def garbage_file(path: Path, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(rng.bytes(n))
            left -= n
    return path


def analyze_path(path: str | os.PathLike[str]) -> DiskUsage:
    with RawDisk(path) as d:
        return analyze(d)


def make_files(root: Path, seed: int, nfiles: int = 10, max_size: int = 300_000,
               dirs: int = 3) -> dict[str, bytes]:
    """Files in nested directories, some empty, some text, some random; {relative path: content}."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for i in range(nfiles):
        d = f"dir{i % dirs}" if dirs else ""
        if dirs and i % 3 == 2:
            d += f"/sub{i % 2}"
        rel = f"{d}/file-{i}.dat" if d else f"file-{i}.dat"
        n = 0 if i == 4 else int(rng.integers(1, max_size))
        data = rng.bytes(n) if i % 2 else (b"text line %d of the file\n" % i) * (n // 24 + 1)
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[rel] = data
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_subset(ours: np.ndarray, oracle: np.ndarray) -> int:
    """Fail if we call free a byte the oracle calls used; return the bytes we miss."""
    wrong = subtract(ours, oracle)
    assert total(wrong) == 0, f"vmbak calls {total(wrong)} used bytes free, first at {wrong[:3].tolist()}"
    return total(oracle) - total(ours)


def partclone_free(fs: str, image: str | os.PathLike[str], offset: int = 0) -> np.ndarray:
    """Free byte ranges from ``partclone.<fs> -D`` (the ``?`` lines of its domain file)."""
    dom = f"{os.fspath(image)}.{os.getpid()}.dom"
    try:
        run(f"partclone.{fs}", "-D", "-q", "-s", image, "-o", dom)
        free = []
        for line in Path(dom).read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0].startswith("0x") and parts[2] == "?":
                pos, size = int(parts[0], 16), int(parts[1], 16)
                free.append((pos + offset, pos + size + offset))
        return normalize(np.array(free, np.int64).reshape(-1, 2))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dom)


def sfdisk(img: Path, script: str) -> None:
    run("sfdisk", "-q", img, input=script)


def place(disk: Path, fs: Path, offset: int) -> None:
    with open(fs, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(offset)
        shutil.copyfileobj(src, dst, 4 * MiB)


def extract(disk: Path, out: Path, offset: int, size: int) -> Path:
    with open(disk, "rb") as src, open(out, "wb") as dst:
        src.seek(offset)
        left = size
        while left:
            b = src.read(min(left, 4 * MiB))
            assert b, "short image"
            dst.write(b)
            left -= len(b)
    return out


def corrupt(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


def flip_byte(src: Path, dst: Path, offset: int) -> Path:
    """A copy of ``src`` with every bit of the byte at ``offset`` inverted: a change for
    sure, whatever the byte was (a fixed value can equal a random serial number)."""
    with open(src, "rb") as f:
        f.seek(offset)
        old = f.read(1)[0]
    return corrupt(src, dst, offset, bytes([old ^ 0xFF]))


# ---------------------------------------------------------------------------- FAT
def build_fat(path: Path, size: int, bits: int, files_root: Path | None, seed: int, spc: int | None = None,
              nfats: int = 2, label: str | None = None, fragment: bool = False) -> dict[str, bytes]:
    """mkfs.vfat -F bits on a garbage-filled file, then mcopy the tree in. With ``fragment``,
    files are copied, some deleted and a large one copied into the holes (a fragmented chain).
    Returns the files in the image."""
    garbage_file(path, size, seed)
    args = ["mkfs.vfat", "-F", bits, "-f", nfats]
    if spc:
        args += ["-s", spc]
    if label:
        args += ["-n", label]
    run(*args, path)
    files: dict[str, bytes] = {}
    if files_root is not None:
        entries = sorted(files_root.iterdir()) if files_root.exists() else []
        if entries:
            run("mcopy", "-s", "-i", path, *entries, "::")
        files.update(read_tree(files_root))
    if fragment:
        rng = np.random.default_rng(seed + 1)
        tmp = path.parent / f"{path.name}.frag"
        tmp.mkdir(exist_ok=True)
        small = []
        for i in range(6):
            p = tmp / f"hole{i}.bin"
            p.write_bytes(rng.bytes(int(rng.integers(5_000, 40_000))))
            small.append(p)
        run("mcopy", "-i", path, *small, "::")
        for i in (0, 2, 4):
            run("mdel", "-i", path, f"::/hole{i}.bin")
        if bits == 32:  # FSInfo's next-free hint to "unknown", so mtools fills the holes first
            with open(path, "r+b") as f:
                fsinfo = int.from_bytes(f.read(512)[48:50], "little")
                f.seek(fsinfo * 512 + 492)
                f.write(b"\xff\xff\xff\xff")
        big = tmp / "fragmented.bin"
        big.write_bytes(rng.bytes(200_000))
        run("mcopy", "-i", path, big, "::")
        for i in (1, 3, 5):
            files[f"hole{i}.bin"] = small[i].read_bytes()
        files["fragmented.bin"] = big.read_bytes()
        shutil.rmtree(tmp)
    return files


def fsck_fat_counts(img: Path) -> tuple[int, int]:
    """(used clusters, data clusters) as fsck.fat counts them; asserts the filesystem is clean."""
    out = run("fsck.vfat", "-n", img)
    m = re.search(r"(\d+) files, (\d+)/(\d+) clusters", out)
    assert m, out
    return int(m.group(2)), int(m.group(3))


def fat_chains(img: Path, paths: list[str]) -> list[int]:
    """Cluster numbers mtools lists for the files and directories ``paths``."""
    clusters: list[int] = []
    for i in range(0, len(paths), 50):
        out = run("mshowfat", "-i", img, *[f"::/{p}" for p in paths[i:i + 50]])
        for m in re.finditer(r"<([^>]*)>", out):
            for part in m.group(1).split():
                a, _, b = part.partition("-")
                clusters.extend(range(int(a), int(b or a) + 1))
    return clusters


def extract_fat(img: Path, dest: Path) -> dict[str, bytes]:
    dest.mkdir(parents=True)
    if run("mdir", "-b", "-i", img, "::").strip():
        run("mcopy", "-s", "-n", "-i", img, "::/*", dest)
    return read_tree(dest)


# ---------------------------------------------------------------------------- LVM
@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    dev = run("losetup", "-f", "--show", path).strip()
    try:
        yield dev
    finally:
        subprocess.run([tool("losetup"), "-d", dev], capture_output=True)


def lvm_env(tmp: Path) -> dict[str, str]:
    """LVM commands confined to a private config dir (no system backups, archives or hints)."""
    d = tmp / "lvm-etc"
    d.mkdir(exist_ok=True)
    (d / "lvm.conf").write_text(
        "global { use_lvmetad = 0 }\nbackup { backup = 0\narchive = 0 }\n"
        "devices { obtain_device_list_from_udev = 0\nhints = \"none\"\nuse_devicesfile = 0 }\n")
    env = dict(os.environ)
    env.update({"LVM_SYSTEM_DIR": os.fspath(d), "LVM_SUPPRESS_FD_WARNINGS": "1"})
    return env


def lvm(env: dict[str, str], dev: str, cmd: str, *args: object) -> str:
    """One LVM command restricted to ``dev``, with activation disabled (no device-mapper)."""
    return run("lvm", cmd, "--devices", dev, "--driverloaded", "n", *args, env=env)


class PhysicalVolume:
    """A PV in a garbage-filled file on a loop device, with a VG on it, driven by LVM's tools.

    ``layout()`` asks LVM itself (``lvs --segments``) where each LV's extents lie: the
    independent oracle for the parser's segment maps."""

    def __init__(self, tmp: Path, path: Path, size: int, vg: str = "vg0", extent: str = "1m",
                 metadatacopies: int = 1, seed: int = 0) -> None:
        self.tmp, self.path, self.vg = tmp, path, vg
        garbage_file(path, size, seed)
        self.env = lvm_env(tmp)
        self._loop = loop_device(path)
        self.dev = self._loop.__enter__()
        try:
            lvm(self.env, self.dev, "pvcreate", "-ff", "-y", "--pvmetadatacopies", metadatacopies, self.dev)
            lvm(self.env, self.dev, "vgcreate", "-s", extent, vg, self.dev)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PhysicalVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.__exit__(None, None, None)
            self._loop = None

    def run(self, cmd: str, *args: object) -> str:
        return lvm(self.env, self.dev, cmd, *args)

    def create(self, name: str, size: str) -> None:
        self.run("lvcreate", "-an", "-Zn", "-y", "-L", size, "-n", name, self.vg)

    def extend(self, name: str, size: str) -> None:
        self.run("lvextend", "-L", f"+{size}", f"{self.vg}/{name}")

    def number(self, what: str, field: str) -> int:
        out = self.run(what, "--noheadings", "--units", "b", "--nosuffix", "-o", field)
        return int(out.split()[0])

    def seqno(self) -> int:
        return self.number("vgs", "vg_seqno")

    def layout(self) -> dict[str, list[tuple[int, int, int]]]:
        """{lv name: [(lv byte offset, pv byte offset, length)]} as LVM reports it."""
        pe_start = self.number("pvs", "pe_start")
        extent = self.number("vgs", "vg_extent_size")
        out = self.run("lvs", "-a", "--segments", "--noheadings", "--units", "b", "--nosuffix",
                       "--separator", "|", "-o", "lv_name,seg_start_pe,seg_pe_ranges", self.vg)
        lay: dict[str, list[tuple[int, int, int]]] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) != 3 or not parts[2].startswith(self.dev + ":"):
                continue
            name, start = parts[0].strip("[]"), int(parts[1])
            a, b = parts[2].split(":")[1].split("-")
            lay.setdefault(name, []).append((start * extent, pe_start + int(a) * extent,
                                             (int(b) - int(a) + 1) * extent))
        return {k: sorted(v) for k, v in lay.items()}


def write_lv(image: Path, pieces: list[tuple[int, int, int]], fs: Path, base: int = 0) -> None:
    """Write the filesystem image ``fs`` into an LV's pieces (pv offsets shifted by ``base``)."""
    data = fs.read_bytes()
    assert len(data) == sum(n for _v, _p, n in pieces)
    with open(image, "r+b") as f:
        for v, p, n in pieces:
            f.seek(base + p)
            f.write(data[v:v + n])


def read_lv(image: Path, pieces: list[tuple[int, int, int]], out: Path, base: int = 0) -> Path:
    with open(image, "rb") as f, open(out, "wb") as o:
        for _v, p, n in pieces:
            f.seek(base + p)
            o.write(f.read(n))
    return out


# ---------------------------------------------------------------------------- exFAT
def _name_hash(name: str) -> int:
    h = 0
    for b in name.upper().encode("utf-16-le"):
        h = ((((h & 1) << 15) | (h >> 1)) + b) & 0xFFFF
    return h


def _set_checksum(entries: bytes) -> int:
    s = 0
    for i, x in enumerate(entries):
        if i in (2, 3):
            continue
        s = ((((s & 1) << 15) | (s >> 1)) + x) & 0xFFFF
    return s


class ExfatWriter:
    """Adds files and directories to an exFAT made by mkfs.exfat, as a driver would: clusters
    taken from the allocation bitmap, contiguous files flagged NoFatChain, fragmented files
    chained in the FAT, entry sets with name hashes and set checksums. Only ASCII names.
    ``fsck.exfat -n`` judges the result; dissect.fat reads it back."""

    STAMP = (44 << 25) | (1 << 21) | (1 << 16) | (12 << 11)  # 2024-01-01 12:00

    def __init__(self, path: Path) -> None:
        import struct

        self.path = path
        self.f = open(path, "r+b")  # noqa: SIM115
        bs = self._pread(0, 512)
        self.bps = 1 << bs[108]
        self.cs = self.bps << bs[109]
        self.fat_off, _fat_len, self.heap, self.count, root = struct.unpack_from("<IIIII", bs, 80)
        self.fat_off *= self.bps
        self.heap *= self.bps
        self.root = [root]
        raw = self._pread(self.coff(root), self.cs)
        for i in range(0, self.cs, 32):
            if raw[i] == 0x81:
                self.bm_first, self.bm_len = struct.unpack_from("<IQ", raw, i + 20)
        self.bitmap = bytearray(self._pread(self.coff(self.bm_first), self.bm_len))
        self.dirs: dict[int, tuple[list[int], bytearray]] = {root: ([root], bytearray(raw))}
        self.fat_entry = lambda c: int.from_bytes(self._pread(self.fat_off + 4 * c, 4), "little")
        assert self.fat_entry(root) == 0xFFFFFFFF, "mkfs.exfat made a root of one cluster"
        if self.cs < 4096:  # grow the root (a FAT chain) to 4 KiB, so it holds enough entries
            more = self.alloc(4096 // self.cs - 1, False)
            chain = [root, *more]
            for a, b in zip(chain, chain[1:] + [0xFFFFFFFF], strict=True):
                self._pwrite(self.fat_off + 4 * a, b.to_bytes(4, "little"))
            self.dirs[root] = (chain, bytearray(raw) + bytearray(len(more) * self.cs))

    def coff(self, c: int) -> int:
        return self.heap + (c - 2) * self.cs

    def _pread(self, off: int, n: int) -> bytes:
        self.f.seek(off)
        return self.f.read(n)

    def _pwrite(self, off: int, data: bytes) -> None:
        self.f.seek(off)
        self.f.write(data)

    def is_free(self, c: int) -> bool:
        i = c - 2
        return not self.bitmap[i // 8] >> (i % 8) & 1

    def alloc(self, n: int, fragmented: bool) -> list[int]:
        out: list[int] = []
        if not fragmented:
            run = 0
            for c in range(2, self.count + 2):
                run = run + 1 if self.is_free(c) else 0
                if run == n:
                    out = list(range(c - n + 1, c + 1))
                    break
        else:  # every other free cluster: never two in a row
            c = 2
            while len(out) < n and c < self.count + 2:
                if self.is_free(c) and (not out or c > out[-1] + 1):
                    out.append(c)
                c += 1
        assert len(out) == n, "exFAT image full"
        for c in out:
            i = c - 2
            self.bitmap[i // 8] |= 1 << (i % 8)
        if fragmented:
            for a, b in zip(out, out[1:] + [0xFFFFFFFF], strict=True):
                self._pwrite(self.fat_off + 4 * a, b.to_bytes(4, "little"))
        return out

    def _add_entries(self, dir_cluster: int, name: str, attr: int, first: int, length: int,
                     contiguous: bool) -> None:
        import struct

        names = [name[i:i + 15] for i in range(0, len(name), 15)]
        ents = bytearray(32 * (2 + len(names)))
        ents[0], ents[1] = 0x85, 1 + len(names)
        struct.pack_into("<HH", ents, 4, attr, 0)
        struct.pack_into("<III", ents, 8, self.STAMP, self.STAMP, self.STAMP)
        s = ents[32:64]
        s[0] = 0xC0
        s[1] = 0x01 | (0x02 if contiguous and length else 0)
        s[3] = len(name)
        struct.pack_into("<H", s, 4, _name_hash(name))
        struct.pack_into("<Q", s, 8, length)
        struct.pack_into("<IQ", s, 20, first, length)
        ents[32:64] = s
        for k, part in enumerate(names):
            e = bytearray(32)
            e[0] = 0xC1
            u = part.encode("utf-16-le")
            e[2:2 + len(u)] = u
            ents[64 + 32 * k: 96 + 32 * k] = e
        struct.pack_into("<H", ents, 2, _set_checksum(bytes(ents)))
        d = self.dirs[dir_cluster][1]
        for i in range(0, len(d), 32):
            if d[i] == 0:
                assert i + len(ents) <= len(d), "directory full"
                d[i:i + len(ents)] = ents
                return
        raise AssertionError("directory full")

    def mkdir(self, parent: int, name: str) -> int:
        clusters = self.alloc(max(1, 4096 // self.cs), False)
        self.dirs[clusters[0]] = (clusters, bytearray(len(clusters) * self.cs))
        if len(clusters) > 1:  # chained in the FAT (dissect.fat reads only one cluster otherwise)
            for a, b in zip(clusters, clusters[1:] + [0xFFFFFFFF], strict=True):
                self._pwrite(self.fat_off + 4 * a, b.to_bytes(4, "little"))
        self._add_entries(parent, name, 0x10, clusters[0], len(clusters) * self.cs, len(clusters) == 1)
        return clusters[0]

    def add_file(self, parent: int, name: str, data: bytes, fragmented: bool = False) -> list[int]:
        if not data:
            self._add_entries(parent, name, 0x20, 0, 0, False)
            return []
        n = -(-len(data) // self.cs)
        clusters = self.alloc(n, fragmented and n > 1)
        for k, c in enumerate(clusters):
            self._pwrite(self.coff(c), data[k * self.cs:(k + 1) * self.cs])
        self._add_entries(parent, name, 0x20, clusters[0], len(data), not (fragmented and n > 1))
        return clusters

    def add_tree(self, files: dict[str, bytes], fragment_every: int = 3) -> None:
        made: dict[str, int] = {"": self.root[0]}
        for k, (rel, data) in enumerate(sorted(files.items())):
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made:
                    made[d] = self.mkdir(made["/".join(parts[:i - 1])], parts[i - 1])
            self.add_file(made["/".join(parts[:-1])], parts[-1], data, fragmented=k % fragment_every == 0)

    def close(self) -> None:
        self._pwrite(self.coff(self.bm_first), bytes(self.bitmap))
        for clusters, d in self.dirs.values():
            for k, c in enumerate(clusters):
                self._pwrite(self.coff(c), bytes(d[k * self.cs:(k + 1) * self.cs]))
        self.f.close()


def build_exfat(path: Path, size: int, files: dict[str, bytes], seed: int, cluster: str = "4k",
                label: str | None = None, fragment_every: int = 3) -> None:
    garbage_file(path, size, seed)
    run("mkfs.exfat", "-c", cluster, *(["-L", label] if label else []), path)
    w = ExfatWriter(path)
    try:
        w.add_tree(files, fragment_every)
    finally:
        w.close()
    fsck_exfat(path)


def fsck_exfat(path: Path) -> str:
    out = run("fsck.exfat", "-n", path)
    assert "clean" in out, out
    return out


def exfat_files(path: Path) -> dict[str, bytes]:
    """Every file of an exFAT image, read by dissect.fat (an independent reader)."""
    from dissect.fat import exfat as dexfat
    from dissect.util.stream import RunlistStream

    out: dict[str, bytes] = {}
    with open(path, "rb") as fh:
        fs = dexfat.ExFAT(fh)

        def walk(entries: dict, prefix: str) -> None:
            for name, (entry, sub) in entries.items():
                if sub is not None:
                    walk(sub, f"{prefix}{name.rstrip('/')}/")
                    continue
                st = entry.stream
                if st.data_length == 0:
                    out[f"{prefix}{name}"] = b""
                    continue
                contiguous = bool(st.flags.not_fragmented)
                runs = fs.runlist(st.location, contiguous, st.data_length if contiguous else None)
                out[f"{prefix}{name}"] = RunlistStream(fh, runs, st.data_length, fs.sector_size).read()

        root = fs.files["/"][1]
        walk(root, "")
    return out


# ---------------------------------------------------------------------------- btrfs
def build_btrfs(path: Path, size: int, files_root: Path, seed: int, *mkfs_args: object) -> None:
    garbage_file(path, size, seed)
    run("mkfs.btrfs", "-q", "-f", "-K", *mkfs_args, "--rootdir", files_root, path)


def btrfs_progs_free(img: Path) -> np.ndarray:
    """Free device bytes as btrfs-progs' own dump-tree lists the chunks and extents: unallocated
    device space, plus the parts of each chunk no EXTENT_ITEM/METADATA_ITEM covers (on every
    stripe); the first MiB and the superblock copies are used."""
    sup = run("btrfs", "inspect-internal", "dump-super", img)
    nodesize = int(re.search(r"^nodesize\s+(\d+)", sup, re.M).group(1))
    dev_total = int(re.search(r"^dev_item.total_bytes\s+(\d+)", sup, re.M).group(1))
    chunks: list[tuple[int, int, list[int]]] = []
    out = run("btrfs", "inspect-internal", "dump-tree", "-t", "chunk", img)
    for m in re.finditer(r"CHUNK_ITEM (\d+)\).*?\n\s+length (\d+).*?num_stripes (\d+)[^\n]*\n((?:\s+stripe[^\n]*\n"
                         r"\s+dev_uuid[^\n]*\n)+)", out, re.S):
        phys = [int(x) for x in re.findall(r"stripe \d+ devid \d+ offset (\d+)", m.group(4))]
        assert len(phys) == int(m.group(3))
        chunks.append((int(m.group(1)), int(m.group(2)), phys))
    assert chunks, out
    ext = []
    out = run("btrfs", "inspect-internal", "dump-tree", "-t", "extent", img)
    for b, t, n in re.findall(r"key \((\d+) (EXTENT_ITEM|METADATA_ITEM) (\d+)\)", out):
        ext.append((int(b), int(b) + (int(n) if t == "EXTENT_ITEM" else nodesize)))
    extents = normalize(np.array(ext, np.int64).reshape(-1, 2))
    used = [[0, 1 << 20]] + [[o, o + 4096] for o in (1 << 16, 1 << 26, 1 << 38)]
    free_in_chunks = []
    for logical, length, phys in chunks:
        span = np.array([[logical, logical + length]], np.int64)
        free_l = subtract(span, extents)
        for p in phys:
            used.append([p, p + length])
            free_in_chunks.append(free_l - logical + p)
    dev = np.array([[0, dev_total]], np.int64)
    free = subtract(dev, normalize(np.array(used, np.int64)))
    inside = normalize(np.concatenate(free_in_chunks)) if free_in_chunks else free[:0]
    return subtract(normalize(np.concatenate((free, inside)), 0, dev_total),
                    normalize(np.array(used[:4], np.int64)))


def btrfs_files(img: Path, dest: Path) -> dict[str, bytes]:
    """Every file of a btrfs image, extracted by ``btrfs restore`` (no mount)."""
    dest.mkdir(parents=True)
    run("btrfs", "restore", "-i", img, dest)
    return read_tree(dest)


def btrfs_check(img: Path) -> str:
    return run("btrfs", "check", "--readonly", img)
