"""A Quart-Trio service streaming tokens from a simulated trio engine as SSE.

Serve it (needs the ``quart`` extra: ``pip install -e '.[quart]'``)::

    trio-launcher examples.quart_service:app --engine examples.quart_service:engine \\
        --health-path /health --shutdown-delay 2

Then::

    curl -N 'localhost:8000/generate?tokens=20'   # server-sent events, one per token
    curl -X POST localhost:8000/admin/kill         # the engine dies: drain, exit 3
    curl localhost:8000/health                      # 200 while healthy, 503 after

When the engine dies mid-stream, the status (200) has long been sent and
cannot change. The stream therefore ends with a final ``event: error`` that
clients can tell from a normal ``event: done``, and the runner drains and
exits with code 3.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import trio
from quart import Response, request
from quart_trio import QuartTrio

from examples.service import SimulatedEngine
from trio_launcher import EngineDeadError

engine = SimulatedEngine()
app = QuartTrio(__name__)


@app.before_serving
async def start_engine() -> None:
    await app.nursery.start(engine.run)


@app.get("/")
async def index() -> dict[str, str]:
    return {"engine": "dead" if engine.errored else "running"}


def sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@app.get("/generate")
async def generate() -> Response:
    tokens = int(request.args.get("tokens", "10"))
    if engine.errored:
        raise EngineDeadError("the simulated engine is dead")  # -> JSON 500, exit 3

    async def events() -> AsyncIterator[bytes]:
        try:
            async for token in engine.generate(tokens):
                yield sse("token", token)
        except EngineDeadError as exc:
            # Headers are out: tell the client in-band, then end the stream.
            yield sse("error", {"type": "EngineDeadError", "message": str(exc)})
            return
        yield sse("done", {})

    return Response(events(), mimetype="text/event-stream")


@app.post("/admin/kill")
async def kill() -> tuple[str, int]:
    engine.kill()
    return "killed\n", 202


if __name__ == "__main__":  # pragma: no cover
    trio.run(app.run_task)
