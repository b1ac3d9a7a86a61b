"""The `for` of a pending rule across a restart and a reload (`guardd.onsets`,
`RuleTable.carry`, `RuleTable.adopt`): pure, times given."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from guardd.core.machine import Facts, GuardMachine
from guardd.core.rules import Rule, RuleTable
from guardd.core.signals import Reading
from guardd.core.types import Color, Outcome, State
from guardd.onsets import OnsetStamps, carried
from guardd.testing import DEFAULT_POLICY
from guardd.timestamps import rfc3339
from tests.core.test_rules import judge, reading, rule

P1 = rule(severity="P1", for_s=60.0)
Traffic = Mapping[Color, Reading | None]
FAILING: Traffic = {"green": reading(100, error_ratio=0.2)}
HEALTHY: Traffic = {"green": reading(100, error_ratio=0.0)}
TOO_FEW: Traffic = {"green": reading(3, error_ratio=0.2)}
# The wall clock, at monotonic 0, of the run that wrote state.json; the next run's
# monotonic clock starts again near 0, as after a reboot.
WALL = 1_800_000_000.0


def saved_after(pending_for: float, *rules: Rule) -> tuple[dict[str, Any], float]:
    """The `onsets` document of a run whose rule began to hold at monotonic 100 and was
    last judged `pending_for` seconds later; and the wall time of that last tick."""
    table = RuleTable(rules or (P1,))
    judge(table, 100.0, FAILING)
    last = 100.0 + pending_for
    judge(table, last, FAILING)
    doc = OnsetStamps().doc(table, last, WALL + last)
    assert doc is not None
    return doc, WALL + last


def restarted(doc: dict[str, Any], outage: float, last_wall: float, *rules: Rule) -> RuleTable:
    """A new run's table at monotonic 5, `outage` seconds after the last tick of the old."""
    table = RuleTable(rules or (P1,))
    table.carry(carried(doc, table, 5.0, last_wall + outage))
    return table


def test_the_document_says_each_onset_in_wall_time_and_changes_only_by_the_second() -> None:
    table = RuleTable([P1, rule(name="p2", severity="P2")])
    stamps = OnsetStamps()
    judge(table, 100.0, FAILING)
    first = stamps.doc(table, 100.0, WALL + 100.0)
    assert first == {
        "seen": rfc3339(WALL + 100.0),
        "onsets": [
            {
                "rule": "traffic.error_ratio",
                "signal": "traffic",
                "condition": "error_ratio >= 0.05",
                "severity": "P1",
                "color": "green",
                "since": rfc3339(WALL + 100.0),
            }
        ],
    }, "a rule without a `for` (the P2) has nothing to carry"
    # The next tick, a little later, with a wall clock that drifted by a microsecond:
    # the same document, so state.json is not written again.
    judge(table, 100.3, FAILING)
    assert stamps.doc(table, 100.3, WALL + 100.300001) == first
    judge(table, 101.2, FAILING)
    later = stamps.doc(table, 101.2, WALL + 101.2)
    assert later is not None and later["seen"] == rfc3339(WALL + 101.0)
    assert later["onsets"] == first["onsets"]
    judge(table, 102.0, HEALTHY)
    assert stamps.doc(table, 102.0, WALL + 102.0) is None


def test_a_carried_onset_goes_on_and_the_rule_fires_at_its_first_for() -> None:
    doc, last = saved_after(30.0)
    table = restarted(doc, 2.0, last)
    # The new run's windows hold too few samples at first: inconclusive, not dropped.
    assert judge(table, 5.0, TOO_FEW).severity is None
    # It held 30 s before the restart and 2 s went by: at this run's monotonic 6 it has
    # held 33 s, and fires 27 s later, at its first `for`, not 60 s after the restart.
    pending = judge(table, 6.0, FAILING)
    assert pending.severity is None and pending.pending is not None
    assert pending.states[0].since == pytest.approx(6.0 - 33.0)
    assert judge(table, 32.9, FAILING).severity is None
    fired = judge(table, 33.0, FAILING)
    assert fired.severity == "P1"
    assert fired.evidence.extra["sustained_s"] == pytest.approx(60.0)


def test_a_rule_judged_healthy_after_the_restart_drops_what_was_carried() -> None:
    doc, last = saved_after(30.0)
    table = restarted(doc, 2.0, last)
    assert judge(table, 6.0, HEALTHY).severity is None
    pending = judge(table, 7.0, FAILING)
    assert pending.states[0].since == 7.0, "a new onset, the old one was dropped"


