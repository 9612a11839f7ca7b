"""Whether the test guest is ready, for the two harnesses that boot it (conftest.py's
libvirt guest and test_vm_qemu_agent.py's QEMU guest)."""

from __future__ import annotations

import base64
from collections.abc import Callable

WRITER_LOG = "/var/lib/vmbak-writer/sums.log"


def writer_started(agent: Callable[..., object]) -> bool:
    """Whether the guest's writer has logged its first file, read through the guest agent
    (``agent(command, **arguments)``). The writer says so once on the serial console
    (VMBAK-GUEST-READY), but that line can be lost. Seen once in a suite run: 15 minutes
    after the boot the writer had logged its files and the agent answered, but the
    console never showed the line. The likely cause, not proven: the serial getty taking
    over ttyS0 at the moment the writer wrote to it."""
    try:
        h = agent("guest-file-open", path=WRITER_LOG, mode="r")
        try:
            got = agent("guest-file-read", handle=h, count=64)
        finally:
            agent("guest-file-close", handle=h)
        return bool(base64.b64decode(got["buf-b64"]))  # type: ignore[index]
    except Exception:  # noqa: BLE001 - not there yet, or the agent not up yet
        return False
