"""The guard, decision by decision, built from `guardd.testing` alone.

Real guard code on real files (journal, state.json, QoS lock) in a temporary directory;
the upstreams are `MockProber`s (the real prober on an in-memory transport), the switch
target a `MemorySwitcher`, and time a `ManualClock` that a probe round moves by one
interval. No nginx, no sockets, no sleeps.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guardd import qoslock, statusview
from guardd.core.machine import Rollback
from guardd.core.types import State
from guardd.exceptions import OperationRefused, UnsafePath
from guardd.guard import _newest_streak
from guardd.operator import handle
from guardd.render import render_status
from guardd.switchers import COMMAND_STEPS, NGINX_STEPS, STATE_FILE_STEPS
from guardd.testing import (
    DEFAULT_POLICY,
    GuardRig,
    ManualClock,
    MemorySwitcher,
    SimulatedCrash,
    SwitchStep,
    SwitchTarget,
    build_guard,
)
from guardd.timestamps import parse_rfc3339

pytestmark = pytest.mark.anyio

QOS_WINDOW = 10.0  # guardd.testing.guard_settings' default
# Healthy rounds before a failure: enough samples that two failures out of them stay
# under p0_error_ratio, so that the run of failures is what decides.
WARM_UP = 5


def lock_held(rig: GuardRig) -> bool:
    return qoslock.read_lock(rig.guard.s.lock_file).held


def saved(rig: GuardRig) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((rig.root / "state" / "state.json").read_text())
    return doc


async def rolled_back(
    tmp_path: Path,
    on_blue: Callable[[], Awaitable[httpx.Response | None]] | None = None,
    **kw: Any,
) -> GuardRig:
    """A guard that rolled green back to blue after green answered 503 three times (with
    `on_blue`, its front door answers through it once blue runs: `once_on_blue`)."""
    rig = build_guard(tmp_path, **kw)
    if on_blue is not None:
        once_on_blue(rig, on_blue)
    await rig.start()
    await rig.probe_rounds(WARM_UP)
    rig.probers["green"].answer(503, "db down")
    decisions = await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
    assert any(isinstance(a, Rollback) for a in decisions[-1].actions)
    return rig


async def test_one_decision_tick(tmp_path: Path) -> None:
    async with build_guard(tmp_path) as rig:
        first = await rig.tick()
        assert first.state is State.STARTING  # neither color probed yet: no verdict
        assert first.verdict is None
        decision = await rig.probe_round()
        assert decision.state is State.STEADY
        assert decision.actions == ()
        assert decision.verdict is not None and decision.verdict.severity is None
        assert [len(rig.probers[c].requests) for c in ("blue", "green")] == [1, 1]
        assert rig.guard.active == "green"
        # At start the switcher tested the target, as nginx's does; nothing else since.
        assert rig.switcher.steps_taken == [SwitchStep("recover", "tested", "green")]
        assert saved(rig)["state"] == "steady"
        assert rig.events() == []


async def test_a_color_whose_probes_stopped_coming_back_is_neither_steady_nor_healthy(
    tmp_path: Path,
) -> None:
    """A probe hanging under a long probe.timeout sets nothing: after three intervals
    without a round, the state and the metrics stop vouching for the color."""

    def healthy() -> dict[str, float]:
        text = rig.guard.metrics.render().decode()
        return {
            s.labels["color"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "guardd_upstream_healthy"
        }

    async with build_guard(tmp_path) as rig:
        assert (await rig.probe_round()).state is State.STEADY
        assert healthy() == {"blue": 1.0, "green": 1.0}
        rig.clock.advance(4 * rig.guard.s.probe_interval)  # no round comes back
        decision = await rig.tick()
        assert decision.state is State.DEGRADED
        assert healthy() == {"blue": 0.0, "green": 0.0}
        assert (await rig.probe_round()).state is State.STEADY
        assert healthy() == {"blue": 1.0, "green": 1.0}


def rollback_target_healthy(rig: GuardRig) -> float:
    text = rig.guard.metrics.render().decode()
    (value,) = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "guardd_rollback_target_healthy"
    ]
    return value


async def test_the_rollback_target_is_never_healthy_while_guardd_cannot_tell(
    tmp_path: Path,
) -> None:
    """`guardd_rollback_target_healthy` is 1 only while a rollback would find a target fit:
    not before both colors are probed, nor while the switch target names no color (no
    target at all), nor while the target fails."""
    async with build_guard(tmp_path / "named") as rig:
        await rig.tick()
        assert rollback_target_healthy(rig) == 0.0  # not probed yet
        await rig.probe_rounds(WARM_UP)
        assert rollback_target_healthy(rig) == 1.0
        rig.probers["blue"].answer(503, "down")
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        assert rollback_target_healthy(rig) == 0.0
    async with build_guard(tmp_path / "none", active=None) as rig:
        await rig.probe_rounds(WARM_UP)
        assert rig.guard.active is None and rig.guard.state is State.HOLD
        assert rollback_target_healthy(rig) == 0.0


async def test_a_guard_window_passing_while_guardd_holds_hands_its_lock_to_the_hold(
    tmp_path: Path,
) -> None:
    """The rollback budget is spent (a second rollback was called for): guardd holds while
    its guard window runs. When the window passes, the hold's lock takes its place in one
    write: never a moment without a lock, nor a `qos_released` while guardd holds."""
    spec = dataclasses.replace(DEFAULT_POLICY, max_rollbacks=1)
    async with build_guard(tmp_path, policy=spec) as rig:
        store = rig.guard.qos.store
        removed: list[Path] = []
        remove = store.remove

        def recorded_remove(path: Path) -> bool:
            removed.append(path)
            return remove(path)

        store.remove = recorded_remove  # type: ignore[method-assign]
        await rig.probe_rounds(WARM_UP)
        rig.probers["green"].answer(503, "db down")
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        assert rig.guard.active == "blue" and lock_held(rig)
        rig.probers["green"].answer(200, '{"status": "UP"}')
        rig.probers["blue"].answer(503, "blue down too")
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        assert rig.guard.machine.hold is not None, "the budget is spent: guardd holds"
        rig.probers["blue"].answer(200, '{"status": "UP"}')

        def handed() -> list[dict[str, Any]]:
            return [e for e in rig.events("qos_locked") if "guard window passed" in e["reason"]]

        for _ in range(int(8 * QOS_WINDOW)):
            await rig.probe_round()
            assert lock_held(rig)
            if handed() or rig.events("qos_released"):
                break
        (lock,) = handed()
        assert lock["reason"].startswith("guardd holds: "), lock
        assert not rig.events("qos_released"), "released while guardd holds"
        assert removed == [], "the lock file was removed in between"
        assert rig.guard.qos.own_lock is not None and rig.guard.qos.own_lock.hold


async def test_a_standstill_lock_says_the_cause_it_stands_for_now(tmp_path: Path) -> None:
    """Paused while both colors fail, deploys are locked for the pause; resumed, guardd
    holds (no safe target) and the same lock says so, in one write, never the pause."""
    async with build_guard(tmp_path) as rig:
        await rig.probe_rounds(WARM_UP)
        await handle(rig.guard, "pause", {"reason": "db migration"}, "uid:0(root)")
        rig.probers["green"].answer(503, "green down")
        rig.probers["blue"].answer(503, "blue down")
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        reason = qoslock.read_lock(rig.guard.s.lock_file).reason or ""
        assert reason.startswith("guardd is paused while green fails"), reason
        await rig.probe_round()
        assert len(rig.events("qos_locked")) == 1, "the verdict's figures change nothing"
        await handle(rig.guard, "resume", {}, "uid:0(root)")
        await rig.probe_round()
        assert rig.guard.machine.hold is not None
        reason = qoslock.read_lock(rig.guard.s.lock_file).reason or ""
        assert reason.startswith("guardd holds: "), reason
        assert not rig.events("qos_released"), "no moment unlocked"


@pytest.mark.parametrize(("rollback_to", "to"), [("blue", None), ("previous", "green")])
async def test_a_holds_to_is_where_a_rollback_would_go_never_the_color_failing(
    tmp_path: Path, rollback_to: str, to: str | None
) -> None:
    """Blue serves and fails. With `rollback_to = "blue"` there is nowhere to go: the
    hold's `to` is null, never `blue->blue`; with "previous", green, which it will not
    switch back to (rolled away from in this guard window)."""
    policy = dataclasses.replace(DEFAULT_POLICY, rollback_to=rollback_to)
    rig = await rolled_back(tmp_path, policy=policy)
    async with rig:
        rig.probers["blue"].answer(503, "blue down")
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        [held] = rig.events("hold")
        assert (held["from"], held["to"]) == ("blue", to), held


async def test_status_says_how_long_the_guard_window_has_left_to_watch(
    tmp_path: Path,
) -> None:
    """After a rollback, `status` shows the guard window under the lock: what is left to
    watch and the probes counted; an operator's lock has none."""
    rig = await rolled_back(tmp_path)
    async with rig:
        await rig.probe_rounds(2)
        doc = statusview.snapshot(rig.guard)
        window = doc["qos"]["window"]
        span = rig.guard.s.qos_window
        assert 0 < window["left_s"] < span
        assert window["until"] == doc["qos"]["until"]
        assert (window["samples"], window["failures"]) == (2, 0)
        line = render_status(doc)
        assert re.search(r"guard window: \S+ left to watch, 2 probes, 0 failed", line), line
        await handle(rig.guard, "qos_unlock", {}, "uid:0(root)")
        await handle(rig.guard, "qos_lock", {"reason": "freeze"}, "uid:0(root)")
        doc = statusview.snapshot(rig.guard)
        assert doc["qos"]["locked"] and "window" not in doc["qos"], doc["qos"]


