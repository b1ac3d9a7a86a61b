"""A replay counts a decision tick that would repeat the one before it (`Guard.repeat_key`)
rather than taking it. Over varied histories (failures, holds, both colors down,
restarts, clock steps, gaps, QoS locks that end, operators' switches, the front door,
latencies that cross their thresholds, rules with a `for`), the replay that takes every
tick and the one that counts repeats must journal the very same decisions at the same
times; each tick counted as a repeat, taken anyway, must decide nothing and change
nothing; and the replay's own judgement of a repeat, which compares only the key's moving
part (`Guard.moving_key`) while nothing but probe rounds came in, must agree with comparing
whole keys at every tick."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd import config as guardd_config
from guardd.observations import ReadReport, read_history
from guardd.replay._engine import Simulation
from tests.replay.history import Timeline
from tests.replay.history import config as write_config


def _rounds(tl: Timeline, n: int, lat: Callable[[str], float], **outcomes: str) -> None:
    """`n` rounds of both colors with the latencies `lat(color)` gives (s)."""
    for _ in range(n):
        for color in ("blue", "green"):
            tl.tick(0.1)
            outcome = outcomes.get(color, "ok")
            ok = outcome == "ok"
            tl.recorder.probe(
                color, outcome, lat(color), None if ok else "HTTP 503", 200 if ok else 503
            )
    tl.recorder.write()


def _fast(_color: str) -> float:
    return 0.004


def rollback_and_lock(tl: Timeline) -> None:
    """Green fails: a rollback, a QoS lock that ends, then blue flaky (P2 alerts)."""
    tl.start(active="green")
    tl.rounds(200)
    tl.rounds(5, green="http_5xx")
    tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
    tl.rounds(100, green="http_5xx")
    tl.rounds(300)
    for _ in range(20):  # one failure in 20: between the P2 and P1 ratios
        tl.rounds(19)
        tl.rounds(1, blue="http_5xx")
    tl.rounds(300)


def both_down(tl: Timeline) -> None:
    """Both colors fail: a hold, not a rollback; then both recover, then green alone fails."""
    tl.start(active="green")
    tl.rounds(200)
    tl.rounds(60, blue="http_5xx", green="http_5xx")
    tl.rounds(200)
    tl.rounds(40, blue="timeout")
    tl.rounds(20, green="http_5xx", blue="timeout")
    tl.rounds(200)


def restarts_and_steps(tl: Timeline) -> None:
    """Restarts (serving another color), wall-clock steps, a gap without records."""
    tl.start(active="green")
    tl.rounds(200)
    tl.wall += 120.0  # the wall clock stepped forward
    tl.rounds(100)
    tl.wall -= 60.0  # and back
    tl.rounds(100)
    tl.start(active="blue")
    tl.rounds(150)
    tl.tick(300.0)  # records lost for five minutes
    tl.rounds(150)
    tl.rounds(4, blue="http_5xx")
    tl.rounds(100)
    tl.start(active=None)
    tl.rounds(150)


def operators(tl: Timeline) -> None:
    """Operators' switches, an external one, a promote, the standby going stale."""
    tl.start(active="green")
    tl.rounds(150)
    tl.recorder.switch("green", "blue", by="uid:0(root)", reason="by hand", event="switch")
    tl.rounds(150)
    tl.recorder.switch("blue", "green", by="external", reason="moved", event="external_switch")
    tl.rounds(150)
    for _ in range(30):  # blue (the rollback target) unprobed: stale, then back
        tl.tick(0.2)
        tl.recorder.probe("green", "ok", 0.004, None, 200)
    tl.rounds(150)
    tl.recorder.switch("green", "blue", by="uid:0(root)", reason="promote", event="promote")
    tl.rounds(150)
    tl.rounds(10, blue="http_5xx")
    tl.rounds(150)


