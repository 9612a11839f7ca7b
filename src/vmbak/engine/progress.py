"""Progress reporting: a no-op by default; the CLI passes a terminal bar."""

from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, label: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int, label: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar on stderr, shown only when stderr is a terminal.

    Amounts and the rate are written in binary units with their right names (KiB, MiB/s),
    like every other size vmbak prints; tqdm's own scaling would divide by 1024 and still
    say "MB/s"."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {amounts}"

    def __init__(self) -> None:
        self.bar = None

    def start(self, total: int, label: str) -> None:
        self.close()
        if not sys.stderr.isatty():
            return
        self.bar = _bar_class()(total=total, desc=label, unit="B", bar_format=self.FORMAT, leave=False,
                                dynamic_ncols=True, file=sys.stderr)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_BAR = None


def _bar_class() -> type:
    """tqdm (imported when a bar is first drawn) with an ``{amounts}`` field: done/total and
    the rate, in vmbak's binary units."""
    global _BAR
    if _BAR is None:
        from tqdm import tqdm

        from vmbak.engine.common import human

        class _Bar(tqdm):
            @property
            def format_dict(self) -> dict:
                d = super().format_dict
                n, total, elapsed = d["n"], d["total"], d["elapsed"]
                rate = d["rate"] or (n / elapsed if elapsed else None)
                d["amounts"] = f"{human(n)}/{human(total or 0)}" + (f" [{human(rate)}/s]" if rate else "")
                return d

        _BAR = _Bar
    return _BAR
