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
  runner-ids-fixed  runner-ids, but every request gets the same ready-made id (benchmark
                only: what making an id costs, by difference with runner-ids)
  runner-bounds-off, runner-all-bounds  the bounds off (no body timeout), all on
  runner-health  the runner with --health-path /health
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config

from benchmarks.apps import app, quart_app

# serve_http's options for each runner variant (with an idle engine), beyond the defaults
# (lean transport, http="auto", request ids on, no metrics).
RUNNERS: dict[str, dict[str, Any]] = {
    "runner": {},
    "runner-idle": {},  # and the TLS refresher when TLS is on
    "runner-stock": {"transport": "hypercorn"},
    "runner-h11": {"http": "h11"},
    "runner-plain": {"request_ids": False},
    "runner-observed": {"metrics_path": "/metrics"},
    "runner-ids": {},
    "runner-ids-fixed": {},
    "runner-metrics": {"request_ids": False, "metrics_path": "/metrics"},
    "runner-bounds-off": {"body_timeout": None},
    "runner-all-bounds": {"limit_concurrency": 1000, "request_timeout": 30.0, "body_timeout": 60.0},
    "runner-health": {"health_path": "/health"},
}


class IdleEngine:
    errored = False
    is_running = True


def fix_request_ids() -> None:
    """Make the runner give every request one ready-made id (``runner-ids-fixed``): the
    same path through the middleware and the protocol, without making an id."""
    import itertools

    from trio_launcher import _logging, _runner

    class FixedIds(_logging.RequestIds):
        def __init__(self) -> None:
            super().__init__()
            self.new = itertools.repeat(next(self.new))

    _runner.RequestIds = FixedIds  # type: ignore[attr-defined]


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
    elif variant in RUNNERS:
        from trio_launcher import serve_http

        options = dict(RUNNERS[variant])
        if variant == "runner-idle":
            options["enable_ssl_refresh"] = config.ssl_enabled
        if variant == "runner-ids-fixed":
            fix_request_ids()
        trio.run(partial(serve_http, app, config, engine=IdleEngine(), **options))
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
    elif variant == "quart-runner":
        from trio_launcher import serve_http

        trio.run(partial(serve_http, quart_app(), config))
    elif variant == "quart-own":
        trio.run(partial(quart_app().run_task, host="127.0.0.1", port=port))
    else:
        raise SystemExit(f"unknown variant {variant!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
