"""docs/api.md: every ```python block runs, in order, as one session, in a directory holding the
two disks the page describes (web.raw: GPT + ext4 with hello.txt and etc/hostname; db.raw:
8 MiB of random data). The blocks check their own results with assert."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from pathlib import Path

import pytest

import vmbak

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
MiB = 1 << 20


def _blocks() -> list[tuple[int, str]]:
    text = DOC.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S)]


def _web_disk(path: Path, tree: Path) -> None:
    """16 MiB, GPT with one partition from 1 MiB, ext4 built from ``tree`` inside it."""
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["sfdisk", "-q", str(path)], input="label: gpt\nstart=2048, size=28672, type=linux\n",
                   text=True, check=True, capture_output=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={MiB},nodiscard", "-d", str(tree), str(path),
                    "14M"], check=True, capture_output=True)


@pytest.fixture
def docdir(tmp_path: Path, random_bytes) -> Path:  # noqa: ANN001
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "hello.txt").write_text("hello from web\n")
    (tree / "etc" / "hostname").write_text("web\n")
    work = tmp_path / "work"
    work.mkdir()
    _web_disk(work / "web.raw", tree)
    (work / "db.raw").write_bytes(random_bytes(8 * MiB, 7))
    return work


def test_the_page_has_an_example_of_every_function() -> None:
    code = "\n".join(src for _, src in _blocks())
    for fn in ("Repository.init", "Repository.open", "backup", "restore", "change_map", "ChangeMap", "diff",
               "stats", "check", "ls", "cat", "extract", "forget", "prune", "open_disk"):
        assert f"vmbak.{fn}(" in code, fn
    for fn in ("backup", "restore", "change_map", "diff", "stats", "check", "ls", "cat", "extract", "forget",
               "prune", "open_disk"):
        f = getattr(vmbak, fn)
        assert f.__doc__ and f.__annotations__.get("return"), fn  # documented and typed


def test_every_example_runs(docdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks()
    assert len(blocks) >= 8
    monkeypatch.chdir(docdir)
    for k in [k for k in os.environ if k.startswith("VMBAK_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("VMBAK_CACHE_DIR", "off")
    session: dict = {"__name__": "__api_md__"}
    for line, src in blocks:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(src, f"{DOC}:{line}", "exec"), session)  # noqa: S102 - the documentation's code
        except Exception as e:
            raise AssertionError(f"the example at docs/api.md line {line} failed: {e!r}\n"
                                 f"--- its output\n{out.getvalue()}") from e
    repo = session["repo"]
    assert vmbak.check(repo, read_data=True).ok