async def test_an_unlock_that_cannot_remove_the_lock_says_so(tmp_path: Path) -> None:
    """`qos unlock` whose removal fails (a folder at the lock's path) is refused, naming
    why: "done" would send the operator away while deploys stay blocked; nothing is
    journaled released."""
    async with build_guard(tmp_path) as rig:
        await rig.probe_rounds(WARM_UP)
        lock = rig.guard.s.lock_file
        lock.mkdir()
        with pytest.raises(OperationRefused, match=r"^the QoS lock could not be removed \(.*"):
            await handle(rig.guard, "qos_unlock", {"reason": "x"}, "uid:0(root)")
        assert qoslock.read_lock(lock).held
        assert not rig.events("qos_released")


async def test_p0_rollback_end_to_end(tmp_path: Path) -> None:
    async with build_guard(tmp_path) as rig:
        await rig.probe_rounds(WARM_UP)
        rig.probers["green"].answer(503, "db down")
        for _ in range(DEFAULT_POLICY.consecutive_failures - 1):
            decision = await rig.probe_round()  # a P2 alert at most, until the third
            assert not any(isinstance(a, Rollback) for a in decision.actions)
            assert rig.guard.active == "green"
        decision = await rig.probe_round()

        (action,) = decision.actions
        assert isinstance(action, Rollback)
        assert (action.source, action.target, action.severity) == ("green", "blue", "P0")
        started, completed = rig.events("rollback_started", "rollback_completed")
        assert completed["rollback_id"] == started["id"]
        assert (completed["from"], completed["to"], completed["severity"]) == (
            "green",
            "blue",
            "P0",
        )
        evidence = started["evidence"]
        assert evidence["rule"] == "consecutive_failures"
        assert evidence["last_error"] == "HTTP 503 db down"
        assert [s for s in rig.switcher.steps_taken if s.op != "recover"] == [
            SwitchStep("switch", "link_written", "green"),
            SwitchStep("switch", "renamed", "blue"),
            SwitchStep("switch", "tested", "blue"),
            SwitchStep("switch", "reloaded", "blue"),
        ]
        assert rig.switcher.target == SwitchTarget("blue", "blue")
        assert rig.guard.active == "blue"
        (locked,) = rig.events("qos_locked")
        assert locked["reason"].startswith("rollback green -> blue: P0 consecutive_failures")
        assert lock_held(rig)
        assert saved(rig)["active"] == "blue"
        assert saved(rig)["qos"]["window"] is not None
        # Green, now the standby, keeps failing: nothing moves back to it.
        after = await rig.probe_round()
        assert not any(isinstance(a, Rollback) for a in after.actions)
        assert rig.guard.active == "blue"


