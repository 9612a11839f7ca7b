"""Begin a libvirt backup job while the command's modules load and the repository opens.

``vmbak backup --libvirt DOMAIN`` spends its first half second or more importing numpy and
the engine and deriving the repository's key, and then waits on libvirt and the guest:
the agent's freeze, the checkpoint and the backup job (``virDomainBackupBegin``), the
thaw. None of that needs the repository except the name of the previous backup's
checkpoint, and vmbak leaves one checkpoint of its own per domain. So ``start`` (called
with the command line, before the slow imports) begins the job in a thread: with libvirt's
one ``vmbak-*`` checkpoint as the reference (none: a full view), the guest frozen around
the checkpoint exactly as ``Quiescer.frozen`` does it, and no change maps yet (they need
numpy; the caller reads the dirty bitmaps once it knows the reference is right). The
domain's state files (``vmbak.domain.state``) are then copied, as the usual way does right
after the checkpoint (``LibvirtBackup.state``), for ``--mode full`` or ``differential``;
otherwise the caller captures them once the repository is open, as the usual way does,
because a file whose stat equals the previous backup's record is not read at all.

``take(domain, uri)`` hands the job over (or None: not started, or it failed, and the
caller begins one itself, which reports any error). The caller then checks the reference
against the repository: when the repository's previous checkpoint is another one (or
there is none), the job's view is still a consistent point in time of every disk, read
whole (scan) without the bitmap; the committed job drops the older checkpoint as usual.

Only the plain case starts early: ``backup --libvirt DOMAIN`` (no pattern) with at most
-r/--repo, --json, -q/--quiet, --name, --tag, --workers, --libvirt-uri, --mode and
--freeze auto|never; a running domain with at most one vmbak
checkpoint and no freeze record of a killed vmbak (``recover`` runs first, as usual).
Anything else begins the job the usual way. A job that is not taken (an error, a wrong
password, a signal) is ended and its new checkpoint removed when the command ends
(``discard``, also registered with ``vmbak.interrupts``).
"""

from __future__ import annotations

import os
import threading

_VALUED = {"-r", "--repo", "--name", "--tag", "--workers", "--libvirt", "--libvirt-uri", "--mode", "--freeze"}
_FLAGS = {"--json", "-q", "--quiet"}
_state: dict = {}
_lock = threading.Lock()


def parse(argv: list[str]) -> dict | None:
    """The options of a plain ``backup --libvirt DOMAIN`` command line; None for any other."""
    opts: dict[str, str] = {}
    command = None
    it = iter(argv)
    for a in it:
        if a in _FLAGS:
            continue
        name, eq, value = a.partition("=")
        if a.startswith("-") and name in _VALUED:
            if not eq:
                value = next(it, None)  # type: ignore[assignment]
                if value is None:
                    return None
            if name in ("-r", "--repo") and "://" not in value and ":" not in value.split("/", 1)[0] \
                    and not os.path.isdir(value):
                return None  # no such local repository: the command fails before it needs a job
            if name in ("-r", "--repo", "--tag"):
                continue
            if name in opts:
                return None
            opts[name] = value
        elif not a.startswith("-") and command is None:
            command = a
        else:
            return None
    domain = opts.get("--libvirt")
    if command != "backup" or not domain or any(c in domain for c in "*?["):
        return None
    # any mode: the repository decides the reference afterwards (a full reads the view whole)
    if opts.get("--mode", "auto") not in ("auto", "full", "incremental", "differential") \
            or opts.get("--freeze", "auto") not in ("auto", "never"):
        return None
    return {"domain": domain, "uri": opts.get("--libvirt-uri", "qemu:///system"), "freeze": opts.get("--freeze", "auto"),
            "mode": opts.get("--mode", "auto")}


def start(argv: list[str]) -> None:
    """Begin the backup job of the plain command line ``argv`` in a thread (see above)."""
    o = parse(argv)
    if o is None or _state:
        return
    from vmbak.interrupts import register_cleanup

    # Waited for with an Event, not Thread.join: a join that a signal interrupts may mark the
    # thread as ended (bpo-45274), and the next join would not wait for the thaw.
    box: dict = {"logs": [], "done": threading.Event(), "ready": threading.Event()}
    t = threading.Thread(target=_run, args=(o["domain"], o["uri"], o["freeze"], o["mode"], box), name="vmbak-libvirt-early",
                         daemon=True)
    _state.update(thread=t, box=box, domain=o["domain"], uri=o["uri"], token=register_cleanup(discard))
    t.start()


def _run(domain: str, uri: str, freeze: str, mode: str, box: dict) -> None:
    try:
        _begin(domain, uri, freeze, mode, box)
    finally:
        box["ready"].set()
        box["done"].set()


def let_run_first(timeout: float = 1.0) -> None:
    """Wait (at most ``timeout`` seconds) until the job's thread has loaded its modules and
    waits on libvirt and the guest: the command's own imports (numpy, the engine) would
    otherwise share the interpreter with it, and its path (imports, freeze, checkpoint,
    thaw) is the longer one. Returns at once when no job was begun."""
    if _state and not _state.get("taken"):
        _state["box"]["ready"].wait(timeout)


