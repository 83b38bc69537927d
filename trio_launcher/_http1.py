"""HTTP/1.1 for ASGI on httptools: bytes in, ASGI events and bytes out.

hypercorn's HTTP/1.1 runs on h11, a pure-Python parser with an event object
per step: about a third of the lean transport's time went there, and h11 (as
hypercorn drives it) answered a request carrying both Content-Length and
Transfer-Encoding as *two* requests on a connection that stayed open. This
module is the HTTP/1.1 protocol the lean transport drives instead. The
parsing is llhttp's (through httptools, the parser of Node.js and of
uvicorn's fast path); the rest is small and lives here:

* **Strict framing (RFC 9112).** llhttp refuses Content-Length together with
  Transfer-Encoding, bare LF, obs-fold, invalid chunk sizes and duplicate
  Content-Length. On top of it: HTTP versions other than 1.0 and 1.1, a
  missing Host in HTTP/1.1 and a repeated Host are refused, and the head
  size is bounded (``config.h11_max_incomplete_size``, as for h11). Every
  refusal is answered (400, 431, 408) with ``connection: close``, and the
  connection closes: after a framing error nobody knows where the next
  request starts, and guessing is what request smuggling exploits.
* **One request at a time, in order.** Pipelined requests are parsed as they
  arrive but answered one after the other; while one waits its turn the
  socket is not read (uvicorn does the same). A request that says
  ``Connection: close`` is answered, and what follows it is discarded. An
  error in a pipelined request is answered after the requests before it.
* **Bounded buffering.** A request body is handed to the app as it arrives;
  when more than ``HIGH_WATER`` bytes wait for the app, the connection stops
  reading the socket (the client is back-pressured by TCP) until the app
  catches up. ``Expect: 100-continue`` is answered only when the app asks for
  the body; a response that completes before the body was read closes the
  connection instead of keeping an unread body in the way.
* **Responses in one write.** The response head is held until the first
  body message and both go out together; a response given in one body
  message gets a Content-Length, a streamed one is chunked (HTTP/1.0: ends
  with the connection). HEAD, 1xx, 204 and 304 responses carry no body. An
  app header ``connection: close`` closes the connection after the response.
* **No per-request machinery.** No channel, no lock, no cancel scope, no
  timer and no task per request: the body is a bytearray, waiting is one
  ``trio.Event`` made only when the app has to wait, the read deadlines are
  the connection's (see ``_transport``).
* **Handlers.** The app runs in a *runner*, a task that serves one request
  after another: when its app call returns it waits for the next request
  instead of ending, and waking it costs far less than starting a task
  (spawning a task per request was about a tenth of a hello-world request).
  A request that arrives while every runner is busy (the previous app call
  still running after its response ended: background work) gets a new
  runner; a connection keeps ``IDLE_RUNNERS`` at most. Each request starts
  in a fresh copy of the connection's contextvars, as a task of its own
  would: a value one request sets is never seen by the next. A runner
  serves its requests inside one long-lived cancel scope and lends its
  ``cancel`` to the runner's middleware (the ``trio_launcher.cancel`` scope
  extension) for the request deadline (``_bounds``): cancelling it cancels
  that request's handler; the runner then starts a new scope.

* **Answers without the app.** A request the runner's middleware answers
  itself (the health and metrics paths, a shed 503, a 431: its
  ``answers_itself``) is called at once in the connection's own task when no
  runner is waiting: no runner task, no scheduler round. Under overload that
  is most requests on new connections, and a health probe on a connection of
  its own is answered in the round its bytes arrive.

A client that goes away is noticed by the transport (EOF or a failed write):
the app's ``receive`` answers ``http.disconnect``, the access log records
status 499 for a response that had not finished, and the transport cancels
that response's handler (``cancel_cut``). The handlers of responses that
ended run on: ASGI allows background work after the response.

What this module does not do it hands back: an ``Upgrade`` request (WebSocket,
h2c, CONNECT) and the HTTP/2 preface go to hypercorn's own protocols with the
bytes received so far (``HTTP1.upgrade``).
"""

from __future__ import annotations

import contextvars
import re
import time
import weakref
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, ClassVar, Protocol
from urllib.parse import unquote

import httptools
import outcome
import trio

from ._bounds import BODY_PENDING_EXTENSION, CANCEL_EXTENSION
from ._hypercorn import AppWrapper, Config, WorkerContext, logs_access, set_task_context
from ._logging import HEADER_EXTENSION, REQUEST_ID_EXTENSION, REQUEST_ID_HEADER, header_value

