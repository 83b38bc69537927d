"""Errors a new user meets first: each one line, naming the flag or the thing at fault."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import httpx
import pytest
import trio

from trio_launcher._parser import build_parser

from .proc import launch, run_cli

APP = "tests.apps:app"


def test_app_that_is_not_callable_exits_2_with_one_line() -> None:
    result = run_cli(["tests.apps:engine", "--bind", "127.0.0.1:0"], timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "trio-launcher: error: app 'tests.apps:engine' is not an ASGI callable (it is a FakeEngine)"
    ]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--ssl-refresh"], "--ssl-refresh needs --certfile and --keyfile"),
        (["--health-path", "health"], "--health-path must start with '/', got 'health'"),
    ],
)
def test_messages_name_the_flag(args: list[str], line: str) -> None:
    result = run_cli([APP, "--bind", "127.0.0.1:0", *args], timeout=20)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"trio-launcher: error: {line}"]


def test_every_flag_has_help_and_version_prints() -> None:
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings:
            assert action.help, f"{action.option_strings[0]} has no help"
    result = run_cli(["--version"])
    assert result.returncode == 0
    assert result.stdout.startswith("trio-launcher 0.")


async def _wait_unix_serving(path: Path) -> None:
    with trio.fail_after(15):
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                await trio.sleep(0.02)


@pytest.mark.parametrize("flag", [[], ["--log-level", "info"]])
async def test_toml_loglevel_applies_unless_a_flag_overrides(
    tmp_path: Path, flag: list[str]
) -> None:
    sock_path = tmp_path / "app.sock"
    toml = tmp_path / "quiet.toml"
    toml.write_text(f'loglevel = "WARNING"\nbind = ["unix:{sock_path}"]\n')
    async with launch([APP, "--config", str(toml), *flag], wait_serving=False) as proc:
        await _wait_unix_serving(sock_path)
        transport = httpx.AsyncHTTPTransport(uds=str(sock_path))
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://localhost/")).text == "hello"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    info_lines = [line for line in proc.lines if " INFO [" in line]  # the text format's level
    if flag:
        assert any("serving on" in line for line in info_lines), proc.stderr
    else:
        assert info_lines == [], proc.stderr


async def test_ordinary_handler_error_is_logged_as_one_traceback() -> None:
    async with launch([APP, "--bind", "127.0.0.1:0"]) as proc:
        async with httpx.AsyncClient(base_url=proc.url) as client:
            assert (await client.get("/raise/value")).status_code == 500
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr
    assert "ExceptionGroup" not in proc.stderr
    assert "ValueError: a bug in a handler" in proc.stderr


def test_docs_cli_names_every_flag() -> None:
    from .proc import ROOT

    text = (ROOT / "docs" / "cli.md").read_text()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}" in text, f"docs/cli.md does not mention {flag}"
    flags = {f for action in build_parser()._actions for f in action.option_strings}
    not_ours = {"--loop", "--ws", "--factory"}  # uvicorn's, named as not here
    for named in set(re.findall(r"`(--[a-z0-9-]+)", text)) - not_ours:
        assert named in flags, f"docs/cli.md names {named}, which is no flag"
