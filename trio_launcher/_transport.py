"""A lean trio connection that drives hypercorn's protocol objects.

hypercorn's HTTP semantics live in its sans-IO protocol classes (HTTP/1.1 on
h11, HTTP/2 on h2, WebSocket on wsproto) behind ``ProtocolWrapper``. Its trio
transport around them (``hypercorn.trio.tcp_server.TCPServer``) is where the
time goes: every request restarts the keep-alive timer as a *new task* through
``nursery.start``, every read opens a fresh cancel scope, every send takes a
lock inside a shielded scope. This module keeps the protocol objects and
replaces that transport:

* **One cancel scope per connection, with a moving deadline.** The read loop
  runs inside a single scope. While the connection is idle its deadline is
  ``keep_alive_timeout`` away; while a request is in flight it is
  ``read_timeout`` away (or never). Moving a deadline is an assignment, not a
  task. When the deadline passes, the connection closes.
* **The drain without a task per connection.** The server keeps the set of
  open connections; when the drain starts it calls :meth:`Connection.drain`,
  which cancels the read scope of every *idle* connection at once. The check
  and the cancel happen with no checkpoint in between, so a request can never
  slip in between the decision and the close (hypercorn's timer task can:
  the chaos suite caught it answering 200 and then closing without a body).
  A busy connection closes after its response, because hypercorn's protocol
  sees ``context.terminated`` when the request cycle ends. A connection that
  has received nothing yet is not idle but *fresh*: it was accepted just
  before the drain and its client has sent, or is about to send, a request.
  Closing it would lose that request (a rolling restart drains a worker
  while clients keep connecting), so it gets ``FRESH_GRACE`` seconds to
  bring it in. So does an idle keep-alive connection whose next request
  already waits, unread, in the socket (a busy worker under load). Every
  HTTP/1.1 response sent during the drain says ``connection: close`` (as
  uvicorn's do), so the client does not send another request on a
  connection that closes after this response.
* **Sends without a shield, and mostly without the scheduler.** On plain TCP
  a response is written straight to the non-blocking socket; only a write
  the kernel does not take whole goes through trio's ``send_all`` (under a
  lock that keeps the order). trio's ``send_all`` checkpoints twice per call,
  which at thousands of requests a second is most of the transport's cost.
  A send that is cancelled half-way leaves the byte stream unusable, so
  instead of shielding every send the connection is closed when that
  happens: cancellation of a send only comes with the drain deadline, a
  forced stop or a client that is gone.
* **One write per small response.** hypercorn emits an HTTP/1.1 response
  head and its first body as two events in the same call; the head is held
  for that moment and both go out in one write. Empty writes are skipped.
* **Errors stay in their connection.** Anything one connection raises is
  logged and that connection is closed; nothing escapes into the server.

hypercorn's ``TaskGroup`` is kept in spirit (a task per request, which ASGI
needs) with a lighter bounded inbox in place of its memory channel. QUIC stays
on hypercorn's own path. The hypercorn internals this relies on are reached
through ``_hypercorn``, which a contract test checks.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import math
import os
import select
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import outcome
import trio

from ._accept import READ, Door
from ._bounds import BODY_PENDING_EXTENSION, CANCEL_EXTENSION
from ._http1 import HTTP1, park
from ._hypercorn import (
    AppWrapper,
    Closed,
    Config,
    ConnectionState,
    Event,
    H2Flood,
    LifespanState,
    ProtocolWrapper,
    RawData,
    Updated,
    WorkerContext,
    guard_h2,
    new_protocol,
    parse_socket_addr,
    run_app,
)
from ._logging import REQUEST_ID_HEADER

log = logging.getLogger("trio_launcher")

MAX_RECV = READ  # bytes a read takes (the door's first read too)
DEFAULT_HEADER_TIMEOUT = 10.0
FRESH_GRACE = 0.5  # s: how long a fresh connection may take to send its request in a drain
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CALM_DOWN_WRITE = 1.0  # s: for the GOAWAY of a flooding peer
NEVER_INDEXED = frozenset((REQUEST_ID_HEADER,))
"""HTTP/2 response headers kept out of HPACK's table: new in every response."""


