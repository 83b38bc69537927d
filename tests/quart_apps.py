"""Quart-Trio apps for the tests (``tests.quart_apps:app``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio
from quart import Response, request
from quart_trio import QuartTrio

from trio_launcher import EngineDeadError
from trio_launcher.testing import FakeEngine

engine = FakeEngine()
app = QuartTrio(__name__)
events: list[str] = []


@app.before_serving
async def startup() -> None:
    events.append("startup")


@app.after_serving
async def shutdown() -> None:
    events.append("shutdown")


@app.get("/")
async def index() -> str:
    return "hello"


async def _die() -> None:
    raise EngineDeadError("died inside a handler's nursery")


@app.get("/dead-in-nursery")
async def dead_in_nursery() -> str:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_die)
    return "unreachable"


@app.get("/value-error")
async def value_error() -> str:
    raise ValueError("a plain bug")


@app.get("/stream")
async def stream() -> Response:
    count = int(request.args.get("n", "100"))
    delay = float(request.args.get("delay", "0.05"))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(count):
            await trio.sleep(delay)
            yield b"data: %d\n\n" % i

    return Response(chunks(), mimetype="text/event-stream")


@app.post("/kill")
async def kill() -> tuple[str, int]:
    engine.kill()
    return "killed", 202
