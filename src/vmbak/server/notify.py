"""Notifications: a JSON POST to each webhook and an email, on failure, on a stale backup,
and optionally on success. Sent from a thread; a notification that cannot be delivered
is logged and never stops the server. The payloads are documented in docs/server.md."""

from __future__ import annotations

import json
import smtplib
import socket
import threading
import urllib.request
from email.message import EmailMessage

from vmbak.server.config import NotifyConfig, read_secret
from vmbak.server.history import now_iso

PAYLOAD_VERSION = 1


def run_event(record: dict) -> str | None:
    """Which event a finished run is: "failure", "success", or None (aborted by a stopping server)."""
    if record.get("state") == "succeeded":
        return "success"
    if record.get("state") == "failed" or (record.get("state") == "aborted" and "timeout" in (record.get("error") or "")):
        return "failure"
    return None


def payload(event: str, job: str, run: dict | None = None, **extra: object) -> dict:
    body: dict = {"version": PAYLOAD_VERSION, "event": event, "job": job, "host": socket.gethostname(),
                  "time": now_iso()}
    if run is not None:
        body["run"] = {k: run.get(k) for k in ("id", "kind", "trigger", "state", "started", "ended", "duration_s",
                                                "error", "exit_code", "bytes_read", "bytes_added", "snapshots",
                                                "forgotten")}
    body.update(extra)
    return body


def summary(p: dict) -> str:
    job, ev = p["job"], p["event"]
    if ev == "stale":
        return f"vmbak: job {job} has no backup for more than {p['stale_after_hours']:g} hours"
    run = p.get("run") or {}
    what = f"{run.get('kind', 'run')} run {run.get('id')}"
    if ev == "failure":
        return f"vmbak: job {job} failed ({what}): {run.get('error')}"
    return f"vmbak: job {job} succeeded ({what})"


class Notifier:
    def __init__(self, config: NotifyConfig, log) -> None:  # noqa: ANN001
        self.config = config
        self.log = log

    def wanted(self, event: str) -> bool:
        c = self.config
        return {"failure": c.on_failure, "success": c.on_success, "stale": True}.get(event, False)

    def send(self, p: dict, log_tail: list[str] | None = None) -> None:
        """Deliver in a background thread."""
        if not self.config.webhook and self.config.email is None:
            return
        threading.Thread(target=self._deliver, args=(p, log_tail or []), daemon=True,
                         name=f"notify-{p['event']}").start()

    def _deliver(self, p: dict, log_tail: list[str]) -> None:
        body = json.dumps(p).encode()
        for url in self.config.webhook:
            try:
                req = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "vmbak-server"})
                with urllib.request.urlopen(req, timeout=self.config.webhook_timeout) as r:  # noqa: S310
                    r.read()
            except Exception as e:  # noqa: BLE001 - any delivery failure is logged
                self.log(f"warning: webhook {url}: {p['event']} for {p['job']} not delivered: {e}")
        e = self.config.email
        if e is None:
            return
        msg = EmailMessage()
        msg["Subject"] = summary(p)
        msg["From"] = e.sender
        msg["To"] = ", ".join(e.to)
        text = summary(p) + "\n\n" + json.dumps(p, indent=2) + "\n"
        if log_tail:
            text += "\nlast log lines:\n" + "\n".join(log_tail[-40:]) + "\n"
        msg.set_content(text)
        try:
            cls = smtplib.SMTP_SSL if e.ssl else smtplib.SMTP
            with cls(e.host, e.port, timeout=e.timeout) as s:
                if e.starttls:
                    s.starttls()
                if e.username:
                    s.login(e.username, read_secret(e.password_file) if e.password_file else "")
                s.send_message(msg)
        except Exception as ex:  # noqa: BLE001
            self.log(f"warning: email to {', '.join(e.to)}: {p['event']} for {p['job']} not delivered: {ex}")