@dataclass(eq=False)
class Connection:
    """One client connection, served until it closes.

    HTTP/1.1 goes to :class:`~trio_launcher._http1.HTTP1` (``http="httptools"``);
    HTTP/2 (ALPN or the prior-knowledge preface), WebSocket and h2c upgrades,
    and ``http="h11"`` go to hypercorn's ``ProtocolWrapper``.
    """

    app: AppWrapper
    config: Config
    context: WorkerContext
    state: LifespanState
    stream: trio.abc.Stream
    registry: set[Connection]
    http: str = "httptools"
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    answers_itself: Callable[[dict[str, Any]], bool] | None = None
    """The app's ``RunnerMiddleware.answers_itself``, if any (see ``_http1``)."""
    door: Door | None = None
    """The door that let ``first`` in (``_door``), if any: told when it arrives."""
    first: bytes = b""
    """The first bytes, read by the door (``_accept.WaitingRoom``), which let the first
    request in and counts it against the limit until it reaches the app (``_arrive``)."""

    def __post_init__(self) -> None:
        stream, config = self.stream, self.config
        self.idle = True
        self.fresh = True  # nothing received yet
        self.closed = False
        self.closing = False  # the server closes it: a drain, a response that ends it
        self.scope = trio.CancelScope()
        self.send_lock = trio.Lock()
        self.protocol: ProtocolWrapper | None = None
        self.held = b""  # an HTTP/1.1 response head from hypercorn waiting for its body
        # Plain TCP: the descriptor, for writes that skip the scheduler.
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        raw = getattr(getattr(stream, "transport_stream", stream), "socket", None)
        self._raw_fd = raw.fileno() if raw is not None else -1  # TLS too: bytes waiting
        self._keep_alive = float(config.keep_alive_timeout)
        self._read_timeout = float(config.read_timeout) if config.read_timeout else math.inf
        self._lazy = False  # see _serve_http1
        # The last read took all the kernel had (see _receive): the door's, if it read.
        self._drained = 0 < len(self.first) < MAX_RECV
        self._due = math.inf
        self._on_lost: Callable[[], Awaitable[None]] | None = None  # (None: hypercorn's)
        self._http1: HTTP1 | None = None
        self._coming = bool(self.first)  # the door let the first request in; not arrived yet

    async def run(self) -> None:
        self.registry.add(self)
        try:
            await self._serve()
        finally:
            self._arrive()  # (a request let in that never reached the app: its place)
            self.registry.discard(self)
            await self._close()

    async def _serve(self) -> None:
        ssl = isinstance(self.stream, trio.SSLStream)
        if ssl:
            assert isinstance(self.stream, trio.SSLStream)
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await self.stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return  # the handshake failed: nothing to serve
            alpn = self.stream.selected_alpn_protocol()
            sock = self.stream.transport_stream.socket
        else:
            alpn = "http/1.1"
            sock = self.stream.socket  # type: ignore[attr-defined]
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
        except OSError:
            return  # the client is already gone
        try:
            await self._serve_protocols(ssl, client, server, alpn, self.first)
        finally:
            # The protocol and its parser call each other, and the connection keeps a
            # method of the protocol: cycles that only the garbage collector's full
            # pass would free (under a burst: memory held for nothing).
            self._on_lost = None
            self.protocol = None
            if self._http1 is not None:
                self._http1.release()
                self._http1 = None

    async def _serve_protocols(
        self,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        alpn: str | None,
        first: bytes,
    ) -> None:
        async with trio.open_nursery() as nursery:
            handover: bytes | None = first
            if alpn != "h2" and self.http == "httptools":
                self._http1 = http1 = HTTP1(
                    self.app,
                    self.config,
                    self.context,
                    nursery,
                    self,
                    ssl=ssl,
                    client=client,
                    server=server,
                    state=self.state,
                    answers_itself=self.answers_itself,
                    arrived=self._arrive if self._coming else None,
                )
                handover = await self._serve_http1(http1, first)
                if handover is None:
                    http1.cancel_cut()  # the handler of a response the close cut short
                    return
            assert handover is not None
            self._arrive()  # (hypercorn's protocols: no word when it does)
            await self._serve_hypercorn(nursery, ssl, client, server, alpn, handover)
        # The connection has ended. The handlers of responses that had ended run on
        # (ASGI allows background work after the response: Starlette's background
        # tasks); the nursery waits for them, as hypercorn's does. The drain's
        # deadline and a forced stop reach them from outside.

    def _arrive(self) -> None:
        """The request the door let in reached the app, or will not."""
        if self._coming:
            self._coming = False
            assert self.door is not None
            self.door.arrived()

    # --- HTTP/1.1 on httptools ----------------------------------------------------

    async def _serve_http1(self, http1: HTTP1, first: bytes = b"") -> bytes | None:
        """Read into ``http1`` (``first``: bytes read already) until the connection ends;
        the bytes to hand over, if any.

        The deadline is lazy here: moving a trio deadline re-sorts trio's
        deadline table, three times a request. ``_due`` holds the real
        deadline; the scope's is only ever pulled *earlier*. When the scope
        fires before ``_due`` (the connection was busy, or got more time),
        the read is re-armed in a fresh scope: once per keep-alive period at
        most, instead of three deadline moves per request.
        """
        self._on_lost = http1.connection_lost
        self._lazy = True
        self.set_idle(True)
        while True:
            ended = None  # (stays None when the deadline cancels the read)
            with self.scope:
                ended = await self._read_http1(http1, first)
            first = b""  # (fed before the first checkpoint: never lost to a cancel)
            if (
                ended is None
                and not (self.closing or self.closed)
                and trio.current_time() < self._due
            ):
                self.scope = trio.CancelScope(deadline=self._due)
                continue
            break
        if ended == "upgrade":
            self._on_lost = None
            self._lazy = False
            return http1.upgrade
        if ended is None and not self.closing and not self.closed:
            refusal = http1.timed_out()  # the head did not arrive in time
            if refusal is not None:
                await self.write(refusal)
        lost = ended == "eof" and not self.closed
        await self._close()
        await http1.connection_lost(499 if lost else None)
        return None

    async def _read_http1(self, http1: HTTP1, data: bytes | bytearray = b"") -> str | None:
        """The read loop (``data``: read already): "eof", "upgrade", or None when cancelled
        or closed."""
        while not self.closed:
            if http1.upgrade is not None and http1.cycle is None:
                return "upgrade"
            if http1.paused:
                await http1.wait_resumable()
                continue
            if not data:
                if not self.idle and self._read_timeout != math.inf:
                    self._set_due(trio.current_time() + self._read_timeout)
                data = await self._receive()
                if not data:
                    return "eof"
            self.fresh = False
            await http1.data_received(data)
            data = b""
        return None

    async def _receive(self) -> bytes | bytearray:
        """``receive_some``; on plain TCP straight from the socket (trio's costs twice as
        much: a checkpoint and two context managers around the same syscall)."""
        if self.fd < 0:
            try:
                return await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return b""
        while True:
            if self._drained:
                # The last read emptied the kernel's buffer: a read now would
                # almost always fail, so wait first (one syscall less a request).
                try:
                    await trio.lowlevel.wait_readable(self.fd)
                except trio.ClosedResourceError:
                    return b""
            try:
                data = os.read(self.fd, MAX_RECV)
            except BlockingIOError:
                self._drained = True
                continue
            except OSError:  # reset by the peer
                return b""
            self._drained = len(data) < MAX_RECV
            return data

    def _set_due(self, due: float) -> None:
        self._due = due
        if not self._lazy or due < self.scope.deadline:
            self.scope.deadline = due

    def set_idle(self, idle: bool) -> None:
        """Move the connection's one deadline: keep-alive when idle, else read_timeout."""
        self.idle = idle
        if idle:
            if self.context.terminated.is_set():
                self.drain()
            else:
                self._set_due(trio.current_time() + self._keep_alive)
        else:
            self._set_due(trio.current_time() + self._read_timeout)

    def head_started(self) -> None:
        """A request head began on an idle connection: all of it must come in time."""
        self._set_due(trio.current_time() + self.header_timeout)

    def close(self) -> None:
        """Read no more; the connection closes when the read loop sees the cancel."""
        self.closing = True
        self.scope.cancel()

    # --- hypercorn's protocols ------------------------------------------------------

    async def _serve_hypercorn(
        self,
        nursery: trio.Nursery,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        alpn: str | None,
        data: bytes,
    ) -> None:
        task_group = LeanTaskGroup(nursery)
        if data.startswith(H2_PREFACE[: len(data)]) and data:
            alpn = "h2"  # prior knowledge: HTTP/2 from the first byte (and guarded from it)
        self.protocol = new_protocol(
            self.app,
            self.config,
            self.context,
            task_group,
            ConnectionState(self.state.copy()),
            ssl=ssl,
            client=client,
            server=server,
            send=self._protocol_send,
            alpn=alpn,
        )
        await self.protocol.initiate()
        self.scope = trio.CancelScope()  # (a scope serves one ``with``: after a hand-over)
        self.set_idle(True)
        await self._read_loop(data)
        task_group.end()

    async def _read_loop(self, data: bytes | bytearray = b"") -> None:
        """Feed hypercorn's protocol (``data`` first: bytes handed over) until the end."""
        assert self.protocol is not None
        budget = ControlFrameBudget()
        guarded = False
        with self.scope:
            while not self.closed:
                if not guarded:  # HTTP/2: from the start (ALPN, prior knowledge) or after h2c
                    guarded = guard_h2(self.protocol, budget.allow, NEVER_INDEXED)
                if data:
                    try:
                        await self.protocol.handle(RawData(bytes(data)))
                    except H2Flood as flood:
                        await self._calm_down(flood.goaway)
                        break
                    if self.closed:  # (the protocol closed the connection: nothing to read)
                        break
                if not self.idle and self._read_timeout != math.inf:
                    self.scope.deadline = trio.current_time() + self._read_timeout
                data = await self._receive()  # (b"" when the peer is gone too)
                self.fresh = False
                if not data:
                    await self.protocol.handle(RawData(b""))
                    break
        if not self.closed:
            await self.protocol.handle(Closed())
        await self._close()

    async def _calm_down(self, goaway: bytes) -> None:
        """A control-frame flood: GOAWAY (ENHANCE_YOUR_CALM) as far as it gets, then close."""
        log.warning(
            "HTTP/2 control-frame flood (PING/SETTINGS) from a client: GOAWAY "
            "ENHANCE_YOUR_CALM, closing its connection"
        )
        with trio.move_on_after(CALM_DOWN_WRITE):
            await self.write(goaway)  # a peer that reads nothing gets nothing: no wait
        self.close()

    def drain(self) -> None:
        """The server is draining: close now if idle (no checkpoint between check and close)."""
        if self.idle and (self.fresh or self._bytes_waiting()):
            self._set_due(min(self._due, trio.current_time() + FRESH_GRACE))
        elif self.idle:
            self.close()

    def _bytes_waiting(self) -> bool:
        """A request (or the client's FIN) is already in the socket, not yet read."""
        if self._raw_fd < 0:
            return False
        poller = select.poll()
        poller.register(self._raw_fd, select.POLLIN)
        return bool(poller.poll(0))

    async def _protocol_send(self, event: Event) -> None:
        """hypercorn's protocol speaks: bytes, the end of the connection, idle or busy."""
        if isinstance(event, RawData):
            data = self._coalesce(event.data)
            if data:
                await self.write(data)
        elif isinstance(event, Closed):
            if self.held and not self.closed:
                held, self.held = self.held, b""
                await self.write(held)
            await self._close()
        elif isinstance(event, Updated):
            self.set_idle(event.idle)
            if not event.idle and self.context.max_requests is not None:
                # hypercorn 0.18 never counts requests, so its max_requests is
                # inert; here a request starting counts.
                await self.context.mark_request()

    def _coalesce(self, data: bytes) -> bytes:
        """Hold a final HTTP/1.1 response head until its first body: one write, not two.

        hypercorn sends the first body (or the end of the message) right after
        the head, in the same call.
        """
        if self.held:
            data, self.held = self.held + data, b""
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 1"):
            self.held = _closing(data) if self.context.terminated.is_set() else data
            return b""
        return data

    async def write(self, data: bytes) -> None:
        """Write in order: straight to the socket when it takes it all, else send_all."""
        if self.closed or not data:
            return
        if self.fd >= 0 and not self.send_lock.locked():
            # Fast path: the kernel usually takes the whole write at once,
            # and then there is no need to go through the scheduler twice
            # (trio's send_all checkpoints before and after the syscall).
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                await self._lost()
                return
            if sent == len(data):
                return
            data = data[sent:]
        try:
            async with self.send_lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._lost()
        except BaseException:
            # Cancelled half-way (drain deadline, forced stop): the byte
            # stream is unusable now. Close it, then let the cancel go on.
            await self._lost()
            raise

    async def _lost(self) -> None:
        with trio.CancelScope(shield=True):
            await self._close()
            if self._on_lost is not None:
                await self._on_lost()
            elif self.protocol is not None:
                await self.protocol.handle(Closed())

    async def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.scope.cancel()
        if type(self.stream) is trio.SocketStream:
            close_socket(self.stream)
            return
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def close_socket(stream: trio.SocketStream) -> None:
    """A FIN after the last response (as hypercorn sends), then close: at once.

    ``send_eof()`` and ``aclose_forcefully()`` would do the same through two
    checkpoints, a cancel scope and a raised ``Cancelled``: a tenth of what a
    connection that makes one request costs (a burst of new connections is
    where that counts).
    """
    sock = stream.socket
    with contextlib.suppress(OSError):
        sock.shutdown(trio.socket.SHUT_WR)
    sock.close()


