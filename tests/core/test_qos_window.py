"""The guard window: probe SLOs and the rules both have to hold for the lock to go."""

from __future__ import annotations

from guardd.core.qos import QosWindow
from guardd.core.types import Outcome


def full_window(*fired: str) -> QosWindow:
    w = QosWindow(0.0, 300.0, max_error_ratio=0.01, min_health_ratio=0.99, min_samples=5)
    for _ in range(100):
        w.add(Outcome.OK)
    for name in fired:
        w.rule_fired(name)
    return w


def test_a_window_with_clean_probes_and_no_rule_fired_is_met() -> None:
    verdict = full_window().verdict()
    assert verdict.met and "rules_fired" not in verdict.evidence(0.01, 0.99)


def test_a_rule_that_fired_during_the_window_keeps_the_lock() -> None:
    verdict = full_window("5xx-p2", "5xx-p2", "latency-p2").verdict()
    assert not verdict.met
    assert "rules fired during the window: 5xx-p2, latency-p2" in verdict.reason
    assert verdict.evidence(0.01, 0.99)["rules_fired"] == ["5xx-p2", "latency-p2"]


def test_what_fired_survives_a_restart_and_an_extension_starts_clean() -> None:
    w = full_window("traffic.error_ratio")
    again = QosWindow(0.0, 300.0, max_error_ratio=0.01, min_health_ratio=0.99, min_samples=5)
    again.restore_counts(w.counts())
    assert not again.verdict().met and again.fired == ["traffic.error_ratio"]
    again.restart(300.0)
    assert again.fired == []
