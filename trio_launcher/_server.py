"""hypercorn's protocols on sockets we bound, with a drain we control.

This is the task that serves HTTP. It plays the part of hypercorn's
``worker_serve`` with three differences that the runner needs:

* it serves sockets the runner bound (``hypercorn.trio.serve`` takes none);
* it takes the TLS context from the runner, so certificates can be swapped
  while it serves;
* an error escaping one connection is logged and contained. hypercorn's own
  loop lets it end the whole server (an HTTP/2 client that vanishes under
  load raised ``BusyResourceError`` out of one connection and killed the
  process).

The drain, step by step, when ``drain`` is set: the listeners close at once
(new connects are refused), idle keep-alive connections close, in-flight
requests run on until ``config.graceful_timeout`` and are cancelled then, and
only after that does the app's lifespan shutdown run. The moment the
deadline is reached, before anything is cancelled, ``on_drain_deadline`` is
called, so the runner can say what is being cut (the middleware's in-flight
table knows): a drain that cuts requests is never silent.

Lifespan startup may take as long as ``config.startup_timeout`` (the runner
makes it unlimited by default: loading a model takes minutes); an INFO line
every ``STARTUP_PROGRESS_EVERY`` seconds says it is still running.

hypercorn's ``Lifespan`` and ``WorkerContext`` are internal API, reached
through ``_hypercorn``. Connections are accepted by ``_accept`` (all that
wait, not one per scheduler round). The connection layer is chosen once: the
lean transport (``_transport``) or hypercorn's stock one (``_stock``).
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Awaitable, Callable
from functools import partial
from random import randint
from typing import Any

import trio

from ._accept import Door, TLSContext, WaitingRoom, serve_listening
from ._errors import AppStartupError
from ._hypercorn import (
    AppWrapper,
    Config,
    Lifespan,
    LifespanFailureError,
    LifespanState,
    LifespanTimeoutError,
    WorkerContext,
    repr_socket_addr,
)
from ._metrics import recorder
from ._options import Transport
from ._ports import BoundSockets
from ._stock import serve_stock_connection
from ._transport import (
    DEFAULT_HEADER_TIMEOUT,
    FRESH_GRACE,
    Connection,
    drain_all,
    serve_connection,
)

log = logging.getLogger("trio_launcher")

STARTUP_PROGRESS_EVERY = 10.0


async def serve_sockets(
    app: AppWrapper,
    config: Config,
    sockets: BoundSockets,
    drain: trio.Event,
    ssl_context: TLSContext | None,
    *,
    transport: Transport = "lean",
    http: str = "httptools",
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    answers_itself: Callable[[dict[str, Any]], bool] | None = None,
    door: Door | None = None,
    on_max_requests: Callable[[], None] | None = None,
    on_drain_deadline: Callable[[float], None] | None = None,
    app_start: AppStart | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run lifespan startup, serve until ``drain`` is set, drain, run lifespan shutdown.

    Calls ``task_status.started(urls)`` once the app has started and the
    sockets listen (with ``app_start``: once they listen, see AppStart), and
    ``on_drain_deadline(graceful_timeout)`` if the drain reaches its deadline
    with connections still open (before cutting them).

    Raises:
        AppStartupError: the app's lifespan startup failed or timed out.
    """
    lifespan_state: LifespanState = {}
    lifespan = _Lifespan(app, config, lifespan_state)
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)

    app_started = False
    async with trio.open_nursery() as lifespan_nursery:
        if app_start is None:
            await _start_app(lifespan_nursery, lifespan, config)
            app_started = True

        cutter = trio.CancelScope()
        async with trio.open_nursery() as connections:
            listening = []
            urls = []
            for scheme, socks in (("https", sockets.secure), ("http", sockets.insecure)):
                for sock in socks:
                    sock.listen(config.backlog)
                    tls = None
                    if scheme == "https":
                        assert ssl_context is not None
                        tls = ssl_context
                    listening.append((sock, tls))
                    urls.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")

            registry: set[Connection] = set()
            handler: Callable[[trio.abc.Stream, bytes], Awaitable[None]]
            if transport == "lean":
                handler = partial(
                    serve_connection,
                    app,
                    config,
                    context,
                    lifespan_state,
                    registry,
                    http,
                    header_timeout,
                    answers_itself,
                    door,
                )
            else:
                handler = partial(serve_stock_connection, app, config, context, lifespan_state)
                door = None  # (the stock transport is hypercorn's as it is)
            handler = recorder().connection_handler(handler)
            room = None
            if door is not None and hasattr(select, "epoll"):  # (Linux: the room's epoll)
                wait, grace = float(config.keep_alive_timeout), FRESH_GRACE
                room = WaitingRoom(door, handler, connections, wait, grace)
                connections.start_soon(room.run)
            task_status.started(urls)
            async with trio.open_nursery() as accepting:
                accepting.start_soon(serve_listening, listening, handler, connections, room)
                stop = on_max_requests or drain.set
                accepting.start_soon(_drain_on_max_requests, context, stop)
                if app_start is not None:
                    await app_start.go.wait()
                    if not app_start.skip:
                        await _start_app(lifespan_nursery, lifespan, config)
                        app_started = True
                        app_start.started.set()
                await drain.wait()
                accepting.cancel_scope.cancel()  # closes the listeners
            recorder().drain_started()
            log.info(
                "draining: listeners closed, in-flight requests have %s s", config.graceful_timeout
            )
            await context.terminated.set()  # closes idle keep-alive connections
            drain_all(registry)  # (the lean transport's, at once)
            if room is not None:
                room.drain()
            deadline = float(config.graceful_timeout)
            lifespan_nursery.start_soon(
                _cut_at_deadline, cutter, connections.cancel_scope, deadline, on_drain_deadline
            )
        cutter.cancel()  # every connection ended before the deadline

        if app_started and lifespan.supported:
            with contextlib.suppress(trio.ClosedResourceError):  # the lifespan task ended
                await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _cut_at_deadline(
    cutter: trio.CancelScope,
    connections: trio.CancelScope,
    graceful_timeout: float,
    on_deadline: Callable[[float], None] | None,
) -> None:
    """At the drain deadline: report (before anything is cancelled), then cut."""
    with cutter:
        await trio.sleep(graceful_timeout)
        if on_deadline is not None:
            on_deadline(graceful_timeout)
        connections.cancel()


