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

With a concurrency limit, the accept loop reads a new plain-TCP connection's
first bytes itself, and the door (``_door``) decides on them: while the server
sheds, it answers a request the middleware would shed with its 503 at once,
without a task. Those cost a few system calls each, so a round takes up to
``TURN_AWAY_BURST`` of them besides its ``BURST`` connections, and a burst of
refused clients leaves the backlog in tens of milliseconds instead of half a
second. A connection the door lets in while shedding (a health probe) ends the
round, so that its task runs before the rest of the burst, which waits in the
kernel's backlog rather than in our memory.

A connection whose bytes are not in yet waits in the ``WaitingRoom``: one
epoll for all of them, one task, a deadline each. A burst's clients connect
first and write later; when each had a task of its own that waited for its
bytes, hundreds of them woke in one scheduler batch and answered their 503s
there, 90-200 ms, and trio runs a batch in either order: the requests let in
from that crowd started their handlers after all of it (the admitted
requests' p99 was 7-10 % over the same requests without overload). The room
takes the connections whose bytes came in the order they came, ``ROOM_SLICE``
a scheduler round, and spawns the tasks of those it lets in before it writes
the 503s of the rest.

The connection's task gets the stream and closes it when it is done, as in
trio. Capacity errors (EMFILE and friends: out of descriptors or memory) are
logged as one line, without a traceback, and retried after ``RETRY`` s;
a connection that was reset before it was accepted is skipped; any other
error ends the server. The listening socket closes when the loop ends.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, Protocol

import trio

from ._metrics import recorder

log = logging.getLogger("trio_launcher")

BURST = 64  # connections accepted in one scheduler round, at most (see below)
TURN_AWAY_BURST = 512  # connections answered at the door or sent to its room in one round
ROOM_SLICE = 64  # connections the waiting room takes in one scheduler round (see above)
READ = 2**16  # bytes a connection's first read takes (the transport's reads too)
RETRY = 0.1  # seconds to wait after a capacity error, as trio does

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO})  # reset while in the backlog

Handler = Callable[[trio.abc.Stream, bytes], Awaitable[object]]
"""Serves an accepted stream; ``first``: its first bytes, read already by the door
(which let the request in and counts it until it arrives), or b"": none read."""


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

    async def turn_away(self, fd: int, head: bytes, client: Any, *, more: bool) -> bool: ...


async def serve_listening(
    listening: Sequence[tuple[socket.socket, TLSContext | None]],
    handler: Handler,
    connections: trio.Nursery,
    room: WaitingRoom | None = None,
) -> NoReturn:
    """Accept on every ``(socket, tls)`` pair until cancelled; each connection is a
    task ``handler(stream, first)`` in ``connections``. With a ``room`` (a concurrency
    limit: plain TCP only), a connection's first bytes are read on the way in, and the
    door answers or lets it in; one whose bytes are not in yet waits in the room.
    Closes the sockets when it ends."""
    async with trio.open_nursery() as nursery:
        for sock, tls in listening:
            room_here = room if tls is None else None
            nursery.start_soon(_accept_loop, sock, tls, handler, connections, room_here)
    raise AssertionError("the accept loops never return")  # pragma: no cover


