"""After a crash (issue 12, part 5): QEMU of the running, writing guest is killed with
SIGKILL, so the dirty bitmap of vmbak's checkpoint is lost. The next ``backup --libvirt``
says so, reads only the blocks the guest's filesystems use (a scan against the parent, not
the whole disk), keeps the chain (an incremental of the same parent), and starts a new
checkpoint, from which the backup after it is an ordinary bitmap incremental again. The
restored root filesystem holds every file the writer logged before that backup.

The guest boots twice here (once more after the kill), so this module has its own guest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import libvirt
import pytest

pytestmark = [pytest.mark.xdist_group("vm-guest-crash"), pytest.mark.timeout(4800)]


@pytest.fixture(scope="module")
def crepo(tmp_path_factory, init_repo):  # noqa: ANN001, ANN201
    return init_repo(tmp_path_factory.mktemp("vm-crash-repo") / "repo")


def _qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def test_kill9_of_qemu_falls_back_to_used_blocks_and_keeps_the_chain(guest, crepo, tmp_path,  # noqa: ANN001
                                                                     check_restored_root) -> None:
    full = crepo.json("backup", "--libvirt", guest.name)["snapshots"][0]
    assert full["type"] == "full"
    checkpoint = full["change_id"]
    assert [c.getName() for c in guest.dom.listAllCheckpoints()] == [checkpoint]
    time.sleep(3)  # the writer writes on

    os.kill(_qemu_pid(guest.name), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while _active(guest.dom):
        assert time.monotonic() < deadline, "libvirt did not notice that QEMU died"
        time.sleep(0.1)
    guest.console.write_text("")
    guest.start()  # the same transient domain, booted again from the same disk
    time.sleep(3)
    before = guest.logged_seq()

    t0 = time.monotonic()
    p = crepo.run("backup", "--libvirt", guest.name, "--json")
    took = time.monotonic() - t0
    snap = json.loads(p.stdout.splitlines()[-1])["snapshots"][0]
    # the lost bitmap is reported, and the backup scans against its parent: still a chain
    assert checkpoint in p.stderr and "scan" in p.stderr, p.stderr
    assert snap["type"] == "incremental" and snap["change_source"] == "scan", snap
    assert snap["parent"] == full["id"], snap
    st = snap["stats"]
    # only the used blocks were read: the guest's root filesystem holds about 200 MiB of its 1 GiB disk
    assert st["read_bytes"] <= st["used_bytes"] < st["logical_bytes"] // 2, st
    assert 0 < st["changed_bytes"] < st["used_bytes"], st
    new_checkpoint = snap["change_id"]
    assert new_checkpoint != checkpoint
    assert [c.getName() for c in guest.dom.listAllCheckpoints()] == [new_checkpoint]

    res = check_restored_root(_restore(crepo, guest, tmp_path, "after-crash"), tmp_path)
    assert res["fsck_rc"] == 0 and not res["missing"] and not res["wrong"], res
    assert res["newest"] >= before, res

    # the new checkpoint carries the chain on: the next backup is a bitmap incremental again
    time.sleep(3)
    nxt = crepo.json("backup", "--libvirt", guest.name)["snapshots"][0]
    assert nxt["type"] == "incremental" and nxt["change_source"] == "libvirt-checkpoint", nxt
    assert nxt["parent"] == snap["id"] and nxt["stats"]["read_bytes"] < st["read_bytes"] // 4, nxt
    print(f"\nafter kill -9: fallback (scan of the used blocks) {took:.1f} s, read "
          f"{st['read_bytes'] >> 20} MiB of {st['used_bytes'] >> 20} MiB used; the next bitmap incremental read "
          f"{nxt['stats']['read_bytes'] >> 10} KiB", file=sys.stderr)


def _active(dom) -> bool:  # noqa: ANN001
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:  # a transient domain is gone once its QEMU is
        return False


def _restore(crepo, guest, workdir: Path, label: str) -> Path:  # noqa: ANN001
    out = workdir / f"{label}.raw"
    crepo.run("restore", f"{guest.name}-vda:latest", out)
    return out
