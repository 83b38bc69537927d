"""The scrape listener of ``metrics_bind``.

The metrics path on the main listener, the request ids and the per-request
measurement are part of the runner's middleware (``_asgi.RunnerMiddleware``:
one ASGI level and one ``send`` wrapper for all of it, which is what keeps
their cost near 3 % of a hello-world request).

The separate listener (``metrics_bind``) is deliberately tiny: one request per
connection, plain HTTP, any path answers with the scrape (like
prometheus_client's own server). It is meant for a private address.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._asgi import METRICS_CONTENT_TYPE
from ._hypercorn import Config
from ._metrics import Metrics, recorder
from ._ports import bind_one

log = logging.getLogger("trio_launcher")

MAX_METRICS_HEAD = 16384


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
                    status, body, ctype = b"200 OK", metrics.exposition(), METRICS_CONTENT_TYPE
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