async def _accept_loop(
    sock: socket.socket,
    tls: TLSContext | None,
    handler: Handler,
    connections: trio.Nursery,
    room: WaitingRoom | None,
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
                if room is None:
                    spawned += 1
                    stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
                    if tls is not None:
                        stream = trio.SSLStream(
                            stream,
                            tls,  # type: ignore[arg-type]
                            server_side=True,
                            https_compatible=True,
                        )
                    connections.start_soon(_run, handler, stream, b"")
                    continue
                raw.setblocking(False)
                shedding = room.door.shedding()
                if await room.at_the_door(raw, client):
                    spawned += 1
                    if shedding:
                        # A health probe, say: its task runs before the rest of the
                        # burst, which waits in the kernel's backlog, not in our memory.
                        break
                else:
                    turned_away += 1  # (answered, gone, or in the room: a few system calls)
    finally:
        sock.close()


class WaitingRoom:
    """Where plain-TCP connections wait for their first bytes while a concurrency
    limit is set, without a task each; the door (``_door``) decides on those bytes.

    A connection whose request is not in when it is accepted (a burst's clients
    connect first and write later) waits here, on one epoll for all of them, with
    the first request's deadline: keep-alive, as on the ordinary way, and a drain
    shortens it to the fresh connection's grace. When its bytes come, the room reads
    them in the order they came: the door answers a shed request with its 503 at
    once, and a request let in gets its connection task with the bytes read
    (``handler(stream, first)``). The room takes ``ROOM_SLICE`` connections a
    scheduler round and decides on all of them before it writes a 503, so the
    tasks of those let in are spawned first and run before the next slice; a 503
    costs a few system calls, not a task.

    Args:
        door: answers a shed request, or lets it in.
        handler: serves a connection let in (in ``connections``).
        connections: the server's nursery of connections.
        wait: the first request's deadline, in seconds (keep-alive).
        grace: how long a waiting connection has once a drain begins.
    """

    def __init__(
        self,
        door: Door,
        handler: Handler,
        connections: trio.Nursery,
        wait: float,
        grace: float,
    ) -> None:
        self.door = door
        self._handler = handler
        self._connections = connections
        self._wait = wait
        self._grace = grace
        self._epoll = select.epoll()
        self._waiting: dict[int, tuple[socket.socket, Any]] = {}
        self._deadlines: collections.deque[tuple[float, int, socket.socket]] = collections.deque()
        self._scope = trio.CancelScope()
        self._draining = False
        rec = recorder()
        self._counted = rec.connections_waiting if rec.enabled else None  # (open connections)

    async def at_the_door(self, raw: socket.socket, client: Any) -> bool:
        """A new non-blocking connection: read its first bytes. True: let in (its task
        is spawned). False: answered at the door, gone (closed), or waiting here."""
        data = _first_bytes(raw)
        if data is None:
            self._enter(raw, client)
            return False
        if not data:
            raw.close()  # it left without a word
            return False
        if self.door.shedding():
            return await self._answer(raw, client, data)
        self._let_in(raw, data)
        return True

    def _enter(self, raw: socket.socket, client: Any) -> None:
        """(The listeners close before a drain begins: nobody enters during one.)"""
        fd = raw.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._waiting[fd] = (raw, client)
        deadline = trio.current_time() + self._wait
        self._deadlines.append((deadline, fd, raw))
        if self._counted is not None:
            self._counted(1)
        if deadline < self._scope.deadline:
            self._scope.deadline = deadline

    def _let_in(self, raw: socket.socket, data: bytes) -> None:
        """Counts against the limit from now until the app has it (``Door.arrived``)."""
        self.door.let_in()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
        self._connections.start_soon(_run, self._handler, stream, data)

    async def _answer(self, raw: socket.socket, client: Any, data: bytes) -> bool:
        """While shedding: the door's 503 (False; closed), or let in (True: the health
        path, say, which takes the ordinary way). An error in the door's answer (the
        access log's, say) is that connection's alone, as on the ordinary way: logged,
        and the connection closes; the accept loop and the room go on."""
        try:
            answered = await self.door.turn_away(raw.fileno(), data, client, more=len(data) == READ)
        except Exception:
            log.exception("the door's answer failed; connection closed")
            answered = True
        if answered:
            raw.close()
            return False
        self._let_in(raw, data)
        return True

    def drain(self) -> None:
        """A drain began: who waits has the fresh connection's grace, and no more."""
        self._draining = True
        if not self._waiting:
            self._scope.cancel()  # (nobody waits: the room closes now)
            return
        due = trio.current_time() + self._grace
        self._deadlines = collections.deque(
            (min(deadline, due), fd, raw) for deadline, fd, raw in self._deadlines
        )
        self._scope.deadline = min(self._scope.deadline, due)

    async def run(self) -> None:
        """Until a drain has emptied the room (run it in the connections' nursery)."""
        try:
            while self._waiting or not self._draining:
                self._scope = trio.CancelScope(deadline=self._next_deadline())
                with self._scope:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                await self._take(self._epoll.poll(0, len(self._waiting) or 1))
                self._expire()
        finally:
            for fd, (raw, _) in list(self._waiting.items()):
                self._leave(fd)
                raw.close()
            self._epoll.close()

    def _next_deadline(self) -> float:
        deadlines = self._deadlines
        while deadlines and not self._holds(deadlines[0][1], deadlines[0][2]):
            deadlines.popleft()  # (let in, answered or gone already)
        return deadlines[0][0] if deadlines else math.inf

    def _leave(self, fd: int) -> None:
        del self._waiting[fd]
        self._epoll.unregister(fd)
        if self._counted is not None:
            self._counted(-1)

    def _holds(self, fd: int, raw: socket.socket) -> bool:
        """``raw`` still waits here (its descriptor may be another's by now)."""
        entry = self._waiting.get(fd)
        return entry is not None and entry[0] is raw

    async def _take(self, events: list[tuple[int, int]]) -> None:
        """The connections whose bytes came (or that left), in the order they came, a
        ``ROOM_SLICE`` at a time: the tasks spawned for those let in run between."""
        for start in range(0, len(events), ROOM_SLICE):
            if start:
                await trio.lowlevel.cancel_shielded_checkpoint()  # (every socket is ours)
            await self._take_some(events[start : start + ROOM_SLICE])

    async def _take_some(self, events: list[tuple[int, int]]) -> None:
        door, waiting = self.door, self._waiting
        shed: list[tuple[socket.socket, Any, bytes]] = []
        for fd, _ in events:
            raw, client = waiting[fd]
            data = _first_bytes(raw)
            if data is None:
                continue  # (woken for nothing: it waits on)
            self._leave(fd)
            if not data:
                raw.close()  # it left without a word
            elif door.shedding():
                shed.append((raw, client, data))
            else:
                self._let_in(raw, data)
        for raw, client, data in shed:  # (after the tasks of those let in are spawned)
            await self._answer(raw, client, data)

    def _expire(self) -> None:
        """Close who waited past the deadline (nothing came: nothing to answer)."""
        now = trio.current_time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, fd, raw = deadlines.popleft()
            if self._holds(fd, raw):
                self._leave(fd)
                raw.close()


def _first_bytes(raw: socket.socket) -> bytes | None:
    """What the non-blocking ``raw`` has received; None: nothing yet; b"": it left
    (closed, or reset by the peer)."""
    try:
        return os.read(raw.fileno(), READ)
    except BlockingIOError:
        return None
    except OSError:
        return b""


async def _run(handler: Handler, stream: trio.abc.Stream, first: bytes) -> None:
    try:
        await handler(stream, first)
    finally:
        if type(stream) is trio.SocketStream:
            stream.socket.close()  # (closed already, as a rule: no checkpoint for nothing)
        else:
            await trio.aclose_forcefully(stream)
