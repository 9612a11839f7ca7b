"""A domain definition, read for a backup and rewritten for a restore.

``check_disks(xml, domain)``: every disk of the domain that holds guest data must be one
vmbak can back up through libvirt; otherwise a one-line DiskError names the disk and says
why. Removable media (cdrom, floppy) and read-only disks are not backed up.

``rewrite_for_restore(xml, name, uuid, disks, files, directory)``: the definition of a
restored copy that shares no file with the original: a new name and UUID, no MAC
addresses (libvirt makes new ones), each disk pointed at its restored image, the
NVRAM, kernel, initrd, device tree and stored firmware at their restored copies, and
every file-backed serial port, console, log and unix socket moved into ``directory``
under the new name.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from vmbak.errors import DiskError

# What vmbak backs up (device='disk', not read-only) must be of these types.
READABLE_TYPES = ("file", "block", "network", "volume", "nvme")
_WHY = {
    "dir": "it is a host directory that QEMU presents as a virtual FAT disk (type='dir'), not a disk image",
    "vhostuser": "it is served by a vhost-user process outside QEMU's block layer (type='vhostuser'), which "
                 "libvirt cannot checkpoint or export",
}


def _target(d: ET.Element) -> str:
    t = d.find("target")
    return (t.get("dev") or "?") if t is not None else "?"


def check_disks(xml: str, domain: str) -> None:
    """A one-line DiskError for the first disk of ``xml`` vmbak cannot back up (see the module)."""
    for d in ET.fromstring(xml).findall("./devices/disk"):
        device = d.get("device", "disk")
        if device in ("cdrom", "floppy") or d.find("readonly") is not None:
            continue
        kind = d.get("type", "file")
        tgt = _target(d)
        why = None
        if device == "lun":
            why = ("it is a SCSI passthrough LUN (device='lun'): the guest's SCSI commands go straight to the "
                   "device, past QEMU's block layer, so no checkpoint can see its writes")
        elif kind not in READABLE_TYPES:
            why = _WHY.get(kind, f"vmbak cannot read disks of type {kind!r} through libvirt")
        elif d.find("transient") is not None:
            why = "it is transient (<transient/>): its writes go to a throw-away overlay that libvirt cannot back up"
        else:
            src = d.find("source")
            if src is None or not (src.get("file") or src.get("dev") or src.get("name") or src.get("volume")):
                why = "it has no source (an empty drive)"
        if why:
            raise DiskError(f"libvirt domain {domain!r}: disk {tgt} cannot be backed up: {why}")


def _new_path(directory: str, name: str, old: str, used: dict[str, str]) -> str:
    """``directory/NAME-BASENAME`` for the file ``old`` (the same new path for the same old
    one; a number added when two old files share a base name)."""
    if old in used:
        return used[old]
    base = os.path.basename(old.rstrip("/")) or "file"
    cand = os.path.join(directory, f"{name}-{base}")
    i = 2
    while cand in used.values():
        cand = os.path.join(directory, f"{name}-{i}-{base}")
        i += 1
    used[old] = cand
    return cand


def rewrite_for_restore(xml: str, name: str, uuid: str, disks: dict[str, tuple[str, str]],
                        files: dict[str, str], directory: str) -> str:
    """The saved definition ``xml`` made into a new domain (see the module). ``disks`` maps
    each backed-up disk target to ``(path, format)``; a disk not in it that holds guest data
    is dropped (read-only media stay as they are). ``files`` maps a state role (``nvram``,
    ``kernel``, ``initrd``, ``dtb``, ``loader``) to its restored path."""
    root = ET.fromstring(xml)
    n = root.find("name")
    if n is None:
        n = ET.SubElement(root, "name")
    n.text = name
    u = root.find("uuid")
    if u is None:
        u = ET.Element("uuid")
        root.insert(list(root).index(n) + 1, u)
    u.text = uuid
    os_el = root.find("os")
    if os_el is not None:
        for role in ("loader", "nvram", "kernel", "initrd", "dtb"):
            el = os_el.find(role)
            if el is not None and role in files:
                el.text = files[role]
    devices = root.find("devices")
    if devices is None:
        raise DiskError("domain XML has no devices")
    for iface in devices.findall("interface"):
        for mac in iface.findall("mac"):
            iface.remove(mac)
    for d in list(devices.findall("disk")):
        if d.get("device", "disk") not in ("disk", "lun") or d.find("readonly") is not None:
            continue
        dev = _target(d)
        if dev not in disks:
            devices.remove(d)
            continue
        path, fmt = disks[dev]
        d.set("type", "file")
        for s in d.findall("source"):
            d.remove(s)
        for b in d.findall("backingStore"):
            d.remove(b)
        d.insert(1, ET.Element("source", file=path))
        drv = d.find("driver")
        if drv is None:
            drv = ET.SubElement(d, "driver", name="qemu")
        drv.set("type", fmt)
    used: dict[str, str] = {}
    for dev in list(devices):
        if dev.tag not in ("serial", "console", "parallel", "channel"):
            continue
        kind = dev.get("type")
        for src in dev.findall("source"):
            path = src.get("path")
            if not path:
                continue
            if kind == "file":
                src.set("path", _new_path(directory, name, path, used))
            elif kind == "unix":
                tgt = dev.find("target")
                if dev.tag == "channel" and tgt is not None and tgt.get("type") == "virtio":
                    del src.attrib["path"]  # libvirt makes a path of the new domain's own
                else:
                    src.set("path", _new_path(directory, name, path, used))
        for lg in dev.findall("log"):
            if lg.get("file"):
                lg.set("file", _new_path(directory, name, lg.get("file", ""), used))
    return ET.tostring(root, encoding="unicode")
