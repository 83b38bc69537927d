"""The ASGI layer the runner puts around any app.

It answers the health path itself (the app may be busy or dead, the runner
knows better), refuses request heads over the limits with 431 for every
protocol (hypercorn has no header-count limit at all), bounds every request
(load shedding, a deadline for the response to start, a minimum rate for the
request body) and handles engine errors.

The bounds themselves (load shedding, the request deadline, the body
timeout, the in-flight table) are explained in ``_bounds``.

vLLM registers FastAPI exception handlers so that an engine error becomes a
500 and a dead engine stops the server. We do the same below any framework,
as plain ASGI middleware:

* ``EngineDeadError``, ``EngineGenerateError`` and any type the user adds
  become a 500 with a small JSON body, if the response has not started;
* after any error from the app, the runner's dead check runs: an
  ``EngineDeadError`` or an engine that reports itself dead starts the drain;
* after a streaming response has started its status cannot change; the error
  propagates, the response is cut (the client sees a cut stream, not a fake
  clean end: HTTP/1.1 closes the connection, HTTP/2 resets the stream with
  INTERNAL_ERROR) and the dead check has still run.

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
from bisect import bisect_left
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import trio

from ._bounds import (
    BODY_PENDING_EXTENSION,
    CANCEL_EXTENSION,
    RETRY_AFTER,
    BodyClock,
    BodyTimeoutError,
    Bounds,
    Deadlines,
    InFlight,
    StreamReset,
    has_body,
    is_http1,
)
from ._errors import EngineDeadError, EngineGenerateError, leaves
from ._logging import HEADER_EXTENSION, REQUEST_ID_EXTENSION, RequestIds
from ._metrics import DURATION_BUCKETS, FIRST_BUCKET, LocalRequests, Metrics, recorder
from ._websockets import WebSockets

log = logging.getLogger("trio_launcher")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

ENGINE_ERRORS: tuple[type[BaseException], ...] = (EngineDeadError, EngineGenerateError)
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_now = time.monotonic


@dataclass(frozen=True)
class Limits:
    """Request-head limits applied to every protocol (HTTP/1.1 and HTTP/2).

    Attributes:
        max_header_count: most request headers; more get 431.
        max_head_size: most bytes in the request line/path and headers; more get 431.
    """

    max_header_count: int | None = 256
    max_head_size: int | None = None


class Exchange:
    """One request's response as the runner's middleware sees it, and its ``send``.

    ``status`` is 0 until the response starts, then its status (the duration
    histogram's label; "started" for the bounds). The request-id header, if
    any, is added to the response head here. When the response starts, a
    request deadline (``deadlines``, ``key``) is disarmed, and ``on_start``, if
    set, is asked whether a bound already cut the request: if so (or if the
    deadline already fired) it is too late, and the send raises
    ``trio.Cancelled``.

    One object per request and its bound ``send``: the observing and the
    bounds share one wrapper (each extra ASGI level or ``send`` wrapper costs
    about 1 % of a hello-world request).
    """

    __slots__ = ("_send", "deadlines", "header", "key", "on_start", "status")

    def __init__(self, send: Send, header: tuple[bytes, bytes] | None) -> None:
        self._send = send
        self.header = header
        self.status = 0
        self.on_start: Callable[[], bool] | None = None
        self.deadlines: Deadlines | None = None
        self.key = 0

    async def send(self, message: Message) -> None:
        if not self.status and message["type"] == "http.response.start":
            if self.on_start is not None and self.on_start():
                await trio.lowlevel.checkpoint()  # too late: raises Cancelled
            deadlines = self.deadlines
            if deadlines is not None:
                if self.key in deadlines.fired:
                    await trio.lowlevel.checkpoint()  # too late: raises Cancelled
                deadlines.armed.pop(self.key, None)  # a started response is never cut
            self.status = message["status"]
            if self.header is not None:
                message["headers"] = [*message.get("headers", ()), self.header]
        await self._send(message)


@dataclass(eq=False)
class RunnerMiddleware:
    """The runner's layer around the app: metrics path, request ids and metrics,
    health, head limits, bounds, engine errors.

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
        metrics: the server's metrics (every HTTP request is measured), or None.
        metrics_path: a GET/HEAD path answered with the scrape, before anything else.
        request_ids: keeps or makes every HTTP request's ``X-Request-Id``, or None.
        draining: True once the drain has started (a request cancelled before
            its response started then counts as cut by the drain).
    """

    app: ASGIApp
    on_app_error: Callable[[BaseException], None]
    error_types: tuple[type[BaseException], ...] = ENGINE_ERRORS
    _: KW_ONLY
    health_path: str | None = None
    health: Callable[[], tuple[int, dict[str, Any]]] = lambda: (200, {})
    limits: Limits = Limits()
    bounds: Bounds = Bounds()
    in_flight: InFlight = field(default_factory=InFlight)
    metrics: Metrics | None = None
    metrics_path: str | None = None
    request_ids: RequestIds | None = None
    draining: Callable[[], bool] = lambda: False
    websockets: WebSockets = field(default_factory=WebSockets)
    """The open WebSocket sessions: the runner runs ``websockets.run`` (1012 at the drain)."""
    deadlines: Deadlines = field(init=False)
    """The request deadline's reaper: the runner runs ``deadlines.run`` beside the server."""
    _shed_body: bytes | None = field(default=None, init=False)
    _local: LocalRequests | None = field(default=None, init=False, repr=False)
    _seen: dict[tuple[str, int, str | None], list[float]] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.deadlines = Deadlines(self.bounds.request_timeout or math.inf)
        if self.metrics is None:
            self.metrics_path = None
        else:
            requests = self.metrics.requests
            requests.active_now = self.in_flight.requests.__len__
            if isinstance(requests, LocalRequests):
                self._local, self._seen = requests, requests.seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        method = scope["method"]
        path = scope["path"]
        if path == self.metrics_path and method in ("GET", "HEAD"):
            assert self.metrics is not None
            await send_metrics(send, self.metrics, head_only=method == "HEAD")
            return
        header = None
        extensions = scope.get("extensions") or {}
        ids = self.request_ids
        if ids is not None:
            incoming = extensions.get(REQUEST_ID_EXTENSION)
            if incoming is None:  # the protocol does not say: the headers do
                header = ids.assign(scope)  # (sent with the app's headers)
            elif incoming:  # the protocol writes the line itself
                extensions[HEADER_EXTENSION] = ids.keep_or_make(incoming, scope)
            else:  # a new id, inline (``keep_or_make``: a Python call more)
                text, extensions[HEADER_EXTENSION] = next(ids.new)
                scope["state"]["request_id"] = text  # (such a protocol gives each its own)
        ex = Exchange(send, header)
        if self._answered_here(scope, method, path):
            await self._answer(scope, ex)
            return
        in_flight = self.in_flight
        key = in_flight.add(method, path)
        try:
            bounds = self.bounds
            h2 = scope.get("http_version") == "2"
            pending = extensions.get(BODY_PENDING_EXTENSION)
            if pending is None:  # the protocol does not say: the head does
                pending = h2 or has_body(scope)
            body_bound = bounds.body_timeout is not None and pending
            timed = bounds.request_timeout is not None
            cancel = extensions.get(CANCEL_EXTENSION)
            if cancel is None or (timed and not self.deadlines.running):
                if h2 or body_bound or timed:
                    await self._call_bounded(scope, receive, ex)
                else:
                    # Nothing to bound: no cancel scope (entering one costs more than
                    # the rest of this middleware; hello world pays nothing for it).
                    await self._call_guarded(scope, receive, ex.send, ex)
            elif body_bound:
                await self._call_lent(scope, receive, ex, key, cancel, body_bound)
            elif timed:  # the request deadline alone: ``_call_lent``, inline (one level fewer)
                deadlines = self.deadlines
                ex.deadlines, ex.key = deadlines, key
                deadlines.armed[key] = (deadlines.now() + deadlines.timeout, cancel)
                ended: BaseException | None = None
                try:
                    try:
                        await self.app(scope, receive, ex.send)
                    except BaseException as exc:
                        await self._app_failed(scope, ex, exc)
                except BaseException as exc:  # held until the cut request is answered
                    ended = exc
                if ended is not None or not ex.status or deadlines.fired:
                    await self._settle_lent(scope, ex, key, None, ended)
            else:
                try:  # _call_guarded, inline: the hello-world path, one level fewer
                    await self.app(scope, receive, ex.send)
                except BaseException as exc:
                    await self._app_failed(scope, ex, exc)
        except BaseException as exc:
            if not ex.status and self.metrics is not None:
                if not _is_cancel(exc):
                    ex.status = 500  # the protocol answers it
                elif self.draining():
                    self.metrics.request_cut_by_drain()
            raise
        finally:
            arrived = in_flight.remove(key)
            seen = self._seen
            if seen is not None:  # ``LocalRequests.finished``, inline: two Python calls fewer
                status = ex.status
                route = scope.get("route")
                counts = None
                if route is None or type(route) is str:
                    counts = seen.get((method, status, route))
                if counts is None:  # new, an unknown method, a route object
                    assert self._local is not None
                    counts = self._local.counts(method, status, route)
                seconds = _now() - arrived
                bucket = 0 if seconds <= FIRST_BUCKET else bisect_left(DURATION_BUCKETS, seconds)
                counts[bucket] += 1
                counts[-1] += seconds
            elif self.metrics is not None:  # (``--workers``: prometheus_client's files)
                self.metrics.requests.finished(
                    method, ex.status, scope.get("route"), _now() - arrived
                )

    def answers_itself(self, scope: Scope) -> bool:
        """True if this HTTP request is answered here without the app (the metrics
        path, the health path, 431, a shed 503). A protocol may then make the call
        at once, in the connection's own task: nothing in it waits for the app."""
        method = scope["method"]
        path = scope["path"]
        if path == self.metrics_path and method in ("GET", "HEAD"):
            return True
        return self._answered_here(scope, method, path)

    def shedding(self) -> bool:
        """True while every new HTTP request is shed: the concurrency limit is reached,
        counting the requests the door let in that are on their way to the app."""
        limit = self.bounds.limit_concurrency
        in_flight = self.in_flight
        return limit is not None and len(in_flight.requests) + in_flight.coming >= limit

    def let_in(self) -> None:
        """The door let a request in: it counts against the limit until it arrives."""
        self.in_flight.coming += 1

    def arrived(self) -> None:
        """A request the door let in reached the app (or will not: its connection ended)."""
        self.in_flight.coming -= 1

    def shed_at_door(
        self, method: str, path: str, header_count: int, head_size: int
    ) -> tuple[bytes, bytes | None] | None:
        """A request met before any protocol exists (``_door``): if it is shed now, count
        it as shed and return its 503's JSON body and a new request id's header line
        (``HEADER_EXTENSION``'s form; None: ids are off).

        None: serve it the ordinary way: not shedding, the health or metrics path
        (exempt), or a head the limits may refuse with 431 first (``head_size``, the
        whole head's bytes, is at least what ``_over_limit`` counts)."""
        limit = self.bounds.limit_concurrency
        if limit is None or not self.shedding():
            return None
        if method in ("GET", "HEAD") and path in (self.health_path, self.metrics_path):
            return None
        limits = self.limits
        if (limits.max_header_count is not None and header_count > limits.max_header_count) or (
            limits.max_head_size is not None and head_size > limits.max_head_size
        ):
            return None
        self.in_flight.shed += 1
        recorder().request_shed()
        if self.metrics is not None:
            self.metrics.requests.finished(method, 503, None, 0.0)
        id_line = None
        if self.request_ids is not None:
            id_line = next(self.request_ids.new)[1]
        return self._shed_body_for(limit), id_line

    def _answered_here(self, scope: Scope, method: str, path: str) -> bool:
        """Shed, the health path, or over the head limits: ``_answer`` answers it."""
        limit = self.bounds.limit_concurrency
        if limit is not None and len(self.in_flight.requests) >= limit:
            return True
        if path == self.health_path and method in ("GET", "HEAD"):
            return True
        limits = self.limits
        if limits.max_head_size is not None:
            return self._over_limit(scope) is not None
        # Else only ``_over_limit``'s count rule applies: inline (one call fewer a request).
        count = limits.max_header_count
        return count is not None and len(scope.get("headers") or ()) > count

    async def _answer(self, scope: Scope, ex: Exchange) -> None:
        """What the runner answers itself, before the app: 431, the health path, 503."""
        start = time.monotonic()
        method = scope["method"]
        refusal = self._over_limit(scope)
        limit = self.bounds.limit_concurrency
        if refusal is not None:
            log.warning("431 for %s %s: %s", method, scope.get("path"), refusal)
            # HTTP/1.x: the connection closes after a 431 (RFC 9110 15.5.1: the
            # rest of the head may still be arriving; nobody knows where it ends).
            close = [(b"connection", b"close")] if is_http1(scope) else []
            error = {"error": {"type": "HeadersTooLarge", "message": refusal}}
            await send_json(ex.send, 431, error, extra_headers=close)
        elif scope["path"] == self.health_path and method in ("GET", "HEAD"):
            status, body = self.health()
            body["in_flight"] = len(self.in_flight)
            body["oldest_request_s"] = round(self.in_flight.oldest_age(), 3)
            await send_json(ex.send, status, body, head_only=method == "HEAD")
        elif limit is not None:
            self.in_flight.shed += 1
            recorder().request_shed()
            await self._shed(scope, ex.send, limit)
        if self.metrics is not None:
            self.metrics.requests.finished(method, ex.status, None, time.monotonic() - start)

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            refusal = self._over_limit(scope)
            if refusal is not None:
                log.warning("431 for websocket %s: %s", scope.get("path"), refusal)
                await send({"type": "websocket.close", "code": 1009})
                return
            await self.websockets.serve(self.app, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _shed(self, scope: Scope, send: Send, limit: int) -> None:
        """503 at once; on HTTP/1.x the connection closes too (it frees the most memory)."""
        await send_retry_later(send, scope, self._shed_body_for(limit))

    def _shed_body_for(self, limit: int) -> bytes:
        body = self._shed_body
        if body is None:
            message = f"{limit} requests in flight, the limit; retry later"
            body = self._shed_body = json.dumps(
                {"error": {"type": "Overloaded", "message": message}}
            ).encode()
        return body

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

    async def _call_lent(
        self,
        scope: Scope,
        receive: Receive,
        ex: Exchange,
        key: int,
        cancel: Callable[[], object],
        body_bound: bool,
    ) -> None:
        """The bounds with the cancel scope the connection lends (see ``_bounds``)."""
        bounds = self.bounds
        deadlines = self.deadlines if bounds.request_timeout is not None else None
        body: BodyClock | None = None
        if body_bound and bounds.body_timeout is not None:
            body = BodyClock(receive, bounds.body_timeout, cancel)
            receive = body.receive
            ex.on_start = body.is_late
        if deadlines is not None:
            ex.deadlines, ex.key = deadlines, key
            deadlines.arm(key, cancel)
        ended: BaseException | None = None
        try:
            try:  # _call_guarded, inline: one level fewer
                await self.app(scope, receive, ex.send)
            except BaseException as exc:
                await self._app_failed(scope, ex, exc)
        except BaseException as exc:  # held until the cut request is answered
            ended = exc
        await self._settle_lent(scope, ex, key, body, ended)

    async def _settle_lent(
        self,
        scope: Scope,
        ex: Exchange,
        key: int,
        body: BodyClock | None,
        ended: BaseException | None,
    ) -> None:
        """After the app, under lent bounds: disarm, answer a request a bound cut (504 or
        408), then raise what the app ended with (``ended``), if anything."""
        deadlines = ex.deadlines
        ex.on_start = ex.deadlines = None
        late = False
        if deadlines is not None:
            if not ex.status:
                deadlines.disarm(key)  # (a started response disarmed it)
            fired = deadlines.fired
            if fired and key in fired:
                late = True
                fired.discard(key)
        slow = body is not None and body.timed_out
        if late or slow:
            # The handler's scope is cancelled: answer from a shield, bounded.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                await self._answer_cut(scope, ex, body if slow else None)
        if ended is not None:
            raise ended

    async def _call_bounded(self, scope: Scope, receive: Receive, ex: Exchange) -> None:
        complete = False
        bounds = self.bounds
        deadline = trio.CancelScope()
        if bounds.request_timeout is not None:
            deadline.deadline = trio.current_time() + bounds.request_timeout
        reset: StreamReset | None = None
        if scope.get("http_version") == "2":
            reset = StreamReset(receive, deadline, lambda: complete)
            receive = reset.receive
        body: BodyClock | None = None
        if bounds.body_timeout is not None:
            body = BodyClock(receive, bounds.body_timeout, deadline.cancel)
            receive = body.receive

        def on_start() -> bool:
            if deadline.cancel_called:
                return True  # too late
            deadline.deadline = math.inf  # a started response is never cut
            return False

        async def runner_send(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await ex.send(message)

        ex.on_start = on_start
        with deadline:
            if reset is None:
                await self._call_guarded(scope, receive, runner_send, ex)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reset.pump)
                    await self._call_guarded(scope, receive, runner_send, ex)
                    nursery.cancel_scope.cancel()
        ex.on_start = None
        if not deadline.cancelled_caught or (reset is not None and reset.gone):
            return
        await self._answer_cut(scope, ex, body if body and body.timed_out else None)

    async def _answer_cut(self, scope: Scope, ex: Exchange, slow_body: BodyClock | None) -> None:
        """A bound cancelled the handler: 408 for a slow body, else 504 (if not started)."""
        if slow_body is not None:
            log.warning(
                "408 for %s %s: the request body was too slow (%d bytes in %.1f s); "
                "handler cancelled",
                scope.get("method"),
                scope.get("path"),
                slow_body.received,
                slow_body.waited,
            )
            recorder().request_timed_out("body")
            if ex.status:
                raise BodyTimeoutError("the request body was too slow")
            close = [(b"connection", b"close")] if is_http1(scope) else []
            message = "the request body arrived too slowly"
            error = {"error": {"type": "RequestTimeout", "message": message}}
            await send_json(ex.send, 408, error, extra_headers=close)
        elif not ex.status:
            await self._timed_out(scope, ex.send)

    async def _timed_out(self, scope: Scope, send: Send) -> None:
        """The request deadline passed before the response started: 504."""
        timeout = self.bounds.request_timeout
        log.warning(
            "504 for %s %s: no response within %s s; handler cancelled",
            scope.get("method"),
            scope.get("path"),
            timeout,
        )
        recorder().request_timed_out("response")
        message = f"no response within {timeout} s"
        await send_json(send, 504, {"error": {"type": "RequestTimeout", "message": message}})

    async def _call_guarded(self, scope: Scope, receive: Receive, send: Send, ex: Exchange) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            await self._app_failed(scope, ex, exc, send)

    async def _app_failed(
        self, scope: Scope, ex: Exchange, exc: BaseException, send: Send | None = None
    ) -> None:
        """The app raised ``exc``: the dead check, then a 500 for an engine error if the
        response has not started; raises ``exc`` (or what is left of its group) otherwise."""
        # Not ``except*``: it would wrap a plain error in a group, and the
        # log would show an ExceptionGroup tree for an ordinary bug.
        errors, _ = split_group(exc, Exception)
        if errors is None:
            raise exc  # trio.Cancelled, KeyboardInterrupt: never swallowed
        for leaf in leaves(errors):
            self.on_app_error(leaf)
        engine_errors, rest = split_group(exc, self.error_types)
        if engine_errors is None or ex.status:
            raise exc
        first = next(leaves(engine_errors))
        log.error(
            "%s in %s %s: %s",
            type(first).__name__,
            scope.get("method"),
            scope.get("path"),
            first,
        )
        await send_json(send or ex.send, 500, error_body(first))
        if rest is not None:
            raise rest from None


def split_group(
    exc: BaseException, types: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[BaseException | None, BaseException | None]:
    """``(matching, rest)`` of ``exc`` for ``types``; a plain exception is not wrapped."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(types)
    return (exc, None) if isinstance(exc, types) else (None, exc)


class StartingGate:
    """503 for every request while the runner is starting (its engine task loads).

    Used with ``serve_http(engine_task=...)`` only, between the runner's
    middleware and the app: the listeners accept before the engine and the
    app have started, so that a client gets an answer instead of a hang. The
    runner's middleware answers the health path (``{"status": "starting"}``)
    and the metrics path, and measures these 503s and gives them request ids
    like any other response. Other requests get 503 with
    ``Retry-After``, and on HTTP/1.x ``Connection: close``: a connection
    opened now must not keep the empty lifespan state it copied. An HTTP/2
    connection can stay open, so the app's lifespan state is copied into each
    request's state once serving (a few keys, only in this mode).
    """

    def __init__(
        self, app: ASGIApp, is_starting: Callable[[], bool], health_path: str | None
    ) -> None:
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
        error = {"type": "Starting", "message": "the service is starting; retry later"}
        await send_retry_later(send, scope, json.dumps({"error": error}).encode())


def _is_cancel(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_cancel(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


async def send_metrics(send: Send, metrics: Metrics, head_only: bool = False) -> None:
    """The scrape, as a whole response."""
    headers = [(b"content-type", METRICS_CONTENT_TYPE)]
    await send_whole(send, 200, metrics.exposition(), headers, head_only)


def error_body(exc: BaseException) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


async def send_json(
    send: Send,
    status: int,
    body: object,
    head_only: bool = False,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", b"application/json"), *(extra_headers or ())]
    await send_whole(send, status, json.dumps(body).encode(), headers, head_only)


async def send_retry_later(send: Send, scope: Scope, body: bytes) -> None:
    """503 with ``Retry-After`` and a JSON ``body``; on HTTP/1.x the connection closes
    too (a refused client frees the most memory when it goes)."""
    headers = [(b"content-type", b"application/json"), (b"retry-after", RETRY_AFTER)]
    if is_http1(scope):
        headers.append((b"connection", b"close"))
    await send_whole(send, 503, body, headers, False)


async def send_whole(send: Send, status: int, body: bytes, headers: Headers, head: bool) -> None:
    """A whole response the runner answers itself: the head, with the body's length, then
    the body (none for HEAD)."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


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
