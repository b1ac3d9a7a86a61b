"""Signals: what each source of evidence says about one color, as the rules read it.

A signal (the built-in synthetic `probe`, an nginx access log, a Prometheus query, ...)
keeps, per color, a window of observations. At decision time it is asked for a `Reading`:
how many observations the window holds and its named statistics. The core compares those
statistics with the rule table (`guardd.core.rules`); it never asks where they came from,
so a new kind of signal is one adapter at the edge and nothing here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

#: The signal every guard has: the synthetic probe of each color's `upstreams.*.url`.
PROBE: Final = "probe"

#: The statistics each kind of signal yields (docs/contract.md §2 `[[rules]]` `stat`).
KIND_STATS: Final[Mapping[str, frozenset[str]]] = {
    PROBE: frozenset({"consecutive_failures", "error_ratio", "p50_ms", "p95_ms", "samples"}),
    "access_log": frozenset(
        {"requests", "rps", "error_ratio", "p50_ms", "p95_ms", "p99_ms", "mean_ms"}
    ),
    # A PromQL instant query per color: its single sample.
    "prometheus": frozenset({"value"}),
    # The color's own /metrics: a ratio of counter increases, or a gauge, across the window.
    "scrape": frozenset({"value"}),
    # Lines of the color's log matching a pattern: how many in the window, and per second.
    "log_match": frozenset({"count", "rate"}),
}


@dataclass(frozen=True, slots=True)
class Reading:
    """One signal's view of one color at one moment.

    `samples` counts the observations in the window (probe rounds, requests, ...) and is
    what a rule's `min_samples` is compared with. `stats` maps each statistic the kind
    yields to its value, or None where the window cannot give one (no samples, no
    latency). `last_at` is the monotonic time (s) of the newest observation, or, before
    the first, of the moment the signal started: a signal is stale once `now - last_at`
    exceeds its `stale_after`. `detail` is extra evidence copied into a firing rule's
    evidence (a baseline, the query as sent, the last error); it must hold no secret.
    """

    samples: int
    window_s: float
    stats: Mapping[str, float | None]
    last_at: float | None
    detail: Mapping[str, Any] = field(default_factory=dict)
