"""The worker's command line, built from the parsed options (in-process, no workers)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_launcher import _cli, _signals, _systemd, _worker
from trio_launcher._cli import main
from trio_launcher._errors import ConfigError
from trio_launcher._parser import UsageError, build_parser
from trio_launcher._ports import BoundSockets
from trio_launcher._worker import SUPERVISOR_ONLY, worker_argv


@pytest.fixture
def sockets() -> Iterator[BoundSockets]:
    bound = BoundSockets()
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        bound.insecure.append(sock)
    yield bound
    bound.close()


def parse(args: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(args)


def round_trip(args: list[str], sockets: BoundSockets) -> tuple[list[str], argparse.Namespace]:
    """Parse ``args`` as the parent does, build the worker's argv, parse that as a worker."""
    argv = worker_argv(build_parser(), parse(args), sockets, sys.executable)
    assert argv[:3] == [sys.executable, "-m", "trio_launcher"]
    return argv, parse(argv[3:])


def same_except_supervisor(parent: argparse.Namespace, worker: argparse.Namespace) -> None:
    for name, value in vars(parent).items():
        if name == "bind":
            continue  # checked by the caller
        if name in SUPERVISOR_ONLY:
            assert getattr(worker, name) is None, name
        else:
            assert getattr(worker, name) == value, name


@pytest.mark.parametrize(
    "args",
    [
        # long, with a space
        ["app:x", "--workers", "2", "--bind", "127.0.0.1:9", "--graceful-timeout", "5"],
        # --flag=value
        ["app:x", "--workers=2", "--bind=127.0.0.1:9", "--log-level=DEBUG", "--engine=e:e"],
        # the engine task and its shutdown timeout (one engine task per worker)
        ["app:x", "--workers=2", "--engine-task", "m:task", "--engine-shutdown-timeout", "2.5"],
        # short
        ["app:x", "-b", "127.0.0.1:9", "--workers", "3"],
        # attached short
        ["-b127.0.0.1:9", "app:x", "--workers", "2"],
        # repeated binds and a repeatable option
        [
            "app:x",
            "-b",
            "127.0.0.1:9",
            "--bind",
            "[::1]:9",
            "-b[::1]:10",
            "--workers",
            "2",
            "--access-log-exclude",
            "/health",
            "--access-log-exclude=/metrics",
        ],
        # flags without a value, choices, recycling
        [
            "app:x",
            "--workers",
            "2",
            "--ssl-refresh",
            "--transport",
            "hypercorn",
            "--keep-alive-on-engine-death",
            "--max-requests",
            "100",
            "--max-requests-jitter",
            "7",
            "--worker-max-rss",
            "512",
            "--worker-lifetime",
            "3600",
        ],
    ],
)
def test_worker_argv_keeps_options_and_binds_only_inherited_sockets(
    args: list[str], sockets: BoundSockets
) -> None:
    argv, worker = round_trip(args, sockets)
    fds = [sock.fileno() for sock in sockets.all()]
    assert worker.bind == [f"fd://{fd}" for fd in fds]
    assert worker.workers is None
    assert not any(a.startswith(("--workers", "--max-requests", "--worker-")) for a in argv)
    same_except_supervisor(parse(args), worker)


def test_worker_argv_passes_values_that_look_like_flags(sockets: BoundSockets) -> None:
    _, worker = round_trip(["app:x", "--workers", "2", "--access-log-exclude=--odd"], sockets)
    assert worker.access_log_exclude == ["--odd"]
    assert worker.app == "app:x"


def test_worker_argv_refuses_a_value_that_does_not_read_back(sockets: BoundSockets) -> None:
    parser = build_parser()
    parser.add_argument("--thing", type=lambda text: object(), metavar="X")
    opts = parser.parse_args(["app:x", "--thing", "a"])
    with pytest.raises(ConfigError, match="--thing"):
        worker_argv(parser, opts, sockets, sys.executable)


def test_worker_argv_needs_no_code_for_a_new_flag(sockets: BoundSockets) -> None:
    parser = build_parser()
    parser.add_argument("--future-path", "-Z", default="")
    parser.add_argument("--future-limit", type=int)
    parser.add_argument("--future-switch", action=argparse.BooleanOptionalAction, default=True)
    opts = parser.parse_args(["app:x", "-Z/api", "--future-limit=9", "--no-future-switch"])
    argv = worker_argv(parser, opts, sockets, sys.executable)
    worker = parser.parse_args(argv[3:])
    assert (worker.future_path, worker.future_limit, worker.future_switch) == ("/api", 9, False)


