"""The QoS guard window: after a rollback, deploys wait until the SLOs have held."""

from __future__ import annotations

from dataclasses import dataclass

from guardd.core.types import Outcome

# The rule and signal names a window keeps (state.json keeps them too): a bound on what a
# hand-edited state.json can make it hold.
_NAMES_KEPT = 64


@dataclass(frozen=True, slots=True)
class QosVerdict:
    """The SLOs over one guard window."""

    met: bool
    samples: int
    error_ratio: float
    health_ratio: float
    reason: str

    min_samples: int = 1
    # The rules that fired on the active color during the window (P0-P2, dry runs aside).
    fired: tuple[str, ...] = ()
    # Real requests of the active color nginx logged during the window, and their 5xx.
    traffic_requests: int = 0
    traffic_errors: int = 0
    # The signals that could not tell during the window (gave nothing, or went stale).
    blind: tuple[str, ...] = ()

    def evidence(self, max_error_ratio: float, min_health_ratio: float) -> dict[str, object]:
        """The journal's evidence for a release or an extension."""
        return (
            {
                "rule": "qos_window",
                "samples": self.samples,
                "min_samples": self.min_samples,
                "error_ratio": round(self.error_ratio, 4),
                "max_error_ratio": max_error_ratio,
                "health_ratio": round(self.health_ratio, 4),
                "min_health_ratio": min_health_ratio,
            }
            | ({"rules_fired": list(self.fired)} if self.fired else {})
            | ({"signals_blind": list(self.blind)} if self.blind else {})
            | (
                {
                    "traffic_requests": self.traffic_requests,
                    "traffic_error_ratio": round(self.traffic_errors / self.traffic_requests, 4),
                }
                if self.traffic_requests
                else {}
            )
        )


