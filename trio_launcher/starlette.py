"""Starlette and FastAPI glue: the only module that imports starlette.

``serve_http`` calls :func:`install` by itself when the app is a Starlette app
(FastAPI's class derives from Starlette's; both are recognised by class names,
so Starlette is imported only when used). Starlette runs under trio through
anyio, so nothing else is needed for it to run; what needs fixing is errors.

Starlette's ``ServerErrorMiddleware`` is the outermost layer of every app: it
answers an unhandled exception with a plain-text 500 and only then re-raises
it, so the runner's middleware sees the error after the response started and
cannot answer the JSON 500 (vLLM's clients parse that body). Exception
handlers registered on the app run further in, in ``ExceptionMiddleware``,
before anything was sent. So we register handlers there:

* for each engine error type: answer the runner's JSON 500 and run the dead
  check (a handler the app registered itself for that type is kept; the dead
  check runs before it);
* for exception groups (an engine error raised in a task group of a handler
  arrives inside one, and Starlette matches handlers by the exception's own
  type only): if an engine error is inside, the same JSON 500; otherwise the
  group goes on as before (to the app's own group handler, if it has one);
* every other error still reaches the runner's middleware, where the dead
  check runs; an engine error that cuts a stream after its headers (Starlette
  raises ``RuntimeError`` from it) is found through the cause chain.

Starlette builds its middleware stack, handlers included, on the first
request; if that already happened the stack is dropped so that it is built
again with our handlers. The dead check is per ``serve_http`` call while
handlers are per app: ``trio_launcher._glue.current_dead_check`` connects them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import _glue
from ._asgi import ASGIApp, Receive, Scope, Send, error_body
from ._errors import leaves

log = logging.getLogger("trio_launcher")

Handler = Callable[[Request, Any], Any]


def install(app: Any, on_app_error: _glue.OnAppError, error_types: _glue.ErrorTypes) -> ASGIApp:
    """Prepare a Starlette app (or FastAPI's) for the runner; returns the ASGI
    callable to serve (the arguments are described in ``trio_launcher._glue``)."""
    handlers: dict[Any, Handler] = app.exception_handlers
    claimed = _glue.claimed_handlers(handlers, error_types, _engine_error_handler, _keep_handler)
    handlers.update(claimed)
    changed = bool(claimed)
    own_group = handlers.get(ExceptionGroup)
    if not _glue.is_ours(own_group):
        handlers[ExceptionGroup] = _group_handler(error_types, own_group)
        changed = True
    if changed and getattr(app, "middleware_stack", None) is not None:
        app.middleware_stack = None  # built before: build it again with our handlers
    return _Glue(app, on_app_error, error_types)


class _Glue:
    """Sets the dead check for the request; finds engine errors behind a cut stream."""

    def __init__(
        self,
        app: ASGIApp,
        on_app_error: _glue.OnAppError,
        error_types: _glue.ErrorTypes,
    ) -> None:
        self.app = app
        self.on_app_error = on_app_error
        self.error_types = error_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _glue.current_dead_check.set(self.on_app_error)
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            for cause in _engine_causes(exc, self.error_types):
                self.on_app_error(cause)
            raise
        finally:
            _glue.current_dead_check.reset(token)


def _engine_causes(exc: BaseException, error_types: _glue.ErrorTypes) -> Iterator[BaseException]:
    """Engine errors behind ``exc``: in its groups or its ``__cause__`` chain."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, error_types) and current is not exc:
            yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        if current.__cause__ is not None:
            todo.append(current.__cause__)


def _engine_error_response(error: BaseException) -> Response:
    _glue.dead_check(error)
    log.error("%s in a Starlette handler: %s", type(error).__name__, error)
    return JSONResponse(error_body(error), status_code=500)


@_glue.ours
async def _engine_error_handler(request: Request, error: Exception) -> Response:
    return _engine_error_response(error)


def _keep_handler(handler: Handler) -> Handler:
    """The app's own handler for an engine error type, with the dead check before it."""

    async def checked(request: Request, error: Exception) -> Any:
        _glue.dead_check(error)
        result = handler(request, error)
        if hasattr(result, "__await__"):
            result = await result
        return result

    return _glue.ours(checked)


def _group_handler(error_types: _glue.ErrorTypes, own: Handler | None) -> Handler:
    async def handle_group(request: Request, group: BaseExceptionGroup[Any]) -> Any:
        engine_errors, _ = group.split(error_types)
        if engine_errors is None:
            if own is None:
                raise group
            result = own(request, group)
            return (await result) if hasattr(result, "__await__") else result
        inside = list(leaves(engine_errors))
        for leaf in inside[1:]:
            _glue.dead_check(leaf)
        return _engine_error_response(inside[0])

    return _glue.ours(handle_group)
