"""What the parsed flags mean: hypercorn's Config, the runner's ServeOptions, the app.

The hypercorn TOML file (``--config``) is read first and the flags are laid
over it, so a flag always wins; unknown keys in the file are errors, not
silence. The runner's own options go into one :class:`ServeOptions`, the
object the API builds too, so a bad value is refused by the same check either
way (an ``OptionError``, which the CLI reports under the flag's name).

vLLM's ``TRIO_LAUNCHER_KEEP_ALIVE_ON_ENGINE_DEATH`` is read here and only
here: the library never reads the environment behind its caller's back.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import ssl
import tomllib
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.config import Config

from . import _logging
from ._errors import ConfigError, describe
from ._options import ServeOptions, option_flags
from ._parser import BOUND_OPTIONS, LOG_LEVELS
from ._proxy import DEFAULT_FORWARDED_ALLOW_IPS
from ._systemd import listen_fds

log = logging.getLogger("trio_launcher")

DEFAULT_BACKLOG = 2048


KEEP_ALIVE_ENV = "TRIO_LAUNCHER_KEEP_ALIVE_ON_ENGINE_DEATH"
"""vLLM's variable for ``--keep-alive-on-engine-death``; read by the CLI only."""


VERIFY_MODES = {"none": "CERT_NONE", "optional": "CERT_OPTIONAL", "required": "CERT_REQUIRED"}


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


def log_level(flag: str | None, config: Config, path: str | None) -> str:
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
        raise ConfigError(f"{what} {path!r}: importing it failed: {describe(exc)}") from exc
    except Exception as exc:
        raise ConfigError(f"{what} {path!r}: importing it failed: {describe(exc)}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{what} {path!r}: {module_name} has no attribute {attr!r}") from None
    return obj
