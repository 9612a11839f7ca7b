"""Run the server in the foreground: the scheduler and the HTTP API in one asyncio loop.

Signals: SIGHUP reloads the configuration; SIGTERM and SIGINT stop the server (running
jobs are aborted cleanly, or finished with ``stop = "finish"``); a second SIGTERM or
SIGINT aborts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable

from vmbak.errors import VmbakError
from vmbak.server.config import Config
from vmbak.server.history import History
from vmbak.server.service import Service, log


def _bind(host: str, port: int) -> socket.socket:
    """Bind before anything starts, so that an address in use is one line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise VmbakError(f"server.listen: cannot resolve {host}: {e.strerror}") from None
    sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(infos[0][4])
    except OSError as e:
        sock.close()
        raise VmbakError(f"server.listen: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def serve(config: Config, ready: Callable[[], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the exit status. ``ready`` is called once it listens."""
    import uvicorn

    from vmbak.server.app import create_app
    from vmbak.server.notify import Notifier, payload, run_event

    os.makedirs(config.server.state_dir, mode=0o700, exist_ok=True)
    try:
        history = History(os.path.join(config.server.state_dir, "history.sqlite"))
    except Exception as e:  # noqa: BLE001 - sqlite3 errors, permissions
        raise VmbakError(f"cannot open the history in {config.server.state_dir}: {e}") from None
    sock = _bind(config.server.host, config.server.port)

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # noqa: ANN202 - the service handles signals itself
            yield

    async def main() -> None:
        service = Service(config, history)
        notifier = Notifier(config.notify, log)

        def on_finish(record: dict) -> None:
            notifier.config = service.config.notify
            ev = run_event(record)
            if ev and notifier.wanted(ev):
                full = service.history.run(record["id"], with_log=True) or record
                notifier.send(payload(ev, record["job"], record), full.get("log", []))

        def on_stale(job: str, hours: float, last: str | None) -> None:
            notifier.config = service.config.notify
            notifier.send(payload("stale", job, None, stale_after_hours=hours, last_backup=last))

        service.on_finish.append(on_finish)
        service.on_stale.append(on_stale)
        app = create_app(service)
        ucfg = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                              ssl_certfile=config.server.tls_cert, ssl_keyfile=config.server.tls_key,
                              timeout_graceful_shutdown=5)
        server = _Server(ucfg)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        async def stop(sig: str) -> None:
            log(f"{sig}: stopping")
            await service.stop()
            server.should_exit = True
            done.set()

        def on_hup() -> None:
            problems = service.reload()
            for p in problems:
                log(f"SIGHUP: {config.path}: {p}")
            if problems:
                log("SIGHUP: the configuration has problems: keeping the running one")

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: loop.create_task(stop(signal.Signals(s).name)))
        sched = loop.create_task(service.run_forever())
        web = loop.create_task(server.serve(sockets=[sock]))
        scheme = "https" if config.server.tls_cert else "http"
        log(f"listening on {scheme}://{config.server.listen} ({len(config.jobs)} job{'s' * (len(config.jobs) != 1)}, history "
            f"{history.path}, pid {os.getpid()})")
        if ready is not None:
            ready()
        await asyncio.wait([web, sched, loop.create_task(done.wait())], return_when=asyncio.FIRST_COMPLETED)
        failed = None
        if web.done() and not done.is_set():  # the web server failed (TLS files, ...)
            failed = f"the HTTP server stopped: {web.exception() or 'at start'}" if not web.cancelled() else "stopped"
            await service.stop()
        if sched.done() and sched.exception() is not None and not done.is_set():
            log(f"error: the scheduler stopped: {sched.exception()!r}")
            await service.stop()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(web, 10)
        sched.cancel()
        with contextlib.suppress(BaseException):
            await sched
        log("stopped")
        return failed

    try:
        failed = asyncio.run(main())
    finally:
        history.close()
        sock.close()
    if failed:
        raise VmbakError(failed)
    return 0
