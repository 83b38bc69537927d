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

from collections.abc import Callable
from typing import Any

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
