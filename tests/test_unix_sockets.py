"""Unix sockets: a live server keeps its path, a stale file is replaced, the file goes on exit."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import pytest
import trio

from trio_launcher import BindError
from trio_launcher.testing import running_server

from .apps import App
from .proc import launch, run_cli

APP = "tests.apps:app"


async def uds_get(path: Path, target: str = "/", timeout: float = 10.0) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        return await client.get(f"http://localhost{target}")


async def test_live_server_keeps_its_path_second_exits_4_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    async with launch([APP, "--bind", f"unix:{path}"]) as first:
        result = await trio.to_thread.run_sync(run_cli, [APP, "--bind", f"unix:{path}"])
        assert result.returncode == 4, result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert errors == [
            f"trio-launcher: error: cannot bind unix:{path}: a live server answers there "
            f"(errno 98); held by PID {first.process.pid} ({errors[0].split('(', 2)[2]}"
        ]
        assert (await uds_get(path)).text == "hello"  # the first still owns the path
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0
    assert not path.exists()


async def test_stale_socket_file_is_replaced_and_removed_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a server that was killed: the file stays, nobody listens
    stale.close()
    assert path.exists()
    async with launch([APP, "--bind", f"unix:{path}"]) as proc:
        assert (await uds_get(path)).text == "hello"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.stderr
    assert not path.exists()


async def test_file_removed_after_forced_drain(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    args = [APP, "--bind", f"unix:{path}", "--graceful-timeout", "30"]
    async with launch(args) as proc, trio.open_nursery() as nursery:

        async def long_request() -> None:
            with pytest.raises(httpx.RemoteProtocolError):  # cut by the forced stop
                await uds_get(path, "/slow?s=20", timeout=30)

        nursery.start_soon(long_request)
        await proc.wait_for_line("slow request started")
        proc.signal(signal.SIGTERM)
        await proc.wait_for_line("SIGTERM: draining")
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 128 + signal.SIGTERM
    assert not path.exists()


def test_regular_file_at_path_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    path.write_text("not a socket")
    result = run_cli([APP, "--bind", f"unix:{path}"])
    assert result.returncode == 4, result.stderr
    assert f"cannot bind unix:{path}" in result.stderr
    assert path.read_text() == "not a socket"


async def test_api_refuses_live_path_and_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    async with running_server(App(), bind=[f"unix:{path}"]) as server:
        assert (await server.client.get("/")).text == "hello"
        with pytest.raises(BindError, match="a live server answers there") as info:
            async with running_server(App(), bind=[f"unix:{path}"]):
                pytest.fail("must not serve")  # pragma: no cover
        assert info.value.address == f"unix:{path}"
        assert info.value.holder_pid is None  # ourselves: not named
        assert (await server.client.get("/")).text == "hello"
    assert not path.exists()


async def test_newer_file_at_our_path_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    async with running_server(App(), bind=[f"unix:{path}"]):
        os.remove(path)  # an operator removed it and another server took the path
        newer = socket.socket(socket.AF_UNIX)
        newer.bind(str(path))
    assert path.exists()  # not ours: kept
    newer.close()
