"""The front door as evidence, replayed offline: mismatches and the never-seen-healthy rule."""

from __future__ import annotations

from typing import Any

from guardd.core import Color, GuardMachine, Outcome, PolicySpec, Rollback, State
from guardd.core.machine import Action, Alert, Facts, Hold, Reapply

SPEC = PolicySpec(rollback_to="blue", consecutive_failures=3, window=30, min_samples=5)
INTERVAL = 1.0


class Replay:
    """Probe both colors and the front door once a second, then decide, as guardd does."""

    def __init__(self, active: Color = "green", watched: bool = True) -> None:
        self.m = GuardMachine(SPEC, INTERVAL)
        self.now = 0.0
        self.active = active
        self.watched = watched
        self.paused = False

    def step(
        self, *, green: Outcome = Outcome.OK, blue: Outcome = Outcome.OK, front: bool = True
    ) -> list[Action]:
        self.now += INTERVAL
        self.m.observe("blue", self.now, blue, 0.01)
        self.m.observe("green", self.now, green, 0.01)
        self.m.observe_front_door(self.now, front, None if front else "HTTP 503")
        facts = Facts(
            self.now,
            self.active,
            paused=self.paused,
            front_door_watched=self.watched,
        )
        d = self.m.decide(facts)
        self._state = d.state
        self.blocked = d.blocked_by
        return list(d.actions)

    def hold(self) -> Hold | None:
        """The machine's hold now; a call, as `state`."""
        return self.m.hold

    def state(self) -> State:
        """The state the last step decided; a call, so mypy re-reads it after each step."""
        return self._state

    def run(self, n: int, **kw: Any) -> list[Action]:
        out: list[Action] = []
        for _ in range(n):
            out += self.step(**kw)
        return out


def test_never_seen_healthy_color_is_not_rolled_back_while_the_front_door_serves() -> None:
    r = Replay()
    actions = r.run(6, green=Outcome.CONNECT_ERROR, front=True)
    assert not [a for a in actions if isinstance(a, Rollback)]
    alerts = [a for a in actions if isinstance(a, Alert) and "upstreams.green.url" in a.reason]
    assert len(alerts) >= 1
    assert r.blocked in ("front_door", "hold")


def test_never_seen_healthy_color_is_rolled_back_when_the_front_door_fails_too() -> None:
    r = Replay()
    actions = r.run(3, green=Outcome.HTTP_5XX, front=False)
    assert [a for a in actions if isinstance(a, Rollback)]


def test_a_color_seen_healthy_is_rolled_back_on_its_probes_alone() -> None:
    r = Replay()
    r.run(3)
    actions = r.run(3, green=Outcome.HTTP_5XX, front=True)
    assert [a for a in actions if isinstance(a, Rollback)]


def test_unwatched_front_door_changes_nothing() -> None:
    r = Replay(watched=False)
    actions = r.run(3, green=Outcome.CONNECT_ERROR, front=True)
    assert [a for a in actions if isinstance(a, Rollback)]
    assert r.m.mismatch is None


def test_front_door_failing_while_probes_pass_reapplies_once_then_holds() -> None:
    r = Replay()
    actions = r.run(3, front=False)
    assert [type(a) for a in actions] == [Alert, Reapply]
    assert "front door fails" in (r.m.mismatch or "")  # no narrowing: it is None again below
    assert r.state() is State.STEADY
    actions = r.run(3, front=False)
    holds = [a for a in actions if isinstance(a, Hold)]
    assert len(holds) == 1 and "persists" in holds[0].reason
    assert not [a for a in actions if isinstance(a, Reapply)], "re-applied once only"
    assert r.state() is State.HOLD
    assert r.run(5, front=False) == [], "one hold per incident"
    # Agreeing again: no longer a warning at once; the episode and its hold end once they
    # have agreed for the policy window (keep_firing_for).
    assert r.run(3, front=True) == []
    assert r.m.mismatch is None and r.hold() is not None
    actions = r.run(int(SPEC.window), front=True)
    assert [a.reason for a in actions if isinstance(a, Alert)] == [
        "the front door and the probes of green agree again"
    ]
    assert r.m.mismatch is None and r.hold() is None and r.state() is State.STEADY


