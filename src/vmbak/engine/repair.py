"""repair index: rebuild the index from the pack headers.

Packs describe themselves (docs/repository-format.md, "Packs"), so the index can always
be rebuilt from them. ``repair_index`` writes one index file naming every pack whose
header reads, with ``supersedes`` = every index file it listed (damaged or not), and
then deletes those files: the same order as a prune sweep (new index first, old ones
after), so a kill at any moment leaves a valid repository. It holds a lock that
excludes prune (whose sweep also rewrites the index) but not backups or restores: an
index file written by a backup after the listing is not touched, and a pack a backup
has just landed is complete, so naming it is correct.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vmbak.errors import IntegrityError, RepositoryError
from vmbak.repo.backend import ObjectMissing
from vmbak.repo.index import INDEX_AAD, encode_index, index_id
from vmbak.repo.pack import pack_name, read_header
from vmbak.repo.repository import Repository

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class RepairReport:
    index_files_read: int = 0
    damaged_index_files: dict[str, str] = field(default_factory=dict)
    removed_index_files: list[str] = field(default_factory=list)
    new_index: str | None = None
    packs: int = 0
    chunks: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"index_files_read": self.index_files_read, "damaged_index_files": self.damaged_index_files,
                "removed_index_files": self.removed_index_files, "new_index": self.new_index,
                "packs": self.packs, "chunks": self.chunks, "warnings": self.warnings}


def repair_index(repo: Repository, log: Callable[[str], None] | None = None) -> RepairReport:
    """Replace every index file by one built from the pack headers (see the module docstring)."""
    log = log or (lambda s: None)
    rep = RepairReport()
    with repo.lock(purpose="repair"):
        files = sorted(n for n, _ in repo.backend.list("index"))
        from_index: dict[str, np.ndarray] = {}
        for name in files:
            try:
                packs = repo.read_index_file(name)
            except ObjectMissing:
                continue
            except IntegrityError as e:
                rep.damaged_index_files[name] = str(e)
                log(f"{e}; replaced")
                continue
            rep.index_files_read += 1
            for pid, ent in packs:
                from_index.setdefault(pid, ent)
        present = {}
        for name, size in repo.backend.list("data"):
            pid = name.rsplit("/", 1)[-1]
            if _HEX64.fullmatch(pid) and name == pack_name(pid):
                present[pid] = size
        keep: list[tuple[str, np.ndarray]] = []
        for pid in sorted(present):
            try:
                ent = read_header(repo.backend, repo.sealer, pid, present[pid])
            except ObjectMissing:
                continue  # deleted meanwhile (only a prune deletes packs, and it is locked out)
            except RepositoryError as e:
                if pid in from_index:
                    ent = from_index[pid]
                    rep.warnings.append(f"{e}; its entries are taken from the index file that names it")
                else:
                    rep.warnings.append(f"{e}; it stays out of the index (its chunks are not used)")
                    continue
            keep.append((pid, ent))
        for pid in sorted(set(from_index) - set(present)):
            rep.warnings.append(f"pack {pid[:16]} is named by the index but missing; it is left out")
        rep.packs = len(keep)
        rep.chunks = int(sum(len(e) for _, e in keep))
        new_name = None
        if keep:
            plain = encode_index(keep, [f.rsplit("/", 1)[-1] for f in files])
            blob = repo.sealer.seal(plain, INDEX_AAD)
            new_name = f"index/{index_id(blob)}"
            repo.backend.write(new_name, blob)  # first the new index ...
            rep.new_index = new_name
        for f in files:  # ... then the ones it supersedes
            if f != new_name:
                repo.backend.delete(f)
                rep.removed_index_files.append(f)
        repo._index = None  # noqa: SLF001 - the index changed under us
        log(f"index rebuilt from {len(keep)} pack headers: {rep.chunks} chunks; "
            f"{len(rep.removed_index_files)} index files replaced")
    return rep
