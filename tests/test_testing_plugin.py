"""The pytest plugin itself: what users of trio_launcher.testing rely on."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config

from trio_launcher import AppStartupError, EngineDeadError
from trio_launcher.testing import (
    FakeEngine,
    FakePollingEngine,
    RunningServer,
    TLSFiles,
    running_server,
)

from .apps import App
from .proc import ROOT


def run_user_suite(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str
) -> pytest.RunResult:
    """Run ``source`` as a user's test module, with the plugin and trio mode on, in a
    pytest subprocess."""
    pytester.makeconftest('pytest_plugins = ["trio_launcher.testing"]\n')
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_user=source)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)


USER_TEST = """
import ssl

import trio
from trio_launcher.testing import TLSFiles, presented_cert, running_server


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


async def test_tls_rotation(tls_files: TLSFiles) -> None:
    config = tls_files.config(verify_mode=ssl.CERT_REQUIRED)
    async with running_server(
        app, config, tls=tls_files, enable_ssl_refresh=True, ssl_refresh_interval=0.05
    ) as server:
        assert (await server.client.get("/")).text == "hi"
        assert await presented_cert(server.port, tls_files) == tls_files.server_cert_der()
        tls_files.rotate()
        with trio.fail_after(5):
            while await presented_cert(server.port, tls_files) != tls_files.server_cert_der():
                await trio.sleep(0.02)
        assert (await server.client.get("/")).text == "hi"
"""


def test_user_suite_with_tls_rotation_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_user_suite(pytester, monkeypatch, USER_TEST)
    result.assert_outcomes(passed=1)


async def test_startup_failure_surfaces_original_error_quickly() -> None:
    with trio.fail_after(5), pytest.raises(AppStartupError, match="no model"):
        async with running_server(App(fail_startup=True)):
            pytest.fail("the server must not start")  # pragma: no cover


async def test_error_in_test_body_is_not_wrapped() -> None:
    with trio.fail_after(5), pytest.raises(ValueError, match="boom"):

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                raise ValueError("boom")

        # A lifespan that raises means "no lifespan support" to hypercorn; the
        # request still surfaces the app's own error through the server.
        async with running_server(app) as server:
            await server.client.get("/")
            raise ValueError("boom")


async def test_lifespan_shutdown_runs_on_exit() -> None:
    app = App()
    async with running_server(app) as server:
        assert (await server.client.get("/")).text == "hello"
        assert app.events == ["startup"]
    assert app.events == ["startup", "shutdown"]


@pytest.mark.parametrize("engine_type", [FakeEngine, FakePollingEngine])
async def test_fake_engine_kill_raises_engine_dead(engine_type: type[FakePollingEngine]) -> None:
    engine = engine_type()
    assert hasattr(engine, "wait_dead") is (engine_type is FakeEngine)
    with trio.fail_after(5), pytest.raises(EngineDeadError):
        async with running_server(App(), engine=engine, watchdog_interval=0.05):
            engine.kill()
            await trio.sleep_forever()


def _read(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize("how", ["inplace", "rename"])
def test_plain_rotation_replaces_pair(tmp_path: Path, how: Any) -> None:
    files = TLSFiles(tmp_path)
    old_cert, old_ino = _read(files.cert_file), files.cert_file.stat().st_ino
    files.rotate(how)
    assert _read(files.cert_file) != old_cert
    assert (files.cert_file.stat().st_ino == old_ino) is (how == "inplace")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_file, files.key_file)  # the new pair matches


def test_kubernetes_layout_swaps_data_link(tmp_path: Path) -> None:
    files = TLSFiles(tmp_path, layout="kubernetes")
    assert files.cert_file.is_symlink()
    assert os.readlink(files.cert_file) == "..data/tls.crt"
    first_target = os.readlink(tmp_path / "..data")
    first = _read(files.cert_file)
    for _ in range(3):
        files.rotate()
        assert _read(files.cert_file) != first
        first = _read(files.cert_file)
    assert os.readlink(tmp_path / "..data") != first_target
    assert not (tmp_path / first_target).exists()  # the old directory is gone
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_file, files.key_file)


def test_client_ca_bundle_is_replaced(tmp_path: Path) -> None:
    import trustme

    files = TLSFiles(tmp_path)
    other = trustme.CA()
    files.set_client_cas(other)
    assert _read(files.client_ca_file) == other.cert_pem.bytes()


@pytest.fixture
def app() -> App:
    return App()


async def test_server_fixture_serves_app_fixture(server: RunningServer, app: App) -> None:
    assert (await server.client.get("/")).text == "hello"
    assert app.events == ["startup"]


# --- what a user pastes: free ports, fast fakes, one error ---------------------


async def test_users_own_config_still_gets_a_free_port() -> None:
    config = Config()  # its bind is 127.0.0.1:8000: a test must not need that port free
    async with running_server(App(), config) as first, running_server(App(), config) as second:
        assert first.port != 8000
        assert first.port != second.port
        assert (await second.client.get("/")).text == "hello"
    assert config.bind == ["127.0.0.1:8000"]  # the caller's Config is untouched


async def test_bind_is_used_when_told(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    async with running_server(App(), bind=[f"unix:{path}"]) as server:
        assert server.url == f"http://unix:{path}"
        assert (await server.client.get("/")).text == "hello"


async def test_polling_fake_engine_is_found_dead_fast() -> None:
    engine = FakePollingEngine()
    with trio.fail_after(2), pytest.raises(EngineDeadError):
        async with running_server(App(), engine=engine):
            engine.kill()
            await trio.sleep_forever()


FAILING_ASSERT = """
from trio_launcher.testing import running_server


async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hi"})


async def test_fails() -> None:
    async with running_server(app) as server:
        text = (await server.client.get("/")).text
        assert text == "hello-marker"
"""


def test_failing_assert_is_printed_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_user_suite(pytester, monkeypatch, FAILING_ASSERT)
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    report = output[: output.index("short test summary info")]
    assert report.count("AssertionError: assert 'hi' == 'hello-marker'") == 1, output
    assert "ExceptionGroup" not in output
