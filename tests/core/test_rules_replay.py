"""`[policy]` is shorthand for rules: the same history gives the same decisions either way.

Ten minutes of simulated probe history at one probe a second (noise, flapping, slow
answers, a hard failure, both colors down, a budget run-out) is replayed through the pure
machine twice: once with the `[policy]` keys (the built-in rules), once with
`policy.builtin_rules = false` and the equivalent explicit `[[rules]]` table, compiled by
the config loader. Every tick's decision must be the same.
"""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guardd import config
from guardd.core.machine import Alert, Decision, Facts, GuardMachine, Hold, Reapply, Rollback
from guardd.core.policy import PolicySpec
from guardd.core.types import COLORS, Color, Outcome

OK, DOWN, SLOW = "ok", "down", "slow"


@dataclass(frozen=True)
class Tick:
    blue: str
    green: str
    operator_back_to_green: bool = False


def history(seed: int) -> list[Tick]:
    """600 ticks: each phase names what it is there to exercise."""
    rng = random.Random(seed)  # noqa: S311 - reproducible noise, not a secret
    ticks: list[Tick] = []

    def phase(n: int, blue: str, green: str, noise: float = 0.0) -> None:
        for _ in range(n):
            g = DOWN if noise and rng.random() < noise else green
            b = DOWN if noise and rng.random() < noise / 2 else blue
            ticks.append(Tick(b, g))

    phase(40, OK, OK, noise=0.04)  # noise: P2 at most, never a rollback
    ticks.extend(Tick(OK, DOWN if i % 2 else OK) for i in range(40))  # flapping
    phase(30, OK, OK)
    phase(60, OK, SLOW)  # slow answers: the latency rules (P2, then P1 once sustained)
    ticks.append(Tick(OK, OK, operator_back_to_green=True))
    phase(30, OK, OK)
    phase(10, OK, DOWN)  # a hard failure: P0 by consecutive failures
    ticks.append(Tick(OK, OK, operator_back_to_green=True))
    phase(60, OK, OK, noise=0.02)
    phase(20, DOWN, DOWN)  # both down: hold, no target
    phase(40, OK, OK)
    for _ in range(4):  # the budget runs out: green redeployed and failing again
        ticks.append(Tick(OK, OK, operator_back_to_green=True))
        phase(8, OK, OK)
        phase(8, OK, DOWN)
    phase(600 - len(ticks), OK, OK, noise=0.03)
    return ticks


LATENCY = {OK: 0.02, DOWN: 0.001, SLOW: 0.9}
OUTCOME = {OK: Outcome.OK, DOWN: Outcome.HTTP_5XX, SLOW: Outcome.OK}


Step = tuple[int, tuple[Any, ...], tuple[tuple[Any, ...], ...]]


def replay(spec: PolicySpec, ticks: list[Tick]) -> list[Step]:
    """Drive the machine as the guard would, with every switch succeeding at once."""
    machine = GuardMachine(spec, probe_interval=1.0)
    active: Color = "green"
    rollbacks: list[float] = []
    qos_until = -1.0
    seen: list[Step] = []
    for n, tick in enumerate(ticks):
        now = float(n)
        if tick.operator_back_to_green and active != "green":
            machine.traffic_moved(active, "green", now)
            active = "green"
            machine.switched()
            machine.policy.reset("green")
            machine.judge_afresh("green")
            machine.clear_hold()
            qos_until = -1.0
        for color, said in zip(COLORS, (tick.blue, tick.green), strict=True):
            outcome = OUTCOME[said]
            machine.observe(color, now, outcome, LATENCY[said], None if said != DOWN else "503")
        decision = machine.decide(
            Facts(
                now=now,
                active=active,
                qos_locked=now < qos_until,
                rollbacks_in_budget=sum(1 for t in rollbacks if now - t < spec.budget_window),
            )
        )
        seen.append((n, *key(decision)))
        for action in decision.actions:
            if isinstance(action, Rollback):
                machine.traffic_moved(action.source, action.target, now)
                active = action.target
                machine.switched()
                machine.rollback_succeeded(action.source)
                rollbacks.append(now)
                qos_until = now + 30
    return seen


