"""TLS that never breaks: the runner owns the SSL context and swaps it whole.

What goes wrong elsewhere, and what we do instead:

* Reloading into the live context (vLLM's refresher) means a failed
  ``load_cert_chain`` - a half-written or mismatched pair - leaves the live
  context without a usable key, and every new handshake fails. We build a
  complete new context in scratch, validate it (the key matches, the leaf is
  currently valid, the CA bundle parses) and only then make it live.
* ``load_verify_locations`` only *adds* CAs, so a CA removed from the bundle
  keeps its clients. A whole new context replaces the bundle.
* trio's ``SSLStream`` uses nothing of the context but ``wrap_bio``; hypercorn's
  listeners are handed a :class:`SwitchableContext` whose ``wrap_bio`` forwards
  to the current context. Swapping it is one attribute assignment: atomic for
  new handshakes, invisible to existing connections.
* Watching paths with inotify-style watchers goes silent after the first
  Kubernetes secret rotation (the files are symlinks through ``..data`` to a
  timestamped directory that is swapped). We poll ``os.stat`` through the
  symlinks plus the resolved path: no thread, cancels at once, sees every swap.
* One rotation touches several files and fires several events. We decide on
  content: the files are read and hashed, and only a new hash is loaded. A
  bad set is reported once and retried when its content changes again.

SIGHUP forces a reload at once, whatever the interval.

**Expiry is watched, not just checked at load.** A certificate that expires
next week used to warn once at start and never again. The refresher's
:meth:`CertificateRefresher.watch_expiry` task warns (WARNING) when the served
certificate has less than 30, 7 and 1 days left: at once when a threshold is
crossed, then again every day while it stays under it (an expired one logs an
ERROR daily), and it keeps the expiry metric up to date. A reload re-arms it
with the new certificate's date. It sleeps on trio's clock and reads the wall
clock when it wakes.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config

from ._errors import CertificateError, ConfigError
from ._metrics import recorder

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("trio_launcher")

EXPIRY_THRESHOLDS = (
    datetime.timedelta(days=30),
    datetime.timedelta(days=7),
    datetime.timedelta(days=1),
)
EXPIRY_REPEAT = datetime.timedelta(days=1)
FULL_READ_EVERY = 30  # polls between reads even when stat says nothing changed


@dataclass(frozen=True)
class LoadedSet:
    """A validated context and what it was built from."""

    context: ssl.SSLContext
    digest: str
    subject: str
    fingerprint: str
    not_after: datetime.datetime


class SwitchableContext:
    """Stands in for ``ssl.SSLContext`` in trio's SSLListener; swapped atomically."""

    def __init__(self, loaded: LoadedSet) -> None:
        self.current = loaded

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.current.context.wrap_bio(
            incoming, outgoing, server_side, server_hostname, session
        )


def _paths(config: Config) -> list[str]:
    paths = [config.certfile, config.keyfile, config.ca_certs]
    return [os.fspath(p) for p in paths if p is not None]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise CertificateError(path, "no such file") from None
    except IsADirectoryError:
        raise CertificateError(path, "is a directory, not a file") from None
    except PermissionError:
        raise CertificateError(path, "permission denied") from None
    except OSError as exc:
        raise CertificateError(path, exc.strerror or str(exc)) from None
    if not data.strip():
        raise CertificateError(path, "is empty")
    return data


def _digest(contents: list[bytes]) -> str:
    hasher = hashlib.sha256()
    for data in contents:
        hasher.update(len(data).to_bytes(8, "big"))
        hasher.update(data)
    return hasher.hexdigest()