async def _log_startup_progress(ticker: trio.CancelScope) -> None:
    """An INFO line every ``STARTUP_PROGRESS_EVERY`` seconds until ``ticker`` is cancelled."""
    began = trio.current_time()
    with ticker:
        while True:
            await trio.sleep(STARTUP_PROGRESS_EVERY)
            log.info("app startup still running (%.0f s)", trio.current_time() - began)


async def _start_app(nursery: trio.Nursery, lifespan: _Lifespan, config: Config) -> None:
    """The app's lifespan startup, in ``nursery``, with a progress line every 10 s."""
    await nursery.start(lifespan.run)
    ticker = trio.CancelScope()
    nursery.start_soon(_log_startup_progress, ticker)
    try:
        await lifespan.wait_for_startup()
        if lifespan.failure is not None:
            raise AppStartupError(f"the app's lifespan startup failed: {lifespan.failure}")
    except trio.ClosedResourceError:
        # The app returned from the lifespan scope without a word: it
        # does not do lifespan. Serve without it.
        lifespan.supported = False
    except LifespanTimeoutError as exc:
        raise AppStartupError(
            f"the app's lifespan startup took longer than {config.startup_timeout:g} s "
            "(the startup timeout)"
        ) from exc
    finally:
        ticker.cancel()


class AppStart:
    """``serve_sockets(app_start=...)``: accept first, start the app when told.

    The listeners accept and ``task_status.started(urls)`` is called at once
    (the app wrapper answers 503 meanwhile); the app's lifespan startup
    waits for ``go``, and ``started`` is set after it. ``skip`` set before
    ``go`` means the server stopped before the app was started: no lifespan
    startup, no lifespan shutdown. serve_http uses this to start the engine
    task between binding and the app's startup.
    """

    def __init__(self) -> None:
        self.go = trio.Event()
        self.skip = False
        self.started = trio.Event()


class _Lifespan(Lifespan):
    """hypercorn's Lifespan, with a startup failure we can see.

    hypercorn marks startup complete in a ``finally`` even when the app
    reported ``lifespan.startup.failed``, so ``wait_for_startup`` returns
    normally and the failure only arrives later as an exception group. Here
    the failure is recorded before anything else runs, and the task ends
    quietly, so that serve_sockets raises one clear AppStartupError.
    """

    failure: LifespanFailureError | None = None

    async def asgi_send(self, message: Any) -> None:
        try:
            await super().asgi_send(message)
        except LifespanFailureError as exc:
            if message["type"] == "lifespan.startup.failed":
                self.failure = exc
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.handle_lifespan(task_status=task_status)
        except* LifespanFailureError as group:
            if self.failure is None:  # a failed shutdown: the server is stopping anyway
                log.error("the app's lifespan shutdown failed: %s", group.exceptions[0])


async def _drain_on_max_requests(context: WorkerContext, stop: Callable[[], None]) -> None:
    await context.terminate.wait()
    log.info("max_requests reached: draining")
    stop()