def front_door(tl: Timeline) -> None:
    """The front door fails while the probes pass: a mismatch, a re-apply, a hold; then
    it serves again; then it goes silent (stale)."""
    tl.start(active="green")
    tl.rounds(150, front_door=True)
    tl.rounds(60, front_door=False)
    tl.rounds(150, front_door=True)
    tl.rounds(150)
    tl.rounds(30, green="http_5xx", front_door=True)
    tl.rounds(150, front_door=True)


def latencies(tl: Timeline) -> None:
    """Latencies that drift across the P2 and P1 thresholds, held for less and more
    than `p1_sustain`, on either color, with random spread."""
    rng = random.Random(7)  # noqa: S311 - a repeatable history, not a secret
    tl.start(active="green")
    _rounds(tl, 200, lambda _c: rng.uniform(0.002, 0.006))
    _rounds(tl, 30, lambda c: rng.uniform(0.3, 0.5) if c == "green" else 0.004)  # P2
    _rounds(tl, 200, _fast)
    _rounds(tl, 5, lambda c: rng.uniform(1.2, 1.5) if c == "green" else 0.004)  # P1 pending
    _rounds(tl, 200, _fast)
    _rounds(tl, 40, lambda c: rng.uniform(1.2, 1.5) if c == "green" else 0.004)  # P1 fires
    _rounds(tl, 300, lambda _c: rng.uniform(0.002, 0.006))
    _rounds(tl, 60, lambda c: rng.uniform(0.02, 0.03) if c == "blue" else 0.004)
    _rounds(tl, 200, _fast)


def shuffled(seed: int) -> Callable[[Timeline], None]:
    """Random stretches of all of the above, in a random order."""

    def build(tl: Timeline) -> None:
        rng = random.Random(seed)  # noqa: S311 - a repeatable history, not a secret
        tl.start(active=rng.choice(["green", "blue"]))
        outcomes = ["ok"] * 6 + ["http_5xx", "timeout"]
        for _ in range(40):
            what = rng.random()
            n = rng.choice([1, 2, 3, 5, 20, 100, 300])
            if what < 0.6:
                _rounds(
                    tl,
                    n,
                    lambda _c: rng.choice([0.004, 0.004, 0.2, 1.3]),
                    blue=rng.choice(outcomes),
                    green=rng.choice(outcomes),
                )
            elif what < 0.7:
                tl.rounds(n, front_door=rng.random() < 0.7)
            elif what < 0.75:
                tl.start(active=rng.choice(["green", "blue", None]))
            elif what < 0.8:
                tl.wall += rng.choice([-30.0, 5.0, 90.0])
            elif what < 0.85:
                tl.tick(rng.choice([0.5, 2.0, 100.0]))
            elif what < 0.9:
                by = rng.choice(["uid:0(root)", "external", "guardd"])
                event = {"external": "external_switch", "guardd": "rollback_completed"}
                to = rng.choice(["green", "blue"])
                tl.recorder.switch(
                    "blue" if to == "green" else "green",
                    to,
                    by=by,
                    reason="moved",
                    event=event.get(by, "switch"),
                )
            else:
                for _ in range(n):  # one color only: the other goes stale
                    tl.tick(0.2)
                    tl.recorder.probe(rng.choice(["green", "blue"]), "ok", 0.004, None, 200)
        tl.rounds(100)

    return build


HISTORIES: dict[str, Callable[[Timeline], None]] = {
    "rollback_and_lock": rollback_and_lock,
    "both_down": both_down,
    "restarts_and_steps": restarts_and_steps,
    "operators": operators,
    "front_door": front_door,
    "latencies": latencies,
    **{f"shuffled_{seed}": shuffled(seed) for seed in (1, 2, 3)},
}

#: Policies the histories are replayed under: the lab's, and ones that read more.
SETS: dict[str, list[str]] = {
    "lab": [],
    "previous_and_regression": [
        'policy.rollback_to="previous"',
        "policy.latency_regression=3.0",
        "policy.p2_latency=0.1",
        "policy.p1_latency=1.0",
    ],
    "dry_run_and_rules": [
        "policy.dry_run=true",
        (
            'rules=[{signal="probe", stat="p95_ms", above=100.0, severity="P2", for="1s"},'
            ' {signal="probe", stat="error_ratio", above=0.02, severity="P1", dry_run=true}]'
        ),
    ],
    "front_door": ['switch.verify_url="http://127.0.0.1:11/"', "policy.max_rollbacks=1"],
}


