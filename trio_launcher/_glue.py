"""Which framework glue an app needs, found without importing any framework.

``trio_launcher.quart`` and ``trio_launcher.starlette`` are the only modules
that import their framework; an app is recognised by the top-level package of
the classes in its type's MRO, so serving a bare ASGI callable imports
neither. Each glue module's ``install(app, on_app_error, error_types)`` takes
the app, the runner's dead check (called with every error a handler raised)
and the exception types answered with a 500 JSON body, and returns the ASGI
callable to serve.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

OnAppError = Callable[[BaseException], None]
ErrorTypes = tuple[type[BaseException], ...]


def _from_package(app: object, package: str) -> bool:
    return any(cls.__module__.split(".")[0] == package for cls in type(app).__mro__)


def is_quart_app(app: object) -> bool:
    """A Quart app, recognised without importing quart."""
    return _from_package(app, "quart")


def is_starlette_app(app: object) -> bool:
    """A Starlette or FastAPI app, recognised without importing either."""
    return _from_package(app, "starlette")


def install_glue(app: Any, on_app_error: OnAppError, error_types: ErrorTypes) -> Any:
    """The app as the runner serves it: through its framework's glue, if it has one."""
    if is_quart_app(app):
        from .quart import install as install_quart

        return install_quart(app, on_app_error, error_types)
    if is_starlette_app(app):
        from .starlette import install as install_starlette

        return install_starlette(app, on_app_error, error_types)
    return app


current_dead_check: contextvars.ContextVar[OnAppError] = contextvars.ContextVar(
    "trio_launcher_on_app_error"
)
"""The dead check of the ``serve_http`` serving this request. Error handlers
are per app while the dead check is per ``serve_http`` call: the glue sets this
around each request and its error handlers call :func:`dead_check`."""


def dead_check(error: BaseException) -> None:
    """Run the dead check of the request being served (none outside a request)."""
    check = current_dead_check.get(None)
    if check is not None:
        check(error)


_INSTALLED = "_trio_launcher_installed"
_H = TypeVar("_H")


def ours(handler: _H) -> _H:
    """Mark ``handler`` as installed by the glue (never wrapped again)."""
    setattr(handler, _INSTALLED, True)
    return handler


def is_ours(handler: object) -> bool:
    return bool(getattr(handler, _INSTALLED, False))


def claimed_handlers(
    handlers: Mapping[Any, _H], error_types: ErrorTypes, engine_error: _H, keep: Callable[[_H], _H]
) -> dict[type[BaseException], _H]:
    """The error handlers to register for ``error_types``.

    ``engine_error`` (the JSON 500) where the app has no handler of its own;
    the app's own wrapped by ``keep`` (the dead check runs before it); a
    handler installed before (serving the same app again) stays as it is.
    """
    claimed: dict[type[BaseException], _H] = {}
    for error_type in error_types:
        own = handlers.get(error_type)
        if own is None:
            claimed[error_type] = engine_error
        elif not is_ours(own):
            claimed[error_type] = keep(own)
    return claimed
