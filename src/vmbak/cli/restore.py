"""The restore command."""

from __future__ import annotations

import argparse
import os

from vmbak.cli.common import emit_summary, log, open_repo, progress
from vmbak.cli.filters import FILTER_HELP, add_filter_options, filter_from_args
from vmbak.engine.common import human
from vmbak.errors import EXIT_PARTIAL, VmbakError, printable

EPILOG = """examples:
  vmbak restore web:latest /tmp/web-restored.raw
  vmbak restore web@2026-11-22T10:00 /tmp/web-monday.raw
  vmbak restore 3f2a9c1e /dev/vg0/web --overwrite
  vmbak restore web:latest --tag nightly /tmp/web.raw         # the newest web snapshot tagged nightly
  vmbak restore latest --name web --host hv1 /tmp/web.raw     # latest: the newest the filters select
  vmbak restore db:latest /tmp/db.qcow2 --format qcow2        # also raw, vhdx, vpc (or vhd), vmdk; thin
  vmbak restore db:latest /tmp/db.vhdx                        # the format follows .qcow2/.vhdx/.vhd/.vmdk
  vmbak restore --libvirt db:latest --define db-restored      # disks, NVRAM, TPM state, kernel/initrd, XML
  vmbak restore --libvirt db@2026-11-22 /var/lib/libvirt/images/restore --format raw
  vmbak restore --from-serve /run/vmbak/web.sock /var/lib/images/web.raw   # see vmbak serve --writable
  vmbak restore db:latest rbd:vms/db-restored                 # a new Ceph RBD image, written sparsely
  vmbak restore db:latest rbd:vms/db2 --ceph-conf /etc/ceph/ceph.conf --ceph-id backup

With filters, NAME:latest, NAME and NAME@TIME pick the newest matching snapshot of NAME;
`latest` picks the newest matching snapshot (the filters must select one disk name); an
id must name a matching snapshot. An id that forget or merge rewrote still names the
snapshot (a note on standard error says so; --json has "alias").

""" + FILTER_HELP

IGNORE_ERRORS_HELP = """
With --ignore-errors (e.g. vmbak restore web:latest /tmp/web.raw --ignore-errors), blocks
whose chunk is missing or fails verification are left as zeros and the restore goes on;
every such block range is listed (text and --json "damaged"), the target is still
completed and renamed into place (whole, with those ranges zeroed), and the exit status
is 3 (partial restore).
"""

EPILOG += IGNORE_ERRORS_HELP


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("restore", parents=[parent], help="restore a snapshot to a file, image or device",
                       description="Write a snapshot's disk to a new sparse raw file (zeros become holes), to a "
                       "new thin qcow2, vhdx, vpc (VHD) or vmdk image, or over an existing file or block device "
                       "at least as large. An incremental is restored with its chain, newest first, writing every "
                       "block once, and every block is checked against the snapshot's block hashes. A new file "
                       "appears only once it is complete and verified. With --libvirt, every disk of a libvirt "
                       "backup is restored and the domain XML saved with it is written beside them (and, with "
                       "--define, defined as a new domain).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="SNAP", help="snapshot id (prefix), NAME:latest, NAME@TIME (UTC) or "
                   "latest (with filters); "
                   "with --libvirt, DOMAIN:latest, DOMAIN@TIME or the id of any of its disks' snapshots")
    p.add_argument("target", metavar="TARGET", nargs="?",
                   help="new file, or existing file/block device; with --libvirt, the directory for the disks "
                   "and the XML (default: the directory each disk had)")
    p.add_argument("--format", metavar="FMT",
                   help="raw, qcow2, vhdx, vpc (vhd) or vmdk (default: from TARGET's extension "
                   ".qcow2/.vhdx/.vhd/.vmdk, else raw; with --libvirt, each disk's own format)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing over an existing regular file or block device")
    p.add_argument("--no-verify", action="store_true", help="skip checking the blocks against the block hashes")
    p.add_argument("--verify-readback", action="store_true",
                   help="after writing, read the whole target back and check it against the block hashes "
                   "(slower; catches a target that does not keep what it was given)")
    p.add_argument("--ignore-errors", action="store_true",
                   help="restore what can be restored: leave blocks of missing or corrupt chunks as zeros, "
                   "list every damaged block range, complete the target, and exit with status 3")
    p.add_argument("--sync", action="store_true",
                   help="flush the restored data to stable storage before reporting success")
    p.add_argument("--libvirt", action="store_true",
                   help="SNAP is a libvirt backup (vmbak backup --libvirt): restore all its disks as "
                   "NAME-TARGET.EXT, its NVRAM, kernel and initrd beside them, its TPM state under the new "
                   "domain's UUID, and its domain XML (new UUID and MAC addresses, every path rewritten) as NAME.xml")
    p.add_argument("--define", metavar="NAME",
                   help="with --libvirt: define the restored domain in libvirt as NAME (not started); NAME "
                   "also names the files (default DOMAIN-restored, not defined)")
    p.add_argument("--libvirt-uri", metavar="URI", default="qemu:///system",
                   help="libvirt connection for --define (default qemu:///system)")
    p.add_argument("--from-serve", metavar="SOCKET",
                   help="make an instant recovery permanent: copy the running copy-on-write export of "
                   "'vmbak serve --writable --socket SOCKET' (the snapshot with the overlay's writes) to the "
                   "new raw file TARGET while clients keep writing, then switch the export over to TARGET "
                   "(usage: vmbak restore --from-serve SOCKET TARGET)")
    p.add_argument("--ceph-conf", metavar="PATH",
                   help="with TARGET rbd:POOL/IMAGE, the ceph.conf to use (default: $CEPH_CONF, then "
                   "/etc/ceph/ceph.conf)")
    p.add_argument("--ceph-id", metavar="ID", help="with TARGET rbd:POOL/IMAGE, the Ceph client id (default admin)")
    p.add_argument("--workers", type=int, default=4,
                   help="stretches of the disk restored at once (default 4: restore waits on writes more than on "
                   "the CPU); from a local repository at most one per CPU is decoded at a time, the others write")
    add_filter_options(p, name_help="only snapshots of this disk name (useful with SNAP latest)")
    p.set_defaults(func=cmd_restore)


