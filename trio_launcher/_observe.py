"""The runner's observing layer and the scrape listener.

:class:`Observed` is the outermost ASGI layer the runner puts around the app
(outside the health path, the limits and the engine errors of
``_asgi.RunnerMiddleware``): it answers the metrics path before anything else,
gives every request its id (``_logging.RequestIds``), and measures every
request into the server's :class:`~trio_launcher._metrics.Metrics`. When both
metrics and request ids are off the runner does not install it at all.

The separate listener (``metrics_bind``) is deliberately tiny: one request per
connection, plain HTTP, any path answers with the scrape (like
prometheus_client's own server). It is meant for a private address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._asgi import ASGIApp, Message, Receive, Scope, Send, send_whole
from ._hypercorn import Config
from ._logging import RequestIds
from ._metrics import Metrics, recorder
from ._ports import bind_one

log = logging.getLogger("trio_launcher")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
MAX_METRICS_HEAD = 16384


class Observed:
    """The runner's outermost layer: answers the metrics path, gives every request
    an id, measures every request.

    Args:
        app: the runner's middleware (health, limits, engine errors) and the app.
        metrics: the server's metrics, or None when metrics are off.
        metrics_path: a GET/HEAD path answered with the scrape, before the app.
        request_ids: keep or make an ``X-Request-Id`` for every request.
        draining: True once the drain has started (a cancelled request then
            counts as cut by the drain).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics | None,
        *,
        metrics_path: str | None,
        request_ids: bool,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_path = metrics_path if metrics is not None else None
        self.ids = RequestIds() if request_ids else None
        self.draining = draining
        self.requests = metrics.requests if metrics is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if scope["path"] == self.metrics_path and method in ("GET", "HEAD"):
            assert self.metrics is not None
            await send_metrics(send, self.metrics, head_only=method == "HEAD")
            return
        header = self.ids.assign(scope) if self.ids is not None else None
        requests = self.requests
        if requests is None:  # request ids only
            await self.app(scope, receive, _with_header(send, header))
            return
        status = 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if header is not None:
                    message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        start = time.perf_counter()
        requests.started()
        try:
            await self.app(scope, receive, observed_send)
        except BaseException as exc:
            if not status:
                if _is_cancel(exc):
                    if self.draining() and self.metrics is not None:
                        self.metrics.request_cut_by_drain()
                else:
                    status = 500  # hypercorn answers it
            raise
        finally:
            requests.finished(
                (method if method in KNOWN_METHODS else "_OTHER", status, route_template(scope)),
                time.perf_counter() - start,
            )


def _with_header(send: Send, header: tuple[bytes, bytes] | None) -> Send:
    if header is None:
        return send

    async def id_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return id_send


def route_template(scope: Scope) -> str:
    """The route the framework matched (never the raw path), or "".

    Starlette/FastAPI put the matched route object in ``scope["route"]``
    (``.path`` is the template); ``trio_launcher.quart`` puts Quart's rule string
    there.
    """
    route = scope.get("route")
    if route is None:
        return ""
    if isinstance(route, str):
        return route
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else ""


def _is_cancel(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_cancel(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


async def send_metrics(send: Send, metrics: Metrics, head_only: bool = False) -> None:
    await send_whole(send, 200, metrics.exposition(), [(b"content-type", CONTENT_TYPE)], head_only)


# --- the separate listener (metrics_bind) -------------------------------------------


def bind_metrics(address: str) -> trio.SocketListener:
    """Bind ``address`` (``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``) for the scrape.

    Raises:
        BindError: the address could not be bound.
        ConfigError: an address that cannot be parsed.
    """
    sock = bind_one(address, Config())
    sock.listen(128)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def listener_url(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"http://{host}:{name[1]}"
    return f"unix:{name}"


async def serve_metrics(
    metrics: Metrics,
    listener: trio.SocketListener,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Task: answer every GET on ``listener`` with the scrape (like prometheus_client's
    own server, any path). One request per connection; plain HTTP."""
    url = listener_url(listener)
    log.info("metrics on %s", url)
    async with trio.open_nursery() as nursery:
        task_status.started(url)
        await trio.serve_listeners(partial_answer(metrics), [listener], handler_nursery=nursery)


def partial_answer(metrics: Metrics) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def answer(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                head = b""
                while b"\r\n\r\n" not in head and len(head) < MAX_METRICS_HEAD:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    head += data
                words = head.split(b"\r\n", 1)[0].split()
                if len(words) != 3 or words[0] not in (b"GET", b"HEAD"):
                    status, body, ctype = b"405 Method Not Allowed", b"", b"text/plain"
                else:
                    status, body, ctype = b"200 OK", metrics.exposition(), CONTENT_TYPE
                response = (
                    b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % (status, ctype, len(body))
                )
                if words and words[0] != b"HEAD":
                    response += body
                await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    return answer


async def run_with_metrics_listener(
    main: Callable[..., Awaitable[int]], *args: Any, bind: str | None
) -> int:
    """The supervisor's program: ``main(*args)``, with the scrape listener beside it.

    The supervisor is a small runner of its own: this is its nursery.
    """
    metrics = recorder()
    if bind is None or not isinstance(metrics, Metrics):
        return await main(*args)
    listener = bind_metrics(bind)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, metrics, listener)
        code = await main(*args)
        nursery.cancel_scope.cancel()
    return code
