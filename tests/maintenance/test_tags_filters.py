"""Snapshot selection for scripts: tags, the --name/--host/--tag filters on snapshots,
forget, restore and copy, forget --keep-within/--keep-tag, vmbak tag, and snapshot ids that keep
naming a snapshot after forget or merge rewrote it. Everything through the real CLI
(the library only re-dates or re-hosts snapshots where a test needs fixed times)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from vmbak.engine.retention import Policy, apply_policy, parse_within, within_limit
from vmbak.errors import VmbakError

MiB = 1 << 20


@pytest.fixture(scope="module")
def built(tmp_path_factory, init_repo, new_disk):
    """web: full [nightly], incremental [nightly, verified], incremental [weekly],
    incremental (no tags); db: full [nightly]; plus a copy of db's full re-hosted to
    "other-host" with tag [weekly]. Built once; tests that change it use ``tagged``."""
    base = tmp_path_factory.mktemp("tagged")
    repo = init_repo(base / "repo", "none")
    web = new_disk(base, "web.raw", MiB + 12288, seed=5)
    db = new_disk(base, "db.raw", MiB, seed=6)
    snaps = {}
    for i, tags in enumerate((["--tag", "nightly"], ["--tag", "nightly,verified"], ["--tag", "weekly"], [])):
        if i:
            web.write_random(70_000 * i, 90_000, seed=50 + i)
        snaps[f"w{i}"] = (repo.backup(web, "web", *tags), web.save(f"w{i}"))
    snaps["d0"] = (repo.backup(db, "db", "--tag", "nightly"), db.save("d0"))
    lib = repo.open()
    m = lib.load_manifest(snaps["d0"][0]["id"])
    other = dataclasses.replace(m, hostname="other-host", tags=["weekly"], time=m.time[:-2] + "9Z", id="")
    lib.save_manifest(other)
    snaps["d1"] = (other.summary(), snaps["d0"][1])
    return repo, snaps


@pytest.fixture
def tagged(built, tmp_path):
    repo, snaps = built
    shutil.copytree(repo.path, tmp_path / "repo-copy")
    return dataclasses.replace(repo, path=tmp_path / "repo-copy"), snaps


def ids(rows) -> set[str]:  # noqa: ANN001
    return {r["id"] for r in rows}


# ---------------------------------------------------------------------------- tags
def test_tags_round_trip_and_are_listed(built, tmp_path, assert_same_file):
    repo, snaps = built
    listed = {s["id"]: s for s in repo.snapshots()}
    assert listed[snaps["w1"][0]["id"]]["tags"] == ["nightly", "verified"]
    assert listed[snaps["w3"][0]["id"]]["tags"] == []
    assert snaps["w1"][0]["tags"] == ["nightly", "verified"]  # backup --json says so too
    text = repo.run("snapshots").stdout.splitlines()
    assert text[0].split()[-1] == "TAGS"
    line = next(ln for ln in text if ln.startswith(snaps["w1"][0]["short_id"]))
    assert line.split()[-1] == "nightly,verified"
    repo.restore(snaps["w1"][0]["id"], tmp_path / "w1.raw")
    assert_same_file(tmp_path / "w1.raw", snaps["w1"][1])


def test_backup_tag_options_and_bad_tags(repo, make_disk, assert_cli_error):
    disk = make_disk("t.raw", MiB, seed=9)
    s = repo.backup(disk, "t", "--tag", "b,a", "--tag", "c", "--tag", "a")
    assert s["tags"] == ["b", "a", "c"]  # in the order given, duplicates dropped
    for bad, why in (("x y", "space"), ("", "empty"), ("a,,b", "empty"), ("-x", "'-'"), ("a\tb", "U+0009"),
                     ("x" * 201, "201 characters")):
        assert_cli_error(repo.run("backup", disk.path, "--name", "t", f"--tag={bad}", check=False), "tag", why)
    assert len(repo.snapshots()) == 1


def test_api_backup_takes_tags(repo, make_disk):
    import vmbak

    disk = make_disk("api.raw", MiB, seed=10)
    lib = repo.open()
    m = vmbak.backup(lib, disk.path, "api", tags=["from-api", "x"])
    assert m.tags == ["from-api", "x"]
    assert [s["tags"] for s in repo.snapshots("--name", "api")] == [["from-api", "x"]]
    with pytest.raises(VmbakError, match="bad tag"):
        vmbak.backup(lib, disk.path, "api", tags=["a,b"])


# ---------------------------------------------------------------------------- filters
def test_snapshots_filters(built):
    repo, snaps = built
    sid = {k: v[0]["id"] for k, v in snaps.items()}

    def sel(*args: str) -> set[str]:
        return ids(repo.snapshots(*args))

    assert sel("--tag", "nightly") == {sid["w0"], sid["w1"], sid["d0"]}
    assert sel("--tag", "nightly,verified") == {sid["w1"]}                       # a,b: both
    assert sel("--tag", "verified", "--tag", "weekly") == {sid["w1"], sid["w2"], sid["d1"]}  # either
    assert sel("--tag", "") == {sid["w3"]}                                        # no tags
    assert sel("--name", "db") == {sid["d0"], sid["d1"]}
    assert sel("--name", "db", "--name", "web") == set(sid.values())
    assert sel("--host", "other-host") == {sid["d1"]}
    assert sel("--tag", "weekly", "--name", "web") == {sid["w2"]}                 # every kind must match
    assert sel("--tag", "nosuch") == set()
    text = repo.run("snapshots", "--tag", "nightly,verified").stdout
    assert snaps["w1"][0]["short_id"] in text and text.rstrip().endswith("\n1 snapshot")


def test_restore_with_filters(built, tmp_path, assert_same_file, assert_cli_error):
    repo, snaps = built
    out = tmp_path / "r.raw"

    def restored(*args: str) -> str:
        r = repo.restore(args[0], out, *args[1:])
        return r["snapshot"]

    # NAME:latest, NAME and NAME@TIME pick among the matching snapshots
    assert restored("web:latest", "--tag", "nightly") == snaps["w1"][0]["id"]
    assert_same_file(out, snaps["w1"][1])
    out.unlink()
    assert restored("web", "--tag", "nightly", "--tag", "weekly") == snaps["w2"][0]["id"]
    out.unlink()
    t1 = snaps["w1"][0]["time"]
    assert restored(f"web@{t1[:19]}", "--tag", "nightly,verified") == snaps["w1"][0]["id"]
    out.unlink()
    # latest: the newest the filters select, which must all have one name
    assert restored("latest", "--name", "web", "--tag", "weekly") == snaps["w2"][0]["id"]
    assert_same_file(out, snaps["w2"][1])
    out.unlink()
    assert restored("latest", "--host", "other-host") == snaps["d1"][0]["id"]
    out.unlink()
    assert_cli_error(repo.run("restore", "latest", out, "--tag", "nightly", check=False),
                     "ambiguous", "db", "web", "--name")
    assert_cli_error(repo.run("restore", "latest", out, check=False), "ambiguous")
    # an id must match the filters; no match says which filter
    assert_cli_error(repo.run("restore", snaps["w3"][0]["short_id"], out, "--tag", "nightly", check=False),
                     snaps["w3"][0]["short_id"], "does not match", "--tag nightly")
    assert_cli_error(repo.run("restore", "web:latest", out, "--tag", "nosuch", check=False),
                     "no snapshot of 'web'", "--tag nosuch")
    assert_cli_error(repo.run("restore", "web:latest", out, "--tag", "a,,b", check=False), "empty tag")
    assert_cli_error(repo.run("restore", "--libvirt", "db:latest", "--tag", "x", check=False), "--libvirt")
    assert not out.exists()


def test_forget_applies_the_rules_to_the_filtered_snapshots_only(tagged, tmp_path, assert_same_file):
    repo, snaps = tagged
    sid = {k: v[0]["id"] for k, v in snaps.items()}
    out = repo.json("forget", "--name", "web", "--tag", "nightly", "--keep-last", "1", "--dry-run")
    rows = {r["id"]: r for r in out["names"]["web"]}
    assert set(rows) == {sid["w0"], sid["w1"]} and "db" not in out["names"]  # only what the filters select
    assert rows[sid["w1"]]["action"] == "keep" and rows[sid["w0"]]["action"] == "forget"
    assert rows[sid["w1"]]["tags"] == ["nightly", "verified"]
    assert out["filter"] == {"names": ["web"], "hosts": [], "tags": [["nightly"]]}
    out = repo.json("forget", "--name", "web", "--tag", "nightly", "--keep-last", "1")
    left = repo.snapshots()
    assert sid["w0"] not in ids(left) and {sid["d0"], sid["d1"]} <= ids(left)
    by_time = {s["time"]: s for s in left}
    for k in ("w1", "w2", "w3"):  # the rest of web is untouched in content (w1 absorbed the full)
        s = by_time[snaps[k][0]["time"]]
        repo.restore(s["id"], tmp_path / f"{k}.raw")
        assert_same_file(tmp_path / f"{k}.raw", snaps[k][1])
    # forgetting by --host alone: only db's re-hosted copy goes
    repo.json("forget", "--host", "other-host", "--keep-tag", "nightly")
    assert sid["d1"] not in ids(repo.snapshots()) and sid["d0"] in ids(repo.snapshots())
    # filters that match nothing say so, and forget nothing
    before = ids(repo.snapshots())
    r = repo.run("forget", "--tag", "nosuch", "--keep-last", "1")
    assert r.stdout.splitlines()[0] == "no snapshots match --tag nosuch", r.stdout
    assert ids(repo.snapshots()) == before


def test_tag_changes_tags_and_every_snapshot_still_restores(tagged, tmp_path, assert_same_file):
    """vmbak tag: the tagged snapshot and the later ones of its chain get new ids, restore
    as before, and their old ids keep naming them; forget --keep-tag then spares it."""
    repo, snaps = tagged
    sid = {k: v[0]["id"] for k, v in snaps.items()}
    manifests = sorted(p.name for p in (repo.path / "snapshots").iterdir())
    out = repo.json("tag", "--add", "keep", sid["w0"][:8], "--dry-run")
    assert [c["id"] for c in out["changed"]] == [sid["w0"]] and out["changed"][0]["new_id"] is None
    assert out["changed"][0]["tags"] == ["nightly", "keep"] and len(out["repointed"]) == 3
    assert sorted(p.name for p in (repo.path / "snapshots").iterdir()) == manifests  # a dry run writes nothing

    p = repo.run("tag", "--add", "keep", sid["w0"][:8])
    assert p.stdout.splitlines()[-1] == "changed 1 snapshot; re-pointed 3 later snapshots to the new ids", p.stdout
    now = {s["time"]: s for s in repo.snapshots("--name", "web")}  # (d1 may have d0's time)
    w0 = now[snaps["w0"][0]["time"]]
    assert w0["id"] != sid["w0"] and w0["tags"] == ["nightly", "keep"]
    for k in ("w1", "w2", "w3"):  # re-pointed: new ids, same tags, the chain intact
        s = now[snaps[k][0]["time"]]
        assert s["id"] != sid[k] and s["tags"] == snaps[k][0]["tags"]
    for k in ("w0", "w1", "w2", "w3"):
        p = repo.run("restore", sid[k][:8], tmp_path / f"{k}.raw")  # by the old id
        assert_same_file(tmp_path / f"{k}.raw", snaps[k][1])
        assert f"snapshot {sid[k][:8]} was rewritten as " in p.stderr and " by tag on " in p.stderr, p.stderr
    assert {sid["d0"], sid["d1"]} <= ids(repo.snapshots())  # other chains: untouched

    out = repo.json("tag", "--add", "keep", "web:latest", sid["w0"][:8])
    assert [c["id"][:8] for c in out["changed"]] == [now[snaps["w3"][0]["time"]]["id"][:8]]
    assert [u["id"] for u in out["unchanged"]] == [w0["id"]]  # already so: not rewritten
    repo.json("forget", "--name", "web", "--keep-last", "1", "--keep-tag", "keep")
    left = {s["time"]: s for s in repo.snapshots("--name", "web")}
    assert set(left) == {snaps["w0"][0]["time"], snaps["w3"][0]["time"]}

    out = repo.json("tag", "--name", "web", "--remove", "keep")
    assert len(out["changed"]) == 2 and all("keep" not in c["tags"] for c in out["changed"])
    out = repo.json("tag", "--name", "web", "--tag", "nightly", "--set", "")
    assert [c["tags"] for c in out["changed"]] == [[]]
    for s in repo.snapshots("--name", "web"):
        repo.restore(s["id"], tmp_path / "again.raw")
        k = "w0" if s["time"] == snaps["w0"][0]["time"] else "w3"
        assert_same_file(tmp_path / "again.raw", snaps[k][1])
        (tmp_path / "again.raw").unlink()


def test_tag_refuses_what_it_cannot_do(tagged, assert_cli_error):
    repo, snaps = tagged
    w0 = snaps["w0"][0]["id"][:8]
    for args, why in ((["tag", w0], "say what to change"), (["tag", "--add", "x"], "name the snapshots to tag"),
                      (["tag", "--add", "a b", w0], "bad tag 'a b'"),
                      (["tag", "--set", "x", "--add", "y", w0], "--set gives the whole list of tags"),
                      (["tag", "--add", "x", "--name", "nosuch"], "no snapshot named 'nosuch'"),
                      (["tag", "--add", "x", "--name", "db", w0], "does not match --name db")):
        assert_cli_error(repo.run(*args, check=False), why)
    manifests = sorted(p.name for p in (repo.path / "snapshots").iterdir())
    with repo.open().lock(purpose="backup"):  # a backup may be about to name the snapshot as its parent
        assert_cli_error(repo.run("tag", "--add", "x", w0, check=False), "repository is locked")
    assert sorted(p.name for p in (repo.path / "snapshots").iterdir()) == manifests


def test_forget_snap_must_match_the_filters(tagged, assert_cli_error):
    repo, snaps = tagged
    assert_cli_error(repo.run("forget", snaps["w3"][0]["short_id"], "--tag", "weekly", check=False),
                     "does not match")
    assert_cli_error(repo.run("forget", "--name", "nosuch", "--keep-last", "1", check=False), "nosuch")
    assert len(repo.snapshots()) == 6


def test_copy_with_filters(built, make_repo, tmp_path, assert_same_file):
    repo, snaps = built
    dst = make_repo(name="dst")
    env = {"VMBAK_FROM_REPOSITORY": str(repo.path)}
    out = dst.json("copy", "--tag", "weekly", "--name", "web", env=env)
    # w2 with its chain (w1, w0), which are copied whether or not they match
    assert [c["source"] for c in out["copied"]] == [snaps[k][0]["id"] for k in ("w0", "w1", "w2")]
    copies = {s["time"]: s for s in dst.snapshots()}
    assert copies[snaps["w2"][0]["time"]]["tags"] == ["weekly"]
    assert [s["time"] for s in dst.snapshots("--tag", "weekly")] == [snaps["w2"][0]["time"]]
    dst.restore("web:latest", tmp_path / "c.raw", "--tag", "weekly")
    assert_same_file(tmp_path / "c.raw", snaps["w2"][1])
    # a SNAP is resolved among the filtered snapshots, as restore does
    out = dst.json("copy", "web:latest", "--tag", "nightly,verified", "--dry-run", env=env)
    assert out["copied"] == [] and [p["source"] for p in out["present"]][-1] == snaps["w1"][0]["id"]
    out = dst.json("copy", "--host", "other-host", "--dry-run", env=env)
    assert [c["source"] for c in out["copied"]] == [snaps["d1"][0]["id"]]


# ---------------------------------------------------------------------------- keep-within, keep-tag
def hourly_with_tags() -> list[tuple[str, str, list[str]]]:
    """A snapshot every 12 hours from 2026-02-25T00:00 to 2026-03-31T12:00 (UTC); ids
    'MM-DDTHH'; the ones at 00:00 on the 1st are tagged 'monthly', 03-10T12 'release'."""
    from datetime import UTC, datetime, timedelta

    out = []
    t = datetime(2026, 2, 25, tzinfo=UTC)
    while t <= datetime(2026, 3, 31, 12, tzinfo=UTC):
        tags = ["monthly"] if t.day == 1 and t.hour == 0 else []
        if (t.month, t.day, t.hour) == (3, 10, 12):
            tags = ["release", "verified"]
        out.append((t.strftime("%m-%dT%H"), t.strftime("%Y-%m-%dT%H:%M:%S.000000Z"), tags))
        t += timedelta(hours=12)
    return out


def kept(policy: Policy) -> dict[str, list[str]]:
    return {d.id: d.reasons for d in apply_policy(hourly_with_tags(), policy) if d.keep}


def test_keep_within_worked_examples():
    # newest 03-31T12: 2d before is 03-29T12, and "newer than" excludes it
    assert kept(Policy(within="2d")) == {k: ["within 2d"] for k in ("03-31T12", "03-31T00", "03-30T12",
                                                                     "03-30T00")}
    # 1d12h before 03-31T12 is 03-30T00 (excluded)
    assert set(kept(Policy(within="1d12h"))) == {"03-31T12", "03-31T00", "03-30T12"}
    # 1m: 31 March 12:00 minus one month is "31 February", which rolls over to 3 March
    # 12:00 (2026 is no leap year), as restic's Go AddDate does; newer than that: 4 March on
    k = kept(Policy(within="1m"))
    assert min(k) == "03-04T00" and len(k) == 56 and k["03-04T00"] == ["within 1m"]
    assert kept(Policy(within="1y")) == {i: ["within 1y"] for i, _, _ in hourly_with_tags()}
    # combined with other rules, each reason is listed
    k = kept(Policy(last=1, within="12h"))
    assert k == {"03-31T12": ["last snapshot", "within 12h"]}


def test_within_limit_calendar_arithmetic():
    from datetime import UTC, datetime

    def lim(t: datetime, d: str) -> datetime:
        return within_limit(t, d)

    assert lim(datetime(2026, 3, 31, 12, tzinfo=UTC), "1m") == datetime(2026, 3, 3, 12, tzinfo=UTC)
    assert lim(datetime(2028, 3, 31, tzinfo=UTC), "1m") == datetime(2028, 3, 2, tzinfo=UTC)  # leap year
    assert lim(datetime(2026, 1, 15, tzinfo=UTC), "1y2m3d4h") == datetime(2024, 11, 11, 20, tzinfo=UTC)
    assert lim(datetime(2026, 1, 15, tzinfo=UTC), "14m") == datetime(2024, 11, 15, tzinfo=UTC)
    assert lim(datetime(2026, 1, 15, tzinfo=UTC), "3000000d").year == 1  # before year 1: all of time
    assert lim(datetime(2026, 1, 15, tzinfo=UTC), "3000y").year == 1
    for bad in ("", "7", "d", "1w", "2d1y", "-1d", "1.5d", "1 d x"):
        with pytest.raises(VmbakError, match="keep-within"):
            parse_within(bad)
    with pytest.raises(VmbakError, match="keep-within"):
        Policy(within="7 days").validate()


def test_keep_tag_worked_examples():
    assert kept(Policy(tags=["monthly"])) == {"03-01T00": ["tag monthly"]}
    assert kept(Policy(tags=["release,verified"])) == {"03-10T12": ["tag release,verified"]}  # both
    assert kept(Policy(tags=["release,monthly"])) == {}                                        # none has both
    assert kept(Policy(tags=["monthly", "release"])) == {"03-01T00": ["tag monthly"],          # either
                                                          "03-10T12": ["tag release"]}
    assert kept(Policy(last=1, tags=["monthly"])) == {"03-31T12": ["last snapshot"], "03-01T00": ["tag monthly"]}


@pytest.fixture
def dated(repo, make_disk):
    """Full backups of one small disk re-dated (through the library) to hourly_with_tags()'s
    times and tags, all named "web"; returns (repo, disk, {label: id})."""
    disk = make_disk("dated.raw", MiB, seed=71)
    first = repo.backup(disk, "web")
    lib = repo.open()
    base = lib.load_manifest(first["id"])
    out = {}
    for label, t, tags in hourly_with_tags()[-12:] + [s for s in hourly_with_tags() if s[2]]:
        out[label] = lib.save_manifest(dataclasses.replace(base, time=t, tags=tags, id=""))
    lib.delete_manifest(base.id)
    return repo, disk, out


def test_forget_keep_within_and_keep_tag_through_the_cli(dated, tmp_path, sha256_file, assert_cli_error):
    repo, disk, sid = dated
    args = ("forget", "--keep-within", "2d", "--keep-tag", "monthly", "--keep-tag", "release,verified")
    out = repo.json(*args, "--dry-run")
    rows = {r["id"]: r for r in out["names"]["web"]}
    keep = {rid: r["reasons"] for rid, r in rows.items() if r["action"] == "keep"}
    assert keep == {sid["03-31T12"]: ["within 2d"], sid["03-31T00"]: ["within 2d"],
                    sid["03-30T12"]: ["within 2d"], sid["03-30T00"]: ["within 2d"],
                    sid["03-01T00"]: ["tag monthly"], sid["03-10T12"]: ["tag release,verified"]}
    assert rows[sid["03-29T12"]]["reasons"] == ["no keep rule matches"]
    assert out["policy"] == "keep-within 2d, keep-tag monthly, keep-tag release,verified"
    assert len(repo.snapshots()) == 14  # a dry run changes nothing
    text = repo.run(*args, "--dry-run").stdout
    line = next(ln for ln in text.splitlines() if sid["03-10T12"][:8] in ln)
    assert line.split()[0] == "keep" and "tag release,verified" in line
    repo.json(*args)
    assert ids(repo.snapshots()) == set(keep)
    repo.restore(sid["03-01T00"], tmp_path / "m.raw")
    assert sha256_file(tmp_path / "m.raw") == sha256_file(disk.path)
    assert_cli_error(repo.run("forget", "--keep-within", "7x", check=False), "keep-within", "7x")
    assert_cli_error(repo.run("forget", "--keep-tag", "", check=False), "keep-tag")


# ---------------------------------------------------------------------------- stable ids
@pytest.fixture
def chain(repo, make_disk):
    """web: full F, incrementals I1, I2, I3 (tagged i3); (repo, [(summary, version)])."""
    disk = make_disk("chain.raw", 2 * MiB + 4096, seed=77)
    snaps = []
    for i in range(4):
        if i:
            disk.write_random(150_000 * i + 1000, 200_000, seed=700 + i)
        snaps.append((repo.backup(disk, "web", *(["--tag", "i3"] if i == 3 else [])), disk.save(f"v{i}")))
    return repo, snaps


def test_a_recorded_id_survives_merge_then_forget(chain, tmp_path, assert_same_file, assert_cli_error):
    repo, snaps = chain
    x2, x3 = snaps[2][0]["id"], snaps[3][0]["id"]
    # merge I2 into a synthetic full: I2 and its child I3 get new ids
    m = repo.json("merge", x2[:8], "--into-full")
    s2 = m["new_snapshot"]
    assert m["snapshot"] == x2 and s2 != x2
    i3b = next(r["new"] for r in m["rewritten"] if r["old"] == x3)
    # then forget S2 by the id I2 had: I3' absorbs it and becomes a synthetic full
    f = repo.json("forget", x2)
    row = next(r for r in f["names"]["web"] if r["id"] == i3b)
    i3c = row["rewrite"]["to"]
    assert row["action"] == "keep" and row["rewrite"]["type"] == "synthetic-full"
    assert s2 in f["deleted"]
    # the id recorded before both rewrites still restores I3, byte for byte, and says so
    p = repo.run("restore", x3[:8], tmp_path / "i3.raw", "--json")
    assert_same_file(tmp_path / "i3.raw", snaps[3][1])
    r = json.loads(p.stdout.splitlines()[-1])  # the summary line (docs/json.md)
    assert r["snapshot"] == i3c
    assert r["alias"]["id"] == x3 and r["alias"]["now"] == i3c and r["alias"]["by"] == "merge"
    note = [ln for ln in p.stderr.splitlines() if "rewritten" in ln]
    assert note == [f"vmbak: snapshot {x3[:8]} was rewritten as {i3c[:8]} by merge on {r['alias']['time'][:10]} "
                    f"{r['alias']['time'][11:19]} UTC; using {i3c[:8]} (web {snaps[3][0]['time'][:19]})"]
    # so does the intermediate id, and the full 64-digit one
    repo.restore(i3b, tmp_path / "i3b.raw")
    assert_same_file(tmp_path / "i3b.raw", snaps[3][1])
    listed = {s["id"]: s for s in repo.snapshots()}
    assert listed[i3c]["former_ids"] == [x3, i3b] and listed[i3c]["tags"] == ["i3"]
    assert repo.snapshots("--tag", "i3")[0]["id"] == i3c
    # the forgotten snapshot's id names nothing any more
    assert_cli_error(repo.run("restore", s2[:8], tmp_path / "gone.raw", check=False), "no snapshot matches",
                     "forgotten", f"merged into {i3c[:8]}")
    # (an id S2 had before its own rewrite went with it)
    assert_cli_error(repo.run("restore", x2[:8], tmp_path / "gone.raw", check=False), "no snapshot matches")
    # the untouched snapshots keep their ids
    for k in (0, 1):
        assert snaps[k][0]["id"] in listed
    repo.check(read_data=False)


def test_forget_folding_parents_keeps_the_old_id(chain, tmp_path, assert_same_file):
    repo, snaps = chain
    x1, x2 = snaps[1][0]["id"], snaps[2][0]["id"]
    f = repo.json("forget", x1)  # I2 absorbs I1: new id
    new2 = next(r["new"] for r in f["rewritten"] if r["old"] == x2)
    p = repo.run("restore", x2[:12], tmp_path / "i2.raw")
    assert_same_file(tmp_path / "i2.raw", snaps[2][1])
    assert f"snapshot {x2[:8]} was rewritten as {new2[:8]} by forget" in p.stderr
    # ... also for the commands that take a snapshot: diff, stats, forget
    d = repo.json("diff", x2[:8], snaps[3][0]["id"])
    assert d["a"] == new2
    # a filter applies to the snapshot the old id names now
    assert repo.json("restore", x2, tmp_path / "again.raw", "--name", "web")["snapshot"] == new2


def test_alias_from_a_replaces_only_manifest_and_ambiguity(chain, tmp_path, assert_same_file):
    """A rewrite recorded by a vmbak that kept no history (only ``extra.replaces``) resolves
    too, and a rewritten snapshot whose old id still exists (an interrupted rewrite)
    does not steal that id."""
    repo, snaps = chain
    lib = repo.open()
    full = lib.load_manifest(snaps[0][0]["id"])
    gone = "ab" * 32
    new = lib.save_manifest(dataclasses.replace(full, extra={"replaces": gone}, id=""))
    p = repo.run("restore", gone[:8], tmp_path / "f.raw")
    assert_same_file(tmp_path / "f.raw", snaps[0][1])
    assert f"snapshot {gone[:8]} was rewritten as {new[:8]};" in p.stderr
    # an interrupted rewrite: the replacement names an id that still exists: that id is itself
    live = snaps[1][0]["id"]
    lib.save_manifest(dataclasses.replace(lib.load_manifest(live), extra={"replaces": live}, id=""))
    assert repo.json("restore", live[:8], tmp_path / "l.raw")["snapshot"] == live
