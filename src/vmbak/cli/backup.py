"""The backup command."""

from __future__ import annotations

import argparse

from vmbak.cli.common import emit_summary, log, open_repo, open_repo_meanwhile, parse_size, progress
from vmbak.cli.filters import tags_from_args
from vmbak.engine.backup import DEFAULT_BLOCK_SIZE, MODES, BackupOptions
from vmbak.engine.common import human
from vmbak.errors import EXIT_PARTIAL, VmbakError, printable
from vmbak.guest.agent import LibvirtAgent, SocketAgent
from vmbak.guest.quiesce import FREEZE_MODES, Hooks, Quiescer
from vmbak.repo.manifest import TORN

EPILOG = """examples:
  vmbak backup /var/lib/images/web.raw --name web                      # first full, then incremental
  vmbak backup /var/lib/images/web.raw --name web --mode differential  # changes since the last full
  vmbak backup /var/lib/images/web.raw --name web --tag nightly,pre-upgrade   # tags (see vmbak snapshots --tag)
  vmbak backup /dev/vg0/db --name db --mode full --json
  vmbak backup /var/lib/libvirt/images/db.qcow2 --name db              # qcow2, vhdx, vhd, vmdk: thin areas skipped
  vmbak backup db.img --name db --format raw                           # do not probe the format
  vmbak backup overlay.qcow2 --name db --changes overlay               # changed = clusters of the top layer
  vmbak backup --name web --changes track:/run/vmbak/web.sock          # from a `vmbak track` checkpoint
  vmbak backup --name web --changes track:/run/vmbak/web.sock --verify-changes   # also scan: prove 0 missed
  vmbak backup --name db --changes qemu:/run/qemu/db.qmp:drive0        # QEMU's persistent dirty bitmap
  vmbak backup --name db --changes qemu:/run/qemu/db.qmp:drive0 --nbd-server /run/qemu/db.nbd
  vmbak backup --libvirt db                                            # every disk of a running domain
  vmbak backup --libvirt db --libvirt-uri qemu:///session --name nightly   # snapshots nightly-vda, ...
  vmbak backup --libvirt db --freeze always                            # fail rather than back up unfrozen
  vmbak backup --libvirt db --hook-pre ./quiesce.sh --hook-post ./resume.sh
  vmbak backup --libvirt 'web-*'                                       # every matching domain, one summary
  vmbak backup --name db --changes qemu:/run/qemu/db.qmp:drive0 --guest-agent /run/qemu/db.qga
  vmbak backup rbd:vms/db --name db                                    # Ceph RBD: snapshot + rbd diff
  vmbak backup rbd:vms/db --name db --ceph-conf /etc/ceph/ceph.conf --ceph-id backup --verify-changes

change sources (--changes):
  auto, scan        read DISK, store the blocks whose hash differs from the previous backup
  full              read and hash everything (the snapshot is still an incremental of its parent)
  overlay           DISK is a qcow2 overlay or vmdk delta over the previous backup's image:
                    only the clusters allocated in its top layer are read
  track:SOCKET      a disk served by `vmbak track start ... --socket SOCKET` (no DISK): a frozen
                    checkpoint is read while the VM keeps writing; committed after the snapshot is saved
  qemu:QMP:NODE     node or drive NODE of a running QEMU / qemu-storage-daemon with QMP socket QMP
                    (no DISK): a point-in-time view and a persistent dirty bitmap
DISK rbd:POOL/IMAGE is a Ceph RBD image: each backup reads a new snapshot of it (vmbak.TIME.RANDOM);
with auto, the changes are librbd's diff since the previous backup's snapshot (fast-diff with the
object map), which is removed once the new snapshot is saved.
When a change source cannot prove it saw every change (unknown change ID, lost or inconsistent
bitmap), the backup says so and reads everything (scan) from a consistent view instead.

guest consistency (--libvirt, qemu:, track:):
  --freeze auto     (default) freeze the guest's filesystems through qemu-guest-agent just before the
                    checkpoint and thaw as soon as it exists; without an answering agent the backup is
                    crash-consistent and says so
  --freeze always   no agent, or a freeze that fails: error, no backup
  --freeze never    crash-consistent
The manifest records the level (frozen, crash, hooks); `vmbak snapshots` shows it. Hooks run as
SCRIPT with VMBAK_HOOK_PHASE (pre|post), VMBAK_VM, VMBAK_DISK, VMBAK_NAME, VMBAK_SOURCE, VMBAK_FREEZE
and, for post, VMBAK_STATUS (ok|failed) and VMBAK_CONSISTENCY. A failing pre hook aborts the backup;
the post hook runs whenever the pre hook ran: after the thaw, or after the backup of a plain DISK.
"""


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backup", parents=[parent], help="back up a disk",
                       description="Back up a raw disk, a block device, an image file (qcow2 with its backing "
                       "chain, vhdx, vpc/VHD, vmdk), a disk behind `vmbak track`, a running QEMU's drive, or "
                       "every disk of a running libvirt domain. The first backup of a name is full; later ones "
                       "read only the blocks the change source reports (or, by default, read the disk and "
                       "compare each block's hash with the previous backup) and store only changed blocks. "
                       "Zero blocks, holes and unallocated image areas are never stored; identical chunks are "
                       "stored once across all disks and backups.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("disk", metavar="DISK", nargs="?",
                   help="raw file, block device, image file or Ceph RBD image rbd:POOL/IMAGE (not with track:, "
                   "qemu: or --libvirt)")
    p.add_argument("--name", help="the name this disk's backups share (e.g. web); with --libvirt the prefix "
                   "of each disk's name (default: the domain name)")
    p.add_argument("--tag", action="append", metavar="TAG[,TAG...]",
                   help="tag the snapshot (repeatable; a,b gives two tags); tags select snapshots in "
                   "snapshots, forget, restore and copy (--tag), and forget --keep-tag keeps them")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="auto (default): full if the name has no backup, else incremental")
    p.add_argument("--changes", default="auto", metavar="SOURCE",
                   help="change source: auto (default), scan, full, overlay, track:SOCKET or "
                   "qemu:QMP_SOCKET:NODE (see below)")
    p.add_argument("--verify-changes", action="store_true",
                   help="also read and hash every block, and report (and store) the changed blocks the change "
                   "source missed; expected: 0")
    p.add_argument("--format", metavar="FMT",
                   help="image format of DISK: raw, qcow2, vhdx, vpc (vhd), vmdk, ... (default: detected "
                   "with qemu-img info; block devices and *.raw files are read as raw)")
    p.add_argument("--nbd-server", metavar="ADDR",
                   help="with qemu:, the NBD server QEMU already runs (unix socket path or nbd://HOST:PORT); "
                   "by default the backup starts a private one")
    p.add_argument("--libvirt", metavar="DOMAIN",
                   help="back up every disk of this libvirt domain with a checkpoint (pull mode), and its NVRAM, "
                   "TPM state and kernel/initrd; snapshots are named DOMAIN-TARGET (db-vda) and DOMAIN-ROLE "
                   "(db-nvram) and keep the domain XML. A shut-off domain is started paused for the backup and "
                   "stopped after it. A pattern ('web-*') backs up every matching domain, one after another")
    p.add_argument("--libvirt-uri", metavar="URI", default="qemu:///system",
                   help="libvirt connection (default qemu:///system)")
    p.add_argument("--freeze", choices=FREEZE_MODES, default="auto",
                   help="freeze the guest's filesystems around the checkpoint: auto (default: when the guest "
                   "agent answers), always (fail otherwise) or never")
    p.add_argument("--freeze-mountpoint", action="append", metavar="PATH", dest="freeze_mountpoints",
                   help="freeze only this guest mountpoint (repeat for more; default: all)")
    p.add_argument("--guest-agent", metavar="SOCKET",
                   help="with qemu: or track:, the unix socket of the guest's qemu-guest-agent channel "
                   "(QEMU's chardev of the port org.qemu.guest_agent.0)")
    p.add_argument("--hook-pre", metavar="SCRIPT", help="run before the freeze (or before a DISK is read); "
                   "a failure aborts the backup")
    p.add_argument("--hook-post", metavar="SCRIPT", help="run after the thaw (or after a DISK's backup), "
                   "whenever the pre hook ran")
    p.add_argument("--ceph-conf", metavar="PATH",
                   help="with rbd:POOL/IMAGE, the ceph.conf to use (default: $CEPH_CONF, then /etc/ceph/ceph.conf); "
                   "it names the monitors and the keyring")
    p.add_argument("--ceph-id", metavar="ID",
                   help="with rbd:POOL/IMAGE, the Ceph client id (default admin: client.admin)")
    p.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_SIZE, metavar="N",
                   help="tracking block size (default 64K; e.g. 65536, 64K, 1M)")
    p.add_argument("--workers", type=int, default=2, help="worker threads (default 2)")
    p.add_argument("--no-skip-unused", dest="skip_unused", action="store_false",
                   help="read and store blocks that no filesystem uses (default: skip them)")
    p.set_defaults(func=cmd_backup)