class _Checked(Simulation):
    """Takes every tick, and checks that each one `repeat_key` would have counted as a
    repeat decides nothing and leaves the guard as it found it; and that the replay's own
    judgement (`_repeats`: the key's moving part alone while only probe rounds came in)
    says the same as comparing whole keys, at every tick."""

    checked = 0
    #: Ticks judged by the moving part of the key alone (`Guard.moving_key`): found to
    #: repeat the last one, found not to.
    moving_same = 0
    moving_differs = 0
    _repeat = False
    _key: tuple[object, ...] | None = None

    def _counted(self, at: float) -> bool:
        guard = self.guard
        assert guard is not None
        self.clock.advance(at)
        key = guard.repeat_key(self.switcher.active)
        whole = self._after is not None and key == self._after
        if self._after is not None and self._only_probed:
            self.moving_same += whole
            self.moving_differs += not whole
        assert self._repeats() == whole
        self._repeat, self._key = whole, key
        return False  # taken all the same, and checked

    async def _take(self, at: float) -> None:
        guard = self.guard
        assert guard is not None
        self.clock.advance(at)
        key = self._key
        before = (len(self.journal.events), guard.state, guard.active, guard.state_doc())
        verdicts = dict(guard.machine.verdicts)
        decision = await guard.tick()
        if self._repeat:
            self.checked += 1
            assert not decision.actions, decision
            assert decision.blocked_by is None
            after = (len(self.journal.events), guard.state, guard.active, guard.state_doc())
            assert after == before
            assert guard.machine.verdicts == verdicts
            assert guard.repeat_key(self.switcher.active) == key
        self._taken(decision.actions, decision.blocked_by)
        self.ticks += 1
        self._next_tick = self.clock.monotonic() + self._interval
        self._pulse = float("inf")


def _replay(
    tmp: Path,
    sets: list[str],
    kind: type[Simulation] = Simulation,
    since: float | None = None,
    until: float | None = None,
    **kw: Any,
) -> Simulation:
    cfg = write_config(tmp, tmp / "state", qos_window="2s")
    cfg.write_text(cfg.read_text().replace("[policy]\n", "[policy]\np2_error_ratio = 0.04\n"))
    settings = guardd_config.load(cfg, overrides=sets)
    sim = kind(settings, tmp / "state" / "observations", since=since, until=until, **kw)
    sim.build_signals()
    anyio.run(sim.run)
    return sim


def _events(sim: Simulation) -> list[dict[str, Any]]:
    """The journal the replay wrote, but for the random ids of its events."""
    return [
        {k: v for k, v in e.items() if k not in ("id", "rollback_id")} for e in sim.journal.events
    ]


@pytest.mark.parametrize("sets", SETS.values(), ids=list(SETS))
@pytest.mark.parametrize("history", HISTORIES.values(), ids=list(HISTORIES))
def test_counting_repeats_journals_what_taking_every_tick_journals(
    tmp_path: Path, history: Callable[[Timeline], None], sets: list[str]
) -> None:
    tl = Timeline(tmp_path / "state")
    history(tl)
    tl.close()
    every = _replay(tmp_path, sets, repeats=False)
    counted = _replay(tmp_path, sets)
    checked = _replay(tmp_path, sets, _Checked)
    assert every.repeated_ticks == 0
    assert _events(counted) == _events(every)
    assert _events(checked) == _events(every)
    assert (counted.ticks, counted.skipped_ticks) == (every.ticks, every.skipped_ticks)
    assert counted.gaps == every.gaps
    assert counted.state_file.load() == every.state_file.load()
    assert counted.guard is not None and every.guard is not None
    assert counted.guard.ticks == every.guard.ticks
    # Not a vacuous comparison: many ticks are repeats (not those while a window fills,
    # after each start and switch), and each of them was checked.
    assert counted.repeated_ticks > counted.ticks / 8, (counted.repeated_ticks, counted.ticks)
    assert isinstance(checked, _Checked)
    assert checked.checked == counted.repeated_ticks
    # The shortcut was put to the test: most ticks were judged by the moving part alone.
    # The shortcut was put to the test, both ways: ticks judged by the key's moving part
    # alone found to repeat the last one, and (where the windows change) found not to.
    assert checked.moving_same > 0
    assert checked.moving_differs > 0


