"""Binding listening sockets, and naming who holds a busy port.

We bind the sockets ourselves rather than letting hypercorn do it, for two
reasons. A failure must name the one address at fault (hypercorn binds the
whole list and raises a bare ``OSError`` inside nested exception groups), and
a socket bound before the app starts reserves the port: child processes an
engine spawns during start-up cannot take it.

Every socket returned here is owned by the caller of :func:`bind_sockets`,
which must close them all (closing twice is harmless).

Unix sockets leave a file behind, and a file can belong to a live server.
Before binding ``unix:PATH`` we connect to it: if something answers, another
server lives there and binding fails (the CLI exits 4 naming the path and,
where visible, the PID); if the connection is refused the file is stale (its
server was killed) and is replaced. On close, the files we created are
removed, if they are still ours (same inode: a newer server may have replaced
them). Sockets passed in (``fd://N``, ``sock=``) belong to whoever made them
(systemd, the caller) and their files are never removed.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os
import socket
import stat
from dataclasses import dataclass, field

from hypercorn.config import Config

from ._errors import BindError, ConfigError

log = logging.getLogger("trio_launcher")


@dataclass
class BoundSockets:
    """Stream sockets ready to listen, split by whether they speak TLS."""

    secure: list[socket.socket] = field(default_factory=list)
    insecure: list[socket.socket] = field(default_factory=list)
    unix_files: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Socket files we created: path -> (st_dev, st_ino), removed on close."""

    def all(self) -> list[socket.socket]:
        return [*self.secure, *self.insecure]

    def close(self) -> None:
        for sock in self.all():
            sock.close()
        for path, identity in list(self.unix_files.items()):
            with contextlib.suppress(OSError):
                info = os.stat(path)
                if (info.st_dev, info.st_ino) == identity:
                    os.remove(path)
            del self.unix_files[path]

    def _add(self, sock: socket.socket, address: str, secure: bool) -> None:
        (self.secure if secure else self.insecure).append(sock)
        if address.startswith("unix:"):
            with contextlib.suppress(OSError):
                info = os.stat(address[5:])
                self.unix_files[address[5:]] = (info.st_dev, info.st_ino)


def bind_sockets(config: Config, sock: socket.socket | None = None) -> BoundSockets:
    """Bind every address of ``config`` (or adopt ``sock``).

    With ``sock``, the runner serves on that socket alone and takes ownership
    of its descriptor: the caller's object is detached (its ``fileno()``
    becomes -1), so no descriptor dangles whatever happens later.

    Raises:
        BindError: an address could not be bound; names the address and, for a
            busy TCP port, the process that holds it.
        ConfigError: an address that cannot be parsed.
    """
    bound = BoundSockets()
    try:
        if sock is not None:
            adopted = _adopt(sock)
            (bound.secure if config.ssl_enabled else bound.insecure).append(adopted)
            return bound
        if config.ssl_enabled:
            for address in config.bind:
                bound._add(bind_one(address, config), address, secure=True)
            for address in config.insecure_bind:
                bound._add(bind_one(address, config), address, secure=False)
        else:
            for address in config.bind:
                bound._add(bind_one(address, config), address, secure=False)
    except BaseException:
        bound.close()
        raise
    if not bound.all():
        raise ConfigError("no address to bind: config.bind is empty")
    return bound


def _adopt(sock: socket.socket) -> socket.socket:
    if sock.type != socket.SOCK_STREAM:
        raise ConfigError(f"sock must be a stream socket, got {sock.type!r}")
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        raise ConfigError(f"sock must be a TCP or Unix socket, got {sock.family!r}")
    try:
        sock.getsockname()
    except OSError as exc:
        raise ConfigError(f"sock is not usable: {exc}") from exc
    fd = sock.detach()
    owned = socket.socket(fileno=fd)
    owned.setblocking(False)
    return owned


def bind_one(address: str, config: Config) -> socket.socket:
    """Bind one address in hypercorn's syntax: ``HOST:PORT``, ``[V6]:PORT``,
    ``unix:PATH`` or ``fd://N``."""
    if address.startswith("fd://"):
        return _from_fd(address)
    if address.startswith("unix:"):
        return _bind_unix(address, address[5:], config)
    host, port = parse_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if config.workers > 1 and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise _bind_error(exc, address, port) from exc
    sock.setblocking(False)
    return sock


def parse_host_port(address: str) -> tuple[str, int]:
    """``127.0.0.1:80`` -> ("127.0.0.1", 80); ``[::1]:80`` -> ("::1", 80)."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"bad bind address {address!r}: expected [HOST]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ConfigError(f"bad bind address {address!r}: expected HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad bind address {address!r}: port is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad bind address {address!r}: port out of range")
    return host, port


def _from_fd(address: str) -> socket.socket:
    try:
        fd = int(address[5:])
    except ValueError:
        raise ConfigError(f"bad bind address {address!r}: expected fd://N") from None
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(exc.errno, exc.strerror or str(exc), address) from exc
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(f"{address} is not a stream socket")
    sock.setblocking(False)
    return sock


def _bind_unix(address: str, path: str, config: Config) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            if _answers(path):
                pid = _unix_holder(path)
                raise BindError(
                    errno_mod.EADDRINUSE,
                    "a live server answers there",
                    address,
                    pid,
                    _cmdline(pid) if pid is not None else None,
                )
            os.remove(path)  # a stale socket: its server is gone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(config.umask) if config.umask is not None else None
    try:
        sock.bind(path)
        if config.user is not None and config.group is not None:
            os.chown(path, config.user, config.group)
    except OSError as exc:
        sock.close()
        raise BindError(exc.errno, exc.strerror or str(exc), address) from exc
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    sock.setblocking(False)
    return sock


def _answers(path: str) -> bool:
    """Does a server accept connections on the Unix socket at ``path``?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # e.g. a full backlog (EAGAIN) or a timeout: it is alive
    return True


def _unix_holder(path: str) -> int | None:
    import psutil

    try:
        for conn in psutil.net_connections(kind="unix"):
            if str(conn.laddr) == path and conn.pid is not None and conn.pid != os.getpid():
                return conn.pid
    except (psutil.Error, OSError):
        pass
    return None


def _cmdline(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _bind_error(exc: OSError, address: str, port: int) -> BindError:
    pid = cmdline = None
    if exc.errno == errno_mod.EADDRINUSE:
        holder = find_port_holder(port)
        if holder is not None:
            pid, cmdline = holder
    return BindError(exc.errno, exc.strerror or str(exc), address, pid, cmdline)


def find_port_holder(port: int) -> tuple[int, str] | None:
    """The PID and command line of a process listening on TCP ``port``, if visible."""
    import psutil  # only on a failure path: not worth its memory in every server

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for conn in connections:
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port == port
            and conn.pid is not None
        ):
            try:
                cmdline = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                cmdline = ""
            return conn.pid, cmdline
    return None


def tcp_ports(sockets: BoundSockets) -> list[int]:
    """The TCP ports of ``sockets`` (read while they are open)."""
    ports = []
    for sock in sockets.all():
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                ports.append(sock.getsockname()[1])
    return ports


def log_foreign_holders(ports: list[int]) -> None:
    """After a cancelled run, say who holds our ports if it is another process."""
    for port in ports:
        holder = find_port_holder(port)
        if holder is not None and holder[0] != os.getpid():
            log.warning("port %d is held by PID %d: %s", port, holder[0], holder[1])
