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
handlers are per app: a context variable set around each request connects
them, as in ``trio_launcher.quart``.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._asgi import ASGIApp, Receive, Scope, Send, error_body
from ._errors import leaves

log = logging.getLogger("trio_launcher")

_on_app_error: contextvars.ContextVar[Callable[[BaseException], None]] = contextvars.ContextVar(
    "trio_launcher_starlette_on_app_error"
)
_INSTALLED = "_trio_launcher_installed"
Handler = Callable[[Request, Any], Any]


def install(
    app: Any,
    on_app_error: Callable[[BaseException], None],
    error_types: tuple[type[BaseException], ...],
) -> ASGIApp:
    """Prepare a Starlette/FastAPI app for the runner; returns the ASGI callable to serve.

    Args:
        app: a ``starlette.applications.Starlette`` (or ``fastapi.FastAPI``).
        on_app_error: the runner's dead check, called with every handler error.
        error_types: exceptions answered with a 500 JSON body.
    """
    handlers: dict[Any, Handler] = app.exception_handlers
    changed = False
    for error_type in error_types:
        own = handlers.get(error_type)
        if own is None:
            handlers[error_type] = _engine_error_handler
            changed = True
        elif not getattr(own, _INSTALLED, False):
            handlers[error_type] = _keep_handler(own)
            changed = True
    own_group = handlers.get(ExceptionGroup)
    if not getattr(own_group, _INSTALLED, False):
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
        on_app_error: Callable[[BaseException], None],
        error_types: tuple[type[BaseException], ...],
    ) -> None:
        self.app = app
        self.on_app_error = on_app_error
        self.error_types = error_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _on_app_error.set(self.on_app_error)
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            for cause in _engine_causes(exc, self.error_types):
                self.on_app_error(cause)
            raise
        finally:
            _on_app_error.reset(token)


def _engine_causes(
    exc: BaseException, error_types: tuple[type[BaseException], ...]
) -> Iterator[BaseException]:
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
    check = _on_app_error.get(None)
    if check is not None:
        check(error)
    log.error("%s in a Starlette handler: %s", type(error).__name__, error)
    return JSONResponse(error_body(error), status_code=500)


async def _engine_error_handler(request: Request, error: Exception) -> Response:
    return _engine_error_response(error)


setattr(_engine_error_handler, _INSTALLED, True)


def _keep_handler(handler: Handler) -> Handler:
    """The app's own handler for an engine error type, with the dead check before it."""

    async def checked(request: Request, error: Exception) -> Any:
        check = _on_app_error.get(None)
        if check is not None:
            check(error)
        result = handler(request, error)
        if hasattr(result, "__await__"):
            result = await result
        return result

    setattr(checked, _INSTALLED, True)
    return checked


def _group_handler(error_types: tuple[type[BaseException], ...], own: Handler | None) -> Handler:
    async def handle_group(request: Request, group: BaseExceptionGroup[Any]) -> Any:
        engine_errors, _ = group.split(error_types)
        if engine_errors is None:
            if own is None:
                raise group
            result = own(request, group)
            return (await result) if hasattr(result, "__await__") else result
        inside = list(leaves(engine_errors))
        check = _on_app_error.get(None)
        if check is not None:
            for leaf in inside[1:]:
                check(leaf)
        return _engine_error_response(inside[0])

    setattr(handle_group, _INSTALLED, True)
    return handle_group
