"""The guard state machine, replayed offline: time is an argument, nothing touches I/O."""

from __future__ import annotations

import random

from guardd.core import Color, GuardMachine, Hold, Outcome, PolicySpec, Rollback, State
from guardd.core.machine import Alert, Facts

SPEC = PolicySpec(
    rollback_to="blue",
    consecutive_failures=3,
    window=30,
    min_samples=5,
    p1_sustain=5,
    max_rollbacks=3,
)
INTERVAL = 1.0


class Replay:
    """Drives a machine the way the supervisor does: probe both colors, then decide."""

    def __init__(self, spec: PolicySpec = SPEC, active: Color = "green") -> None:
        self.m = GuardMachine(spec, INTERVAL)
        self.now = 0.0
        self.active = active
        self.locked = False
        self.paused = False
        self.rollbacks = 0
        self.log: list[object] = []

    def step(
        self, blue: Outcome = Outcome.OK, green: Outcome = Outcome.OK, latency: float = 0.01
    ) -> list[object]:
        self.now += INTERVAL
        self.m.observe("blue", self.now, blue, latency)
        self.m.observe("green", self.now, green, latency)
        d = self.m.decide(Facts(self.now, self.active, self.locked, self.paused, self.rollbacks))
        for a in d.actions:
            if isinstance(a, Rollback):
                self.active = a.target
                self.rollbacks += 1
                self.locked = True
                self.m.rollback_succeeded(a.source)
        self.log.extend(d.actions)
        self._state = d.state
        return list(d.actions)

    def state(self) -> State:
        """The state the last step decided; a call, so mypy re-reads it after each step."""
        return self._state

    def holding(self) -> bool:
        """Whether the machine holds; a call, as `state`."""
        return self.m.hold is not None


FAIL = Outcome.HTTP_5XX


def test_starting_until_both_colors_probed() -> None:
    m = GuardMachine(SPEC, INTERVAL)
    m.observe("green", 1.0, Outcome.OK, 0.01)
    assert m.decide(Facts(1.0, "green")).state is State.STARTING


def test_a_color_judged_afresh_decides_nothing_until_probed_and_is_not_starting() -> None:
    r = Replay()
    for _ in range(3):
        r.step()
    r.locked = True  # a rollback's guard window
    r.m.judge_afresh("green")
    d = r.m.decide(Facts(r.now, "green", True))
    # Not `starting`: guardd has probed both colors since it started; the lock is the state.
    assert (d.state, d.actions, d.verdict) == (State.GUARD_WINDOW, (), None)
    assert r.m.current_state(Facts(r.now, "green", True)) is State.GUARD_WINDOW
    for _ in range(3):
        r.step(green=FAIL)  # green's own probes, from now on, are what it is judged by
    assert any(isinstance(a, Rollback) for a in r.log)


def test_p0_rolls_back_to_target_with_evidence() -> None:
    r = Replay()
    r.step()
    assert r.state() is State.STEADY
    r.step(green=FAIL)
    assert r.state() is State.DEGRADED
    r.step(green=FAIL)
    (action,) = r.step(green=FAIL)
    assert isinstance(action, Rollback)
    assert (action.source, action.target, action.severity) == ("green", "blue", "P0")
    assert action.evidence.to_dict()["rule"] == "consecutive_failures"
    assert action.evidence.to_dict()["value"] == 3


def test_both_down_holds_once_then_rolls_back_when_target_recovers() -> None:
    r = Replay()
    r.step()
    for _ in range(10):
        r.step(blue=FAIL, green=FAIL)
    holds = [a for a in r.log if isinstance(a, Hold)]
    assert len(holds) == 1 and not holds[0].sticky
    assert r.state() is State.HOLD
    (action,) = r.step(blue=Outcome.OK, green=FAIL)
    assert isinstance(action, Rollback)


def test_hold_lasts_while_a_p1_threshold_still_fails_and_then_clears() -> None:
    r = Replay()
    for _ in range(4):
        r.step(blue=FAIL, green=FAIL)
    assert r.state() is State.HOLD
    for _ in range(5):
        r.step(blue=FAIL)  # green passes again; its window ratio falls from 80 % to 40 %
    # Below P0's 50 %, but P1's condition (>= 10 %) holds, its `for` started again: the
    # color still fails a threshold that calls for a rollback, so the hold goes on.
    (p1,) = [st for st in r.m.verdicts["green"].states if st.rule == "p1_error_ratio"]
    assert p1.state in ("pending", "firing"), p1
    assert r.holding() and r.state() is State.HOLD
    ended = None
    for i in range(40):
        r.step(blue=FAIL)
        if ended is None and not r.holding():
            ended = i
            ratio = r.m.stats("green", r.now).error_ratio
            assert ratio is not None and ratio < SPEC.p1_error_ratio, ratio
    assert ended is not None, "the hold ended once green's window was clean enough"
    assert r.state() is State.STEADY
    assert len([a for a in r.log if isinstance(a, Hold)]) == 1, "one episode, one hold"