def _begin(domain: str, uri: str, freeze: str, mode: str, box: dict) -> None:
    try:
        import xml.etree.ElementTree as ET

        from vmbak.changes import libvirt as lvc
        from vmbak.guest.agent import LibvirtAgent
        from vmbak.guest.quiesce import Quiescer, _state_path

        lvc._libvirt()  # the bindings; from here on the thread mostly waits on libvirt and the guest
        box["ready"].set()
        if os.path.exists(_state_path(LibvirtAgent.key_for(uri, domain))):
            return  # a killed vmbak left the guest frozen: the usual way thaws it first
        conn = lvc.connect(uri)
        try:
            dom = lvc.lookup(conn, domain)
            if not dom.isActive():
                return  # shut off: started paused the usual way
            everyone = dom.listAllCheckpoints()
            ours = [c for c in everyone if c.getName().startswith(lvc.PREFIX)]
            if len(ours) > 1:
                return
            since = ours[0].getName() if ours else None
            covered = set()
            if ours:
                covered = {d.get("name") for d in ET.fromstring(ours[0].getXMLDesc(0)).findall("./disks/disk")
                           if d.get("checkpoint") == "bitmap"}
            live_xml = dom.XMLDesc(0)
            targets = {d.target for d in lvc.domain_disks(live_xml)}
        finally:
            conn.close()
        logs: list[str] = box["logs"]
        # The domain, its XML and checkpoints, and the agent's way to the guest are the ones
        # just asked for: begin_backup and the agent do not ask again before the freeze
        # (8 round trips, each of which waited for the interpreter while the command's
        # own imports ran).
        q = Quiescer(mode=freeze, agent=lambda: LibvirtAgent(uri, domain, dom=dom),
                     agent_key=LibvirtAgent.key_for(uri, domain), guest=f"libvirt domain {domain!r}",
                     point_in_time=True, log=logs.append)
        box["q"] = q
        if box.get("discarded"):
            return
        try:
            # (the block size is the change maps', made by the caller with the real one)
            job = lvc.begin_backup(domain, since, 1 << 16, uri=uri, log=logs.append, quiesce=q.frozen,
                                   full_disks=frozenset(targets - covered) if since else frozenset(),
                                   change_maps=False, dom=dom, live_xml=live_xml,
                                   checkpoints=[c.getName() for c in everyone])
        except BaseException:
            q.close_agent()
            raise
        box["job"], box["quiescer"] = job, q
        if mode in ("full", "differential"):  # else the caller compares the files with the last backup's
            _capture_state(job, uri)
    except BaseException as e:  # noqa: BLE001 - the usual way begins again and reports it
        box["error"] = e


def _capture_state(job, uri: str) -> None:  # noqa: ANN001 - a LibvirtBackup
    """Copy the domain's state files (NVRAM, TPM, kernel, ...) right after the checkpoint, as
    the usual way does after it; on any error leave it to the usual way, which reports it."""
    import shutil
    import tempfile

    from vmbak.domain.state import capture, state_items

    work = tempfile.mkdtemp(prefix=f"vmbak-state-{os.getpid()}-")
    try:
        items = state_items(job.domain_xml, uri)
        notes = capture(items, work)
    except Exception:  # noqa: BLE001
        shutil.rmtree(work, ignore_errors=True)
        return
    job.state = (items, work, notes)


def pending(domain: str, uri: str) -> bool:
    """Whether a job was begun early for this domain and is not taken yet."""
    with _lock:
        return bool(_state) and not _state.get("taken") and (_state["domain"], _state["uri"]) == (domain, uri)


def take(domain: str, uri: str):  # noqa: ANN201 - (LibvirtBackup, Quiescer, log lines) or None
    """The job begun early for this domain (waits for it), or None."""
    if not pending(domain, uri):
        return None
    from vmbak.interrupts import unregister_cleanup

    _state["box"]["done"].wait()  # interrupted, ``discard`` (a cleanup) ends the job
    with _lock:
        _state["taken"] = True
    unregister_cleanup(_state["token"])
    box = _state["box"]
    if "job" not in box:
        return None
    return box["job"], box["quiescer"], list(box["logs"])


def discard() -> None:
    """End a job begun early that nobody took: remove its new checkpoint."""
    with _lock:
        if not _state or _state.get("taken"):
            return
        _state["taken"] = True
    box = _state["box"]
    box["discarded"] = True
    if "q" in box:
        box["q"].interrupt()  # a freeze held for a test (VMBAK_TEST_FREEZE_PAUSE) ends now
    box["done"].wait()
    try:
        if "job" in box:
            if box["job"].state is not None:
                import shutil

                shutil.rmtree(box["job"].state[1], ignore_errors=True)
            box["job"].abort()
    finally:
        if "quiescer" in box:
            box["quiescer"].close_agent()
