"""Test a service on a real server in three lines: an opt-in pytest plugin.

Enable it in a ``conftest.py`` (it is never loaded into other pytest runs)::

    pytest_plugins = ["trio_launcher.testing"]

and then::

    async def test_hello(app):
        async with running_server(app) as server:
            assert (await server.client.get("/")).status_code == 200

Why not start the server in pytest-trio's ``nursery`` fixture? That nursery
is *cancelled* when the test body ends, so the app's lifespan shutdown never
runs and a broken shutdown goes unseen. :func:`running_server` opens its own
nursery, asks for a graceful shutdown on exit and waits (bounded) until
``serve_http`` has returned.

What is here:

* :class:`TLSFiles` - a trustme CA, a server certificate for ``localhost``
  and ``127.0.0.1``, a client certificate, all written to files, client
  ``SSLContext``s, and rotation in place, by atomic rename, or the way a
  Kubernetes secret volume does it (``..data`` symlink swap).
* :func:`running_server` - ``serve_http`` on ``127.0.0.1:0`` with an
  ``httpx.AsyncClient`` ready for it.
* :class:`FakeEngine` / :class:`FakePollingEngine` - engines that die on
  ``kill()``, with and without ``wait_dead()``.
* fixtures: ``tls_files``, ``fake_engine``, ``fake_polling_engine`` and
  ``server`` (which serves your ``app`` fixture with ``server_options``).
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import trio
import trustme
from hypercorn.config import Config

from ._errors import readable_errors
from ._runner import ServerHandle, serve_http

__all__ = [
    "FakeEngine",
    "FakePollingEngine",
    "RunningServer",
    "TLSFiles",
    "running_server",
]

Layout = Literal["plain", "kubernetes"]


class TLSFiles:
    """Certificates on disk for a TLS test, made with trustme.

    Files (all ``Path``):
        ca_file: the CA that signed the server certificate (clients trust it).
        cert_file, key_file: the server's pair; in the ``kubernetes`` layout
            these are symlinks through ``..data`` as in a secret volume.
        client_ca_file: the bundle of CAs whose client certificates the server
            accepts (``config.ca_certs``); in the same layout as the pair.
        client_cert_file: the client's certificate and key in one PEM.

    Args:
        directory: where to write the files (created if missing).
        layout: ``plain`` files, or a ``kubernetes`` secret volume.
    """

    def __init__(self, directory: str | os.PathLike[str], layout: Layout = "plain") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        self.ca = trustme.CA()
        self.client_ca = self.ca
        self.server_cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.client_cert = self.ca.issue_cert("client@example.org")
        self.ca_file = self.directory / "ca.pem"
        self.client_cert_file = self.directory / "client.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.client_cert.private_key_and_cert_chain_pem.write_to_path(str(self.client_cert_file))
        self.cert_file = self.directory / "tls.crt"
        self.key_file = self.directory / "tls.key"
        self.client_ca_file = self.directory / "client-ca.crt"
        self._generation = 0
        self._trusted_client_cas: list[trustme.CA] = [self.ca]
        self._publish(self._contents())

    # --- what the server uses -------------------------------------------------

    def config(self, verify_mode: ssl.VerifyMode | None = None, **settings: Any) -> Config:
        """A hypercorn Config bound to 127.0.0.1:0 with this pair (and client CAs)."""
        config = Config.from_mapping(settings)
        config.bind = ["127.0.0.1:0"]
        config.certfile = str(self.cert_file)
        config.keyfile = str(self.key_file)
        if verify_mode is not None:
            config.ca_certs = str(self.client_ca_file)
            config.verify_mode = verify_mode
        return config

    # --- what clients use -----------------------------------------------------

    def client_context(self, *, with_cert: bool = True, ca: trustme.CA | None = None,
                       http2: bool = False) -> ssl.SSLContext:  # fmt: skip
        """An SSLContext that trusts the server's CA and presents the client cert."""
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        if with_cert:
            self.client_cert.configure_cert(context)
        context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
        return context

    def new_client_cert(self, ca: trustme.CA) -> ssl.SSLContext:
        """A client context presenting a certificate issued by ``ca``."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        ca.issue_cert("other-client@example.org").configure_cert(context)
        return context

    # --- rotation -------------------------------------------------------------

    def rotate(
        self,
        how: Literal["inplace", "rename"] = "rename",
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> trustme.LeafCert:
        """Issue a new server certificate from the same CA and publish it.

        ``how`` applies to the plain layout (in-place rewrite, or write a
        temporary file and ``os.replace`` it); the kubernetes layout always
        swaps ``..data``. Returns the new certificate.
        """
        self.server_cert = self.ca.issue_cert(
            "localhost", "127.0.0.1", not_before=not_before, not_after=not_after
        )
        self._publish(self._contents(), how)
        return self.server_cert

    def set_client_cas(
        self, *cas: trustme.CA, how: Literal["inplace", "rename"] = "rename"
    ) -> None:
        """Replace the bundle of trusted client CAs with exactly ``cas``."""
        self._trusted_client_cas = list(cas)
        self._publish(self._contents(), how)

    def write_raw(self, name: Literal["cert", "key", "client_ca"], data: bytes) -> None:
        """Write arbitrary bytes over one file (in place), for bad-write tests."""
        target = {"cert": self.cert_file, "key": self.key_file,
                  "client_ca": self.client_ca_file}[name]  # fmt: skip
        target.resolve().write_bytes(data)

    async def presented_cert(
        self, port: int, *, context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> bytes:
        """Handshake with the server on ``port``; the DER of the certificate it presents."""
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=context or self.client_context(), https_compatible=True
        )
        try:
            await stream.do_handshake()
            der: bytes | None = stream.getpeercert(binary_form=True)
        finally:
            await trio.aclose_forcefully(stream)
        assert der is not None
        return der

    def server_fingerprint(self) -> bytes:
        """The DER of the current server certificate, to compare with what a server presents."""
        return ssl.PEM_cert_to_DER_cert(self.server_cert.cert_chain_pems[0].bytes().decode())

    def _contents(self) -> dict[str, bytes]:
        return {
            "tls.crt": b"".join(blob.bytes() for blob in self.server_cert.cert_chain_pems),
            "tls.key": self.server_cert.private_key_pem.bytes(),
            "client-ca.crt": b"".join(ca.cert_pem.bytes() for ca in self._trusted_client_cas),
        }

    def _publish(self, contents: dict[str, bytes], how: str = "rename") -> None:
        self._generation += 1
        if self.layout == "kubernetes":
            self._publish_kubernetes(contents)
            return
        for name, data in contents.items():
            path = self.directory / name
            if how == "inplace" and path.exists():
                with open(path, "r+b") as file:
                    file.truncate(0)
                    file.write(data)
            else:
                tmp = path.with_name(f".{name}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)

    def _publish_kubernetes(self, contents: dict[str, bytes]) -> None:
        # What the kubelet does: write a new timestamped directory, point a
        # temporary symlink at it, rename that over ..data, remove the old one.
        stamp = f"..{datetime.datetime.now():%Y_%m_%d_%H_%M_%S}.{self._generation}"
        new_dir = self.directory / stamp
        new_dir.mkdir()
        for name, data in contents.items():
            (new_dir / name).write_bytes(data)
        data_link = self.directory / "..data"
        old_target = os.readlink(data_link) if data_link.is_symlink() else None
        tmp_link = self.directory / "..data_tmp"
        os.symlink(stamp, tmp_link)
        os.replace(tmp_link, data_link)
        for name in contents:
            link = self.directory / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old_target is not None:
            shutil.rmtree(self.directory / old_target)


class FakePollingEngine:
    """An engine with only ``errored`` and ``is_running``: found by polling."""

    def __init__(self) -> None:
        self.errored = False
        self.is_running = True

    def kill(self) -> None:
        """Die: ``errored`` and not ``is_running``."""
        self.errored = True
        self.is_running = False


class FakeEngine(FakePollingEngine):
    """An engine that also offers ``wait_dead()``: its death is seen at once."""

    def __init__(self) -> None:
        super().__init__()
        self._dead = trio.Event()

    def kill(self) -> None:
        super().kill()
        self._dead.set()

    async def wait_dead(self) -> None:
        await self._dead.wait()


@dataclass
class RunningServer:
    """What :func:`running_server` yields.

    Attributes:
        handle: the :class:`~trio_launcher.ServerHandle` (``urls``,
            ``shutdown()``, ``stopping``, ``engine_alive``, ``tls``).
        client: an ``httpx.AsyncClient`` for the server (base URL set).
        url: the first URL served, like ``http://127.0.0.1:41234``.
        port: its TCP port.
    """

    handle: ServerHandle
    client: httpx.AsyncClient
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return self.handle.urls[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


FAKE_ENGINE_WATCHDOG_INTERVAL = 0.05
"""``watchdog_interval`` in :func:`running_server` when the test does not set
one: a polled fake engine's death is seen in 50 ms, not serve_http's 5 s."""


@asynccontextmanager
async def running_server(
    app: Any,
    config: Config | None = None,
    *,
    tls: TLSFiles | None = None,
    bind: Sequence[str] | None = None,
    client_cert: bool = True,
    http2: bool = False,
    ready_timeout: float = 10.0,
    shutdown_timeout: float = 10.0,
    **serve_options: Any,
) -> AsyncIterator[RunningServer]:
    """Run ``serve_http(app, config, **serve_options)`` for a test, on a free port.

    Args:
        app: the ASGI app (Starlette/FastAPI and Quart-Trio apps included).
        config: a hypercorn ``Config`` (default: ``tls.config()`` with ``tls``,
            else ``Config()``). It is copied; its ``bind`` is NOT used unless
            ``bind`` says so: the server always listens on 127.0.0.1:0.
        tls: serve HTTPS with these certificates; the client trusts their CA
            and presents the client certificate (unless ``client_cert=False``).
        bind: addresses to listen on instead of 127.0.0.1:0 (``unix:PATH``...).
        http2: the client speaks HTTP/2 (with ``tls``).
        ready_timeout, shutdown_timeout: bounds of the test, in seconds, on the
            server becoming ready and on its shutdown (``startup_timeout`` is
            ``serve_http``'s own limit on the app's lifespan startup).
        **serve_options: ``serve_http``'s keyword arguments (``engine``,
            ``health_path``, ``watchdog_interval``...). ``handle_signals``
            defaults to False (the test process keeps Ctrl-C) and
            ``watchdog_interval`` to 0.05 s (fake engines are found dead fast).

    Yields a :class:`RunningServer` whose ``client`` is an ``httpx.AsyncClient``
    with the server's base URL. On exit the server is shut down gracefully and
    awaited: lifespan shutdown runs, and an error from the server fails the
    test with that error (one error, not wrapped in exception groups). Startup
    and shutdown are bounded.

    ``handle_signals`` defaults to False here: a test process keeps Ctrl-C.
    With ``engine_task=fn`` the server is yielded once the engine task has
    started and the app after it; on exit the engine task is stopped last.
    """
    if config is None:
        config = tls.config() if tls is not None else Config()
    else:
        config = copy.copy(config)
    config.bind = list(bind) if bind is not None else ["127.0.0.1:0"]
    serve_options.setdefault("handle_signals", False)
    if "options" not in serve_options:
        serve_options.setdefault("watchdog_interval", FAKE_ENGINE_WATCHDOG_INTERVAL)
    verify: ssl.SSLContext | bool = (
        tls.client_context(with_cert=client_cert, http2=http2) if tls else False
    )
    with readable_errors():
        async with trio.open_nursery() as nursery:
            with trio.fail_after(ready_timeout):
                handle: ServerHandle = await nursery.start(_serve, app, config, serve_options)
            async with _client(handle.urls[0], verify, http2) as client:
                yield RunningServer(handle, client)
            handle.shutdown()
            nursery.cancel_scope.deadline = trio.current_time() + shutdown_timeout
    if nursery.cancel_scope.cancelled_caught:
        raise TimeoutError(f"serve_http did not return within {shutdown_timeout} s of shutdown()")


def _client(url: str, verify: ssl.SSLContext | bool, http2: bool) -> httpx.AsyncClient:
    scheme, _, address = url.partition("://")
    if address.startswith("unix:"):  # hypercorn's http://unix:/path
        transport = httpx.AsyncHTTPTransport(uds=address[5:], verify=verify, http2=http2)
        return httpx.AsyncClient(base_url=f"{scheme}://localhost", transport=transport,
                                 timeout=30)  # fmt: skip
    return httpx.AsyncClient(base_url=url, verify=verify, http2=http2, timeout=30)


async def _serve(
    app: Any,
    config: Config,
    options: dict[str, Any],
    *,
    task_status: trio.TaskStatus[ServerHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(app, config, task_status=task_status, **options)


# --- hooks and fixtures ---------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """pytest-trio runs each test in a nursery, so a failing assert arrives
    wrapped in an ExceptionGroup; report the one error alone."""
    with readable_errors():
        return (yield)


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    """A fresh CA, server pair and client certificate in ``tmp_path/tls``."""
    return TLSFiles(tmp_path / "tls")


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_polling_engine() -> FakePollingEngine:
    return FakePollingEngine()


@pytest.fixture
def server_options() -> dict[str, Any]:
    """Override to pass options to ``running_server`` in the ``server`` fixture."""
    return {}


@pytest.fixture
async def server(app: Any, server_options: dict[str, Any]) -> AsyncIterator[RunningServer]:
    """Your ``app`` fixture served on 127.0.0.1:0 (options from ``server_options``)."""
    async with running_server(app, **server_options) as running:
        yield running