def test_a_hold_kept_across_a_restart_is_not_ended_by_the_empty_windows() -> None:
    r = Replay()
    for _ in range(4):
        r.step(blue=FAIL, green=FAIL)
    assert r.holding()
    # Started again: the hold comes back from state.json, the windows start empty.
    again = Replay()
    again.m.restore(r.m.memory())
    for _ in range(10):
        again.step(blue=FAIL, green=FAIL)  # a failure or two is no evidence either way
        assert again.holding(), "held all along"
    assert not [a for a in again.log if isinstance(a, Hold)], "the same hold, not a new one"
    for _ in range(40):
        again.step(blue=FAIL)
    assert not again.holding(), "ended on green's own probes"


def test_budget_spent_is_a_sticky_hold() -> None:
    r = Replay()
    r.rollbacks = 3
    r.step()
    for _ in range(3):
        r.step(green=FAIL)
    (hold,) = [a for a in r.log if isinstance(a, Hold)]
    assert hold.sticky and "budget" in hold.reason
    for _ in range(40):
        r.step()  # green recovers fully: a budget hold still waits for an operator
    assert r.state() is State.HOLD
    r.m.clear_hold()
    r.step()
    assert r.state() is State.STEADY


def test_paused_blocks_actions_and_resume_lets_them_happen() -> None:
    r = Replay()
    r.paused = True
    for _ in range(5):
        assert r.step(green=FAIL) == []
    assert r.state() is State.PAUSED
    assert r.m.last_decision is not None and r.m.last_decision.blocked_by == "paused"
    r.paused = False
    (action,) = r.step(green=FAIL)
    assert isinstance(action, Rollback)


def test_dry_run_alerts_once_and_never_switches() -> None:
    r = Replay(PolicySpec(rollback_to="blue", dry_run=True))
    for _ in range(10):
        r.step(green=FAIL)
    assert not [a for a in r.log if isinstance(a, Rollback)]
    alerts = [a for a in r.log if isinstance(a, Alert)]
    assert len(alerts) == 1 and "dry run" in alerts[0].reason


def test_active_is_the_rollback_target_holds() -> None:
    r = Replay(active="blue")
    for _ in range(4):
        r.step(blue=FAIL)
    (hold,) = [a for a in r.log if isinstance(a, Hold)]
    assert "rollback target" in hold.reason


def test_previous_never_ping_pongs_during_the_guard_window() -> None:
    r = Replay(PolicySpec(rollback_to="previous", consecutive_failures=3))
    for _ in range(4):
        r.step(green=FAIL)
    assert r.active == "blue"
    for _ in range(4):
        r.step(blue=FAIL)  # blue fails too while the guard window is held
    assert r.active == "blue"
    assert any(isinstance(a, Hold) and "rolled back from" in a.reason for a in r.log)


