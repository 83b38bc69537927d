"""A FastAPI app (and a plain Starlette one) that misbehave on purpose.

Importable as ``tests.fastapi_apps:app`` from the repository root. They run
under trio through anyio's trio backend, as a FastAPI service (vLLM's API
server is one) does under trio_launcher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from trio_launcher import EngineDeadError, EngineGenerateError

app = FastAPI()


@app.get("/")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/dead")
async def dead() -> None:
    raise EngineDeadError("engine is gone")


@app.get("/dead-in-group")
async def dead_in_group() -> None:
    async def fail() -> None:
        raise EngineDeadError("engine is gone (in a task group)")

    async with anyio.create_task_group() as group:
        group.start_soon(fail)
        await anyio.sleep_forever()


@app.get("/generate-error")
async def generate_error() -> None:
    raise EngineGenerateError("one bad request")


@app.get("/value-error")
async def value_error() -> None:
    raise ValueError("an ordinary bug")


@app.get("/stream-dies")
async def stream_dies() -> StreamingResponse:
    async def tokens() -> AsyncIterator[bytes]:
        yield b"token-0\n"
        raise EngineDeadError("engine died mid-stream")

    return StreamingResponse(tokens(), media_type="text/plain")


def with_own_handler() -> FastAPI:
    """A FastAPI app with its own handler for EngineGenerateError (kept by the glue)."""
    own = FastAPI()

    @own.get("/generate-error")
    async def fail() -> None:
        raise EngineGenerateError("overloaded")

    @own.exception_handler(EngineGenerateError)
    async def busy(request: Request, exc: EngineGenerateError) -> JSONResponse:
        return JSONResponse({"retry": True, "why": str(exc)}, status_code=503)

    return own


async def _starlette_dead(request: Request) -> PlainTextResponse:
    raise EngineDeadError("engine is gone (starlette)")


async def _starlette_hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


starlette_app = Starlette(routes=[Route("/", _starlette_hello), Route("/dead", _starlette_dead)])
