"""A `prometheus` signal's history from Prometheus itself (`/api/v1/query_range`).

Prometheus keeps what it scraped for its retention (15 days by default): when it still
has the period, replay asks it for each color's query at the signal's `every`, and falls
back to the samples guardd recorded when it cannot (and says why).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Final

from guardd.core.types import COLORS
from guardd.observations import HistoryUnreadable, history_files
from guardd.replay._sources import RANGE_POINTS, SourceReport, parse_range
from guardd.signals import is_prometheus

#: Seconds one range request may take, and all of a signal's requests together.
REQUEST_S: Final = 10.0
SIGNAL_S: Final = 30.0


def span(
    directory: Path, guard: str, since: float | None, until: float | None
) -> tuple[float, float] | None:
    """The wall-time span to ask for: `since`..`until`, else the days the history covers."""
    import time  # noqa: PLC0415
    from datetime import UTC, datetime  # noqa: PLC0415

    lo, hi = since, until
    if lo is None or hi is None:
        try:
            files = [str(p) for p in history_files(directory, guard)]
        except HistoryUnreadable:
            return None
        if not files:
            return None
        days = sorted({Path(f).name[-19:-9] for f in files})
        first = datetime.strptime(days[0], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        last = datetime.strptime(days[-1], "%Y-%m-%d").replace(tzinfo=UTC).timestamp() + 86400
        lo = first if lo is None else lo
        hi = min(last, time.time()) if hi is None else hi
    return (lo, hi) if hi > lo else None


async def ranges(
    settings: Any,
    signals: dict[str, Any],
    directory: Path,
    since: float | None,
    until: float | None,
) -> tuple[dict[str, list[tuple[float, str, dict[str, Any]]]], dict[str, SourceReport]]:
    """Each prometheus signal's samples from Prometheus' history, where it has them.

    Returns the signals replayed that way (wall, color, payload in time order) and a report
    per prometheus signal saying which source was used and why.
    """
    wanted = {n: s for n, s in signals.items() if is_prometheus(s)}
    if not wanted:
        return {}, {}
    import anyio  # noqa: PLC0415
    import httpx  # noqa: PLC0415

    got: dict[str, list[tuple[float, str, dict[str, Any]]]] = {}
    reports: dict[str, SourceReport] = {}
    window = span(directory, settings.instance, since, until)
    for name, sig in wanted.items():
        report = reports[name] = SourceReport("prometheus")
        if window is None:
            report.replayed = "from recorded samples"
            report.why = "the history's period is unknown, so Prometheus was not asked"
            continue
        spec = sig.spec
        points: list[tuple[float, str, dict[str, Any]]] = []
        why: str | None = None
        try:
            with anyio.fail_after(SIGNAL_S):
                async with httpx.AsyncClient(
                    timeout=httpx.Timeout(REQUEST_S), trust_env=False, follow_redirects=False
                ) as client:
                    for color in COLORS:
                        points += await _color(client, spec, color, window)
        except TimeoutError:
            why = f"Prometheus did not answer within {SIGNAL_S:g}s"
        except (httpx.HTTPError, OSError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"[:200]
        if why is None and not points:
            why = "Prometheus has no sample of this period (retention, or a new query)"
        if why is not None:
            report.replayed = "from recorded samples"
            report.why = f"query_range not used: {why}"
            continue
        points.sort(key=lambda p: p[0])
        got[name] = points
        report.replayed = f"from Prometheus' own history (query_range, {len(points)} samples)"
    return got, reports


async def _color(
    client: Any, spec: Any, color: str, window: tuple[float, float]
) -> list[tuple[float, str, dict[str, Any]]]:
    lo, hi = window
    step = spec.every
    out: list[tuple[float, str, dict[str, Any]]] = []
    chunk = RANGE_POINTS * step
    start = lo
    while start < hi:
        end = min(hi, start + chunk)
        response = await client.get(
            spec.url.rstrip("/") + "/api/v1/query_range",
            params={
                "query": spec.query_for(color),
                "start": f"{start:.3f}",
                "end": f"{end:.3f}",
                "step": f"{step:g}",
            },
        )
        if response.status_code != 200 and not response.content.startswith(b"{"):
            raise ValueError(f"HTTP {response.status_code}")
        for at, data in parse_range(response.content):
            if math.isfinite(at):
                out.append((at, color, data))
        start = end + step
    return out