def test_flapping_green_gives_at_most_one_rollback_per_incident() -> None:
    r = Replay()
    for t in range(600):  # ten minutes at 1 s: green fails 4 s, recovers 4 s, ...
        r.step(green=FAIL if (t // 4) % 2 else Outcome.OK)
    assert len([a for a in r.log if isinstance(a, Rollback)]) == 1
    assert r.active == "blue"


def test_noisy_but_healthy_green_never_rolls_back() -> None:
    rng = random.Random(42)  # noqa: S311 - a repeatable replay, not a secret
    r = Replay(PolicySpec(rollback_to="blue", window=60, min_samples=20, p1_sustain=120))
    for _ in range(6000):  # ten minutes of simulated time at 100 ms
        r.now -= INTERVAL - 0.1
        fail = rng.random() < 0.01
        spike = 2.0 if rng.random() < 0.002 else 0.02
        r.step(green=FAIL if fail else Outcome.OK, latency=spike)
    assert not [a for a in r.log if isinstance(a, Rollback)]
    assert r.active == "green"


def test_promotion_gate_needs_a_run_of_passes_and_a_clean_window() -> None:
    r = Replay(
        PolicySpec(
            rollback_to="blue", promote_successes=5, window=30, min_samples=5, p1_error_ratio=0.1
        )
    )
    for _ in range(10):
        r.step()
    assert r.m.promotable("blue", r.now)
    for _ in range(4):
        r.step(blue=FAIL)
    for _ in range(5):
        r.step()
    # Five passes in a row, but 4 failures among 19 samples: P1 would fire on blue.
    assert r.m.windows["blue"].consecutive_successes == 5
    assert not r.m.promotable("blue", r.now)
    for _ in range(30):
        r.step()
    assert r.m.promotable("blue", r.now)


def no_target_alerts(log: list[object]) -> list[Alert]:
    return [a for a in log if isinstance(a, Alert) and "no safe rollback" in a.reason]


def test_a_dead_rollback_target_alerts_once_per_episode() -> None:
    r = Replay()
    r.step()
    for _ in range(2):
        r.step(blue=FAIL)
    assert not r.log and r.m.protection_lost("green", r.now) is None  # not yet confirmed down
    (alert,) = r.step(blue=FAIL)
    assert (
        isinstance(alert, Alert) and "no safe rollback" in alert.reason and "blue" in alert.reason
    )
    for _ in range(20):
        assert r.step(blue=FAIL) == [], "once per episode"
    assert r.state() is State.STEADY  # a warning, not a state: green still serves
    r.step()  # blue passes a probe: protection is back at once ...
    assert r.m.protection_lost("green", r.now) is None
    for _ in range(3):
        r.step(blue=FAIL)
    assert len(no_target_alerts(r.log)) == 1, "... but down again within a window: one episode"
    for _ in range(int(SPEC.window) + 1):
        r.step()  # passing probes for a whole window end the episode
    for _ in range(3):
        r.step(blue=FAIL)
    assert len(no_target_alerts(r.log)) == 2, "re-armed by the recovery"


def test_a_rollback_target_failing_every_few_probes_is_one_episode() -> None:
    r = Replay()
    r.step()
    for _ in range(15):  # down for 3 probes, then one passes: for a quarter of an hour
        for _ in range(3):
            r.step(blue=FAIL)
        r.step()
    assert len(no_target_alerts(r.log)) == 1


def test_a_rollback_target_too_slow_to_stay_fresh_is_one_episode() -> None:
    """Its answers pass, but each takes longer than the staleness bound (3 probe intervals):
    between two of them it cannot be vouched for, after each it can."""
    m = GuardMachine(SPEC, INTERVAL)
    alerts: list[Alert] = []
    for n in range(1, 200):
        now = float(n)
        m.observe("green", now, Outcome.OK, 0.01)
        if n % 5 == 1:
            m.observe("blue", now, Outcome.OK, 4.5)
        d = m.decide(Facts(now, "green"))
        alerts += [a for a in d.actions if isinstance(a, Alert)]
    (alert,) = alerts
    assert "blue is stale" in alert.reason
    for n in range(200, 200 + int(SPEC.window) + 2):  # then it answers in time again
        m.observe("green", float(n), Outcome.OK, 0.01)
        m.observe("blue", float(n), Outcome.OK, 0.01)
        assert not m.decide(Facts(float(n), "green")).actions
    m.observe("green", 300.0, Outcome.OK, 0.01)
    (again,) = m.decide(Facts(300.0, "green")).actions
    assert isinstance(again, Alert) and "blue is stale" in again.reason, "a new episode"


def test_a_restart_within_an_ending_episode_never_alerts_it_twice() -> None:
    r = Replay()
    r.step()
    for _ in range(3):
        r.step(blue=FAIL)
    for _ in range(5):
        r.step()  # the episode is waiting to end ...
    m = GuardMachine(SPEC, INTERVAL)
    m.restore(r.m.memory())  # ... when guardd restarts
    r.m = m
    r.step()
    for _ in range(3):
        r.step(blue=FAIL)
    assert len(no_target_alerts(r.log)) == 1


def test_a_stale_rollback_target_is_lost_protection() -> None:
    m = GuardMachine(SPEC, INTERVAL)
    m.observe("blue", 1.0, Outcome.OK, 0.01)
    m.observe("green", 1.0, Outcome.OK, 0.01)
    m.observe("green", 10.0, Outcome.OK, 0.01)
    assert m.protection_lost("green", 10.0) is not None
    assert "stale" in str(m.protection_lost("green", 10.0))
    assert m.protection_lost("blue", 10.0) is None or "green" in str(
        m.protection_lost("blue", 10.0)
    )


def test_no_protection_to_lose_when_the_active_color_is_the_target() -> None:
    r = Replay(active="blue")
    r.step()
    for _ in range(5):
        r.step(green=FAIL)
    assert r.m.protection_lost("blue", r.now) is None
    assert not [a for a in r.log if isinstance(a, Alert)]


def test_after_a_rollback_the_color_rolled_away_from_keeps_its_onsets() -> None:
    # A 5xx ratio of a third on green: P1 (10-50 %) holds, never 3 failures in a row.
    r = Replay()
    pattern = [FAIL, Outcome.OK, Outcome.OK]
    onset: float | None = None
    for n in range(30):
        r.step(green=pattern[n % 3])
        (p1,) = [st for st in r.m.verdicts["green"].states if st.rule == "p1_error_ratio"]
        if onset is None and p1.since is not None:
            onset = p1.since
        if r.active == "blue":
            break
    rollback = next(a for a in r.log if isinstance(a, Rollback))
    assert (rollback.source, rollback.severity, rollback.evidence.rule) == (
        "green", "P1", "p1_error_ratio",
    )  # fmt: skip
    decided_at = r.now
    assert onset is not None and onset < decided_at
    for n in range(2):
        r.step(green=pattern[n % 3])  # green, the standby now, goes on failing a third
    # Status shows green's P1 firing since its condition began, before the decision that
    # came of it, not since the first tick after.
    (p1,) = [st for st in r.m.verdicts["green"].states if st.rule == "p1_error_ratio"]
    assert (p1.state, p1.since) == ("firing", onset)
    # Blue, which traffic moved to, has no onset from before the move.
    assert all(st.since is None or st.since > decided_at for st in r.m.verdicts["blue"].states)
    # And nothing is decided from the standby's firing rule.
    assert not any(isinstance(a, Rollback) for a in r.log[r.log.index(rollback) + 1 :])