class ControlFrameBudget:
    """A token bucket of HTTP/2 control frames (PING and SETTINGS) a peer may send.

    A client needs a handful; ``BURST`` allows any real one, and the budget
    refills at ``RATE`` a second. A peer over it floods: each frame makes the
    server queue an ACK, and one that never reads them ties up the connection
    (the server's writes block, so it stops reading too). h2 has no such
    limit and hypercorn sets none.
    """

    BURST = 1000
    RATE = 100.0

    __slots__ = ("_at", "_tokens")

    def __init__(self) -> None:
        self._tokens = float(self.BURST)
        self._at = trio.current_time()

    def allow(self, frames: int) -> bool:
        now = trio.current_time()
        self._tokens = min(self.BURST, self._tokens + (now - self._at) * self.RATE) - frames
        self._at = now
        return self._tokens >= 0


def _closing(head: bytes) -> bytes:
    """An HTTP/1.1 response head that says ``connection: close`` (the drain is on)."""
    end = head.find(b"\r\n\r\n")
    if end < 0 or b"\r\nconnection:" in head[:end].lower():
        return head
    status_end = head.find(b"\r\n")
    return head[:status_end] + b"\r\nconnection: close" + head[status_end:]


class _Inbox:
    """One request's ASGI ``receive`` queue: hypercorn's memory channel, lighter.

    Bounded by ``max_app_queue_size`` like hypercorn's channel (a full inbox
    makes the connection wait: back-pressure on request bodies), but with no
    channel objects to build and no scheduler round trip when an event is
    already waiting.
    """

    __slots__ = ("_items", "_max", "_not_empty", "_not_full")

    def __init__(self, max_size: int) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._max = max(1, max_size)
        self._not_empty: trio.Event | None = None
        self._not_full: trio.Event | None = None

    async def put(self, event: Any) -> None:
        while len(self._items) >= self._max:
            self._not_full = trio.Event()
            await self._not_full.wait()
        self._items.append(event)
        if self._not_empty is not None:
            self._not_empty.set()
            self._not_empty = None

    def body_ended(self) -> bool:
        """The request body is all here (hypercorn queues ``more_body: False`` last)."""
        items = self._items
        return bool(items) and not items[-1].get("more_body", True)

    async def get(self) -> Any:
        while not self._items:
            self._not_empty = trio.Event()
            await self._not_empty.wait()
        item = self._items.popleft()
        if self._not_full is not None:
            self._not_full.set()
            self._not_full = None
        return item


