"""Quart-Trio glue: the only module that imports quart.

``serve_http`` calls :func:`install` by itself when the app is a ``QuartTrio``
(it looks at the app's class names, so Quart is imported only when used).
Nothing is left for the user to write. Three things need fixing between
Quart-Trio and the runner:

* **Engine errors.** Quart turns exceptions raised in handlers into its own
  HTML 500 before any ASGI middleware can see them. So we register Quart error
  handlers for the engine error types: they answer the same 500 JSON body as
  the runner's middleware and run the runner's dead check (a handler the app
  registered itself for one of these types is kept; the dead check runs
  before it). Quart-Trio looks
  for a handler inside exception groups too, so an ``EngineDeadError`` raised
  in a nursery in a handler is found. Every other error reaches Quart's
  ``got_request_exception`` signal, where the dead check runs as well.
* **Keep-alive.** Quart-Trio cancels its per-request nursery when the client
  disconnects, and that cancellation lands in hypercorn's re-arming of the
  idle timer during the last ``http.response.body`` send. Idle keep-alive
  connections were then never closed (a graceful shutdown waited the whole
  ``graceful_timeout`` for them) and ``Connection: close`` responses hung. The
  final body is therefore sent in a shielded cancel scope (bounded, so a
  client that never reads cannot hold it forever).
* **Long streams.** Quart's ``RESPONSE_TIMEOUT`` (60 s) silently cuts any
  response that takes longer, tokens streamed by a model included. If the app
  still has Quart's default, it is set to None (no limit); a value the app set
  itself is kept and logged.
* **Route templates for metrics.** The matched rule (``/items/<int:id>``) is
  put in ``scope["route"]`` before the handler runs, so that the request
  duration histogram is labelled by route template, never by raw path.

The runner's dead check is per ``serve_http`` call, while error handlers are
per app: ``trio_launcher._glue.current_dead_check`` connects the two.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
from quart import Quart, Response, got_request_exception, request

from . import _glue
from ._asgi import ASGIApp, Message, Receive, Scope, Send, error_body
from ._hypercorn import quart_error_handlers

log = logging.getLogger("trio_launcher")

FINAL_SEND_TIMEOUT = 10.0
"""Longest wait for the shielded final send of a response."""


def install(app: Any, on_app_error: _glue.OnAppError, error_types: _glue.ErrorTypes) -> ASGIApp:
    """Prepare a ``quart_trio.QuartTrio`` app for the runner; returns the ASGI
    callable to serve (the arguments are described in ``trio_launcher._glue``)."""
    if not _glue.is_ours(app):
        _glue.ours(app)
        got_request_exception.connect(_dead_check_receiver, app, weak=False)
        app.before_request(_record_route)
    own = quart_error_handlers(app)
    claimed = _glue.claimed_handlers(
        own, error_types, _engine_error_handler, partial(_keep_handler, app)
    )
    for error_type, handler in claimed.items():
        app.register_error_handler(error_type, handler)
    default = Quart.default_config["RESPONSE_TIMEOUT"]
    timeout = app.config.get("RESPONSE_TIMEOUT")
    if timeout is not None and timeout == default:
        app.config["RESPONSE_TIMEOUT"] = None
        log.info("quart: RESPONSE_TIMEOUT set to None so that long streams are not cut")
    elif timeout is not None:
        log.info("quart: RESPONSE_TIMEOUT is %s s: longer responses are cut", timeout)
    return _Glue(app, on_app_error)


class _Glue:
    """Sets the dead check for the request and shields the final body send."""

    def __init__(self, app: ASGIApp, on_app_error: _glue.OnAppError) -> None:
        self.app = app
        self.on_app_error = on_app_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def shielded_final_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + FINAL_SEND_TIMEOUT
                    await send(message)
            else:
                await send(message)

        token = _glue.current_dead_check.set(self.on_app_error)
        try:
            await self.app(scope, receive, shielded_final_send)
        finally:
            _glue.current_dead_check.reset(token)


def _keep_handler(app: Any, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The app's own handler for an engine error type, with the dead check before it."""
    call = app.ensure_async(handler)

    async def checked(error: BaseException) -> Any:
        _glue.dead_check(error)
        return await call(error)

    return _glue.ours(checked)


@_glue.ours
async def _engine_error_handler(error: BaseException) -> Response:
    _glue.dead_check(error)
    log.error("%s in a Quart handler: %s", type(error).__name__, error)
    return Response(json.dumps(error_body(error)), status=500, content_type="application/json")


async def _record_route() -> None:
    rule = request.url_rule
    if rule is not None:
        request.scope["route"] = rule.rule  # type: ignore[typeddict-unknown-key]


def _dead_check_receiver(sender: Any, exception: BaseException, **extra: Any) -> None:
    _glue.dead_check(exception)