class QosWindow:
    """Counts the active color's probes from `started_at` for `span` seconds.

    The error ratio counts 5xx answers (errors served to users); the health ratio counts
    probes that passed every expectation. Both must hold, over at least `min_samples`
    probes, for the lock to be released: fewer cannot tell, and extend the window. So does
    a signal that could not tell at some tick of the window (`signal_blind`): what its
    rules would have seen of users then is unknown, never "held".
    """

    __slots__ = (
        "blind",
        "errors_5xx",
        "failures",
        "fired",
        "max_error_ratio",
        "min_health_ratio",
        "min_samples",
        "samples",
        "span",
        "started_at",
        "traffic_errors",
        "traffic_requests",
    )

    def __init__(
        self,
        started_at: float,
        span: float,
        max_error_ratio: float,
        min_health_ratio: float,
        min_samples: int = 1,
    ) -> None:
        self.started_at = started_at
        self.span = span
        self.max_error_ratio = max_error_ratio
        self.min_health_ratio = min_health_ratio
        self.min_samples = max(1, min_samples)
        self.samples = self.failures = self.errors_5xx = 0
        self.fired: list[str] = []
        self.blind: list[str] = []
        self.traffic_requests = self.traffic_errors = 0

    def counts(self) -> dict[str, object]:
        """The probes counted so far, and the rules that fired (state.json keeps them)."""
        return {
            "samples": self.samples,
            "failures": self.failures,
            "errors_5xx": self.errors_5xx,
            "fired": list(self.fired),
            "blind": list(self.blind),
            "traffic": [self.traffic_requests, self.traffic_errors],
        }

    def restore_counts(self, doc: dict[str, object]) -> None:
        """Adopt `counts()` of an earlier run; malformed counts are not adopted."""
        samples, failures, errors_5xx = (doc.get(k) for k in ("samples", "failures", "errors_5xx"))
        if (
            isinstance(samples, int)
            and isinstance(failures, int)
            and isinstance(errors_5xx, int)
            and 0 <= errors_5xx <= failures <= samples
        ):
            self.samples, self.failures, self.errors_5xx = samples, failures, errors_5xx
        traffic = doc.get("traffic")
        if (
            isinstance(traffic, list)
            and len(traffic) == 2
            and all(isinstance(n, int) and n >= 0 for n in traffic)
            and traffic[1] <= traffic[0]
        ):
            self.traffic_requests, self.traffic_errors = traffic
        for key, names in (("fired", self.fired), ("blind", self.blind)):
            kept = doc.get(key)
            if isinstance(kept, list):
                names[:] = [name for name in kept if isinstance(name, str)][:_NAMES_KEPT]

    @property
    def ends_at(self) -> float:
        """Monotonic time at which the window is judged."""
        return self.started_at + self.span

    def add(self, outcome: Outcome) -> None:
        """Count one probe round of the active color."""
        self.samples += 1
        if outcome is not Outcome.OK:
            self.failures += 1
            self.errors_5xx += outcome is Outcome.HTTP_5XX

    def add_traffic(self, requests: int, errors_5xx: int) -> None:
        """Count real requests of the active color (and how many were 5xx) in the window."""
        self.traffic_requests += max(0, requests)
        self.traffic_errors += max(0, min(errors_5xx, requests))

    def rule_fired(self, name: str) -> None:
        """A P0-P2 rule fired on the active color: the window is not met (contract §2)."""
        if name not in self.fired and len(self.fired) < _NAMES_KEPT:
            self.fired.append(name)

    def signal_blind(self, name: str) -> None:
        """Signal `name` could not tell at a tick of the window (its source gave nothing,
        or it said nothing of the active color for longer than its `stale_after`): its
        rules could not have fired, so the window is not met (contract §2)."""
        if name not in self.blind and len(self.blind) < _NAMES_KEPT:
            self.blind.append(name)

    def due(self, now: float) -> bool:
        """Whether the window has run its course."""
        return now >= self.ends_at

    def verdict(self) -> QosVerdict:
        """Judge the window; fewer than `min_samples` probes is not a recovery."""
        if self.samples < self.min_samples:
            return QosVerdict(
                False,
                self.samples,
                self.errors_5xx / self.samples if self.samples else 0.0,
                (self.samples - self.failures) / self.samples if self.samples else 0.0,
                f"only {self.samples} probes of the active color in the window; "
                f"min_samples is {self.min_samples}",
                self.min_samples,
            )
        error_ratio = self.errors_5xx / self.samples
        health_ratio = (self.samples - self.failures) / self.samples
        problems = []
        if error_ratio > self.max_error_ratio:
            problems.append(f"error ratio {error_ratio:.3g} > {self.max_error_ratio:g}")
        if health_ratio < self.min_health_ratio:
            problems.append(f"health ratio {health_ratio:.3g} < {self.min_health_ratio:g}")
        if self.fired:
            problems.append(f"rules fired during the window: {', '.join(self.fired)}")
        if self.blind:
            problems.append(
                f"signals could not tell during the window ({', '.join(self.blind)}: gave "
                "nothing, or went stale): what users saw then is unknown"
            )
        if self.traffic_requests:
            real = self.traffic_errors / self.traffic_requests
            if real > self.max_error_ratio:
                problems.append(
                    f"real 5xx ratio {real:.3g} > {self.max_error_ratio:g} over "
                    f"{self.traffic_requests} requests"
                )
        reason = "; ".join(problems) or (
            f"SLOs held over {self.samples} probes "
            f"(error ratio {error_ratio:.3g}, health {health_ratio:.3g})"
        )
        return QosVerdict(
            not problems,
            self.samples,
            error_ratio,
            health_ratio,
            reason,
            self.min_samples,
            tuple(self.fired),
            self.traffic_requests,
            self.traffic_errors,
            tuple(self.blind),
        )

    def prolong(self, ends_at: float) -> None:
        """Judge the window again at monotonic `ends_at`, over the probes it counted so far
        and those to come (a fleet's leader waiting for other nodes' windows)."""
        self.span = max(self.span, ends_at - self.started_at)

    def restart(self, now: float, span: float | None = None) -> None:
        """Begin another window (an extension)."""
        self.started_at = now
        if span is not None:
            self.span = span
        self.samples = self.failures = self.errors_5xx = 0
        self.fired = []
        self.blind = []
        self.traffic_requests = self.traffic_errors = 0