IDLE_RUNNERS = 4  # HTTP/2 handler tasks a connection keeps waiting for its next stream


class LeanTaskGroup:
    """hypercorn's trio ``TaskGroup`` for one connection, lighter: a lighter inbox, and
    each HTTP request's handler in a *runner* (``_Handler``).

    A runner is a task that serves one stream after another inside one
    long-lived cancel scope, as the HTTP/1.1 protocol's runners do: a task
    and a cancel scope per stream were about 6 % of an HTTP/2 request (trio
    spawns a task for 45k instructions and enters a cancel scope for 48k).
    Each stream starts in a fresh copy of the connection's contextvars, as a
    task of its own would. A connection keeps ``IDLE_RUNNERS`` at most.
    WebSocket and lifespan-like scopes get a task of their own, as in hypercorn.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._idle: list[trio.lowlevel.Task] = []
        self._tasks: list[trio.CancelScope] = []  # of the tasks that end with the connection
        self._ended = False

    def end(self) -> None:
        """The connection has ended: so do its own tasks (HTTP/2's sending task, a
        WebSocket's handler). A stream's handler was told by ``http.disconnect``
        (``_Handler.put`` cancels it, unless its response had ended: it runs on)."""
        for scope in self._tasks:
            scope.cancel()
        for task in self._idle:  # parked runners end now, without a cancel
            trio.lowlevel.reschedule(task, outcome.Value(None))
        self._idle.clear()
        self._ended = True

    async def _until_end(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        scope = trio.CancelScope()
        self._tasks.append(scope)
        if self._ended:
            scope.cancel()
        with scope:
            await func(*args)

    async def spawn_app(
        self, app: AppWrapper, config: Config, scope: Any, send: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        inbox = _Inbox(config.max_app_queue_size)
        if scope.get("type") != "http":
            self._nursery.start_soon(self._until_end, run_app, app, config, scope, inbox.get, send)
            return inbox.put
        handler = _Handler(app, config, scope, inbox, send)
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop(), outcome.Value(handler))
        else:
            self._nursery.start_soon(self._runner, handler)
        return handler.put

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._nursery.start_soon(self._until_end, func, *args)

    async def _runner(self, handler: _Handler | None) -> None:
        task = trio.lowlevel.current_task()
        fresh = task.context.copy()  # the connection's contextvars, before any stream
        while handler is not None:
            scope = trio.CancelScope()
            ending: _Handler | None = None  # a handler whose stream ends outside the scope
            with scope:
                while handler is not None:
                    handler.scope = scope
                    handler.prepare()
                    try:
                        await run_app(
                            handler.app,
                            handler.config,
                            handler.asgi_scope,
                            handler.receive,
                            handler.send,  # (it keeps hypercorn's closing send(None): end())
                        )
                    finally:
                        handler.scope = None
                        if scope.cancel_called:
                            ending = handler  # (a cancelled scope cancels the end too)
                        else:
                            await handler.end()
                    handler = await self._park(task, fresh)
            handler = None
            if ending is not None:
                await ending.end()  # hypercorn's end of the stream, as after a task's cancel
                handler = await self._park(task, fresh)

    async def _park(self, task: trio.lowlevel.Task, fresh: contextvars.Context) -> _Handler | None:
        """Wait for the next stream; None: this runner is not needed any more."""
        if len(self._idle) >= IDLE_RUNNERS or self._ended:
            return None
        handler: _Handler = await park(self._idle, task, fresh)
        return handler


class _Handler:
    """One HTTP request's handler, run by a runner whose cancel scope the connection
    layer holds.

    hypercorn's protocols tell a request that its client went away (an HTTP/2
    ``RST_STREAM``, a closed connection) by queueing ``http.disconnect``, which
    a handler busy with the engine never reads. Here that message cancels the
    handler at once, unless its response has ended (ASGI lets a handler run on
    after that: background work). ``cancel`` is lent to the runner's
    middleware (the ``trio_launcher.cancel`` scope extension) for the request
    deadline and the body timeout, so no request needs a second scope or a
    task that watches its ``receive``; it cancels the runner's scope only
    while this handler runs in it (a runner serves many streams). The app
    call runs in the scope; hypercorn's end of the request (the ``send(None)``
    that ``run_app`` makes) is held back by ``send`` and sent by ``end()``:
    in the scope, unless the scope was cancelled, then after it.
    """

    __slots__ = ("_inbox", "_send", "app", "asgi_scope", "complete", "config", "receive", "scope")

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        scope: Any,
        inbox: _Inbox,
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.app = app
        self.config = config
        self.asgi_scope = scope
        self.receive = inbox.get
        self._inbox = inbox
        self._send = send
        self.scope: trio.CancelScope | None = None  # the runner's, while the app runs
        self.complete = False

    def cancel(self) -> None:
        """Cancel this handler, if it is still running."""
        if self.scope is not None:
            self.scope.cancel()

    def prepare(self) -> None:
        """Lend the bounds this handler's ``cancel`` and say whether its body is in."""
        extensions = self.asgi_scope.setdefault("extensions", {})
        extensions[CANCEL_EXTENSION] = self.cancel
        extensions[BODY_PENDING_EXTENSION] = not self._inbox.body_ended()

    async def end(self) -> None:
        await self._send(None)

    async def send(self, message: Any) -> None:
        if message is None:
            return  # hypercorn's end of the stream: ``end()`` sends it, after the scope if need be
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    async def put(self, message: Any) -> None:
        if message["type"] == "http.disconnect" and not self.complete:
            self.cancel()
        await self._inbox.put(message)