async def test_a_rollback_is_verified_through_the_front_door(tmp_path: Path) -> None:
    rig = await rolled_back(tmp_path, front_door=True)
    try:
        assert rig.front_door is not None
        served = [r.url.host for r in rig.front_door.requests]
        # Probed each round, and once more to verify the switch before it completed.
        assert served == ["front.test"] * (WARM_UP + DEFAULT_POLICY.consecutive_failures + 1)
        assert [e["event"] for e in rig.events("rollback_completed", "rollback_failed")] == [
            "rollback_completed"
        ]
    finally:
        await rig.aclose()


def once_on_blue(rig: GuardRig, first: Callable[[], Awaitable[httpx.Response | None]]) -> None:
    """The front door answers each request through `first` once the switcher runs blue
    (its answer, or, given None, the one the running color gives, as before)."""
    front = rig.front_door
    assert front is not None
    forwarding = front._handler  # as the switcher's color answers

    async def handler(request: httpx.Request) -> httpx.Response:
        if rig.switcher.target.running == "blue" and (answer := await first()) is not None:
            return answer
        forwarded = forwarding(request)
        return forwarded if isinstance(forwarded, httpx.Response) else await forwarded

    front.handle_with(handler)


@pytest.mark.parametrize("hung", [1, 2], ids=["first-answer-hangs", "first-two-hang"])
async def test_a_verify_answer_that_hangs_is_asked_again_beside_it(
    tmp_path: Path, hung: int
) -> None:
    """Right after a reload an old nginx worker may take the first connections and proxy
    them to the color just left, which hangs: those answers would take all of the probe
    timeout, as long as the whole verify budget here (2 s of switch.timeout 4 s). Asked
    again beside them, the new worker's answers verify the rollback."""
    left: list[int] = [hung]

    async def old_worker_first() -> httpx.Response | None:
        if left[0] > 0:
            left[0] -= 1
            await anyio.sleep(60)  # the color left hangs: the probe's own timeout ends it
        return None

    rig = await rolled_back(
        tmp_path, old_worker_first, front_door=True, switch_timeout=4.0, verify_successes=3
    )
    try:
        assert [e["event"] for e in rig.events("rollback_completed", "rollback_failed")] == [
            "rollback_completed"
        ]
        assert rig.guard.active == "blue" and rig.switcher.target.running == "blue"
    finally:
        await rig.aclose()


@pytest.mark.parametrize(
    ("keys", "need", "found"),
    [
        ({1: True, 2: True, 3: True}, 3, True),  # answer 0 still out: asked before them
        ({0: None, 1: True, 2: True, 3: True}, 3, True),  # it failed, before them
        ({1: True, 2: True, 3: True, 4: None}, 3, None),  # asked after them: no streak
        ({1: True, 3: True, 4: True}, 3, None),  # answer 2 still out, within the streak
        ({0: True, 1: True}, 3, None),  # too few asked
        ({0: "blue", 1: "green", 2: "green"}, 2, "green"),
        ({0: "green", 1: "green", 2: "blue"}, 2, None),  # the newest word is another color
        ({0: True}, 1, True),
    ],
)  # fmt: skip
def test_a_streak_counts_back_from_the_newest_answer_by_the_order_asked(
    keys: dict[int, object | None], need: int, found: object | None
) -> None:
    assert _newest_streak(keys, need) == found


