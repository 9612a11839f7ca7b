"""qemu-guest-agent, reached through libvirt or through the agent's own socket.

``LibvirtAgent(uri, domain)`` uses libvirt's API (``virDomainFSFreeze``/``virDomainFSThaw``).
``SocketAgent(path)`` speaks the agent's protocol on the unix socket of the QEMU chardev
behind the virtio-serial port ``org.qemu.guest_agent.0`` (for ``qemu:`` and ``track:``
sources, where vmbak talks to QEMU directly):

    -chardev socket,path=/run/qemu/db.qga,server=on,wait=off,id=qga0
    -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0

Both raise ``AgentUnavailable`` when nobody answers (no channel, agent not running or not
responding) and ``AgentError`` when the agent answers with an error (a filesystem that
cannot be frozen, ...). ``thaw`` returns how many filesystems it thawed (0: none was
frozen).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import time

from vmbak.errors import DiskError


class AgentError(DiskError):
    """The guest agent answered with an error."""


class AgentUnavailable(AgentError):
    """No guest agent answers."""


class LibvirtAgent:
    """The guest agent of a libvirt domain, through libvirt."""

    def __init__(self, uri: str, domain: str, dom=None) -> None:  # noqa: ANN001
        """``dom``: the domain (a libvirt.virDomain of ``uri``) when the caller has it already."""
        from vmbak.changes.libvirt import connect, lookup

        self.uri = uri
        self.domain = domain
        self.description = f"libvirt domain {domain!r}"
        self.key = self.key_for(uri, domain)
        self._conn = connect(uri) if dom is None else None
        if dom is not None:
            self._dom = dom
            return
        try:
            self._dom = lookup(self._conn, domain)
        except BaseException:
            self._conn.close()
            raise

    @staticmethod
    def key_for(uri: str, domain: str) -> str:
        """The name of this guest in vmbak's freeze state files."""
        return f"libvirt:{uri}:{domain}"

    def _call(self, what: str, fn, *args: object) -> int:  # noqa: ANN001
        import libvirt

        try:
            return int(fn(*args))
        except libvirt.libvirtError as e:
            msg = " ".join(str(e.get_error_message() or e).split())
            code = e.get_error_code()
            if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
                        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_ERR_OPERATION_INVALID,
                        libvirt.VIR_ERR_NO_SUPPORT):
                raise AgentUnavailable(f"{what}: {msg}") from None
            raise AgentError(f"{what}: {msg}") from None

    def freeze(self, mountpoints: list[str] | None = None) -> int:
        return self._call("guest agent freeze", self._dom.fsFreeze, mountpoints or None, 0)

    def thaw(self) -> int:
        return self._call("guest agent thaw", self._dom.fsThaw, None, 0)

    def close(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:  # noqa: BLE001, S110 - closing a connection that broke
            pass


class SocketAgent:
    """qemu-guest-agent on a unix socket (QEMU's chardev of the agent's port)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.description = f"guest agent {path}"
        self.key = self.key_for(path)
        self.timeout = timeout
        self._buf = b""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise AgentUnavailable(f"cannot connect to the guest agent socket {path}: "
                                   f"{e.strerror or e}") from None
        self._s = s
        try:
            self._sync()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def key_for(path: str) -> str:
        """The name of this guest in vmbak's freeze state files."""
        return f"socket:{os.path.realpath(path)}"

    def _send(self, obj: dict, prefix: bytes = b"") -> None:
        try:
            self._s.sendall(prefix + json.dumps(obj).encode() + b"\n")
        except OSError as e:
            raise AgentUnavailable(f"guest agent socket {self.path}: {e.strerror or e}") from None

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._s], [], [], left)[0]:
                raise AgentUnavailable(f"the guest agent on {self.path} does not answer")
            try:
                data = self._s.recv(65536)
            except OSError as e:
                raise AgentUnavailable(f"guest agent socket {self.path}: {e.strerror or e}") from None
            if not data:
                raise AgentUnavailable(f"the guest agent socket {self.path} was closed")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _sync(self) -> None:
        """guest-sync-delimited: the agent answers with 0xFF and then the id, after which
        every line is the answer to our own command (stale output is dropped)."""
        tok = secrets.randbelow(1 << 31)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": tok}}, prefix=b"\xff")
        deadline = time.monotonic() + min(self.timeout, 5.0)
        while True:
            line = self._line(deadline)
            if b"\xff" in line:
                line = line.rsplit(b"\xff", 1)[1]
            try:
                if json.loads(line).get("return") == tok:
                    return
            except (ValueError, AttributeError):
                continue

    def execute(self, command: str, arguments: dict | None = None, timeout: float | None = None) -> object:
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            line = self._line(deadline).lstrip(b"\xff")
            try:
                r = json.loads(line)
            except ValueError:
                raise AgentError(f"the guest agent answered {command} with garbage: "
                                 f"{line[:60].decode('utf-8', 'replace')!r}") from None
            if not isinstance(r, dict):
                raise AgentError(f"the guest agent answered {command} with garbage: {str(r)[:60]!r}")
            if "error" in r:
                err = r["error"]
                raise AgentError(f"guest agent {command}: {err.get('desc', err) if isinstance(err, dict) else err}")
            if "return" in r:
                return r["return"]

    def _count(self, command: str, arguments: dict | None = None) -> int:
        r = self.execute(command, arguments, 120)
        if not isinstance(r, int) or isinstance(r, bool):
            raise AgentError(f"the guest agent answered {command} with garbage: {str(r)[:60]!r}")
        return r

    def freeze(self, mountpoints: list[str] | None = None) -> int:
        if mountpoints:
            return self._count("guest-fsfreeze-freeze-list", {"mountpoints": mountpoints})
        return self._count("guest-fsfreeze-freeze")

    def thaw(self) -> int:
        return self._count("guest-fsfreeze-thaw")

    def status(self) -> str:
        return str(self.execute("guest-fsfreeze-status"))

    def close(self) -> None:
        try:
            self._s.close()
        except OSError:
            pass
