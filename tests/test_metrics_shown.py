"""Gauges set only when their value changes still show, at every scrape, the last value given.

Any sequence of the per-tick calls (rule states appearing, changing, repeating and going
away; state, active color, upstream health, QoS lock, rollback target) is checked after
each call against a model that remembers only the last value given.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from guardd.core.machine import Facts, GuardMachine
from guardd.core.types import Outcome
from guardd.metrics import COLORS, STATES, GuardMetrics
from guardd.testing import DEFAULT_POLICY

RULES = ("consecutive_failures", "p1_latency", "own")
RULE_STATES = ("ok", "pending", "firing", "inconclusive")

rule_rows = st.lists(
    st.tuples(st.sampled_from(RULES), st.sampled_from(COLORS), st.sampled_from(RULE_STATES)),
    max_size=6,
)
calls = st.lists(
    st.one_of(
        st.tuples(st.just("rules"), rule_rows),
        st.tuples(st.just("state"), st.sampled_from(STATES)),
        st.tuples(st.just("active"), st.sampled_from((*COLORS, None))),
        st.tuples(
            st.just("upstream"),
            st.tuples(
                st.sampled_from(COLORS),
                st.booleans(),
                st.integers(0, 3),
                st.sampled_from((0.0, 0.25, 1.0)),
            ),
        ),
        st.tuples(st.just("qos"), st.booleans()),
        st.tuples(st.just("target"), st.booleans()),
    ),
    max_size=30,
)


def samples(metrics: GuardMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "guard"))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith(
            (
                "guardd_rule_",
                "guardd_state",
                "guardd_active_color",
                "guardd_upstream_healthy",
                "guardd_consecutive_failures",
                "guardd_window_error_ratio",
                "guardd_qos_locked",
                "guardd_rollback_target_healthy",
            )
        )
    }


@settings(max_examples=60, deadline=None)
@given(calls)
def test_gauges_show_the_last_value_given(sequence: list[tuple[str, object]]) -> None:
    metrics = GuardMetrics("g", "0.1.0", CollectorRegistry())
    want = samples(metrics)  # the series that exist (at 0) before any call
    for kind, arg in sequence:
        if kind == "rules":
            assert isinstance(arg, list)
            metrics.set_rules(arg)
            want = {k: v for k, v in want.items() if not k[0].startswith("guardd_rule_")}
            for rule, color, state in arg:  # the last row of a (rule, color) wins
                labels = (("color", color), ("rule", rule))
                want["guardd_rule_firing", labels] = float(state == "firing")
                want["guardd_rule_inconclusive", labels] = float(state == "inconclusive")
        elif kind == "state":
            assert isinstance(arg, str)
            metrics.set_state(arg)
            for s in STATES:
                want["guardd_state", (("state", s),)] = float(s == arg)
        elif kind == "active":
            assert arg is None or isinstance(arg, str)
            metrics.set_active(arg)
            for c in COLORS:
                want["guardd_active_color", (("color", c),)] = float(c == arg)
        elif kind == "upstream":
            assert isinstance(arg, tuple)
            color, healthy, failures, ratio = arg
            metrics.set_upstream(
                color, healthy=healthy, consecutive_failures=failures, error_ratio=ratio
            )
            want["guardd_upstream_healthy", (("color", color),)] = float(healthy)
            want["guardd_consecutive_failures", (("color", color),)] = float(failures)
            want["guardd_window_error_ratio", (("color", color),)] = ratio
        elif kind == "qos":
            assert isinstance(arg, bool)
            metrics.set_qos_locked(arg)
            want["guardd_qos_locked", ()] = float(arg)
        else:
            assert isinstance(arg, bool)
            metrics.set_rollback_target_healthy(arg)
            want["guardd_rollback_target_healthy", ()] = float(arg)
        assert samples(metrics) == want


def test_a_rule_that_returns_after_a_reload_shows_its_state_again() -> None:
    metrics = GuardMetrics("g", "0.1.0", CollectorRegistry())
    metrics.set_rules([("own", "blue", "firing")])
    metrics.set_rules([])  # a reload removed it: its series go
    assert not [k for k in samples(metrics) if k[0].startswith("guardd_rule_")]
    metrics.set_rules([("own", "blue", "firing")])  # back, in the same state as before
    labels = (("color", "blue"), ("rule", "own"))
    assert samples(metrics)["guardd_rule_firing", labels] == 1.0
    assert samples(metrics)["guardd_rule_inconclusive", labels] == 0.0


def test_verdicts_given_again_show_their_states_again_after_other_rule_states() -> None:
    machine = GuardMachine(DEFAULT_POLICY, 1.0)
    for t in range(5):
        machine.observe("blue", float(t), Outcome.OK, 0.01)
        machine.observe("green", float(t), Outcome.HTTP_5XX, 0.01, "HTTP 503")
    machine.decide(Facts(now=5.0, active="green"))
    verdicts = dict(machine.verdicts)
    metrics = GuardMetrics("g", "0.1.0", CollectorRegistry())

    def shown() -> dict[tuple[str, str], float]:
        return {
            (dict(k[1])["rule"], dict(k[1])["color"]): v
            for k, v in samples(metrics).items()
            if k[0] == "guardd_rule_firing"
        }

    want = {
        (st.rule, color): float(st.state == "firing")
        for color, v in verdicts.items()
        for st in v.states
    }
    assert want[("consecutive_failures", "green")] == 1.0
    metrics.set_verdicts(verdicts)
    assert shown() == want
    metrics.set_verdicts(verdicts)  # the same verdicts: nothing to change
    assert shown() == want
    metrics.set_rules([("consecutive_failures", "green", "ok")])
    assert shown() == {("consecutive_failures", "green"): 0.0}
    metrics.set_verdicts(verdicts)  # given again after other states: shown again
    assert shown() == want