SAMPLES = ("7", "0.5", "/x", "mod:attr", "127.0.0.1", "ECDHE+AESGCM")


def test_every_flag_of_the_real_parser_reaches_the_worker(sockets: BoundSockets) -> None:
    """Whatever flags the parser has today (others add them): each set to a value
    its type accepts, all of them at once, read back the same in the worker."""
    parser = build_parser()
    args = ["app:x"]
    # Of options that exclude each other, the first of each group.
    excluded = {id(a) for g in parser._mutually_exclusive_groups for a in g._group_actions[1:]}
    for action in parser._actions:
        if id(action) in excluded:
            continue
        if not action.option_strings or action.dest in SUPERVISOR_ONLY or action.nargs == 0:
            if action.nargs == 0 and action.dest not in ("help", "version"):
                args.append(action.option_strings[-1])
            continue
        if action.choices:
            value = str(list(action.choices)[-1])
        else:
            value = next(v for v in SAMPLES if _accepts(action, v))
        args += [action.option_strings[-1], value]
    opts = parser.parse_args(args)
    argv = worker_argv(parser, opts, sockets, sys.executable)
    same_except_supervisor(opts, parse(argv[3:]))


def _accepts(action: argparse.Action, value: str) -> bool:
    if not callable(action.type):
        return True
    try:
        action.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False
    return True


@pytest.mark.parametrize(
    "args",
    [
        ["app:x", "--worker", "2"],
        ["app:x", "--work=2"],
        ["app:x", "--bin", "127.0.0.1:0"],
        ["app:x", "--graceful", "3"],
    ],
)
def test_an_abbreviated_flag_is_a_usage_error(args: list[str]) -> None:
    with pytest.raises(UsageError, match="unrecognized arguments"):
        parse(args)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        (flag, value)
        for flag in ("--max-requests", "--worker-max-rss", "--worker-lifetime", "--workers")
        for value in ("0", "-1", "many")
    ]
    + [("--max-requests-jitter", "-1"), ("--max-requests-jitter", "x")],
)
def test_bad_worker_values_exit_2_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tests.apps:app", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err
    assert len(err.strip().splitlines()) == 1


def test_jitter_without_max_requests_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tests.apps:app", "--max-requests-jitter", "5"]) == 2
    assert "--max-requests-jitter needs --max-requests" in capsys.readouterr().err


@pytest.fixture
def as_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process looks like a worker (its order pipe's variable is set); the
    module state and signal handlers a worker sets are put back afterwards."""
    read_end, write_end = os.pipe()
    monkeypatch.setattr(_worker, "_role", {})
    monkeypatch.setattr(_signals, "_orders_fd", None)
    monkeypatch.setattr(_systemd, "_parent_is_listening", False)
    monkeypatch.setenv(_worker.ORDERS_ENV, str(read_end))
    handlers = {sig: signal.getsignal(sig) for sig in _signals.HANDLED_SIGNALS}

    def no_supervisor(*args: object) -> int:
        raise AssertionError("a worker started workers")

    monkeypatch.setattr(_cli, "_run_workers", no_supervisor)
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    os.close(read_end)
    os.close(write_end)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2", "--bind", "fd://3"], "--workers: a worker process cannot start"),
        (["--workers=4"], "--workers: a worker process cannot start"),
        (["-b127.0.0.1:0"], "--bind: a worker serves the sockets its parent bound"),
        (["--bind", "fd://3", "-b", "unix:/tmp/x"], "--bind: a worker serves"),
        (["--max-requests", "5"], "--max-requests: the parent process recycles"),
    ],
)
def test_a_worker_never_starts_workers_or_binds(
    args: list[str], message: str, as_worker: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tests.apps:app", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_a_worker_ignores_the_config_files_workers_and_bind(
    as_worker: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The TOML is the parent's too: its ``workers`` and ``bind`` never reach a worker.

    A worker that took ``workers = 4`` would start workers (``as_worker`` makes
    that fail); one that took ``bind`` would bind it. Here the worker goes on
    to serve its fd:// socket alone: a descriptor that is not open shows that
    it got that far, and the error names it.
    """
    toml = tmp_path / "c.toml"
    toml.write_text('workers = 4\nbind = ["127.0.0.1:0"]\n')
    code = main(["tests.apps:app", "--config", str(toml), "--bind", "fd://999"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "fd://999" in err
    assert "127.0.0.1" not in err