async def serve_connection(
    app: AppWrapper,
    config: Config,
    context: WorkerContext,
    lifespan_state: LifespanState,
    registry: set[Connection],
    http: str,
    header_timeout: float,
    answers_itself: Callable[[dict[str, Any]], bool] | None,
    door: Door | None,
    stream: trio.abc.Stream,
    first: bytes,
) -> None:
    """Serve one accepted stream (``first``: its first bytes, let in by the door, or
    b""); anything it raises stays with it (see ``contained``)."""
    try:
        await Connection(
            app,
            config,
            context,
            lifespan_state,
            stream,
            registry,
            http,
            header_timeout,
            answers_itself,
            door,
            first,
        ).run()
    except* Exception as group:  # (inline: a context manager per connection costs 3 %)
        await _contain(stream, group)


@contextlib.asynccontextmanager
async def contained(stream: trio.abc.Stream) -> AsyncIterator[None]:
    """One connection's failure is that connection's problem only: log, close, go on.

    ``trio.Cancelled`` is never caught (``except*`` on ``Exception``).
    """
    try:
        yield
    except* Exception as group:
        await _contain(stream, group)


async def _contain(stream: trio.abc.Stream, group: BaseExceptionGroup[Exception]) -> None:
    log.error(
        "connection error contained: %s",
        "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions),
        exc_info=log.isEnabledFor(logging.DEBUG),
    )
    await trio.aclose_forcefully(stream)


def drain_all(registry: set[Connection]) -> None:
    """Close every idle connection at once (the drain has started)."""
    for connection in list(registry):
        connection.drain()
