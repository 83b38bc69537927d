"""serve_http in-process: embedding, engine death, engine errors, sockets, bind errors."""

from __future__ import annotations

import errno
import math
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config

import trio_launcher
from trio_launcher import (
    BindError,
    ConfigError,
    EngineDeadError,
    StopReason,
    serve_http,
)
from trio_launcher._watchdog import watch_engine
from trio_launcher.testing import FakeEngine, FakePollingEngine, running_server

from .apps import App


def local_config(**settings: object) -> Config:
    config = Config.from_mapping(settings)
    config.bind = ["127.0.0.1:0"]
    return config


async def is_refused(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with trio.socket.socket() as sock:
        try:
            await sock.connect((host, int(port)))
        except (ConnectionRefusedError, ConnectionResetError):
            return True
    return False


def test_public_api_is_sorted_and_exported() -> None:
    assert trio_launcher.__all__ == sorted(trio_launcher.__all__)
    for name in trio_launcher.__all__:
        assert getattr(trio_launcher, name) is not None
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(trio_launcher.__path__)}
    assert {"testing", "quart", "starlette"} <= submodules  # the public modules
    public = {n for n in dir(trio_launcher) if not n.startswith("_")} - submodules
    assert public - set(trio_launcher.__all__) == set()


async def test_embedded_start_requests_and_shutdown_runs_lifespan() -> None:
    app = App()
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve_http, app, local_config())
        assert app.events == ["startup"]
        assert handle.urls[0].startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=handle.urls[0]) as client:
            assert (await client.get("/")).text == "hello"
        handle.shutdown()
        assert handle.stopping
    assert app.events == ["startup", "shutdown"]
    assert handle.stop_reason is StopReason.REQUESTED


async def test_wait_dead_engine_stops_at_once_and_in_flight_request_finishes() -> None:
    app, engine = App(), FakeEngine()
    with pytest.raises(EngineDeadError, match="wait_dead"):
        async with running_server(app, engine=engine, watchdog_interval=math.inf) as server:
            async with trio.open_nursery() as nursery:
                result: dict[str, httpx.Response] = {}

                async def slow() -> None:
                    result["r"] = await server.client.get("/slow", params={"s": "0.5"})

                nursery.start_soon(slow)
                await app.slow_started.wait()
                engine.kill()
                # wait_dead() returns at once and the listener closes (about 1 ms,
                # BENCHMARKS.md); the bound leaves room for a busy machine and is
                # still far below the 0.5 s request in flight.
                with trio.fail_after(0.4):
                    while not await is_refused(server.url):
                        await trio.sleep(0.001)
            assert result["r"].status_code == 200
    assert app.events == ["startup", "shutdown"]


async def test_polling_engine_real_time() -> None:
    engine = FakePollingEngine()
    with pytest.raises(EngineDeadError, match="watchdog"):
        async with running_server(App(), engine=engine, watchdog_interval=0.05) as server:
            engine.kill()
            with trio.fail_after(0.05 + 2):  # one interval, plus room for a busy machine
                while not await is_refused(server.url):
                    await trio.sleep(0.005)


async def deaths_after_kill(
    engine: FakeEngine | FakePollingEngine, kill_at: float
) -> tuple[list[float], float]:
    """Watch ``engine`` (5 s interval), kill it at ``kill_at``; return the death times and
    the kill time."""
    deaths: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            watch_engine, engine, 5.0, lambda how: deaths.append(trio.current_time())
        )
        await trio.sleep(kill_at)
        engine.kill()
        killed_at = trio.current_time()
    return deaths, killed_at


async def test_watchdog_polls_within_one_interval(autojump_clock: trio.testing.MockClock) -> None:
    deaths, killed_at = await deaths_after_kill(FakePollingEngine(), 12.3)
    assert len(deaths) == 1
    assert 0 < deaths[0] - killed_at <= 5.0


async def test_watchdog_wait_dead_is_immediate(autojump_clock: trio.testing.MockClock) -> None:
    deaths, killed_at = await deaths_after_kill(FakeEngine(), 2.2)
    assert deaths == [killed_at]


async def test_keep_alive_on_engine_death_keeps_serving() -> None:
    engine = FakeEngine()
    async with running_server(App(), engine=engine, keep_alive_on_engine_death=True) as server:
        engine.kill()
        await trio.testing.wait_all_tasks_blocked()
        assert not server.handle.engine_alive
        assert not server.handle.stopping
        assert (await server.client.get("/")).text == "hello"


