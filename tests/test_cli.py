"""The CLI in-process: main(argv), build_config, import_from_string (no subprocess)."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import pytest

from trio_launcher import ConfigError
from trio_launcher._cli import main
from trio_launcher._parser import build_parser
from trio_launcher._settings import (
    DEFAULT_BACKLOG,
    build_config,
    import_from_string,
    options_from_args,
)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["tests.apps:app", *argv])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("trio-launcher: error: ")
    return lines[0].removeprefix("trio-launcher: error: ")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["tests.apps:app", "--watchdog-interval", "0"], "--watchdog-interval: '0' must be > 0"),
        (["tests.apps:app", "--max-header-count", "x"], "'x' is not a whole number"),
        (["tests.apps:app", "--shutdown-delay", "-1"], "'-1' must be a number >= 0"),
        (["tests.apps:app", "--transport", "tcp"], "invalid choice: 'tcp'"),
        (["tests.apps:app", "--certfile", "c.pem"], "--keyfile is missing"),
        (["tests.nope:app"], "no module named 'tests.nope'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert needle in one_error_line(capsys)


def test_bad_bind_exits_4_naming_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tests.apps:app", "--bind", "256.1.1.1:80"]) == 4
    assert one_error_line(capsys).startswith("cannot bind 256.1.1.1:80: ")


def test_failing_startup_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tests.apps:failing_app", "--bind", "127.0.0.1:0"]) == 1
    assert "no model" in one_error_line(capsys)


def test_flags_override_the_toml_file(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('bind = ["127.0.0.1:1"]\ngraceful_timeout = 7.5\nkeep_alive_timeout = 9\n')
    config = build_config(parse("--config", str(toml), "--bind", "127.0.0.1:0"))
    assert config.bind == ["127.0.0.1:0"]
    assert config.graceful_timeout == 7.5
    assert config.keep_alive_timeout == 9
    assert config.backlog == DEFAULT_BACKLOG


def test_tls_flags_reach_the_config() -> None:
    args = parse(
        "--certfile",
        "c.pem",
        "--keyfile",
        "k.pem",
        "--ca-certs",
        "ca.pem",
        "--verify-mode",
        "required",
    )
    config = build_config(args)
    assert (config.certfile, config.keyfile, config.ca_certs) == ("c.pem", "k.pem", "ca.pem")
    assert config.verify_mode == ssl.CERT_REQUIRED


def test_options_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIO_LAUNCHER_KEEP_ALIVE_ON_ENGINE_DEATH", raising=False)
    args = parse(
        "--health-path",
        "/health",
        "--access-log-exclude",
        "/health",
        "--access-log-exclude",
        "/metrics",
        "--shutdown-delay",
        "2",
    )
    options = options_from_args(args, None)
    assert options.health_path == "/health"
    assert options.access_log_exclude == ("/health", "/metrics")
    assert options.shutdown_delay == 2.0
    assert options.keep_alive_on_engine_death is False


def test_vllm_keep_alive_variable_is_read_by_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_LAUNCHER_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    assert options_from_args(parse(), None).keep_alive_on_engine_death is True


def test_import_from_string() -> None:
    from tests import apps

    assert import_from_string("tests.apps:app", "app") is apps.app
    assert import_from_string("tests.apps:App.__init__", "app") is apps.App.__init__


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("tests.apps", "app 'tests.apps' must look like MODULE:ATTR"),
        (":app", "must look like MODULE:ATTR"),
        ("tests.apps:", "must look like MODULE:ATTR"),
        ("tests.nope:app", "no module named 'tests.nope'"),
        ("tests.apps:nope", "tests.apps has no attribute 'nope'"),
    ],
)
def test_import_from_string_errors_name_the_path(path: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        import_from_string(path, "app")


def test_import_error_inside_the_module_is_not_called_missing(tmp_path: Path) -> None:
    (tmp_path / "broken_mod.py").write_text("import no_such_dependency_xyz\napp = 1\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="importing it failed: ModuleNotFoundError"):
            import_from_string("broken_mod:app", "app")
    finally:
        sys.path.remove(str(tmp_path))
