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
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from functools import partial

import trio
from hypercorn.config import Config

from . import _logging
from ._control import exit_process_if_engine_stuck
from ._errors import (
    AppStartupError,
    BindError,
    ConfigError,
    EngineDeadError,
    ExitCode,
    ForcedShutdown,
    LauncherError,
    OptionError,
    describe,
)
from ._metrics import supervisor_metrics
from ._observe import run_with_metrics_listener
from ._parser import PROG, UsageError, build_parser
from ._ports import bind_sockets
from ._reload import watch_lifeline as watch_reload_parent
from ._runner import ServerHandle, serve_http
from ._settings import (
    build_config,
    flag_for,
    import_from_string,
    load_toml_config,
    log_level,
    options_from_args,
)
from ._signals import absorb_signals_for_process, ignore_signals_until_exit, obey_parent
from ._systemd import notify_parent_instead
from ._worker import (
    ask_to_retire,
    report_cut_requests,
    take_worker_role,
    worker_argv,
    worker_max_requests,
)
from ._workers import Recycling, run_workers

log = logging.getLogger("trio_launcher")


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
    except UsageError as exc:
        return _fail(f"{exc} (see {PROG} --help)", ExitCode.USAGE)
    try:
        base = load_toml_config(opts.config) if opts.config else Config()
        opts.log_level = log_level(opts.log_level, base, opts.config)
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
        return _fail(f"unexpected {describe(exc)}", ExitCode.ERROR, debug)
    return ExitCode.OK


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


def _fail(message: str, code: int, debug: bool = False) -> int:
    line = f"{PROG}: error: {message}".replace("\n", " ")
    if debug and sys.exc_info()[1] is not None:
        log.exception(line)
    else:
        print(line, file=sys.stderr, flush=True)
    return code


def _setup_logging(level: str, log_format: _logging.LogFormat = "text") -> None:
    _logging.configure(level, log_format)