def _line(m) -> str:  # noqa: ANN001 - a Manifest
    s = m.stats
    level = f", {m.guest_consistency['level']}" if m.guest_consistency else ""
    text = (f"snapshot {m.short_id} saved ({m.kind}, source {m.change_source}{level}): "
            f"read {human(s['read_bytes'])}, changed {human(s['changed_bytes'])}, "
            f"added {human(s['new_stored_bytes'])} in {s['duration_s']} s")
    if m.tags:
        text += f"; tags {printable(','.join(m.tags))}"
    if m.consistency == TORN:
        text += "; TORN: the disk changed while it was read"
    if "verify_missed_blocks" in s:
        text += f"; verify-changes: {s['verify_missed_blocks']} changed blocks missed by the change source"
    return text


def cmd_backup(args: argparse.Namespace) -> int:
    from vmbak.engine import sources

    changes = sources.parse_changes(args.changes)
    if args.libvirt is not None:
        return _cmd_libvirt(args, changes)
    if args.libvirt_uri != "qemu:///system":
        raise VmbakError("--libvirt-uri goes with --libvirt DOMAIN")
    name = sources.check_name(args.name)
    tags = tags_from_args(args.tag)
    if changes.reads_disk_file:
        if args.disk is None:
            raise VmbakError(f"give the DISK to back up (--changes {changes} reads a disk or image file)")
    elif args.disk is not None:
        raise VmbakError(f"--changes {changes} reads the disk through {changes.kind}; give no DISK argument")
    if args.format is not None and not changes.reads_disk_file:
        raise VmbakError(f"--format goes with a DISK argument, not with --changes {changes}")
    from vmbak.disks.rbd import is_rbd

    rbd = is_rbd(args.disk)
    if rbd and args.format is not None:
        raise VmbakError("--format does not go with an RBD image (rbd:POOL/IMAGE)")
    if not rbd and (args.ceph_conf is not None or args.ceph_id is not None):
        raise VmbakError("--ceph-conf and --ceph-id go with an RBD image (rbd:POOL/IMAGE)")
    if args.nbd_server is not None and changes.kind != "qemu":
        raise VmbakError("--nbd-server goes with --changes qemu:QMP_SOCKET:NODE")
    if args.guest_agent is not None and changes.kind not in ("qemu", "track") and not rbd:
        raise VmbakError("--guest-agent goes with --changes qemu:QMP_SOCKET:NODE, track:SOCKET or rbd:POOL/IMAGE")
    if changes.reads_disk_file and not rbd:
        _import_for_disk_files()
    with progress(args) as bar:  # shown while the repository and the source open, too
        repo = open_repo(args)
        lg = log(args)
        disk = args.disk if changes.reads_disk_file else str(changes)
        point = rbd or not changes.reads_disk_file
        q = _quiescer(args, lg, vm="", disk=disk, name=name, source="rbd" if rbd else changes.kind
                      if not changes.reads_disk_file else "file", point_in_time=point,
                      agent=(lambda: SocketAgent(args.guest_agent)) if args.guest_agent else None,
                      agent_key=SocketAgent.key_for(args.guest_agent) if args.guest_agent else None)
        ok = False
        try:
            q.start()
            src = sources.open_source(repo, name=name, mode=args.mode, changes=changes, disk=args.disk,
                                      fmt=args.format, block_size=args.block_size, nbd_server=args.nbd_server, log=lg,
                                      quiesce=q.frozen if point else None, ceph_conf=args.ceph_conf,
                                      ceph_id=args.ceph_id)
            with src:
                opts = BackupOptions(name=name, mode=args.mode, changes=changes.engine_changes,
                                     verify_changes=args.verify_changes, block_size=args.block_size,
                                     workers=args.workers, progress=bar, log=lg,
                                     skip_unused=args.skip_unused, notes=list(q.notes),
                                     guest_consistency=_consistency(q), tags=tags)
                m = sources.run_backup(repo, src, opts, log=lg)
            ok = True
        finally:
            q.close(ok)
    emit_summary(args, m.summary(), _line(m))
    return 0


