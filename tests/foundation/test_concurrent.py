"""Two backups of different disks into one repository at the same time."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

MiB = 1 << 20


def interval(snap: dict) -> tuple[float, float]:
    """(start, end) of a backup in seconds since the epoch, from its snapshot summary."""
    start = datetime.strptime(snap["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    return start, start + snap["stats"]["duration_s"]


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_two_backups_at_the_same_time(make_repo, make_disk, popen_vmbak, assert_same_file, tmp_path, random_bytes,
                                      encryption):
    repo = make_repo(encryption, pack_size=MiB)  # many packs each, interleaved
    a = make_disk("a.raw", 24 * MiB, seed=111)
    b = make_disk("b.raw", 20 * MiB + 4096, seed=112)
    shared = random_bytes(4 * MiB, 113)  # the same chunks in both disks, stored concurrently
    a.write(8 * MiB, shared)
    b.write(12 * MiB, shared)
    # Each backup's pre-hook waits until the other's has started, so that the two read and
    # store at the same time however long each process takes to start (in the loaded full
    # suite, six pairs started back to back once all missed each other by 30-200 ms).
    barrier = tmp_path / "barrier.sh"
    barrier.write_text('#!/bin/sh\ntouch "$BARRIER/$VMBAK_NAME"\n'
                       'for i in $(seq 3000); do [ -e "$BARRIER/a" ] && [ -e "$BARRIER/b" ] && exit 0; '
                       'sleep 0.01; done\nexit 1\n')
    barrier.chmod(0o755)
    rounds = []
    overlaps = 0
    for rnd in range(6):  # a full each, then incrementals, each pair started together
        if rnd >= 2 and overlaps:
            break  # on a loaded machine two short backups may miss each other: go on until they meet
        if rnd:
            a.write_random(rnd * MiB, 3 * MiB, seed=114 + rnd)
            b.write_random(5 * MiB, 2 * MiB, seed=115 + 2 * rnd)
        a.save(f"r{rnd}")
        b.save(f"r{rnd}")
        meet = tmp_path / f"meet{rnd}"
        meet.mkdir()
        procs = [popen_vmbak("backup", d.path, "--name", n, "--json", "--hook-pre", barrier,
                             env={**repo.env(), "BARRIER": str(meet)})
                 for d, n in ((a, "a"), (b, "b"))]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
            assert "Traceback" not in err
        rounds.append([json.loads(out.splitlines()[-1]) for out, _ in outs])  # summary lines
        (s1, e1), (s2, e2) = (interval(s) for s in rounds[-1])
        overlaps += s1 < e2 and s2 < e1
    # The test means something only if the backups really ran at the same time.
    assert overlaps >= 1, [[interval(s) for s in r] for r in rounds]
    assert [s["type"] for s in rounds[0]] == ["full", "full"]
    for r in rounds[1:]:
        assert [s["type"] for s in r] == ["incremental", "incremental"]

    listed = {s["id"] for s in repo.snapshots()}
    assert listed == {s["id"] for r in rounds for s in r}
    repo.check(read_data=True)
    for rnd, (sa, sb) in enumerate(rounds):
        for disk, snap in ((a, sa), (b, sb)):
            out = tmp_path / f"{snap['name']}-{rnd}.out"
            repo.restore(snap["id"], out)
            assert_same_file(out, disk.version(f"r{rnd}"))
    # Nothing is left behind: no locks, no temporary files.
    assert list((repo.path / "locks").iterdir()) == []
    assert list((repo.path / "tmp").iterdir()) == []


def test_a_listing_skips_an_object_removed_while_it_is_read(tmp_path):
    """Another process may remove an object between the reading of a directory and the
    size of its entries: a backup releasing its lock while a second one takes its own
    (three backups into one repository once failed with ".../locks/95a9... No such file
    or directory"), prune deleting a pack. The listing goes on without it."""
    from vmbak.repo.backend import LocalBackend

    root = tmp_path / "repo"
    (root / "locks").mkdir(parents=True)
    for n in ("a", "b", "c"):
        (root / "locks" / n).write_bytes(b"{}")
    listing = LocalBackend(str(root)).list("locks")
    first, size = next(listing)
    assert size == 2
    gone = next(n for n in ("a", "b", "c") if f"locks/{n}" != first)
    (root / "locks" / gone).unlink()  # released meanwhile
    rest = [name for name, _ in listing]
    assert sorted([first, *rest]) == sorted(f"locks/{n}" for n in ("a", "b", "c") if n != gone)
