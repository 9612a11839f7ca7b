"""The repository: config, keys, packs, index, manifests and locks on a Backend."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import blake3
import numpy as np
import zstandard

from vmbak.buffers import ThreadBuffers
from vmbak.errors import (
    IntegrityError,
    RepositoryError,
    RepositoryLocked,
    RepositoryMissing,
    SnapshotNotFound,
)
from vmbak.interrupts import deferred, register_cleanup, unregister_cleanup
from vmbak.repo import zstd
from vmbak.repo.backend import (
    AccessDenied,
    Backend,
    LocalBackend,
    ObjectMissing,
    OpenFiles,
    ReadOnlyRepository,
    host_id,
    makedirs_private,
    pid_alive,
)
from vmbak.repo.crypto import (
    CHUNK_ID_BLAKE3,
    CHUNK_ID_BLOCKS,
    CHUNK_ID_SCHEMES,
    ENC_AES,
    ENC_NONE,
    ENCRYPTIONS,
    MasterKey,
    Sealer,
    bound_config,
    copy_unlocked,
    open_master_key,
    save_key_file,
    wrap_key,
)
from vmbak.repo.filters import SnapshotFilter
from vmbak.repo.index import (
    INDEX_AAD,
    Index,
    Location,
    decode_index,
    decode_index_flat,
    encode_index,
    index_id,
)
from vmbak.repo.manifest import MANIFEST_AAD, Manifest, decode_manifest, encode_manifest, is_full
from vmbak.repo.marks import doomed_packs
from vmbak.repo.pack import (
    CODEC_RAW,
    CODEC_ZSTD,
    CODEC_ZSTD_FRAMES,
    FinishedPack,
    PackWriter,
    chunk_aad,
    pack_name,
    read_header,
)

FORMAT_NAME = "vmbak-repository"
# Version 2 (written since prune exists) has the same objects as version 1 plus
# prune/: every writer must honour prune marks, which a version-1 vmbak does not know,
# so version-1 programs must refuse it. Version-1 repositories are read and written as
# they are; the first prune upgrades them (see docs/repository-format.md).
FORMAT_VERSION = 4
# Version 3 (written by init since chunk ids come from block hashes) differs from version 2
# only by the config's "chunk_id" field: a version-2 program would compute other chunk ids,
# so it must refuse it. Versions 1 and 2 keep their chunk ids ("blake3") for good; prune
# raises version 1 to PRUNE_VERSION, never to 3.
PRUNE_VERSION = 2
# Version 4 (written by init since chunks are compressed in frames) differs from version 3
# only in that its chunks may use codec 2 (zstd.compress_frames), which a version-3 program
# cannot read. Writers use codec 2 only in version-4 repositories; every version is read
# with all codecs. Older repositories are not raised to version 4.
FRAMES_VERSION = 4
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_PACK_SIZE = 32 << 20
DEFAULT_ZSTD_LEVEL = 1

# Prune and repair write the whole index anew in files of at most this many entries
# (10.4 MB of plaintext each), never in one file a reader would have to hold whole.
CONSOLIDATED_ENTRIES = 200_000
# At most one of these runs at a time: prune (its sweep rewrites the index) and repair
# (which rewrites it too); they run beside backups and restores.
SOLO_PURPOSES = ("prune", "repair")
# Shared locks of work that only reads the repository: these go without a lock on
# request (Repository.no_lock) and where the repository's file system is read-only.
READ_PURPOSES = ("restore", "check", "copy-source")
# Another host's lock is stale once neither its ``time`` nor its ``refreshed`` is newer
# than this (its process cannot be asked whether it is alive) ...
LOCK_STALE_S = 7 * 86400
# ... so a holder rewrites its lock with a new ``refreshed`` this often: an instant
# recovery (serve) or a mount left running for weeks keeps its packs from another host's
# prune (a sweep waits for the locks its ready record lists, until they are stale).
LOCK_REFRESH_S = 3600.0
METADATA_PIECE = 1 << 20  # metadata stored as chunks comes in pieces of at most this

# Bounds on the config fields that size memory: a pack is built in memory up to
# pack_size, and a chunk is decompressed into chunk_size bytes. Outside these, the
# config is refused before anything is allocated from it.
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 64 << 10, 16 << 20
MIN_PACK_SIZE, MAX_PACK_SIZE = 64 << 10, 1 << 30
MIN_ZSTD_LEVEL, MAX_ZSTD_LEVEL = -7, 22


def check_config_values(chunk_size: int, pack_size: int, level: int) -> None:
    """Raise RepositoryError unless the sizes and the level are integers within the bounds
    above (the values may come straight from a config's JSON, so their types are checked)."""
    if type(chunk_size) is not int or chunk_size & (chunk_size - 1) or not (
            MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE):
        raise RepositoryError("chunk size must be a power of two between 64 KiB and 16 MiB")
    if type(pack_size) is not int or not (MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE):
        raise RepositoryError("pack size must be between 64 KiB and 1 GiB")
    if type(level) is not int or not (MIN_ZSTD_LEVEL <= level <= MAX_ZSTD_LEVEL):
        raise RepositoryError(f"compression level must be between {MIN_ZSTD_LEVEL} and {MAX_ZSTD_LEVEL}")

_tls = threading.local()


# This thread's buffers for a blob as stored and its decrypted payload (read_into).
_blob_bufs = ThreadBuffers((1 << 20) + (1 << 16))
_payload_bufs = ThreadBuffers((1 << 20) + (1 << 16))


def _compressor(level: int) -> zstandard.ZstdCompressor:
    c = getattr(_tls, "zc", None)
    if c is None or _tls.zlevel != level:
        c = _tls.zc = zstandard.ZstdCompressor(level=level)
        _tls.zlevel = level
    return c


# The compressibility probe of encode_chunk: PROBE_SAMPLES pieces of PROBE_PIECE bytes,
# spread evenly over the chunk, are compressed together; unless they shrink by at least
# 1/PROBE_GAIN the chunk is stored raw. Compressing a 1 MiB random chunk at level 1 costs
# about 0.33 ms and gains nothing; the probe costs about 0.02 ms. A chunk that is only
# partly compressible still compresses when one sample in eight falls in the compressible
# part (a text sample shrinks to about a third, the eight together by about 8%).
PROBE_MIN = 256 << 10
PROBE_SAMPLES = 8
PROBE_PIECE = 4096
PROBE_GAIN = 50


def incompressible(data: bytes | memoryview, level: int) -> bool:
    """Whether ``data``'s samples show that zstd would not shrink it (see PROBE_SAMPLES)."""
    n = len(data)
    step = n // PROBE_SAMPLES
    with memoryview(data) as mv:
        sample = b"".join([mv[i * step:i * step + PROBE_PIECE] for i in range(PROBE_SAMPLES)])
    return len(_compressor(level).compress(sample)) > len(sample) - len(sample) // PROBE_GAIN


def open_backend(location: str) -> Backend:
    """A local directory (``PATH`` or ``local:PATH``) or S3 (``s3:...``, see repo/s3.py)."""
    if location.startswith("s3:"):
        from vmbak.repo.s3 import S3Backend

        return S3Backend(location)
    if location.startswith("local:"):
        location = location[len("local:"):]
    return LocalBackend(location)


class Repository:
    """An open repository. Use :meth:`init` or :meth:`open`."""

    def __init__(self, backend: Backend, config: dict, master: MasterKey) -> None:
        self.backend = backend
        self.config = config
        self.id: str = config["id"]
        self.encryption: str = config["encryption"]
        self.chunk_size: int = int(config["chunk_size"])
        self.pack_size: int = int(config["pack_size"])
        # The largest plaintext a chunk may have: chunk_size, or a piece of metadata
        # stored as a chunk (block hash tables, engine/common.py), whichever is larger.
        self.max_chunk: int = max(self.chunk_size, METADATA_PIECE)
        self.zstd_level: int = int(config["compression"]["level"])
        # whether writers may compress chunks in frames (codec 2; see FRAMES_VERSION)
        self.frames: bool = int(config["version"]) >= FRAMES_VERSION
        self.sealer = Sealer(master, self.encryption, config.get("chunk_id", CHUNK_ID_BLAKE3))
        self.master = master  # for key management (vmbak key add / passwd)
        self._index: Index | None = None
        # The index is loaded on first use, which may be from several pipeline threads at
        # once: one loads it, the others wait (two loads would double the peak memory).
        self._index_lock = threading.Lock()
        self._indexed_packs: set[str] = set()
        self._index_files: list[str] = []
        self._manifests: dict[str, Manifest] | None = None
        # Manifests that failed authentication or decoding at the last listing: id -> one-line reason.
        self._damaged: dict[str, str] = {}
        # Index files skipped at the last index load because they failed authentication or
        # decoding: name -> one-line reason (their packs were read from the pack headers).
        self.damaged_index_files: dict[str, str] = {}
        self.recovered_packs = 0
        self.key_name: str = ""  # the key file that opened the repository
        self.held_locks: list[str] = []  # names of the locks this object holds
        self.lock_refresh_s = LOCK_REFRESH_S  # how often a held lock is rewritten (lock())
        self._shared_held: dict[int, int] = {}  # thread -> depth of the shared lock it holds (lock())
        # Told one line when a snapshot is found by an id it had before a rewrite (resolve).
        self.note: Callable[[str], None] | None = None
        # Read without locks: the shared locks of READ_PURPOSES are not written (a
        # repository on read-only media, an S3 key that may only read). Work that writes
        # to the repository locks it regardless.
        self.no_lock = False
        attach = getattr(backend, "attach_cache", None)
        if attach is not None:  # remote backends cache index files and manifests locally
            attach(self.id)

    # ------------------------------------------------------------------ setup
    @classmethod
    def init(cls, location: str, password: str | None, encryption: str = ENC_AES,
             chunk_size: int = DEFAULT_CHUNK_SIZE, pack_size: int = DEFAULT_PACK_SIZE,
             zstd_level: int = DEFAULT_ZSTD_LEVEL, chunk_ids: str = CHUNK_ID_BLOCKS) -> Repository:
        """Create a new repository at ``location`` (an empty or missing directory).

        ``chunk_ids`` "blake3" writes a version-2 repository with the chunk ids of earlier
        vmbak versions (for compatibility and tests); the default writes version 4."""
        if encryption not in ENCRYPTIONS:
            raise RepositoryError(f"unknown encryption {encryption!r} (choose {', '.join(ENCRYPTIONS)})")
        if encryption == ENC_AES and not password:
            raise RepositoryError("a password is required to create an encrypted repository "
                                  "(set VMBAK_PASSWORD, use --password-file, or --encryption none)")
        check_config_values(chunk_size, pack_size, zstd_level)
        if chunk_ids not in CHUNK_ID_SCHEMES:
            raise RepositoryError(f"unknown chunk id scheme {chunk_ids!r} (choose {', '.join(CHUNK_ID_SCHEMES)})")
        backend = open_backend(location)
        if isinstance(backend, LocalBackend):
            root = backend.root
            if os.path.exists(root):
                if not os.path.isdir(root):
                    raise RepositoryError(f"cannot create a repository: {root} is not a directory")
                if os.listdir(root):
                    if os.path.exists(os.path.join(root, "config")):
                        raise RepositoryError(f"a repository already exists at {root}")
                    raise RepositoryError(f"cannot create a repository in a non-empty directory: {root}")
            try:
                makedirs_private(root)
                os.chmod(root, 0o700)  # also when it existed (empty): like restic and borg
                for d in ("data", "index", "snapshots", "keys", "locks", "tmp"):
                    makedirs_private(os.path.join(root, d))
            except OSError as e:
                raise RepositoryError(f"cannot create repository at {root}: {e.strerror}") from None
        else:
            prepare = getattr(backend, "prepare_init", None)
            if prepare is not None:
                prepare()  # the bucket exists and holds nothing under the prefix
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION if chunk_ids != CHUNK_ID_BLAKE3 else PRUNE_VERSION,
            "id": os.urandom(32).hex(),
            "created": _now_iso(),
            "encryption": encryption,
            "chunk_size": chunk_size,
            "pack_size": pack_size,
            "compression": {"codec": "zstd", "level": zstd_level},
        }
        if chunk_ids != CHUNK_ID_BLAKE3:
            config["chunk_id"] = chunk_ids
        master = MasterKey.generate()
        keydoc = wrap_key(master, password, config)
        keyname = save_key_file(backend, keydoc)
        backend.write("config", json.dumps(config, indent=1).encode())
        repo = cls(backend, config, master)
        repo.key_name = keyname
        return repo

    @classmethod
    def open(cls, location: str, password: str | None = None) -> Repository:
        """Open an existing repository; raise RepositoryError: RepositoryMissing when there
        is no vmbak repository at ``location``, WrongPassword / PasswordMissing."""
        backend = open_backend(location)
        if isinstance(backend, LocalBackend) and not os.path.isdir(backend.root):
            raise RepositoryMissing(f"repository does not exist: {backend.root}")
        try:
            raw = backend.read("config")
        except RepositoryError as e:
            if not isinstance(backend, LocalBackend) and not isinstance(e, ObjectMissing):
                raise  # unreachable, bad credentials, no such bucket: say so
            first = getattr(backend, "first_object", None)
            other = first() if first is not None else None
            if other is not None:
                raise RepositoryMissing(f"not a vmbak repository (no config): {backend.location} holds other "
                                        f"objects (e.g. {other!r})") from None
            raise RepositoryMissing(f"not a vmbak repository (no config): {backend.location}") from None
        try:
            config = json.loads(raw)
            if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
                raise ValueError
        except ValueError:
            raise RepositoryMissing(f"not a vmbak repository (foreign config): {backend.location}") from None
        version = config.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RepositoryError(f"repository format version {version} is newer than this vmbak supports "
                                  f"({FORMAT_VERSION}); upgrade vmbak")
        for k in ("id", "encryption", "chunk_size", "pack_size", "compression"):
            if k not in config:
                raise RepositoryError(f"repository config is damaged (missing {k})")
        if config["encryption"] not in ENCRYPTIONS:
            raise RepositoryError(f"repository uses unknown encryption {config['encryption']!r}")
        if config.get("chunk_id", CHUNK_ID_BLAKE3) not in CHUNK_ID_SCHEMES or (
                "chunk_id" in config and version < 3):
            raise RepositoryError(f"repository config is damaged (chunk_id {config.get('chunk_id')!r} in a "
                                  f"version {version} repository)")
        if config["encryption"] == ENC_NONE and password:
            # Someone who can write to the storage can replace an encrypted repository's
            # config and key files with unencrypted ones; a client holding a password
            # never writes plaintext into such a repository (docs/threat-model.md).
            raise RepositoryError(
                f"{backend.location} claims to be an unencrypted repository, but a password was given: "
                "refusing it (an encrypted repository's config may have been replaced; if it really is "
                "unencrypted, use it without a password (VMBAK_PASSWORD, --password-file, --password-command))")
        comp = config["compression"]
        if not isinstance(comp, dict) or comp.get("codec") != "zstd" or not isinstance(config["id"], str):
            raise RepositoryError("repository config is damaged (compression or id)")
        try:
            check_config_values(config["chunk_size"], config["pack_size"], comp.get("level"))
        except RepositoryError as e:
            raise RepositoryError(f"repository config is invalid ({e}); refusing it") from None
        key_name, master = open_master_key(backend, config, password)
        if master.config is not None and master.config != bound_config(config):
            theirs = json.loads(master.config)
            changed = sorted(k for k in theirs if theirs[k] != config.get(k))
            raise IntegrityError(f"repository config does not match key file {key_name} (changed: "
                                 f"{', '.join(changed) or 'format'}): it was tampered with; refusing it")
        repo = cls(backend, config, master)
        repo.key_name = key_name
        return repo

    @property
    def location(self) -> str:
        return self.backend.location

    # ------------------------------------------------------------------ locks
    @contextmanager
    def lock(self, exclusive: bool = False, purpose: str = "") -> Iterator[None]:
        """Hold a shared (backup, restore, check) or exclusive (prune) lock. A shared lock
        asked for by a thread that holds one already (the backups of a libvirt domain's
        disks inside one lock) is that lock: no second lock file. Work that only reads
        (READ_PURPOSES) takes none with ``no_lock``, nor where the lock cannot be written
        because the file system is read-only (told through ``note``)."""
        me_thread = threading.get_ident()
        if not exclusive and self._shared_held.get(me_thread):
            self._shared_held[me_thread] += 1
            try:
                yield
            finally:
                self._shared_held[me_thread] -= 1
            return
        reading = not exclusive and purpose in READ_PURPOSES
        if reading and self.no_lock:
            yield
            return
        name = f"locks/{os.urandom(16).hex()}"
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": _now_iso(),
              "exclusive": exclusive, "purpose": purpose, "hostid": host_id()}
        # A signal (vmbak.interrupts) never falls between writing the lock and owning it,
        # nor into its removal; and should this frame never reach its ``finally`` (a
        # signal between a ``with`` statement and this generator), the command line
        # removes the lock on its way out: no lock is left behind by an interrupted command.
        unlocked = False  # reading a repository on a read-only file system
        refresher = _LockRefresher(self, name, me)

        def remove() -> None:
            refresher.stop()
            self.backend.delete(name)
        try:
            with deferred():
                self.backend.write(name, json.dumps(me).encode())
                self.held_locks.append(name)
                token = register_cleanup(remove)
        except ReadOnlyRepository:
            if not reading:
                raise ReadOnlyRepository(f"cannot lock the repository for {purpose or 'writing'}: "
                                         f"{self.location} is on a read-only file system") from None
            if self.note is not None:
                self.note(f"{self.location} is on a read-only file system: reading it without a lock")
            self.no_lock = unlocked = True
        except AccessDenied as e:
            if not reading:
                raise
            what = "copy from it" if purpose == "copy-source" else purpose
            raise AccessDenied(f"{e} (access that may only read can {what} with --no-lock)") from None
        if unlocked:
            yield
            return
        try:
            for other, _ in self.backend.list("locks"):
                if other == name:
                    continue
                try:
                    d = json.loads(self.backend.read(other))
                except (RepositoryError, ValueError):
                    continue
                if not isinstance(d, dict):  # not a lock (``vmbak unlock`` lists it as unreadable)
                    continue
                if _lock_stale(d):
                    if _same_host(d):
                        self.backend.delete(other)  # its process is gone
                    continue
                # One prune at a time; prunes run beside backups (see engine/prune.py).
                solo = purpose in SOLO_PURPOSES and d.get("purpose") in SOLO_PURPOSES
                if exclusive or d.get("exclusive") or solo:
                    raise RepositoryLocked(
                        f"repository is locked by pid {d.get('pid')} on {d.get('host')} "
                        f"({d.get('purpose') or 'unknown'}, since {d.get('time')}); "
                        "if that process is gone, run 'vmbak unlock'")
            if not exclusive:
                self._shared_held[me_thread] = 1
            with deferred():  # a signal inside Thread.start() would leave a thread join() refuses
                refresher.start()
            yield
        finally:
            with deferred():
                if not exclusive:
                    self._shared_held.pop(me_thread, None)
                self.held_locks.remove(name)
                remove()  # the refresher stops first: no rewrite lands after the delete
                unregister_cleanup(token)

    # ------------------------------------------------------------------ index
    @property
    def index(self) -> Index:
        idx = self._index
        if idx is None:
            with self._index_lock:
                if self._index is None:
                    self._load_index()
                idx = self._index
        assert idx is not None
        return idx

    def _load_index(self) -> None:
        for attempt in range(10):
            files = sorted(n for n, _ in self.backend.list("index"))
            idx = Index()
            loaded: list[str] = []
            damaged: dict[str, str] = {}
            gone = False
            for name in files:
                try:
                    packs, entries = self.read_index_file_flat(name)
                except ObjectMissing:
                    # A prune (or repair) consolidating the index deletes files only after
                    # writing the one that supersedes them: list again.
                    gone = True
                    break
                except IntegrityError as e:
                    # Skipped: the packs it names describe themselves and are read from
                    # their headers below, like packs a killed backup left unindexed.
                    damaged[name] = str(e)
                    continue
                try:
                    idx.stage(packs, entries)
                except IntegrityError as e:
                    damaged[name] = f"index file {name}: {e}"
                    continue
                loaded.extend(packs)
                del entries
            if not gone:
                break
            if attempt == 9:
                raise RepositoryError("the index keeps changing while it is read (a prune or repair is "
                                      "consolidating it); try again")
        self.damaged_index_files = damaged
        listed = list(self.backend.list("data"))
        # Prune marks are read after data/ is listed: a pack that is unindexed because a
        # sweep is deleting it is then either still named by a mark, or already gone.
        doomed = doomed_packs(self.backend, self.sealer)
        idx.set_doomed(doomed)
        self._indexed_packs.update(loaded)
        self._index_files = files
        # Packs that landed without an index file (a killed backup): read their headers.
        recovered = []
        for name, size in listed:
            pack_id = name.rsplit("/", 1)[-1]
            idx.pack_sizes[pack_id] = size
            if pack_id in self._indexed_packs or not re.fullmatch(r"[0-9a-f]{64}", pack_id):
                continue
            if pack_id in doomed and not damaged:
                continue  # condemned by prune: never brought back
            try:
                entries = read_header(self.backend, self.sealer, pack_id, size)
            except RepositoryError:
                continue  # damaged (check reports it; never used) or just deleted
            try:
                idx.stage([pack_id], entries, size)
            except IntegrityError:
                continue
            if pack_id not in doomed:
                # A doomed pack is used (as a last resort) only while a damaged index file
                # may have been what named it, and never written into an index file.
                recovered.append((pack_id, entries))
        idx.commit()
        self._index = idx
        # Only a lock holder records recovered packs in an index file: prune waits for the
        # lock holders that might not have seen its marks, never for lock-free readers.
        self.recovered_packs = len(recovered)
        if recovered and self.held_locks:
            try:
                self.write_index(recovered)
            except RepositoryError:
                pass
        clean = getattr(self.backend, "clean_stale_temp", None)
        if clean is not None:
            clean()

    def read_index_file_flat(self, name: str) -> tuple[list[str], np.ndarray]:
        """Like read_index_file, unsplit: (pack ids, INDEX_ENTRY rows)."""
        blob = self.backend.read(name)
        what = f"index file {name}"
        payload = self.sealer.open(blob, INDEX_AAD, what)
        if name.rsplit("/", 1)[-1] != index_id(blob):
            raise IntegrityError(f"{what}: content does not match its name (renamed or tampered)")
        del blob
        _, packs, entries = decode_index_flat(payload, what)
        return packs, entries

    def read_index_file(self, name: str) -> list[tuple[str, np.ndarray]]:
        """The packs (and their entries) one index file names; IntegrityError if the file
        is damaged: its name is not the BLAKE3 of its bytes, or it fails to open or decode."""
        blob = self.backend.read(name)
        what = f"index file {name}"
        payload = self.sealer.open(blob, INDEX_AAD, what)
        if name.rsplit("/", 1)[-1] != index_id(blob):
            raise IntegrityError(f"{what}: content does not match its name (renamed or tampered)")
        _, packs = decode_index(payload, what)
        return packs

    def write_consolidated_index(self, packs: list[tuple[str, np.ndarray]], supersedes: list[str]) -> list[str]:
        """Write index files naming ``packs`` (whole packs, at most CONSOLIDATED_ENTRIES
        entries a file unless one pack has more), each superseding ``supersedes``; return
        their names. Several bounded files, not one, so that a reader holds one file of
        bounded size at a time (docs/index-memory.md)."""
        names: list[str] = []
        group: list[tuple[str, np.ndarray]] = []
        rows = 0
        for pack in [*packs, None]:
            if group and (pack is None or rows + len(pack[1]) > CONSOLIDATED_ENTRIES):
                blob = self.sealer.seal(encode_index(group, supersedes), INDEX_AAD)
                name = f"index/{index_id(blob)}"
                self.backend.write(name, blob)
                names.append(name)
                group, rows = [], 0
            if pack is not None:
                group.append(pack)
                rows += len(pack[1])
        return names

    def write_index(self, packs: list[tuple[str, np.ndarray]]) -> str:
        plain = encode_index(packs)
        blob = self.sealer.seal(plain, INDEX_AAD)
        iid = index_id(blob)
        self.backend.write(f"index/{iid}", blob)
        for p, _ in packs:
            self._indexed_packs.add(p)
        return iid

    # ------------------------------------------------------------------ chunks
    def encode_chunk(self, chunk_id: bytes, data: bytes | memoryview) -> memoryview:
        """Compress (when it pays) and seal one chunk; thread-safe.

        A chunk of at least PROBE_MIN bytes whose samples do not compress (random or
        already compressed data) is stored raw without compressing the rest of it."""
        return self.encode_chunk_codec(chunk_id, data)[0]

    def encode_chunk_codec(self, chunk_id: bytes, data: bytes | memoryview,
                           probe: bool = True) -> tuple[memoryview, int]:
        """:meth:`encode_chunk`, and the codec the chunk was stored with (CODEC_ZSTD,
        CODEC_ZSTD_FRAMES for a chunk longer than one frame in a version-4 repository, or
        CODEC_RAW). ``probe=False`` compresses without the sampled probe first, for a
        caller that has just seen the data next to this chunk compress (the backup). On the
        benchmark image 864 of its 1,603 non-zero 1 MiB chunks compress, and the kind
        changes only 23 times in disk order; measured there (level 1, median of 15 rounds)
        the probe of a chunk that compresses costs 112 µs, 3.1% of compressing it (3.36
        ms), while compressing a random 1 MiB chunk that the probe would have stored raw
        costs 177 µs. The chunk is still stored raw when compressing it gains less than
        1/32."""
        comp = None
        codec = CODEC_ZSTD
        if not probe or len(data) < PROBE_MIN or not incompressible(data, self.zstd_level):
            if self.frames and len(data) > zstd.FRAME_SIZE:
                comp = zstd.compress_frames(_compressor(self.zstd_level), data)
                codec = CODEC_ZSTD_FRAMES
            else:
                comp = _compressor(self.zstd_level).compress(data)
            if len(comp) >= len(data) - len(data) // 32:
                comp = None
        if comp is not None:
            return self.sealer.seal_payload(codec, comp, chunk_aad(chunk_id)), codec
        return self.sealer.seal_payload(CODEC_RAW, data, chunk_aad(chunk_id)), CODEC_RAW

    def decode_chunk(self, chunk_id: bytes, blob: bytes, raw_len: int, what: str = "",
                     check_id: bool = True) -> bytes:
        """Authenticate, decompress and hash-check one chunk; thread-safe.

        ``check_id=False`` skips recomputing the chunk id, for callers that check every
        block of the result against block hashes themselves (the envelope is still
        authenticated: AES-GCM, or the keyed BLAKE3 tag of unencrypted repositories).
        """
        label = what or f"chunk {chunk_id.hex()[:16]}"
        payload = self.sealer.open(blob, chunk_aad(chunk_id), label)
        return self.decode_payload(chunk_id, payload, raw_len, label, check_id)

    def decode_payload(self, chunk_id: bytes, payload: bytes, raw_len: int, label: str,
                       check_id: bool = True) -> bytes:
        """A chunk's plaintext from its authenticated payload (codec byte and data),
        checked against its length and (with ``check_id``) its id; thread-safe."""
        if not payload:
            raise IntegrityError(f"{label}: empty payload")
        if raw_len > self.max_chunk:
            raise IntegrityError(f"{label}: claims {raw_len} bytes, more than a chunk of this "
                                 f"repository holds ({self.max_chunk})")
        codec = payload[0]
        if codec == CODEC_ZSTD:
            data = zstd.decompress(memoryview(payload)[1:], raw_len, label)
        elif codec == CODEC_ZSTD_FRAMES:
            data = zstd.decompress_frames(memoryview(payload)[1:], raw_len, label)
        elif codec == CODEC_RAW:
            data = payload[1:]
        else:
            raise IntegrityError(f"{label}: unknown codec {codec}")
        if len(data) != raw_len or (check_id and self.sealer.chunk_id(data) != chunk_id):
            raise IntegrityError(f"{label}: content does not match its id (corrupt data)")
        return data

    def read_chunk(self, chunk_id: bytes, what: str = "") -> bytes:
        loc = self.index.get(chunk_id)
        if loc is None:
            raise IntegrityError(f"{what or 'chunk ' + chunk_id.hex()[:16]}: missing from the repository")
        return self.read_at(chunk_id, loc, what)

    def read_at(self, chunk_id: bytes, loc: Location, what: str = "", check_id: bool = True) -> bytes:
        try:
            blob = self.backend.read_range(pack_name(loc.pack), loc.offset, loc.length)
        except RepositoryError as e:
            raise IntegrityError(f"{what or 'chunk ' + chunk_id.hex()[:16]}: {e}") from None
        if len(blob) != loc.length:
            raise IntegrityError(f"{what or 'chunk ' + chunk_id.hex()[:16]}: pack {loc.pack[:16]} is truncated")
        return self.decode_chunk(chunk_id, blob, loc.raw_length, what, check_id)

    def open_files(self, threads: int) -> OpenFiles | None:
        """A cache of open pack descriptors for :meth:`read_into` calls from up to
        ``threads`` threads (None where the backend does not read local files); close it
        once they are done."""
        if not isinstance(self.backend, LocalBackend):
            return None
        return OpenFiles(OpenFiles.budget(threads))

    def read_into(self, chunk_id: bytes, loc: Location, out: memoryview, what: str = "",
                  check_id: bool = True, files: OpenFiles | None = None,
                  ranges: list[tuple[int, int]] | None = None, at: int = 0) -> int:
        """:meth:`read_at` into ``out`` (at least ``at + loc.raw_length`` bytes): the
        chunk's plaintext is written to ``out`` at ``at`` and its length returned, with the
        same checks. The stored blob and the decrypted payload go through this thread's
        reused buffers, so a restore allocates no memory per chunk; thread-safe. ``files`` (from
        :meth:`open_files`) keeps the packs open across calls.

        With ``ranges`` ((start, end) byte offsets in the chunk), only the bytes there
        are sure to be written (a chunk stored in frames is decoded only there; the rest
        of the chunk's place in ``out`` may be left as it was): the caller checks them
        against block hashes, as the chunk id cannot be checked on a part (``check_id``
        must be False).

        With ``at`` ≥ 1, a chunk stored raw is decrypted straight into its place, its
        codec byte landing on ``out[at - 1]``, which is put back afterwards: a restore's
        raw chunks (random data, the chain of 30's 12,800 small ones) then need no copy.
        If it fails, the chunk's place may hold garbage."""
        if ranges is not None and check_id:
            raise ValueError("read_into: ranges need check_id=False")
        label = what or f"chunk {chunk_id.hex()[:16]}"
        raw_len = loc.raw_length
        if raw_len > self.max_chunk or at + raw_len > len(out):
            raise IntegrityError(f"{label}: claims {raw_len} bytes, more than a chunk of this "
                                 f"repository holds ({self.max_chunk})")
        blob_buf = _blob_bufs.view(loc.length)
        name = pack_name(loc.pack)
        read_into = getattr(self.backend, "read_range_into", None)
        try:
            if read_into is not None:
                got = read_into(name, loc.offset, blob_buf, files) if files is not None else \
                    read_into(name, loc.offset, blob_buf)
            else:
                data = self.backend.read_range(name, loc.offset, loc.length)
                got = len(data)
                blob_buf[:got] = data[:loc.length]
        except RepositoryError as e:
            raise IntegrityError(f"{label}: {e}") from None
        if got != loc.length:
            raise IntegrityError(f"{label}: pack {loc.pack[:16]} is truncated")
        dest = out[at:at + raw_len]
        if at and loc.length == self.sealer.overhead + 1 + raw_len:  # sized as stored raw
            spot = out[at - 1:at + raw_len]
            keep = spot[0]
            try:
                n = self.sealer.open_into(blob_buf, chunk_aad(chunk_id), label, spot)
                in_place = n == 1 + raw_len and spot[0] == CODEC_RAW
                if not in_place:  # another codec after all (not written by vmbak): decoded below
                    payload = _payload_bufs.view(loc.length)
                    payload[:n] = spot[:n]
            finally:
                spot[0] = keep
            if in_place:
                if check_id and self.sealer.chunk_id(dest) != chunk_id:
                    raise IntegrityError(f"{label}: content does not match its id (corrupt data)")
                return raw_len
        else:
            payload = _payload_bufs.view(loc.length)
            n = self.sealer.open_into(blob_buf, chunk_aad(chunk_id), label, payload)
        if n == 0:
            raise IntegrityError(f"{label}: empty payload")
        codec = payload[0]
        if codec == CODEC_ZSTD:
            got = zstd.decompress_into(payload[1:n], dest, label)
        elif codec == CODEC_ZSTD_FRAMES:
            zstd.frames_into(payload[1:n], dest, label, ranges)
            got = raw_len
        elif codec == CODEC_RAW:
            got = n - 1
            if got == raw_len:  # copied without the GIL: the other workers go on
                for lo, hi in ranges or [(0, raw_len)]:
                    hi = min(hi, raw_len)
                    if hi > lo:
                        copy_unlocked(dest[lo:hi], payload[1 + lo:1 + hi])
        else:
            raise IntegrityError(f"{label}: unknown codec {codec}")
        if got != raw_len or (check_id and self.sealer.chunk_id(dest) != chunk_id):
            raise IntegrityError(f"{label}: content does not match its id (corrupt data)")
        return raw_len

    def chunk_writer(self) -> ChunkWriter:
        return ChunkWriter(self)

    # ------------------------------------------------------------------ manifests
    def save_manifest(self, m: Manifest) -> str:
        plain = encode_manifest(m)
        sid = blake3.blake3(plain, key=self.sealer.id_key).hexdigest()
        m.id = sid
        self.backend.write(f"snapshots/{sid}", self.sealer.seal(plain, MANIFEST_AAD))
        if self._manifests is not None:
            self._manifests[sid] = m
        return sid

    def load_manifest(self, sid: str) -> Manifest:
        if self._manifests is not None and sid in self._manifests:
            return self._manifests[sid]
        m = self._read_manifest(sid)
        if self._manifests is not None:
            self._manifests[sid] = m
        return m

    def _read_manifest(self, sid: str) -> Manifest:
        """Read, authenticate and decode one manifest; IntegrityError if it is damaged."""
        blob = self.backend.read(f"snapshots/{sid}")
        payload = self.sealer.open(blob, MANIFEST_AAD, f"snapshot {sid[:8]}")
        if blake3.blake3(payload, key=self.sealer.id_key).hexdigest() != sid:
            raise IntegrityError(f"snapshot {sid[:8]}: content does not match its name (renamed or tampered)")
        return decode_manifest(payload, sid)

    def delete_manifest(self, sid: str) -> None:
        """Remove a snapshot (its chunks stay until prune)."""
        self.backend.delete(f"snapshots/{sid}")
        if self._manifests is not None:
            self._manifests.pop(sid, None)

    def manifests(self) -> list[Manifest]:
        """All readable snapshots, oldest first.

        A manifest that fails authentication or decoding (truncated, bit-flipped, saved
        under another manifest's name, of a newer version) is left out and recorded in
        :meth:`damaged_manifests`: it harms only itself and the snapshots whose chain
        needs it (:meth:`chain` names it).
        """
        if self._manifests is None:
            ms: dict[str, Manifest] = {}
            damaged: dict[str, str] = {}
            for name, _ in self.backend.list("snapshots"):
                sid = name.rsplit("/", 1)[-1]
                if not re.fullmatch(r"[0-9a-f]{64}", sid):
                    continue
                try:
                    ms[sid] = self._read_manifest(sid)
                except ObjectMissing:
                    continue  # forgotten meanwhile
                except IntegrityError as e:
                    damaged[sid] = str(e)
            self._manifests = ms
            self._damaged = damaged
        return sorted(self._manifests.values(), key=lambda m: (m.time, m.id))

    def damaged_manifests(self) -> dict[str, str]:
        """Manifests left out of :meth:`manifests` because they are damaged: id -> reason."""
        self.manifests()
        return dict(self._damaged)

    @property
    def damaged_seen(self) -> dict[str, str]:
        """The damaged manifests found so far, without listing the snapshots for it."""
        return dict(self._damaged) if self._manifests is not None else {}

    def chain(self, m: Manifest) -> list[Manifest]:
        """The manifests needed to restore ``m``: newest first, ending at a full."""
        out = [m]
        seen = {m.id}
        while not is_full(out[-1].kind):
            p = out[-1].parent
            if p is None:
                raise IntegrityError(f"snapshot {out[-1].short_id} has no parent but is not a full backup")
            try:
                pm = self.load_manifest(p)
            except ObjectMissing:
                raise IntegrityError(f"snapshot {m.short_id}: parent snapshot {p[:8]} is missing") from None
            except IntegrityError as e:
                reason = str(e).removeprefix(f"snapshot {p[:8]}: ")
                raise IntegrityError(f"snapshot {m.short_id}: parent snapshot {p[:8]} is damaged ({reason})"
                                     ) from None
            except RepositoryError:
                raise IntegrityError(f"snapshot {m.short_id}: parent snapshot {p[:8]} is missing") from None
            if pm.id in seen or len(out) > 100000:
                raise IntegrityError(f"snapshot {m.short_id}: parent chain loops")
            if pm.block_size != m.block_size or pm.disk_size != m.disk_size:
                raise IntegrityError(f"snapshot {m.short_id}: parent {pm.short_id} has a different geometry")
            seen.add(pm.id)
            out.append(pm)
        return out

    def find(self, spec: str, where: SnapshotFilter | None = None) -> Manifest:
        """Resolve a snapshot specification; see :meth:`resolve`."""
        return self.resolve(spec, where)[0]

    def resolve(self, spec: str, where: SnapshotFilter | None = None) -> tuple[Manifest, dict | None]:
        """Resolve ``ID-prefix``, ``NAME:latest``, ``NAME``, ``NAME@TIME`` or ``latest``.

        With a filter ``where`` (repo/filters.py), ``NAME:latest``, ``NAME`` and
        ``NAME@TIME`` pick among the snapshots it selects, ``latest`` is the newest
        snapshot it selects (they must all have one disk name), and an id must name a
        snapshot it selects. Without one, ``latest`` needs a repository of one disk name.

        An id prefix that names no snapshot but an id that forget or merge rewrote
        (``Manifest.aliases``) resolves to the rewritten snapshot; the second value is
        then ``{"id": old id, "now": current id, "by", "time"}`` (else None) and
        :attr:`note`, when set, is told in one line.
        """
        ms = self.manifests()
        flt = where if where is not None and not where.empty() else None
        pool = [m for m in ms if flt is None or flt.matches(m)]
        matching = f" matches {flt.describe()}" if flt else ""

        def missing_name(name: str, what: str) -> SnapshotNotFound:
            if flt and any(m.name == name for m in ms):
                return SnapshotNotFound(f"no snapshot of {name!r}{what}{matching}")
            return SnapshotNotFound(f"no snapshot named {name!r}" if not what else f"no snapshot of {name!r}{what}")

        def selected(m: Manifest) -> Manifest:
            if flt and not flt.matches(m):
                raise SnapshotNotFound(f"snapshot {m.short_id} ({m.name} {m.time[:19]}) does not match "
                                       f"{flt.describe()}")
            return m

        if spec == "latest" and not any(m.name == "latest" for m in pool):
            names = sorted({m.name for m in pool})
            if not names:
                raise SnapshotNotFound(f"no snapshot{matching}" if flt else "the repository has no snapshots")
            if len(names) > 1:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise SnapshotNotFound(f"'latest' is ambiguous: snapshots of {len(names)} disk names "
                                       f"{'match' if flt else 'exist'} ({shown}); add --name NAME or use NAME:latest")
            return pool[-1], None
        if ":" in spec and not spec.endswith(":latest") and "@" not in spec:
            raise SnapshotNotFound(f"bad snapshot specification {spec!r} (use ID, NAME:latest or NAME@TIME)")
        if spec.endswith(":latest"):
            name = spec[: -len(":latest")]
            cand = [m for m in pool if m.name == name]
            if not cand:
                raise missing_name(name, "")
            return cand[-1], None
        if "@" in spec:
            name, _, ts = spec.partition("@")
            limit = parse_time_limit(ts)
            cand = [m for m in pool if m.name == name and _parse_iso(m.time) <= limit]
            if not cand:
                raise missing_name(name, f" at or before {ts}")
            return cand[-1], None
        if re.fullmatch(r"[0-9a-f]{4,64}", spec):
            cand = [m for m in ms if m.id.startswith(spec)]
            bad = [sid for sid in self._damaged if sid.startswith(spec)]
            if len(cand) + len(bad) > 1:
                raise SnapshotNotFound(f"snapshot id prefix {spec!r} is ambiguous")
            if cand:
                return selected(cand[0]), None
            if bad:
                reason = self._damaged[bad[0]].removeprefix(f"snapshot {bad[0][:8]}: ")
                raise IntegrityError(f"snapshot {bad[0][:8]} is damaged ({reason}); "
                                     f"'vmbak forget {bad[0]}' removes it")
        cand = [m for m in ms if m.name == spec]
        if cand:
            cand = [m for m in cand if flt is None or flt.matches(m)]
            if not cand:
                raise missing_name(spec, "")
            return cand[-1], None
        if re.fullmatch(r"[0-9a-f]{4,64}", spec):
            found = self._alias(spec, ms)
            if found is not None:
                m, alias = found
                return selected(m), alias
            for m in ms:  # forgotten, with its blocks merged into a snapshot that stays
                merge = m.stats.get("merge") if isinstance(m.stats, dict) else None
                seg = merge.get("segment") if isinstance(merge, dict) else None
                if isinstance(seg, list) and any(isinstance(x, str) and x.startswith(spec) for x in seg[1:]):
                    raise SnapshotNotFound(f"no snapshot matches {spec!r}: it was forgotten (what a later "
                                           f"snapshot needed of it was merged into {m.short_id})")
        if re.fullmatch(r"[0-9a-f]{1,3}", spec):
            raise SnapshotNotFound(f"no snapshot matches {spec!r}: an id prefix needs at least 4 hex digits")
        raise SnapshotNotFound(f"no snapshot matches {spec!r}")

    def _alias(self, prefix: str, ms: list[Manifest]) -> tuple[Manifest, dict] | None:
        """The live snapshot that an earlier id starting with ``prefix`` now stands for."""
        live = {m.id for m in ms}
        hits: dict[str, tuple[Manifest, dict]] = {}
        for m in ms:
            for a in m.aliases():
                # an old id that still exists is a rewrite an interrupted run left: it is itself
                if a["id"].startswith(prefix) and a["id"] not in live:
                    hits.setdefault(m.id, (m, a))
        if len(hits) > 1:
            raise SnapshotNotFound(f"snapshot id prefix {prefix!r} is ambiguous (it names earlier ids of "
                                   f"{len(hits)} rewritten snapshots)")
        if not hits:
            return None
        m, a = next(iter(hits.values()))
        alias = {"id": a["id"], "now": m.id, "by": a["by"], "time": a["time"]}
        if self.note is not None:
            how = f" by {a['by']}" if a["by"] else ""
            when = f" on {a['time'][:10]} {a['time'][11:19]} UTC" if a["time"] else ""
            self.note(f"snapshot {a['id'][:8]} was rewritten as {m.short_id}{how}{when}; using {m.short_id} "
                      f"({m.name} {m.time[:19]})")
        return m, alias

    def latest(self, name: str, full_only: bool = False) -> Manifest | None:
        cand = [m for m in self.manifests() if m.name == name and (not full_only or is_full(m.kind))]
        return cand[-1] if cand else None


