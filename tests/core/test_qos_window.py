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


def test_a_signal_that_could_not_tell_keeps_the_lock_and_a_restart_keeps_that() -> None:
    """A signal that gave nothing, or went stale, at a tick of the window: what users saw
    then is unknown, so the probes holding is no "SLOs held"; an extension starts clean."""
    w = full_window()
    w.signal_blind("traffic")
    w.signal_blind("traffic")
    verdict = w.verdict()
    assert not verdict.met
    assert verdict.reason == (
        "signals could not tell during the window (traffic: gave nothing, or went stale): "
        "what users saw then is unknown"
    )
    assert verdict.evidence(0.01, 0.99)["signals_blind"] == ["traffic"]
    again = QosWindow(0.0, 300.0, max_error_ratio=0.01, min_health_ratio=0.99, min_samples=5)
    again.restore_counts(w.counts())
    assert again.blind == ["traffic"] and not again.verdict().met
    again.restart(300.0)
    assert again.blind == []
    for _ in range(10):
        again.add(Outcome.OK)
    assert again.verdict().met


def test_counts_kept_by_an_older_guardd_restore_without_blind_signals() -> None:
    w = QosWindow(0.0, 300.0, max_error_ratio=0.01, min_health_ratio=0.99, min_samples=1)
    w.restore_counts({"samples": 3, "failures": 0, "errors_5xx": 0, "fired": [], "blind": 7})
    assert w.blind == [] and w.verdict().met
