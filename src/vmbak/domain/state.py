"""The files a libvirt domain needs besides its disks, captured with each backup and put
back by a restore.

``state_items(xml, uri)`` lists what the domain definition names:

| role | where it comes from | kept |
|---|---|---|
| ``nvram`` | ``<os><nvram>`` (UEFI variable store; the ``template`` is recorded) | stored |
| ``tpm`` | ``<tpm><backend type='emulator'>``: swtpm's state directory, ``/var/lib/libvirt/swtpm/UUID`` | stored (a tar of the directory) |
| ``kernel``, ``initrd``, ``dtb`` | ``<os><kernel>``, ``<os><initrd>``, ``<os><dtb>`` (direct kernel boot) | stored |
| ``loader`` | ``<os><loader>`` (firmware code) | read-only firmware below ``/usr/share`` (a package's, e.g. OVMF_CODE): path, size and sha256 recorded, not stored; any other loader: stored |

``capture(items, workdir, previous)`` copies each stored item into ``workdir`` (the file
is read until two reads in a row agree, so a file the hypervisor rewrites meanwhile is
not kept torn) and records its size and sha256; the backup then stores each copy as a
snapshot of its own (``PREFIX-ROLE``). ``place_tpm`` unpacks a TPM tar into a new state
directory, checking every member.

A file (any role but ``tpm``) whose ``os.stat`` (device, inode, size, modification and
change time, in nanoseconds) equals the ``stat`` recorded with the previous backup
(``previous``: role -> record) is not read again: it is ``unchanged``, its size and
sha256 are the record's, and no copy is made. A stat is recorded only when it held
still over the read that gave the content (the same before and after it) and the file's
times were at least ``SETTLED_NS`` old: a write cannot leave both times as they were
(the change time cannot be set from user space, so a write whose modification time is
put back still changes it), and a file modified within the granularity of its
timestamps is read again next time.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import stat
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from vmbak.errors import DiskError, RepositoryError

ROLES = ("nvram", "tpm", "kernel", "initrd", "dtb", "loader")
SWTPM_DIR = "/var/lib/libvirt/swtpm"  # where libvirt's qemu:///system keeps swtpm state, by domain UUID
PACKAGE_FIRMWARE_DIR = "/usr/share/"
SYSTEM_URIS = ("qemu:///system", "qemu+unix:///system")
READ_ATTEMPTS = 5
TPM_MAX_BYTES = 64 << 20  # a TPM state directory larger than this is not a TPM state directory
# A stat is trusted for the next backup only when the file's times are this much older than
# the read: a later write then cannot carry the same times (timestamps of 1 or 2 s granularity).
SETTLED_NS = 2_000_000_000
STAT_KEYS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


@dataclass
class StateItem:
    """One file (``tpm``: one directory) a domain needs besides its disks."""

    role: str
    path: str
    stored: bool
    why: str = ""  # why it is not stored
    size: int = 0
    sha256: str = ""
    template: str = ""  # nvram: the template libvirt makes a new store from
    members: list[dict] = field(default_factory=list)  # tpm: {"name", "size", "sha256"} per file
    copy: str = ""  # the local copy the backup reads (stored items)
    notes: list[str] = field(default_factory=list)
    stat: dict | None = None  # STAT_KEYS of the file whose content size/sha256 describe (see the module)
    unchanged: bool = False  # the stat equals the previous backup's record: not read, no copy

    def record(self) -> dict:
        """What the manifest keeps about this item (``extra.libvirt.state``)."""
        out: dict = {"role": self.role, "path": self.path, "stored": self.stored, "size": self.size,
                     "sha256": self.sha256}
        if self.why:
            out["why"] = self.why
        if self.template:
            out["template"] = self.template
        if self.members:
            out["members"] = self.members
        if self.stat is not None:
            out["stat"] = dict(self.stat)
        return out


def _text(el: ET.Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def tpm_state_dir(uuid: str, uri: str) -> str | None:
    """swtpm's state directory of a domain, or None when vmbak does not know where the
    libvirt at ``uri`` keeps it."""
    if uri in SYSTEM_URIS and uuid and "/" not in uuid and uuid not in (".", ".."):
        return os.path.join(SWTPM_DIR, uuid)
    return None


def state_items(xml: str, uri: str) -> list[StateItem]:
    """The files the domain definition ``xml`` names besides its disks (see the module)."""
    root = ET.fromstring(xml)
    out: list[StateItem] = []
    os_el = root.find("os")
    if os_el is not None:
        ld = os_el.find("loader")
        if _text(ld):
            path = _text(ld)
            packaged = (ld.get("readonly") == "yes"  # type: ignore[union-attr]
                        and os.path.normpath(path).startswith(PACKAGE_FIRMWARE_DIR))
            out.append(StateItem("loader", path, stored=not packaged,
                                 why="read-only firmware from a package (below /usr/share): path and sha256 "
                                 "recorded, not stored" if packaged else ""))
        nv = os_el.find("nvram")
        if nv is not None and _text(nv):
            out.append(StateItem("nvram", _text(nv), stored=True, template=nv.get("template") or ""))
        for role in ("kernel", "initrd", "dtb"):
            if _text(os_el.find(role)):
                out.append(StateItem(role, _text(os_el.find(role)), stored=True))
    for tpm in root.findall("./devices/tpm"):
        be = tpm.find("backend")
        if be is None or be.get("type") != "emulator":
            continue
        d = tpm_state_dir(_text(root.find("uuid")), uri)
        if d is None:
            out.append(StateItem("tpm", "", stored=False,
                                 why=f"vmbak does not know where libvirt at {uri} keeps swtpm state "
                                 f"(it knows {SWTPM_DIR}/UUID of qemu:///system)"))
        else:
            out.append(StateItem("tpm", d, stored=True))
        break
    return out


def stat_key(st: os.stat_result) -> dict:
    """The STAT_KEYS of a stat result."""
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _stable_read_stat(path: str, what: str) -> tuple[bytes, dict | None]:
    """The file's content, read until two reads in a row agree, and the stat that describes
    it (None when the file changed during the read or its times are not SETTLED_NS old)."""
    last = None
    for _ in range(READ_ATTEMPTS):
        try:
            with open(path, "rb") as f:
                before = os.fstat(f.fileno())
                if not stat.S_ISREG(before.st_mode):
                    raise DiskError(f"{what} {path} is not a regular file")
                data = f.read()
                key: dict | None = stat_key(os.fstat(f.fileno()))
        except FileNotFoundError:
            raise DiskError(f"{what} {path} does not exist") from None
        except OSError as e:
            raise DiskError(f"cannot read {what} {path}: {e.strerror or e}") from None
        if key != stat_key(before) or max(before.st_mtime_ns, before.st_ctime_ns) > time.time_ns() - SETTLED_NS:
            key = None
        if last is not None and data == last:
            return data, key
        last = data
    raise DiskError(f"{what} {path} changed on every one of {READ_ATTEMPTS} reads; it cannot be backed up consistently")


def _stable_read(path: str, what: str) -> bytes:
    """The file's content, read until two reads in a row agree."""
    return _stable_read_stat(path, what)[0]