def _import_for_disk_files() -> None:
    """Import what opening and analysing a disk file needs (qemu-img and NBD access, the
    partition and filesystem parsers) before the repository opens: its key derivation,
    started at launch (repo/kdf_early.py), runs meanwhile on another CPU. Imported after
    it, they delayed the first read of every backup of a disk file by about 70 ms."""
    import vmbak.changes.overlay  # noqa: F401
    from vmbak import usage

    usage.load_parsers()


def _quiescer(args: argparse.Namespace, lg, *, vm: str, disk: str, name: str, source: str,  # noqa: ANN001
              point_in_time: bool, agent, agent_key: str | None, recover: bool = True) -> Quiescer:  # noqa: ANN001
    if args.freeze_mountpoints and not point_in_time:
        raise VmbakError("--freeze-mountpoint goes with --libvirt, qemu: or track: (a point-in-time view)")
    if not point_in_time and args.freeze == "always":
        raise VmbakError("--freeze always needs a point-in-time view of a running guest (--libvirt, qemu: "
                         "or track:); a DISK file is read as it is")
    hooks = Hooks(pre=args.hook_pre, post=args.hook_post,
                  env={"VMBAK_VM": vm, "VMBAK_DISK": disk, "VMBAK_NAME": name, "VMBAK_SOURCE": source,
                       "VMBAK_FREEZE": args.freeze})
    q = Quiescer(mode=args.freeze, agent=agent, agent_key=agent_key, guest=f"libvirt domain {vm!r}" if vm
                 else (f"the guest behind {disk}"), mountpoints=args.freeze_mountpoints, hooks=hooks,
                 point_in_time=point_in_time, log=lg)
    if recover:
        q.recover()
    return q


