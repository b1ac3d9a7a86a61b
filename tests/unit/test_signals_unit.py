"""Signals besides the probe, in the guard: a rule over real traffic decides, and a signal
that sees nothing of use never does. Built from `guardd.testing` alone."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from guardd.testing import FedSignal, GuardRig, build_guard

pytestmark = pytest.mark.anyio

CONFIG = """
[upstreams.blue]
url = "http://127.0.0.1:9009/healthz"
[upstreams.green]
url = "http://127.0.0.1:9010/healthz"
[switch]
kind = "state-file"
path = "/tmp/deploy-state.json"
[signals.traffic]
kind = "access_log"
source = "file:/var/log/nginx/threader.guardd.log"
addresses = { blue = ["127.0.0.1:9009"], green = ["127.0.0.1:9010"] }
[[rules]]
signal = "traffic"
stat = "error_ratio"
above = 0.05
severity = "P0"
min_samples = 50
[[rules]]
name = "quiet"
signal = "traffic"
stat = "rps"
below = 0.5
severity = "P1"
for = "0s"
min_samples = 0
"""


async def rig_from(tmp_path: Path) -> GuardRig:
    path = tmp_path / "threader.toml"
    path.write_text(textwrap.dedent(CONFIG))
    rig = await build_guard(tmp_path, config=path, active="green").start()
    for name in ("blue", "green"):
        rig.probers[name].answer(200)
    return rig


def feed(rig: GuardRig, color: str, requests: int, ratio: float) -> None:
    rig.signals["traffic"].feed(
        color,  # type: ignore[arg-type]
        samples=requests,
        stats={"requests": requests, "rps": requests / 60, "error_ratio": ratio},
        now=rig.clock.monotonic(),
    )


async def test_a_rule_over_real_traffic_rolls_back_with_its_evidence(tmp_path: Path) -> None:
    async with await rig_from(tmp_path) as rig:
        assert isinstance(rig.signals["traffic"], FedSignal)  # one per [signals.NAME]
        await rig.probe_rounds(3)
        feed(rig, "blue", 600, 0.0)
        feed(rig, "green", 812, 0.19)
        await rig.probe_round()
        assert rig.guard.active == "blue"
        (started,) = rig.events("rollback_started")
        e = started["evidence"]
        assert (e["rule"], e["signal"], e["stat"], e["value"], e["samples"]) == (
            "traffic.error_ratio", "traffic", "error_ratio", 0.19, 812,
        )  # fmt: skip


async def test_too_few_requests_are_inconclusive_never_healthy(tmp_path: Path) -> None:
    async with await rig_from(tmp_path) as rig:
        await rig.probe_rounds(3)
        feed(rig, "blue", 100, 0.0)
        feed(rig, "green", 40, 0.5)  # 40 requests of 50: half of them 5xx, yet no verdict
        await rig.probe_round()
        assert rig.guard.active == "green"
        rules = {r["rule"]: r for r in rig.guard.snapshot()["rules"]}
        green = rules["traffic.error_ratio"]["green"]
        assert (green["state"], green["why"]) == ("inconclusive", "40 of 50 samples")


async def test_a_signal_that_cannot_read_makes_its_rules_inconclusive(tmp_path: Path) -> None:
    async with await rig_from(tmp_path) as rig:
        await rig.probe_rounds(3)
        feed(rig, "green", 0, 0.0)  # no request: the `quiet` rule (rps <= 0.5) would fire...
        rig.signals["traffic"].problem = "permission denied: /var/log/nginx/threader.guardd.log"
        for _ in range(3):
            await rig.probe_round()
        # ... but a log guardd cannot read says nothing: no rollback, one alert, a warning.
        assert rig.guard.active == "green" and rig.events("rollback_started") == []
        alerts = [e["reason"] for e in rig.events("alert") if "signal traffic" in e["reason"]]
        said = (
            "signal traffic gives nothing: permission denied: "
            "/var/log/nginx/threader.guardd.log; its rules are inconclusive until it reads again"
        )
        assert alerts == [said]
        status = rig.guard.snapshot()
        assert any("signal traffic gives nothing" in w for w in status["warnings"])
        quiet = next(r for r in status["rules"] if r["rule"] == "quiet")
        assert quiet["green"]["state"] == "inconclusive"


class LoggedSignal(FedSignal):
    """A fed signal that also counts lines by outcome, as the access_log adapter does."""

    def __init__(self) -> None:
        super().__init__("traffic")
        self.lines = {"ok": 0, "unparsed": 0, "unattributed": 0}


async def test_a_log_of_nothing_usable_is_said_and_decides_nothing(tmp_path: Path) -> None:
    path = tmp_path / "threader.toml"
    path.write_text(textwrap.dedent(CONFIG))
    signal = LoggedSignal()
    async with await build_guard(tmp_path, config=path, signals={"traffic": signal}).start() as rig:
        for name in ("blue", "green"):
            rig.probers[name].answer(200)
        await rig.probe_rounds(2)
        feed(rig, "green", 60, 0.0)  # what was counted before: 1 req/s, no rule fires
        signal.lines["unparsed"] += 15  # nginx's default format, not guardd's
        await rig.probe_round()
        signal.lines["unattributed"] += 10
        await rig.probe_round()
        assert rig.guard.active == "green"
        (alert,) = [e for e in rig.events("alert") if "signal traffic" in e["reason"]]
        assert (
            "none of the last 25 lines was usable (unattributed 10, unparsed 15)"
            in (alert["reason"])
        )
        # Lines that count again end the episode.
        signal.lines["ok"] += 5
        await rig.probe_round()
        assert rig.guard.snapshot()["signals"]["traffic"]["problem"] is None


class MatchedSignal(FedSignal):
    """A fed signal that counts lines as the log_match adapter does: matched or not."""

    def __init__(self) -> None:
        super().__init__("traffic")
        self.lines = {"matched": 0, "unmatched": 0, "oversize": 0, "binary": 0}


async def test_a_log_of_unmatched_lines_is_a_count_of_0_not_a_log_of_nothing_usable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "threader.toml"
    path.write_text(textwrap.dedent(CONFIG))
    signal = MatchedSignal()
    async with await build_guard(tmp_path, config=path, signals={"traffic": signal}).start() as rig:
        for name in ("blue", "green"):
            rig.probers[name].answer(200)
        await rig.probe_rounds(2)
        feed(rig, "green", 60, 0.0)
        signal.lines["unmatched"] += 500  # an application's ordinary lines, none an error
        await rig.probe_rounds(3)
        assert [e for e in rig.events("alert") if "signal traffic" in e["reason"]] == []
        assert rig.guard.snapshot()["signals"]["traffic"]["problem"] is None
        # Its rules still read it: an error ratio now rolls back.
        feed(rig, "green", 100, 0.5)
        await rig.probe_round()
        assert rig.guard.active == "blue"


class PerColorSignal(FedSignal):
    """A signal whose adapter makes only the failing color's reading inconclusive."""

    blind_on_problem = False


async def test_a_fault_of_the_standby_s_source_leaves_the_active_color_guarded(
    tmp_path: Path,
) -> None:
    path = tmp_path / "threader.toml"
    path.write_text(textwrap.dedent(CONFIG))
    signal = PerColorSignal("traffic")
    async with await build_guard(tmp_path, config=path, signals={"traffic": signal}).start() as rig:
        for name in ("blue", "green"):
            rig.probers[name].answer(200)
        await rig.probe_rounds(2)
        signal.problem = "blue: timeout: no answer within 2s"  # the standby's source only
        feed(rig, "green", 812, 0.19)  # ... while the active color fails for real
        await rig.probe_round()
        assert rig.guard.active == "blue"
        (started,) = rig.events("rollback_started")
        assert started["evidence"]["rule"] == "traffic.error_ratio"
