"""systemd without libsystemd: socket activation and readiness notification.

Socket activation: systemd passes listening sockets as descriptors 3, 4, ...
and says so in ``LISTEN_FDS`` (how many) and ``LISTEN_PID`` (for whom: a
child that inherited the environment must not take them). :func:`listen_fds`
reads and then unsets both, as sd_listen_fds(unset=1) does.

Notification: when ``NOTIFY_SOCKET`` is set (``Type=notify`` units), the
runner sends datagrams there: ``READY=1`` once serving, ``RELOADING=1`` (with
``MONOTONIC_USEC``) then ``READY=1`` around a certificate reload, and
``STOPPING=1`` when the drain starts. An address starting with ``@`` is in the
abstract namespace. Without ``NOTIFY_SOCKET`` every call is a no-op, and a
failed send is logged, never raised: systemd being away must not stop a server.
In a worker of ``--workers`` NOTIFY_SOCKET is the parent's private socket
(see ``_workers.py``); a failed send there means the parent is gone, which
the worker learns anyway, so it is logged at debug level only.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("trio_launcher")

SD_LISTEN_FDS_START = 3

_parent_is_listening = False


def notify_parent_instead() -> None:
    """In a worker: NOTIFY_SOCKET is the parent's; failing to reach it is not news."""
    global _parent_is_listening
    _parent_is_listening = True


def listen_fds(unset: bool = True) -> list[int]:
    """Descriptors passed by systemd socket activation to this process, if any."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        if unset:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)))


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``) to NOTIFY_SOCKET; False if there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError as exc:
        level = logging.DEBUG if _parent_is_listening else logging.WARNING
        log.log(level, "cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def notify_reloading(reloading: bool) -> None:
    """``RELOADING=1`` before a reload, ``READY=1`` after it."""
    if reloading:
        notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
    else:
        notify("READY=1")
