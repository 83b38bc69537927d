"""Every error trio_launcher raises, in one tree.

::

    LauncherError                      base of everything below
    ├── ConfigError                    bad option, file or app path (CLI exit 2)
    │   ├── OptionError                one option of serve_http has a bad value
    │   └── CertificateError           a certificate, key or CA file that cannot be used
    ├── BindError (also OSError)       an address could not be bound (CLI exit 4)
    ├── AppStartupError                the app's lifespan startup failed (CLI exit 1)
    ├── ForcedShutdown                 a second signal stopped the drain (CLI exit 128+N)
    ├── EngineDeadError                the engine died; the server drained (CLI exit 3)
    └── EngineGenerateError            one request failed in the engine; never fatal

The CLI's exit codes (:class:`ExitCode`) live here too, next to the errors
that choose them, so that the CLI and the workers' supervisor agree.

Messages are built from fields, so code that catches an error can read the
address, the errno or the signal instead of parsing text. OS failures stay
``OSError`` subclasses and keep their ``errno``.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import trio


class ExitCode(enum.IntEnum):
    """The CLI's exit codes (128+N, a stop forced by a second signal N, is not listed)."""

    OK = 0
    ERROR = 1  # unexpected error, including a failing app startup
    USAGE = 2  # bad usage or config: a flag, a file, an app that won't import
    ENGINE_DEAD = 3
    BIND = 4  # an address could not be bound


class LauncherError(Exception):
    """Base class of every error raised by trio_launcher."""


class ConfigError(LauncherError):
    """A bad option, config file, app path or certificate: fix the input and retry."""


class OptionError(ConfigError):
    """One option has a bad value.

    Attributes:
        option: the option's name as ``serve_http`` spells it (``health_path``);
            the CLI prints its flag instead (``--health-path``).
        problem: what is wrong with it (``must start with '/'``).
    """

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = problem
        super().__init__(f"{option} {problem}")

    def with_name(self, name: str) -> str:
        """The message with the option called ``name`` (a CLI flag)."""
        return f"{name} {self.problem}"


class CertificateError(ConfigError):
    """A certificate, key or CA bundle that cannot be used; names the file.

    Attributes:
        path: the file at fault.
        reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class BindError(LauncherError, OSError):
    """An address could not be bound.

    Attributes:
        address: the bind address as the user wrote it (``127.0.0.1:8000``,
            ``unix:/run/app.sock``, ``fd://3``).
        holder_pid: PID of the process that holds the port, where psutil can see it.
        holder_cmdline: that process's command line.
    """

    def __init__(
        self,
        errno: int | None,
        strerror: str,
        address: str,
        holder_pid: int | None = None,
        holder_cmdline: str | None = None,
    ) -> None:
        super().__init__(errno, strerror)
        self.address = address
        self.holder_pid = holder_pid
        self.holder_cmdline = holder_cmdline

    def __str__(self) -> str:
        text = f"cannot bind {self.address}: {self.strerror}"
        if self.errno is not None:
            text += f" (errno {self.errno})"
        if self.holder_pid is not None:
            text += f"; held by PID {self.holder_pid}"
            if self.holder_cmdline:
                text += f" ({self.holder_cmdline})"
        return text


class AppStartupError(LauncherError):
    """The application's lifespan startup failed or timed out."""


class ForcedShutdown(LauncherError):
    """A second SIGINT/SIGTERM arrived during the drain and stopped the server at once.

    Attributes:
        signum: the signal number that forced the stop.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")


class EngineDeadError(LauncherError):
    """The engine died; it cannot serve any request again.

    Raise it from request handlers when the engine is gone; ``serve_http`` raises
    it (after draining) when the watchdog or a handler found the engine dead.
    """


class EngineGenerateError(LauncherError):
    """One request failed inside the engine; the engine itself is fine."""


@contextmanager
def readable_errors() -> Iterator[None]:
    """Unwrap an exception group where exactly one real error is inside.

    Used where a person reads the error (the top of ``serve_http``, the
    testing plugin): the error is raised alone, printed once (not again
    inside its group), with its own cause kept (an ``EngineDeadError`` raised
    from the engine task's exception). Cancellation is never swallowed:
    ``trio.Cancelled`` stays in the group that is re-raised.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inside = list(leaves(group))
        real = [e for e in inside if not isinstance(e, trio.Cancelled)]
        if len(real) == 1 and len(real) == len(inside):
            raise real[0] from real[0].__cause__


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``, however deeply grouped (itself, if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def describe(exc: BaseException) -> str:
    """``Type: message`` of each exception inside ``exc``, joined by ``; ``."""
    return "; ".join(f"{type(e).__name__}: {e}" for e in leaves(exc))