def test_an_outage_longer_than_the_for_drops_the_onset() -> None:
    doc, last = saved_after(30.0)
    # Down 61 s with a `for` of 60 s: a whole healthy `for` could have passed unseen.
    assert carried(doc, RuleTable([P1]), 5.0, last + 61.0) == {}
    table = restarted(doc, 61.0, last)
    assert judge(table, 6.0, FAILING).states[0].since == 6.0


def test_a_carried_onset_lapses_when_the_rule_cannot_judge_for_the_rest_of_its_for() -> None:
    doc, last = saved_after(30.0)
    table = restarted(doc, 20.0, last)  # 40 s of the `for` left to see it again
    assert judge(table, 30.0, TOO_FEW).severity is None
    assert judge(table, 46.0, FAILING).states[0].since == 46.0, "lapsed at 45"


@pytest.mark.parametrize(
    "changed",
    [
        rule(severity="P1", for_s=60.0, threshold=0.1),  # another condition
        rule(severity="P0", for_s=60.0),  # another severity
        rule(severity="P1", for_s=60.0, signal="errors"),  # another signal
        rule(severity="P1", for_s=60.0, name="renamed"),  # another rule
        rule(severity="P1"),  # no `for` now: nothing to carry
    ],
)
def test_a_changed_rule_starts_its_for_afresh(changed: Rule) -> None:
    doc, last = saved_after(30.0)
    assert carried(doc, RuleTable([changed]), 5.0, last + 1.0) == {}


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"seen": "yesterday", "onsets": []},
        {"onsets": [{"rule": "traffic.error_ratio"}]},
        {"seen": rfc3339(WALL + 130.0), "onsets": "p1"},
        {"seen": rfc3339(WALL + 130.0), "onsets": [None, 1, {"color": "red"}]},
    ],
)
def test_a_document_that_cannot_be_read_carries_nothing(doc: object) -> None:
    assert carried(doc, RuleTable([P1]), 5.0, WALL + 131.0) == {}


def test_an_onset_later_than_its_own_seen_is_not_believed() -> None:
    doc, last = saved_after(30.0)
    doc["onsets"][0]["since"] = rfc3339(last + 5.0)
    assert carried(doc, RuleTable([P1]), 5.0, last + 1.0) == {}


def test_a_wall_clock_stepped_back_is_no_negative_outage() -> None:
    doc, last = saved_after(30.0)
    found = carried(doc, RuleTable([P1]), 5.0, last - 3600.0)
    # The lapse is at most the whole `for` from now, never more.
    assert found[P1.name, "green"][1] == pytest.approx(5.0 + 60.0)


def test_a_reload_keeps_the_onsets_of_unchanged_rules_only() -> None:
    other = rule(name="latency", stat="p95_ms", severity="P1", for_s=60.0, threshold=500.0)
    old = RuleTable([P1, other])
    failing: Traffic = {"green": reading(100, error_ratio=0.2, p95_ms=900.0)}
    judge(old, 100.0, failing)
    new = RuleTable(
        [P1, rule(name="latency", stat="p95_ms", severity="P1", for_s=30.0, threshold=500.0)]
    )
    new.adopt(old)
    states = {s.rule: s for s in judge(new, 110.0, failing).states}
    assert states[P1.name].since == 100.0, "unchanged: its `for` goes on"
    assert states["latency"].since == 110.0, "its `for` changed: afresh"


def test_a_color_whose_carried_onset_waits_to_be_judged_is_degraded_not_steady() -> None:
    """After a restart, a rule that held before it cannot judge a fresh window yet: the
    color is not read as healthy meanwhile (`degraded`), and once judged healthy it is
    `steady` again."""
    machine = GuardMachine(DEFAULT_POLICY, 1.0)
    for t in (1.0, 2.0):
        machine.observe("blue", t, Outcome.OK, 0.01)
        machine.observe("green", t, Outcome.OK, 0.01)
    assert machine.decide(Facts(now=2.0, active="green")).state is State.STEADY
    machine.policy.table.carry({("p1_error_ratio", "green"): (-30.0, 60.0)})
    assert machine.decide(Facts(now=2.0, active="green")).state is State.DEGRADED
    machine.observe("blue", 3.0, Outcome.OK, 0.01)
    machine.observe("green", 3.0, Outcome.OK, 0.01)  # 3 samples: judged, and ok
    assert machine.decide(Facts(now=3.0, active="green")).state is State.STEADY
