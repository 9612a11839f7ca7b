"""Prune state: the marks that condemn packs, and the records that make them sweepable.

Prune works in two phases (see docs/repository-format.md, "Prune state"):

* ``prune/mark-<32 hex>``: an envelope (AAD ``b"vmbak-prune-mark"``) of a zstd frame of
  UTF-8 JSON ``{"version": 1, "time", "host", "pid", "doomed": [pack ids], "stats": {}}``.
  From the moment it exists, writers never deduplicate against a chunk whose only
  copies lie in doomed packs, and readers prefer other copies.
* ``prune/ready-<same 32 hex>``: an envelope (AAD ``b"vmbak-prune-ready"``) of a zstd
  frame of JSON ``{"version": 1, "mark", "time", "locks": [lock names]}``: the locks that
  existed once the mark was visible, i.e. every process that may have loaded the index
  without seeing the mark. A mark is swept only when it has a ready record, all those
  locks are gone, and the grace period has passed.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime

import zstandard

from vmbak.errors import IntegrityError, RepositoryError
from vmbak.repo import zstd
from vmbak.repo.backend import Backend, ObjectMissing
from vmbak.repo.crypto import Sealer
from vmbak.repo.index import max_plain_size

PRUNE_DIR = "prune"
MARK_AAD = b"vmbak-prune-mark"
READY_AAD = b"vmbak-prune-ready"
MARK_VERSION = 1
_NAME = re.compile(r"prune/(mark|ready)-([0-9a-f]{32})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LOCK = re.compile(r"locks/[0-9a-f]{32}")  # a lock's name (Repository.lock)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass
class Mark:
    mark_id: str                 # 32 hex
    time: str
    doomed: list[str]            # pack ids (64 hex)
    host: str = ""
    pid: int = 0
    stats: dict = field(default_factory=dict)
    ready: bool = False          # a ready record exists
    locks: list[str] = field(default_factory=list)  # from the ready record
    ready_time: str = ""

    @property
    def name(self) -> str:
        return f"{PRUNE_DIR}/mark-{self.mark_id}"

    @property
    def ready_name(self) -> str:
        return f"{PRUNE_DIR}/ready-{self.mark_id}"


@dataclass(frozen=True)
class MarkProblem:
    """A mark or ready record that cannot be used: damaged, malformed or of a newer version."""

    mark_id: str     # 32 hex
    message: str     # one line, naming the object

    def __str__(self) -> str:
        return self.message


def _seal_json(sealer: Sealer, doc: dict, aad: bytes) -> bytes:
    plain = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, sort_keys=True).encode())
    return sealer.seal(plain, aad)


def _open_json(sealer: Sealer, blob: bytes, aad: bytes, what: str) -> dict:
    payload = sealer.open(blob, aad, what)
    try:
        doc = json.loads(zstd.decompress(payload, max_plain_size(len(payload)), what))
        if not isinstance(doc, dict):
            raise ValueError
    except (zstandard.ZstdError, ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{what}: malformed") from None
    try:
        version = int(doc.get("version", 0))
    except (TypeError, ValueError):
        raise IntegrityError(f"{what}: malformed") from None
    if version > MARK_VERSION:
        raise IntegrityError(f"{what}: version {doc.get('version')} is newer than this vmbak")
    return doc


def write_mark(backend: Backend, sealer: Sealer, doomed: list[str], stats: dict) -> Mark:
    m = Mark(mark_id=os.urandom(16).hex(), time=_now(), doomed=sorted(doomed), host=socket.gethostname(),
             pid=os.getpid(), stats=stats)
    doc = {"version": MARK_VERSION, "time": m.time, "host": m.host, "pid": m.pid, "doomed": m.doomed,
           "stats": stats}
    backend.write(m.name, _seal_json(sealer, doc, MARK_AAD))
    return m


def write_ready(backend: Backend, sealer: Sealer, mark: Mark, locks: list[str]) -> None:
    mark.locks = sorted(locks)
    mark.ready_time = _now()
    doc = {"version": MARK_VERSION, "mark": mark.mark_id, "time": mark.ready_time, "locks": mark.locks}
    backend.write(mark.ready_name, _seal_json(sealer, doc, READY_AAD))
    mark.ready = True


def delete_mark(backend: Backend, mark_id: str) -> None:
    """Remove a mark: the ready record first, so a half-removed mark is never sweepable."""
    backend.delete(f"{PRUNE_DIR}/ready-{mark_id}")
    backend.delete(f"{PRUNE_DIR}/mark-{mark_id}")


def load_marks(backend: Backend, sealer: Sealer) -> tuple[list[Mark], list[MarkProblem]]:
    """All readable marks (with their ready records) and the problems of the rest.

    A mark or ready record that fails authentication is never acted upon: the mark is
    not swept (and writers do not rely on it either; it only ever makes them store more).
    An object deleted between the listing and the read (a prune finishing) is skipped.
    """
    marks: dict[str, Mark] = {}
    readies: dict[str, str] = {}
    problems: list[MarkProblem] = []
    for name, _ in backend.list(PRUNE_DIR):
        mt = _NAME.fullmatch(name)
        if not mt:
            continue
        (marks if mt.group(1) == "mark" else readies)[mt.group(2)] = name  # type: ignore[index]
    out: list[Mark] = []
    for mid, name in sorted(marks.items()):  # type: ignore[union-attr]
        try:
            doc = _open_json(sealer, backend.read(name), MARK_AAD, f"prune mark {mid[:8]}")
            doomed = doc["doomed"]
            if not isinstance(doomed, list) or not all(isinstance(p, str) and _HEX64.fullmatch(p) for p in doomed):
                raise IntegrityError(f"prune mark {mid[:8]}: malformed pack list")
            m = Mark(mark_id=mid, time=str(doc["time"]), doomed=doomed, host=str(doc.get("host", "")),
                     pid=int(doc.get("pid", 0)), stats=dict(doc.get("stats", {})))
            parse_time(m.time)
        except ObjectMissing:
            continue
        except (RepositoryError, KeyError, ValueError, TypeError) as e:
            problems.append(MarkProblem(mid, str(e) if isinstance(e, RepositoryError)
                                        else f"prune mark {mid[:8]}: malformed"))
            continue
        if mid in readies:
            try:
                rdoc = _open_json(sealer, backend.read(readies[mid]), READY_AAD, f"prune ready record {mid[:8]}")
                if rdoc.get("mark") != mid:
                    raise IntegrityError(f"prune ready record {mid[:8]}: belongs to another mark")
                locks = rdoc["locks"]
                if not isinstance(locks, list) or not all(isinstance(x, str) and _LOCK.fullmatch(x) for x in locks):
                    raise IntegrityError(f"prune ready record {mid[:8]}: malformed")
                m.locks = locks
                m.ready_time = str(rdoc.get("time", ""))
                m.ready = True
            except ObjectMissing:
                pass
            except RepositoryError as e:
                problems.append(MarkProblem(mid, str(e)))
            except (KeyError, TypeError):
                problems.append(MarkProblem(mid, f"prune ready record {mid[:8]}: malformed"))
        out.append(m)
    return out, problems


def doomed_packs(backend: Backend, sealer: Sealer) -> set[str]:
    """Packs condemned by any readable mark (ready or not)."""
    marks, _ = load_marks(backend, sealer)
    return {p for m in marks for p in m.doomed}
