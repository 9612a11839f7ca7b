"""Commands on the repository as a whole: init, check, stats."""

from __future__ import annotations

import argparse
import sys

from vmbak.cli.common import emit, emit_summary, open_repo, password, progress, repo_location
from vmbak.engine.check import check
from vmbak.engine.common import human
from vmbak.engine.info import repo_stats, snapshot_stats
from vmbak.errors import printable
from vmbak.repo.crypto import ENC_AES, ENC_NONE, ENCRYPTIONS
from vmbak.repo.repository import Repository


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[parent], help="create a new repository",
                       description="Create a new, empty repository. It is encrypted (AES-256-GCM, key "
                       "wrapped with scrypt) unless --encryption none is given.",
                       epilog="example:\n  VMBAK_PASSWORD=secret vmbak -r /backups/repo init",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encryption", choices=ENCRYPTIONS, default=ENC_AES)
    p.add_argument("--chunk-size", type=int, default=1 << 20, help=argparse.SUPPRESS)
    p.add_argument("--pack-size", type=int, default=32 << 20, help=argparse.SUPPRESS)
    p.add_argument("--compression-level", type=int, default=1,
                   help="zstd level for chunks (default 1: measured fastest for the ratio)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("check", parents=[parent], help="verify the repository",
                       description="Check that every pack the index names exists and agrees with the "
                       "index, and that every chunk any snapshot names is present. With --read-data, read "
                       "and authenticate every stored byte. Reports name the damaged snapshots and block "
                       "ranges. Exits 1 if anything is wrong.",
                       epilog="example:\n  vmbak check --read-data",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--read-data", action="store_true", help="read and verify every chunk")
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
                           pack_size=args.pack_size, zstd_level=args.compression_level)
    if args.encryption == ENC_NONE and not args.json:
        print("WARNING: this repository is NOT encrypted: anyone who can read it can read your disks",
              file=sys.stderr)
    emit(args, {"repository": repo.location, "id": repo.id, "encryption": repo.encryption},
         f"created repository {repo.id[:8]} at {repo.location} (encryption: {repo.encryption})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with progress(args) as bar:
        repo = open_repo(args)
        args.damage_reported = True  # the report names damaged manifests and index files as errors
        rep = check(repo, read_data=args.read_data, progress=bar)
    lines = [f"{rep.snapshots} snapshots, {rep.packs} packs, {rep.chunks} chunks"
             + (f", {human(rep.bytes_read)} read" if args.read_data else "")]
    lines += [f"warning: {w}" for w in rep.warnings]
    lines += [f"error: {e}" for e in rep.errors]
    lines.append("no errors found" if rep.ok else f"{len(rep.errors)} errors found")
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
            f"  new (raw):      {human(s.get('new_raw_bytes', 0))} in {s.get('new_chunks', 0)} chunks",
            f"  new (stored):   {human(s.get('new_stored_bytes', 0))}",
            f"  deduplicated:   {human(s.get('dedup_bytes', 0))}",
            f"  compression:    {s['compression_ratio'] or '-'}x",
            f"  duration:       {s.get('duration_s', 0)} s",
        ] + [f"  note: {printable(str(n))}" for n in m.notes])
        emit(args, d, text)
        return 0
    d = repo_stats(repo)
    text = "\n".join([
        f"snapshots:        {d['snapshots']} ({', '.join(printable(n) for n in d['names'])})",
        f"logical size:     {human(d['logical_bytes'])} (sum of all snapshots' disks)",
        f"unique data:      {human(d['unique_raw_bytes'])} in {d['chunks']} chunks",
        f"stored:           {human(d['pack_bytes'])} in {d['packs']} packs",
        f"compression:      {d['compression_ratio'] or '-'}x",
        f"deduplication:    {d['dedup_ratio'] or '-'}x",
        f"logical / stored: {d['space_saving_ratio'] or '-'}x",
    ])
    emit(args, d, text)
    return 0
