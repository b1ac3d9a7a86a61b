"""Flapping and noise, replayed through the pure core in simulated time.

`Replay` does what the daemon does around `GuardMachine`: probes each color on its
cadence (fast while the active color is failing), runs the QoS guard window, and acts
on the machine's decisions — all with time as an argument, so ten minutes of a flapping
or noisy upstream take a moment and replay the same way every time.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from guardd.core.machine import Alert, Facts, GuardMachine, Hold, Rollback
from guardd.core.policy import PolicySpec
from guardd.core.qos import QosWindow
from guardd.core.types import COLORS, Color, Outcome
from tests.faults.util import MakeFaultLab, figure
from tests.harness.daemon import wait_until

# An upstream's behaviour: (outcome, latency in seconds) at a moment of simulated time.
Behaviour = Callable[[float], tuple[Outcome, float]]
TEN_MINUTES = 600.0


def healthy(_t: float) -> tuple[Outcome, float]:
    """Always fine, 5 ms."""
    return Outcome.OK, 0.005


def flapping(period: float, *, phase: float = 0.0) -> Behaviour:
    """Healthy for `period` seconds, failing (503) for `period` seconds, and so on."""

    def at(t: float) -> tuple[Outcome, float]:
        failing = int((t + phase) // period) % 2 == 1
        return (Outcome.HTTP_5XX, 0.004) if failing else (Outcome.OK, 0.005)

    return at


def noisy(
    seed: int, *, error_rate: float = 0.01, spike_rate: float = 0.02, spike: float = 2.0
) -> Behaviour:
    """Healthy, but 1 % of answers are 5xx and some take `spike` seconds."""
    rng = random.Random(seed)  # noqa: S311 - repeatable noise, not secrets

    def at(_t: float) -> tuple[Outcome, float]:
        if rng.random() < error_rate:
            return Outcome.HTTP_5XX, 0.003
        return Outcome.OK, spike if rng.random() < spike_rate else 0.004 + rng.random() * 0.02

    return at


@dataclass
class Replay:
    """The daemon's edges around the pure machine, in simulated time."""

    spec: PolicySpec
    interval: float = 1.0
    fast_interval: float = 0.25
    qos_window: float = 300.0
    qos_max_error_ratio: float = 0.01
    qos_min_health_ratio: float = 0.99
    active: Color = "green"
    lock: QosWindow | None = None
    rollbacks: list[tuple[float, Color, Color]] = field(default_factory=list)
    holds: list[tuple[float, str]] = field(default_factory=list)
    alerts: list[tuple[float, str]] = field(default_factory=list)
    active_over_time: list[tuple[float, Color]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.machine = GuardMachine(self.spec, self.interval)

    def cadence(self, color: Color) -> float:
        """As `Guard.cadence`: fast while confirming a failure of the active color."""
        w = self.machine.windows[color]
        hold = self.machine.hold
        confirming = (color == self.active and w.consecutive_failures > 0) or (
            hold is not None
            and not hold.sticky
            and color == self.machine.rollback_target(self.active)
        )
        return self.fast_interval if confirming else self.interval

    def run(self, behaviour: dict[Color, Behaviour], until: float) -> Replay:
        """Probe, observe and decide until `until` seconds of simulated time."""
        due = dict.fromkeys(COLORS, 0.0)
        while (t := min(due.values())) < until:
            for color in COLORS:
                if due[color] == t:
                    outcome, latency = behaviour[color](t)
                    self.machine.observe(color, t, outcome, latency)
                    if self.lock is not None and color == self.active:
                        self.lock.add(outcome)
                    due[color] = t + max(latency, self.cadence(color))
            self.tick(t)
        return self

    def tick(self, now: float) -> None:
        """One decision tick: the QoS window first, then the machine, then its actions."""
        if self.lock is not None and self.lock.due(now):
            if self.lock.verdict().met:
                self.lock = None
            else:
                self.lock.restart(now, self.qos_window)
        in_budget = sum(1 for t, _, _ in self.rollbacks if t >= now - self.spec.budget_window)
        decision = self.machine.decide(
            Facts(
                now=now,
                active=self.active,
                qos_locked=self.lock is not None,
                rollbacks_in_budget=in_budget,
            )
        )
        for action in decision.actions:
            if isinstance(action, Rollback):
                self.rollbacks.append((now, action.source, action.target))
                self.active = action.target
                self.machine.policy.reset(action.target)
                self.machine.rollback_succeeded(action.source)
                self.lock = QosWindow(
                    now, self.qos_window, self.qos_max_error_ratio, self.qos_min_health_ratio
                )
            elif isinstance(action, Hold):
                self.holds.append((now, action.reason))
            elif isinstance(action, Alert):
                self.alerts.append((now, action.reason))
        if not self.active_over_time or self.active_over_time[-1][1] != self.active:
            self.active_over_time.append((now, self.active))

    @property
    def switches(self) -> int:
        """How often traffic moved."""
        return len(self.active_over_time) - 1


@pytest.mark.parametrize("period", [2.0, 3.0, 5.0, 10.0])
def test_flapping_green_is_rolled_back_once_and_never_back(period: float) -> None:
    r = Replay(PolicySpec(rollback_to="blue")).run(
        {"blue": healthy, "green": flapping(period)}, TEN_MINUTES
    )
    assert len(r.rollbacks) == 1, r.rollbacks
    assert r.rollbacks[0][1:] == ("green", "blue")
    assert r.switches == 1 and r.active == "blue"
    assert r.holds == []
    figure("flapping_green", period_s=period, rollbacks=len(r.rollbacks), switches=r.switches)


@pytest.mark.parametrize("period", [3.0, 4.0, 7.0])
def test_both_colors_flapping_out_of_phase_never_ping_pong(period: float) -> None:
    # rollback_to = "previous" would let traffic bounce blue <-> green on every flap; the
    # guard window forbids going back to the color just rolled away from.
    r = Replay(PolicySpec(rollback_to="previous")).run(
        {"blue": flapping(period, phase=period), "green": flapping(period)}, TEN_MINUTES
    )
    assert len(r.rollbacks) == 1, r.rollbacks
    assert r.switches == 1
    assert r.lock is not None, "the flapping keeps the guard window from being met"
    assert all("rolled back from during this guard window" in why for _, why in r.holds)
    figure("flapping_both", period_s=period, rollbacks=len(r.rollbacks), holds=len(r.holds))


def test_flapping_faster_than_the_failure_run_is_caught_by_the_ratio_once() -> None:
    # Two failures, two passes: never three in a row, but half the probes fail.
    def two_and_two(t: float) -> tuple[Outcome, float]:
        return (Outcome.HTTP_5XX, 0.004) if int(t) % 4 < 2 else (Outcome.OK, 0.005)

    r = Replay(PolicySpec(rollback_to="blue"), fast_interval=1.0).run(
        {"blue": healthy, "green": two_and_two}, TEN_MINUTES
    )
    assert [(src, dst) for _, src, dst in r.rollbacks] == [("green", "blue")]
    assert r.switches == 1


def test_flapping_after_the_guard_window_is_a_new_incident_within_the_budget() -> None:
    # Each incident may roll back once; the budget caps incidents per hour, then holds.
    spec = PolicySpec(rollback_to="previous", max_rollbacks=3, budget_window=3600.0)
    r = Replay(spec, qos_window=30.0)

    def late_flap(t: float) -> tuple[Outcome, float]:
        return flapping(40.0)(t) if t > 60 else (Outcome.OK, 0.005)

    r.run({"blue": late_flap, "green": flapping(40.0, phase=40.0)}, 3 * TEN_MINUTES)
    assert 1 <= len(r.rollbacks) <= spec.max_rollbacks
    gaps = [b[0] - a[0] for a, b in zip(r.rollbacks, r.rollbacks[1:], strict=False)]
    assert all(g >= 30.0 for g in gaps), f"a second rollback inside a guard window: {gaps}"
    assert any("budget" in why for _, why in r.holds) or len(r.rollbacks) < spec.max_rollbacks


@pytest.mark.parametrize("seed", range(5))
def test_noisy_but_healthy_green_is_never_rolled_back(seed: int) -> None:
    # Ten minutes of the default policy against 1 % 5xx and 2 s latency spikes.
    r = Replay(PolicySpec(rollback_to="blue")).run(
        {"blue": healthy, "green": noisy(seed)}, TEN_MINUTES
    )
    assert r.rollbacks == []
    assert r.holds == []
    assert r.switches == 0
    green = r.machine.windows["green"]
    assert green.failure_ratio < PolicySpec().p1_error_ratio
    # The noise happened: spikes and errors were seen, and at most a P2 alert said so.
    assert all(why.startswith("P2") for _, why in r.alerts), r.alerts
    figure("noisy_green", seed=seed, rollbacks=0, p2_alerts=len(r.alerts))


@pytest.mark.nginx
def test_flapping_green_behind_a_real_nginx_is_rolled_back_once(make_lab: MakeFaultLab) -> None:
    # The same through the whole daemon: green flips between healthy and 503 every second.
    lab = make_lab(policy__rollback_to="previous")
    d = lab.daemon()
    stop = threading.Event()

    def flap() -> None:
        failing = False
        while not stop.wait(1.0):  # the flapping's own rhythm
            failing = not failing
            lab.green.set_mode("http_503" if failing else "ok")

    flapper = threading.Thread(target=flap, name="flapper")
    flapper.start()
    try:
        d.wait_event("rollback_completed", timeout=30)
        served_before = lab.green.requests
        # Eight more flips of green while blue serves.
        wait_until(lambda: lab.green.requests >= served_before + 40, 30, "green flapping on")
    finally:
        stop.set()
        flapper.join()
    moves = [
        e["event"]
        for e in d.events()
        if e["event"] in ("rollback_started", "switch", "promote", "external_switch")
    ]
    assert moves == ["rollback_started"], moves
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    assert d.stop() == 0