class ChunkWriter:
    """Collects new chunks into packs; full packs are written, flushed to stable storage
    and moved into place by background threads, so the pipeline never waits on fsync or
    on an upload. A backend's ``pack_writers`` (2 locally; for S3, VMBAK_S3_UPLOADS,
    2 by default, as each upload waits on the network) sets how many packs go out at once.
    Finished packs wait their turn, in memory, up to ``QUEUE_BYTES`` (at least one pack
    per writer and one more).

    Only the thread that owns it calls ``add``/``flush``; ``has`` may be called from any.
    """

    # The sealed chunks of finished packs that may wait, in memory, for a pack writer. A
    # full backup of the benchmark image alternates between long stretches of random data,
    # stored raw, whose packs come faster than the disk takes them (O_DIRECT writes, about
    # 1.2-1.5 GB/s here), and compressible ones that keep both CPUs busy and leave the disk
    # idle. With only one pack waiting, the pipeline stopped in each random stretch until
    # the disk caught up (0.18-0.31 s in ChunkWriter._reap in all); with up to 192 MiB
    # waiting it goes on compressing meanwhile (0.07-0.15 s). `bench_ab.py backup 20`, one pack
    # waiting against up to 192 MiB: 1.019 (0.98-1.12); 256 MiB: 1.048. Peak RSS of a
    # --no-skip-unused full backup of the image, the worst case (random data throughout):
    # 246-292 MiB with one pack waiting; 312-362 MiB with 192 MiB, 350-405 MiB with 224,
    # 470-476 MiB with 256 and 543 MiB with 320 (issue 16's limit is 512).
    QUEUE_BYTES = 192 << 20

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.pending: dict[bytes, int] = {}
        self.finished: list[FinishedPack] = []
        self.new_chunks = 0
        self.new_raw = 0
        self.new_stored = 0
        self.durable_stored = 0  # of new_stored: in packs that are written (uploaded) and indexed
        self._blobs: list[bytes] = []
        self._meta: list[tuple[bytes, int]] = []
        self._bytes = 0
        writers = max(1, int(getattr(repo.backend, "pack_writers", 1)))
        self._max_inflight = writers + 1  # one more waits its turn, so a writer never idles
        self._inflight_bytes = 0
        self._pool = cf.ThreadPoolExecutor(writers, thread_name_prefix="vmbak-pack")
        self._inflight: collections.deque[tuple[cf.Future, int]] = collections.deque()

    def has(self, chunk_id: bytes) -> bool:
        return self.repo.index.usable(chunk_id) or chunk_id in self.pending

    def add(self, chunk_id: bytes, blob: bytes, raw_len: int) -> bool:
        """Store a sealed chunk unless the repository has it; return True if stored."""
        if self.has(chunk_id):
            return False
        self._blobs.append(blob)
        self._meta.append((chunk_id, raw_len))
        self._bytes += len(blob)
        self.pending[chunk_id] = raw_len
        self.new_chunks += 1
        self.new_raw += raw_len
        self.new_stored += len(blob)
        if self._bytes >= self.repo.pack_size:
            self._submit()
        self._reap(block=False)
        return True

    def _write_pack(self, blobs: list[bytes], meta: list[tuple[bytes, int]]) -> FinishedPack:
        pw = PackWriter(self.repo.backend, self.repo.sealer)
        try:
            if self.repo.index.doomed:
                # While prune marks exist a pack must not get the name of a doomed pack
                # (identical content gives an identical name when unencrypted).
                pw.pad(os.urandom(16))
            for blob, (cid, raw) in zip(blobs, meta, strict=True):
                pw.add(cid, blob, raw)
            blobs.clear()  # in the temp file now: no need to hold them in memory during the upload
            return pw.finish()
        except BaseException:
            pw.abandon()
            raise

    def _submit(self) -> None:
        if not self._blobs:
            return
        blobs, meta, nbytes = self._blobs, self._meta, self._bytes
        self._blobs, self._meta, self._bytes = [], [], 0
        fut = self._pool.submit(self._write_pack, blobs, meta)
        self._inflight.append((fut, nbytes))
        self._inflight_bytes += nbytes
        while len(self._inflight) > self._max_inflight and self._inflight_bytes > self.QUEUE_BYTES:
            self._reap(block=True, limit=1)

    def _reap(self, block: bool, limit: int | None = None) -> None:
        n = 0
        while self._inflight and (block or self._inflight[0][0].done()):
            fut, nbytes = self._inflight.popleft()
            self._inflight_bytes -= nbytes
            fp = fut.result()
            self.durable_stored += nbytes
            self.repo.index.add_pack(fp.pack_id, fp.entries, fp.size)
            for cid in fp.entries["id"].tolist():
                self.pending.pop(cid, None)
            self.finished.append(fp)
            n += 1
            if limit is not None and n >= limit:
                break

    def flush(self) -> None:
        """Make every added chunk durable and indexed."""
        self._submit()
        self._reap(block=True)
        if self.finished:
            self.repo.write_index([(fp.pack_id, fp.entries) for fp in self.finished])
            self.finished = []
        self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop: drop chunks not yet handed to a pack; packs already being written still land."""
        self._blobs, self._meta = [], []
        for fut, _ in self._inflight:
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._inflight.clear()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def parse_time_limit(ts: str) -> datetime:
    """The latest instant a ``NAME@TIME`` spec admits (a date means the end of that day); UTC."""
    ts = ts.strip().rstrip("Z")
    fmts = [("%Y-%m-%dT%H:%M:%S.%f", 1e-6), ("%Y-%m-%dT%H:%M:%S", 1), ("%Y-%m-%dT%H:%M", 60), ("%Y-%m-%d %H:%M:%S", 1),
            ("%Y-%m-%d %H:%M", 60), ("%Y-%m-%d", 86400)]
    for fmt, span in fmts:
        try:
            t = datetime.strptime(ts, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return datetime.fromtimestamp(t.timestamp() + span - 1e-6, UTC)
    raise SnapshotNotFound(f"cannot parse time {ts!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS], UTC)")


def _same_host(d: dict) -> bool:
    """Whether a lock was taken by a process whose pid this process can check: same
    hostname and, when the lock records it, same boot and pid namespace (backend.host_id)."""
    if d.get("host") != socket.gethostname():
        return False
    hid = d.get("hostid")
    return hid is None or hid == host_id()


def _lock_stale(d: dict) -> bool:
    """Whether a lock's holder is gone: its process, on this host; on another, no word
    from it (``time``, or its last ``refreshed``) for LOCK_STALE_S."""
    if _same_host(d):
        try:
            return not pid_alive(int(d.get("pid", -1)))
        except (ValueError, OverflowError):
            return False
    newest = None
    for key in ("time", "refreshed"):
        try:
            t = _parse_iso(d[key]).timestamp()
        except (KeyError, TypeError, ValueError):
            continue
        newest = t if newest is None else max(newest, t)
    if newest is None:
        return False
    return time.time() - newest > LOCK_STALE_S


class _LockRefresher:
    """Rewrites a held lock under its own name every ``repo.lock_refresh_s`` seconds with
    ``refreshed`` = now, on a daemon thread, so that other hosts never judge a
    long-running holder (serve, mount, a slow backup) stale. A failed rewrite is told
    through ``repo.note`` (once until one succeeds) and tried again at the next interval.
    :meth:`stop` returns only once no rewrite is under way, so none lands after the lock
    is deleted."""

    def __init__(self, repo: Repository, name: str, doc: dict) -> None:
        self.repo, self.name, self.doc = repo, name, dict(doc)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vmbak-lock-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            try:
                self._thread.join()
            except RuntimeError:  # not started: once it runs it sees the event and ends, unwritten
                pass

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.repo.lock_refresh_s):
            self.doc["refreshed"] = _now_iso()
            try:
                self.repo.backend.write(self.name, json.dumps(self.doc).encode())
                failing = False
            except Exception as e:  # noqa: BLE001 - told, and tried again at the next interval
                if not failing and self.repo.note is not None:
                    self.repo.note(f"cannot refresh the lock {self.name}: {e} (trying again in "
                                   f"{self.repo.lock_refresh_s:.0f} s; after 7 days without a refresh, other "
                                   "hosts judge the lock stale)")
                failing = True


__all__ = ["Repository", "ChunkWriter", "ENC_AES", "ENC_NONE"]
