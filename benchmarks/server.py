"""One benchmark server process: ``python -m benchmarks.server VARIANT PORT [CERT KEY]``.

Variants:
  runner        trio_launcher.serve_http (signals, watchdog with an engine), lean transport
  runner-stock  the same with transport="hypercorn" (hypercorn's own trio connection)
  hypercorn     bare hypercorn.trio.serve
  quart-runner  Quart-Trio app through serve_http
  quart-own     Quart-Trio app through QuartTrio.run_task
  runner-idle   serve_http with an engine (5 s watchdog) and a TLS refresher (1 s)
  runner-h11    the runner (lean transport) with http="h11" (hypercorn's HTTP/1.1 protocol)
  uvicorn       uvicorn, http=h11, asyncio loop (pip install -e .[bench])
  uvicorn-fast  uvicorn, http=httptools, uvloop
  runner-plain  runner without request ids and metrics (the observability baseline)
  runner-observed  runner with request ids and metrics (--metrics-path /metrics)
  runner-ids, runner-metrics  one of the two
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from typing import Literal

import trio
from hypercorn.config import Config

from benchmarks.apps import app, quart_app


class IdleEngine:
    errored = False
    is_running = True


def main(argv: list[str]) -> None:
    variant, port = argv[0], int(argv[1])
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.errorlog = None
    config.accesslog = None
    if len(argv) >= 4:
        config.certfile, config.keyfile = argv[2], argv[3]
    logging.basicConfig(level=logging.WARNING)
    if variant == "hypercorn":
        from hypercorn.trio import serve

        trio.run(partial(serve, app, config))  # type: ignore[arg-type]
    elif variant in ("runner", "runner-idle", "runner-stock", "runner-h11"):
        from trio_launcher import serve_http

        idle = variant == "runner-idle"
        transport: Literal["lean", "hypercorn"] = (
            "hypercorn" if variant == "runner-stock" else "lean"
        )
        http: Literal["auto", "h11"] = "h11" if variant == "runner-h11" else "auto"
        trio.run(
            partial(
                serve_http,
                app,
                config,
                engine=IdleEngine(),
                transport=transport,
                http=http,
                enable_ssl_refresh=idle and config.ssl_enabled,
            )
        )
    elif variant in ("uvicorn", "uvicorn-fast"):
        import uvicorn

        fast = variant == "uvicorn-fast"
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            http="httptools" if fast else "h11",
            loop="uvloop" if fast else "asyncio",
            log_level="warning",
            access_log=False,
            backlog=2048,
        )
    elif variant in ("runner-plain", "runner-observed", "runner-ids", "runner-metrics"):
        from trio_launcher import serve_http

        ids = variant in ("runner-observed", "runner-ids")
        metrics = variant in ("runner-observed", "runner-metrics")
        trio.run(
            partial(
                serve_http,
                app,
                config,
                engine=IdleEngine(),
                request_ids=ids,
                metrics_path="/metrics" if metrics else None,
            )
        )
    elif variant == "quart-runner":
        from trio_launcher import serve_http

        trio.run(partial(serve_http, quart_app(), config))
    elif variant == "quart-own":
        trio.run(partial(quart_app().run_task, host="127.0.0.1", port=port))
    else:
        raise SystemExit(f"unknown variant {variant!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
