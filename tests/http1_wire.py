"""Our HTTP/1.1 protocol without sockets: a recording transport, the protocol over it,
and a parser for the bytes it wrote (shared by the protocol, framing and differential
tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from trio_launcher._http1 import HTTP1


class FakeTransport:
    """The connection's side, recorded."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.idle = True
        self.closed = False
        self.heads = 0

    async def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.written += data

    def set_idle(self, idle: bool) -> None:
        self.idle = idle

    def head_started(self) -> None:
        self.heads += 1

    def close(self) -> None:
        self.closed = True


@asynccontextmanager
async def protocol(
    app: Any,
    *,
    client: tuple[str, int] = ("10.0.0.1", 5000),
    server: tuple[str, int] = ("127.0.0.1", 80),
    state: dict[str, Any] | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[HTTP1, FakeTransport]]:
    """Our HTTP/1.1 protocol serving ``app`` over a FakeTransport (``settings`` for the
    hypercorn Config, which sends no Date header); cancelled when the block ends."""
    config = Config.from_mapping({"include_date_header": False, **settings})
    async with trio.open_nursery() as nursery:
        transport = FakeTransport()
        wrapped: Any = wrap_app(app, config.wsgi_max_body_size, "asgi")
        http1 = HTTP1(
            wrapped,
            config,
            WorkerContext(None),
            nursery,
            transport,
            ssl=False,
            client=client,
            server=server,
            state={"k": 1} if state is None else state,
        )
        yield http1, transport
        nursery.cancel_scope.cancel()


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def responses(data: bytes | bytearray, head_only: bool = False) -> list[Response]:
    """Split bytes into responses (Content-Length or chunked)."""
    result = []
    rest = bytes(data)
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        body = b""
        if head_only or status in (100, 204, 304):
            pass
        elif b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, rest = rest[:size], rest[size:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2 :]
                if size == 0:
                    break
        else:
            body, rest = rest, b""
        result.append(Response(status, headers, body))
    return result
