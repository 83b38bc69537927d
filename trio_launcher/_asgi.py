"""The ASGI layer the runner puts around any app.

It answers the health path itself (the app may be busy or dead, the runner
knows better), refuses request heads over the limits with 431 for every
protocol (hypercorn has no header-count limit at all), bounds every request
(load shedding, a deadline for the response to start, a minimum rate for the
request body) and handles engine errors.

Bounds live here, not in the connection layer, because here they mean the
same thing for every protocol: one HTTP/2 stream is one request, exactly as
one HTTP/1.1 request is, and the handler is a trio task we can cancel.

* **Load shedding** (``limit_concurrency``) counts *requests* in flight, not
  connections: 2000 clients that connect at once are 2000 connections, but
  only the requests beyond the limit are refused (uvicorn counts connections
  and refused all 2000). A refused request gets 503, ``Retry-After`` and a
  JSON body at once; nothing is queued, so overload costs no memory and the
  health path (exempt from the limit) stays fast.
* **Request deadline** (``request_timeout``): the handler runs in a cancel
  scope whose deadline is S seconds away until the response starts; then
  the deadline is lifted, so a started response (a stream) is never cut by
  it. A missed deadline cancels the handler (its nurseries too: it is plain
  trio cancellation) and answers 504 with a JSON body.
* **Body timeout** (``body_timeout``, mod_reqtimeout's rule): only the time
  the handler spends *waiting* in ``receive()`` for body bytes counts, and
  it may not exceed ``body_timeout + received / BODY_MIN_RATE`` seconds in
  total, nor ``body_timeout`` seconds for any one wait. A client that keeps
  up ``BODY_MIN_RATE`` (1 KiB/s) on average is never cut; a trickling or
  stalled one is answered 408 (with ``connection: close`` on HTTP/1.x) and
  the handler is cancelled. A handler that stops reading to think does not
  burn the client's allowance.
* **In-flight table**: every request is in it from arrival to the handler's
  return; the health JSON reports ``in_flight`` and ``oldest_request_s`` and
  a drain that reaches its deadline names what it cut.

vLLM registers FastAPI exception handlers so that an engine error becomes a
500 and a dead engine stops the server. We do the same below any framework,
as plain ASGI middleware:

* ``EngineDeadError``, ``EngineGenerateError`` and any type the user adds
  become a 500 with a small JSON body, if the response has not started;
* after any error from the app, the runner's dead check runs: an
  ``EngineDeadError`` or an engine that reports itself dead starts the drain;
* after a streaming response has started its status cannot change; the error
  propagates, hypercorn ends the response (the client sees a cut stream, not
  a fake clean end) and the dead check has still run.

Errors raised inside the app's own nurseries arrive as exception groups; they
are split by type so that ``trio.Cancelled`` is never swallowed, and a plain
error stays plain (one traceback in the log, not an ExceptionGroup tree).

Frameworks that turn handler exceptions into their own 500 (Quart does) hide
them from any middleware; ``trio_launcher.quart`` hooks into Quart for that.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import trio

from ._errors import EngineDeadError, EngineGenerateError

log = logging.getLogger("trio_launcher")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENGINE_ERRORS: tuple[type[BaseException], ...] = (EngineDeadError, EngineGenerateError)


@dataclass(frozen=True)
class Limits:
    """Request-head limits applied to every protocol (HTTP/1.1 and HTTP/2).

    Attributes:
        max_header_count: most request headers; more get 431.
        max_head_size: most bytes in the request line/path and headers; more get 431.
    """

    max_header_count: int | None = 256
    max_head_size: int | None = None


BODY_MIN_RATE = 1024.0
"""Bytes per second a request body must keep up on average, after the allowance."""
RETRY_AFTER = b"1"


@dataclass(frozen=True)
class Bounds:
    """Per-request bounds (see the module docstring for the rules).

    Attributes:
        request_timeout: seconds for the response to start; None: no deadline.
        limit_concurrency: most requests in flight; more get 503 at once.
        body_timeout: the request body's allowance in seconds; None: no limit.
    """

    request_timeout: float | None = None
    limit_concurrency: int | None = None
    body_timeout: float | None = 60.0


class InFlight:
    """The requests now in the app: arrival time, method and path, oldest first."""

    def __init__(self) -> None:
        self._requests: dict[int, tuple[float, str, str]] = {}
        self._next = 0
        self.shed = 0  # requests refused by the concurrency limit

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, method: str, path: str) -> int:
        key = self._next = self._next + 1
        self._requests[key] = (time.monotonic(), method, path)
        return key

    def remove(self, key: int) -> None:
        del self._requests[key]

    def oldest_age(self) -> float:
        """Seconds since the oldest request in flight arrived (0 when none is)."""
        for arrived, _, _ in self._requests.values():  # insertion order: oldest first
            return time.monotonic() - arrived
        return 0.0

    def describe(self, most: int = 5) -> str:
        """``GET /a, POST /b (and 3 more)``: the oldest requests in flight."""
        items = [f"{method} {path}" for _, method, path in list(self._requests.values())[:most]]
        if len(self._requests) > most:
            items.append(f"and {len(self._requests) - most} more")
        return ", ".join(items)


class RunnerMiddleware:
    """The runner's layer around the app: health, head limits, engine errors.

    Args:
        app: the ASGI app to wrap.
        on_app_error: called with every exception the app raised (the dead
            check); must not raise.
        error_types: the exception types answered with a 500 JSON body.
        health_path: a GET/HEAD path the runner answers itself.
        health: returns ``(status, body)`` for the health path.
        limits: request-head limits.
        bounds: per-request bounds: concurrency, request deadline, body timeout.
        in_flight: the in-flight table to keep (the runner reads it).
    """

    def __init__(
        self,
        app: ASGIApp,
        on_app_error: Callable[[BaseException], None],
        error_types: tuple[type[BaseException], ...] = ENGINE_ERRORS,
        *,
        health_path: str | None = None,
        health: Callable[[], tuple[int, dict[str, Any]]] = lambda: (200, {}),
        limits: Limits = Limits(),
        bounds: Bounds = Bounds(),
        in_flight: InFlight | None = None,
    ) -> None:
        self.app = app
        self.on_app_error = on_app_error
        self.error_types = error_types
        self.health_path = health_path
        self.health = health
        self.limits = limits
        self.bounds = bounds
        self.in_flight = in_flight if in_flight is not None else InFlight()
        self._shed_body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self._over_limit(scope)
        if refusal is not None:
            log.warning("431 for %s %s: %s", scope.get("method", "GET"), scope.get("path"),
                        refusal)  # fmt: skip
            if scope["type"] == "http":
                # HTTP/1.x: the connection closes after a 431 (RFC 9110 15.5.1: the
                # rest of the head may still be arriving; nobody knows where it ends).
                close = [(b"connection", b"close")] if _is_http1(scope) else []
                error = {"error": {"type": "HeadersTooLarge", "message": refusal}}
                await send_json(send, 431, error, extra_headers=close)
            else:
                await send({"type": "websocket.close", "code": 1009})
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        if scope["path"] == self.health_path and scope["method"] in ("GET", "HEAD"):
            status, body = self.health()
            body["in_flight"] = len(self.in_flight)
            body["oldest_request_s"] = round(self.in_flight.oldest_age(), 3)
            await send_json(send, status, body, head_only=scope["method"] == "HEAD")
            return
        in_flight = self.in_flight
        limit = self.bounds.limit_concurrency
        if limit is not None and len(in_flight) >= limit:
            in_flight.shed += 1
            await self._shed(scope, send, limit)
            return
        key = in_flight.add(scope["method"], scope["path"])
        try:
            bounds = self.bounds
            if (
                bounds.request_timeout is None
                and scope.get("http_version") != "2"
                and (bounds.body_timeout is None or not _has_body(scope))
            ):
                # Nothing to bound: no cancel scope (entering one costs more than
                # the rest of this middleware; hello world pays nothing for it).
                await self._call_plain(scope, receive, send)
            else:
                await self._call_bounded(scope, receive, send)
        finally:
            in_flight.remove(key)

    async def _shed(self, scope: Scope, send: Send, limit: int) -> None:
        """503 at once; on HTTP/1.x the connection closes too (it frees the most memory)."""
        body = self._shed_body
        if body is None:
            message = f"{limit} requests in flight, the limit; retry later"
            body = self._shed_body = json.dumps(
                {"error": {"type": "Overloaded", "message": message}}
            ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", RETRY_AFTER),
        ]
        if _is_http1(scope):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _over_limit(self, scope: Scope) -> str | None:
        headers = scope.get("headers") or ()
        limits = self.limits
        if limits.max_header_count is not None and len(headers) > limits.max_header_count:
            return f"{len(headers)} headers, the limit is {limits.max_header_count}"
        if limits.max_head_size is not None:
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) + 4 for name, value in headers)
            if size > limits.max_head_size:
                return f"request head of {size} bytes, the limit is {limits.max_head_size}"
        return None

    async def _call_plain(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def runner_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self._call_guarded(scope, receive, runner_send, lambda: started)

    async def _call_bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = complete = False
        bounds = self.bounds
        deadline = trio.CancelScope()
        if bounds.request_timeout is not None:
            deadline.deadline = trio.current_time() + bounds.request_timeout
        reset: _StreamReset | None = None
        if scope.get("http_version") == "2":
            reset = _StreamReset(receive, deadline, lambda: complete)
            receive = reset.receive
        body: _BodyClock | None = None
        if bounds.body_timeout is not None:
            body = _BodyClock(receive, bounds.body_timeout, deadline)
            receive = body.receive

        async def runner_send(message: Message) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                if deadline.cancel_called:
                    await trio.lowlevel.checkpoint()  # too late: raises Cancelled
                started = True
                deadline.deadline = math.inf  # a started response is never cut
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        with deadline:
            if reset is None:
                await self._call_guarded(scope, receive, runner_send, lambda: started)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reset.pump)
                    await self._call_guarded(scope, receive, runner_send, lambda: started)
                    nursery.cancel_scope.cancel()
        if not deadline.cancelled_caught or (reset is not None and reset.gone):
            return
        method, path = scope.get("method"), scope.get("path")
        if body is not None and body.timed_out:
            log.warning("408 for %s %s: the request body was too slow (%d bytes in %.1f s); "
                        "handler cancelled", method, path, body.received, body.waited)  # fmt: skip
            if started:
                raise BodyTimeoutError("the request body was too slow")
            close = [(b"connection", b"close")] if _is_http1(scope) else []
            message = "the request body arrived too slowly"
            error = {"error": {"type": "RequestTimeout", "message": message}}
            await send_json(send, 408, error, extra_headers=close)
            return
        log.warning("504 for %s %s: no response within %s s; handler cancelled", method, path,
                    bounds.request_timeout)  # fmt: skip
        await send_json(send, 504, {"error": {"type": "RequestTimeout", "message":
                        f"no response within {bounds.request_timeout} s"}})  # fmt: skip

    async def _call_guarded(
        self, scope: Scope, receive: Receive, send: Send, started: Callable[[], bool]
    ) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            # Not ``except*``: it would wrap a plain error in a group, and the
            # log would show an ExceptionGroup tree for an ordinary bug.
            errors, _ = split_group(exc, Exception)
            if errors is None:
                raise  # trio.Cancelled, KeyboardInterrupt: never swallowed
            for leaf in leaves(errors):
                self.on_app_error(leaf)
            engine_errors, rest = split_group(exc, self.error_types)
            if engine_errors is None or started():
                raise
            first = next(leaves(engine_errors))
            log.error("%s in %s %s: %s", type(first).__name__, scope.get("method"),
                      scope.get("path"), first)  # fmt: skip
            await send_json(send, 500, error_body(first))
            if rest is not None:
                raise rest from None


def split_group(
    exc: BaseException, types: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[BaseException | None, BaseException | None]:
    """``(matching, rest)`` of ``exc`` for ``types``; a plain exception is not wrapped."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(types)
    return (exc, None) if isinstance(exc, types) else (None, exc)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc`` (itself, if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


class ClientGoneStatus(logging.Filter):
    """Access-log status 499 for a request whose client left before its response ended.

    hypercorn logs such a request with status ``-``. It is nginx's 499 (Client
    Closed Request), unless ``cutting()`` says the drain deadline passed: then
    the server cut it, and ``-`` stays.
    """

    def __init__(self, cutting: Callable[[], bool]) -> None:
        super().__init__()
        self.cutting = cutting

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        if isinstance(atoms, MutableMapping) and atoms.get("s") == "-" and not self.cutting():
            atoms["s"], atoms["st"] = "499", "Client Closed Request"
        return True


class _StreamReset:
    """HTTP/2: cancel the handler when the client resets its stream.

    When a client closes the *connection*, the transport cancels every handler
    on it. A reset stream (``RST_STREAM``, connection kept) only queues
    ``http.disconnect`` for a handler that calls ``receive()``, and one busy
    with the engine never does. So for HTTP/2 a small task reads ``receive()``
    on the handler's behalf (in order, one message ahead) and cancels the
    handler if the disconnect comes before its response ended (after that,
    ASGI lets a handler run on: background tasks). One task per HTTP/2
    request; HTTP/1.1 has one request per connection and needs none.
    """

    def __init__(
        self, receive: Receive, scope: trio.CancelScope, complete: Callable[[], bool]
    ) -> None:
        self._receive = receive
        self._scope = scope
        self._complete = complete
        self._to_app, self._from_pump = trio.open_memory_channel[Message](1)
        self.gone = False

    async def pump(self) -> None:
        async with self._to_app:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    if not self._complete():
                        self.gone = True
                        self._scope.cancel()
                    await self._to_app.send(message)
                    return
                await self._to_app.send(message)

    async def receive(self) -> Message:
        try:
            return await self._from_pump.receive()
        except trio.EndOfChannel:
            return {"type": "http.disconnect"}


class BodyTimeoutError(Exception):
    """A request body stalled after its response had started: the response is cut."""


class _BodyClock:
    """``receive()`` with the body timeout (the rule is in the module docstring)."""

    __slots__ = ("_receive", "done", "received", "scope", "timed_out", "timeout", "waited")

    def __init__(self, receive: Receive, timeout: float, scope: trio.CancelScope) -> None:
        self._receive = receive
        self.timeout = timeout
        self.scope = scope
        self.received = 0
        self.waited = 0.0
        self.done = False
        self.timed_out = False

    async def receive(self) -> Message:
        if self.done:
            return await self._receive()
        began = trio.current_time()
        allowance = min(self.timeout, self.timeout + self.received / BODY_MIN_RATE - self.waited)
        with trio.move_on_at(began + max(allowance, 0.0)) as waiting:
            message = await self._receive()
        self.waited += trio.current_time() - began
        if waiting.cancelled_caught:
            self.timed_out = self.done = True
            self.scope.cancel()
            await trio.lowlevel.checkpoint()  # raises Cancelled unless the handler shields
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message


def _has_body(scope: Scope) -> bool:
    """An HTTP/1.x request that says it has a body (HTTP/2 is treated apart)."""
    for name, value in scope.get("headers") or ():
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def _is_http1(scope: Scope) -> bool:
    return str(scope.get("http_version", "1.1")).startswith("1")


class StartingGate:
    """503 for every request while the runner is starting (its engine task loads).

    Outermost layer, used with ``serve_http(engine_task=...)`` only: the
    listeners accept before the engine and the app have started, so that a
    client gets an answer instead of a hang. The health path goes on to the
    runner (``{"status": "starting"}``); other requests get 503 with
    ``Retry-After``, and on HTTP/1.x ``Connection: close``: a connection
    opened now must not keep the empty lifespan state it copied. An HTTP/2
    connection can stay open, so the app's lifespan state is copied into each
    request's state once serving (a few keys, only in this mode).
    """

    def __init__(self, app: ASGIApp, is_starting: Callable[[], bool],
                 health_path: str | None) -> None:  # fmt: skip
        self.app = app
        self.is_starting = is_starting
        self.health_path = health_path
        self.lifespan_state: MutableMapping[str, Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.lifespan_state = scope.get("state")
        elif self.is_starting():
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})  # try again later
                return
            if scope["path"] != self.health_path:
                await self._refuse(scope, send)
                return
        elif self.lifespan_state and (state := scope.get("state")) is not None:
            for key, value in self.lifespan_state.items():
                state.setdefault(key, value)
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        data = json.dumps({"error": {"type": "Starting", "message":
                                     "the service is starting; retry later"}}).encode()  # fmt: skip
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"retry-after", RETRY_AFTER),
        ]
        if scope.get("http_version") in ("1.0", "1.1"):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def error_body(exc: BaseException) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


async def send_json(
    send: Send,
    status: int,
    body: object,
    head_only: bool = False,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
    ]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else data})


def describe_routes(app: object) -> list[str] | None:
    """One line per route the app exposes, or None if it cannot tell.

    Knows Quart/Flask/Werkzeug (``url_map``) and Starlette/FastAPI (``routes``).
    """
    url_map = getattr(app, "url_map", None)
    if url_map is not None and hasattr(url_map, "iter_rules"):
        lines = []
        for rule in url_map.iter_rules():
            methods = ", ".join(sorted(getattr(rule, "methods", None) or ()))
            lines.append(f"{rule.rule} [{methods}]" if methods else str(rule.rule))
        return lines
    routes = getattr(app, "routes", None)
    if isinstance(routes, list | tuple):
        lines = []
        for route in routes:
            path = getattr(route, "path", None)
            if path is None:
                continue
            methods = ", ".join(sorted(getattr(route, "methods", None) or ()))
            lines.append(f"{path} [{methods}]" if methods else str(path))
        return lines
    return None
