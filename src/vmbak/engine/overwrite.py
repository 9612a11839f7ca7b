"""Whether a restore may write over an existing target.

A new file is always fine and an existing regular file needs ``overwrite`` (RestoreTarget
checks both). A block device is not new either: a mistyped device name must not destroy
what is on it, so a device also needs ``overwrite``, and the refusal says how large the
device is and what vmbak's usage analysis finds on it.
"""

from __future__ import annotations

import os
import stat

from vmbak.errors import DiskError


def describe_device(path: str) -> str:
    """``64.0 MiB, GPT partition table: p1 ext4 "root" (3.1 MiB used), p2 swap`` or similar;
    what cannot be read is said so, never guessed."""
    from vmbak import usage
    from vmbak.disks.raw import RawDisk
    from vmbak.engine.common import human

    try:
        with RawDisk(path) as d:
            size = d.size
            try:
                u = usage.analyze(d)
            except Exception as e:  # noqa: BLE001 - a description must not fail the refusal
                return f"{human(size)}, contents not recognised ({e})"
    except DiskError as e:
        return f"size and contents unknown ({e})"
    parts = []
    for e in u.entries:
        if e.kind == "disk" and e.fstype == "unknown":
            continue  # the whole disk is not one filesystem (said below when nothing else is found)
        what = e.fstype if e.fstype != "unknown" else (e.ptype or "unknown contents")
        label = f' "{e.label}"' if e.label else ""
        used = f" ({human(e.used)} used)" if e.free else ""
        parts.append(f"{e.name} {what}{label}{used}" if e.kind != "disk" else f"{what}{label}{used}")
    scheme = {"gpt": "GPT partition table", "mbr": "MBR partition table"}.get(u.scheme)
    text = human(size)
    if scheme:
        text += f", {scheme}"
        if not u.entries or all(e.kind == "disk" for e in u.entries):
            text += " without partitions"
    if parts:
        text += (": " if scheme else ", ") + ", ".join(parts)
    elif not scheme:
        text += ", no partition table or filesystem that vmbak recognises (it may still hold data)"
    return text


def check_overwrite(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Raise DiskError when ``path`` is an existing block device and ``overwrite`` is False."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return  # a new target, or one RestoreTarget reports
    if overwrite or not stat.S_ISBLK(st.st_mode):
        return
    raise DiskError(f"restore target {path} is a block device ({describe_device(path)}); "
                    "use --overwrite to write over it")