def _unchanged(it: StateItem, prev: object) -> bool:
    """Whether the file of ``it`` is the one the previous backup recorded (``prev``): the
    same path and role, a recorded stat, and the file's stat equal to it. Then ``it`` takes
    the record's size, sha256 and stat."""
    if not isinstance(prev, dict) or prev.get("path") != it.path or prev.get("stored") is not it.stored:
        return False
    rec, sha, size = prev.get("stat"), prev.get("sha256"), prev.get("size")
    if not isinstance(rec, dict) or not isinstance(sha, str) or len(sha) != 64 or not isinstance(size, int):
        return False
    try:
        st = os.stat(it.path)
    except OSError:
        return False  # the read reports it
    if not stat.S_ISREG(st.st_mode) or stat_key(st) != {k: rec.get(k) for k in STAT_KEYS} or st.st_size != size:
        return False
    it.size, it.sha256, it.stat, it.unchanged, it.copy = size, sha, stat_key(st), True, ""
    return True


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar_tpm(d: str) -> tuple[bytes, list[dict]]:
    """A tar of swtpm's state directory (regular files and directories; swtpm's ``.lock``
    and sockets left out), in name order, with neutral owners and times, so that an
    unchanged state gives the same bytes."""
    import tarfile  # only a domain with a TPM needs it

    members: list[dict] = []
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, files in os.walk(d):
            dirs.sort()
            rel_top = os.path.relpath(top, d)
            if rel_top != ".":
                ti = tarfile.TarInfo(rel_top)
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o700
                tar.addfile(ti)
            for fn in sorted(files):
                if fn == ".lock":
                    continue
                p = os.path.join(top, fn)
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    continue
                data = _stable_read(p, "TPM state file")
                total += len(data)
                if total > TPM_MAX_BYTES:
                    raise DiskError(f"the TPM state directory {d} holds more than {TPM_MAX_BYTES >> 20} MiB")
                rel = os.path.normpath(os.path.join(rel_top, fn))
                ti = tarfile.TarInfo(rel)
                ti.size = len(data)
                ti.mode = 0o600
                tar.addfile(ti, io.BytesIO(data))
                members.append({"name": rel, "size": len(data), "sha256": _sha(data)})
    return buf.getvalue(), members


