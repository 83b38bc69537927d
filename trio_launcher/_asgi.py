"""The ASGI layer the runner puts around any app.

vLLM registers FastAPI exception handlers so that an engine error becomes a
500 and a dead engine stops the server. We do the same below any framework,
as plain ASGI middleware:

* ``EngineDeadError``, ``EngineGenerateError`` and any type the user adds
  become a 500 with a small JSON body, if the response has not started;
* after any error from the app, the runner's dead check runs: an
  ``EngineDeadError`` or an engine that reports itself dead starts the drain;
* after a streaming response has started its status cannot change; the error
  propagates, hypercorn ends the response (the client sees a cut stream, not
  a fake clean end) and the dead check has still run.

Errors raised inside the app's own nurseries arrive as exception groups; they
are matched with ``except*`` so that ``trio.Cancelled`` is never swallowed.

Frameworks that turn handler exceptions into their own 500 (Quart does) hide
them from any middleware; ``trio_launcher.quart`` hooks into Quart for that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._errors import EngineDeadError, EngineGenerateError

log = logging.getLogger("trio_launcher")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENGINE_ERRORS: tuple[type[BaseException], ...] = (EngineDeadError, EngineGenerateError)


class EngineErrorMiddleware:
    """Engine errors -> 500 JSON, then the dead check.

    Args:
        app: the ASGI app to wrap.
        on_app_error: called with every exception the app raised (the dead
            check); must not raise.
        error_types: the exception types answered with a 500 JSON body.
    """

    def __init__(
        self,
        app: ASGIApp,
        on_app_error: Callable[[BaseException], None],
        error_types: tuple[type[BaseException], ...] = ENGINE_ERRORS,
    ) -> None:
        self.app = app
        self.on_app_error = on_app_error
        self.error_types = error_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except* self.error_types as group:
            for exc in group.exceptions:
                self.on_app_error(exc)
            if started:
                raise
            first = group.exceptions[0]
            log.error(
                "%s in %s %s: %s",
                type(first).__name__,
                scope.get("method"),
                scope.get("path"),
                first,
            )
            await send_json(send, 500, error_body(first))
        except* Exception as group:
            for exc in group.exceptions:
                self.on_app_error(exc)
            raise


def error_body(exc: BaseException) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


async def send_json(send: Send, status: int, body: object) -> None:
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
    await send({"type": "http.response.body", "body": data, "more_body": False})


def describe_routes(app: object) -> list[str] | None:
    """One line per route the app exposes, or None if it cannot tell.

    Knows Quart/Flask/Werkzeug (``url_map``) and Starlette/FastAPI (``routes``).
    """
    url_map = getattr(app, "url_map", None)
    if url_map is not None and hasattr(url_map, "iter_rules"):
        lines = []
        for rule in url_map.iter_rules():
            methods = ", ".join(sorted(getattr(rule, "methods", None) or ()))
            lines.append(f"{rule.rule} [{methods}]" if methods else str(rule.rule))
        return lines
    routes = getattr(app, "routes", None)
    if isinstance(routes, list | tuple):
        lines = []
        for route in routes:
            path = getattr(route, "path", None)
            if path is None:
                continue
            methods = ", ".join(sorted(getattr(route, "methods", None) or ()))
            lines.append(f"{path} [{methods}]" if methods else str(path))
        return lines
    return None