def _consistency(q: Quiescer) -> dict | None:
    """The manifest's guest_consistency field: always for a point-in-time view; for a plain DISK
    only when hooks ran."""
    if not q.point_in_time:
        return q.record() if q.hooks.pre or q.hooks.post else None
    return q.record()


def _cmd_libvirt(args: argparse.Namespace, changes) -> int:  # noqa: ANN001 - a ChangeSpec
    from vmbak.engine import sources

    if args.disk is not None:
        raise VmbakError("--libvirt reads every disk of the domain; give no DISK argument")
    if args.format is not None or args.nbd_server is not None:
        raise VmbakError("--format and --nbd-server do not go with --libvirt")
    if args.ceph_conf is not None or args.ceph_id is not None:
        raise VmbakError("--ceph-conf and --ceph-id go with an RBD image (rbd:POOL/IMAGE)")
    domain = args.libvirt
    if not domain:
        raise VmbakError("--libvirt needs a domain name")
    if args.guest_agent is not None:
        raise VmbakError("--guest-agent goes with qemu: or track:; --libvirt reaches the agent through libvirt")
    tags = tags_from_args(args.tag)
    if not sources.is_domain_pattern(domain):
        prefix = args.name or domain
        sources.check_name(f"{prefix}-vda")
        bar = progress(args)
        # The repository opens (key derivation) while libvirt is asked about the domain and the
        # modules the backup needs are loaded; its errors still come first, as they would in turn.
        opened = open_repo_meanwhile(args)
        data, text = _backup_domain(args, changes, opened, bar, domain, prefix, tags)
        emit_summary(args, data, text)
        return 0
    if args.name is not None:
        raise VmbakError("--name does not go with a domain pattern: each domain's snapshots are named after it")
    names = sources.libvirt_domains_matching(domain, args.libvirt_uri)
    for n in names:
        sources.check_name(f"{n}-vda")
    repo = open_repo(args)
    lg = log(args)
    done: list[dict] = []
    failed: list[dict] = []
    for n in names:
        try:
            data, text = _backup_domain(args, changes, lambda: repo, progress(args), n, n, tags)
        except VmbakError as e:  # an interrupt or a bug ends the whole run
            lg(f"error: libvirt domain {n}: {e}")
            failed.append({"domain": n, "error": str(e)})
            continue
        done.append(data)
        if not args.json and not args.quiet:
            print(printable(text))
    text = (f"libvirt domains matching {domain!r}: {len(done)} of {len(names)} backed up"
            + (f"; failed: {', '.join(f['domain'] for f in failed)}" if failed else ""))
    if not done:
        raise VmbakError(text + f" ({failed[0]['error']})" if len(failed) == 1 else text)
    emit_summary(args, {"pattern": domain, "domains": done, "failed": failed}, text)
    return EXIT_PARTIAL if failed else 0