def capture(items: list[StateItem], workdir: str, previous: dict[str, dict] | None = None) -> list[str]:
    """Read every item: stored ones are copied to ``workdir`` (``copy``); all get their
    size and sha256. A file whose stat equals its record in ``previous`` (role -> the
    previous backup's record) is not read (``unchanged``; see the module). Returns notes.
    Raises DiskError for a stored file that cannot be read (the backup of the domain would
    not be complete)."""
    notes: list[str] = []
    for it in items:
        it.unchanged, it.stat = False, None
        if it.role != "tpm" and previous and _unchanged(it, previous.get(it.role)):
            continue
        what = {"nvram": "NVRAM file", "kernel": "kernel", "initrd": "initrd", "dtb": "device tree",
                "loader": "firmware", "tpm": "TPM state"}[it.role]
        if it.role == "tpm":
            if not it.stored:
                notes.append(f"libvirt: TPM state not kept: {it.why}")
                continue
            if not os.path.isdir(it.path):
                # swtpm makes it at the first start: a domain that never ran has none yet
                it.stored = False
                it.why = "the domain has no TPM state yet (it never ran)"
                notes.append(f"libvirt: TPM state not kept: {it.why} ({it.path})")
                continue
            data, it.members = _tar_tpm(it.path)
        elif it.stored:
            data, it.stat = _stable_read_stat(it.path, what)
        else:
            try:
                data, it.stat = _stable_read_stat(it.path, what)
            except DiskError as e:
                notes.append(f"libvirt: {e} (it is only recorded)")
                continue
        it.size = len(data)
        it.sha256 = _sha(data)
        if it.stored:
            it.copy = os.path.join(workdir, it.role)
            try:
                with open(it.copy, "wb") as f:
                    f.write(data)
            except OSError as e:
                raise DiskError(f"cannot copy the {what} {it.path} to {workdir}: {e.strerror or e}") from None
    return notes


# ---------------------------------------------------------------------------- restore
def check_record(rec: object, where: str) -> dict:
    """A state record read from a manifest, checked: a known role, a bool ``stored``, a
    hex sha256, a path string; a RepositoryError otherwise."""
    if not isinstance(rec, dict) or rec.get("role") not in ROLES or not isinstance(rec.get("stored"), bool) \
            or not isinstance(rec.get("path"), str) or not isinstance(rec.get("sha256", ""), str):
        raise RepositoryError(f"{where}: malformed libvirt state record {str(rec)[:80]!r}")
    return rec


def place_tpm(tar_path: str, dest: str, record: dict) -> None:
    """Unpack a TPM state tar (made by ``capture``) into the new directory ``dest``:
    regular files and directories only, every name inside ``dest``, and every file's
    sha256 as recorded. ``dest`` must not exist; on failure it is removed again."""
    import tarfile

    want = {m.get("name"): m.get("sha256") for m in record.get("members") or [] if isinstance(m, dict)}
    try:
        os.makedirs(os.path.dirname(dest), mode=0o711, exist_ok=True)
        os.mkdir(dest, 0o711)
    except FileExistsError:
        raise DiskError(f"the TPM state directory {dest} already exists") from None
    except OSError as e:
        raise DiskError(f"cannot make the TPM state directory {dest}: {e.strerror or e}") from None
    try:
        seen = set()
        with tarfile.open(tar_path, mode="r:") as tar:
            for ti in tar:
                name = posixpath.normpath(ti.name)
                if name.startswith(("/", "..")) or "\0" in name or name == ".":
                    raise RepositoryError(f"the TPM state backup holds a bad name {ti.name!r}")
                target = os.path.join(dest, name)
                if ti.isdir():
                    os.makedirs(target, mode=0o700, exist_ok=True)
                    continue
                if not ti.isfile():
                    raise RepositoryError(f"the TPM state backup holds {ti.name!r}, which is not a regular file")
                f = tar.extractfile(ti)
                assert f is not None
                data = f.read()
                if name in want and want[name] != _sha(data):
                    raise RepositoryError(f"TPM state file {name} does not match the sha256 recorded with the backup")
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                seen.add(name)
        if missing := set(want) - seen:
            raise RepositoryError(f"the TPM state backup lacks {', '.join(sorted(map(str, missing)))}")
    except (OSError, tarfile.TarError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise DiskError(f"cannot restore the TPM state into {dest}: {getattr(e, 'strerror', None) or e}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def file_sha256(path: str) -> str | None:
    """sha256 of a file, or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()