HIGH_WATER = 2**16  # request body bytes held for the app before the socket is left unread
IDLE_RUNNERS = 2  # handler tasks a connection keeps waiting for its next request

_STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_UNKNOWN_CODING = "Request has invalid `Transfer-Encoding`"  # llhttp's words


_NAMES: dict[Any, bytes] = {}  # response header names seen and valid -> lower case


_OWS = (b" ", b"\t")  # a value's first or last byte that needs .strip()


def _refuse_bad_value(headers: Any) -> None:
    """Name the response header whose value has a control character (CR, LF...)."""
    for name, value in headers:
        if _BAD_VALUE.search(bytes(value)):
            raise RuntimeError(f"invalid response header value {name!r}: {bytes(value)!r}")


def _check_name(name: Any) -> bytes:
    """A response header name must be a token (RFC 9110 5.1); remember the good ones."""
    clean = bytes(name).strip()
    if not _TOKEN.fullmatch(clean) or clean != name:
        raise RuntimeError(f"invalid response header name {name!r}")
    if len(_NAMES) < 1024:
        _NAMES[clean] = clean.lower()
    return clean.lower()


class Transport(Protocol):
    """What the protocol needs from its connection (``_transport.Connection``)."""

    async def write(self, data: bytes) -> None:
        """Write bytes in order; returns once the kernel has them (or the peer is gone)."""

    def set_idle(self, idle: bool) -> None:
        """A request started (False) or the connection waits for the next one (True)."""

    def head_started(self) -> None:
        """The first byte of a request head arrived on an idle connection."""

    def close(self) -> None:
        """Close the connection once the current write is done; read no more."""


class _Reject(Exception):
    """A request refused after parsing: answer ``status`` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _DefaultHeaders:
    """``config.response_headers("h11")`` (date, server, alt-svc), rebuilt once a second;
    one per ``Config`` (``for_config``), shared by its connections."""

    _shared: ClassVar[weakref.WeakKeyDictionary[Config, _DefaultHeaders]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, config: Config) -> None:
        self.config = weakref.ref(config)  # (the shared table's value: no strong reference)
        self.second = -1
        self.block = b""

    @classmethod
    def for_config(cls, config: Config) -> _DefaultHeaders:
        shared = cls._shared.get(config)
        if shared is None:
            shared = cls._shared[config] = cls(config)
        return shared

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            config = self.config()
            assert config is not None  # (a connection holds its config)
            self.block = b"".join(
                b"%s: %s\r\n" % (name, value) for name, value in config.response_headers("h11")
            )
        return self.block


def default_headers(config: Config) -> bytes:
    """The header lines every response of ``config`` carries (date, server, alt-svc)."""
    return _DefaultHeaders.for_config(config).get()


def status_line(status: int) -> bytes:
    """``HTTP/1.1 503 Service Unavailable\r\n``."""
    return _STATUS.get(status) or b"HTTP/1.1 %d \r\n" % status


def error_response(status: int, defaults: bytes) -> bytes:
    """A body-less response that closes the connection (for refusals and timeouts)."""
    return _STATUS[status] + b"content-length: 0\r\nconnection: close\r\n" + defaults + b"\r\n"


async def _access(config: Config, scope: Any, response: Any, start: float) -> None:
    """One access log line through hypercorn's logger (its format, atoms, and subclasses)."""
    await config.log.access(scope, response, time.time() - start)


async def park(idle: list[trio.lowlevel.Task], task: trio.lowlevel.Task, fresh: Any) -> Any:
    """A runner waits in ``idle`` for its next piece of work, which arrives by
    ``trio.lowlevel.reschedule(task, outcome.Value(work))``; the work starts in a
    fresh copy of ``fresh`` (the contextvars a task of its own would have)."""
    set_task_context(task, fresh.copy())
    idle.append(task)

    def abort(_: Any) -> trio.lowlevel.Abort:
        idle.remove(task)
        return trio.lowlevel.Abort.SUCCEEDED

    return await trio.lowlevel.wait_task_rescheduled(abort)


