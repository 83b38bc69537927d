"""TLS: the runner's own context, validate-then-swap reload, Kubernetes swaps, mTLS."""

from __future__ import annotations

import datetime
import os
import signal
import ssl
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
import trustme

from trio_launcher import CertificateRefresher, ConfigError, serve_http
from trio_launcher.testing import RunningServer, TLSFiles, presented_cert, running_server

from .apps import App
from .proc import launch, run_cli, served

INTERVAL = 0.2
MARGIN = 1.0  # one poll may just have missed the write, a handshake, a busy machine


async def wait_served(tls: TLSFiles, server: RunningServer, timeout: float) -> None:
    """Wait until the server presents ``tls``'s current certificate."""
    expected = tls.server_cert_der()
    with trio.fail_after(timeout):
        while await presented_cert(server.port, tls) != expected:
            await trio.sleep(0.01)


async def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def serves(tls: TLSFiles, server: RunningServer, expected: bytes) -> bool:
    return await presented_cert(server.port, tls) == expected


def refresher_of(server: RunningServer) -> CertificateRefresher:
    refresher = server.handle.tls
    assert refresher is not None
    return refresher


async def refused_and_old_stays(
    tls: TLSFiles, server: RunningServer, old: bytes, failures: int = 1
) -> None:
    """Wait until the refresher has refused the files ``failures`` times in all; the
    server still presents the ``old`` certificate."""
    refresher = refresher_of(server)
    await wait_until(lambda: refresher.failures == failures, INTERVAL + MARGIN)
    assert await serves(tls, server, old)


def refreshing(tls: TLSFiles, **settings: Any) -> AbstractAsyncContextManager[RunningServer]:
    return running_server(
        App(),
        tls.config(**settings),
        tls=tls,
        enable_ssl_refresh=True,
        ssl_refresh_interval=INTERVAL,
    )


class Handshaker:
    """Handshakes in a loop in the background; counts successes and failures."""

    def __init__(self, tls: TLSFiles, port: int) -> None:
        self.tls, self.port = tls, port
        self.ok = 0
        self.failed: list[BaseException] = []

    async def run(self) -> None:
        while True:
            try:
                await presented_cert(self.port, self.tls)
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                self.failed.append(exc)
            else:
                self.ok += 1
            await trio.lowlevel.checkpoint()


async def test_rotation_under_handshake_load_loses_nothing(tls_files: TLSFiles) -> None:
    async with refreshing(tls_files) as server:
        handshaker = Handshaker(tls_files, server.port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshaker.run)
            for i in range(5):
                tls_files.rotate("inplace" if i % 2 else "rename")
                await wait_served(tls_files, server, INTERVAL + MARGIN)
                # Handshakes go on across every rotation (however busy the machine).
                seen = handshaker.ok
                with trio.fail_after(10):
                    while handshaker.ok <= seen:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert server.handle.tls is not None
        assert server.handle.tls.reloads == 5  # one rotation, one reload
        assert server.handle.tls.failures == 0
        assert handshaker.failed == []
        assert handshaker.ok >= 5


async def test_kubernetes_swaps_are_each_picked_up(tmp_path: Path) -> None:
    tls = TLSFiles(tmp_path / "secret", layout="kubernetes")
    async with refreshing(tls) as server:
        for _ in range(3):
            tls.rotate()
            await wait_served(tls, server, INTERVAL + MARGIN)
        assert (await server.client.get("/")).text == "hello"