def _format_for(target: str, fmt: str | None) -> str:
    from vmbak.engine.sources import FORMAT_BY_EXTENSION, check_image_format

    f = check_image_format(fmt, write=True)
    if f is not None:
        return f
    return FORMAT_BY_EXTENSION.get(os.path.splitext(target)[1].lower(), "raw")


def cmd_restore(args: argparse.Namespace) -> int:
    where = filter_from_args(args)
    if not where.empty() and (args.from_serve or args.libvirt):
        raise VmbakError("--name, --host and --tag do not go with --from-serve or --libvirt")
    if args.from_serve:
        return _cmd_from_serve(args)
    if args.libvirt:
        return _cmd_libvirt(args)
    if args.define is not None or args.libvirt_uri != "qemu:///system":
        raise VmbakError("--define and --libvirt-uri go with --libvirt")
    if args.verify_readback and args.no_verify:
        raise VmbakError("--verify-readback and --no-verify contradict each other")
    if args.target is None:
        raise VmbakError("give the TARGET to restore to (a new file or an existing file or device)")
    from vmbak.disks.rbd import is_rbd

    if is_rbd(args.target):
        return _cmd_rbd(args, where)
    if args.ceph_conf is not None or args.ceph_id is not None:
        raise VmbakError("--ceph-conf and --ceph-id go with a TARGET rbd:POOL/IMAGE")
    fmt = _format_for(args.target, args.format)
    from vmbak.disks.qemu import ImageRestoreTarget
    from vmbak.engine.overwrite import check_overwrite
    from vmbak.engine.restore import restore

    if fmt == "raw":  # (an image format refuses a device anyway, and says why)
        check_overwrite(args.target, args.overwrite)  # a device needs --overwrite, like a file
    bar = progress(args)
    repo = open_repo(args)
    m, alias = repo.resolve(args.snapshot, where)
    tgt = ImageRestoreTarget(args.target, m.disk_size, fmt, overwrite=args.overwrite)
    try:
        r = restore(repo, m, tgt, verify=not args.no_verify, workers=args.workers, progress=bar,
                    sync=args.sync, readback=args.verify_readback, ignore_errors=args.ignore_errors)
    except BaseException:
        tgt.discard()  # a new file or image never appears half written
        raise
    finally:
        bar.close()
        tgt.close()
    r["format"] = fmt
    r["alias"] = alias  # {"id": the id asked for, "now": the snapshot's id, ...} when it was rewritten
    text = (f"restored snapshot {m.short_id} ({printable(m.name)}, {m.time}) to {r['target']} ({fmt}): "
            f"{human(r['written_bytes'])} written from a chain of {r['chain_length']}"
            + ((", verified (read back)" if args.verify_readback else ", verified") if r["verified"] else "") + f" in {r['duration_s']} s")
    lines = [text] + [f"warning: {w}" for w in r["warnings"]]
    if r["damaged"]:
        lost = sum(d["length"] for d in r["damaged"])
        lines.append(f"PARTIAL: {len(r['damaged'])} damaged block ranges ({human(lost)}) could not be restored "
                     "and hold zeros:")
        for d in r["damaged"]:
            end = d["start_block"] + d["blocks"] - 1
            lines.append(f"  blocks {d['start_block']}-{end} (bytes {d['offset']}-{d['offset'] + d['length'] - 1}) "
                         f"of snapshot {d['snapshot']}: {d['reason']}")
    emit_summary(args, r, "\n".join(lines))
    return EXIT_PARTIAL if r["damaged"] else 0


