"""The copy command: replicate snapshots between repositories."""

from __future__ import annotations

import argparse
import json
import os

from vmbak.cli.common import (
    apply_s3_options,
    counted,
    emit_summary,
    given_password,
    log,
    needs_password,
    password,
    progress,
    resolve_password,
)
from vmbak.cli.filters import FILTER_HELP, add_filter_options, filter_from_args
from vmbak.engine.common import human
from vmbak.engine.copy import copy
from vmbak.errors import VmbakError, printable
from vmbak.repo.repository import Repository

EPILOG = """examples:
  vmbak copy --from-repo /backups/local --to-repo s3:http://10.0.0.5:9000/offsite/vmbak
  vmbak copy --from-repo /backups/local --to-repo s3:https://s3.eu-west-1.amazonaws.com/bucket/vm --name web
  vmbak copy --from-repo s3:http://10.0.0.5:9000/offsite/vmbak --to-repo /restore/repo web:latest
  vmbak copy --from-repo /backups/local --to-repo /backups/offsite --tag monthly   # every snapshot tagged monthly

The destination's password comes from --password-file, --password-command,
$VMBAK_PASSWORD_FILE, $VMBAK_PASSWORD_COMMAND or $VMBAK_PASSWORD; the source's from
--from-password-file, --from-password-command, $VMBAK_FROM_PASSWORD_FILE,
$VMBAK_FROM_PASSWORD_COMMAND or $VMBAK_FROM_PASSWORD (in that order). The destination
defaults to -r / $VMBAK_REPOSITORY, the source to $VMBAK_FROM_REPOSITORY.
Filters choose the snapshots copied (and resolve SNAPs among them, as restore does); each
is copied with its whole parent chain, whether or not the parents match.

""" + FILTER_HELP


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("copy", parents=[parent], help="copy snapshots to another repository",
                       description="Copy snapshots, each with its whole parent chain, from one repository to "
                       "another (local directories and S3, either way). Only chunks the destination lacks are "
                       "stored there. When the repositories have different keys (or one is encrypted and the "
                       "other not), chunks are decrypted, checked and sealed again with the destination's key. "
                       "Snapshots copied before are skipped, so an interrupted copy is finished by running it "
                       "again. Without SNAP or filters, every snapshot is copied.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshots", nargs="*", metavar="SNAP", help="snapshots to copy (id, NAME:latest, NAME@TIME)")
    p.add_argument("--from-repo", metavar="REPO", help="source repository (default: $VMBAK_FROM_REPOSITORY)")
    p.add_argument("--to-repo", metavar="REPO", help="destination repository (default: -r / $VMBAK_REPOSITORY)")
    p.add_argument("--from-password-file", metavar="FILE",
                   help="the source's password file (default: $VMBAK_FROM_PASSWORD_FILE, $VMBAK_FROM_PASSWORD)")
    p.add_argument("--from-password-command", metavar="CMD",
                   help="run CMD (no shell) for the source's password (default: $VMBAK_FROM_PASSWORD_COMMAND)")
    add_filter_options(p, name_help="copy the snapshots of this disk name (repeat for several)")
    p.add_argument("--workers", type=int, default=4, help="chunks read and converted at once (default 4)")
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would be copied")
    p.set_defaults(func=cmd_copy)


def _from_password(args: argparse.Namespace) -> str | None:
    return resolve_password(args.from_password_file, args.from_password_command, prefix="VMBAK_FROM_",
                            option="--from-password")


def _encrypted(loc: str) -> bool:
    """Whether the repository at ``loc`` says it is encrypted (False when that cannot be read)."""
    from vmbak.repo.repository import open_backend

    try:
        return json.loads(open_backend(loc).read("config")).get("encryption", "none") != "none"
    except (OSError, ValueError, AttributeError, VmbakError):
        return False


def cmd_copy(args: argparse.Namespace) -> int:
    apply_s3_options(args)
    src_loc = args.from_repo or os.environ.get("VMBAK_FROM_REPOSITORY")
    dst_loc = args.to_repo or args.repo or os.environ.get("VMBAK_REPOSITORY")
    if not src_loc:
        raise VmbakError("no source repository: use --from-repo REPO or set VMBAK_FROM_REPOSITORY")
    if not dst_loc:
        raise VmbakError("no destination repository: use --to-repo REPO, -r REPO or set VMBAK_REPOSITORY")
    if args.workers < 1:
        raise VmbakError("--workers must be at least 1")
    bar = progress(args)
    src_pw = _from_password(args)
    try:
        src = Repository.open(src_loc, src_pw)
    except VmbakError as e:
        if src_pw is None and _encrypted(src_loc):
            raise VmbakError("source repository is encrypted: give its password with --from-password-file FILE, "
                             "--from-password-command CMD, $VMBAK_FROM_PASSWORD_FILE or $VMBAK_FROM_PASSWORD") from None
        raise type(e)(f"source repository: {e}") from None
    try:
        dst = Repository.open(dst_loc, password(args) if needs_password(dst_loc) else given_password(args))
    except VmbakError as e:
        raise type(e)(f"destination repository: {e}") from None
    src.note = log(args)
    src.no_lock = bool(getattr(args, "no_lock", False))  # the destination is written: always locked
    with bar:
        rep = copy(src, dst, args.snapshots, None, workers=args.workers, dry_run=args.dry_run,
                   progress=bar, log=log(args), where=filter_from_args(args))
    # Each snapshot copied was named on standard error as it landed (the engine's log):
    # the summary does not list them again.
    lines = [f"would copy snapshot {c['source'][:8]} ({printable(c['name'])} {c['type']} {c['time']})"
             for c in rep.copied] if args.dry_run else []
    lines += [f"already present: {c['source'][:8]} as {c['destination'][:8]} ({printable(c['name'])} {c['time']})"
              for c in rep.present]
    if not args.dry_run:
        lines.append(f"{counted(len(rep.copied), 'snapshot')} copied, {len(rep.present)} already present; "
                     f"{counted(rep.chunks_sent, 'chunk')} ({human(rep.bytes_sent)}) sent, {rep.chunks_present} present; "
                     f"{human(rep.bytes_read)} read in {rep.duration_s:.3f} s"
                     + ("" if rep.same_keys else " (re-encrypted for the destination's key)"))
    emit_summary(args, rep.to_json(), "\n".join(lines))
    return 0
