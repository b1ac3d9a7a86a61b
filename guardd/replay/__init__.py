"""`guardd replay`: judge a config on the history guardd recorded, in simulated time.

The decisions are taken by the daemon's own guard (`guardd.guard.Guard`, its machine,
QoS keeper, budget and holds), fed the recorded probe rounds, front-door answers,
signal samples and switches (`guardd.observations`), the access logs and applications'
logs where they lie, and Prometheus' own history. Nothing is contacted but Prometheus,
nothing is switched, and nothing is written in `state.dir`.

Exit status: 0 when it ran, 1 when the history cannot be read (which file and why),
2 for an invalid config (the messages of `guardd check-config --offline`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["parse_time", "replay"]

_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)(d|h|m|s)$")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_time(text: str, now: float) -> float:
    """Seconds since the epoch of a `--from` / `--to` value.

    ISO 8601 (`2026-12-01T04:00:00Z`; a time without an offset is UTC), `now`, or a time
    ago: `2h`, `-2h`, `90m`, `7d`, `30s` all count back from `now`. ValueError otherwise.
    """
    text = text.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m is not None:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither ISO 8601 (2026-12-01T04:00:00Z) nor a time ago (2h, 7d)"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def replay(
    config: Path,
    *,
    since: str | None = None,
    until: str | None = None,
    overrides: Sequence[str] = (),
    compare: Path | None = None,
    as_json: bool = False,
) -> int:
    """Run `guardd replay`; print the report on stdout, problems on stderr; the exit status."""
    from guardd.cli import _load  # noqa: PLC0415 - the same messages as check-config

    now = time.time()
    try:
        t0 = parse_time(since, now) if since else None
        t1 = parse_time(until, now) if until else None
    except ValueError as e:
        print(f"guardd replay: --from/--to: {e}", file=sys.stderr)
        return 2
    settings = _load(config, None, overrides=overrides)
    if settings is None:
        return 2
    others = []
    if compare is not None:
        other = _load(compare, None)
        if other is None:
            return 2
        others.append(other)
    import anyio  # noqa: PLC0415

    from guardd.exceptions import ConfigError  # noqa: PLC0415
    from guardd.observations import HistoryUnreadable  # noqa: PLC0415

    try:
        doc = anyio.run(_replay_all, settings, others, t0, t1, list(overrides))
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    except HistoryUnreadable as e:
        print(f"guardd replay: cannot read the history: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        from guardd.replay._report import render  # noqa: PLC0415

        sys.stdout.write(render(doc))
    return 0


def _decided(event: dict[str, Any], journal: list[dict[str, Any]]) -> dict[str, Any]:
    """A journal incident placed at its decision: a rollback at its `rollback_started`
    (the switch and its verification took the time between)."""
    rid = event.get("rollback_id")
    if not rid:
        return event
    for e in journal:
        if e.get("event") == "rollback_started" and e.get("id") == rid:
            return {**event, "ts": e.get("ts")}
    return event


async def _replay_all(
    settings: Any, others: list[Any], since: float | None, until: float | None, sets: list[str]
) -> dict[str, Any]:
    from guardd.journal import Journal  # noqa: PLC0415
    from guardd.observations import HistoryUnreadable  # noqa: PLC0415
    from guardd.replay import _report  # noqa: PLC0415
    from guardd.replay._engine import Simulation  # noqa: PLC0415
    from guardd.replay._prometheus import ranges  # noqa: PLC0415

    directory = settings.state_dir / "observations"
    configs: list[dict[str, Any]] = []
    first: Simulation | None = None
    journal_path = settings.state_dir / "events.jsonl"
    journal_problem: str | None = None
    try:
        real = Journal(journal_path, settings.instance, time.time).read()
    except OSError as e:
        real = []
        journal_problem = (
            f"{journal_path}: cannot read the journal ({e.strerror or e}): incidents not matched"
        )
    for i, s in enumerate([settings, *others]):
        sim = Simulation(s, directory, since=since, until=until, guard=settings.instance)
        sim.build_signals()
        prom, prom_reports = await ranges(settings, sim.signals, directory, since, until)
        sim.prometheus = prom
        await sim.run()
        unopened = [p for p in sim.report.problems if ": cannot open: " in p]
        if sim.report.files and len(unopened) == len(sim.report.files):
            # Not one file of the history could be opened: nothing was replayed at all.
            where, _, why = unopened[0].partition(": cannot open: ")
            raise HistoryUnreadable(Path(where), f"cannot open: {why}")
        for name, rep in prom_reports.items():
            sim.sources[name] = rep
        first = first or sim
        decisions = [
            _report.decision(e)
            for e in sim.journal.events
            if e.get("event") in _report.DECISIONS and _report.within(e.get("ts"), since, until)
        ]
        lo = since if since is not None else first.first_ts
        hi = until if until is not None else first.last_ts
        incidents = [
            _decided(e, real)
            for e in real
            if e.get("event") in _report.INCIDENTS
            and e.get("guard", settings.instance) == settings.instance
            and _report.within(e.get("ts"), lo, hi)
        ]
        c = s.config
        tolerance = max(c.policy.window, 10 * c.probe.interval)
        configs.append(
            {
                "label": "A" if i == 0 else "B",
                "config": str(s.source),
                "set": sets if i == 0 else [],
                "decisions": decisions,
                "summary": _report.summary(decisions),
                "incidents": _report.detect(incidents, decisions, tolerance),
                "ticks": sim.ticks,
                "skipped_ticks": sim.skipped_ticks,
            }
        )
    assert first is not None  # noqa: S101
    history = first.report
    sources: dict[str, Any] = {}
    for name, src in first.sources.items():
        entry = src.to_json()
        sig = first.signals.get(name)
        lines = getattr(sig, "lines", None)
        entry["lines"] = dict(lines) if isinstance(lines, dict) else None
        entry["bad_samples"] = first.bad_samples.get(name, 0)
        sources[name] = entry
    for name, n in first.bad_samples.items():
        sources.setdefault(
            name,
            {
                "kind": "samples",
                "replayed": "from recorded samples",
                "why": None,
                "files": [],
                "problems": [],
                "outside_history": 0,
                "untimed_lines": 0,
                "lines": None,
            },
        )["bad_samples"] = n
    return {
        "format": 1,
        "history": {
            "dir": str(directory),
            "from": _report.stamp(since if since is not None else first.first_ts),
            "to": _report.stamp(until if until is not None else first.last_ts),
            "files": history.files,
            "runs": history.runs,
            "records": history.records,
            "skipped": dict(history.skipped),
            "problems": history.problems + ([journal_problem] if journal_problem else []),
            "missing_days": _report.missing_days(history.files),
            "gaps": [
                {"until": _report.stamp(ts), "seconds": round(gap, 3)} for ts, gap in first.gaps
            ],
            "clock_steps": [
                {"at": _report.stamp(ts), "step_s": round(step, 3)}
                for ts, step in history.clock_steps
            ],
        },
        "journal": str(journal_path),
        "sources": sources,
        "configs": configs,
    }
