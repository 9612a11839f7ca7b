"""Overlay images as a change source: what the top layer holds is what changed.

A qcow2 overlay (or a vmdk delta) starts empty on top of its backing file; every
write of the VM since then allocated a cluster in it (data, or a zero/discard
marker). So the blocks changed since the backing file was frozen are exactly the
clusters allocated in the top layer. ``qemu-img map`` of the top image opened with
``backing: null`` lists them (``present`` entries); the backing file does not even
need to be readable for that.

The change map is only valid against a backup of exactly the backing file's
content, so its ``reference`` is the backing file's identity (``image_identity``) and
its ``new_reference`` the overlay's own, to be recorded as the backup's change ID:
an overlay made later on top of this one then refers to it.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from vmbak.changes.base import ChangeMap
from vmbak.disks.qemu import _check_path, _run_qemu_img, image_info, normalize_format
from vmbak.errors import ChangeTrackingError, DiskError

SOURCE = "overlay"


def _image_files(path: str, info: dict) -> list[str]:
    """The files that hold an image's data: the image itself, vmdk extents, a qcow2 data file."""
    files = [path]
    spec = (info.get("format-specific") or {}).get("data") or {}
    for ext in spec.get("extents") or []:
        fn = ext.get("filename")
        if fn and fn not in files:
            files.append(fn)
    df = spec.get("data-file")
    if df:
        files.append(df if os.path.isabs(df) else os.path.join(os.path.dirname(path), df))
    return files


def image_identity(path: str | os.PathLike[str], fmt: str | None = None) -> str | None:
    """A name for an image file's current content: it changes whenever the image (or
    any file holding its data) is written, moved or replaced.

    Built from the real path, device, inode, size and modification time of each
    file; cheap (one ``qemu-img info``) and never equal for two different contents
    of the same image, as long as writes update the modification time. None for a
    block device or anything else that is not a regular file: writes to a device
    leave no trace in its metadata, so its content cannot be named this way.
    """
    apath = os.path.realpath(os.fspath(path))
    if not os.path.isfile(apath):
        return None
    try:
        info = image_info(apath, normalize_format(fmt))
        assert isinstance(info, dict)
        files = _image_files(apath, info)
    except DiskError:
        files = [apath]
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DiskError(f"cannot identify image {apath}: {f}: {e.strerror}") from None
        h.update(f"{os.path.realpath(f)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return f"image:{os.path.basename(apath)}@{h.hexdigest()[:20]}"


def backing_file(path: str | os.PathLike[str], fmt: str | None = None) -> str | None:
    """The absolute path of an image's backing file, or None."""
    apath = _check_path(os.fspath(path))
    info = image_info(apath, normalize_format(fmt))
    assert isinstance(info, dict)
    full = info.get("full-backing-filename") or info.get("backing-filename")
    if not full:
        return None
    if "://" not in full and not full.startswith("json:") and not os.path.isabs(full):
        full = os.path.join(os.path.dirname(apath), full)
    return full


def top_layer_extents(path: str | os.PathLike[str], fmt: str | None = None) -> list[tuple[int, int]]:
    """(offset, length) ranges allocated in the top layer of an image: its own
    clusters, zero and discard markers included; the backing file is not opened."""
    apath = _check_path(os.fspath(path))
    info = image_info(apath, normalize_format(fmt))
    assert isinstance(info, dict)
    return _map_top(apath, info["format"])[0]


def _map_top(apath: str, fmt: str) -> tuple[list[tuple[int, int]], int]:
    spec = {"driver": fmt, "backing": None, "read-only": True,
            "file": {"driver": "file", "filename": apath}}
    p = _run_qemu_img(["map", "--output=json", "-U",
                       "json:" + json.dumps(spec, separators=(",", ":"))], f"cannot map image {apath}")
    try:
        entries = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise DiskError(f"cannot map image {apath}: qemu-img map printed no JSON") from None
    out: list[tuple[int, int]] = []
    end = 0
    for e in entries:
        start, length = int(e["start"]), int(e["length"])
        end = max(end, start + length)
        # "present": allocated in this layer (data, or a zero/discard marker).
        present = e.get("present", e.get("data") or e.get("zero") is False)
        if present and e.get("depth", 0) == 0:
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((start, length))
    return out, end


def overlay_change_map(path: str | os.PathLike[str], block_size: int, fmt: str | None = None) -> ChangeMap:
    """The blocks allocated in the top layer of an overlay image (qcow2 overlay,
    vmdk delta), as a ChangeMap against the backing file.

    ``reference`` is ``image_identity`` of the backing file: use the map only when the
    previous backup's change ID equals it (that backup read exactly the backing
    file's content); otherwise fall back to a scan. ``new_reference`` is the
    overlay's own identity. Raises ChangeTrackingError for an image without backing
    file, DiskError when the image cannot be read.
    """
    if block_size <= 0 or block_size & (block_size - 1):
        raise DiskError("block size must be a power of two")
    apath = _check_path(os.fspath(path))
    info = image_info(apath, normalize_format(fmt))
    assert isinstance(info, dict)
    fmt = info["format"]
    size = int(info["virtual-size"])
    back = info.get("full-backing-filename") or info.get("backing-filename")
    if not back:
        raise ChangeTrackingError(f"image {path} has no backing file, so it is not an overlay: "
                                  "its changes cannot be read from it")
    if "://" not in back and not back.startswith("json:") and not os.path.isabs(back):
        back = os.path.join(os.path.dirname(apath), back)
    if "://" in back or back.startswith("json:"):
        raise ChangeTrackingError(f"the backing file of {path} is not a local file ({back})")
    if not os.path.exists(back):
        raise DiskError(f"backing file of image {apath} is missing: {back}")
    reference = image_identity(back, info.get("backing-filename-format"))
    if reference is None:
        raise ChangeTrackingError(f"the backing file of {path} is not a regular file ({back}): it cannot be "
                                  "proven unchanged since the last backup")
    new_reference = image_identity(apath, fmt)
    ranges, _ = _map_top(apath, fmt)
    nblocks = (size + block_size - 1) // block_size
    bitmap = np.zeros(nblocks, bool)
    nbytes = 0
    for off, ln in ranges:
        if off >= size:
            continue
        ln = min(ln, size - off)
        bitmap[off // block_size:(off + ln + block_size - 1) // block_size] = True
        nbytes += ln
    n = int(np.count_nonzero(bitmap))
    note = (f"overlay: {n} blocks ({nbytes} bytes) allocated in the top layer {os.path.basename(apath)} "
            f"over {os.path.basename(back)}")
    return ChangeMap(bitmap=bitmap, block_size=block_size, source=SOURCE, reference=reference,
                     new_reference=new_reference, notes=[note])
