"""Reading `strace -f -o LOG` output in tests."""

from __future__ import annotations

import re
from pathlib import Path


def strace_calls(log: Path) -> list[tuple[str, str]]:
    """(pid, call) for each traced call, in order; a call that another thread interrupted
    ("<unfinished ...>" then "<... NAME resumed>") is joined into one line again."""
    pending: dict[str, str] = {}
    calls = []
    for line in log.read_text().splitlines():
        pid, _, rest = line.partition(" ")
        rest = rest.lstrip()  # strace pads the pid column
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()  # "fsync(5 <unfinished ...>"
            continue
        m = re.match(r"<\.\.\. \w+ resumed>(.*)", rest)
        if m:
            rest = pending.pop(pid, "") + m.group(1)
        calls.append((pid, rest))
    return calls
