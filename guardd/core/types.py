"""The vocabulary shared by the core and the adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")
Severity = Literal["P0", "P1", "P2"]
#: The journal's `by` for what guardd does on its own (an automatic rollback, a lock).
GUARDD: Final = "guardd"


#: Every event name the journal writes (docs/contract.md §4); notification sinks choose
#: among the same names, so both read them from here.
JOURNAL_EVENTS: frozenset[str] = frozenset(
    {
        "started",
        "stopped",
        "rollback_started",
        "rollback_completed",
        "rollback_failed",
        "switch",
        "promote",
        "hold",
        "external_switch",
        "qos_locked",
        "qos_extended",
        "qos_released",
        "paused",
        "resumed",
        "config_reloaded",
        "alert",
        "fleet_leader",
    }
)


#: The journal events after which traffic is on their `to`: what moved it, guardd or not.
TRAFFIC_MOVES: frozenset[str] = frozenset(
    {"rollback_completed", "switch", "promote", "external_switch"}
)


#: The journal events that page first: guardd moved traffic, could not, or stopped acting.
#: A sink sends them ahead of older messages still waiting or being retried (an alert a
#: failing receiver keeps refusing), so that the page that matters is never last in line.
URGENT_EVENTS: frozenset[str] = frozenset(
    {"rollback_started", "rollback_completed", "rollback_failed", "hold"}
)


#: How one notification to one sink ended (docs/contract.md §5 `outcome` label of
#: `guardd_notifications_total`).
NotificationOutcome = Literal["sent", "retried", "dropped"]
NOTIFICATION_OUTCOMES: tuple[NotificationOutcome, ...] = ("sent", "retried", "dropped")


def other(color: Color) -> Color:
    """The color that is not `color`."""
    return "green" if color == "blue" else "blue"


class Outcome(StrEnum):
    """How one probe ended (docs/contract.md §5 `outcome` label)."""

    OK = "ok"
    HTTP_5XX = "http_5xx"
    HTTP_OTHER = "http_other"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    BODY_MISMATCH = "body_mismatch"
    # guardd itself failed to finish the probe; it cannot vouch for the color (fail closed).
    PROBE_ERROR = "probe_error"


class State(StrEnum):
    """The guard's states (docs/contract.md §5)."""

    STARTING = "starting"
    STEADY = "steady"
    DEGRADED = "degraded"
    ROLLING_BACK = "rolling_back"
    GUARD_WINDOW = "guard_window"
    HOLD = "hold"
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class Evidence:
    """Why a rule fired (or did not): the rule, its threshold, and the window it saw.

    `samples` and `window_s` (s) are the window of the signal the rule read. The probe's
    own figures (`consecutive_failures`, `error_ratio`, `p50_ms`, `p95_ms`) are set for
    evidence read from the `probe` signal and None otherwise; `to_dict` then leaves them
    out, so that a traffic rule's evidence never shows probe figures as its own.
    """

    rule: str
    threshold: float | int | None
    value: float | int | None
    samples: int
    color: Color
    consecutive_failures: int | None
    error_ratio: float | None
    p50_ms: float | None
    p95_ms: float | None
    window_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The journal's `evidence` object."""
        d: dict[str, Any] = {
            "rule": self.rule,
            "threshold": self.threshold,
            "value": _round(self.value),
            "samples": self.samples,
            "color": self.color,
        }
        if self.consecutive_failures is not None:
            d["consecutive_failures"] = self.consecutive_failures
            d["error_ratio"] = _round(self.error_ratio)
            d["p50_ms"] = _round(self.p50_ms)
            d["p95_ms"] = _round(self.p95_ms)
        d["window_s"] = self.window_s
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Evidence | None:
        """The inverse of `to_dict` (state.json); None if `doc` is not evidence."""
        required = {"rule", "threshold", "value", "samples", "color", "window_s"}
        probe = ("consecutive_failures", "error_ratio", "p50_ms", "p95_ms")
        if not required <= doc.keys() or doc["color"] not in COLORS:
            return None
        known = required | set(probe)
        extra = {k: v for k, v in doc.items() if k not in known}
        fields: dict[str, Any] = {k: doc[k] for k in required} | {k: doc.get(k) for k in probe}
        return cls(**fields, extra=extra)


def _round(v: float | int | None) -> float | int | None:
    return round(v, 4) if isinstance(v, float) else v
