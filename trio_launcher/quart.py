"""Quart-Trio glue: the only module that imports quart.

``serve_http`` calls :func:`install` by itself when it is given a Quart app;
there is nothing for the user to write. What it does, and why:

* Quart turns an exception raised in a handler into its own HTML 500 before
  any ASGI middleware sees it. Error handlers for the engine error types
  answer with the runner's JSON 500 and run the dead check; quart-trio tries
  them for each member of an exception group, so an ``EngineDeadError``
  raised inside a handler's nursery is caught too. Every other exception
  reaches the dead check through Quart's ``got_request_exception`` signal.
* Quart's ``RESPONSE_TIMEOUT`` (60 s by default) silently truncates any
  response that takes longer, streams included: a token stream from a slow
  model is cut with no error anywhere. We lift the default; set
  ``RESPONSE_TIMEOUT`` to something other than 60 to keep a limit.
* The keep-alive bug in FINDINGS (quart-trio cancels its request nursery on
  ``http.disconnect``, interrupting hypercorn's re-arm of the idle timer) is
  fixed in the runner's middleware, which sends a Quart app's final body in a
  shielded scope (only for Quart: a shielded scope costs ~3.5 us a request).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from quart import Quart
from quart.signals import got_request_exception

from ._asgi import error_body

log = logging.getLogger("trio_launcher")

QUART_DEFAULT_RESPONSE_TIMEOUT = 60


def install(
    app: Quart,
    on_app_error: Callable[[BaseException], None],
    error_types: tuple[type[BaseException], ...],
) -> None:
    """Hook the runner's engine-error handling into a Quart app (idempotent)."""
    if getattr(app, "_trio_launcher_installed", False):
        return
    app._trio_launcher_installed = True  # type: ignore[attr-defined]

    async def engine_error(error: BaseException) -> tuple[dict[str, Any], int]:
        on_app_error(error)
        log.error("%s in a request: %s", type(error).__name__, error)
        return error_body(error), 500

    for error_type in error_types:
        if issubclass(error_type, Exception):
            app.register_error_handler(error_type, engine_error)

    async def on_exception(sender: Any, exception: BaseException, **_: Any) -> None:
        on_app_error(exception)

    # weak=False: the receiver lives as long as the app, not as long as this frame.
    got_request_exception.connect(on_exception, app, weak=False)

    if app.config.get("RESPONSE_TIMEOUT") == QUART_DEFAULT_RESPONSE_TIMEOUT:
        app.config["RESPONSE_TIMEOUT"] = None
        log.info("Quart RESPONSE_TIMEOUT lifted (it silently cuts long streams)")