def test_a_flapping_front_door_is_one_episode_one_reapply_one_page() -> None:
    """Disagreeing, agreeing and disagreeing again, each for a few seconds: one re-apply
    (an nginx reload) and one of each page, not one per flap; it ends once they have
    agreed for the policy window."""
    r = Replay()
    actions: list[Action] = []
    for _ in range(5):
        actions += r.run(6, front=False)
        actions += r.run(4, front=True)
    assert [type(a) for a in actions] == [Alert, Reapply, Hold], actions
    assert r.hold() is not None and r.state() is State.HOLD
    actions = r.run(int(SPEC.window) + 4, front=True)
    assert [a.reason for a in actions if isinstance(a, Alert)] == [
        "the front door and the probes of green agree again"
    ]
    assert r.hold() is None
    # Over: the next mismatch is an episode of its own, re-applied again.
    assert [type(a) for a in r.run(3, front=False)] == [Alert, Reapply]


def test_a_mismatch_whose_words_change_is_held_and_paged_for_once() -> None:
    """A front door failing with one error, then another (a 502, a 503, a timeout), in one
    episode, flapping or not: the hold stands in its first words, paged once."""
    r = Replay()
    r.run(6, front=False)
    first = r.hold()
    assert first is not None
    actions: list[Action] = []
    for error in ("HTTP 502", "timed out", "HTTP 503", "HTTP 502"):
        for _ in range(4):
            r.now += INTERVAL
            r.m.observe("blue", r.now, Outcome.OK, 0.01)
            r.m.observe("green", r.now, Outcome.OK, 0.01)
            r.m.observe_front_door(r.now, False, error)
            actions += r.m.decide(Facts(r.now, "green", front_door_watched=True)).actions
        actions += r.run(2, front=True)
    assert actions == [], actions
    assert r.hold() == first


def test_a_mismatchs_hold_stops_no_rollback_once_they_agree() -> None:
    """Held for a front door that failed while green passed; then green fails too: the
    front door and the probes agree that users fail, and green is rolled back at once,
    not at the end of the episode."""
    r = Replay()
    r.run(6, front=False)
    assert r.m.hold is not None and r.m.hold.cause == "mismatch"
    actions = r.run(4, green=Outcome.HTTP_5XX, front=False)
    assert [a for a in actions if isinstance(a, Rollback)], actions


def test_a_reapply_that_did_not_run_holds_saying_so() -> None:
    """Refused (the switch lock lost) or failed (`nginx -t`): the hold never claims a
    re-apply; what it says is remembered over a restart."""
    r = Replay()
    actions = r.run(3, front=False)
    assert [type(a) for a in actions] == [Alert, Reapply]
    why = "re-applying green failed at test: nginx: [emerg] unexpected end of file"
    r.m.reapply_failed(why)
    [hold] = r.run(3, front=False)
    assert isinstance(hold, Hold) and hold.cause == "mismatch"
    assert hold.reason == f"mismatch persists, {why}: {r.m.mismatch}"
    assert "after re-applying" not in hold.reason
    assert r.state() is State.HOLD
    again = Replay()
    again.m.restore(type(r.m.memory()).from_json(r.m.memory().to_json()))
    assert again.run(3, front=False) == [], "the same hold, not paged again"
    assert again.m.hold == r.m.hold
    # It settles as any mismatch does, and the next episode re-applies afresh.
    r.run(int(SPEC.window) + 3, front=True)
    assert r.m.hold is None
    r.run(3, front=False)
    actions = r.run(3, front=False)
    [hold] = [a for a in actions if isinstance(a, Hold)]
    assert hold.reason.startswith("mismatch persists after re-applying green: ")


def test_mismatch_that_a_reapply_settles_never_holds() -> None:
    r = Replay()
    r.run(3, front=False)
    actions = r.run(4, front=True)
    assert not [a for a in actions if isinstance(a, Hold)]
    assert r.m.mismatch is None


def test_one_odd_answer_is_not_a_mismatch() -> None:
    r = Replay()
    actions: list[Action] = []
    for i in range(12):
        actions += r.step(front=i % 3 != 0)
    assert actions == []


def test_paused_shows_a_mismatch_but_does_not_act_until_resumed() -> None:
    r = Replay()
    r.paused = True
    assert r.run(6, front=False) == []
    assert r.m.mismatch is not None
    r.paused = False
    actions = r.step(front=False)
    assert [type(a) for a in actions] == [Alert, Reapply]


def test_a_switch_forgets_the_front_doors_last_error_with_its_streak() -> None:
    r = Replay()
    for _ in range(2):
        r.step(front=False)
    fd = r.m.front_door
    assert (fd.ok, fd.streak, fd.last_error) == (False, 2, "HTTP 503")
    r.m.switched()  # traffic moved: the front door serves another color now
    # Nothing said of the color served before is shown as the front door's state now.
    assert (fd.ok, fd.streak, fd.last_error) == (None, 0, None)
