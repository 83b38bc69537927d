"""A small service with a simulated trio engine that can be made to die.

Serve it (from the repository root)::

    trio-launcher examples.service:app --engine examples.service:engine

Then::

    curl localhost:8000/                       # {"engine": "running"}
    curl -N 'localhost:8000/generate?tokens=5'  # streams five tokens
    curl -X POST localhost:8000/admin/kill      # the engine dies: drain, exit 3

It is a bare ASGI app so that it needs nothing beyond trio_launcher itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio

from trio_launcher import EngineDeadError

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class SimulatedEngine:
    """Stands in for a model engine: a background trio task that makes tokens.

    It speaks trio_launcher's engine protocol: ``errored``, ``is_running`` and
    ``wait_dead()``.
    """

    def __init__(self, token_delay: float = 0.05) -> None:
        self.token_delay = token_delay
        self.errored = False
        self.is_running = False
        self._dead = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The engine's own loop; runs until killed or cancelled."""
        self.is_running = True
        task_status.started()
        try:
            await self._dead.wait()
        finally:
            self.is_running = False

    def kill(self) -> None:
        """Simulate a fatal engine failure."""
        self.errored = True
        self.is_running = False
        self._dead.set()

    async def wait_dead(self) -> None:
        await self._dead.wait()

    async def generate(self, tokens: int) -> AsyncIterator[str]:
        for i in range(tokens):
            if self.errored:
                raise EngineDeadError("the simulated engine was killed")
            await trio.sleep(self.token_delay)
            yield f"token-{i} "


engine = SimulatedEngine()


async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    if path == "/" and method == "GET":
        state = "dead" if engine.errored else "running"
        await _respond(send, 200, json.dumps({"engine": state}).encode(), b"application/json")
    elif path == "/generate" and method == "GET":
        query = parse_qs(scope["query_string"].decode())
        tokens = int(query.get("tokens", ["10"])[0])
        if engine.errored:
            raise EngineDeadError("the simulated engine is dead")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        async for token in engine.generate(tokens):
            await send({"type": "http.response.body", "body": token.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"\n", "more_body": False})
    elif path == "/admin/kill" and method == "POST":
        engine.kill()
        await _respond(send, 202, b"killed\n", b"text/plain")
    else:
        await _respond(send, 404, b"not found\n", b"text/plain")


async def _lifespan(receive: Receive, send: Send) -> None:
    async with trio.open_nursery() as nursery:
        await receive()  # lifespan.startup
        await nursery.start(engine.run)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        nursery.cancel_scope.cancel()
    await send({"type": "lifespan.shutdown.complete"})


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type)],
        }
    )
    await send({"type": "http.response.body", "body": body})
