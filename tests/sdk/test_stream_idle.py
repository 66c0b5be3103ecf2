"""Which read limit the SDK puts on NDJSON streams, from what the daemon's /v1/health says:
a daemon that fills silences with keepalives gets one, one that does not (older) none."""

from __future__ import annotations

import pytest

from isorun.daemon.config import DaemonConfig
from isorun.errors import ConfigError
from isorun.sdk._core import STREAM_IDLE_FLOOR_S, stream_idle_limit


def test_the_limit_follows_the_daemons_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISORUN_STREAM_IDLE_TIMEOUT_S", raising=False)
    assert stream_idle_limit({"ok": True, "stream_keepalive_s": 15.0}) == STREAM_IDLE_FLOOR_S
    assert stream_idle_limit({"ok": True, "stream_keepalive_s": 60}) == 240
    # a daemon from before keepalives, or a body that is not what we expect: no limit
    for health in ({"ok": True, "version": "0.1.0"}, None, [], {"stream_keepalive_s": True}):
        assert stream_idle_limit(health) is None
    # 1e308: four of it overflow to inf, which no socket takes (OverflowError at each exec)
    for bad in (0, -1, float("inf"), float("nan"), "15", 1e308, 7 * 86400):
        assert stream_idle_limit({"stream_keepalive_s": bad}) is None


def test_the_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    health = {"stream_keepalive_s": 15.0}
    monkeypatch.setenv("ISORUN_STREAM_IDLE_TIMEOUT_S", "2.5")
    assert stream_idle_limit(health) == 2.5
    for off in ("0", "inf", "-3", "1e308"):
        monkeypatch.setenv("ISORUN_STREAM_IDLE_TIMEOUT_S", off)
        assert stream_idle_limit(health) is None
    monkeypatch.setenv("ISORUN_STREAM_IDLE_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="ISORUN_STREAM_IDLE_TIMEOUT_S='soon' is not a number"):
        stream_idle_limit(health)


def test_the_daemon_refuses_a_keepalive_interval_that_would_flood_or_never_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for bad in ("0", "-1", "7200"):
        monkeypatch.setenv("ISORUN_STREAM_KEEPALIVE_S", bad)
        with pytest.raises(ConfigError, match="ISORUN_STREAM_KEEPALIVE_S"):
            DaemonConfig()
    monkeypatch.setenv("ISORUN_STREAM_KEEPALIVE_S", "0.5")
    assert DaemonConfig().stream_keepalive_s == 0.5
