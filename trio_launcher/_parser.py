"""The command line's grammar: every flag, its type, default and help.

The parser never exits the process: a usage error is raised as
:class:`UsageError` so that ``main`` prints it as one line and returns 2.
Abbreviations are refused (``--worker`` is not ``--workers``), because the
flags are passed on to worker processes by their full names only.

docs/cli.md is the reference of these flags; tests/test_docs.py keeps the
README's synopsis to flags that exist here.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from . import _logging
from ._engine_task import DEFAULT_ENGINE_SHUTDOWN_TIMEOUT
from ._flag_types import (
    address_list,
    ciphers,
    natural_int,
    port,
    positive_int,
    positive_number,
    positive_seconds,
    seconds,
)

PROG = "trio-launcher"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class UsageError(Exception):
    """A flag or argument the parser refused (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
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
        type=positive_seconds,
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
        type=port,
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
        type=address_list,
        metavar="IPS",
        help="comma-separated addresses or networks of trusted proxies, * for any "
        "(default 127.0.0.1)",
    )
    uvicorn.add_argument(
        "--timeout-keep-alive",
        type=positive_seconds,
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
        type=seconds,
        metavar="S",
        help="how long in-flight requests may run on after a drain starts (default 3)",
    )
    add(
        "--watchdog-interval",
        type=positive_seconds,
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
        type=positive_int,
        metavar="N",
        help="serve with N worker processes sharing the sockets (default 1, or the "
        "config file's workers); SIGHUP then restarts them one by one",
    )
    recycling = parser.add_argument_group(
        "worker recycling (a worker past a limit is replaced: the new one serves first)"
    )
    recycling.add_argument(
        "--max-requests",
        type=positive_int,
        metavar="N",
        help="replace a worker after N requests (also the config file's max_requests)",
    )
    recycling.add_argument(
        "--max-requests-jitter",
        type=natural_int,
        metavar="N",
        help="add 0..N (random, per worker) to --max-requests to spread the replacements",
    )
    recycling.add_argument(
        "--worker-max-rss",
        type=positive_number,
        metavar="MIB",
        help="replace a worker whose resident memory exceeds MIB mebibytes",
    )
    recycling.add_argument(
        "--worker-lifetime",
        type=positive_seconds,
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
        type=seconds,
        default=0.0,
        metavar="S",
        help="after SIGTERM keep serving S seconds with readiness 503, then drain (default 0)",
    )
    serving.add_argument(
        "--max-head-size",
        type=positive_int,
        metavar="BYTES",
        help="largest request head; larger gets 431",
    )
    serving.add_argument(
        "--max-header-count",
        type=positive_int,
        default=256,
        metavar="N",
        help="most request headers; more get 431 (default 256)",
    )
    serving.add_argument(
        "--header-timeout",
        type=positive_seconds,
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
        type=ciphers,
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
        type=positive_seconds,
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
        type=positive_seconds,
        metavar="S",
        help="a response not started within S seconds: 504, handler cancelled (default off)",
    )
    add(
        "--limit-concurrency",
        type=positive_int,
        metavar="N",
        help="most requests in flight; more get 503 at once (default no limit)",
    )
    add(
        "--body-timeout",
        type=positive_seconds,
        default=60.0,
        metavar="S",
        help="request body allowance: S s plus 1 s per KiB received; slower gets 408 (default 60)",
    )
    add(
        "--startup-timeout",
        type=positive_seconds,
        metavar="S",
        help="most seconds the app's lifespan startup may take (default no limit)",
    )
    add(
        "--engine-health-interval",
        type=positive_seconds,
        default=10.0,
        metavar="S",
        help="seconds between calls of the engine's check_health(), if any (default 10)",
    )
    add(
        "--engine-health-timeout",
        type=positive_seconds,
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trio-launcher")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"
