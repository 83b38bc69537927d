"""Accepting connections: all that are waiting, not one per trip through the run loop.

trio's ``serve_listeners`` accepts one connection per scheduler round (each
``accept`` is a checkpoint). When many clients connect at once (a load
balancer opening its pool, wrk's 64 connections, 2000 clients in an
overload) the last of them waits as many rounds as there are clients before
it, and every round is longer than the one before, because each accepted
connection's task runs in it. A fresh server's first requests waited 5-10x
the median that way, and a health probe that connected during an overload
burst waited behind the whole burst in the listen backlog.

So this loop waits until the listening socket is readable and then takes
everything the kernel holds, as asyncio's accept loop does: up to ``BURST``
connections a round, so that a flood of connects cannot starve the
connections already being served. A burst waits in the kernel's backlog,
not in our memory: with 2000 clients connecting at once, 64 a round gave an
RSS growth of 9.5-19.2 MiB (median 17.3, five runs) where 256 a round gave
19.5-28.6 MiB (median 20.7; BENCHMARKS.md). A round's own cost, an epoll
wait, is small next to 64 connections' work.

While the server sheds load, a ``door`` (``_door``) may answer a new plain-TCP
connection's request with its 503 at once, without a task: those cost a few
system calls each, so a round takes up to ``TURN_AWAY_BURST`` of them besides
its ``BURST`` connections, and a burst of refused clients leaves the backlog
in tens of milliseconds instead of half a second. A connection the door lets
in meanwhile (a health probe; a request not in yet, which then waits for its
first bytes at the door in its task, ``_transport``) ends the round, so that
its task runs before the door answers the rest of the burst, and the rest of
the burst waits in the kernel's backlog rather than in tasks of ours.

The connection's task gets the stream and closes it when it is done, as in
trio. Capacity errors (EMFILE and friends: out of descriptors or memory) are
logged as one line, without a traceback, and retried after ``RETRY`` s;
a connection that was reset before it was accepted is skipped; any other
error ends the server. The listening socket closes when the loop ends.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, Protocol

import trio

log = logging.getLogger("trio_launcher")

BURST = 64  # connections accepted in one scheduler round, at most (see below)
TURN_AWAY_BURST = 512  # connections the door answers in one round, at most (see below)
RETRY = 0.1  # seconds to wait after a capacity error, as trio does

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO})  # reset while in the backlog

Handler = Callable[[trio.abc.Stream], Awaitable[object]]


class TLSContext(Protocol):
    """What trio's SSLStream uses of a context; the runner's switchable context fits."""

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = ...,
        server_hostname: str | bytes | None = ...,
        session: ssl.SSLSession | None = ...,
    ) -> ssl.SSLObject: ...


class Door(Protocol):
    """Turns away a new connection whose request would be shed, before it has a task
    or a protocol (``_door.Door``)."""

    def shedding(self) -> bool: ...

    def let_in(self) -> None: ...

    def arrived(self) -> None: ...

    def waiting(self, sock: socket.socket) -> bytes: ...

    async def turn_away(self, fd: int, head: bytes, client: Any, *, more: bool) -> bool: ...


async def serve_listening(
    listening: Sequence[tuple[socket.socket, TLSContext | None]],
    handler: Handler,
    connections: trio.Nursery,
    door: Door | None = None,
) -> NoReturn:
    """Accept on every ``(socket, tls)`` pair until cancelled; each connection is a
    task ``handler(stream)`` in ``connections``, unless ``door`` turns it away (plain
    TCP only, while it sheds). Closes the sockets when it ends."""
    async with trio.open_nursery() as nursery:
        for sock, tls in listening:
            door_here = door if tls is None else None
            nursery.start_soon(_accept_loop, sock, tls, handler, connections, door_here)
    raise AssertionError("the accept loops never return")  # pragma: no cover


async def _accept_loop(
    sock: socket.socket,
    tls: TLSContext | None,
    handler: Handler,
    connections: trio.Nursery,
    door: Door | None,
) -> NoReturn:
    sock.setblocking(False)
    # socket.accept() makes the new socket with the listener's family and type, each
    # turned into an enum on every call: 13k instructions a connection, a seventh of
    # what a client the door turns away costs. The same, with plain ints made once:
    family, kind, proto = int(sock.family), int(sock.type), sock.proto
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            spawned = turned_away = 0
            while spawned < BURST and turned_away < TURN_AWAY_BURST:
                try:
                    fd, client = sock._accept()  # type: ignore[attr-defined]
                    raw = socket.socket(family, kind, proto, fileno=fd)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in GONE_ERRNOS:
                        continue
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    log.error(
                        "accept returned %s (%s); retrying in %s s",
                        errno.errorcode[exc.errno],
                        os.strerror(exc.errno),
                        RETRY,
                    )
                    await trio.sleep(RETRY)
                    break
                let_in = False
                if door is not None and door.shedding():
                    raw.setblocking(False)
                    head = door.waiting(raw)
                    if head and await door.turn_away(fd, head, client, more=True):
                        raw.close()
                        turned_away += 1
                        continue
                    # A health probe, say, or a request not in yet (its task waits for it
                    # at the door): its task runs before the rest of the burst, and the
                    # rest waits in the kernel's backlog, not in tasks of ours.
                    let_in = True
                spawned += 1
                stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
                if tls is not None:
                    stream = trio.SSLStream(
                        stream,
                        tls,  # type: ignore[arg-type]
                        server_side=True,
                        https_compatible=True,
                    )
                connections.start_soon(_run, handler, stream)
                if let_in:
                    break
    finally:
        sock.close()


async def _run(handler: Handler, stream: trio.abc.Stream) -> None:
    try:
        await handler(stream)
    finally:
        if type(stream) is trio.SocketStream:
            stream.socket.close()  # (closed already, as a rule: no checkpoint for nothing)
        else:
            await trio.aclose_forcefully(stream)
