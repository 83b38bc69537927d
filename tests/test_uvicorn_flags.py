"""uvicorn's flags where they mean the same: real processes, real sockets, real TLS."""

from __future__ import annotations

import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
from cryptography.hazmat.primitives import serialization

from trio_launcher._worker import worker_argv
from trio_launcher.testing import TLSFiles, running_server

from . import echo_app
from .net import open_request, wait_eof
from .proc import ROOT, launch, run_cli

ECHO = "tests.echo_app:app"
FORWARDED = {
    "x-forwarded-for": "203.0.113.7, 127.0.0.1",
    "x-forwarded-proto": "https",
    "x-forwarded-host": "api.example.org",
}


async def test_host_and_port_are_one_bind() -> None:
    async with launch([ECHO, "--host", "127.0.0.1", "--port", "0"]) as proc:
        assert proc.url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient() as client:
            assert (await client.get(proc.url)).json()["scheme"] == "http"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--host", "127.0.0.1", "--bind", "127.0.0.1:0"],
            "--host/--port and --bind both say where to listen: use one",
        ),
        (["--port", "70000"], "argument --port: '70000' is not in 0-65535"),
        (["--forwarded-allow-ips", "10.0.0.300"], "argument --forwarded-allow-ips:"),
        (["--ssl-ciphers", "NO-SUCH-CIPHER"], "argument --ssl-ciphers: 'NO-SUCH-CIPHER'"),
        (["--timeout-keep-alive", "0"], "argument --timeout-keep-alive: '0' must be > 0"),
        (["--forwarded-allow-ips", "*"], "--forwarded-allow-ips needs --proxy-headers"),
        (["--reload-dir", "."], "--reload-dir needs --reload"),
    ],
)
def test_bad_uvicorn_flags_exit_2_naming_the_flag(args: list[str], line: str) -> None:
    result = run_cli([ECHO, *args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"trio-launcher: error: {line}")


async def test_uds(tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    async with launch([ECHO, "--uds", str(path)]) as proc:
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://localhost/x")).json()["path"] == "/x"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    assert not path.exists()


async def test_proxy_headers_and_root_path_from_a_trusted_peer() -> None:
    args = [ECHO, "--port", "0", "--proxy-headers", "--root-path", "/api/"]
    async with launch(args) as proc:
        async with httpx.AsyncClient() as client:
            seen = (await client.get(f"{proc.url}/api/v1", headers=FORWARDED)).json()
            plain = (await client.get(f"{proc.url}/api/v1")).json()
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    assert seen["client"] == ["203.0.113.7", 0]
    assert (seen["scheme"], seen["host"], seen["root_path"]) == ("https", "api.example.org", "/api")
    assert plain["client"][0] == "127.0.0.1"
    assert plain["scheme"] == "http"


async def test_proxy_headers_ignored_from_an_untrusted_peer_and_by_default() -> None:
    untrusted: dict[str, Any] = {"proxy_headers": True, "forwarded_allow_ips": ["10.0.0.0/8"]}
    for options in (untrusted, {}):
        async with running_server(echo_app.app, **options) as server:
            seen = (await server.client.get("/", headers=FORWARDED)).json()
            assert seen["client"][0] == "127.0.0.1"
            assert (seen["scheme"], seen["host"]) == ("http", server.url.split("://")[1])


async def test_forwarded_for_skips_trusted_hops() -> None:
    headers = {"x-forwarded-for": "198.51.100.1, 203.0.113.7, 10.1.2.3"}
    options: dict[str, Any] = {
        "proxy_headers": True,
        "forwarded_allow_ips": ["127.0.0.1", "10.0.0.0/8"],
    }
    async with running_server(echo_app.app, **options) as server:
        # 10.1.2.3 is our own proxy; 203.0.113.7 is the client it saw (198.51.100.1
        # was written by the client itself and cannot be believed).
        assert (await server.client.get("/", headers=headers)).json()["client"][0] == "203.0.113.7"


async def test_timeout_keep_alive_closes_idle_connection() -> None:
    async with launch([ECHO, "--port", "0", "--timeout-keep-alive", "0.3"]) as proc:
        stream, response = await open_request(proc.port)
        assert b" 200 " in response
        with trio.fail_after(5):
            await wait_eof(stream)
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0


async def test_encrypted_key_with_password_and_ciphers(tmp_path: Path) -> None:
    tls = TLSFiles(tmp_path / "tls")
    key = serialization.load_pem_private_key(tls.key_file.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    args = [
        ECHO,
        "--port",
        "0",
        "--ssl-certfile",
        str(tls.cert_file),
        "--ssl-keyfile",
        str(encrypted),
        "--ssl-keyfile-password",
        "s3cret",
        "--ssl-ciphers",
        "ECDHE+AESGCM",
    ]
    async with launch(args) as proc:
        assert proc.url.startswith("https://")
        context = tls.client_context(with_cert=False)
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # the cipher list applies to 1.2
        async with httpx.AsyncClient(verify=context) as client:
            assert (await client.get(proc.url)).json()["scheme"] == "https"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    wrong = run_cli([*args[:-4], "--ssl-keyfile-password", "wrong"])
    assert wrong.returncode == 2, wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


def test_workers_get_fds_instead_of_host_port_and_uds() -> None:
    from trio_launcher._parser import build_parser
    from trio_launcher._ports import BoundSockets

    parser = build_parser()
    argv = [
        ECHO,
        "--host",
        "0.0.0.0",
        "--port=8000",
        "--uds",
        "/run/x.sock",
        "--workers",
        "2",
        "--forwarded-allow-ips",
        "10.0.0.0/8,127.0.0.1",
        "--proxy-headers",
    ]
    opts = parser.parse_args(argv)
    assert worker_argv(parser, opts, BoundSockets(), sys.executable) == [
        sys.executable,
        "-m",
        "trio_launcher",
        "--proxy-headers",
        "--forwarded-allow-ips=10.0.0.0/8,127.0.0.1",
        "--",
        ECHO,
    ]


# --- --reload ------------------------------------------------------------------


async def test_reload_restarts_on_code_change(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    module = code / "reload_app.py"
    module.write_text((ROOT / "tests" / "echo_app.py").read_text())
    sock = tmp_path / "reload.sock"
    args = ["reload_app:app", "--uds", str(sock), "--reload", "--reload-dir", str(code)]
    env = {"PYTHONPATH": f"{code}:{ROOT}"}
    async with launch(args, env=env) as proc:
        transport = httpx.AsyncHTTPTransport(uds=str(sock), retries=3)
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://localhost/")).json()["version"] == "v1"
            module.write_text(module.read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
            await proc.wait_for_line("changed; restarting", timeout=20)
            await proc.wait_for_line("serving on", timeout=20)  # the old line is seen first
            with trio.fail_after(20):
                while True:
                    try:
                        if (await client.get("http://localhost/")).json()["version"] == "v2":
                            break
                    except httpx.TransportError:
                        pass  # between the old server and the new one
                    await trio.sleep(0.05)
        proc.signal(signal.SIGINT)
        assert await proc.wait(timeout=20) == 0, proc.stderr
    assert not sock.exists()
    assert sum("serving on" in line for line in proc.lines) == 2


def test_reload_without_watchfiles_exits_2_naming_the_extra(tmp_path: Path) -> None:
    (tmp_path / "watchfiles.py").write_text("raise ImportError('not installed')\n")
    import subprocess

    from .proc import cli_env

    env = cli_env({"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    result = subprocess.run(
        [sys.executable, "-m", "trio_launcher", ECHO, "--reload"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "trio-launcher: error: --reload needs watchfiles: pip install 'trio-launcher[reload]'"
    ]


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_reload_child_drains_when_the_parent_is_killed(tmp_path: Path) -> None:
    sock = tmp_path / "reload.sock"
    args = [ECHO, "--uds", str(sock), "--reload", "--reload-dir", str(tmp_path)]
    async with launch(args) as proc:
        (child,) = psutil.Process(proc.process.pid).children()
        proc.signal(signal.SIGKILL)  # the parent we started
        await proc.wait()
        with trio.fail_after(15):
            while not gone(child):
                await trio.sleep(0.05)
    assert not sock.exists()  # the child drained and removed its socket file
