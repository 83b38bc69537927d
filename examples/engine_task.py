"""A trio engine task: a queue consumer that answers requests through a memory channel.

Serve it (from the repository root)::

    trio-launcher examples.engine_task:app --engine-task examples.engine_task:engine_task \\
        --health-path /health

Then::

    curl -i localhost:8000/health         # 503 {"status": "starting"} while the model loads
    curl 'localhost:8000/ask?q=hello'     # {"answer": "HELLO"}
    curl 'localhost:8000/ask?q=crash'     # the engine task raises: 500, drain, exit 3

The engine task is an ordinary trio task. It loads its model, hands the
runner an :class:`Engine` through ``task_status.started(engine)`` and then
consumes the queue. Requests reach the engine with
``trio_launcher.current_engine()``. On SIGTERM the runner drains the server
while this task still answers, runs the app's lifespan shutdown, and only then
cancels the task, whose cleanup runs under ``engine_cleanup_scope()``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio
import trio.lowlevel

from trio_launcher import EngineDeadError, current_engine, engine_cleanup_scope

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Job = tuple[str, trio.MemorySendChannel[str]]

log = logging.getLogger("examples.engine_task")


class Engine:
    """The engine's front door: put a question in the queue, await the answer.

    ``errored`` and ``is_running`` make it an engine for the runner too (its
    health JSON and the dead check).
    """

    def __init__(self, jobs: trio.MemorySendChannel[Job]) -> None:
        self._jobs = jobs
        self.errored = False
        self.is_running = True

    async def ask(self, question: str) -> str:
        reply_send, reply_receive = trio.open_memory_channel[str](1)
        try:
            await self._jobs.send((question, reply_send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise EngineDeadError("the engine is gone") from None
        async with reply_receive:
            try:
                return await reply_receive.receive()
            except trio.EndOfChannel:
                raise EngineDeadError("the engine died before it answered") from None


async def answer(question: str) -> str:
    """The "model": one question at a time."""
    if question == "crash":
        raise RuntimeError("the model crashed")
    await trio.lowlevel.checkpoint()
    return question.upper()


async def engine_task(
    *, task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED, load_seconds: float = 1.0
) -> None:
    """Load, report ready with the Engine, answer questions until cancelled."""
    jobs_send, jobs_receive = trio.open_memory_channel[Job](64)
    await trio.sleep(load_seconds)  # loading the model
    engine = Engine(jobs_send)
    try:
        task_status.started(engine)
        async for question, reply in jobs_receive:
            async with reply:  # closed on the way out: the asker is never left waiting
                await reply.send(await answer(question))
    except Exception:
        engine.errored = True
        raise
    finally:
        engine.is_running = False
        _refuse_waiting(jobs_receive)  # queued askers get EngineDeadError
        jobs_receive.close()  # and so do new ones
        with engine_cleanup_scope():  # shielded, bounded by --engine-shutdown-timeout
            await trio.sleep(0.1)  # freeing the model
            log.info("engine task: cleanup done")


def _refuse_waiting(jobs: trio.MemoryReceiveChannel[Job]) -> None:
    """Close the reply channel of every job still queued."""
    while True:
        try:
            _, reply = jobs.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return
        reply.close()


async def app(scope: Message, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]  # startup / shutdown
            log.info(
                "lifespan %s; the engine is %s",
                kind,
                "running" if current_engine().is_running else "stopped",
            )
            await send({"type": f"{message['type']}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "http":
        return
    query = parse_qs(scope["query_string"].decode())
    if scope["path"] == "/ask":
        engine: Engine = current_engine()
        reply = await engine.ask(query.get("q", [""])[0])
        await _respond(send, 200, {"answer": reply})
    else:
        await _respond(send, 404, {"error": "not found"})


async def _respond(send: Send, status: int, body: object) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
