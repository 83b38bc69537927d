"""The apps every benchmark serves, identical for every server variant."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from examples.bare_asgi import respond  # the same plain-text response as the example

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HELLO = b"Hello, world!"
CHUNK = b"x" * 64
BODY_64K = b"b" * 65536


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer lifespan startup and shutdown until shutdown."""
    while True:
        message = await receive()
        kind = message["type"].split(".")[-1]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def app(scope: Message, receive: Receive, send: Send) -> None:
    """``/`` hello world, ``/stream`` ten chunks, ``/body`` 64 KiB, ``/slow`` 0.2 s."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/slow":  # for the SIGTERM-with-a-request-in-flight benchmark
        import trio

        await trio.sleep(0.2)
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(10):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await respond(send, BODY_64K if path == "/body" else HELLO)


def quart_app() -> Any:
    """The same hello world as a Quart-Trio app."""
    from quart_trio import QuartTrio

    quart = QuartTrio("bench")

    @quart.get("/")
    async def hello() -> bytes:
        return HELLO

    return quart