class HTTP1:
    """One connection's HTTP/1.1 protocol state.

    ``data_received`` parses bytes and starts the app (a task in ``nursery``)
    for each request in turn; the app's ``send`` turns messages into bytes
    for ``transport.write``. The transport reads while ``paused`` is False,
    and hands the connection over when ``upgrade`` is set and ``cycle`` is None.
    """

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        nursery: trio.Nursery,
        transport: Transport,
        *,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        state: dict[str, Any],
        answers_itself: Callable[[dict[str, Any]], bool] | None = None,
        arrived: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.arrived = arrived  # called once, as the first request reaches the app
        self.answers_itself = answers_itself
        self.config = config
        self.context = context
        self.nursery = nursery
        self.transport = transport
        self.scheme = "https" if ssl else "http"
        self.client = client
        self.server = server
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.defaults = _DefaultHeaders.for_config(config)
        self.logs_access = logs_access(config)  # (else no summary, no call: 1.5 % of hello)
        self.cycle: Cycle | None = None  # the request being answered
        self.pipeline: list[Cycle] = []  # parsed, waiting (a list: a deque is 600 bytes)
        self.receiving: Cycle | None = None  # the request whose body is arriving
        self.error: int | None = None  # a refusal to send once the requests before it are done
        self.upgrade: bytes | None = None  # bytes for hypercorn's protocol (Upgrade, HTTP/2)
        self.lost = False
        self.in_head = False
        self.requests = 0
        self._resume: trio.Event | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_bytes = 0
        self._max_head = config.h11_max_incomplete_size
        self._raw_names = config.h11_pass_raw_headers
        self._first = True
        self._idle: list[trio.lowlevel.Task] = []  # runners waiting for the next request

    # --- the transport's side ------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while the socket must not be read (back-pressure, a turn to wait for)."""
        return bool(
            self.pipeline
            or self.error is not None
            or self.upgrade is not None
            or (self.receiving is not None and len(self.receiving.body) > HIGH_WATER)
        )

    async def wait_resumable(self) -> None:
        """Wait until something changed that may unpause reading."""
        self._resume = trio.Event()
        await self._resume.wait()

    def _wake(self) -> None:
        if self._resume is not None:
            self._resume.set()
            self._resume = None

    async def data_received(self, data: bytes | bytearray) -> None:
        """Parse bytes from the client; start, queue or refuse the requests in them."""
        if self._first:
            self._first = False
            if data[:3] == b"PRI" or b"PRI".startswith(data):  # the HTTP/2 preface
                self.upgrade = bytes(data)
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._hand_over(bytes(data[upgrade.args[0] :]))
        except httptools.HttpParserCallbackError as error:
            reason = error.__context__
            if not isinstance(reason, _Reject):
                raise
            await self._refuse(reason.status)
        except httptools.HttpParserInvalidMethodError:
            await self._refuse(501)  # RFC 9110 9.1: a method we do not know (case-sensitive)
        except httptools.HttpParserError as error:
            # RFC 9112 6.1: a transfer coding we do not know is 501, any other error 400.
            await self._refuse(501 if str(error).startswith(_UNKNOWN_CODING) else 400)
        else:
            if self.in_head:  # a head still arriving: bound what httptools buffers for it
                self._head_bytes += len(data)
                if self._head_bytes > self._max_head:
                    await self._refuse(431)
        if self.cycle is None and self.pipeline and not self.lost:
            cycle = self._start_next(at_once=True)
            if cycle is not None:  # answered without the app: here, no runner
                await self._call(cycle)

    def timed_out(self) -> bytes | None:
        """The connection's deadline passed: the 408 to send, if a head was arriving."""
        if self.in_head and self.cycle is None:
            return error_response(408, self.defaults.get())
        return None

    async def connection_lost(self, status: int | None = 499) -> None:
        """The client is gone (or the server closes): wake the app, log the cut response."""
        if self.lost:
            return
        self.lost = True
        cycle, self.cycle = self.cycle, None
        self.pipeline.clear()
        self._wake()
        for task in self._idle:  # parked runners end now, without a cancel
            trio.lowlevel.reschedule(task, outcome.Value(None))
        self._idle.clear()
        if cycle is not None:
            cycle.disconnected = True
            cycle.wake()
            if not cycle.complete:
                self._cut = cycle
                summary = {"status": status, "headers": cycle.response_headers}
                await _access(self.config, cycle.scope, summary if status else None, cycle.start)

    _cut: Cycle | None = None

    def cancel_cut(self) -> None:
        """The connection has ended: cancel the handler of the response it cut short
        (one that has not started yet is cancelled as it starts: ``_runner``). The
        handlers of responses that ended run on: background work."""
        cycle = self._cut
        if cycle is not None:
            cancel = cycle.scope["extensions"].get(CANCEL_EXTENSION)
            if cancel is not None:
                cancel()

    def release(self) -> None:
        """The connection has ended and its tasks with it: let the parser go (it holds
        this protocol's methods: a cycle only the garbage collector would free)."""
        del self.parser

    # --- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_bytes = 0
        if self.cycle is None and not self.pipeline:
            self.transport.head_started()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # not a chunked body's trailer (discarded)
            self._head_size += len(name) + len(value) + 4
            self._headers.append((name if self._raw_names else name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Reject(400, f"HTTP version {version}")
        if self._head_size + len(self._url) > self._max_head:
            raise _Reject(431, "request head too large")
        hosts = 0
        expect = False
        request_id = None
        raw = self._raw_names
        for name, value in self._headers:
            if raw:
                name = name.lower()
            if name == b"host":
                hosts += 1
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
            elif name == b"x-request-id" and request_id is None:
                request_id = value  # the first one (``REQUEST_ID_EXTENSION``)
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise _Reject(400, "a request needs exactly one Host header")
        cycle = Cycle(self, self._scope(version, request_id or b""), parser.should_keep_alive())
        cycle.expect_100 = expect and version == "1.1"
        self.receiving = cycle
        self.pipeline.append(cycle)

    def on_body(self, body: bytes) -> None:
        cycle = self.receiving
        if cycle is not None:
            cycle.body += body
            cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.receiving
        if cycle is not None:
            cycle.more_body = False
            cycle.wake()
            self.receiving = None

    # --- requests and responses ------------------------------------------------

    def _scope(self, version: str, request_id: bytes) -> dict[str, Any]:
        url = self._url
        path, _, query = url.partition(b"?")
        if path[:1] != b"/" and b"://" in path:  # absolute-form: keep the path only
            path = b"/" + path.split(b"/", 3)[-1] if path.count(b"/") >= 3 else b"/"
        text = path.decode("ascii")
        return {
            "type": "http",
            "http_version": version,
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": self.parser.get_method().decode("ascii"),
            "scheme": self.scheme,
            "path": unquote(text) if "%" in text else text,
            "raw_path": path,
            "query_string": query,
            "root_path": self.config.root_path,
            "headers": self._headers,
            "client": self.client,
            "server": self.server,
            "state": self.state.copy(),
            "extensions": {REQUEST_ID_EXTENSION: request_id},
        }

    def _start_next(self, at_once: bool = False) -> Cycle | None:
        """Start the next request: in a runner; or, with ``at_once``, return it if the
        server answers it without the app (``answers_itself``): the caller runs it."""
        cycle = self.pipeline.pop(0)
        self.cycle = cycle
        self.requests += 1
        self.transport.set_idle(False)
        if self.config.server_names and not self._server_name_ok(cycle):
            self.nursery.start_soon(cycle.refuse, 404)
        elif self._idle:  # (a parked runner is cheap: no need to ask)
            trio.lowlevel.reschedule(self._idle.pop(), outcome.Value(cycle))
        elif at_once and self.answers_itself is not None and self.answers_itself(cycle.scope):
            self._wake()
            return cycle
        else:
            self.nursery.start_soon(self._runner, cycle)
        self._wake()
        return None

    async def _runner(self, cycle: Cycle) -> None:
        """Run the app for one request after another (see "Handlers" above)."""
        task = trio.lowlevel.current_task()
        fresh = task.context.copy()  # the connection's contextvars, before any request
        next_cycle: Cycle | None = cycle
        while next_cycle is not None:
            scope = trio.CancelScope()
            cancel = scope.cancel
            with scope:
                while next_cycle is not None:
                    extensions = next_cycle.scope["extensions"]
                    extensions[CANCEL_EXTENSION] = cancel
                    extensions[BODY_PENDING_EXTENSION] = next_cycle.more_body
                    if next_cycle.disconnected and not next_cycle.complete:
                        cancel()  # its connection ended before it started
                    await self._call(next_cycle)
                    next_cycle = await self._park(task, fresh)
            if scope.cancelled_caught:  # a request deadline (the 504 is sent): a new scope
                next_cycle = await self._park(task, fresh)

    async def _park(self, task: trio.lowlevel.Task, fresh: contextvars.Context) -> Cycle | None:
        """Wait for the next request; None: this runner is not needed any more."""
        if len(self._idle) >= IDLE_RUNNERS or self.lost:
            return None
        cycle: Cycle = await park(self._idle, task, fresh)
        return cycle

    def _server_name_ok(self, cycle: Cycle) -> bool:
        for name, value in cycle.scope["headers"]:
            if name.lower() == b"host":
                return value.decode("latin-1") in self.config.server_names
        return False

    async def _call(self, cycle: Cycle) -> None:
        if self.arrived is not None:  # (the door counts it against the limit till now)
            arrived, self.arrived = self.arrived, None
            arrived()
        if self.context.max_requests is not None:
            await self.context.mark_request()
        try:
            await self.app(
                cycle.scope,  # type: ignore[arg-type]
                cycle.receive,  # type: ignore[arg-type]
                cycle.send,  # type: ignore[arg-type]
                trio.to_thread.run_sync,
                trio.from_thread.run,
            )
        except trio.Cancelled:
            raise
        except BaseExceptionGroup as group:
            if group.split(trio.Cancelled)[1] is None:
                raise
            await self.config.log.exception("Error in ASGI Framework")
        except Exception:
            await self.config.log.exception("Error in ASGI Framework")
        await cycle.app_done()

    async def response_done(self, cycle: Cycle) -> None:
        """A response ended: next request, idle, or close."""
        if self.cycle is not cycle:
            return
        self.cycle = None
        if not cycle.keep_alive or self.context.terminated.is_set():
            self.pipeline.clear()
            self.transport.close()
        elif self.pipeline:
            self._start_next()
        elif self.error is not None:
            await self.transport.write(error_response(self.error, self.defaults.get()))
            self.transport.close()
        else:
            self.transport.set_idle(True)
            self._wake()

    async def _refuse(self, status: int) -> None:
        """A request that cannot be parsed or served: answer in turn, then close."""
        receiving = self.receiving
        if receiving is not None and receiving is self.cycle:
            # The bad bytes are in the body of the request being answered.
            self.receiving = None
            receiving.disconnected = True
            receiving.wake()
            if not receiving.started:
                receiving.complete = True
                await self.transport.write(error_response(status, self.defaults.get()))
            self.transport.close()
            return
        if receiving is not None:
            self.pipeline.remove(receiving)
            self.receiving = None
        self.in_head = False
        if self.cycle is None and not self.pipeline:
            await self.transport.write(error_response(status, self.defaults.get()))
            self.transport.close()
        else:
            self.error = status  # answered after the requests before it

    def _hand_over(self, rest: bytes) -> None:
        """An Upgrade request: rebuild its head for hypercorn's protocol, with what followed."""
        cycle = self.pipeline.pop()
        self.receiving = None
        scope = cycle.scope
        head = [
            b"%s %s HTTP/%s\r\n"
            % (scope["method"].encode(), self._url, scope["http_version"].encode())
        ]
        head += [b"%s: %s\r\n" % header for header in scope["headers"]]
        self.upgrade = b"".join(head) + b"\r\n" + rest
        self._wake()


class Cycle:
    """One request and its response: the app's ``receive`` and ``send``."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "delivered",
        "disconnected",
        "expect_100",
        "head",
        "keep_alive",
        "left",
        "more_body",
        "no_body",
        "protocol",
        "response_headers",
        "scope",
        "start",
        "started",
        "status",
        "waiter",
    )

    def __init__(self, protocol: HTTP1, scope: dict[str, Any], keep_alive: bool) -> None:
        self.protocol = protocol
        self.scope = scope
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.delivered = False
        self.disconnected = False
        self.expect_100 = False
        self.waiter: trio.Event | None = None
        self.started = False
        self.complete = False
        self.status = 0
        self.head = b""
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.no_body = False
        self.left: int | None = None  # bytes still owed under the app's Content-Length
        self.start = time.time()

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None

    async def receive(self) -> dict[str, Any]:
        """ASGI ``receive``: the body as it arrives, then ``http.disconnect``."""
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if self.body or (not self.more_body and not self.delivered):
                body = bytes(self.body)
                self.body.clear()
                if self.more_body:
                    self.protocol._wake()  # below the high-water mark again
                else:
                    self.delivered = True  # from now on: wait for the disconnect
                return {"type": "http.request", "body": body, "more_body": self.more_body}
            if self.expect_100 and not self.started:
                self.expect_100 = False
                await self.protocol.transport.write(_CONTINUE)
            self.waiter = trio.Event()
            await self.waiter.wait()

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI ``send``: a response start, then body messages."""
        kind = message["type"]
        if kind == "http.response.body" and self.started and not self.complete:
            await self._body(message.get("body", b""), message.get("more_body", False))
        elif kind == "http.response.start" and not self.started:
            self._start(message)
        elif self.protocol.lost or self.disconnected:
            return  # the client is gone: nothing to say to it
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in this state of the response")

    def _start(self, message: dict[str, Any]) -> None:
        status = int(message["status"])
        if not 200 <= status <= 999:
            raise RuntimeError(f"invalid response status {status}")
        headers = message.get("headers") or []
        self.response_headers = headers
        lines = [_STATUS.get(status) or b"HTTP/1.1 %d \r\n" % status]
        values = []
        names = _NAMES
        for name, value in headers:
            lower = names.get(name)
            if lower is None:
                lower = _check_name(name)
            if type(value) is not bytes:
                value = bytes(value)
            if value[:1] in _OWS or value[-1:] in _OWS:
                value = value.strip(b" \t")  # OWS (RFC 9110 5.6.3)
            if lower == b"content-length":
                self.left = int(value)
            elif lower == b"transfer-encoding":
                continue  # the framing is ours to choose
            elif lower == b"connection":
                # Ours to say, once (below); the app's close is honoured.
                if b"close" in value.lower():
                    self.keep_alive = False
                continue
            lines += (name, b": ", value, b"\r\n")
            values.append(value)
        if _BAD_VALUE.search(b"".join(values)):  # one pass over all the values
            _refuse_bad_value(headers)  # CR/LF would split the response
        self.head = b"".join(lines)
        self.started = True
        self.status = status
        self.no_body = self.scope["method"] == "HEAD" or status in (204, 304) or status < 200

    async def _body(self, body: bytes, more: bool) -> None:
        data = b""
        if self.head:
            data = self._finish_head(len(body), more)
        if body and not self.no_body:
            if self.left is not None:
                self.left -= len(body)
                if self.left < 0:
                    raise RuntimeError("the response body is longer than its Content-Length")
            if self.chunked:
                data += b"%x\r\n%s\r\n" % (len(body), body)
            else:
                data += body
        if not more:
            self.complete = True
            self.wake()  # a receive() waiting for the disconnect gets it now
            if self.chunked:
                data += _LAST_CHUNK
            elif self.left and not self.no_body:
                self.keep_alive = False  # shorter than its Content-Length: framing is lost
        await self.protocol.transport.write(data)
        if not more:
            protocol = self.protocol
            if protocol.logs_access:
                summary = {"status": self.status, "headers": self.response_headers}
                await _access(protocol.config, self.scope, summary, self.start)
            if self.more_body:  # the request body was never read to its end
                self.keep_alive = False
            await protocol.response_done(self)

    def _finish_head(self, size: int, more: bool) -> bytes:
        """The held head, completed with framing and connection headers."""
        protocol = self.protocol
        head = self.head
        self.head = b""
        extra = b""
        if self.left is None and not self.no_body:
            if not more:
                self.left = size
                extra = b"content-length: %d\r\n" % size
            elif self.scope["http_version"] == "1.1":
                self.chunked = True
                extra = b"transfer-encoding: chunked\r\n"
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends with the connection
        if protocol.requests >= protocol.config.keep_alive_max_requests:
            self.keep_alive = False
        if protocol.context.terminated.is_set() or self.more_body:
            self.keep_alive = False  # draining, or a request body not read to its end
        if not self.keep_alive:
            extra += b"connection: close\r\n"
        elif self.scope["http_version"] == "1.0":
            extra += b"connection: keep-alive\r\n"
        ours = self.scope["extensions"].get(HEADER_EXTENSION)
        if ours is not None:  # the request id's line (``HEADER_EXTENSION``): valid already
            extra += ours
            if protocol.logs_access:  # (else nothing reads them)
                header = (REQUEST_ID_HEADER, header_value(ours))
                self.response_headers = [*self.response_headers, header]
        return head + extra + protocol.defaults.get() + b"\r\n"

    async def refuse(self, status: int) -> None:
        """Answer ``status`` with no body and close (unknown server name)."""
        self.keep_alive = False
        self._start({"status": status, "headers": [(b"content-length", b"0")]})
        await self._body(b"", False)

    async def app_done(self) -> None:
        """The app returned: a response it never started is a 500; one it left unfinished is cut."""
        if self.complete or self.protocol.lost:
            return
        if not self.started:
            await self.refuse(500)
        else:
            self.protocol.transport.close()  # the access log line comes with the close
