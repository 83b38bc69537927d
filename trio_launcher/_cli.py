"""argv -> options -> serve_http; one-line errors and honest exit codes.

Exit codes, so that systemd's ``Restart=on-failure`` and Kubernetes see why:

====  ==========================================================
0     clean shutdown (signal or request, drained)
1     unexpected error (including a failing app startup)
2     bad usage or config: a flag, a file, an app that won't import
3     the engine died
4     an address could not be bound
128+N a second signal N forced the stop (130 for SIGINT)
====  ==========================================================

Every error is one line on stderr naming the thing at fault; the traceback
follows only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import ssl
import sys
import threading
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, NoReturn

import trio
from hypercorn.config import Config

from . import _logging
from ._engine_task import DEFAULT_ENGINE_SHUTDOWN_TIMEOUT
from ._errors import (
    AppStartupError,
    BindError,
    ConfigError,
    EngineDeadError,
    ExitCode,
    ForcedShutdown,
    LauncherError,
    OptionError,
)
from ._metrics import supervisor_metrics
from ._observe import run_with_metrics_listener
from ._options import ServeOptions, option_flags
from ._ports import bind_sockets
from ._proxy import DEFAULT_FORWARDED_ALLOW_IPS, parse_trusted
from ._reload import watch_lifeline as watch_reload_parent
from ._runner import ServerHandle, exit_process_if_engine_stuck, serve_http
from ._signals import absorb_signals_for_process, ignore_signals_until_exit, obey_parent
from ._systemd import listen_fds, notify_parent_instead
from ._worker import (
    ask_to_retire,
    report_cut_requests,
    take_worker_role,
    worker_argv,
    worker_max_requests,
)
from ._workers import Recycling, run_workers

log = logging.getLogger("trio_launcher")

PROG = "trio-launcher"
DEFAULT_BACKLOG = 2048
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _natural_int(text: str) -> int:
    return _whole_number(text, 0)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 0-65535")
    return value


def _address_list(text: str) -> str:
    try:
        parse_trusted(text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ciphers(text: str) -> str:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).set_ciphers(text)
    except ssl.SSLError:
        raise argparse.ArgumentTypeError(f"{text!r} selects no cipher OpenSSL knows") from None
    return text


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        # An abbreviation (--worker for --workers) is a usage error: flags are
        # passed on to worker processes by their full names only.
        allow_abbrev=False,
        description="Serve an ASGI app under trio with hypercorn: drain on SIGTERM, "
        "stop on engine death, honest exit codes.",
        epilog="exit codes: 0 clean, 1 error, 2 usage/config, 3 engine died, "
        "4 cannot bind, 128+N forced by a second signal N",
    )
    add = parser.add_argument
    add("app", metavar="MODULE:APP", help="the ASGI app to serve, e.g. myservice.app:app")
    engines = parser.add_mutually_exclusive_group()
    engines.add_argument(
        "--engine",
        metavar="MODULE:ATTR",
        help="engine object with errored/is_running "
        "(and optionally async wait_dead()); its death stops the server with exit 3",
    )
    engines.add_argument(
        "--engine-task",
        metavar="MODULE:ATTR",
        help="async function run as the engine task (trio's start protocol): started "
        "before the app, 503 until then, stopped after the drain; its end is the "
        "engine's death (exit 3)",
    )
    add(
        "--engine-shutdown-timeout",
        type=_positive_seconds,
        default=DEFAULT_ENGINE_SHUTDOWN_TIMEOUT,
        metavar="S",
        help="seconds the cancelled engine task has to clean up (default 10)",
    )
    add(
        "--bind",
        "-b",
        action="append",
        metavar="ADDR",
        help="HOST:PORT, [V6]:PORT, unix:PATH or fd://N; repeatable (default: the sockets "
        "systemd passed, else 127.0.0.1:8000)",
    )
    uvicorn = parser.add_argument_group(
        "uvicorn-style", "the flags of uvicorn that mean the same here (see docs/cli.md)"
    )
    uvicorn.add_argument(
        "--host",
        metavar="HOST",
        help="listen on HOST (with --port; default 127.0.0.1): one --bind HOST:PORT; "
        "not together with --bind",
    )
    uvicorn.add_argument(
        "--port",
        type=_port,
        metavar="PORT",
        help="listen on PORT (with --host; default 8000); 0 picks a free port",
    )
    uvicorn.add_argument(
        "--uds",
        metavar="PATH",
        help="listen on the Unix socket PATH (the same as --bind unix:PATH)",
    )
    uvicorn.add_argument(
        "--root-path",
        metavar="PATH",
        help="the app is mounted at PATH behind a proxy (the ASGI root_path)",
    )
    uvicorn.add_argument(
        "--proxy-headers",
        action="store_true",
        help="believe X-Forwarded-For/-Proto/-Host from --forwarded-allow-ips peers "
        "(client address, scheme, host)",
    )
    uvicorn.add_argument(
        "--forwarded-allow-ips",
        type=_address_list,
        metavar="IPS",
        help="comma-separated addresses or networks of trusted proxies, * for any "
        "(default 127.0.0.1)",
    )
    uvicorn.add_argument(
        "--timeout-keep-alive",
        type=_positive_seconds,
        metavar="S",
        help="close an idle keep-alive connection after S seconds (default 5)",
    )
    uvicorn.add_argument(
        "--reload",
        action="store_true",
        help="development only: restart the server when a .py file changes "
        "(needs the reload extra: pip install 'trio-launcher[reload]')",
    )
    uvicorn.add_argument(
        "--reload-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory watched by --reload (repeatable; default the current directory)",
    )
    add(
        "--graceful-timeout",
        type=_seconds,
        metavar="S",
        help="how long in-flight requests may run on after a drain starts (default 3)",
    )
    add(
        "--watchdog-interval",
        type=_positive_seconds,
        default=5.0,
        metavar="S",
        help="seconds between engine polls (default 5; engines with wait_dead() are "
        "noticed at once)",
    )
    add(
        "--keep-alive-on-engine-death",
        action="store_true",
        default=None,
        help="keep serving when the engine dies (also env "
        "TRIO_LAUNCHER_KEEP_ALIVE_ON_ENGINE_DEATH=1)",
    )
    add(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="serve with N worker processes sharing the sockets (default 1, or the "
        "config file's workers); SIGHUP then restarts them one by one",
    )
    recycling = parser.add_argument_group(
        "worker recycling (a worker past a limit is replaced: the new one serves first)"
    )
    recycling.add_argument(
        "--max-requests",
        type=_positive_int,
        metavar="N",
        help="replace a worker after N requests (also the config file's max_requests)",
    )
    recycling.add_argument(
        "--max-requests-jitter",
        type=_natural_int,
        metavar="N",
        help="add 0..N (random, per worker) to --max-requests to spread the replacements",
    )
    recycling.add_argument(
        "--worker-max-rss",
        type=_positive_number,
        metavar="MIB",
        help="replace a worker whose resident memory exceeds MIB mebibytes",
    )
    recycling.add_argument(
        "--worker-lifetime",
        type=_positive_seconds,
        metavar="S",
        help="replace a worker after S seconds (spread over S..1.1 S)",
    )
    add(
        "--transport",
        choices=("lean", "hypercorn"),
        default="lean",
        help="connection layer: lean (trio_launcher's own, default) or hypercorn's stock one",
    )
    add(
        "--http",
        choices=("auto", "httptools", "h11"),
        default="auto",
        help="HTTP/1.1 protocol: httptools (strict and fast), h11 (hypercorn's); "
        "auto (default) is httptools on the lean transport",
    )
    add(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        help="runner and server log level (default: loglevel from --config, else info); "
        "debug also prints tracebacks after errors",
    )
    add(
        "--log-format",
        choices=_logging.LOG_FORMATS,
        default="text",
        help="runner and access lines as text or one JSON object per line; ISO 8601 UTC "
        "times (default text)",
    )
    add(
        "--config",
        metavar="FILE.toml",
        help="hypercorn TOML config (loglevel included); flags override it",
    )
    add("--version", action="version", version=f"%(prog)s {_version()}")
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--health-path",
        metavar="PATH",
        help="answer GET PATH with 200 while serving with a live engine, "
        "503 once stopping or the engine is dead",
    )
    serving.add_argument(
        "--shutdown-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="after SIGTERM keep serving S seconds with readiness 503, then drain (default 0)",
    )
    serving.add_argument(
        "--max-head-size",
        type=_positive_int,
        metavar="BYTES",
        help="largest request head; larger gets 431",
    )
    serving.add_argument(
        "--max-header-count",
        type=_positive_int,
        default=256,
        metavar="N",
        help="most request headers; more get 431 (default 256)",
    )
    serving.add_argument(
        "--header-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="S",
        help="a request head must arrive within S seconds of its first byte, "
        "else 408 and close (default 10)",
    )
    serving.add_argument("--access-log", metavar="FILE", help="access log file, - for stdout")
    serving.add_argument(
        "--access-log-exclude",
        action="append",
        default=[],
        metavar="PATH",
        help="leave PATH out of the access log (repeatable)",
    )
    _add_bound_flags(parser)
    seen = parser.add_argument_group("observability (docs/observability.md)")
    seen.add_argument(
        "--metrics-path",
        metavar="PATH",
        help="answer GET PATH with the Prometheus scrape on the main listener",
    )
    seen.add_argument(
        "--metrics-bind",
        metavar="ADDR",
        help="serve the Prometheus scrape on a separate plain-HTTP listener (HOST:PORT)",
    )
    seen.add_argument(
        "--no-request-id",
        dest="request_ids",
        action="store_false",
        help="do not add X-Request-Id to responses (default: keep or make one)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--certfile",
        "--ssl-certfile",
        metavar="F",
        help="server certificate chain (PEM); turns TLS on",
    )
    tls.add_argument("--keyfile", "--ssl-keyfile", metavar="F", help="private key of --certfile")
    tls.add_argument(
        "--ssl-keyfile-password", metavar="PASSWORD", help="password of an encrypted --keyfile"
    )
    tls.add_argument(
        "--ssl-ciphers",
        type=_ciphers,
        metavar="CIPHERS",
        help="OpenSSL cipher list for TLS 1.2 (default ECDHE+AESGCM)",
    )
    tls.add_argument(
        "--ca-certs", "--ssl-ca-certs", metavar="F", help="CA bundle for client certificates"
    )
    tls.add_argument(
        "--verify-mode",
        choices=("none", "optional", "required"),
        help="client certificates: none, optional or required (mTLS)",
    )
    tls.add_argument(
        "--ssl-refresh",
        action="store_true",
        help="reload the certificate files when they change (SIGHUP always does)",
    )
    tls.add_argument(
        "--ssl-refresh-interval",
        type=_positive_seconds,
        default=1.0,
        metavar="S",
        help="seconds between checks of the certificate files (default 1)",
    )
    return parser


def _add_bound_flags(parser: argparse.ArgumentParser) -> None:
    """Limits and deadlines (docs/limits.md); each sets the option of its name."""
    bounds = parser.add_argument_group("limits and deadlines (see docs/limits.md)")
    add = bounds.add_argument
    add(
        "--request-timeout",
        type=_positive_seconds,
        metavar="S",
        help="a response not started within S seconds: 504, handler cancelled (default off)",
    )
    add(
        "--limit-concurrency",
        type=_positive_int,
        metavar="N",
        help="most requests in flight; more get 503 at once (default no limit)",
    )
    add(
        "--body-timeout",
        type=_positive_seconds,
        default=60.0,
        metavar="S",
        help="request body allowance: S s plus 1 s per KiB received; slower gets 408 (default 60)",
    )
    add(
        "--startup-timeout",
        type=_positive_seconds,
        metavar="S",
        help="most seconds the app's lifespan startup may take (default no limit)",
    )
    add(
        "--engine-health-interval",
        type=_positive_seconds,
        default=10.0,
        metavar="S",
        help="seconds between calls of the engine's check_health(), if any (default 10)",
    )
    add(
        "--engine-health-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="S",
        help="a check_health() that raises or takes longer means the engine died (default 10)",
    )


BOUND_OPTIONS = (
    "request_timeout",
    "limit_concurrency",
    "body_timeout",
    "startup_timeout",
    "engine_health_interval",
    "engine_health_timeout",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code.

    With ``argv=None`` (the console script, ``python -m trio_launcher``) it owns
    the process: signals are ignored from the end of the run until exit, so
    the exit code stays the one chosen here.
    """
    try:
        return _main(argv)
    finally:
        if argv is None and threading.current_thread() is threading.main_thread():
            ignore_signals_until_exit()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(f"{exc} (see {PROG} --help)", ExitCode.USAGE)
    try:
        base = load_toml_config(opts.config) if opts.config else Config()
        opts.log_level = _log_level(opts.log_level, base, opts.config)
    except ConfigError as exc:
        _setup_logging("info")
        return _fail(str(exc), ExitCode.USAGE, opts.log_level == "debug")
    debug = opts.log_level == "debug"
    _setup_logging(opts.log_level, opts.log_format)
    orders = take_worker_role()
    if orders is not None:
        if problem := _not_for_a_worker(opts):
            return _fail(f"{problem} (see {PROG} --help)", ExitCode.USAGE)
        # A SIGINT/SIGTERM that reaches a starting worker directly (systemd's
        # control group) must not kill it: the parent's order to drain follows.
        absorb_signals_for_process()
    try:
        config = build_config(opts, base)
        if opts.reload:
            if orders is not None or (opts.workers or 1) > 1:
                raise ConfigError("--reload and --workers do not mix: --reload is for development")
            from ._reload import run_reloading

            return run_reloading(list(argv if argv is not None else sys.argv[1:]), opts.reload_dir)
        if orders is None:
            count = opts.workers if opts.workers is not None else max(config.workers, 1)
            recycling = _recycling(opts, config)
            if count > 1 or recycling.active:
                return _run_workers(parser, opts, config, count, recycling)
        else:
            # A worker: the parent owns workers, binding and recycling.
            config.workers = 1
            config.max_requests = worker_max_requests()
            config.max_requests_jitter = 0
            obey_parent(orders)
            notify_parent_instead()
        sys.path.insert(0, os.getcwd())
        app = import_from_string(opts.app, "app")
        if not callable(app):
            raise ConfigError(
                f"app {opts.app!r} is not an ASGI callable (it is a {type(app).__name__})"
            )
        engine = import_from_string(opts.engine, "engine") if opts.engine else None
        task = import_from_string(opts.engine_task, "engine task") if opts.engine_task else None
        exit_process_if_engine_stuck(_exit_now if argv is None else None)
        absorb_signals_for_process()
        watch_reload_parent()  # a child of --reload: drain when the parent dies
        options = options_from_args(opts, engine, task)
        if orders is not None:
            options = options.replace(on_max_requests=ask_to_retire)
        started = _Started()
        try:
            trio.run(partial(serve_http, app, config, options=options, task_status=started))
        finally:
            if started.handle is not None:  # a worker tells its parent what its drain cut
                report_cut_requests(started.handle.cut_requests)
    except OptionError as exc:
        return _fail(exc.with_name(flag_for(exc.option)), ExitCode.USAGE, debug)
    except ConfigError as exc:
        return _fail(str(exc), ExitCode.USAGE, debug)
    except BindError as exc:
        return _fail(str(exc), ExitCode.BIND, debug)
    except EngineDeadError as exc:
        return _fail(str(exc), ExitCode.ENGINE_DEAD, debug)
    except ForcedShutdown as exc:
        _fail(str(exc), 0, debug)
        return 128 + exc.signum
    except AppStartupError as exc:
        return _fail(str(exc), ExitCode.ERROR, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", 128 + signal.SIGINT, debug)
    except Exception as exc:
        return _fail(f"unexpected {_describe(exc)}", ExitCode.ERROR, debug)
    return ExitCode.OK


KEEP_ALIVE_ENV = "TRIO_LAUNCHER_KEEP_ALIVE_ON_ENGINE_DEATH"
"""vLLM's variable for ``--keep-alive-on-engine-death``; read by the CLI only."""


def options_from_args(
    opts: argparse.Namespace,
    engine: object | None,
    engine_task: Callable[..., Awaitable[object]] | None = None,
) -> ServeOptions:
    """The runner's options from the parsed flags (and vLLM's environment variable)."""
    keep_alive = opts.keep_alive_on_engine_death
    if keep_alive is None:
        keep_alive = os.environ.get(KEEP_ALIVE_ENV, "") in ("1", "true", "yes")
    return ServeOptions(
        engine=engine,
        engine_task=engine_task,
        engine_shutdown_timeout=opts.engine_shutdown_timeout,
        watchdog_interval=opts.watchdog_interval,
        keep_alive_on_engine_death=keep_alive,
        enable_ssl_refresh=opts.ssl_refresh,
        ssl_refresh_interval=opts.ssl_refresh_interval,
        health_path=opts.health_path,
        shutdown_delay=opts.shutdown_delay,
        max_header_count=opts.max_header_count,
        max_head_size=opts.max_head_size,
        access_log_exclude=tuple(opts.access_log_exclude),
        transport=opts.transport,
        proxy_headers=opts.proxy_headers,
        forwarded_allow_ips=(
            tuple(ip.strip() for ip in opts.forwarded_allow_ips.split(",") if ip.strip())
            if opts.forwarded_allow_ips
            else DEFAULT_FORWARDED_ALLOW_IPS
        ),
        **{name: getattr(opts, name) for name in BOUND_OPTIONS},
        http=opts.http,
        header_timeout=opts.header_timeout,
        metrics_path=opts.metrics_path,
        metrics_bind=opts.metrics_bind,
        request_ids=opts.request_ids,
    )


def flag_for(option: str) -> str:
    """The CLI flag that sets ``option`` (its own name if it has none)."""
    return option_flags().get(option) or option


class _Started:
    """serve_http's ``task_status`` when nothing else waits for it: keeps the handle."""

    handle: ServerHandle | None = None

    def started(self, value: ServerHandle | None = None) -> None:
        self.handle = value


def _not_for_a_worker(opts: argparse.Namespace) -> str | None:
    """A worker never starts workers, binds, or recycles: that is the parent's job."""
    if opts.workers is not None and opts.workers > 1:
        return "--workers: a worker process cannot start workers of its own"
    for address in opts.bind or ():
        if not address.startswith("fd://"):
            return f"--bind: a worker serves the sockets its parent bound (fd://N), not {address}"
    for name in ("max_requests", "max_requests_jitter", "worker_max_rss", "worker_lifetime"):
        if getattr(opts, name) is not None:
            return f"--{name.replace('_', '-')}: the parent process recycles workers, not a worker"
    return None


def _recycling(opts: argparse.Namespace, config: Config) -> Recycling:
    """The recycling limits: flags first, then the config file's max_requests."""
    max_requests = opts.max_requests if opts.max_requests is not None else config.max_requests
    jitter = opts.max_requests_jitter
    if jitter is None:
        jitter = config.max_requests_jitter if max_requests is not None else 0
    if jitter and max_requests is None:
        raise ConfigError("--max-requests-jitter needs --max-requests")
    return Recycling(max_requests, jitter, opts.worker_max_rss, opts.worker_lifetime)


def _run_workers(
    parser: argparse.ArgumentParser,
    opts: argparse.Namespace,
    config: Config,
    count: int,
    recycling: Recycling,
) -> int:
    """The parent of ``--workers N``: bind once, supervise; BindError -> exit 4."""
    if config.ssl_enabled and config.insecure_bind:
        raise ConfigError("--workers: the config file's insecure_bind beside TLS is not supported")
    config.workers = 1  # we bind once for all: no SO_REUSEPORT
    sockets = bind_sockets(config)
    try:
        argv = worker_argv(parser, opts, sockets, sys.executable)
    except BaseException:
        sockets.close()
        raise
    absorb_signals_for_process()
    serve = partial(run_workers, argv, count, sockets, recycling=recycling)
    if opts.metrics_path is None and opts.metrics_bind is None:
        return trio.run(serve)
    with supervisor_metrics():  # the workers' multiprocess directory
        return trio.run(partial(run_with_metrics_listener, serve, bind=opts.metrics_bind))


def _exit_now(outcome: LauncherError | None) -> None:
    """The engine task outlived its shutdown timeout: exit without it, with the
    code the stop would have given (nothing in trio can end such a task)."""
    code: int = ExitCode.OK
    if isinstance(outcome, ForcedShutdown):
        _fail(str(outcome), 0)
        code = 128 + outcome.signum
    elif isinstance(outcome, EngineDeadError):
        code = _fail(str(outcome), ExitCode.ENGINE_DEAD)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _fail(message: str, code: int, debug: bool = False) -> int:
    line = f"{PROG}: error: {message}".replace("\n", " ")
    if debug and sys.exc_info()[1] is not None:
        log.exception(line)
    else:
        print(line, file=sys.stderr, flush=True)
    return code


def _setup_logging(level: str, log_format: _logging.LogFormat = "text") -> None:
    _logging.configure(level, log_format)


VERIFY_MODES = {"none": "CERT_NONE", "optional": "CERT_OPTIONAL", "required": "CERT_REQUIRED"}


def listen_addresses(opts: argparse.Namespace) -> list[str]:
    """``--bind`` addresses, or the one that ``--host``/``--port`` describe, plus ``--uds``."""
    binds = list(opts.bind or [])
    if opts.host is not None or opts.port is not None:
        if binds:
            raise ConfigError("--host/--port and --bind both say where to listen: use one")
        host = opts.host if opts.host is not None else "127.0.0.1"
        port = opts.port if opts.port is not None else 8000
        binds.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if opts.uds is not None:
        binds.append(f"unix:{opts.uds}")
    return binds


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trio-launcher")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _log_level(flag: str | None, config: Config, path: str | None) -> str:
    """``--log-level``, else the TOML file's ``loglevel``, else info."""
    if flag is not None:
        return flag
    level = str(config.loglevel or "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"config file {path}: loglevel {config.loglevel!r} is not one of "
            f"{', '.join(LOG_LEVELS)}"
        )
    return level


def build_config(opts: argparse.Namespace, config: Config | None = None) -> Config:
    """hypercorn Config from ``--config`` (or ``config``, read from it) with the flags
    laid over it."""
    if config is None:
        config = load_toml_config(opts.config) if opts.config else Config()
    if config.backlog == Config.backlog:
        # hypercorn's 100 overflows when a thousand clients connect at once
        # (a client then waits for SYN retries): the kernel caps it anyway.
        config.backlog = DEFAULT_BACKLOG
    binds = listen_addresses(opts)
    if binds:
        config.bind = binds
    elif activated := listen_fds():
        log.info("systemd socket activation: serving descriptors %s", activated)
        config.bind = [f"fd://{fd}" for fd in activated]
    if opts.graceful_timeout is not None:
        config.graceful_timeout = opts.graceful_timeout
    for name in ("certfile", "keyfile", "ca_certs"):
        value = getattr(opts, name)
        if value is not None:
            setattr(config, name, value)
    if opts.forwarded_allow_ips is not None and not opts.proxy_headers:
        raise ConfigError("--forwarded-allow-ips needs --proxy-headers")
    if opts.reload_dir and not opts.reload:
        raise ConfigError("--reload-dir needs --reload")
    if opts.root_path is not None:
        config.root_path = opts.root_path
    if opts.timeout_keep_alive is not None:
        config.keep_alive_timeout = opts.timeout_keep_alive
    if opts.ssl_keyfile_password is not None:
        config.keyfile_password = opts.ssl_keyfile_password
    if opts.ssl_ciphers is not None:
        config.ciphers = opts.ssl_ciphers
    if opts.verify_mode is not None:
        config.verify_mode = getattr(ssl.VerifyMode, VERIFY_MODES[opts.verify_mode])
    if (config.certfile is None) != (config.keyfile is None):
        missing = "--keyfile" if config.keyfile is None else "--certfile"
        raise ConfigError(f"TLS needs both --certfile and --keyfile: {missing} is missing")
    if opts.ssl_refresh and not config.ssl_enabled:
        raise ConfigError("--ssl-refresh needs --certfile and --keyfile")
    if opts.access_log is not None:
        if opts.access_log != "-":
            try:
                open(opts.access_log, "a").close()
            except OSError as exc:
                raise ConfigError(f"access log {opts.access_log}: {exc.strerror or exc}") from None
        config.accesslog = opts.access_log
    config.loglevel = (opts.log_level or "info").upper()
    # hypercorn's error log propagates to ours instead of printing twice.
    config.errorlog = logging.getLogger("hypercorn.error")
    _logging.format_access_log(config, getattr(opts, "log_format", "text"))
    return config


_CONFIG_KEYS = {name for name in dir(Config) if not name.startswith("_")} - {
    "from_mapping",
    "from_pyfile",
    "from_toml",
    "from_object",
    "create_ssl_context",
    "create_sockets",
    "response_headers",
    "set_statsd_logger_class",
    "set_cert_reqs",
    "log",
    "ssl_enabled",
}


def load_toml_config(path: str) -> Config:
    """Read a hypercorn TOML config; unknown keys and bad files are ConfigErrors."""
    try:
        with open(path, "rb") as file:
            data: dict[str, Any] = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r}")
    try:
        return Config.from_mapping(data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def import_from_string(path: str, what: str) -> Any:
    """``package.module:attr.sub`` -> the object; ConfigError naming what failed."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {path!r} must look like MODULE:ATTR")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"{what} {path!r}: no module named {exc.name!r}") from exc
        raise ConfigError(f"{what} {path!r}: importing it failed: {_describe(exc)}") from exc
    except Exception as exc:
        raise ConfigError(f"{what} {path!r}: importing it failed: {_describe(exc)}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{what} {path!r}: {module_name} has no attribute {attr!r}") from None
    return obj
