"""Commands on the repository as a whole: init, check, stats."""

from __future__ import annotations

import argparse
import sys

from vmbak.cli.common import counted, emit, emit_summary, open_repo, password, progress, repo_location
from vmbak.engine.check import check
from vmbak.engine.common import human
from vmbak.engine.info import repo_stats, snapshot_stats
from vmbak.errors import VmbakError, printable
from vmbak.repo.crypto import CHUNK_ID_BLOCKS, CHUNK_ID_SCHEMES, ENC_AES, ENC_NONE, ENCRYPTIONS
from vmbak.repo.repository import Repository

CHECK_EPILOG = """examples:
  vmbak check                                   # structure: packs, index, snapshots
  vmbak check --read-data                       # read and verify every stored byte
  vmbak check --read-data-subset 3/7            # day 3 of a weekly cycle: each pack read once a week
  vmbak check --read-data-subset 10%            # a tenth of the packs: ten runs read them all
  vmbak check --read-data-subset 50G            # random packs, up to 50 GiB
  vmbak check --read-data --older-than 30d      # only packs not verified in the last 30 days
  vmbak check --read-data --resume              # go on where a killed run stopped
"""


def _subset(text: str):  # noqa: ANN202 - an argparse type
    from vmbak.engine.check import parse_subset
    from vmbak.errors import VmbakError

    try:
        return parse_subset(text)
    except VmbakError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> float:
    from vmbak.cli.maintenance import parse_duration
    from vmbak.errors import VmbakError

    try:
        return parse_duration(text)
    except VmbakError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[parent], help="create a new repository",
                       description="Create a new, empty repository. It is encrypted (AES-256-GCM, key "
                       "wrapped with scrypt) unless --encryption none is given. For an S3 location, a bucket "
                       "that does not exist is created (in the client's region).",
                       epilog="example:\n  VMBAK_PASSWORD=secret vmbak -r /backups/repo init",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encryption", choices=ENCRYPTIONS, default=ENC_AES)
    p.add_argument("--chunk-size", type=int, default=1 << 20, help=argparse.SUPPRESS)
    p.add_argument("--pack-size", type=int, default=32 << 20, help=argparse.SUPPRESS)
    # "blake3" makes a version-2 repository with the chunk ids of earlier versions
    # (docs/repository-format.md); for compatibility tests.
    p.add_argument("--chunk-id", choices=CHUNK_ID_SCHEMES, default=CHUNK_ID_BLOCKS, help=argparse.SUPPRESS)
    p.add_argument("--compression-level", type=int, default=1,
                   help="zstd level for chunks (default 1: measured fastest for the ratio)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("check", parents=[parent], help="verify the repository",
                       description="Check that every pack the index names exists and agrees with the "
                       "index, and that every chunk any snapshot names is present. With --read-data, read "
                       "and authenticate every stored byte. Reports name the damaged snapshots and block "
                       "ranges. Exits 1 if anything is wrong. Packs are read by a pool of threads; every pack "
                       "read and found sound is recorded in the repository (verify/), shared by every host, so "
                       "later runs can read only what was not verified recently or was not reached.",
                       epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--read-data", action="store_true", help="read and verify every chunk")
    p.add_argument("--read-data-subset", metavar="SUBSET", type=_subset,
                   help="read only some packs: n/t (the n-th of t fixed parts: t runs read every pack once), "
                   "x%% (that share of the packs) or a size such as 50G (packs up to that many bytes); x%% and a size "
                   "choose at random among the packs verified longest ago, so repeated runs cover everything")
    p.add_argument("--older-than", metavar="DURATION", type=_duration,
                   help="read only packs not verified within DURATION (e.g. 12h, 30d); implies --read-data")
    p.add_argument("--resume", action="store_true",
                   help="skip the packs the last check run verified if it did not finish (it was killed); "
                   "implies --read-data")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads reading packs (default: one per core, at least 2)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("stats", parents=[parent], help="show space and deduplication statistics",
                       description="Without SNAP: repository totals (snapshots, chunks, stored bytes, "
                       "dedup and compression ratios). With SNAP: what that backup read, found new and "
                       "stored.",
                       epilog="examples:\n  vmbak stats\n  vmbak stats web:latest --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", nargs="?", metavar="SNAP")
    p.set_defaults(func=cmd_stats)


def cmd_init(args: argparse.Namespace) -> int:
    loc = repo_location(args)
    pw = password(args, confirm=True) if args.encryption != ENC_NONE else None
    repo = Repository.init(loc, pw, encryption=args.encryption, chunk_size=args.chunk_size,
                           pack_size=args.pack_size, zstd_level=args.compression_level,
                           chunk_ids=args.chunk_id)
    if args.encryption == ENC_NONE and not args.json:
        print("WARNING: this repository is NOT encrypted: anyone who can read it can read your disks",
              file=sys.stderr)
    created_bucket = bool(getattr(repo.backend, "created_bucket", False))
    emit(args, {"repository": repo.location, "id": repo.id, "encryption": repo.encryption,
                "created_bucket": created_bucket},
         ("created bucket " + repo.backend.bucket + "\n" if created_bucket else "")
         + f"created repository {repo.id[:8]} at {repo.location} (encryption: {repo.encryption})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise VmbakError("--workers must be at least 1")
    with progress(args) as bar:
        repo = open_repo(args)
        args.damage_reported = True  # the report names damaged manifests and index files as errors
        rep = check(repo, read_data=args.read_data, progress=bar, subset=args.read_data_subset,
                    resume=args.resume, older_than=args.older_than, workers=args.workers)
    reading = args.read_data or args.read_data_subset or args.resume or args.older_than is not None
    lines = [f"{counted(rep.snapshots, 'snapshot')}, {counted(rep.packs, 'pack')}, {counted(rep.chunks, 'chunk')}"]
    if reading:
        rate = f" ({human(rep.bytes_read / rep.read_seconds)}/s)" if rep.read_seconds > 0 else ""
        lines.append(f"read and verified {counted(len(rep.read_packs), 'pack')}, {human(rep.bytes_read)}{rate}; "
                     f"{counted(rep.skipped_packs, 'pack')} not read (outside the selection)")
    lines += [f"warning: {w}" for w in rep.warnings]
    lines += [f"error: {e}" for e in rep.errors]
    lines.append("no errors found" if rep.ok else f"{counted(len(rep.errors), 'error')} found")
    emit_summary(args, rep.to_json(), "\n".join(lines))
    return 0 if rep.ok else 1


def cmd_stats(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    if args.snapshot:
        m = repo.find(args.snapshot)
        d = snapshot_stats(repo, m)
        s = d["stats"]
        text = "\n".join([
            f"snapshot {m.short_id} ({printable(m.name)}, {m.kind}, {m.time})",
            f"  logical size:   {human(s.get('logical_bytes', 0))}",
            f"  used:           {human(s.get('used_bytes', s.get('logical_bytes', 0)))} "
            f"(unused blocks are neither read nor stored)",
            f"  read:           {human(s.get('read_bytes', 0))}",
            f"  changed:        {human(s.get('changed_bytes', 0))}",
            f"  zero:           {human(s.get('zero_bytes', 0))}",
            f"  new (raw):      {human(s.get('new_raw_bytes', 0))} in {counted(s.get('new_chunks', 0), 'chunk')}",
            f"  new (stored):   {human(s.get('new_stored_bytes', 0))}",
            f"  deduplicated:   {human(s.get('dedup_bytes', 0))}",
            f"  compression:    {_ratio(s['compression_ratio'])}",
            f"  duration:       {s.get('duration_s', 0)} s",
        ] + [f"  note: {printable(str(n))}" for n in m.notes])
        emit(args, d, text)
        return 0
    d = repo_stats(repo)
    text = "\n".join([
        f"snapshots:        {d['snapshots']}" + (f" ({', '.join(printable(n) for n in d['names'])})"
                                                   if d["names"] else ""),
        f"logical size:     {human(d['logical_bytes'])} (sum of all snapshots' disks)",
        f"unique data:      {human(d['unique_raw_bytes'])} in {counted(d['chunks'], 'chunk')}",
        f"stored:           {human(d['pack_bytes'])} in {counted(d['packs'], 'pack')}",
        f"compression:      {_ratio(d['compression_ratio'])}",
        f"deduplication:    {_ratio(d['dedup_ratio'])}",
        f"logical / stored: {_ratio(d['space_saving_ratio'])}",
    ])
    emit(args, d, text)
    return 0


def _ratio(r: float | None) -> str:
    """A ratio as "2.5x"; "-" where there is nothing to divide (no data stored)."""
    return f"{r}x" if r else "-"
