"""The API's own checks: wrong arguments are VmbakErrors with one clear message."""

from __future__ import annotations

import numpy as np
import pytest

import vmbak


def test_api_argument_errors(repo, make_disk) -> None:  # noqa: ANN001
    disk = make_disk("a.raw", 1 << 20)
    r = repo.open()
    vmbak.backup(r, disk.path, name="a")
    with pytest.raises(vmbak.VmbakError, match="not a change source with a map"):
        vmbak.change_map(r, "a", "scan", disk.path)
    with pytest.raises(vmbak.VmbakError, match="unknown change source"):
        vmbak.change_map(r, "a", "bogus", disk.path)
    with pytest.raises(vmbak.VmbakError, match="either change_map or changes"):
        vmbak.backup(r, disk.path, name="a", changes="full",
                     change_map=vmbak.ChangeMap(np.ones(16, bool), 65536, "x"))
    with pytest.raises(vmbak.VmbakError, match="nothing to forget"):
        vmbak.forget(r, name="a")
    with pytest.raises(vmbak.VmbakError):
        vmbak.diff(r, "a:latest", "nosuch:latest")
    with pytest.raises(vmbak.VmbakError, match="is a directory"):
        vmbak.cat(r, "a:latest", "/")
    # an overlay that is not one: no map, and a one-line reason instead of a traceback
    assert vmbak.change_map(r, "a", "overlay", disk.path, log=lambda s: None) is None
    assert vmbak.stats(r)["snapshots"] == 1