async def test_half_written_pair_keeps_old_until_complete(tls_files: TLSFiles) -> None:
    async with refreshing(tls_files) as server:
        refresher = refresher_of(server)
        old = tls_files.server_cert_der()
        handshaker = Handshaker(tls_files, server.port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshaker.run)
            new_cert = tls_files.ca.issue_cert("localhost", "127.0.0.1")
            # 1. the certificate first: it does not match the old key.
            tls_files.write_raw("cert", new_cert.cert_chain_pems[0].bytes())
            await refused_and_old_stays(tls_files, server, old)
            # 2. a truncated key.
            key = new_cert.private_key_pem.bytes()
            tls_files.write_raw("key", key[: len(key) // 2])
            await refused_and_old_stays(tls_files, server, old, failures=2)
            # 3. the whole key: now the pair is complete and goes live.
            tls_files.write_raw("key", key)
            tls_files.server_cert = new_cert
            await wait_served(tls_files, server, INTERVAL + MARGIN)
            nursery.cancel_scope.cancel()
        assert handshaker.failed == []
        assert refresher.reloads == 1


async def test_removed_ca_is_really_revoked(tls_files: TLSFiles) -> None:
    other_ca = trustme.CA()
    tls_files.set_client_cas(tls_files.ca, other_ca)
    other_client = tls_files.client_context_for(other_ca)
    async with refreshing(tls_files, verify_mode=ssl.CERT_REQUIRED) as server:
        async with httpx.AsyncClient(verify=other_client) as client:
            assert (await client.get(server.url)).text == "hello"
        refresher = refresher_of(server)
        tls_files.set_client_cas(tls_files.ca)
        await wait_until(lambda: refresher.reloads == 1, INTERVAL + MARGIN)
        # Under TLS 1.3 the rejection arrives on the client's first read.
        async with httpx.AsyncClient(verify=other_client) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(server.url)
        assert (await server.client.get("/")).text == "hello"  # the kept CA still works


async def test_mtls_required_rejects_client_without_certificate(tls_files: TLSFiles) -> None:
    config = tls_files.config(verify_mode=ssl.CERT_REQUIRED)
    async with running_server(App(), config, tls=tls_files) as server:
        assert (await server.client.get("/")).text == "hello"
        no_cert = tls_files.client_context(with_cert=False)
        async with httpx.AsyncClient(verify=no_cert) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(server.url)


async def test_expired_certificate_is_refused_and_old_stays(
    tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    async with refreshing(tls_files) as server:
        old = tls_files.server_cert_der()
        now = datetime.datetime.now(datetime.UTC)
        tls_files.rotate(
            not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
        )
        await refused_and_old_stays(tls_files, server, old)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1
        assert str(tls_files.cert_file) in errors[0] and "expired" in errors[0]


async def test_load_logs_fingerprint_and_warns_near_expiry(
    tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trio_launcher")
    async with refreshing(tls_files) as server:
        refresher = refresher_of(server)
        now = datetime.datetime.now(datetime.UTC)
        leaf = tls_files.rotate(not_after=now + datetime.timedelta(days=5))
        await wait_until(lambda: refresher.reloads == 1, INTERVAL + MARGIN)
    text = "\n".join(r.getMessage() for r in caplog.records)
    import hashlib

    fingerprint = hashlib.sha256(tls_files.server_cert_der()).hexdigest()
    assert f"SHA-256 {fingerprint}" in text
    assert "expires" in text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # notAfter (whole seconds) is 5 days from the rotation: under 5 days at the reload.
    assert any("expires in 4 days 23 h (less than 7 days left" in w for w in warnings), warnings
    assert leaf is tls_files.server_cert


async def test_safe_defaults_and_alpn(tls_files: TLSFiles) -> None:
    async with running_server(App(), tls_files.config(), tls=tls_files) as server:
        refresher = refresher_of(server)
        context = refresher.switch.current.context
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
        for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
            client = tls_files.client_context()
            client.set_alpn_protocols(offered)
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", server.port, ssl_context=client, https_compatible=True
            )
            await stream.do_handshake()
            assert stream.selected_alpn_protocol() == chosen
            await trio.aclose_forcefully(stream)


async def test_shutdown_while_watching_is_prompt(tls_files: TLSFiles) -> None:
    with trio.fail_after(2):
        async with running_server(
            App(),
            tls_files.config(),
            tls=tls_files,
            enable_ssl_refresh=True,
            ssl_refresh_interval=3600,
        ):
            pass


async def test_sighup_reloads_at_once_with_long_interval(tls_files: TLSFiles) -> None:
    args = served(
        "tests.apps:app",
        certfile=tls_files.cert_file,
        keyfile=tls_files.key_file,
        ssl_refresh=True,
        ssl_refresh_interval=3600,
    )
    async with launch(args) as proc:
        assert proc.url.startswith("https://")
        assert await presented_cert(proc.port, tls_files) == tls_files.server_cert_der()
        tls_files.rotate()
        proc.signal(signal.SIGHUP)
        await proc.wait_for_line("TLS certificate reloaded", timeout=1)
        assert await presented_cert(proc.port, tls_files) == tls_files.server_cert_der()
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0


def test_bad_files_at_start_exit_2_naming_the_file(tmp_path: Path) -> None:
    tls = TLSFiles(tmp_path)
    other = TLSFiles(tmp_path / "other")
    missing = tmp_path / "missing.key"
    cases = [
        ([str(tls.cert_file), str(missing)], f"{missing}: no such file"),
        ([str(tls.cert_file), str(other.key_file)], "key does not match the certificate"),
        ([str(tmp_path), str(tls.key_file)], "is a directory"),
    ]
    for (cert, key), needle in cases:
        result = run_cli(["tests.apps:app", "--certfile", cert, "--keyfile", key])
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert needle in lines[0]
    result = run_cli(["tests.apps:app", "--certfile", str(tls.cert_file)])
    assert result.returncode == 2
    assert "--keyfile is missing" in result.stderr


async def test_verify_mode_without_ca_bundle_is_a_config_error(tls_files: TLSFiles) -> None:
    config = tls_files.config()
    config.verify_mode = ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="no CA bundle"):
        await serve_http(App(), config, handle_signals=False)


async def test_open_connection_keeps_working_across_a_reload(tls_files: TLSFiles) -> None:
    async with refreshing(tls_files) as server:
        old = tls_files.server_cert_der()
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1",
            server.port,
            ssl_context=tls_files.client_context(),
            https_compatible=True,
        )
        await stream.do_handshake()
        tls_files.rotate()
        await wait_served(tls_files, server, INTERVAL + MARGIN)
        # The connection opened before the reload still talks, with its old certificate.
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        reply = b""
        with trio.fail_after(5):
            while b"hello" not in reply:
                reply += await stream.receive_some(65536)
        assert stream.getpeercert(binary_form=True) == old
        await trio.aclose_forcefully(stream)


async def test_unreadable_key_is_refused_and_old_stays(
    tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    import trio_launcher._tls

    async with refreshing(tls_files) as server:
        old = tls_files.server_cert_der()
        key = str(tls_files.key_file)
        if os.geteuid() == 0:
            # root reads any file whatever its mode: the only part mocked here.
            def guarded_open(path: Any, *args: Any, **kwargs: Any) -> Any:
                if str(path) == key:
                    raise PermissionError(13, "Permission denied", key)
                return builtins.open(path, *args, **kwargs)

            monkeypatch.setattr(trio_launcher._tls, "open", guarded_open, raising=False)
        tls_files.rotate()
        os.chmod(tls_files.key_file, 0)
        await refused_and_old_stays(tls_files, server, old)
        monkeypatch.undo()
        os.chmod(tls_files.key_file, 0o600)
        await wait_served(tls_files, server, INTERVAL + MARGIN)
