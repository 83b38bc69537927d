"""Certificate expiry is watched: warnings at 30, 7 and 1 days left, repeated daily.

Days pass on trio's autojump clock; the watcher reads "now" from a clock that
follows it (the wall clock at the start plus trio's elapsed time).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from trio_launcher._metrics import Metrics, using
from trio_launcher._tls import CertificateRefresher, initial_context
from trio_launcher.testing import TLSFiles, running_server

from .apps import App

DAY = 86400.0
HOUR = 3600.0


class Seen(logging.Handler):
    """Records (trio time, level, message) of the runner's expiry lines."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "TLS certificate" in message and ("expires in" in message or "EXPIRED" in message):
            self.lines.append((trio.current_time(), record.levelname, message))


@contextmanager
def seen() -> Iterator[Seen]:
    handler = Seen()
    logger = logging.getLogger("trio_launcher")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def following_trio() -> tuple[datetime.datetime, Callable[[], datetime.datetime]]:
    start, t0 = datetime.datetime.now(datetime.UTC), trio.current_time()
    return start, lambda: start + datetime.timedelta(seconds=trio.current_time() - t0)


def issue(tmp_path: Path, start: datetime.datetime, valid_for: datetime.timedelta) -> TLSFiles:
    tls = TLSFiles(tmp_path)
    tls.rotate(not_before=start - datetime.timedelta(hours=1), not_after=start + valid_for)
    return tls


def watched(
    tmp_path: Path, valid_for: datetime.timedelta
) -> tuple[TLSFiles, CertificateRefresher, Callable[[], datetime.datetime]]:
    """A certificate valid for ``valid_for`` from now, its refresher (no periodic reload)
    and the wall clock that follows trio's."""
    start, now = following_trio()
    tls = issue(tmp_path, start, valid_for)
    config = tls.config()
    return tls, CertificateRefresher(config, initial_context(config), math.inf, now=now), now


async def watch_for(refresher: CertificateRefresher, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.watch_expiry)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_warns_at_each_threshold_and_daily_in_between(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, refresher, _ = watched(tmp_path, datetime.timedelta(days=7, hours=1))
    with seen() as log:
        await watch_for(refresher, 9 * DAY)
    times = [t - log.lines[0][0] for t, _, _ in log.lines]
    levels = [level for _, level, _ in log.lines]
    messages = [m for _, _, m in log.lines]
    # At start: under 30 days.
    assert "less than 30 days left" in messages[0] and times[0] == 0
    # Crossing 7 days (one hour in) warns at once, not a day later.
    assert "less than 7 days left" in messages[1] and times[1] == pytest.approx(HOUR, abs=2)
    # Then every day, and crossing 1 day warns with that threshold.
    one_day = [i for i, m in enumerate(messages) if "less than 1 day left" in m]
    assert one_day and times[one_day[0]] == pytest.approx(6 * DAY + HOUR, abs=2)
    assert all("less than 7 days left" in m for m in messages[1 : one_day[0]])
    # After notAfter: an ERROR, still daily.
    expired = [i for i, level in enumerate(levels) if level == "ERROR"]
    assert expired and times[expired[0]] == pytest.approx(7 * DAY + HOUR, abs=2)
    assert "EXPIRED" in messages[expired[0]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) <= DAY + 2
    assert len(messages) == 2 + 5 + 1 + 2  # start, 7-day crossing, 5 daily, 1 day, expired x2
    assert levels[: expired[0]] == ["WARNING"] * expired[0]


async def test_silent_until_thirty_days_left(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, refresher, _ = watched(tmp_path, datetime.timedelta(days=60))
    t0 = trio.current_time()
    with seen() as log:
        await watch_for(refresher, 31.5 * DAY)
    assert [t - t0 for t, _, _ in log.lines] == pytest.approx([30 * DAY, 31 * DAY], abs=2)
    assert all("less than 30 days left" in m for _, _, m in log.lines)


async def test_a_reload_re_arms_the_watch_and_the_metric(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tls, refresher, now = watched(tmp_path, datetime.timedelta(days=5))
    metrics = Metrics()
    with using(metrics), seen() as log:
        async with trio.open_nursery() as nursery:
            await nursery.start(refresher.watch_expiry)
            assert len(log.lines) == 1 and "less than 7 days left" in log.lines[0][2]
            assert expiry_gauge(metrics) == refresher.switch.current.not_after.timestamp()
            await trio.sleep(HOUR)
            leaf = tls.rotate(not_after=now() + datetime.timedelta(days=90))
            assert refresher.check()
            await trio.sleep(20 * DAY)
            nursery.cancel_scope.cancel()
    assert len(log.lines) == 1  # the renewed certificate is far from expiry
    assert refresher.switch.current.not_after == leaf_not_after(leaf)
    assert expiry_gauge(metrics) == refresher.switch.current.not_after.timestamp()


def leaf_not_after(leaf: object) -> datetime.datetime:
    from cryptography import x509

    pem = leaf.cert_chain_pems[0].bytes()  # type: ignore[attr-defined]
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


def expiry_gauge(metrics: Metrics) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        if family.name == "trio_launcher_tls_certificate_expiry_timestamp_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no expiry gauge")


async def test_a_real_server_warns_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trio_launcher")
    start = datetime.datetime.now(datetime.UTC)
    tls = issue(tmp_path, start, datetime.timedelta(days=10))
    async with running_server(App(), tls.config(), tls=tls) as server:
        assert (await server.client.get("/")).text == "hello"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("expires in 9 days 23 h (less than 30 days left" in w for w in warnings), warnings
