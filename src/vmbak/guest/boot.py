"""Boot verification (``vmbak verify SNAP --boot``): boot a snapshot in an isolated QEMU and
look for signs of life.

The snapshot is exported copy-on-write exactly as ``vmbak serve --writable`` does
(vmbak.serve.server.Server: nbdkit reads the repository, qemu-storage-daemon puts a
throw-away qcow2 overlay on top), and QEMU boots from that export. Nothing is written to
the repository (apart from the shared lock every reader holds, taken by the caller): the
guest's writes land in the overlay, which is deleted at the end.

Isolation: no network device at all, unless a port is to be checked; then one virtio NIC
on a user-mode network with ``restrict=on`` (the guest reaches nothing outside the VM) and
one forwarded port, 127.0.0.1:<free port> -> guest:PORT.

The machine: memory, vCPUs, machine type, firmware (BIOS, or UEFI with a throw-away copy
of the NVRAM template), kernel, initrd and command line come from the libvirt domain XML
stored with a ``backup --libvirt`` snapshot when there is one, else from defaults
(DEFAULT_MEMORY_MIB, one vCPU, ``pc``, BIOS); options override both. Such a snapshot also
brings its backup (``backup_parts``): every disk of the same backup, attached in the XML's
order through an export each, and the stored NVRAM, kernel, initrd, loader and TPM state,
restored into the run directory as throw-away copies (the TPM's served by swtpm).

Signs of life (docs/verify.md), each optional and reported: the guest agent answers
``guest-ping`` on its virtio-serial port; a serial-console line matches a regex; a TCP
port answers through the forwarded port; a command run with ``guest-exec`` exits 0.
The console is also watched for fatal messages (kernel panic, root file system not
found); QEMU runs with ``-no-reboot``, so a guest that reboots or powers off ends the run.
A QMP ``screendump`` of the display is kept as PNG, the serial console as a log.

Every run has a directory ``<base>/run-<id>`` (RunDir) holding its sockets, the overlay,
the pid files of QEMU, nbdkit and qemu-storage-daemon, and a lock file that the run holds
(flock) while it lives. QEMU and qemu-storage-daemon die with vmbak (PR_SET_PDEATHSIG),
nbdkit with ``--exit-with-parent``; and each run first reaps what dead runs left: a run
directory whose lock nobody holds has its processes killed and is removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

from vmbak.disks.qemu import stop_process
from vmbak.errors import VmbakError
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository

DEFAULT_MEMORY_MIB = 1024
DEFAULT_TIMEOUT_S = 300.0
AGENT_GRACE_S = 20.0  # after the other checks passed, how long an optional agent may take to answer
KVM_PROBE_S = 20.0  # with accel auto: KVM that prints nothing on the console this long is given up
KVM_MARKER = "kvm-runs-nothing"
QEMU = "qemu-system-x86_64"
OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")
# Console lines that mean the boot failed for good (matched anywhere in a line).
FATAL_CONSOLE = (
    r"Kernel panic - not syncing",
    r"Gave up waiting for root file ?system",
    r"Failed to mount \S+ as root file ?system",
    r"You are in emergency mode",
    r"ALERT! .* does not exist\.\s+Dropping to a shell",
    r"No bootable device",
    r"Boot failed: not a bootable disk",
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\r")


class BootVerifyError(VmbakError):
    """Boot verification could not be run (not: the guest failed it)."""


# ---------------------------------------------------------------------------- options
@dataclass
class BootOptions:
    """What to boot with and what to wait for (``vmbak verify --boot``'s options)."""

    timeout: float = DEFAULT_TIMEOUT_S
    expect_serial: str | None = None
    expect_port: int | None = None
    exec_command: str | None = None
    expect_agent: bool = False
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    firmware: str | None = None  # "bios" or "uefi"; None: the domain XML's, else bios
    accel: str = "auto"  # "auto", "kvm" or "tcg"
    output_dir: str | None = None
    screenshot: bool = True
    cache_bytes: int = 256 << 20

    def validate(self) -> None:
        if not self.timeout > 0:
            raise VmbakError("--timeout must be a positive number of seconds")
        if self.expect_serial is not None:
            try:
                re.compile(self.expect_serial, re.MULTILINE)
            except re.error as e:
                raise VmbakError(f"--expect-serial {self.expect_serial!r} is not a regular expression: {e}") from None
        if self.expect_port is not None and not 0 < self.expect_port < 65536:
            raise VmbakError(f"--expect-port {self.expect_port} is not a TCP port (1-65535)")
        if self.exec_command is not None:
            try:
                argv = shlex.split(self.exec_command)
            except ValueError as e:
                raise VmbakError(f"--exec {self.exec_command!r} cannot be parsed: {e}") from None
            if not argv:
                raise VmbakError("--exec is empty")
        for what, path in (("--kernel", self.kernel), ("--initrd", self.initrd)):
            if path is not None and not os.path.isfile(path):
                raise VmbakError(f"{what} {path}: no such file")
        if (self.initrd or self.append) and not self.kernel:
            raise VmbakError("--initrd and --append go with --kernel (direct kernel boot)")
        if self.memory_mib is not None and not 16 <= self.memory_mib <= 1 << 20:
            raise VmbakError(f"--memory {self.memory_mib} MiB is out of range (16 MiB to 1 TiB)")
        if self.cpus is not None and not 1 <= self.cpus <= 256:
            raise VmbakError(f"--cpus {self.cpus} is out of range (1-256)")
        if self.firmware not in (None, "bios", "uefi"):
            raise VmbakError(f"--firmware {self.firmware!r}: give bios or uefi")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise VmbakError(f"--accel {self.accel!r}: give auto, kvm or tcg")
        if self.output_dir is not None and os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise VmbakError(f"--output {self.output_dir} exists and is not a directory")


# ---------------------------------------------------------------------------- the machine
@dataclass
class Machine:
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = 1
    machine: str = "pc"
    firmware: str = "bios"
    loader: str | None = None  # UEFI code (pflash)
    nvram_template: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    bus: str = "virtio"
    source: str = "defaults"  # "domain XML" when a stored domain XML was used
    notes: list[str] = field(default_factory=list)
    # roles (nvram, loader, kernel, initrd) taken from the backup's own state snapshots,
    # restored into each run's directory; the value is the path the domain XML names
    from_backup: dict[str, str] = field(default_factory=dict)
    nvram: str | None = None  # a run's own NVRAM file (a throw-away copy), used as it is

    def to_json(self) -> dict:
        return {"memory_mib": self.memory_mib, "cpus": self.cpus, "machine": self.machine,
                "firmware": self.firmware, "loader": self.loader, "kernel": self.kernel, "initrd": self.initrd,
                "append": self.append, "disk_bus": self.bus, "source": self.source}


_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10 ** 6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10 ** 9, "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12}


def domain_xml_of(m: Manifest) -> str | None:
    """The libvirt domain XML stored with a ``backup --libvirt`` snapshot, if any."""
    lv = m.extra.get("libvirt") if isinstance(m.extra, dict) else None
    xml = lv.get("domain_xml") if isinstance(lv, dict) else None
    return xml if isinstance(xml, str) and xml.strip() else None


def machine_for(m: Manifest, opts: BootOptions, stored: frozenset[str] = frozenset()) -> Machine:
    """The machine to boot ``m`` in: the stored domain XML's settings (when present and
    usable on this host; ``stored``: the state roles the backup holds, which are used
    instead of the host's files), then ``opts`` over them."""
    mach = Machine()
    xml = domain_xml_of(m)
    if xml:
        try:
            _from_domain_xml(mach, ET.fromstring(xml), m, stored)
            mach.source = "domain XML"
        except (ET.ParseError, ValueError) as e:
            mach.notes.append(f"the stored domain XML cannot be read ({e}); using defaults")
    if opts.memory_mib is not None:
        mach.memory_mib = opts.memory_mib
    if opts.cpus is not None:
        mach.cpus = opts.cpus
    if opts.firmware is not None:
        mach.firmware = opts.firmware
        if opts.firmware == "bios":
            mach.loader = mach.nvram_template = None
            mach.from_backup.pop("nvram", None)
            mach.from_backup.pop("loader", None)
    if opts.kernel is not None:
        mach.kernel, mach.initrd, mach.append = opts.kernel, opts.initrd, opts.append
        mach.from_backup.pop("kernel", None)
        mach.from_backup.pop("initrd", None)
    if mach.firmware == "uefi":
        if "loader" not in mach.from_backup and not (mach.loader and os.path.isfile(mach.loader)):
            mach.loader = next((p for p in OVMF_CODE if os.path.isfile(p)), None)
        if "nvram" not in mach.from_backup and not (mach.nvram_template and os.path.isfile(mach.nvram_template)):
            mach.nvram_template = next((p for p in OVMF_VARS if os.path.isfile(p)), None)
        if not mach.loader or not (mach.nvram_template or "nvram" in mach.from_backup):
            raise BootVerifyError("UEFI firmware is not installed (Debian package ovmf)")
    return mach


def _from_domain_xml(mach: Machine, root: ET.Element, m: Manifest, stored: frozenset[str] = frozenset()) -> None:
    mem = root.find("memory")
    if mem is not None and (mem.text or "").strip():
        unit = (mem.get("unit") or "KiB").lower()
        mach.memory_mib = max(16, int(mem.text.strip()) * _UNITS.get(unit, 1024) // (1 << 20))  # type: ignore[union-attr]
    vcpu = root.find("vcpu")
    if vcpu is not None and (vcpu.text or "").strip():
        mach.cpus = max(1, min(256, int(vcpu.text.strip())))  # type: ignore[union-attr]
    os_el = root.find("os")
    if os_el is not None:
        t = os_el.find("type")
        if t is not None and t.get("machine"):
            mach.machine = "q35" if "q35" in t.get("machine", "") else "pc"
        loader = os_el.find("loader")
        if os_el.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash"):
            mach.firmware = "uefi"
            if loader is not None and (loader.text or "").strip():
                mach.loader = loader.text.strip()  # type: ignore[union-attr]
                if "loader" in stored:
                    mach.from_backup["loader"] = mach.loader
            nv = os_el.find("nvram")
            if nv is not None and nv.get("template"):
                mach.nvram_template = nv.get("template")
            if "nvram" in stored:
                mach.from_backup["nvram"] = (nv.text or "").strip() if nv is not None else ""
            else:
                mach.notes.append("UEFI: the guest's NVRAM is not in the backup; booting with a fresh copy of "
                                  "the firmware's variable store")
        for tag in ("kernel", "initrd", "cmdline"):
            el = os_el.find(tag)
            val = (el.text or "").strip() if el is not None else ""
            if not val:
                continue
            if tag in stored and (tag == "kernel" or "kernel" in mach.from_backup):
                mach.from_backup[tag] = val  # the backup's copy, restored into the run directory
            elif tag != "cmdline" and not os.path.isfile(val):
                mach.notes.append(f"the domain XML's {tag} {val} is not on this host; give --kernel/--initrd")
                continue
            setattr(mach, "append" if tag == "cmdline" else tag, val)
        if mach.kernel is None:
            mach.initrd = mach.append = None
    lv = m.extra.get("libvirt", {}) if isinstance(m.extra, dict) else {}
    target = lv.get("target") if isinstance(lv, dict) else None
    for d in root.findall("./devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == target and t.get("bus"):
            mach.bus = str(t.get("bus"))


# ---------------------------------------------------------------------------- run directories
def base_dir() -> str:
    """Where runs keep their private files: $VMBAK_VERIFY_DIR, else
    <temporary directory>/vmbak-verify-<uid> (short enough for unix socket paths)."""
    d = os.environ.get("VMBAK_VERIFY_DIR")
    if not d:
        tmp = tempfile.gettempdir()
        if len(tmp) > 40:
            tmp = "/tmp"
        d = os.path.join(tmp, f"vmbak-verify-{os.getuid()}")
    return os.path.abspath(d)


def _ensure_base(base: str) -> None:
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError as e:
        raise BootVerifyError(f"cannot create the run directory {base}: {e.strerror}") from None
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise BootVerifyError(f"{base} is not a directory of this user; set VMBAK_VERIFY_DIR to another place")
    if len(base) > 60:
        raise BootVerifyError(f"the run directory {base} is too long for unix socket paths; "
                              "set VMBAK_VERIFY_DIR to a shorter one")


class RunDir:
    """One run's private directory, locked (flock on ``lock``) while the run lives."""

    def __init__(self, base: str) -> None:
        _ensure_base(base)
        rid = secrets.token_hex(6)
        tmp = os.path.join(base, f".new-{rid}")
        os.mkdir(tmp, 0o700)
        self._lock_fd = os.open(os.path.join(tmp, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        self.path = os.path.join(base, f"run-{rid}")
        os.rename(tmp, self.path)  # only now can a reaper see it, and it is locked
        self.id = rid

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.close(self._lock_fd)
        except OSError:
            pass


def _pid_files(run: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(run):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".pid")]
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reap_dead_runs(base: str | None = None) -> list[dict]:
    """Clean up after runs that died without cleaning up (kill -9): every run directory
    whose lock nobody holds has the processes named in its pid files killed (only those
    whose command line names the directory: a pid may have been reused) and is removed.
    Returns what was reaped."""
    base = base or base_dir()
    reaped: list[dict] = []
    try:
        names = os.listdir(base)
    except OSError:
        return reaped
    for name in sorted(names):
        path = os.path.join(base, name)
        if name.startswith(".new-"):
            # a run between mkdir and rename holds its lock; one that died there does not
            if _lock_free(os.path.join(path, "lock"), missing_is_free=time.time() - _mtime(path) > 60):
                shutil.rmtree(path, ignore_errors=True)
            continue
        if not name.startswith("run-") or not _lock_free(os.path.join(path, "lock"), missing_is_free=True):
            continue
        killed = []
        for pf in _pid_files(path):
            try:
                with open(pf, encoding="ascii") as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                continue
            if pid > 1 and _alive(pid) and path in _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in killed) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(path, ignore_errors=True)
        reaped.append({"run": path, "killed_pids": killed})
    return reaped


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _lock_free(path: str, missing_is_free: bool) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return missing_is_free
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the backup's own state
@dataclass
class BootDisk:
    """One disk of the boot: the snapshot it comes from, its target and bus in the domain
    XML, and its boot index (None: not a boot device)."""

    snapshot: Manifest
    target: str | None = None
    bus: str = "virtio"
    bootindex: int | None = 1


@dataclass
class BackupParts:
    """What a ``backup --libvirt`` snapshot's backup holds besides it: every disk of the
    same backup (same checkpoint), in the domain XML's order, and the state files'
    snapshots by role with their records (``vmbak.domain.state``)."""

    disks: list[BootDisk]
    state: dict[str, tuple[dict, Manifest]]
    xml_tpm: dict | None = None  # the XML's emulated TPM: {"model": ..., "version": ...}
    notes: list[str] = field(default_factory=list)


def backup_parts(repo: Repository, m: Manifest) -> BackupParts:
    """The disks and state of the libvirt backup ``m`` belongs to; just ``m`` when it is
    no libvirt snapshot or its backup is incomplete."""
    from vmbak.domain.state import check_record
    from vmbak.engine.sources import LIBVIRT_KEY, libvirt_groups

    lv = m.extra.get(LIBVIRT_KEY) if isinstance(m.extra, dict) else None
    parts = BackupParts(disks=[BootDisk(m)], state={})
    if not isinstance(lv, dict) or not domain_xml_of(m):
        return parts
    group = next((g for g in libvirt_groups(repo, lv.get("domain")) if any(x.id == m.id for x in g)), None)
    if group is None:
        parts.notes.append("the libvirt backup of this snapshot is incomplete (a disk's or a state file's backup "
                           "failed): booting this disk alone, without the backup's NVRAM, TPM state or kernel")
        return parts
    by_target: dict[str, Manifest] = {}
    for x in group:
        xl = x.extra.get(LIBVIRT_KEY)
        if xl.get("state_role"):
            continue
        by_target[str(xl.get("target"))] = x
    records = [check_record(r, f"snapshot {m.short_id}") for r in lv.get("state") or []]
    roles = {x.extra[LIBVIRT_KEY]["state_role"]: x for x in group if x.extra[LIBVIRT_KEY].get("state_role")}
    parts.state = {r["role"]: (r, roles[r["role"]]) for r in records if r["stored"] and r["role"] in roles}
    root = ET.fromstring(domain_xml_of(m) or "")
    disks: list[BootDisk] = []
    orders: dict[str, int] = {}
    for d in root.findall("./devices/disk"):
        t = d.find("target")
        tgt = t.get("dev") if t is not None else None
        if tgt not in by_target or any(x.target == tgt for x in disks):
            continue
        disks.append(BootDisk(by_target[tgt], tgt, str(t.get("bus") or "virtio"), None))  # type: ignore[union-attr]
        b = d.find("boot")
        if b is not None and (b.get("order") or "").isdigit():
            orders[tgt] = int(b.get("order") or 0)
    for tgt in sorted(set(by_target) - {x.target for x in disks}):
        disks.append(BootDisk(by_target[tgt], tgt, "virtio", None))
    if orders:  # the XML's per-disk boot order
        for x in disks:
            x.bootindex = orders.get(str(x.target))
    elif disks:  # <os><boot dev='hd'/> (or nothing): the first disk
        disks[0].bootindex = 1
    parts.disks = disks
    for tpm in root.findall("./devices/tpm"):
        be = tpm.find("backend")
        if be is not None and be.get("type") == "emulator":
            parts.xml_tpm = {"model": tpm.get("model") or "tpm-tis", "version": be.get("version") or "2.0"}
            break
    return parts


def _restore_state(repo: Repository, rec: dict, m: Manifest, path: str) -> None:
    """The state file's snapshot ``m`` restored to ``path`` (in the run directory), checked
    against the sha256 recorded with the backup."""
    from vmbak.domain.state import file_sha256
    from vmbak.engine.restore import restore

    restore(repo, m, path, verify=True, workers=1)
    if rec.get("sha256") and file_sha256(path) != rec["sha256"]:
        raise BootVerifyError(f"the {rec['role']} restored from snapshot {m.short_id} does not match the sha256 "
                              "recorded with the backup")


def _swtpm_start(run: RunDir, tpm: dict, state_dir: str) -> subprocess.Popen:
    """swtpm on ``state_dir`` (a throw-away copy in the run directory) for QEMU's
    ``-tpmdev emulator``; it ends when QEMU closes its control channel (``--terminate``)
    or when vmbak dies."""
    exe = shutil.which("swtpm")
    if exe is None:
        raise BootVerifyError("swtpm is not installed (Debian package swtpm)")
    sock = run.file("swtpm.sock")
    cmd = [exe, "socket", "--tpmstate", f"dir={state_dir},mode=0600", "--ctrl", f"type=unixio,path={sock},mode=0600",
           "--pid", f"file={run.file('swtpm.pid')}", "--log", f"file={run.file('swtpm.log')}", "--terminate"]
    if not str(tpm.get("version", "2.0")).startswith("1."):
        cmd.append("--tpm2")
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():
        cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if proc.poll() is not None:
            err = (proc.stderr.read() if proc.stderr else b"").decode("utf-8", "replace").strip().splitlines()
            raise BootVerifyError(f"swtpm did not start: {err[-1] if err else f'exit status {proc.returncode}'}")
        if time.monotonic() > deadline:
            proc.kill()
            raise BootVerifyError("swtpm did not start within 15 s")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    stop_process(proc)
    if proc.stderr:
        proc.stderr.close()


# ---------------------------------------------------------------------------- QEMU
def kvm_usable(base: str) -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and not os.path.exists(os.path.join(base, KVM_MARKER))


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
    finally:
        s.close()


def qemu_command(mach: Machine, run: RunDir, accel: str, disks: list[tuple[BootDisk, str]], host_port: int | None,
                 guest_port: int | None, tpm: dict | None = None) -> list[str]:
    """The QEMU command line of one boot: ``disks`` are (disk, NBD socket of its export),
    attached in that order as ``disk0``, ``disk1``, ...; ``tpm`` ({"model", "socket"}):
    a TPM on a running swtpm."""
    exe = shutil.which(QEMU) or f"/usr/bin/{QEMU}"
    cmd = [exe, "-name", f"vmbak-verify-{run.id}", "-machine", f"{mach.machine},accel={accel}",
           "-m", str(mach.memory_mib), "-smp", str(mach.cpus), "-nodefaults", "-no-user-config", "-no-reboot",
           "-display", "none", "-vga", "std", "-pidfile", run.file("qemu.pid"),
           "-serial", f"file:{run.file('serial.log')}",
           "-qmp", f"unix:{run.file('qmp.sock')},server=on,wait=off",
           "-chardev", f"socket,id=qga0,path={run.file('qga.sock')},server=on,wait=off",
           "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
           "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    scsi = False
    for i, (d, sock) in enumerate(disks):
        node = f"disk{i}"
        cmd += ["-blockdev", json.dumps({"driver": "nbd", "node-name": node, "export": "",
                                         "server": {"type": "unix", "path": sock}})]
        boot = f",bootindex={d.bootindex}" if d.bootindex is not None else ""
        if d.bus in ("sata", "ide"):
            cmd += ["-device", f"ide-hd,drive={node},id=dev-{node}{boot}"]
        elif d.bus == "scsi":
            if not scsi:
                cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
                scsi = True
            cmd += ["-device", f"scsi-hd,drive={node},id=dev-{node},bus=scsi0.0{boot}"]
        else:
            cmd += ["-device", f"virtio-blk-pci,drive={node},id=dev-{node}{boot}"]
    if tpm is not None:
        cmd += ["-chardev", f"socket,id=chrtpm,path={tpm['socket']}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                "-device", f"{tpm['model']},tpmdev=tpm0"]
    if host_port is not None and guest_port is not None:
        cmd += ["-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}",
                "-device", "virtio-net-pci,netdev=net0"]
    else:
        cmd += ["-nic", "none"]
    if mach.firmware == "uefi":
        assert mach.loader and (mach.nvram or mach.nvram_template)
        vars_copy = mach.nvram or run.file("nvram.fd")
        if not mach.nvram:
            shutil.copyfile(mach.nvram_template, vars_copy)  # type: ignore[arg-type]
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={mach.loader}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    if mach.kernel:
        cmd += ["-kernel", mach.kernel]
        if mach.initrd:
            cmd += ["-initrd", mach.initrd]
        if mach.append:
            cmd += ["-append", mach.append]
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():
        cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
    return cmd


# ---------------------------------------------------------------------------- checks
def _check(requested: bool) -> dict:
    return {"requested": requested, "status": "waiting" if requested else "not requested", "seconds": None,
            "detail": None}


class _Boot:
    """One QEMU boot of an export and the watching of its signs of life."""

    def __init__(self, run: RunDir, mach: Machine, opts: BootOptions, accel: str, disks: list[tuple[BootDisk, str]],
                 probe_kvm: bool, tpm: dict | None = None) -> None:
        self.run = run
        self.mach = mach
        self.opts = opts
        self.accel = accel
        self.probe_kvm = probe_kvm
        self.host_port = _free_port() if opts.expect_port is not None else None
        self.cmd = qemu_command(mach, run, accel, disks, self.host_port, opts.expect_port, tpm)
        self.proc: subprocess.Popen | None = None
        self.qmp = None
        self.agent = None
        self.t0 = 0.0
        self.checks = {"agent": _check(opts.expect_agent),
                       "serial": _check(opts.expect_serial is not None),
                       "port": _check(opts.expect_port is not None),
                       "exec": _check(opts.exec_command is not None),
                       "console": {"requested": False, "status": "passed", "seconds": None, "detail": None}}
        self.checks["agent"]["status"] = "waiting"
        self.serial_re = re.compile(opts.expect_serial, re.MULTILINE) if opts.expect_serial else None
        self.fatal_re = re.compile("|".join(f"(?:{p})" for p in FATAL_CONSOLE))
        self.first_console_s: float | None = None
        self.exec_pid: int | None = None
        self.failure: str | None = None
        self.kvm_gave_up = False
        self._last_agent_try = 0.0
        self._last_port_try = 0.0

    # -------------------------------------------------------------- process
    def start(self) -> None:
        log = open(self.run.file("qemu.log"), "wb")
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, close_fds=True)
        except OSError as e:
            raise BootVerifyError(f"cannot run {QEMU}: {e.strerror or e} (Debian package qemu-system-x86)") from None
        finally:
            log.close()
        self.t0 = time.monotonic()
        from vmbak.changes.qemu import QmpClient

        deadline = self.t0 + 30
        while True:  # the socket file appears (bind) a moment before QEMU listens on it
            if os.path.exists(self.run.file("qmp.sock")):
                try:
                    self.qmp = QmpClient(self.run.file("qmp.sock"), timeout=30)
                    return
                except VmbakError:
                    pass
            if self.proc.poll() is not None:
                raise BootVerifyError(f"QEMU did not start: {self._qemu_error()}")
            if time.monotonic() > deadline:
                raise BootVerifyError("QEMU did not start within 30 s")
            time.sleep(0.05)

    def _qemu_error(self) -> str:
        try:
            with open(self.run.file("qemu.log"), encoding="utf-8", errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip() and "warning:" not in ln]
        except OSError:
            lines = []
        return lines[-1].removeprefix(f"{QEMU}: ") if lines else f"exit status {self.proc.returncode if self.proc else '?'}"

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def console(self) -> str:
        try:
            with open(self.run.file("serial.log"), "rb") as f:
                return _ANSI.sub("", f.read().decode("utf-8", "replace"))
        except OSError:
            return ""

    # -------------------------------------------------------------- the watch
    def _pass(self, name: str, detail: object = None) -> None:
        c = self.checks[name]
        if c["status"] == "waiting":
            c.update(status="passed", seconds=self.elapsed(), detail=detail)

    def _fail(self, name: str, why: str) -> None:
        c = self.checks[name]
        c.update(status="failed", seconds=self.elapsed(), detail=why)
        if self.failure is None:
            self.failure = why

    def _others_done(self) -> bool:
        return all(self.checks[n]["status"] != "waiting" for n in ("serial", "port", "exec"))

    def watch(self, deadline: float) -> None:
        """Watch until every requested check is decided, one fails, QEMU stops or ``deadline``."""
        others_done_at: float | None = None
        while True:
            now = time.monotonic()
            assert self.proc is not None
            text = self.console()
            if text.strip() and self.first_console_s is None:
                self.first_console_s = self.elapsed()
            fatal = self.fatal_re.search(text)
            if fatal:
                line = text[text.rfind("\n", 0, fatal.start()) + 1:].split("\n", 1)[0].strip()
                self._fail("console", f"the console shows a fatal error: {line[:200]}")
                return
            if self.serial_re is not None and self.checks["serial"]["status"] == "waiting":
                mm = self.serial_re.search(text)
                if mm:
                    self._pass("serial", mm.group(0)[:200])
            if self.proc.poll() is not None:
                self.failure = (f"the guest stopped after {self.elapsed():.1f} s (it powered off, rebooted or "
                                f"crashed; QEMU exit status {self.proc.returncode}"
                                + (f": {self._qemu_error()}" if self.proc.returncode else "") + ")")
                return
            if self.probe_kvm and self.first_console_s is None and now - self.t0 > KVM_PROBE_S:
                self.kvm_gave_up = True
                return
            self._agent_step(now)
            if self.failure:
                return
            if self.checks["port"]["status"] == "waiting" and now - self._last_port_try >= 1.0:
                self._last_port_try = now
                self._port_step()
            if self._others_done():
                others_done_at = others_done_at or now
                a = self.checks["agent"]
                if a["status"] != "waiting":
                    return
                anything = any(self.checks[n]["requested"] for n in ("serial", "port", "exec"))
                if not self.opts.expect_agent and anything and now - others_done_at > AGENT_GRACE_S:
                    a.update(status="no agent", detail=f"no answer within {AGENT_GRACE_S:.0f} s after the other "
                             "checks passed")
                    return
            if now > deadline:
                return
            time.sleep(0.25)

    def _agent_step(self, now: float) -> None:
        from vmbak.guest.agent import AgentError, AgentUnavailable, SocketAgent

        a = self.checks["agent"]
        if self.agent is None:
            if now - self._last_agent_try < 1.0:
                return
            self._last_agent_try = now
            try:
                self.agent = SocketAgent(self.run.file("qga.sock"), timeout=2.0)
                self.agent.execute("guest-ping", timeout=5)
            except AgentError:
                if self.agent is not None:
                    self.agent.close()
                self.agent = None
                return
            detail = "guest-ping answered"
            try:
                info = self.agent.execute("guest-info", timeout=5)
                if isinstance(info, dict) and info.get("version"):
                    detail += f" (qemu-guest-agent {info['version']})"
            except AgentError:
                pass
            if a["status"] == "waiting":
                a.update(status="passed", seconds=self.elapsed(), detail=detail)
        if self.opts.exec_command is not None and self.checks["exec"]["status"] == "waiting":
            try:
                self._exec_step()
            except AgentUnavailable as e:
                self.agent.close()
                self.agent = None
                self.exec_pid = None
                self.checks["exec"]["detail"] = f"the agent stopped answering ({e}); retrying"
            except AgentError as e:
                self._fail("exec", f"guest-exec {self.opts.exec_command!r}: {e}")

    def _exec_step(self) -> None:
        import base64

        assert self.agent is not None and self.opts.exec_command is not None
        if self.exec_pid is None:
            argv = shlex.split(self.opts.exec_command)
            r = self.agent.execute("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True},
                                   timeout=10)
            self.exec_pid = int(r["pid"])  # type: ignore[index]
            return
        st = self.agent.execute("guest-exec-status", {"pid": self.exec_pid}, timeout=10)
        if not isinstance(st, dict) or not st.get("exited"):
            return

        def text(k: str) -> str:
            return base64.b64decode(st.get(k, "")).decode("utf-8", "replace").strip()[-500:]

        out, err = text("out-data"), text("err-data")
        if "exitcode" not in st:
            self._fail("exec", f"--exec {self.opts.exec_command!r} was killed by signal {st.get('signal')}")
        elif st["exitcode"] == 0:
            self._pass("exec", {"exit_code": 0, "stdout": out, "stderr": err})
        else:
            self._fail("exec", f"--exec {self.opts.exec_command!r} exited with status {st['exitcode']}"
                       + (f": {(err or out).splitlines()[-1]}" if (err or out) else ""))
            self.checks["exec"]["output"] = {"exit_code": st["exitcode"], "stdout": out, "stderr": err}

    def _port_step(self) -> None:
        """A connection through the forwarded port counts when the guest sends a byte, or
        when QEMU's user-mode network shows it ESTABLISHED with the guest (user-mode
        networking accepts on the host side before the guest answers, so a bare connect
        proves nothing)."""
        assert self.host_port is not None
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(("127.0.0.1", self.host_port))
            local = s.getsockname()[1]
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                try:
                    s.settimeout(0.3)
                    data = s.recv(64)
                    if not data:
                        return  # the guest refused (reset): not listening yet
                    self._pass("port", f"port {self.opts.expect_port} answered: {data[:40]!r}")
                    return
                except TimeoutError:
                    if self._established(local):
                        self._pass("port", f"port {self.opts.expect_port} accepted the connection")
                        return
        except OSError:
            return
        finally:
            s.close()

    def _established(self, local_port: int) -> bool:
        try:
            out = self.qmp.execute("human-monitor-command", {"command-line": "info usernet"})  # type: ignore[union-attr]
        except (VmbakError, OSError):
            return False
        # An incoming (forwarded) connection is listed with the host side's address (our
        # forwarded port, not the client's) and the guest's: "TCP[ESTABLISHED] FD 127.0.0.1
        # HOSTPORT 10.0.2.15 PORT RECVQ SENDQ" once the guest completed the handshake.
        ports = {str(local_port), str(self.host_port)}
        for ln in str(out).splitlines():
            f = ln.split()
            if f and f[0] == "TCP[ESTABLISHED]" and ports & set(f[1:]) and str(self.opts.expect_port) in f[1:]:
                return True
        return False

    def attached(self) -> tuple[set[str], bool | None]:
        """What QEMU reports: the block nodes with a guest device (QMP ``query-block``),
        and whether a TPM is present (``query-tpm``; None when not asked)."""
        nodes: set[str] = set()
        tpm = None
        try:
            for b in self.qmp.execute("query-block") or []:  # type: ignore[union-attr]
                ins = b.get("inserted") or {}
                if b.get("qdev") and ins.get("node-name"):
                    nodes.add(str(ins["node-name"]))
            tpm = bool(self.qmp.execute("query-tpm"))  # type: ignore[union-attr]
        except (VmbakError, OSError, AttributeError):
            pass
        return nodes, tpm

    # -------------------------------------------------------------- the end
    def screenshot(self, path: str) -> str | None:
        """A PNG of the display (QMP screendump), or None when QEMU cannot take one."""
        if self.qmp is None or self.proc is None or self.proc.poll() is not None:
            return None
        try:
            self.qmp.execute("screendump", {"filename": path, "format": "png"})
            return path if os.path.getsize(path) > 0 else None
        except (VmbakError, OSError):
            pass
        ppm = path + ".ppm"
        try:  # an older QEMU: PPM only, converted with Pillow
            self.qmp.execute("screendump", {"filename": ppm})
            from PIL import Image

            with Image.open(ppm) as im:
                im.save(path, "PNG")
            return path
        except (VmbakError, OSError, ImportError):
            return None
        finally:
            try:
                os.unlink(ppm)
            except OSError:
                pass

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.qmp is not None:
            try:
                if self.proc is not None and self.proc.poll() is None:
                    self.qmp.execute("quit")
            except (VmbakError, OSError):
                pass
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------------------- verify
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80] or "disk"


def _put(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` so that ``dst`` appears only whole."""
    tmp = f"{dst}.partial-{secrets.token_hex(3)}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def default_output_dir() -> str:
    return os.path.join(base_dir(), "results", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))


def verify_boot(repo: Repository, snapshot: Manifest, password: str | None, opts: BootOptions,
                log: Callable[[str], None] | None = None, phase: Callable[[str], None] | None = None) -> dict:
    """Boot ``snapshot`` in an isolated QEMU and report its signs of life (module docstring).

    The caller holds a shared repository lock. Returns the result (docs/verify.md); a guest
    that fails is a result with ``ok`` false, not an exception. Raises BootVerifyError (or
    another VmbakError) when the verification itself cannot run (QEMU or nbdkit missing,
    no such kernel file, ...).
    """
    log = log or (lambda s: None)
    phase = phase or (lambda s: None)
    opts.validate()
    t_start = time.monotonic()
    base = base_dir()
    _ensure_base(base)
    reaped = reap_dead_runs(base)
    for r in reaped:
        log(f"removed what a dead verify run left: {r['run']}"
            + (f" (killed pids {', '.join(map(str, r['killed_pids']))})" if r["killed_pids"] else ""))
    parts = backup_parts(repo, snapshot)
    mach = machine_for(snapshot, opts, frozenset(parts.state))
    notes = parts.notes + list(mach.notes)
    state = _state_report(parts, mach, opts)
    for role, st in state.items():
        if st.get("detail"):
            notes.append(f"{role}: {st['detail']}")
    if mach.kernel is None and mach.firmware == "bios":
        notes.append("no kernel given (--kernel): booting the disk's own boot loader with BIOS")
    accel = opts.accel
    probe = False
    if accel == "auto":
        accel = "kvm" if kvm_usable(base) else "tcg"
        probe = accel == "kvm"
    out_dir = os.path.abspath(opts.output_dir or default_output_dir())
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{_safe(snapshot.name)}-{snapshot.short_id}"
    while True:
        res = _one_boot(repo, snapshot, password, opts, mach, parts, state, accel, probe, base, out_dir, stem,
                        phase)
        why = res.pop("_kvm_gave_up", None)
        if why:
            notes.append(f"{why}; booted again with TCG (and {os.path.join(base, KVM_MARKER)} makes later runs "
                         "use TCG at once)")
            log(notes[-1])
            try:
                open(os.path.join(base, KVM_MARKER), "a").close()
            except OSError:
                pass
            accel, probe = "tcg", False
            continue
        break
    res["notes"] = notes + res["notes"]
    res["reaped"] = reaped
    res["timings"]["total_s"] = round(time.monotonic() - t_start, 2)
    res["machine"] = mach.to_json()
    res["state"] = state
    return res


def _state_report(parts: BackupParts, mach: Machine, opts: BootOptions) -> dict:
    """Where each of the machine's state files comes from (``state`` in the result):
    ``backup`` (the snapshot of it stored with the same backup), ``host``, ``option``,
    ``template`` (a fresh NVRAM) or ``fresh`` (a new TPM)."""
    out: dict[str, dict] = {}
    for role in ("nvram", "loader", "kernel", "initrd"):
        if role in mach.from_backup:
            rec, sm = parts.state[role]
            out[role] = {"from": "backup", "snapshot": sm.id, "path": rec.get("path"), "sha256": rec.get("sha256")}
    if mach.firmware == "uefi" and "nvram" not in out:
        out["nvram"] = {"from": "template", "path": mach.nvram_template}
    if mach.firmware == "uefi" and "loader" not in out:
        out["loader"] = {"from": "host", "path": mach.loader}
    for role in ("kernel", "initrd"):
        path = getattr(mach, role)
        if role not in out and path:
            out[role] = {"from": "option" if opts.kernel else "host", "path": path}
    if parts.xml_tpm is not None:
        stored = parts.state.get("tpm")
        if shutil.which("swtpm") is None:
            out["tpm"] = {"from": None, "attached": False, "detail": "the domain has a TPM, and swtpm is not "
                          "installed (Debian package swtpm): booting without a TPM"}
        elif stored is not None:
            out["tpm"] = {"from": "backup", "snapshot": stored[1].id, "attached": True, "model": parts.xml_tpm["model"]}
        else:
            out["tpm"] = {"from": "fresh", "attached": True, "model": parts.xml_tpm["model"],
                          "detail": "the backup holds no TPM state (the domain had none yet): a new, empty TPM"}
    elif "tpm" in parts.state:
        out["tpm"] = {"from": None, "attached": False, "snapshot": parts.state["tpm"][1].id,
                      "detail": "the backup holds TPM state, and the domain XML has no emulated TPM: not attached"}
    return out


def _one_boot(repo: Repository, m: Manifest, password: str | None, opts: BootOptions, mach: Machine,
              parts: BackupParts, state: dict, accel: str, probe: bool, base: str, out_dir: str, stem: str,
              phase: Callable[[str], None]) -> dict:
    import dataclasses

    from vmbak.serve.server import Server

    t0 = time.monotonic()
    run = RunDir(base)
    servers: list[Server] = []
    swtpm: subprocess.Popen | None = None
    boot: _Boot | None = None
    res: dict = {"snapshot": m.id, "short_id": m.short_id, "name": m.name, "time": m.time, "ok": False,
                 "reason": None, "accel": accel, "checks": {}, "screenshot": None, "serial_log": None,
                 "output_dir": out_dir, "timings": {}, "notes": []}
    try:
        phase("export")
        # the backup's state files: throw-away copies in the run directory
        bm = dataclasses.replace(mach, from_backup=dict(mach.from_backup))
        for role in mach.from_backup:
            rec, sm = parts.state[role]
            path = run.file(f"state-{role}")
            _restore_state(repo, rec, sm, path)
            if role == "nvram":
                bm.nvram = path
            else:
                setattr(bm, role, path)
        tpm = None
        if state.get("tpm", {}).get("attached"):
            tpm_dir = run.file("tpm")
            if "tpm" in parts.state:
                rec, sm = parts.state["tpm"]
                _restore_state(repo, rec, sm, run.file("state-tpm.tar"))
                from vmbak.domain.state import place_tpm

                place_tpm(run.file("state-tpm.tar"), tpm_dir, rec)
            else:
                os.mkdir(tpm_dir, 0o700)
            swtpm = _swtpm_start(run, parts.xml_tpm or {}, tpm_dir)
            tpm = {"model": (parts.xml_tpm or {}).get("model") or "tpm-tis", "socket": run.file("swtpm.sock")}
        disks: list[tuple[BootDisk, str]] = []
        cache = max(opts.cache_bytes // len(parts.disks), 16 << 20)
        for i, d in enumerate(parts.disks):
            n = str(i) if i else ""  # the first disk's files keep their single-disk names
            sock = run.file(f"disk{n}.sock")
            server = Server(repo, d.snapshot, password, socket=sock, writable=True,
                            overlay=run.file(f"overlay{n}.qcow2"), qmp=run.file(f"qsd{n}.sock"), cache_bytes=cache,
                            workdir=run.file(f"serve{n}"))
            servers.append(server)
            server.start()
            disks.append((d, sock))
        if len(disks) == 1 and disks[0][0].target is None:
            disks[0][0].bus = mach.bus
        res["timings"]["export_s"] = round(time.monotonic() - t0, 2)
        phase("boot")
        boot = _Boot(run, bm, opts, accel, disks, probe, tpm)
        try:
            boot.start()
        except BootVerifyError as e:
            if not probe:
                raise
            boot.kvm_gave_up = True  # auto: a KVM that does not even start is given up too
            return {"_kvm_gave_up": f"QEMU did not start with KVM ({str(e).removeprefix('QEMU did not start: ')})"}
        boot.watch(boot.t0 + opts.timeout)
        if boot.kvm_gave_up:
            return {"_kvm_gave_up": f"KVM showed nothing on the console within {KVM_PROBE_S:.0f} s"}
        res["timings"]["boot_s"] = boot.elapsed()
        res["timings"]["first_console_s"] = boot.first_console_s
        nodes, tpm_seen = boot.attached()
        res["disks"] = [{"target": d.target, "snapshot": d.snapshot.id, "name": d.snapshot.name, "bus": d.bus,
                         "bootindex": d.bootindex, "attached": f"disk{i}" in nodes}
                        for i, (d, _sock) in enumerate(disks)]
        if tpm is not None:
            state["tpm"]["attached"] = bool(tpm_seen)
        phase("shutdown")
        if opts.screenshot:
            shot = boot.screenshot(run.file("screen.png"))
            if shot:
                res["screenshot"] = os.path.join(out_dir, f"{stem}.png")
                _put(shot, res["screenshot"])
            else:
                res["notes"].append("no screenshot: QEMU could not take one")
        checks = boot.checks
        reason = boot.failure
        if reason is None:
            waiting = [n for n, c in checks.items() if c["status"] == "waiting" and (c["requested"] or n != "agent")]
            if checks["agent"]["status"] == "waiting":
                checks["agent"].update(status="failed" if checks["agent"]["requested"] else "no agent",
                                       detail="no answer to guest-ping")
                if checks["agent"]["requested"]:
                    waiting.append("agent")
            for n in waiting:
                why = "timed out"
                if n == "exec" and checks["agent"]["status"] != "passed":
                    why = "timed out: the guest agent never answered"
                checks[n].update(status="failed", detail=checks[n]["detail"] or why)
            if waiting:
                reason = f"timed out after {opts.timeout:g} s waiting for: {', '.join(sorted(set(waiting)))}"
            elif not any(c["status"] == "passed" for n, c in checks.items() if n != "console"):
                reason = ("no sign of life within the timeout: the guest agent did not answer and no other check "
                          "was asked for (--expect-serial, --expect-port, --exec)")
        else:
            for c in checks.values():
                if c["status"] == "waiting":
                    c.update(status="not reached")
        if reason is not None and checks["console"]["status"] == "passed" and "fatal" not in reason:
            checks["console"]["detail"] = "no fatal message seen"
        res["checks"] = checks
        res["reason"] = reason
        res["ok"] = reason is None
        return res
    finally:
        if boot is not None:
            boot.stop()
            serial = run.file("serial.log")
            if os.path.exists(serial) and not boot.kvm_gave_up:
                res["serial_log"] = os.path.join(out_dir, f"{stem}-serial.log")
                _put(serial, res["serial_log"])
        _stop(swtpm)
        for server in servers:
            try:
                st = server.close()
            except (VmbakError, OSError) as e:
                res["notes"].append(f"stopping an export failed: {e}")
                continue
            if st and server.snapshot.id == m.id:  # what the boot read from the snapshot, and its cost
                res["export"] = {k: st.get(k) for k in ("read_bytes", "fetched_chunks", "fetched_bytes", "hit_rate")}
        run.remove()