def _backup_domain(args: argparse.Namespace, changes, opened, bar, domain: str, prefix: str,  # noqa: ANN001
                   tags: list[str]) -> tuple[dict, str]:
    """Back up every disk (and state file) of one domain; its summary and its line. ``opened()``
    gives the repository (it may still be opening in a thread: its errors are reported first)."""
    from vmbak.changes import libvirt_early
    from vmbak.engine import sources

    lg = log(args)
    uri = args.libvirt_uri
    # A job begun while the modules loaded (see libvirt_early) may hold the guest frozen
    # right now, with its freeze record: recover only if there is none.
    pending = libvirt_early.pending(domain, uri)
    try:
        targets = sources.libvirt_disk_targets(domain, uri)
        q = _quiescer(args, lg, vm=domain, disk=" ".join(targets), name=prefix, source="libvirt",
                      point_in_time=True, agent=lambda: LibvirtAgent(uri, domain),
                      agent_key=LibvirtAgent.key_for(uri, domain), recover=not pending)
        sources.preload_libvirt()
    except BaseException:
        opened()  # a repository error is reported first
        raise
    repo = opened()
    early = libvirt_early.take(domain, uri) if pending else None
    if pending and early is None:
        q.recover()  # it failed: begin the usual way
    if early is not None:
        job0, q0, lines = early
        q0.log = lg
        for line in lines:
            lg(line)
        q = q0
    ok = False
    try:
        q.start()
        job = sources.open_libvirt(repo, domain, prefix=prefix, mode=args.mode, changes=changes,
                                   block_size=args.block_size, uri=uri, log=lg, quiesce=q.frozen,
                                   early=early[0] if early is not None else None)
        if job.offline:
            q.at_rest()
        opts = BackupOptions(name=prefix, mode=args.mode, changes=changes.engine_changes,
                             verify_changes=args.verify_changes, block_size=args.block_size, workers=args.workers,
                             progress=bar, log=lg, skip_unused=args.skip_unused, notes=list(q.notes),
                             guest_consistency=q.record(), tags=tags)

        def each(m) -> None:  # noqa: ANN001
            if not args.json and not args.quiet:
                print(printable(f"{m.name}: {_line(m)}"))

        with bar:
            ms = sources.run_libvirt_backup(repo, job, opts, on_disk=each, log=lg)
        ok = True
    finally:
        q.close(ok)
        if early is not None and not ok:
            early[0].abort()  # (a no-op when open_libvirt ended it already)
    level = q.record()["level"]
    roles = [m.extra["libvirt"]["state_role"] for m in ms if (m.extra.get("libvirt") or {}).get("state_role")]
    text = (f"libvirt domain {domain}: {len(ms) - len(roles)} disks"
            + (f" and {len(roles)} state files ({', '.join(roles)})" if roles else "")
            + f" backed up at checkpoint {job.checkpoint} ({level})")
    return {"domain": domain, "checkpoint": job.checkpoint, "guest_consistency": q.record(),
            "snapshots": [m.summary() for m in ms]}, text