def test_the_histories_reach_what_they_are_meant_to(tmp_path: Path) -> None:
    """The comparison above covers rollbacks, holds, locks taken and released, alerts,
    re-applies and operators' moves: each is journaled by some history."""
    seen: set[str] = set()
    for name, history in HISTORIES.items():
        if name.startswith("shuffled"):
            continue
        for label, sets in SETS.items():
            where = tmp_path / f"{name}-{label}"
            tl = Timeline(where / "state")
            history(tl)
            tl.close()
            seen |= {e["event"] for e in _events(_replay(where, sets, repeats=False))}
    wanted = {
        "rollback_completed",
        "hold",
        "alert",
        "qos_locked",
        "qos_released",
        "external_switch",
        "switch",
        "promote",
    }
    assert wanted <= seen, wanted - seen


class _EveryRecordStepped(Simulation):
    """Feeds every record through `_step` and `_record`, the short way for probe rounds
    in `_run` not taken."""

    fast_probes = False


def _clear_of_steps(written: list[float], share: float) -> float:
    """The first stamp from `share` of the way through `written` (wall times, in the
    order written), sorted, that no wall clock stepped back repeats."""
    repeated: list[tuple[float, float]] = []
    top = -math.inf
    for ts in written:
        if ts < top - 1.0:
            repeated.append((ts, top))
        top = max(top, ts)
    stamps = sorted(written)
    i = int(len(stamps) * share)
    while any(lo <= stamps[i] <= hi for lo, hi in repeated):
        i += 1
    return stamps[i]


@pytest.mark.parametrize("bounded", [False, True], ids=["whole", "bounded"])
@pytest.mark.parametrize("sets", [SETS["lab"], SETS["front_door"]], ids=["lab", "front_door"])
@pytest.mark.parametrize("history", HISTORIES.values(), ids=list(HISTORIES))
def test_the_short_way_for_probe_rounds_replays_what_stepping_every_record_does(
    tmp_path: Path, history: Callable[[Timeline], None], sets: list[str], bounded: bool
) -> None:
    tl = Timeline(tmp_path / "state")
    history(tl)
    tl.close()
    since = until = None
    if bounded:
        # A period from a third of the way in to two thirds (its warm-up before it), its
        # bounds clear of times a stepped-back clock repeats (such a bound is refused).
        written = [r.ts for r in read_history(tmp_path / "state" / "observations", ReadReport())]
        since, until = _clear_of_steps(written, 1 / 3), _clear_of_steps(written, 2 / 3)
    stepped = _replay(tmp_path, sets, _EveryRecordStepped, since, until)
    short = _replay(tmp_path, sets, Simulation, since, until)
    assert _events(short) == _events(stepped)
    assert (short.ticks, short.skipped_ticks, short.repeated_ticks) == (
        stepped.ticks,
        stepped.skipped_ticks,
        stepped.repeated_ticks,
    )
    assert (short.first_ts, short.last_ts, short.warmup_records) == (
        stepped.first_ts,
        stepped.last_ts,
        stepped.warmup_records,
    )
    assert short.gaps == stepped.gaps
    assert short.report == stepped.report
    assert short.clock.monotonic() == stepped.clock.monotonic()
    assert short.clock.wall() == stepped.clock.wall()
    assert short.state_file.load() == stepped.state_file.load()
    assert short.guard is not None and stepped.guard is not None
    assert short.guard.ticks == stepped.guard.ticks
    # Not vacuous: the histories have ticks to compare, and warm-up when bounded.
    assert short.ticks > 50
    assert (short.warmup_records > 0) == bounded