async def test_a_verify_answer_asked_after_a_streak_that_fails_breaks_it(tmp_path: Path) -> None:
    """Answers count in the order they were asked: a failure asked after passing answers
    (the newest word of the front door) is no streak, however its answers came in."""

    async def bad_gateway() -> httpx.Response | None:
        return httpx.Response(502, content=b"bad gateway")

    rig = await rolled_back(
        tmp_path, bad_gateway, front_door=True, switch_timeout=2.0, verify_successes=2
    )
    try:
        (failed,) = rig.events("rollback_failed")
        assert failed["step"] == "verify"
        assert re.search(
            r"verify failed: 0/\d+ answers passed \(2 in a row needed\)", failed["reason"]
        )
    finally:
        await rig.aclose()


@pytest.mark.parametrize(("step", "failed_as"), [("tested", "test"), ("reloaded", "reload")])
async def test_a_rollback_whose_switch_fails_is_undone_and_held(
    tmp_path: Path, step: str, failed_as: str
) -> None:
    async with build_guard(tmp_path) as rig:
        await rig.probe_rounds(WARM_UP)
        rig.switcher.fail(step)
        rig.probers["green"].answer(503)
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        (failed,) = rig.events("rollback_failed")
        assert failed["step"] == failed_as
        assert failed["serving"] == "green"
        assert next(s for s in rig.switcher.steps_taken if s.op == "undo") == SwitchStep(
            "undo", "renamed", "green"
        )
        assert rig.switcher.target == SwitchTarget("green", "green")
        assert rig.guard.active == "green"
        assert rig.guard.machine.hold is not None and rig.guard.machine.hold.sticky
        assert rig.events("hold")
        # Held on a failing color: deploys wait too, until an operator resumes.
        await rig.probe_rounds(1)
        assert lock_held(rig)
        (locked,) = rig.events("qos_locked")
        assert locked["reason"].startswith("guardd holds: rollback green -> blue failed"), locked
        assert locked["until"] is None
        # Resumed while green still fails: the lock stays until the rollback's own guard
        # window takes its place (no moment unlocked), never released in between.
        assert rig.guard.resume("fixed", by="uid:0(root)")
        await rig.probe_rounds(1)
        assert rig.events("rollback_completed")
        info = qoslock.read_lock(rig.guard.s.lock_file)
        assert (info.reason or "").startswith("rollback green -> blue"), info
        assert not rig.events("qos_released")


async def test_p1_rolls_back_only_once_sustained(tmp_path: Path) -> None:
    policy = dataclasses.replace(DEFAULT_POLICY, window=10.0, min_samples=5, p1_sustain=20.0)
    async with build_guard(tmp_path, policy=policy) as rig:
        answered = 0

        def every_fourth_fails(request: httpx.Request) -> httpx.Response:
            # An error ratio of about 0.25: above p1 (0.10), below p0 (0.50), and never
            # three failures in a row.
            nonlocal answered
            answered += 1
            return httpx.Response(503 if answered % 4 == 0 else 200)

        await rig.probe_rounds(5)
        # A first bout, shorter than the sustain time, then a recovery: no rollback.
        rig.probers["green"].handle_with(every_fourth_fails)
        bout = await rig.probe_rounds(12)
        assert any(d.verdict is not None and d.verdict.pending is not None for d in bout)
        rig.probers["green"].answer(200)
        calm = await rig.probe_rounds(12)
        assert calm[-1].verdict is not None and calm[-1].verdict.pending is None
        assert rig.events("rollback_started") == []

        # A second bout: its sustain counts from its own onset, not the first bout's.
        rig.probers["green"].handle_with(every_fourth_fails)
        onset = None
        for _ in range(40):
            decision = await rig.probe_round()
            now = rig.clock.monotonic()
            if any(isinstance(a, Rollback) for a in decision.actions):
                break
            verdict = decision.verdict
            assert verdict is not None
            if verdict.pending is not None and onset is None:
                onset = now
            assert onset is None or now - onset < policy.p1_sustain, "sustained, yet no rollback"
        else:
            pytest.fail("P1 never rolled back")
        assert onset is not None
        assert now - onset >= policy.p1_sustain
        (started,) = rig.events("rollback_started")
        assert started["severity"] == "P1"
        assert started["evidence"]["rule"] == "p1_error_ratio"
        assert started["evidence"]["sustain_s"] == policy.p1_sustain
        assert started["evidence"]["sustained_s"] >= policy.p1_sustain
        assert rig.guard.active == "blue"


async def test_the_guard_window_is_released_once_the_slos_held(tmp_path: Path) -> None:
    rig = await rolled_back(tmp_path)
    try:
        taken_at = rig.clock.monotonic()
        while rig.clock.monotonic() - taken_at < QOS_WINDOW:
            assert lock_held(rig), "released before the window ran its course"
            await rig.probe_round()
        assert not lock_held(rig)
        (released,) = rig.events("qos_released")
        assert released["reason"].startswith("guard window passed: SLOs held over 10 probes")
        assert released["evidence"]["samples"] == 10
        assert saved(rig)["qos"] is None
        assert rig.events("qos_extended") == []
    finally:
        await rig.aclose()


