"""ASGI apps and engines the tests serve, in-process and through the CLI.

Importable as ``tests.apps:NAME`` from the repository root.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.events
import trio

from trio_launcher import EngineDeadError, EngineGenerateError
from trio_launcher.testing import FakeEngine, FakePollingEngine, TLSFiles

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

engine = FakeEngine()
polling_engine = FakePollingEngine()


class App:
    """A small app with routes that misbehave on purpose.

    GET /            200 "hello"
    GET /slow?s=1    sleeps, then 200 "slept"
    GET /stream?n=5&delay=0.05   streams n chunks
    GET /raise/dead | /raise/generate | /raise/value | /raise/group-dead
    POST /kill       kills the module's engines
    Lifespan events are recorded in ``events``.
    """

    def __init__(self, fail_startup: bool = False) -> None:
        self.events: list[str] = []
        self.fail_startup = fail_startup
        self.requests_started = trio.Event()
        self.slow_started = trio.Event()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        assert scope["type"] == "http"
        self.requests_started.set()
        path = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        if path == "/":
            await respond(send, 200, b"hello")
        elif path == "/upload":
            await respond(send, 200, str(await body_size(receive)).encode())
        elif path == "/slow":
            self.slow_started.set()
            logging.getLogger("tests.apps").info("slow request started")
            await trio.sleep(float(query.get("s", "1")))
            await respond(send, 200, b"slept")
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(int(query.get("n", "5"))):
                await trio.sleep(float(query.get("delay", "0.05")))
                await send(
                    {"type": "http.response.body", "body": b"chunk%d\n" % i, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/raise/dead":
            raise EngineDeadError("engine is gone")
        elif path == "/raise/group-dead":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_raise_dead)
        elif path == "/raise/generate":
            raise EngineGenerateError("bad prompt")
        elif path == "/raise/value":
            raise ValueError("a bug in a handler")
        elif path == "/kill":
            engine.kill()
            polling_engine.kill()
            await respond(send, 202, b"killed")
        else:
            await respond(send, 404, b"not found")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.fail_startup:
                    await send({"type": "lifespan.startup.failed", "message": "no model"})
                    return
                self.events.append("startup")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.events.append("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _raise_dead() -> None:
    raise EngineDeadError("engine died inside a nursery")


async def body_size(receive: Receive) -> int:
    """Read a request body to its end; its length."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            return size


async def respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def json_body(data: bytes) -> Any:
    return json.loads(data)


app = App()
failing_app = App(fail_startup=True)


def broken_import() -> None:  # pragma: no cover - referenced by name only
    raise RuntimeError


async def vanishing_h2_client(port: int, streams: int) -> None:
    """An h2c client that opens streams and vanishes mid-response."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    for i in range(streams):
        conn.send_headers(
            1 + 2 * i,
            [
                (":method", "GET"),
                (":path", "/stream?n=50&delay=0.001"),
                (":scheme", "http"),
                (":authority", "x"),
            ],
            end_stream=True,
        )
    await stream.send_all(conn.data_to_send())
    with trio.move_on_after(0.02):
        await stream.receive_some(65536)
    await trio.aclose_forcefully(stream)  # gone, mid-response


async def h2_read(
    stream: trio.abc.Stream,
    conn: h2.connection.H2Connection,
    statuses: dict[int, str],
    flush: Callable[[], Awaitable[None]],
    ended: dict[int, str] | None = None,
) -> None:
    """One read of an HTTP/2 client connection: each response's ``:status`` into
    ``statuses`` and, with ``ended``, how each stream ended ("ended" or "reset");
    then ``flush`` what the client queued (ACKs, window updates)."""
    data = await stream.receive_some(65536)
    assert data, "the server closed the HTTP/2 connection"
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            statuses[event.stream_id] = dict(event.headers)[b":status"].decode()
        elif ended is not None and isinstance(event, h2.events.StreamEnded):
            ended[event.stream_id] = "ended"
        elif ended is not None and isinstance(event, h2.events.StreamReset):
            ended[event.stream_id] = "reset"
    await flush()


async def open_client(server_port: int, tls: TLSFiles | None, alpn: str) -> trio.abc.Stream:
    """A client connection to 127.0.0.1: plain, or TLS offering only ``alpn`` (checked)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", server_port)
    if tls is None:
        return tcp
    context = tls.client_context(http2=alpn == "h2")
    context.set_alpn_protocols([alpn])
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1", https_compatible=True)
    await stream.do_handshake()
    assert stream.selected_alpn_protocol() == alpn
    return stream
