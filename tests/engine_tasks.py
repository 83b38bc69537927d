"""Engine tasks and an app that uses them, for tests in-process and through the CLI.

Importable as ``tests.engine_tasks:NAME`` from the repository root. The app
logs one line per step so that a subprocess test can check the order of
events in stderr; in-process tests read :data:`events` instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import trio
import trio.lowlevel

from examples.engine_task import Engine
from examples.engine_task import engine_task as example_engine_task
from trio_launcher import current_engine, engine_cleanup_scope

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("tests.engine_tasks")
events: list[str] = []


def record(event: str) -> None:
    events.append(event)
    log.info("event: %s", event)


engine_task = partial(example_engine_task, load_seconds=0)
slow_start = partial(example_engine_task, load_seconds=2)


async def recorded_engine(
    *, task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED, load_seconds: float = 0
) -> None:
    """The example's engine task, recording its start and the end of its cleanup."""
    record("engine started")
    try:
        await example_engine_task(task_status=task_status, load_seconds=load_seconds)
    finally:
        record("engine cleanup done")


async def hanging_cleanup(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Cleanup that ignores cancellation for good: an unbounded shield."""
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            record("cleanup hangs")
            await trio.sleep_forever()


async def cut_cleanup(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Cleanup under engine_cleanup_scope() that would never end by itself."""
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with engine_cleanup_scope():
            record("cleanup hangs")
            await trio.sleep_forever()


async def blocking_load(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A load in a thread, which no cancellation can stop."""
    record("loading in a thread")
    await trio.to_thread.run_sync(time.sleep, 60)
    task_status.started()


async def returns_at_once(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()


async def crashes_while_loading(
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    await trio.lowlevel.checkpoint()
    raise OSError("model file missing")


class App:
    """GET /ask?q=   the engine's answer
    GET /slow?s=     sleeps s seconds, 200 "slept" (needs no engine)
    GET /slow-ask?s=&q=   sleeps s seconds, then asks the engine
    GET /wait-ask?q=      waits for ``release``, then asks the engine
    Lifespan events and answered requests are recorded.
    """

    def __init__(self) -> None:
        self.slow_started = trio.Event()
        self.waiting = trio.Event()  # a /wait-ask request is waiting for ``release``
        self.release = trio.Event()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                running = getattr(current_engine(), "is_running", None)
                record(f"lifespan {kind} (engine running: {running})")
                await send({"type": f"{message['type']}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        path = scope["path"]
        if path in ("/slow", "/slow-ask"):
            self.slow_started.set()
            log.info("slow request started")
            await trio.sleep(float(query.get("s", "1")))
        if path == "/wait-ask":
            self.waiting.set()
            await self.release.wait()
        if path in ("/ask", "/slow-ask", "/wait-ask"):
            engine: Engine = current_engine()
            body = (await engine.ask(query.get("q", "hi"))).encode()
        elif path == "/slow":
            body = b"slept"
        else:
            body = b"hello"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        record(f"answered {path}")


app = App()