async def test_the_guard_window_is_extended_while_the_slos_do_not_hold(tmp_path: Path) -> None:
    # A policy window shorter than the guard window: the blip's P2 (one failed probe of
    # blue, over 3 % of its window) begins and ends within the first guard window.
    policy = dataclasses.replace(DEFAULT_POLICY, window=QOS_WINDOW / 2)
    rig = await rolled_back(tmp_path, policy=policy)
    try:
        (locked,) = rig.events("qos_locked")
        taken_at = rig.clock.monotonic()
        await rig.probe_rounds(3)
        rig.probers["blue"].answer(503, "blip")  # one 5xx in the window: 0.1 > 0.01
        await rig.probe_round()
        rig.probers["blue"].answer(200)
        while rig.clock.monotonic() - taken_at < QOS_WINDOW:
            await rig.probe_round()
        (extended,) = rig.events("qos_extended")
        assert "error ratio 0.1 > 0.01" in extended["reason"]
        assert "rules fired during the window: p2_error_ratio" in extended["reason"]
        assert extended["until"] > locked["until"]
        assert lock_held(rig)
        assert qoslock.read_lock(rig.guard.s.lock_file).until == extended["until"]
        assert rig.guard.active == "blue"  # a blip is no reason to move traffic again
        # The next window holds: the lock goes.
        extended_at = rig.clock.monotonic()
        while rig.clock.monotonic() - extended_at < QOS_WINDOW:
            assert lock_held(rig)
            await rig.probe_round()
        assert not lock_held(rig)
        assert len(rig.events("qos_released")) == 1
    finally:
        await rig.aclose()


async def test_a_rule_still_firing_when_the_window_ends_keeps_the_lock(tmp_path: Path) -> None:
    # The default 60 s policy window outlasts the 10 s guard window: the blip's P2 still
    # fires when the second window is judged, so that window is not met either.
    rig = await rolled_back(tmp_path)
    try:
        taken_at = rig.clock.monotonic()
        rig.probers["blue"].answer(503, "blip")
        await rig.probe_round()
        rig.probers["blue"].answer(200)
        while rig.clock.monotonic() - taken_at < 2 * QOS_WINDOW:
            await rig.probe_round()
        first, second = rig.events("qos_extended")
        assert "error ratio 0.1 > 0.01" in first["reason"]
        assert "rules fired during the window: p2_error_ratio" in second["reason"]
        assert "error ratio" not in second["reason"]  # the probes of that window were clean
        assert second["evidence"]["rules_fired"] == ["p2_error_ratio"]
        assert lock_held(rig)
        # Once the blip has left the policy window and a whole guard window passes clean,
        # the lock goes.
        for _ in range(200):
            if not lock_held(rig):
                break
            await rig.probe_round()
        assert not lock_held(rig)
        (released,) = rig.events("qos_released")
        assert "rules_fired" not in released["evidence"]
    finally:
        await rig.aclose()


KINDS = {"nginx": NGINX_STEPS, "state-file": STATE_FILE_STEPS, "command": COMMAND_STEPS}
CRASHES = [(kind, step) for kind, steps in KINDS.items() for step in steps]


@pytest.mark.parametrize(("kind", "step"), CRASHES, ids=[f"{k}-{s}" for k, s in CRASHES])
async def test_a_rollback_interrupted_at_any_step_is_finished_at_start(
    tmp_path: Path, kind: str, step: str
) -> None:
    rig = await build_guard(tmp_path, switcher=MemorySwitcher("green", steps=KINDS[kind])).start()
    await rig.probe_rounds(WARM_UP)
    rig.probers["green"].answer(503, "db down")
    rig.switcher.crash_after(step, op="switch")
    with pytest.raises(SimulatedCrash):
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)

    # What the crash left on disk: an open rollback, no lock, state.json from before.
    (started,) = rig.events("rollback_started")
    assert rig.events("rollback_completed", "rollback_failed") == []
    assert not lock_held(rig)
    assert saved(rig)["active"] == "green"
    assert rig.switcher.target.switching

    after = await rig.restart().start()
    try:
        (completed,) = after.events("rollback_completed")
        assert completed["rollback_id"] == started["id"]
        assert completed["reason"].startswith("interrupted by a restart; resumed: P0")
        assert after.guard.active == "blue"
        # What is named is what runs, and nothing is left in flight.
        assert after.switcher.target == SwitchTarget("blue", "blue")
        assert lock_held(after)
        assert saved(after)["active"] == "blue"
        decision = await after.probe_round()
        assert not any(isinstance(a, Rollback) for a in decision.actions)
        assert after.guard.active == "blue"
        assert len(after.events("rollback_started")) == 1
    finally:
        await after.aclose()


async def test_a_resumed_rollback_onto_a_target_now_rejected_fails_closed(tmp_path: Path) -> None:
    rig = await build_guard(tmp_path).start()
    await rig.probe_rounds(WARM_UP)
    rig.probers["green"].answer(503)
    rig.switcher.crash_after("renamed")
    with pytest.raises(SimulatedCrash):
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
    (started,) = rig.events("rollback_started")

    restarted = rig.restart()
    restarted.switcher.rejected.add("blue")  # blue's config broke while guardd was down
    after = await restarted.start()
    try:
        (failed,) = after.events("rollback_failed")
        assert failed["rollback_id"] == started["id"]
        assert failed["step"] == "test"
        assert after.switcher.target == SwitchTarget("green", "green")
        assert after.guard.active == "green"
        hold = after.guard.machine.hold
        assert hold is not None and hold.sticky
        # No guard window: the hold's own lock, taken with the hold (deploys wait for it).
        own = after.guard.qos.own_lock
        assert lock_held(after) and own is not None and own.hold and own.window is None
        assert own.info.reason == f"guardd holds: {hold.reason}"
        assert after.events("rollback_completed") == []
    finally:
        await after.aclose()


