"""Kept verdicts decide exactly as judging every rule on every tick does.

A policy whose rules read only the probe gives the verdict of a quiet tick (no rule
holds) again while the probe windows read the same, and the rule table takes a short
path when no rule holds. `reference` turns both off: it is the full walk of every rule
at every tick. Random probe histories (noise, slow answers, failures, switches, pauses,
the guard window) must give the same decisions, verdicts and memory from both machines.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core.machine import Facts, GuardMachine, Rollback
from guardd.core.policy import PolicySpec
from guardd.core.rules import Rule
from guardd.core.types import COLORS, Color, Outcome
from guardd.testing import DEFAULT_POLICY

POLICIES = {
    "default": DEFAULT_POLICY,
    "latency_regression": replace(DEFAULT_POLICY, latency_regression=1.5, p2_latency=0.05),
    "own_rules": replace(
        DEFAULT_POLICY,
        p2_latency=0.02,
        rules=(
            Rule("slow_p50", "probe", "p50_ms", "P2", "above", 30.0, for_s=1.0, min_samples=4),
            Rule("few", "probe", "samples", "P2", "below", 2, dry_run=True),
            Rule("shaky", "probe", "error_ratio", "P1", "above", 0.2, for_s=2.0, dry_run=True),
        ),
    ),
    "no_builtin": replace(
        DEFAULT_POLICY,
        builtin_rules=False,
        rules=(Rule("down", "probe", "consecutive_failures", "P0", "above", 2),),
    ),
}


def machines(spec: PolicySpec) -> tuple[GuardMachine, GuardMachine]:
    fast = GuardMachine(spec, 1.0)
    reference = GuardMachine(spec, 1.0)
    full_walk(reference)
    return fast, reference


def full_walk(machine: GuardMachine) -> None:
    # Neither keep a verdict nor take the short path: judge every rule, every tick.
    machine.policy._keeps = False
    machine.policy.table._distinct = False


def run(spec: PolicySpec, seed: int, ticks: int) -> int:
    """Replay one random history through both machines; return how many verdicts were kept."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible history
    fast, reference = machines(spec)
    assert fast.policy._keeps
    kept = 0
    active: Color = "green"
    now = 0.0
    mood = dict.fromkeys(COLORS, "ok")
    qos = paused = False
    for _ in range(ticks):
        now += rng.choice((0.5, 1.0, 1.0, 1.0, 2.5))
        if rng.random() < 0.05:
            mood[rng.choice(COLORS)] = rng.choice(("ok", "ok", "noisy", "slow", "down", "jitter"))
        if rng.random() < 0.03:
            qos = not qos
        if rng.random() < 0.02:
            paused = not paused
        for color in COLORS:
            if rng.random() < 0.1:
                continue  # a probe that did not come back in time
            m = mood[color]
            outcome = Outcome.OK
            latency = 0.010
            if m == "down" or (m == "noisy" and rng.random() < 0.15):
                outcome = rng.choice((Outcome.HTTP_5XX, Outcome.TIMEOUT, Outcome.CONNECT_ERROR))
            if m == "slow":
                latency = rng.uniform(0.04, 0.2)
            elif m == "jitter":
                latency = rng.uniform(0.001, 0.03)
            for machine in (fast, reference):
                machine.observe(color, now, outcome, latency, f"error {outcome.value}")
        facts = Facts(now=now, active=active, qos_locked=qos, paused=paused, rollbacks_in_budget=0)
        before = dict(fast.policy._quiet)
        got, want = fast.decide(facts), reference.decide(facts)
        assert got == want
        assert fast.verdicts == reference.verdicts
        assert fast.memory() == reference.memory()
        assert fast.policy.table._since == reference.policy.table._since
        for c, verdict in fast.verdicts.items():
            kept += verdict is before.get(c, (None, None))[1]
        rollback = next((a for a in got.actions if isinstance(a, Rollback)), None)
        if rollback is not None:
            active = rollback.target
            for machine in (fast, reference):
                machine.traffic_moved(rollback.source, rollback.target, now)
                machine.rollback_succeeded(rollback.source)
        if rng.random() < 0.01:
            for machine in (fast, reference):
                machine.clear_hold()
            active = rng.choice(COLORS)
        if rng.random() < 0.005:
            # A reload: a new policy (and the reference judges in full again).
            fast.reconfigure(spec, 1.0)
            reference.reconfigure(spec, 1.0)
            full_walk(reference)
    return kept


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("seed", range(4))
def test_kept_verdicts_decide_as_the_full_walk(name: str, seed: int) -> None:
    kept = run(POLICIES[name], seed, 1500)
    assert kept > 0  # the kept verdicts were used, and changed nothing


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(POLICIES)), st.integers(0, 2**32 - 1))
def test_kept_verdicts_any_history(name: str, seed: int) -> None:
    run(POLICIES[name], seed, 300)


def test_only_probe_rules_keep_verdicts() -> None:
    # Another signal, a baseline or a stale probe: the verdict depends on more than the
    # probe windows, so every tick judges every rule.
    base = DEFAULT_POLICY
    assert not GuardMachine(
        replace(base, rules=(Rule("errs", "log", "count", "P2", "above", 5),)), 1.0
    ).policy._keeps
    assert not GuardMachine(
        replace(base, rules=(Rule("b", "probe", "p95_ms", "P2", "above_baseline", 2.0),)), 1.0
    ).policy._keeps
    assert not GuardMachine(replace(base, stale_after={"probe": 5.0}), 1.0).policy._keeps
