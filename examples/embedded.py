"""serve_http embedded beside other tasks in an existing trio program.

    python -m examples.embedded            # serves on 127.0.0.1:8000 until Ctrl-C

The program owns its nursery; the server is one task in it. A ticker task
runs beside it, and the program asks the server to stop (gracefully) when
the ticker is done, or on Ctrl-C / SIGTERM which serve_http handles itself.
"""

from __future__ import annotations

import logging
import sys

import trio
from hypercorn.config import Config

from examples.bare_asgi import app
from trio_launcher import ServerHandle, serve_http


async def ticker(handle: ServerHandle, ticks: int) -> None:
    for i in range(ticks):
        print(f"tick {i}: serving on {', '.join(handle.urls)}", flush=True)
        await trio.sleep(1)
    handle.shutdown()  # graceful: drain, then lifespan shutdown


async def serve(
    config: Config,
    others: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[ServerHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(app, config, task_status=task_status)
    others.cancel()  # the server is gone (a signal?): the rest of the program stops too


async def main(bind: str = "127.0.0.1:8000", ticks: int = 3600) -> None:
    config = Config()
    config.bind = [bind]
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve, config, nursery.cancel_scope)
        nursery.start_soon(ticker, handle, ticks)
    print("server stopped; the program goes on to clean up", flush=True)


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    bind = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8000"
    trio.run(main, bind)
