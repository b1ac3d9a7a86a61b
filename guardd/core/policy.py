"""The severity rules: window statistics in, a verdict with its evidence out."""

from __future__ import annotations

from dataclasses import dataclass, replace

from guardd.core.types import Color, Evidence, Severity
from guardd.core.window import WindowStats


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """The thresholds of docs/contract.md §2 `[policy]`, in seconds and ratios."""

    rollback_to: str = "previous"
    consecutive_failures: int = 3
    window: float = 60.0
    min_samples: int = 5
    p0_error_ratio: float = 0.50
    p1_error_ratio: float = 0.10
    p1_latency: float = 30.0
    p1_sustain: float = 120.0
    p2_error_ratio: float = 0.03
    p2_latency: float = 10.0
    latency_regression: float = 0.0
    promote_successes: int = 5
    max_rollbacks: int = 3
    budget_window: float = 3600.0
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the rules say about the active color now.

    `severity` is None when no rule fires; `pending` names a P1 rule that holds but has
    not yet been sustained; `insufficient_data` is true when ratio and latency rules
    could not be judged for lack of samples.
    """

    severity: Severity | None
    evidence: Evidence
    pending: Evidence | None = None
    insufficient_data: bool = False

    @property
    def failing(self) -> bool:
        """Whether the verdict calls for a rollback (P0 or P1)."""
        return self.severity in ("P0", "P1")

    @property
    def reason(self) -> str:
        """A one-line human account of the verdict."""
        e = self.evidence
        if self.severity is None:
            return "healthy" if not self.insufficient_data else "insufficient data"
        return f"{self.severity} {e.rule}: {_fmt(e.value)} >= {_fmt(e.threshold)} on {e.color}"


def _fmt(v: float | int | None) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class Policy:
    """Evaluates the severity table for one active color, remembering P1 onsets."""

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self._p1_since: dict[str, float] = {}

    def reset(self) -> None:
        """Forget sustained-condition onsets (after a switch)."""
        self._p1_since.clear()

    def evaluate(
        self, now: float, color: Color, active: WindowStats, standby: WindowStats | None
    ) -> Verdict:
        """Judge `active` at monotonic `now`; `standby` feeds the latency-regression rule."""
        s = self.spec

        def ev(
            rule: str, threshold: float | int | None, value: float | int | None, **extra: object
        ) -> Evidence:
            return Evidence(
                rule=rule,
                threshold=threshold,
                value=value,
                samples=active.samples,
                color=color,
                consecutive_failures=active.consecutive_failures,
                error_ratio=active.error_ratio,
                p50_ms=active.p50_ms,
                p95_ms=active.p95_ms,
                window_s=s.window,
                extra=(
                    # What the color last said when it failed: `HTTP 503 status=DOWN db=DOWN`.
                    {**extra, "last_error": active.last_error}
                    if active.last_error is not None
                    and rule not in ("healthy", "insufficient_data")
                    else dict(extra)
                ),
            )

        # P0 by a run of failures needs no minimum of samples: it is the fast path.
        if active.consecutive_failures >= s.consecutive_failures:
            self._p1_since.clear()
            return Verdict(
                "P0",
                ev("consecutive_failures", s.consecutive_failures, active.consecutive_failures),
            )
        enough = active.samples >= s.min_samples
        ratio = active.error_ratio
        if not enough or ratio is None:
            self._p1_since.clear()
            return Verdict(
                None, ev("insufficient_data", s.min_samples, active.samples), insufficient_data=True
            )
        if ratio >= s.p0_error_ratio:
            self._p1_since.clear()
            return Verdict("P0", ev("p0_error_ratio", s.p0_error_ratio, ratio))

        p95_s = (active.p95_ms or 0.0) / 1000.0
        candidates: list[Evidence] = []
        if ratio >= s.p1_error_ratio:
            candidates.append(ev("p1_error_ratio", s.p1_error_ratio, ratio))
        if p95_s >= s.p1_latency:
            candidates.append(ev("p1_latency", s.p1_latency * 1000.0, active.p95_ms))
        if (
            s.latency_regression > 0
            and standby is not None
            and standby.samples >= s.min_samples
            and standby.p95_ms
            and active.p95_ms
            and active.p95_ms > s.latency_regression * standby.p95_ms
        ):
            candidates.append(
                ev(
                    "latency_regression",
                    s.latency_regression,
                    active.p95_ms / standby.p95_ms,
                    standby_p95_ms=round(standby.p95_ms, 4),
                )
            )
        held = {c.rule for c in candidates}
        for rule in list(self._p1_since):
            if rule not in held:
                del self._p1_since[rule]
        pending: Evidence | None = None
        for c in candidates:
            since = self._p1_since.setdefault(c.rule, now)
            sustained = now - since
            evidence = replace(
                c, extra={**c.extra, "sustained_s": round(sustained, 3), "sustain_s": s.p1_sustain}
            )
            if sustained >= s.p1_sustain:
                return Verdict("P1", evidence)
            pending = pending or evidence
        if ratio >= s.p2_error_ratio:
            return Verdict("P2", ev("p2_error_ratio", s.p2_error_ratio, ratio), pending=pending)
        if p95_s >= s.p2_latency:
            return Verdict(
                "P2", ev("p2_latency", s.p2_latency * 1000.0, active.p95_ms), pending=pending
            )
        return Verdict(None, ev("healthy", None, ratio), pending=pending)