async def test_a_resumed_rollback_is_verified_through_the_front_door(tmp_path: Path) -> None:
    rig = await build_guard(tmp_path, front_door=True).start()
    await rig.probe_rounds(WARM_UP)
    rig.probers["green"].answer(503)
    rig.switcher.crash_after("renamed")  # the link names blue; nginx still runs green
    with pytest.raises(SimulatedCrash):
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)

    assert rig.front_door is not None
    before = len(rig.front_door.requests)
    after = await rig.restart().start()
    try:
        assert after.front_door is rig.front_door  # the same door, before the restarted guard
        (completed,) = after.events("rollback_completed")
        assert completed["reason"].startswith("interrupted by a restart; resumed")
        # Verified through the front door, which answers as blue now runs.
        assert len(after.front_door.requests) > before
        assert after.switcher.target == SwitchTarget("blue", "blue")
        assert lock_held(after)
    finally:
        await after.aclose()


async def test_a_journal_shared_with_another_guard_is_said(tmp_path: Path) -> None:
    rig = await rolled_back(tmp_path / "a", instance="threader")
    await rig.aclose()
    # Another guard given the same state.dir: the first one's rollback counts in its
    # budget, so the operator is told, in the log and in status.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "state").symlink_to(tmp_path / "a" / "state")
    other = await build_guard(tmp_path / "b", instance="billing").start()
    try:
        assert other.guard.foreign_journal == ["threader"]
        (warning,) = [w for w in other.guard.snapshot()["warnings"] if "state.dir" in w]
        assert "also holds guard threader" in warning
        assert any(c.args == ("journal_of_another_guard",) for c in other.log.calls)
    finally:
        await other.aclose()


async def test_a_window_whose_slos_held_goes_on_while_the_fleet_has_not_converged(
    tmp_path: Path,
) -> None:
    """A fleet node's guard window is not released while a node still serves the color
    rolled away from (`Guard.lock_must_stay`): it is extended, saying why, and ends at the
    first due time after the fleet converged."""
    rig = await rolled_back(tmp_path)
    behind = "the fleet has not converged on blue: node n1 serves green"
    stay: list[str | None] = [behind]
    rig.guard.lock_must_stay = lambda: stay[0]  # type: ignore[method-assign]
    try:
        (locked,) = rig.events("qos_locked")
        taken_at = rig.clock.monotonic()
        while rig.clock.monotonic() - taken_at < QOS_WINDOW:
            await rig.probe_round()
        (extended,) = rig.events("qos_extended")
        assert extended["reason"].startswith("SLOs held over 10 probes")
        assert extended["reason"].endswith(f", but {behind}")
        assert extended["evidence"]["fleet"] == behind
        assert extended["until"] > locked["until"]
        assert lock_held(rig)
        # Not an alert of the window's: the node's divergence is the fleet's alert.
        assert not [e for e in rig.events("alert") if "guard window" in e["reason"]]
        stay[0] = None
        extended_at = rig.clock.monotonic()
        while rig.clock.monotonic() - extended_at < QOS_WINDOW:
            assert lock_held(rig)
            await rig.probe_round()
        assert not lock_held(rig)
        (released,) = rig.events("qos_released")
        assert released["reason"].startswith("guard window passed")
    finally:
        await rig.aclose()


@pytest.mark.parametrize("after_s", [2.5, -3.0], ids=["ends-later", "ended-already"])
async def test_a_leaders_window_waits_for_other_windows_only_until_they_end(
    tmp_path: Path, after_s: float
) -> None:
    """A leader's window whose SLOs held, kept only by other nodes' windows whose ends are
    known (`Guard.lock_stay_ends`), is extended until 1 s after the last of them, never by
    a whole `qos.window`, and is judged then over every probe it saw since it began."""
    rig = await rolled_back(tmp_path)
    running = "the guard window of node n1 still runs"
    stay: list[str | None] = [running]
    ends: list[float | None] = [None]
    rig.guard.lock_must_stay = lambda: stay[0]  # type: ignore[method-assign]
    rig.guard.lock_stay_ends = lambda: ends[0]  # type: ignore[method-assign]
    try:
        taken_at = rig.clock.monotonic()
        while rig.clock.monotonic() - taken_at < QOS_WINDOW - 1.0:
            await rig.probe_round()
        ends[0] = rig.clock.wall() + 1.0 + after_s
        await rig.probe_round()  # the window is due here
        (extended,) = rig.events("qos_extended")
        assert extended["reason"].endswith(f", but {running}")
        wanted = max(1.0, after_s + 1.0 + 1.0)  # from the due time, not from now
        span = parse_rfc3339(extended["until"]) - rig.clock.wall()
        assert wanted - 1.0 <= span <= wanted + 0.5, (span, extended)
        stay[0] = None
        judged_at = rig.clock.monotonic()
        while lock_held(rig):
            assert rig.clock.monotonic() - judged_at < span + 1.0
            await rig.probe_round()
        (released,) = rig.events("qos_released")
        # Every probe since the window began: more than its first judgement saw.
        held = re.compile(r"SLOs held over (\d+) probes")
        first, last = (held.search(e["reason"]) for e in (extended, released))
        assert first is not None and last is not None, (extended, released)
        assert int(last[1]) > int(first[1]), (extended, released)
    finally:
        await rig.aclose()


