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
only after that does the app's lifespan shutdown run.

hypercorn's ``Lifespan``, ``TCPServer`` and ``WorkerContext`` are internal
API, which is why pyproject pins hypercorn's minor version.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable
from functools import partial
from random import randint
from typing import Any, Protocol

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import LifespanFailureError, LifespanTimeoutError, repr_socket_addr

from ._errors import AppStartupError
from ._metrics import recorder
from ._ports import BoundSockets
from ._transport import Connection, contained, drain_all, serve_connection

log = logging.getLogger("trio_launcher")


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


async def serve_sockets(
    app: AppWrapper,
    config: Config,
    sockets: BoundSockets,
    drain: trio.Event,
    ssl_context: TLSContext | None,
    *,
    transport: str = "lean",
    on_max_requests: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run lifespan startup, serve until ``drain`` is set, drain, run lifespan shutdown.

    Calls ``task_status.started(urls)`` once the app has started and the
    sockets listen.

    Raises:
        AppStartupError: the app's lifespan startup failed or timed out.
    """
    config.set_statsd_logger_class(StatsdLogger)
    lifespan_state: LifespanState = {}
    lifespan = _Lifespan(app, config, lifespan_state)
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.run)
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
                f"the app's lifespan startup took longer than {config.startup_timeout} s"
            ) from exc

        async with trio.open_nursery() as connections:
            listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
            urls = []
            for scheme, socks in (("https", sockets.secure), ("http", sockets.insecure)):
                for sock in socks:
                    sock.listen(config.backlog)
                    listener: trio.abc.Listener[trio.abc.Stream] = trio.SocketListener(
                        trio.socket.from_stdlib_socket(sock)
                    )
                    if scheme == "https":
                        assert ssl_context is not None
                        listener = trio.SSLListener(
                            listener,
                            ssl_context,  # type: ignore[arg-type]
                            https_compatible=True,
                        )
                    listeners.append(listener)
                    urls.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")

            registry: set[Connection] = set()
            if transport == "lean":
                handler = partial(serve_connection, app, config, context, lifespan_state, registry)
            else:
                handler = partial(_serve_connection, app, config, context, lifespan_state)
            counted = recorder().connection_handler(handler)
            task_status.started(urls)
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(trio.serve_listeners, counted, listeners, handler_nursery=connections)
                )
                accepting.start_soon(_drain_on_max_requests, context, on_max_requests or drain.set)
                await drain.wait()
                accepting.cancel_scope.cancel()  # closes the listeners
            recorder().drain_started()
            log.info(
                "draining: listeners closed, in-flight requests have %s s", config.graceful_timeout
            )
            await context.terminated.set()  # closes idle keep-alive connections
            drain_all(registry)  # (the lean transport's, at once)
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        if lifespan.supported:
            with contextlib.suppress(trio.ClosedResourceError):  # the lifespan task ended
                await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


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


class _TCPServer(TCPServer):
    """hypercorn's connection, minus a race that cut answered requests in the drain.

    When the drain starts, hypercorn wakes every connection's idle timer to
    close idle keep-alive connections. A request that arrives on such a
    connection at that very moment is parsed and answered, while the timer,
    already past its last checkpoint, closes the connection in a shielded
    scope: the client gets a 200 and then no body (found by the chaos suite's
    signal storms). Here the timer leaves a busy connection alone (the end of
    that request re-arms it and hypercorn closes the connection then), and an
    idle one is closed at the socket *before* any checkpoint, so no request
    can slip in between the decision and the close: it finds the connection
    closed and gets no answer at all, never half of one.
    """

    async def _idle_timeout(self) -> None:
        with trio.move_on_after(self.config.keep_alive_timeout):
            await self.context.terminated.wait()
        with trio.CancelScope(shield=True):
            if not _is_idle(self.protocol):
                return
            transport = getattr(self.stream, "transport_stream", self.stream)
            sock = getattr(transport, "socket", None)
            if sock is not None:
                sock.close()  # synchronous: wakes the reader with ClosedResourceError
            await self._initiate_server_close()


def _is_idle(protocol: Any) -> bool:
    inner = getattr(protocol, "protocol", None)
    if inner is None:
        return True
    idle = getattr(inner, "idle", None)  # HTTP/2: every stream idle
    if isinstance(idle, bool):
        return idle
    return getattr(inner, "stream", None) is None  # HTTP/1.1: no request in progress


class _OneLine(logging.Filter):
    """trio logs every failed accept (EMFILE and friends) with a traceback; one
    line says it all: which error, and that it retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


logging.getLogger("trio.serve_listeners").addFilter(_OneLine())


async def _drain_on_max_requests(context: WorkerContext, stop: Callable[[], None]) -> None:
    await context.terminate.wait()
    log.info("max_requests reached: draining")
    stop()


async def _serve_connection(
    app: AppWrapper,
    config: Config,
    context: WorkerContext,
    lifespan_state: LifespanState,
    stream: trio.abc.Stream,
) -> None:
    async with contained(stream):
        await _TCPServer(
            app,
            config,
            context,
            ConnectionState(lifespan_state.copy()),
            stream,  # type: ignore[arg-type]
        ).run()
