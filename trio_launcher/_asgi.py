"""The ASGI layer the runner puts around any app.

It answers the health path itself (the app may be busy or dead, the runner
knows better), refuses request heads over the limits with 431 for every
protocol (hypercorn has no header-count limit at all), and handles engine
errors.

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
are split by type so that ``trio.Cancelled`` is never swallowed, and a plain
error stays plain (one traceback in the log, not an ExceptionGroup tree).

Frameworks that turn handler exceptions into their own 500 (Quart does) hide
them from any middleware; ``trio_launcher.quart`` hooks into Quart for that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from ._errors import EngineDeadError, EngineGenerateError

log = logging.getLogger("trio_launcher")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENGINE_ERRORS: tuple[type[BaseException], ...] = (EngineDeadError, EngineGenerateError)


@dataclass(frozen=True)
class Limits:
    """Request-head limits applied to every protocol (HTTP/1.1 and HTTP/2).

    Attributes:
        max_header_count: most request headers; more get 431.
        max_head_size: most bytes in the request line/path and headers; more get 431.
    """

    max_header_count: int | None = 256
    max_head_size: int | None = None


class RunnerMiddleware:
    """The runner's layer around the app: health, head limits, engine errors.

    Args:
        app: the ASGI app to wrap.
        on_app_error: called with every exception the app raised (the dead
            check); must not raise.
        error_types: the exception types answered with a 500 JSON body.
        health_path: a GET/HEAD path the runner answers itself.
        health: returns ``(status, body)`` for the health path.
        limits: request-head limits.
    """

    def __init__(
        self,
        app: ASGIApp,
        on_app_error: Callable[[BaseException], None],
        error_types: tuple[type[BaseException], ...] = ENGINE_ERRORS,
        *,
        health_path: str | None = None,
        health: Callable[[], tuple[int, dict[str, Any]]] = lambda: (200, {}),
        limits: Limits = Limits(),
    ) -> None:
        self.app = app
        self.on_app_error = on_app_error
        self.error_types = error_types
        self.health_path = health_path
        self.health = health
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self._over_limit(scope)
        if refusal is not None:
            log.warning("431 for %s %s: %s", scope.get("method", "GET"), scope.get("path"),
                        refusal)  # fmt: skip
            if scope["type"] == "http":
                await send_json(send, 431, {"error": {"type": "HeadersTooLarge",
                                                      "message": refusal}})  # fmt: skip
            else:
                await send({"type": "websocket.close", "code": 1009})
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        if scope["path"] == self.health_path and scope["method"] in ("GET", "HEAD"):
            status, body = self.health()
            await send_json(send, status, body, head_only=scope["method"] == "HEAD")
            return
        await self._call_app(scope, receive, send)

    def _over_limit(self, scope: Scope) -> str | None:
        headers = scope.get("headers") or ()
        limits = self.limits
        if limits.max_header_count is not None and len(headers) > limits.max_header_count:
            return f"{len(headers)} headers, the limit is {limits.max_header_count}"
        if limits.max_head_size is not None:
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) + 4 for name, value in headers)
            if size > limits.max_head_size:
                return f"request head of {size} bytes, the limit is {limits.max_head_size}"
        return None

    async def _call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def runner_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, runner_send)
        except BaseException as exc:
            # Not ``except*``: it would wrap a plain error in a group, and the
            # log would show an ExceptionGroup tree for an ordinary bug.
            errors, _ = split_group(exc, Exception)
            if errors is None:
                raise  # trio.Cancelled, KeyboardInterrupt: never swallowed
            for leaf in leaves(errors):
                self.on_app_error(leaf)
            engine_errors, rest = split_group(exc, self.error_types)
            if engine_errors is None or started:
                raise
            first = next(leaves(engine_errors))
            log.error("%s in %s %s: %s", type(first).__name__, scope.get("method"),
                      scope.get("path"), first)  # fmt: skip
            await send_json(send, 500, error_body(first))
            if rest is not None:
                raise rest from None


def split_group(
    exc: BaseException, types: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[BaseException | None, BaseException | None]:
    """``(matching, rest)`` of ``exc`` for ``types``; a plain exception is not wrapped."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(types)
    return (exc, None) if isinstance(exc, types) else (None, exc)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc`` (itself, if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def error_body(exc: BaseException) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


async def send_json(send: Send, status: int, body: object, head_only: bool = False) -> None:
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
    await send({"type": "http.response.body", "body": b"" if head_only else data})


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