async def test_library_ignores_the_keep_alive_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM's variable is the CLI's business; serve_http reads no environment.
    monkeypatch.setenv("TRIO_LAUNCHER_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    engine = FakeEngine()
    with pytest.raises(EngineDeadError):
        async with running_server(App(), engine=engine) as server:
            engine.kill()
            with trio.fail_after(5):
                while not server.handle.stopping:
                    await trio.sleep(0.01)


@pytest.mark.parametrize("path", ["/raise/generate", "/raise/value"])
async def test_generate_error_and_bug_give_500_and_keep_serving(path: str) -> None:
    async with running_server(App(), engine=FakeEngine()) as server:
        response = await server.client.get(path)
        assert response.status_code == 500
        if path == "/raise/generate":
            assert response.json() == {
                "error": {"type": "EngineGenerateError", "message": "bad prompt"}
            }
        assert not server.handle.stopping
        assert (await server.client.get("/")).text == "hello"


@pytest.mark.parametrize("path", ["/raise/dead", "/raise/group-dead"])
async def test_engine_dead_from_app_gives_500_json_then_stops(path: str) -> None:
    with pytest.raises(EngineDeadError):
        async with running_server(App()) as server:
            response = await server.client.get(path)
            assert response.status_code == 500
            assert response.json()["error"]["type"] == "EngineDeadError"
            assert server.handle.stop_reason is StopReason.ENGINE_DEAD


async def test_engine_error_after_stream_started_ends_stream_and_watchdog_catches() -> None:
    engine = FakeEngine()

    async def streaming_app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"part", "more_body": True})  # type: ignore[operator]
        engine.kill()
        raise EngineDeadError("died mid-stream")

    with pytest.raises(EngineDeadError):
        async with running_server(streaming_app, engine=engine) as server:
            with pytest.raises(httpx.RemoteProtocolError):
                await server.client.get("/")


@pytest.mark.parametrize("listening", [True, False])
async def test_prebound_tcp_socket(listening: bool) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    if listening:
        sock.listen()
    port = sock.getsockname()[1]
    async with running_server(App(), sock=sock) as server:
        assert sock.fileno() == -1  # ownership moved to the runner: nothing dangles
        assert server.url == f"http://127.0.0.1:{port}"
        assert (await server.client.get("/")).text == "hello"
    assert await is_refused(server.url)


async def test_prebound_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    async with running_server(App(), sock=sock) as server:
        assert server.url == f"http://unix:{path}"
        transport = httpx.AsyncHTTPTransport(uds=path)
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://x/")).text == "hello"


async def test_fd_descriptors_do_not_leak() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        async with running_server(App()) as server:
            await server.client.get("/")
    assert len(os.listdir("/proc/self/fd")) <= before


async def test_bind_error_names_address_and_holder() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    try:
        with pytest.raises(BindError) as info:
            await serve_http(App(), config, handle_signals=False)
    finally:
        holder.close()
    error = info.value
    assert isinstance(error, OSError)
    assert error.errno == errno.EADDRINUSE
    assert error.address == f"127.0.0.1:{port}"
    assert error.holder_pid == os.getpid()
    assert f"127.0.0.1:{port}" in str(error)


async def test_bind_bad_address_names_it() -> None:
    config = Config()
    config.bind = ["256.1.1.1:80"]
    with pytest.raises(BindError, match=r"cannot bind 256\.1\.1\.1:80: ") as info:
        await serve_http(App(), config, handle_signals=False)
    assert info.value.errno is not None


async def test_bind_permission_denied_names_address_and_errno(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tests run as root here, and root may bind port 80: the kernel's refusal is
    # the one part that cannot run, so only bind() is replaced.
    class Denied(socket.socket):
        def bind(self, address: Any) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket, "socket", Denied)  # as _ports sees it, for this test only
    config = Config()
    config.bind = ["127.0.0.1:80"]
    with pytest.raises(BindError) as info:
        await serve_http(App(), config, handle_signals=False)
    assert info.value.errno == errno.EACCES
    assert str(info.value) == "cannot bind 127.0.0.1:80: Permission denied (errno 13)"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"watchdog_interval": 0}, "watchdog_interval"),
        ({"engine": object()}, "lacks errored and is_running"),
        ({"enable_ssl_refresh": True}, "certfile"),
    ],
)
async def test_bad_arguments_raise_config_error(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        await serve_http(App(), local_config(), handle_signals=False, **kwargs)  # type: ignore[arg-type]


class _Rule:
    def __init__(self, rule: str, methods: set[str]) -> None:
        self.rule, self.methods = rule, methods


class _UrlMap:
    def iter_rules(self) -> list[_Rule]:
        return [_Rule("/", {"GET", "HEAD"}), _Rule("/generate", {"POST"})]


class QuartLikeApp(App):
    url_map = _UrlMap()


class _Route:
    def __init__(self, path: str, methods: set[str] | None) -> None:
        self.path, self.methods = path, methods


class StarletteLikeApp(App):
    routes = [_Route("/health", {"GET"}), _Route("/ws", None)]  # noqa: RUF012


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        (QuartLikeApp(), ["/ [GET, HEAD]", "/generate [POST]"]),
        (StarletteLikeApp(), ["/health [GET]", "/ws"]),
        (App(), ["bare ASGI callable"]),
    ],
)
async def test_startup_log_lists_routes_and_urls(
    app: App, expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trio_launcher")
    async with running_server(app) as server:
        messages = [r.getMessage() for r in caplog.records if r.name == "trio_launcher"]
    text = "\n".join(messages)
    for line in expected:
        assert line in text
    assert f"serving on {server.url}" in text


async def test_signals_off_main_thread_is_a_config_error() -> None:
    def in_thread() -> None:
        trio.run(serve_http, App(), local_config())

    with pytest.raises(ConfigError, match="main thread"):
        await trio.to_thread.run_sync(in_thread)
