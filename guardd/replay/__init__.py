"""`guardd replay`: judge a config on the history guardd recorded, in simulated time.

The decisions are taken by the daemon's own guard (`guardd.guard.Guard`, its machine,
QoS keeper, budget and holds), fed the recorded probe rounds, front-door answers,
signal samples and switches (`guardd.observations`), the access logs and applications'
logs where they lie, and Prometheus' own history. Nothing is contacted but Prometheus,
nothing is switched, and nothing is written in `state.dir`.

Exit status: 0 when it ran, 1 when the history cannot be read or holds no record in the
period (which file and why), 2 for an invalid config (the messages of
`guardd check-config --offline`) or a usage error (a bad or reversed `--from`/`--to`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guardd.replay import _report

__all__ = ["env_settings", "parse_time", "replay"]


class NoHistory(Exception):
    """Not one record could be read in the period: there is nothing to judge (exit 1)."""


def env_settings(environ: dict[str, str] | None = None) -> list[str]:
    """The `GUARDD_<SECTION>__<KEY>=value` settings the config takes from the environment,
    sorted; the value of a credential-like name, or of a known secret, shown as `***`."""
    from guardd.config import GuardConfig  # noqa: PLC0415
    from guardd.secrets import REDACTED, is_secret_name, redact  # noqa: PLC0415

    env = os.environ if environ is None else environ
    fields = set(GuardConfig.model_fields)
    out = []
    for name, value in sorted(env.items()):
        if not name.startswith("GUARDD_"):
            continue
        if name[len("GUARDD_") :].split("__")[0].lower() not in fields:
            continue  # GUARDD_CONFIG and the like name no setting
        shown = REDACTED if is_secret_name(name) or redact(value) != value else value
        out.append(f"{name}={shown}")
    return out


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
    config: Path | None,
    *,
    since: str | None = None,
    until: str | None = None,
    overrides: Sequence[str] = (),
    compare: Path | None = None,
    as_json: bool = False,
) -> int:
    """Run `guardd replay`; print the report on stdout, problems on stderr; the exit status."""
    from guardd import paths  # noqa: PLC0415
    from guardd.cli import _load  # noqa: PLC0415 - the same messages as check-config

    if config is None:
        # The lookup of `guardd run`: $GUARDD_CONFIG, else the default instance's file.
        env = os.environ.get("GUARDD_CONFIG")
        config = Path(env) if env else paths.config_file(None)
    now = time.time()
    try:
        t0 = parse_time(since, now) if since else None
        t1 = parse_time(until, now) if until else None
    except ValueError as e:
        print(f"guardd replay: --from/--to: {e} (usage error)", file=sys.stderr)
        return 2
    if t0 is not None and t1 is not None and t0 > t1:
        print(
            f"guardd replay: --from {since} ({_report.stamp(t0)}) is after "
            f"--to {until} ({_report.stamp(t1)}): the period is empty (usage error)",
            file=sys.stderr,
        )
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
        for hint in _hints(settings, e):
            print(f"  {hint}", file=sys.stderr)
        return 1
    except NoHistory as e:
        print(f"guardd replay: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        from guardd.replay._report import render  # noqa: PLC0415

        sys.stdout.write(render(doc))
    return 0


def _hints(settings: Any, e: Any) -> list[str]:
    """What to try when the history of `settings` cannot be read (`HistoryUnreadable` e)."""
    from guardd.observations import history_files  # noqa: PLC0415

    directory = settings.state_dir / "observations"
    if "no such directory" in e.why:
        where = (
            "the config sets no state.dir: this is guardd's default"
            if settings.config.state.dir is None
            else "this is the config's state.dir"
        )
        return [
            (
                f"{where}; to replay a copy of the state folder, point at it: "
                '--set state.dir="/path/to/the/copy"'
            )
        ]
    if "no observation file" in e.why:
        try:
            found = history_files(directory)
        except Exception:  # noqa: BLE001 - a hint only: the error above stands
            return []
        # `<instance>-YYYY-MM-DD.jsonl.gz`: the instance is what comes before the day.
        others = sorted({p.name[: -len("-YYYY-MM-DD.jsonl.gz")] for p in found})
        if others:
            return [
                (
                    f"it holds the files of instance(s) {', '.join(others)}, not of "
                    f"{settings.instance!r}: set `instance` in the config, or "
                    f'--set instance="{others[0]}"'
                )
            ]
    return []


def _notes(a: Any, b: Any, sets: list[str]) -> list[str]:
    """What the report says of the `--compare` config `b` beside the first config `a`."""
    notes = []
    if sets:
        notes.append("--set applies to A only")
    if b.instance != a.instance:
        notes.append(
            f"instance {b.instance!r} differs from A's {a.instance!r}: replayed over A's history"
        )
    if b.state_dir != a.state_dir:
        notes.append(
            f"state.dir {b.state_dir} differs from A's {a.state_dir}: replayed over A's history"
        )
    return notes


def _real_journal(path: Path, instance: str) -> tuple[list[dict[str, Any]], str | None, int]:
    """The live journal's events, why it could not be read (or None), and its lines that are
    no event."""
    from guardd.journal import Journal  # noqa: PLC0415

    journal = Journal(path, instance, time.time)
    try:
        if not path.is_file():
            # Journal.read() gives nothing for a missing file: that is not "no incident".
            raise FileNotFoundError(2, "no such file")
        return journal.read(), None, journal.skipped_lines
    except OSError as e:
        why = f"{path}: cannot read the journal ({e.strerror or e}): incidents not matched"
        return [], why, 0


def _no_history(sim: Any, directory: Path, since: float | None, until: float | None) -> str:
    """Why there is nothing to judge: the period, and each file with what reading it found."""
    rep = sim.report
    if since is not None or until is not None:
        head = (
            f"no history between {_report.stamp(since) or 'the beginning'} and "
            f"{_report.stamp(until) or 'the end'}"
        )
    else:
        head = "no history to judge"
    lines = [f"{head}: no readable record in {directory}"]
    lines.extend(f"  {p}" for p in rep.problems)
    lines.extend(f"  {n} line(s) skipped: {why}" for why, n in sorted(rep.skipped.items()))
    told = " ".join(rep.problems)
    where = " in the period" if since is not None or until is not None else ""
    lines.extend(f"  {f}: no record{where}" for f in rep.files if f not in told)
    return "\n".join(lines)


def _covered(at: object, sim: Any, tolerance: float) -> bool:
    """Whether the history holds records around the moment `at`: between its first and last
    record of the period, and not in a stretch where records were lost."""
    from guardd.journal import parse_rfc3339  # noqa: PLC0415

    try:
        t = parse_rfc3339(str(at))
    except ValueError:
        return False
    if sim.first_ts is None or sim.last_ts is None:
        return False
    if not sim.first_ts - tolerance <= t <= sim.last_ts + tolerance:
        return False
    return not any(after - gap < t < after for after, gap in sim.gaps)


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
    from guardd.observations import HistoryUnreadable  # noqa: PLC0415
    from guardd.replay._engine import Simulation  # noqa: PLC0415
    from guardd.replay._prometheus import ranges  # noqa: PLC0415

    directory = settings.state_dir / "observations"
    env = env_settings()
    configs: list[dict[str, Any]] = []
    first: Simulation | None = None
    journal_path = settings.state_dir / "events.jsonl"
    real, journal_problem, journal_skipped = _real_journal(journal_path, settings.instance)
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
        if i == 0 and sim.first_ts is None:
            raise NoHistory(_no_history(sim, directory, since, until))
        if i == 0 and sim.ticks == 0:
            # Records, but never a probe round of each color: the guard never decided, so
            # "no decision" would be a verdict on nothing.
            raise NoHistory(
                f"no history to judge: the records in {directory} never hold a probe round "
                "of both colors, so the guard never took a decision tick"
            )
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
        found = _report.detect(incidents, decisions, tolerance)
        for inc in found:
            inc["covered"] = _covered(inc.get("at"), first, tolerance)
        configs.append(
            {
                "label": "A" if i == 0 else "B",
                "config": str(s.source),
                "set": sets if i == 0 else [],
                "env": env,
                "notes": [] if i == 0 else _notes(settings, s, sets),
                "decisions": decisions,
                "summary": _report.summary(decisions),
                "incidents": found,
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
            "records": history.records - first.warmup_records,
            "warmup_records": first.warmup_records,
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
        "journal_problem": journal_problem,
        "journal_skipped": journal_skipped,
        "sources": sources,
        "configs": configs,
    }
