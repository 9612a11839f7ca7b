"""Retention rules against worked examples with fixed dates.

The pure rule function is checked against hand-worked tables; then the same rules run
through ``vmbak forget`` on a real repository whose snapshots carry those dates."""

from __future__ import annotations

import pytest

from vmbak.engine.retention import Policy, apply_policy

MiB = 1 << 20


def twice_daily() -> list[tuple[str, str]]:
    """Snapshots at 03:00 and 15:00 UTC every day from 2026-11-01 (a Sunday, ISO week 44)
    to 2026-11-23 (a Monday, week 48); ids are 'MM-DDTHH'."""
    out = []
    for day in range(1, 24):
        for hour in (3, 15):
            out.append((f"11-{day:02d}T{hour:02d}", f"2026-11-{day:02d}T{hour:02d}:00:00.000000Z"))
    return out


def year_end() -> list[tuple[str, str]]:
    """Around a year end: 2025-12-28 is a Sunday of ISO week 2025-W52; 2025-12-29 (a Monday)
    already belongs to ISO week 2026-W01, as does 2026-01-01."""
    return [("dec28", "2025-12-28T12:00:00.000000Z"), ("dec29", "2025-12-29T12:00:00.000000Z"),
            ("jan01", "2026-01-01T12:00:00.000000Z"), ("jan05", "2026-01-05T12:00:00.000000Z")]


CASES = [
    # (snapshots, policy, {kept id: reasons}) -- worked by hand
    ("last-3", twice_daily, Policy(last=3),
     {"11-23T15": ["last snapshot"], "11-23T03": ["last snapshot"], "11-22T15": ["last snapshot"]}),
    ("daily-3", twice_daily, Policy(daily=3),
     {"11-23T15": ["daily 2026-11-23"], "11-22T15": ["daily 2026-11-22"], "11-21T15": ["daily 2026-11-21"]}),
    ("hourly-3", twice_daily, Policy(hourly=3),
     {"11-23T15": ["hourly 2026-11-23 15:00"], "11-23T03": ["hourly 2026-11-23 03:00"],
      "11-22T15": ["hourly 2026-11-22 15:00"]}),
    # the newest of weeks 48 (Mon 23rd), 47 (ends Sun 22nd), 46 (ends Sun 15th)
    ("weekly-3", twice_daily, Policy(weekly=3),
     {"11-23T15": ["weekly 2026-W48"], "11-22T15": ["weekly 2026-W47"], "11-15T15": ["weekly 2026-W46"]}),
    # only one month has snapshots: a larger count keeps one per month that exists
    ("monthly-12", twice_daily, Policy(monthly=12), {"11-23T15": ["monthly 2026-11"]}),
    ("last-1+weekly-2", twice_daily, Policy(last=1, weekly=2),
     {"11-23T15": ["last snapshot", "weekly 2026-W48"], "11-22T15": ["weekly 2026-W47"]}),
    ("daily-2+weekly-3", twice_daily, Policy(daily=2, weekly=3),
     {"11-23T15": ["daily 2026-11-23", "weekly 2026-W48"], "11-22T15": ["daily 2026-11-22", "weekly 2026-W47"],
      "11-15T15": ["weekly 2026-W46"]}),
    ("daily-all", twice_daily, Policy(daily=-1),
     {f"11-{d:02d}T15": [f"daily 2026-11-{d:02d}"] for d in range(1, 24)}),
    ("weekly-2 over a year end", year_end, Policy(weekly=2),
     {"jan05": ["weekly 2026-W02"], "jan01": ["weekly 2026-W01"]}),
    ("weekly-3 over a year end", year_end, Policy(weekly=3),
     {"jan05": ["weekly 2026-W02"], "jan01": ["weekly 2026-W01"], "dec28": ["weekly 2025-W52"]}),
    ("yearly-5 over a year end", year_end, Policy(yearly=5),
     {"jan05": ["yearly 2026"], "dec29": ["yearly 2025"]}),
    ("monthly-2 + last-2", year_end, Policy(monthly=2, last=2),
     {"jan05": ["last snapshot", "monthly 2026-01"], "jan01": ["last snapshot"], "dec29": ["monthly 2025-12"]}),
]


@pytest.mark.parametrize("label,snaps,policy,expected", CASES, ids=[c[0] for c in CASES])
def test_worked_examples(label, snaps, policy, expected):
    decisions = apply_policy(snaps(), policy)
    kept = {d.id: d.reasons for d in decisions if d.keep}
    assert kept == expected
    assert all(not d.reasons for d in decisions if not d.keep)
    # newest first, every snapshot decided once
    assert [d.id for d in decisions] == [s for s, _ in sorted(snaps(), key=lambda x: x[1], reverse=True)]


