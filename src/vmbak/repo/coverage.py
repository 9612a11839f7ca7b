"""Verification coverage: when each pack was last read and verified, shared by every host.

``verify/<32 hex>`` objects (see docs/repository-format.md, "Verification coverage") are
envelopes (AAD ``b"vmbak-verify"``) of a zstd frame of UTF-8 JSON::

    {"version": 1, "run": "<32 hex>", "started": T, "time": T, "host", "pid",
     "final": bool, "packs": {"<64-hex pack id>": T, ...}}

They are small, append-only and merged on read (the latest time per pack wins), so checks
running at once on several hosts never lose each other's records. A finished run may
write one consolidated record and then delete the records it read and merged (never one
it did not read), dropping packs that no longer exist. Records of deleted packs are
ignored by readers.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from datetime import datetime

from vmbak.errors import IntegrityError, RepositoryError
from vmbak.repo.backend import Backend, ObjectMissing, ReadOnlyRepository
from vmbak.repo.crypto import Sealer
from vmbak.repo.marks import _now, _open_json, _seal_json, parse_time

VERIFY_DIR = "verify"
VERIFY_AAD = b"vmbak-verify"
VERIFY_VERSION = 1
_NAME = re.compile(r"verify/([0-9a-f]{32})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


@dataclass
class RunInfo:
    """What the records tell about one check run."""

    run: str
    started: str
    final: bool = False


@dataclass
class Coverage:
    """The merged records: the last verification time of each pack, and the runs seen."""

    packs: dict[str, str] = field(default_factory=dict)   # pack id -> time last verified
    runs: dict[str, RunInfo] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)      # names of the records merged
    record_runs: dict[str, str] = field(default_factory=dict)  # record name -> its run
    problems: list[str] = field(default_factory=list)     # one line per unreadable record

    def last_verified(self, pack_id: str) -> datetime | None:
        t = self.packs.get(pack_id)
        return parse_time(t) if t else None

    def unfinished_run(self) -> RunInfo | None:
        """The newest run, if it did not finish (the run ``--resume`` continues)."""
        if not self.runs:
            return None
        newest = max(self.runs.values(), key=lambda r: (r.started, r.run))
        return None if newest.final else newest


def load_coverage(backend: Backend, sealer: Sealer) -> Coverage:
    """Merge every readable record; an unreadable one is named in ``problems`` and ignored."""
    cov = Coverage()
    for name, _ in sorted(backend.list(VERIFY_DIR)):
        mt = _NAME.fullmatch(name)
        if not mt:
            continue
        what = f"verification record {mt.group(1)[:8]}"
        try:
            doc = _open_json(sealer, backend.read(name), VERIFY_AAD, what)
            if int(doc.get("version", 0)) > VERIFY_VERSION:
                raise IntegrityError(f"{what}: version {doc.get('version')} is newer than this vmbak")
            packs = doc["packs"]
            if not isinstance(packs, dict) or not all(isinstance(k, str) and _HEX64.fullmatch(k)
                                                      and isinstance(v, str) for k, v in packs.items()):
                raise IntegrityError(f"{what}: malformed pack list")
            for t in packs.values():
                parse_time(t)
            run, started = str(doc["run"]), str(doc["started"])
            if not _HEX32.fullmatch(run):
                raise IntegrityError(f"{what}: malformed run id")
            parse_time(started)
        except ObjectMissing:
            continue  # consolidated and deleted meanwhile
        except (RepositoryError, KeyError, ValueError, TypeError) as e:
            cov.problems.append(str(e) if isinstance(e, RepositoryError) else f"{what}: malformed")
            continue
        cov.records.append(name)
        cov.record_runs[name] = run
        for pid, t in packs.items():
            if t > cov.packs.get(pid, ""):
                cov.packs[pid] = t
        info = cov.runs.setdefault(run, RunInfo(run, started))
        info.final = info.final or bool(doc.get("final", False))
    return cov


def load_coverage_of(backend: Backend, sealer: Sealer, names: list[str]) -> dict[str, str]:
    """The merged pack times of some records (those that cannot be read are left out)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            doc = _open_json(sealer, backend.read(name), VERIFY_AAD, f"verification record {name[-32:-24]}")
            packs = doc["packs"]
            if not isinstance(packs, dict):
                continue
        except (RepositoryError, KeyError, TypeError):
            continue
        for p, t in packs.items():
            if isinstance(p, str) and isinstance(t, str) and t > out.get(p, ""):
                out[p] = t
    return out


class CoverageWriter:
    """Records the packs one check run verified, in small records written as it goes
    (so that a run killed with SIGKILL loses at most the packs since the last record)."""

    def __init__(self, backend: Backend, sealer: Sealer, every_packs: int = 64) -> None:
        self.backend = backend
        self.sealer = sealer
        self.run = os.urandom(16).hex()
        self.started = _now()
        self.every_packs = max(1, every_packs)
        self.pending: dict[str, str] = {}
        self.verified: dict[str, str] = {}  # every pack this run verified
        self.written: list[str] = []
        self.errors: list[str] = []
        self.read_only = False  # the repository's file system is read-only: nothing more is tried

    def add(self, pack_id: str) -> None:
        self.pending[pack_id] = self.verified[pack_id] = _now()
        if len(self.pending) >= self.every_packs:
            self.flush()

    def flush(self, final: bool = False, packs: dict[str, str] | None = None) -> str | None:
        """Write one record of the pending packs (or of ``packs``); return its name."""
        if packs is None:
            packs, self.pending = self.pending, {}
        if self.read_only or (not packs and not final):
            return None
        doc = {"version": VERIFY_VERSION, "run": self.run, "started": self.started, "time": _now(),
               "host": socket.gethostname(), "pid": os.getpid(), "final": final, "packs": packs}
        name = f"{VERIFY_DIR}/{os.urandom(16).hex()}"
        try:
            self.backend.write(name, _seal_json(self.sealer, doc, VERIFY_AAD))
        except ReadOnlyRepository:
            self.read_only = True
            self.errors.append("the packs this check verified are not recorded: the repository is on a read-only "
                               "file system (a later check --older-than or --resume does not count them)")
            return None
        except RepositoryError as e:
            self.errors.append(f"cannot record verified packs: {e}")
            return None
        self.written.append(name)
        return name

    def finish(self, merged: Coverage, present: set[str], consolidate_over: int = 16) -> None:
        """Write the final record; when many records exist, fold the records read at the start
        (and this run's) into one that names only packs still present, then delete the
        records folded in. Records of unfinished runs that started after this one stay (they
        may still be running elsewhere); pack times are kept as they were, so a run whose
        records were folded can still be resumed while any record of it remains."""
        if self.read_only:
            return
        if len(merged.records) + len(self.written) + 1 <= consolidate_over:
            self.flush(final=True)
            return
        fold = [n for n in merged.records
                if merged.runs[merged.record_runs[n]].final or merged.runs[merged.record_runs[n]].started <= self.started]
        folded = load_coverage_of(self.backend, self.sealer, fold)
        packs = {p: t for p, t in folded.items() if p in present}
        for p, t in self.verified.items():
            if t > packs.get(p, ""):
                packs[p] = t
        self.pending = {}
        mine = list(self.written)
        if self.flush(final=True, packs=packs) is None:
            return
        for name in [*fold, *mine]:
            try:
                self.backend.delete(name)
            except RepositoryError:
                pass
