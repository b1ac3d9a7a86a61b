"""Signals at the edge: adapters that turn a source of evidence into per-color `Reading`s.

The rules (`guardd.core.signals`) read a `Reading` per signal and color and never ask where
it came from; each module here reads one kind of source, and `build` is the one place that
maps a `[signals.NAME]` table's `kind` to its adapter.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

from anyio.abc import TaskStatus

from guardd._lazy import from_modules
from guardd.clock import Clock
from guardd.core.signals import Reading
from guardd.core.types import COLORS, Color

if TYPE_CHECKING:
    from guardd.signals.access_log import AccessLogSignal, AccessLogSpec
    from guardd.signals.log_match import LogMatchSignal, LogMatchSpec
    from guardd.signals.prometheus import PrometheusSignal, PrometheusSpec
    from guardd.signals.scrape import ScrapeSignal, ScrapeSpec

# Each adapter is loaded on first use of its names: only a config with that kind of signal
# pays for it. The kinds that ask a server over HTTP load httpx (~12 MiB); the file
# followers (the tail, the traffic and count windows) about 0.7 MiB of idle RSS.
_LAZY = {
    "AccessLogSignal": "guardd.signals.access_log",
    "AccessLogSpec": "guardd.signals.access_log",
    "LogMatchSignal": "guardd.signals.log_match",
    "LogMatchSpec": "guardd.signals.log_match",
    "PrometheusSignal": "guardd.signals.prometheus",
    "PrometheusSpec": "guardd.signals.prometheus",
    "ScrapeSignal": "guardd.signals.scrape",
    "ScrapeSpec": "guardd.signals.scrape",
}


__getattr__ = from_modules(__name__, _LAZY)


__all__ = [
    "AccessLogSignal",
    "AccessLogSpec",
    "LogMatchSignal",
    "LogMatchSpec",
    "PrometheusSignal",
    "PrometheusSpec",
    "ScrapeSignal",
    "ScrapeSpec",
    "Signal",
    "TrafficView",
    "build",
    "is_access_log",
    "is_prometheus",
]


class Signal(Protocol):
    """What the guard needs of a running signal adapter.

    An adapter may set a class attribute `blind_on_problem = False` when a fault of one
    color's source makes only that color's reading inconclusive (its own doing); without
    it, the guard reads nothing of the signal while `problem` is set (fail closed)."""

    name: str

    @property
    def problem(self) -> str | None:
        """Why the signal cannot read right now (an unreadable file, ...), else None."""

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None:
        """Follow the source until cancelled; report started once it is set up."""

    def reading(self, color: str, now: float) -> Reading | None:
        """The window of `color` at monotonic `now`, or None when there is none."""

    def status(self) -> dict[str, Any]:
        """The source's state and counters for `status --json` (no secret in it)."""


def is_access_log(signal: object) -> TypeGuard[AccessLogSignal]:
    """Whether `signal` is an access-log adapter, without loading that module to ask."""
    return _is_loaded(signal, "AccessLogSignal")


def is_prometheus(signal: object) -> TypeGuard[PrometheusSignal]:
    """Whether `signal` is a prometheus adapter, without loading that module (and httpx)
    to ask."""
    return _is_loaded(signal, "PrometheusSignal")


def _is_loaded(signal: object, name: str) -> bool:
    # Until an adapter's module is loaded no adapter of its kind can exist: then False.
    module = sys.modules.get(_LAZY[name])
    return module is not None and isinstance(signal, getattr(module, name))


class TrafficView:
    """An access-log signal as the `guardd_traffic_*` series read it (metrics thread)."""

    def __init__(self, signal: AccessLogSignal, readings: Mapping[Color, Reading]) -> None:
        self._signal = signal
        self._readings = readings

    @property
    def lines(self) -> Mapping[str, int]:
        """Lines read, by outcome (monotonic totals)."""
        return dict(self._signal.lines)

    @property
    def requests(self) -> Mapping[tuple[str, str], int]:
        """Requests by (color, status class) (monotonic totals)."""
        return dict(self._signal.requests)

    def error_ratio(self, color: str) -> float | None:
        """5xx over requests of `color` at the last tick; None with no request."""
        reading = self._readings.get(color)  # type: ignore[call-overload]
        return None if reading is None else reading.stats.get("error_ratio")


def build(
    name: str,
    table: Any,
    *,
    window_s: float,
    targets: Mapping[Color, Path] | None,
    probe_urls: Mapping[Color, list[str]],
    clock: Clock,
    instance: str = "",
) -> tuple[Signal, list[str]]:
    """The adapter for one validated `[signals.NAME]` table, and what it warns about.

    `instance` is the guard's instance name (a prometheus query's `{instance}`).

    Raises `ValueError("key: reason")` when the table cannot be built (no color has an
    address to attribute requests by).
    """
    if table.kind == "access_log":
        from guardd.signals.access_log import AccessLogSignal, AccessLogSpec  # noqa: PLC0415
        from guardd.upstream_addresses import color_addresses  # noqa: PLC0415

        addresses, problems = color_addresses(
            given=table.addresses, targets=targets, probe_urls=probe_urls
        )
        known: dict[str, tuple[str, ...]] = {
            c: tuple(sorted(addresses[c])) for c in COLORS if addresses[c]
        }
        if not known:
            raise ValueError(
                "addresses: no upstream address belongs to one color only"
                + (f" ({'; '.join(problems)})" if problems else "")
                + "; give `addresses`"
            )
        for color in COLORS:
            if not addresses[color]:
                problems.append(f"no address of {color} is known: its requests are unattributed")
        window = table.window or window_s
        spec = AccessLogSpec(
            source=table.source,
            addresses=known,
            fields=dict(table.fields),
            window_s=window,
            stale_after_s=table.stale_after or window,
            max_line_bytes=table.max_line_bytes,
            max_lines_per_s=table.max_lines_per_s,
            socket_group=table.socket_group,
        )
        return AccessLogSignal(name, spec, clock), problems
    if table.kind == "log_match":
        from guardd.signals.log_match import LogMatchSignal, LogMatchSpec  # noqa: PLC0415

        window = table.window or window_s
        match_spec = LogMatchSpec(
            paths={color: str(path) for color, path in table.paths.items()},
            patterns=tuple(table.patterns),
            window_s=window,
            stale_after_s=table.stale_after or window,
            max_line_bytes=table.max_line_bytes,
        )
        return LogMatchSignal(name, match_spec, clock), []
    if table.kind == "prometheus":
        from guardd.signals.prometheus import PrometheusSignal, PrometheusSpec  # noqa: PLC0415

        query = PrometheusSpec(
            url=table.url,
            query=table.query,
            instance=instance,
            every=table.every,
            timeout=table.timeout,
        )
        return PrometheusSignal(name, query, clock), []
    if table.kind == "scrape":
        from guardd.signals.scrape import ScrapeSignal, ScrapeSpec  # noqa: PLC0415

        scrape = ScrapeSpec(
            urls=dict(table.urls),
            ratio=(table.ratio.of, table.ratio.to) if table.ratio is not None else None,
            value=table.value,
            every_s=table.every,
            timeout_s=table.timeout,
            window_s=table.window or window_s,
            max_bytes=table.max_bytes,
        )
        return ScrapeSignal(name, scrape, clock), []
    raise ValueError(f"kind: {table.kind!r} is not a kind of signal")  # pragma: no cover