@pytest.mark.parametrize("fleets", [True, False], ids=["fleet-copy", "someone-elses"])
async def test_a_window_taken_over_the_fleets_copy_ends_as_windows_do(
    tmp_path: Path, fleets: bool
) -> None:
    """On a fleet node, the rollback's window replaces this node's copy of the fleet's lock
    and keeps its own end; a lock someone else wrote there still makes it last until
    unlocked (it had no end)."""
    rig = await build_guard(tmp_path).start()
    copy = qoslock.LockInfo(True, "the fleet's", "2026-12-01T00:00:00Z", None, "fleet:n0")
    qoslock.write_lock(rig.guard.s.lock_file, copy)
    rig.guard.lock_to_keep = lambda: copy if fleets else None  # type: ignore[method-assign]
    try:
        await rig.probe_rounds(WARM_UP)
        rig.probers["green"].answer(503, "db down")
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        (locked,) = rig.events("qos_locked")
        if fleets:
            assert locked["until"] is not None and "already held" not in locked["reason"]
        else:
            assert locked["until"] is None and "a lock was already held" in locked["reason"]
    finally:
        await rig.aclose()


async def test_an_operators_freeze_past_the_guard_window_never_blocks_a_rollback(
    tmp_path: Path,
) -> None:
    """A freeze laid over the window outlasts it; once the window passed (SLOs held), the
    color rolled away from is a rollback target again: blue failing goes back to a healthy
    green, under the freeze, rather than holding on the failing color."""
    rig = await rolled_back(tmp_path)
    try:
        rig.guard.take_lock("freeze", by="uid:0(root)", duration=3600.0, manual=True)
        rig.probers["green"].answer(200, json={"status": "UP"})
        taken_at = rig.clock.monotonic()
        while rig.clock.monotonic() - taken_at <= QOS_WINDOW + 1:
            await rig.probe_round()
        assert lock_held(rig), "the freeze holds past the window"
        assert qoslock.read_lock(rig.guard.s.lock_file).reason == "freeze"
        rig.probers["blue"].answer(503, "blue down")
        decisions = await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        (back,) = [a for d in decisions for a in d.actions if isinstance(a, Rollback)]
        assert (back.source, back.target) == ("blue", "green")
        assert rig.events("hold") == []
        assert lock_held(rig), "the freeze still holds deploys"
    finally:
        await rig.aclose()


async def test_an_undone_rollback_behind_a_silent_front_door_cannot_tell_what_is_served(
    tmp_path: Path,
) -> None:
    """The front door gives no answer at all (nginx stopped) while the color put back
    fails too: a timeout agrees with no color, so `serving` is unknown, not that color."""
    async with build_guard(tmp_path, front_door=True) as rig:
        assert rig.front_door is not None
        await rig.probe_rounds(WARM_UP)
        rig.front_door.time_out()
        rig.probers["green"].answer(503)
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        (failed,) = rig.events("rollback_failed")
        assert failed["step"] == "verify"
        assert failed["serving"] is None, failed
        assert "which color is served is unknown" in failed["reason"], failed


async def test_after_a_rollback_status_vouches_for_nothing_the_target_did_before(
    tmp_path: Path,
) -> None:
    # The switch takes 2 s of wall time, as a reload and its verification may.
    clock = ManualClock()

    async def slow_step(step: str) -> None:
        clock.advance(0.5)

    rig = await rolled_back(tmp_path, clock=clock, switcher=MemorySwitcher(on_step=slow_step))
    async with rig:
        status = rig.guard.snapshot()
        # Blue, judged afresh, has no probe of its own yet: stale, and no rule says `ok`
        # of it on the window it had as the standby.
        assert status["upstreams"]["blue"]["stale"] is True
        for row in status["rules"]:
            assert (row["blue"]["state"], row["blue"]["why"]) == (
                "inconclusive",
                "not judged yet",
            ), row
        # The decision is stamped when it was made: before the events it led to.
        (started,) = rig.events("rollback_started")
        decided = parse_rfc3339(status["last_decision"]["ts"])
        assert status["last_decision"]["action"] == "rollback"
        assert decided <= parse_rfc3339(started["ts"]) < clock.wall(), (decided, started)
        # Its own probes judge it from then on.
        await rig.probe_round()
        states = {r["rule"]: r["blue"] for r in rig.guard.snapshot()["rules"]}
        assert states["consecutive_failures"]["state"] == "ok", states
        assert "not judged yet" not in {s["why"] for s in states.values()}, states


@pytest.mark.parametrize("command", ["switch", "rollback"])
async def test_an_operators_move_that_fails_leaves_the_hold_and_its_lock(
    tmp_path: Path, command: str
) -> None:
    async with build_guard(tmp_path) as rig:
        await rig.probe_rounds(WARM_UP)
        rig.switcher.fail("tested")
        rig.probers["green"].answer(503)
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures + 1)
        held = rig.guard.machine.hold
        assert held is not None and held.sticky and lock_held(rig)
        # The operator tries again; blue's file is still rejected by the config test.
        rig.switcher.fail("tested")
        args = {"color": "blue", "force": True} if command == "switch" else {}
        with pytest.raises(OperationRefused) as refused:
            await handle(rig.guard, command, {**args, "reason": "try again"}, "uid:0(root)")
        assert "failed at test" in str(refused.value)
        assert "guardd holds" in str(refused.value) or "guardd still holds" in str(refused.value)
        # Nothing was fixed: still held, deploys still locked, and no tick ends it.
        await rig.probe_rounds(3)
        assert rig.guard.machine.hold is not None and rig.guard.machine.hold.sticky
        assert lock_held(rig) and not rig.events("qos_released")
        assert rig.guard.active == "green"


