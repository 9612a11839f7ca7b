"""What the dashboard and the stats endpoint show of a repository's snapshots, kept in memory.

Manifests are content-addressed and never change, so each is read (and authenticated) once:
a refresh lists the repository's ``snapshots/`` folder, reads only the manifests it has not
seen, and drops the ones that are gone. A listing is at most ``ttl`` seconds old, and the
service asks for a fresh one after every run. Each entry is a small dict (the manifest's
summary plus the derived figures), never the manifest's bitmaps, so 5,000 snapshots cost a
few MB and a page is built from memory.
"""

from __future__ import annotations

import re
import threading
import time

from vmbak.engine.info import referenced_bytes
from vmbak.errors import VmbakError
from vmbak.repo.backend import ObjectMissing

SID = re.compile(r"[0-9a-f]{64}")


def snapshot_entry(m) -> dict:  # noqa: ANN001 - a Manifest
    """One snapshot as the dashboard and ``GET /api/v1/stats`` show it."""
    s = m.stats if isinstance(m.stats, dict) else {}
    raw = int(s.get("new_raw_bytes", 0) or 0)
    stored = int(s.get("new_stored_bytes", 0) or 0)
    data = referenced_bytes(m)
    dedup = int(s.get("dedup_bytes", 0) or 0)
    gc = m.guest_consistency if isinstance(m.guest_consistency, dict) else {}
    return {
        "id": m.id, "short_id": m.short_id, "name": m.name, "type": m.kind, "time": m.time, "parent": m.parent,
        "disk_size": m.disk_size, "used_bytes": int(s.get("used_bytes", m.disk_size) or 0), "data_bytes": data, "read_bytes": int(s.get("read_bytes", 0) or 0),
        "changed_bytes": int(s.get("changed_bytes", 0) or 0), "new_raw_bytes": raw, "stored_bytes": stored,
        "dedup_bytes": dedup, "compression_ratio": round(raw / stored, 3) if stored else None,
        "dedup_ratio": round(data / (data - dedup), 3) if data > 0 and data - dedup > 0 else None,
        "duration_s": s.get("duration_s"), "consistency": m.consistency, "guest": gc.get("level"),
        "tags": list(m.tags), "summary": m.summary(),
    }


class RepoCatalog:
    """The snapshots of one repository, as entries (see :func:`snapshot_entry`)."""

    def __init__(self, open_repo, ttl: float = 5.0) -> None:  # noqa: ANN001 - () -> Repository
        self._open = open_repo
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._sorted: list[dict] = []
        self._at = 0.0  # when the last listing was made (time.monotonic); 0.0: list before answering
        self._gen = 0  # invalidations so far: a listing that began before one does not count as fresh
        self.error: str | None = None

    def invalidate(self) -> None:
        """The next call lists the repository before it answers (after a run changed it)."""
        self._gen += 1
        self._at = 0.0

    def entries(self) -> list[dict]:
        """Every snapshot, oldest first. The first call (and the first after :meth:`invalidate`)
        lists the repository before it answers; later ones answer at once, and when the listing
        is older than ``ttl`` seconds they start a new one in the background."""
        if time.monotonic() - self._at < self.ttl:
            return self._sorted
        if self._at == 0.0:
            with self._lock:
                if self._at == 0.0:
                    self._refresh()
            return self._sorted
        if self._lock.acquire(blocking=False):
            threading.Thread(target=self._refresh_in_background, name="vmbak-catalog", daemon=True).start()
        return self._sorted

    def _refresh_in_background(self) -> None:
        try:
            self._refresh()
        finally:
            self._lock.release()

    def _refresh(self) -> None:
        gen = self._gen
        try:
            repo = self._open()
            names = {n.rsplit("/", 1)[-1] for n, _ in repo.backend.list("snapshots")}
        except (VmbakError, OSError) as e:  # the repository cannot be opened or listed: shown on the overview
            self.error = str(e)
            self._at = time.monotonic() if gen == self._gen else 0.0
            return
        names = {n for n in names if SID.fullmatch(n)}
        changed = False
        for sid in list(self._entries):
            if sid not in names:
                del self._entries[sid]
                changed = True
        for sid in names - self._entries.keys():
            try:
                self._entries[sid] = snapshot_entry(repo.load_manifest(sid))
            except (ObjectMissing, VmbakError):
                continue  # forgotten meanwhile, or damaged: `vmbak check` says which
            changed = True
        if changed:
            self._sorted = sorted(self._entries.values(), key=lambda e: (e["time"], e["id"]))
        self.error = None
        self._at = time.monotonic() if gen == self._gen else 0.0

    def get(self, sid: str) -> dict | None:
        self.entries()
        return self._entries.get(sid)

    def match(self, spec: str) -> list[str]:
        """The ids starting with ``spec`` (a hex id prefix of 4 or more digits), else []."""
        if not re.fullmatch(r"[0-9a-f]{4,64}", spec):
            return []
        return [e["id"] for e in self.entries() if e["id"].startswith(spec)]

    def chain(self, entry: dict) -> list[dict]:
        """The snapshots needed to restore ``entry``, newest first (as far as they exist)."""
        out = [entry]
        seen = {entry["id"]}
        while out[-1]["parent"] and out[-1]["parent"] not in seen:
            p = self._entries.get(out[-1]["parent"])
            if p is None:
                break
            seen.add(p["id"])
            out.append(p)
        return out

    def disks(self) -> dict[str, list[dict]]:
        """Snapshots per disk name, oldest first."""
        out: dict[str, list[dict]] = {}
        for e in self.entries():
            out.setdefault(e["name"], []).append(e)
        return out
