"""Deploying: systemd socket activation and notify, a Kubernetes pod's life.

Worker processes have their own file, test_workers.py."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import trio

from trio_launcher._systemd import listen_fds, notify
from trio_launcher.testing import TLSFiles

from .net import get
from .proc import launch, socket_activated


async def test_socket_activation_and_notify_order(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    notify_path = str(tmp_path / "notify.sock")
    notify_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify_sock.bind(notify_path)
    process = await socket_activated(
        [sys.executable, "-m", "trio_launcher", "tests.apps:app"], listener, notify_path
    )
    listener.close()
    try:
        messages: list[str] = []
        with trio.fail_after(15):
            messages.append((await notify_sock.recv(4096)).decode())
        assert messages[0].startswith("READY=1")
        assert (await get(f"http://127.0.0.1:{port}/")).text == "hello"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            messages.append((await notify_sock.recv(4096)).decode())
            assert await process.wait() == 0
        assert messages[1] == "STOPPING=1"
    finally:
        if process.returncode is None:
            process.kill()
        notify_sock.close()


def test_listen_fds_only_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ  # unset either way: children must not see them
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert listen_fds() == [3, 4]


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"trio-launcher-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("RELOADING=1", "MONOTONIC_USEC=1")
        assert sock.recv(100) == b"RELOADING=1\nMONOTONIC_USEC=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


async def test_notify_reloading_around_certificate_reload(tmp_path: Path) -> None:
    tls = TLSFiles(tmp_path / "tls")
    notify_path = str(tmp_path / "notify.sock")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        await notify_sock.bind(notify_path)
        args = [
            "tests.apps:app",
            "--bind",
            "127.0.0.1:0",
            "--certfile",
            str(tls.cert_file),
            "--keyfile",
            str(tls.key_file),
        ]
        async with launch(args, env={"NOTIFY_SOCKET": notify_path}) as proc:

            async def next_message() -> str:
                with trio.fail_after(10):
                    return (await notify_sock.recv(4096)).decode()

            assert (await next_message()).startswith("READY=1")
            tls.rotate()
            proc.signal(signal.SIGHUP)
            reloading = (await next_message()).split("\n")
            assert reloading[0] == "RELOADING=1"
            assert reloading[1].startswith("MONOTONIC_USEC=")
            assert await next_message() == "READY=1"
            proc.signal(signal.SIGTERM)
            assert await next_message() == "STOPPING=1"
            assert await proc.wait() == 0