def _cmd_rbd(args: argparse.Namespace, where) -> int:  # noqa: ANN001 - a SnapshotFilter
    from vmbak.disks.rbd import RbdRestoreTarget, parse_rbd
    from vmbak.engine.restore import restore

    spec = parse_rbd(args.target)
    if args.format not in (None, "raw"):
        raise VmbakError("an RBD image holds the raw disk: --format does not go with rbd:POOL/IMAGE")
    if args.overwrite:
        raise VmbakError("vmbak restores into a new RBD image only; --overwrite does not go with rbd:POOL/IMAGE")
    bar = progress(args)
    repo = open_repo(args)
    m, alias = repo.resolve(args.snapshot, where)
    tgt = RbdRestoreTarget(spec, m.disk_size, conf=args.ceph_conf, client_id=args.ceph_id)
    try:
        r = restore(repo, m, tgt, verify=not args.no_verify, workers=args.workers, progress=bar,  # type: ignore[arg-type]
                    sync=args.sync, readback=args.verify_readback, ignore_errors=args.ignore_errors)
    except BaseException:
        tgt.discard()  # a new image never appears half written
        raise
    finally:
        bar.close()
        tgt.close()
    r["format"] = "rbd"
    r["alias"] = alias
    r["warnings"] += [f"removed rbd:{spec.pool}/{printable(n)}: the partial image of a killed restore"
                      for n in tgt.reaped]
    text = (f"restored snapshot {m.short_id} ({printable(m.name)}, {m.time}) to {r['target']}: "
            f"{human(r['written_bytes'])} written from a chain of {r['chain_length']}"
            + (", verified" if r["verified"] else "") + f" in {r['duration_s']} s")
    lines = [text] + [f"warning: {w}" for w in r["warnings"]]
    if r["damaged"]:
        lost = sum(d["length"] for d in r["damaged"])
        lines.append(f"PARTIAL: {len(r['damaged'])} damaged block ranges ({human(lost)}) hold zeros")
    emit_summary(args, r, "\n".join(lines))
    return EXIT_PARTIAL if r["damaged"] else 0


def _cmd_libvirt(args: argparse.Namespace) -> int:
    from vmbak.engine.sources import restore_libvirt

    if args.verify_readback:
        raise VmbakError("--verify-readback is not available with --libvirt")
    if args.ignore_errors:
        raise VmbakError("--ignore-errors restores one snapshot; it does not go with --libvirt")

    bar = progress(args)
    repo = open_repo(args)
    with bar:
        r = restore_libvirt(repo, args.snapshot, directory=args.target, new_name=args.define,
                            define=args.define is not None, fmt=args.format, uri=args.libvirt_uri,
                            overwrite=args.overwrite, verify=not args.no_verify, workers=args.workers,
                            progress=lambda: bar, log=log(args))
    lines = [f"restored {d['target_disk']} from snapshot {d['snapshot'][:8]} to {d['target']} ({d['format']}), "
             f"{human(d['written_bytes'])} written" for d in r["disks"]]
    for st in r["state"]:
        if st["snapshot"]:
            lines.append(f"restored {st['role']} from snapshot {st['snapshot'][:8]} to {st['target']}")
        else:
            lines.append(f"{st['role']}: {st['target']} (recorded, not stored: the new domain uses it as it is)")
    lines += [f"warning: {w}" for w in r["warnings"]]
    lines.append(f"domain XML of {r['domain']} (checkpoint {r['checkpoint']}) written to {r['xml']} "
                 f"(new UUID {r['uuid']})")
    if r["defined"]:
        lines.append(f"defined libvirt domain {r['defined']} (not started)")
    emit_summary(args, r, "\n".join(lines))
    return 0


def _cmd_from_serve(args: argparse.Namespace) -> int:
    from vmbak.serve.server import make_permanent

    if args.target is not None:  # with --from-serve the only positional argument is TARGET
        raise VmbakError("usage: vmbak restore --from-serve SOCKET TARGET")
    if args.ignore_errors:
        raise VmbakError("--ignore-errors restores a snapshot; it does not go with --from-serve")
    bar = progress(args)
    started = [False]

    def report(done: int, total: int) -> None:
        if not started[0] and total:
            bar.start(total, "copy")
            started[0] = True
        if started[0]:
            bar.advance(done - bar_done[0])
            bar_done[0] = done

    bar_done = [0]
    try:
        r = make_permanent(args.from_serve, args.snapshot, progress=report)
    finally:
        bar.close()
    emit_summary(args, r, f"copied the export of {args.from_serve} to {r['target']} ({human(r['disk_size'])}) in "
         f"{r['duration_s']} s; the export now reads and writes {r['target']}, the backup and the overlay "
         "are no longer used")
    return 0
