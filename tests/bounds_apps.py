"""Apps and engines for the bounds tests (limits, deadlines, health probe).

Importable as ``tests.bounds_apps:NAME`` for the CLI tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from trio_launcher.testing import FakePollingEngine

from .apps import body_size, respond

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BoundsApp:
    """Handlers that record how they ended.

    GET /            200 "hello"
    GET /hold        waits until ``release`` is set, then 200 (counts ``running``)
    GET /forever     sleeps forever in its own nursery (a child task too)
    GET /stream      starts a response, then sleeps forever
    POST /upload     reads the whole body, answers its size
    GET /slow?s=N    sleeps N seconds (for the CLI tests)

    ``ended`` maps each request path to how its handler ended: ``"returned"``,
    ``"Cancelled"`` or an exception name; ``child`` likewise for /forever's child.
    """

    def __init__(self) -> None:
        self.release = trio.Event()
        self.running = 0
        self.peak = 0
        self.entered = trio.Event()
        self.ended: dict[str, list[str]] = {}
        self.child: list[str] = []
        self.ended_event = trio.Event()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan
        path = scope["path"]
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.entered.set()
        how = "returned"
        try:
            await self._route(path, scope, receive, send)
        except trio.Cancelled:
            how = "Cancelled"
            raise
        except BaseException as exc:  # a group holding Cancelled, for one
            how = _describe(exc)
            raise
        finally:
            self.running -= 1
            self.ended.setdefault(path, []).append(how)
            self.ended_event.set()

    async def _route(self, path: str, scope: Message, receive: Receive, send: Send) -> None:
        if path == "/":
            await respond(send, 200, b"hello")
        elif path == "/hold":
            await self.release.wait()
            await respond(send, 200, b"released")
        elif path == "/forever":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._child_forever)
                await trio.sleep_forever()
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"started\n", "more_body": True})
            await trio.sleep_forever()
        elif path == "/upload":
            await respond(send, 200, str(await body_size(receive)).encode())
        elif path == "/slow":
            query = scope["query_string"].decode()
            await trio.sleep(float(query.partition("s=")[2] or "1"))
            await respond(send, 200, b"slept")
        else:
            await respond(send, 404, b"not found")

    async def _child_forever(self) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.child.append("Cancelled")
            raise


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "+".join(sorted({_describe(e) for e in exc.exceptions}))
    return type(exc).__name__


class ProbedEngine(FakePollingEngine):
    """An engine with ``check_health()``: healthy, hanging or raising on demand."""

    def __init__(self, mode: str = "healthy") -> None:
        super().__init__()
        self.mode = mode
        self.calls = 0

    async def check_health(self) -> None:
        self.calls += 1
        if self.mode == "hang":
            await trio.sleep_forever()
        if self.mode == "raise":
            raise RuntimeError("engine core is not responding")


app = BoundsApp()
hanging_engine = ProbedEngine("hang")
raising_engine = ProbedEngine("raise")
healthy_engine = ProbedEngine("healthy")