def load_set(config: Config, now: datetime.datetime | None = None) -> LoadedSet:
    """Build and validate a complete server context from the files of ``config``.

    Raises:
        CertificateError: naming the file at fault and why.
    """
    paths = _paths(config)
    before = [_read(p) for p in paths]
    cert_path, key_path = paths[0], paths[1]
    leaf = _parse_leaf(cert_path, before[0])
    now = now or datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            cert_path, f"not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    if leaf.not_valid_after_utc < now:
        raise CertificateError(
            cert_path, f"expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no system CAs for client auth
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    try:
        context.set_ciphers(config.ciphers)
    except ssl.SSLError as exc:
        raise ConfigError(f"ciphers {config.ciphers!r}: {exc.reason or exc}") from None
    context.set_alpn_protocols(config.alpn_protocols)
    try:
        context.load_cert_chain(cert_path, key_path, password=config.keyfile_password)
    except ssl.SSLError as exc:
        raise CertificateError(key_path, _ssl_reason(exc)) from None
    except OSError as exc:
        raise CertificateError(key_path, exc.strerror or str(exc)) from None
    if config.ca_certs is not None:
        ca_path = paths[2]
        try:
            context.load_verify_locations(cadata=before[2].decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise CertificateError(ca_path, f"not a valid CA bundle ({_ssl_reason(exc)})") from None
    if config.verify_mode is not None:
        context.verify_mode = config.verify_mode
    if config.verify_flags is not None:
        context.verify_flags = config.verify_flags

    after = [_read(p) for p in paths]
    if after != before:
        # A writer is mid-rotation: what we loaded may not be what we checked.
        raise CertificateError(cert_path, "changed while it was being loaded")
    from cryptography.hazmat.primitives import serialization

    der = leaf.public_bytes(serialization.Encoding.DER)
    return LoadedSet(
        context=context,
        digest=_digest(before),
        subject=leaf.subject.rfc4514_string() or _san(leaf),
        fingerprint=hashlib.sha256(der).hexdigest(),
        not_after=leaf.not_valid_after_utc,
    )


def _parse_leaf(path: str, data: bytes) -> x509.Certificate:
    from cryptography import x509  # imported only when TLS is on: it costs ~8 MiB

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(path, "not a PEM certificate (truncated or garbage?)") from None
    return certs[0]


def _san(cert: x509.Certificate) -> str:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "(no subject)"
    return ", ".join(str(name.value) for name in ext.value)


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    if reason == "KEY_VALUES_MISMATCH":
        return "key does not match the certificate"
    if reason:
        return str(reason).lower().replace("_", " ")
    return str(exc)


def describe(loaded: LoadedSet) -> str:
    return (
        f"subject {loaded.subject}, SHA-256 {loaded.fingerprint}, "
        f"expires {loaded.not_after:%Y-%m-%d %H:%M:%S} UTC"
    )


def wall_clock() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def warn_if_expiring(loaded: LoadedSet, now: datetime.datetime) -> float:
    """Log how close ``loaded`` is to its expiry if it is under a threshold;
    the seconds until the next check (a day, or sooner if a threshold comes first)."""
    left = loaded.not_after - now
    if left <= datetime.timedelta(0):
        log.error(
            "the live TLS certificate EXPIRED %s ago: clients refuse it (%s)",
            _span(-left),
            describe(loaded),
        )
        return EXPIRY_REPEAT.total_seconds()
    under = [t for t in EXPIRY_THRESHOLDS if left < t]
    if under:
        days = under[-1].days
        log.warning(
            "the live TLS certificate expires in %s (less than %d day%s left; %s)",
            _span(left),
            days,
            "s" if days > 1 else "",
            describe(loaded),
        )
    # Wake just past the next threshold below us (or the expiry itself).
    nxt = max(t for t in (*EXPIRY_THRESHOLDS, datetime.timedelta(0)) if t < left)
    until = (left - nxt).total_seconds() + 1.0
    return min(until, EXPIRY_REPEAT.total_seconds())


def _span(delta: datetime.timedelta) -> str:
    hours = delta.seconds // 3600
    if delta.days:
        return f"{delta.days} day{'s' if delta.days > 1 else ''} {hours} h"
    return f"{hours} h {delta.seconds % 3600 // 60} min"


def initial_context(config: Config) -> SwitchableContext:
    """Load the configured files at start; raises CertificateError (a ConfigError)."""
    if config.verify_mode in (ssl.CERT_REQUIRED, ssl.CERT_OPTIONAL) and config.ca_certs is None:
        raise ConfigError(
            "client certificates are verified (verify_mode) but no CA bundle is given "
            "(ca_certs / --ca-certs): no client could ever be accepted"
        )
    loaded = load_set(config)
    log.info("TLS certificate loaded: %s", describe(loaded))
    return SwitchableContext(loaded)


class CertificateRefresher:
    """Watches the certificate files and swaps in validated new sets.

    Args:
        config: where the files are (``certfile``, ``keyfile``, ``ca_certs``).
        switch: the live context to swap.
        interval: seconds between polls; ``inf``: only on ``request_reload()``.
        on_reload: called as ``on_reload(True)`` before and ``on_reload(False)``
            after a reload attempt (for systemd's RELOADING=1).

    Attributes:
        reloads: how many new sets went live.
        failures: how many sets were refused.
    """

    def __init__(
        self,
        config: Config,
        switch: SwitchableContext,
        interval: float,
        on_reload: Callable[[bool], None] = lambda reloading: None,
        now: Callable[[], datetime.datetime] = wall_clock,
    ) -> None:
        self.config = config
        self.switch = switch
        self.interval = interval
        self.on_reload = on_reload
        self.reloads = 0
        self.failures = 0
        self._kick = trio.Event()
        self._failed_digest: str | None = None
        self._stat_signature = self._signature()
        self.now = now
        self._expiry_kick = trio.Event()
        self._next_expiry_check = 0.0

    def request_reload(self) -> None:
        """Reload at once (SIGHUP)."""
        self._kick.set()

    def _signature(self) -> tuple[object, ...]:
        parts: list[object] = []
        for path in _paths(self.config):
            try:
                st = os.stat(path)
                parts.append(
                    (
                        os.path.realpath(path),
                        st.st_ino,
                        st.st_dev,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                    )
                )
            except OSError as exc:
                parts.append((path, exc.errno))
        return tuple(parts)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled."""
        task_status.started()
        polls = 0
        while True:
            forced = False
            with trio.move_on_after(self.interval):
                await self._kick.wait()
                forced = True
            if forced:
                self._kick = trio.Event()
                log.info("TLS reload requested")
            polls += 1
            signature = self._signature()
            if forced or signature != self._stat_signature or polls % FULL_READ_EVERY == 0:
                self._stat_signature = signature
                self.check(forced=forced)

    async def watch_expiry(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Task: warn while the served certificate is close to expiry (see the top)."""
        self._check_expiry()
        task_status.started()
        while True:
            self._expiry_kick = trio.Event()
            with trio.move_on_after(self._next_expiry_check) as timer:
                await self._expiry_kick.wait()  # a reload checked already
            if timer.cancelled_caught:
                self._check_expiry()

    def _check_expiry(self) -> None:
        loaded = self.switch.current
        recorder().certificate_expiry(loaded.not_after.timestamp())
        self._next_expiry_check = warn_if_expiring(loaded, self.now())

    def check(self, forced: bool = False) -> bool:
        """Load the files if their content changed (or ``forced``); True if swapped."""
        try:
            digest = _digest([_read(p) for p in _paths(self.config)])
        except CertificateError as exc:
            return self._refuse(exc, digest=f"unreadable:{exc}", forced=forced)
        if not forced and digest in (self.switch.current.digest, self._failed_digest):
            return False
        self.on_reload(True)
        try:
            loaded = load_set(self.config)
        except ConfigError as exc:
            return self._refuse(exc, digest=digest, forced=forced)
        finally:
            self.on_reload(False)
        self.switch.current = loaded
        self._failed_digest = None
        self.reloads += 1
        log.info("TLS certificate reloaded: %s", describe(loaded))
        recorder().tls_reload(True)
        self._check_expiry()
        self._expiry_kick.set()
        return True

    def _refuse(self, exc: ConfigError, digest: str, forced: bool) -> bool:
        if digest != self._failed_digest or forced:
            self.failures += 1
            recorder().tls_reload(False)
            log.error("TLS reload refused, still serving the previous certificate: %s", exc)
        self._failed_digest = digest
        return False
