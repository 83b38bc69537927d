"""The one options object: validation, the typed signature in step, no writes to Config."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
import trio
from hypercorn.config import Config

from tests.apps import App
from trio_launcher import ConfigError, OptionError, ServeOptions, serve_http
from trio_launcher._cli import main
from trio_launcher._options import ServeKwargs, option_flags
from trio_launcher.testing import running_server


def test_serve_kwargs_match_the_fields() -> None:
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    assert set(typing.get_type_hints(ServeKwargs)) == fields


def test_every_field_documents_its_flag() -> None:
    flags = option_flags()
    assert set(flags) == {f.name for f in dataclasses.fields(ServeOptions)}
    for name, flag in flags.items():
        assert flag is None or flag.startswith("--"), name


@pytest.mark.parametrize(
    ("changes", "option", "needle"),
    [
        ({"watchdog_interval": 0}, "watchdog_interval", "must be > 0"),
        ({"watchdog_interval": math.nan}, "watchdog_interval", "must be > 0"),
        ({"ssl_refresh_interval": math.inf}, "ssl_refresh_interval", "must be > 0"),
        ({"shutdown_delay": -1}, "shutdown_delay", ">= 0"),
        ({"shutdown_delay": "3"}, "shutdown_delay", "number of seconds"),
        ({"health_path": "health"}, "health_path", "must start with '/'"),
        ({"max_header_count": 0}, "max_header_count", ">= 1"),
        ({"max_head_size": 1.5}, "max_head_size", "whole number"),
        ({"transport": "tcp"}, "transport", "'lean' or 'hypercorn'"),
        ({"engine": object()}, "engine", "lacks errored and is_running"),
        ({"engine_error_types": (ValueError, 3)}, "engine_error_types", "exception types"),
    ],
)
def test_bad_values_name_the_option(changes: dict[str, object], option: str, needle: str) -> None:
    with pytest.raises(OptionError) as info:
        ServeOptions(**changes)  # type: ignore[arg-type]
    assert info.value.option == option
    assert needle in str(info.value)
    assert str(info.value).startswith(option)


def test_replace_validates_and_keeps_the_rest() -> None:
    base = ServeOptions(health_path="/health", shutdown_delay=1.0)
    changed = base.replace(shutdown_delay=2.0)
    assert (changed.health_path, changed.shutdown_delay) == ("/health", 2.0)
    with pytest.raises(OptionError, match=r"^healthpath is not an option"):
        base.replace(healthpath="/x")
    with pytest.raises(OptionError, match=r"^health_path must start"):
        base.replace(health_path="x")


def test_lists_become_tuples() -> None:
    options = ServeOptions(access_log_exclude=["/health"])  # type: ignore[arg-type]
    assert options.access_log_exclude == ("/health",)


async def test_serve_http_leaves_the_callers_config_alone() -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    before = dict(vars(config))
    async with running_server(App(), config, max_head_size=4096) as server:
        assert (await server.client.get("/")).status_code == 200
    assert dict(vars(config)) == before


async def test_unknown_keyword_is_an_option_error() -> None:
    with pytest.raises(OptionError, match=r"^helth_path is not an option of serve_http"):
        async with running_server(App(), helth_path="/health"):
            pass


def test_cli_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tests.apps:app", "--health-path", "health", "--bind", "127.0.0.1:0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["trio-launcher: error: --health-path must start with '/', got 'health'"]


@pytest.mark.parametrize(
    ("app", "needle"),
    [
        (42, "app must be an ASGI application (a callable), got int"),
        ("main:app", "app must be an ASGI application (a callable), got str"),
    ],
)
async def test_an_app_that_is_not_callable_is_a_config_error_before_serving(
    app: object, needle: str
) -> None:
    """It used to be served: the port listened, and every request got a 500."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    with trio.fail_after(10), pytest.raises(ConfigError, match=re.escape(needle)):
        await serve_http(app, config, handle_signals=False)
