"""The smallest app trio_launcher serves: a bare ASGI callable, no framework.

trio-launcher examples.bare_asgi:app --health-path /health
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


async def app(scope: Message, receive: Callable[[], Awaitable[Message]], send: Send) -> None:
    if scope["type"] != "http":
        return  # no lifespan: the runner serves without it
    await respond(send, b"hello from a bare ASGI app\n")


async def respond(send: Send, body: bytes, content_type: bytes = b"text/plain") -> None:
    """A whole 200 response: the head with the body's length, then the body."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