def key(d: Decision) -> tuple[tuple[Any, ...], tuple[tuple[Any, ...], ...]]:
    def one(a: Rollback | Hold | Alert | Reapply) -> tuple[Any, ...]:
        # Reasons quote the rule in its own words (built-in rules as they always read,
        # a [[rules]] row with its statistic): compared by rule, value and effect instead.
        if isinstance(a, Rollback):
            return ("rollback", a.source, a.target, a.severity, a.evidence.rule, a.evidence.value)
        if isinstance(a, Hold):
            rule = a.evidence.rule if a.evidence else None
            return ("hold", a.reason, a.sticky, a.severity, rule)
        if isinstance(a, Alert):
            if a.evidence is not None:
                return ("alert", a.severity, a.evidence.rule, a.evidence.value)
            return ("alert", a.severity, a.reason)
        return ("reapply", a.color)

    verdict = d.verdict
    said = (
        d.state,
        d.blocked_by,
        verdict.severity if verdict else None,
        verdict.evidence.rule if verdict else None,
        verdict.insufficient_data if verdict else None,
        verdict.evidence.value if verdict else None,
    )
    return said, tuple(one(a) for a in d.actions)


POLICIES = {
    "defaults": "",
    "tuned": """
        consecutive_failures = 4
        min_samples = 8
        window = "30s"
        p1_sustain = "15s"
        p1_latency = "500ms"
        p2_latency = "200ms"
        latency_regression = 3.0
        max_rollbacks = 3
    """,
}


def explicit_table(spec: PolicySpec) -> str:
    """The `[[rules]]` that say what the built-in rules of `spec` say, by name."""
    rows = [
        ("consecutive_failures", "consecutive_failures", "above", spec.consecutive_failures,
         "P0", None, 0),
        ("p0_error_ratio", "error_ratio", "above", spec.p0_error_ratio, "P0", None, None),
        ("p1_error_ratio", "error_ratio", "above", spec.p1_error_ratio, "P1", None, None),
        ("p1_latency", "p95_ms", "above", spec.p1_latency * 1000, "P1", None, None),
    ]  # fmt: skip
    if spec.latency_regression:
        rows.append(
            ("latency_regression", "p95_ms", "above_standby", spec.latency_regression, "P1",
             None, None)
        )  # fmt: skip
    rows += [
        ("p2_error_ratio", "error_ratio", "above", spec.p2_error_ratio, "P2", None, None),
        ("p2_latency", "p95_ms", "above", spec.p2_latency * 1000, "P2", None, None),
    ]
    out = []
    for name, stat, op, threshold, severity, for_s, min_samples in rows:
        out.append(
            "[[rules]]\n"
            f'name = "{name}"\nsignal = "probe"\nstat = "{stat}"\n{op} = {threshold!r}\n'
            f'severity = "{severity}"\n'
            + (f"for = {for_s}\n" if for_s is not None else "")
            + (f"min_samples = {min_samples}\n" if min_samples is not None else "")
        )
    return "\n".join(out)


def load(tmp_path: Path, name: str, policy: str, rules: str = "") -> PolicySpec:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        textwrap.dedent(
            """
            [upstreams.blue]
            url = "http://127.0.0.1:9009/healthz"
            [upstreams.green]
            url = "http://127.0.0.1:9010/healthz"
            [switch]
            kind = "state-file"
            path = "/tmp/deploy-state.json"
            [policy]
            """
        )
        + textwrap.dedent(policy)
        + ("builtin_rules = false\n" + rules if rules else "")
    )
    return config.load(path).config.policy_spec()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_keys_and_the_equivalent_rule_table_decide_alike(
    tmp_path: Path, policy: str, seed: int
) -> None:
    shorthand = load(tmp_path, "shorthand", POLICIES[policy])
    table = load(tmp_path, "table", POLICIES[policy], explicit_table(shorthand))
    assert not shorthand.rules and table.rules and not table.builtin_rules
    ticks = history(seed)
    assert len(ticks) == 600  # ten minutes at one probe a second

    a, b = replay(shorthand, ticks), replay(table, ticks)

    for tick_a, tick_b in zip(a, b, strict=True):
        assert tick_b == tick_a
    # The history reaches every kind of decision, or the comparison would prove little.
    acts = [act for _, _, actions in a for act in actions]
    kinds = Counter(act[0] for act in acts)
    rolled = [act for act in acts if act[0] == "rollback"]
    holds = [act for act in acts if act[0] == "hold"]
    assert kinds["rollback"] >= 2 and kinds["alert"] >= 1, kinds
    assert {r[3] for r in rolled} >= {"P0"}
    assert any("budget spent" in h[1] for h in holds), holds
    assert any("rollback target" in h[1] or "no safe" in h[1] for h in holds), holds
    if policy == "tuned":
        assert {r[3] for r in rolled} == {"P0", "P1"}, rolled
