"""Prometheus metrics, computed at scrape time from the history and the server's state.

Counters come from the history file, so they survive restarts (they restart from zero
only when the history file is deleted). The names are listed in docs/server.md.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from vmbak.server.history import parse_iso


class ServiceCollector(Collector):
    def __init__(self, service) -> None:  # noqa: ANN001 - a Service
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        runs = CounterMetricFamily("vmbak_job_runs", "Finished runs by job, kind and result",
                                   labels=["job", "kind", "result"])
        failures = CounterMetricFamily("vmbak_job_failures", "Failed runs by job and kind", labels=["job", "kind"])
        read = CounterMetricFamily("vmbak_job_read_bytes", "Bytes read from disks by backup runs", labels=["job"])
        added = CounterMetricFamily("vmbak_job_added_bytes", "Bytes added to the repository by backup runs",
                                    labels=["job"])
        seconds = CounterMetricFamily("vmbak_job_run_seconds", "Time spent in finished runs", labels=["job", "kind"])
        fails: dict[tuple[str, str], int] = {}
        rd: dict[str, int] = {}
        ad: dict[str, int] = {}
        secs: dict[tuple[str, str], float] = {}
        for job, kind, state, n, b_read, b_added, dur in svc.history.totals():
            runs.add_metric([job, kind, state], n)
            if state == "failed":
                fails[(job, kind)] = fails.get((job, kind), 0) + n
            rd[job] = rd.get(job, 0) + b_read
            ad[job] = ad.get(job, 0) + b_added
            secs[(job, kind)] = secs.get((job, kind), 0.0) + dur
        for job in svc.config.jobs:
            for kind in svc.config.jobs[job].schedules() or {"backup": ""}:
                fails.setdefault((job, kind), 0)
        for (job, kind), n in sorted(fails.items()):
            failures.add_metric([job, kind], n)
        for job, n in sorted(rd.items()):
            read.add_metric([job], n)
        for job, n in sorted(ad.items()):
            added.add_metric([job], n)
        for (job, kind), s in sorted(secs.items()):
            seconds.add_metric([job, kind], s)
        yield from (runs, failures, read, added, seconds)

        last_success = GaugeMetricFamily("vmbak_job_last_success_timestamp_seconds",
                                         "When the job's newest backup was taken (repository or history)",
                                         labels=["job", "name"])
        last_run = GaugeMetricFamily("vmbak_job_last_run_timestamp_seconds", "When the job's last run ended",
                                     labels=["job", "kind"])
        last_ok = GaugeMetricFamily("vmbak_job_last_run_success", "1 if the job's last run succeeded, else 0",
                                    labels=["job", "kind"])
        last_dur = GaugeMetricFamily("vmbak_job_last_duration_seconds", "Duration of the job's last run",
                                     labels=["job", "kind"])
        last_added = GaugeMetricFamily("vmbak_job_last_added_bytes", "Bytes the job's last backup added",
                                       labels=["job"])
        next_run = GaugeMetricFamily("vmbak_job_next_run_timestamp_seconds", "When the job runs next",
                                     labels=["job", "kind"])
        running = GaugeMetricFamily("vmbak_job_running", "1 while a run of the job is running", labels=["job"])
        stale = GaugeMetricFamily("vmbak_job_stale", "1 when the job's last backup is older than its limit",
                                  labels=["job"])
        for key, job in sorted(svc.config.jobs.items()):
            t = svc.last_success(job)
            if t is not None:
                last_success.add_metric([key, job.name], t)
            for kind in job.schedules() or {"backup": ""}:
                r = svc.history.last_run(key, kind)
                if r and r["ended"]:
                    last_run.add_metric([key, kind], parse_iso(r["ended"]).timestamp())
                    last_ok.add_metric([key, kind], 1.0 if r["state"] == "succeeded" else 0.0)
                    if r["duration_s"] is not None:
                        last_dur.add_metric([key, kind], r["duration_s"])
                    if kind == "backup":
                        last_added.add_metric([key], r["bytes_added"] or 0)
            for (j, kind), when in sorted(svc.due.items()):
                if j == key:
                    next_run.add_metric([key, kind], when.timestamp())
            running.add_metric([key], 1.0 if any(r.job.key == key and r.state == "running"
                                                 for r in svc.active.values()) else 0.0)
            stale.add_metric([key], 1.0 if key in svc.stale_notified else 0.0)
        yield from (last_success, last_run, last_ok, last_dur, last_added, next_run, running, stale)

        disk_last = GaugeMetricFamily("vmbak_disk_last_snapshot_timestamp_seconds",
                                      "When each disk name's newest snapshot was taken", labels=["repository", "name"])
        disk_count = GaugeMetricFamily("vmbak_disk_snapshots", "Snapshots of each disk name",
                                       labels=["repository", "name"])
        size = GaugeMetricFamily("vmbak_repository_size_bytes", "Bytes of pack files in the repository",
                                 labels=["repository"])
        snaps = GaugeMetricFamily("vmbak_repository_snapshots", "Snapshots in the repository", labels=["repository"])
        up = GaugeMetricFamily("vmbak_repository_up", "1 if the repository could be read at the last look",
                               labels=["repository"])
        for rkey, info in sorted(svc.repo_info.items()):
            up.add_metric([rkey], 0.0 if info.get("error") else 1.0)
            for name, t in sorted(info.get("latest", {}).items()):
                disk_last.add_metric([rkey, name], t)
                disk_count.add_metric([rkey, name], info.get("counts", {}).get(name, 0))
            if info.get("size") is not None:
                size.add_metric([rkey], info["size"])
                snaps.add_metric([rkey], info.get("snapshots", 0))
        yield from (disk_last, disk_count, size, snaps, up)

        q = GaugeMetricFamily("vmbak_runs_queued", "Runs waiting for a free slot")
        q.add_metric([], len(svc.queue))
        r = GaugeMetricFamily("vmbak_runs_running", "Runs running now")
        r.add_metric([], sum(1 for x in svc.active.values() if x.state == "running"))
        yield from (q, r)


def registry(service) -> CollectorRegistry:  # noqa: ANN001
    """A registry with the service's metrics and the process's own (CPU, memory, file descriptors)."""
    from prometheus_client import ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(ServiceCollector(service))
    ProcessCollector(registry=reg)
    return reg
