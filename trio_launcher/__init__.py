"""trio_launcher: run an ASGI service under trio with one nursery that owns it all."""

from ._control import StopReason as StopReason
from ._engine_task import current_engine as current_engine
from ._engine_task import engine_cleanup_scope as engine_cleanup_scope
from ._errors import AppStartupError as AppStartupError
from ._errors import BindError as BindError
from ._errors import CertificateError as CertificateError
from ._errors import ConfigError as ConfigError
from ._errors import EngineDeadError as EngineDeadError
from ._errors import EngineGenerateError as EngineGenerateError
from ._errors import ExitCode as ExitCode
from ._errors import ForcedShutdown as ForcedShutdown
from ._errors import LauncherError as LauncherError
from ._errors import OptionError as OptionError
from ._options import ServeOptions as ServeOptions
from ._runner import ServerHandle as ServerHandle
from ._runner import serve_http as serve_http
from ._tls import CertificateRefresher as CertificateRefresher
from ._watchdog import Engine as Engine

__version__ = "0.1.0"

__all__ = [
    "AppStartupError",
    "BindError",
    "CertificateError",
    "CertificateRefresher",
    "ConfigError",
    "Engine",
    "EngineDeadError",
    "EngineGenerateError",
    "ExitCode",
    "ForcedShutdown",
    "LauncherError",
    "OptionError",
    "ServeOptions",
    "ServerHandle",
    "StopReason",
    "current_engine",
    "engine_cleanup_scope",
    "serve_http",
]