@pytest.mark.parametrize(
    "error",
    [
        UnsafePath("/srv/deploy/state.json: is a symlink; refusing to follow it"),
        PermissionError(13, "Permission denied"),
    ],
    ids=["a symlink put in its place", "unreadable"],
)
async def test_a_switch_target_that_cannot_be_read_holds_and_never_ends_the_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """The state file replaced by a symlink (or made unreadable) while guardd runs: it no
    longer knows what users are served, says why, and holds; read again, it adopts."""
    async with build_guard(tmp_path) as rig:
        await rig.probe_rounds(WARM_UP)
        read = rig.switcher.read_active

        async def cannot_read() -> None:
            raise error

        monkeypatch.setattr(rig.switcher, "read_active", cannot_read)
        await rig.probe_rounds(2)  # seen twice in a row, as a target naming no color
        [moved] = [e for e in rig.events() if e["event"] == "external_switch"]
        assert (moved["from"], moved["to"]) == ("green", None)
        assert moved["reason"] == (
            f"the switch target cannot be read ({error}); guardd holds until it names blue or green"
        )
        assert rig.guard.active is None and rig.guard.state is State.HOLD
        # The hold says why too: the page an operator reads first, never "names neither".
        [held] = rig.events("hold")
        assert held["reason"] == f"the switch target cannot be read ({error})"
        assert rig.guard.snapshot()["hold_reason"] == held["reason"]
        monkeypatch.setattr(rig.switcher, "read_active", read)
        await rig.probe_round()
        back = [e for e in rig.events() if e["event"] == "external_switch"][-1]
        assert (back["from"], back["to"]) == (None, "green")


async def test_a_guard_that_may_not_switch_changes_nothing_and_says_so(tmp_path: Path) -> None:
    """While `may_switch` says no (the switch lock lost to another guardd, the target made
    an alias), a rollback fails before its switch, the undo of a switch that did not
    verify puts nothing back, a re-apply is not run, and status says why throughout."""
    refusal: list[str | None] = [None]
    async with build_guard(tmp_path, front_door=True) as rig:
        assert rig.front_door is not None
        rig.guard.switch_refused = lambda: refusal[0]
        await rig.probe_rounds(WARM_UP)

        # The undo: the switch went ahead, blue does not verify, and meanwhile the lock went.
        rig.front_door.time_out()

        async def lock_goes(step: str) -> None:
            if step == "reloaded":
                refusal[0] = "its lock cannot be held: another guardd (pid 7) switches it"

        rig.switcher.on_step = lock_goes
        rig.probers["green"].answer(503)
        await rig.probe_rounds(DEFAULT_POLICY.consecutive_failures)
        (failed,) = rig.events("rollback_failed")
        assert failed["step"] == "verify", failed
        assert (
            "the undo failed too: restoring green refused: its lock cannot be held: another "
            "guardd (pid 7) switches it; could not be undone" in failed["reason"]
        ), failed
        assert rig.switcher.target.named == "blue", "the undo put nothing back"
        restored = [s for s in rig.switcher.steps_taken if s.op == "restore"]
        assert restored == [], restored

        status = rig.guard.snapshot()
        assert refusal[0] in status["warnings"], status["warnings"]
        assert status["no_rollback_target"] == refusal[0]

        # A re-apply, asked of a refusing guard: not run, and said.
        taken = len(rig.switcher.steps_taken)
        await rig.guard.reapply("blue", "test")
        (alert,) = [e for e in rig.events("alert") if e.get("reapplied") is False]
        assert alert["reason"] == f"re-applying blue refused: {refusal[0]}", alert
        assert len(rig.switcher.steps_taken) == taken

        # Allowed again: not shown any more.
        said, refusal[0] = refusal[0], None
        assert rig.guard.may_switch() is None
        status = rig.guard.snapshot()
        assert said not in status["warnings"] and status["no_rollback_target"] != said


async def test_the_qos_answer_says_whether_the_lock_is_guardds_own(tmp_path: Path) -> None:
    """guardd judges and releases its own lock only: its answer says which it is, so that
    guardctl never promises the release of a lock written by hand."""
    rig = await rolled_back(tmp_path)
    try:
        lock_file = rig.guard.s.lock_file
        assert statusview.qos_doc(rig.guard, qoslock.read_lock(lock_file))["owned"] is True
        lock_file.write_text(
            json.dumps({"reason": "by hand", "by": "uid:0(root)", "until": "2026-01-01T00:00:00Z"})
        )
        doc = statusview.qos_doc(rig.guard, qoslock.read_lock(lock_file))
        assert doc["locked"] is True and doc["owned"] is False
        lock_file.unlink()
        assert statusview.qos_doc(rig.guard, qoslock.read_lock(lock_file))["owned"] is False
    finally:
        await rig.aclose()