def test_equal_times_are_decided_by_id_not_by_order():
    snaps = [("b", "2026-01-01T00:00:00.000000Z"), ("a", "2026-01-01T00:00:00.000000Z")]
    for order in (snaps, list(reversed(snaps))):
        assert [d.id for d in apply_policy(order, Policy(last=1)) if d.keep] == ["b"]


def test_no_rule_keeps_nothing_and_bad_counts_are_refused():
    assert not any(d.keep for d in apply_policy(twice_daily(), Policy()))
    from vmbak.errors import VmbakError

    with pytest.raises(VmbakError):
        apply_policy(twice_daily(), Policy(daily=-2))


# ---------------------------------------------------------------------------- through the CLI
@pytest.fixture
def dated_repo(repo, make_disk):
    """A real repository holding full backups of one small disk under two names, re-dated
    through the library to fixed times: "web" as twice_daily(), "db" as year_end()."""
    disk = make_disk("dated.raw", MiB + 4096, seed=71)
    first = repo.backup(disk, "web")
    lib = repo.open()
    base = lib.load_manifest(first["id"])
    ids = {}
    for name, table in (("web", twice_daily()), ("db", year_end())):
        for label, t in table:
            m = lib.load_manifest(first["id"])
            m.name, m.time, m.id = name, t, ""
            ids[(name, label)] = lib.save_manifest(m)
    lib.delete_manifest(base.id)
    return repo, disk, ids


def test_forget_dry_run_explains_and_changes_nothing(dated_repo):
    repo, _, ids = dated_repo
    before = sorted(p.name for p in (repo.path / "snapshots").iterdir())
    out = repo.json("forget", "--keep-daily", "2", "--keep-weekly", "3", "--dry-run")
    assert sorted(p.name for p in (repo.path / "snapshots").iterdir()) == before
    web = {r["id"]: r for r in out["names"]["web"]}
    kept = {rid for rid, r in web.items() if r["action"] == "keep"}
    assert kept == {ids[("web", "11-23T15")], ids[("web", "11-22T15")], ids[("web", "11-15T15")]}
    assert web[ids[("web", "11-23T15")]]["reasons"] == ["daily 2026-11-23", "weekly 2026-W48"]
    assert web[ids[("web", "11-23T03")]]["reasons"] == ["no keep rule matches"]
    db = {r["id"]: r for r in out["names"]["db"]}  # the rules apply to each name on its own
    assert {rid for rid, r in db.items() if r["action"] == "keep"} == {
        ids[("db", "jan05")], ids[("db", "jan01")], ids[("db", "dec28")]}
    # the text form says the same, one line per snapshot
    text = repo.run("forget", "--keep-daily", "2", "--keep-weekly", "3", "--dry-run").stdout
    line = next(ln for ln in text.splitlines() if ids[("web", "11-15T15")][:8] in ln)
    assert line.split()[0] == "keep" and "weekly 2026-W46" in line


def test_forget_one_name_removes_exactly_what_the_rules_drop(dated_repo, tmp_path, sha256_file):
    repo, disk, ids = dated_repo
    out = repo.json("forget", "--name", "web", "--keep-last", "1", "--keep-weekly", "2")
    remaining = {(s["name"], s["id"]) for s in repo.snapshots()}
    assert {i for n, i in remaining if n == "web"} == {ids[("web", "11-23T15")], ids[("web", "11-22T15")]}
    assert {i for n, i in remaining if n == "db"} == {ids[("db", k)] for k in ("dec28", "dec29", "jan01", "jan05")}
    assert len(out["deleted"]) == 44 and out["rewritten"] == []
    repo.restore(ids[("web", "11-22T15")], tmp_path / "r.raw")
    assert sha256_file(tmp_path / "r.raw") == sha256_file(disk.path)
    # running the same rules again changes nothing
    again = repo.json("forget", "--name", "web", "--keep-last", "1", "--keep-weekly", "2")
    assert again["deleted"] == []


def test_forget_refuses_without_rules_or_with_unknown_names(dated_repo, assert_cli_error):
    repo, _, _ = dated_repo
    assert_cli_error(repo.run("forget", check=False), "nothing to forget")
    assert_cli_error(repo.run("forget", "--name", "nosuch", "--keep-last", "1", check=False), "nosuch")
    assert_cli_error(repo.run("forget", "deadbeef", check=False), "deadbeef")
    assert_cli_error(repo.run("forget", "--keep-daily", "-3", check=False), "keep-daily")
    # a zero duration is no rule, as a zero count: taken as one it would keep nothing, not
    # even the newest snapshot of each name
    for zero in ("0d", "0h", "0y0m0d0h"):
        assert_cli_error(repo.run("forget", "--keep-within", zero, check=False), "nothing to forget",
                         "a count or duration of 0 is no rule")
    out = repo.json("forget", "--keep-last", "1", "--keep-within", "0d", "--dry-run")
    assert out["policy"] == "keep-last 1" and len(out["deleted"]) == 48, (out["policy"], len(out["deleted"]))
    assert len(repo.snapshots()) == 50
