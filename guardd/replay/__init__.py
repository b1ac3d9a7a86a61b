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

import contextlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from guardd.replay import _report
from guardd.secrets import shown_setting

if TYPE_CHECKING:
    from guardd.config import GuardConfig
    from guardd.replay._engine import Simulation

__all__ = ["env_settings", "parse_time", "replay"]


class NoHistory(Exception):
    """Not one record could be read in the period: there is nothing to judge (exit 1)."""


class Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the replay (`signum`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop the replay where it is, by raising `Signalled` there.

    asyncio's own SIGINT handler only cancels the main task at its next await, which a
    replay (a million records in one pass, a gzip bomb being skipped) may not reach for
    minutes; SIGTERM's default would end the process without removing the temporary
    folder. Raised between two bytecodes, the exception unwinds through every `with`.
    """

    def stop(signum: int, _frame: object) -> None:
        raise Signalled(signum)

    kept = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)


def env_settings(environ: dict[str, str] | None = None) -> list[str]:
    """The `GUARDD_<SECTION>__<KEY>=value` settings the config takes from the environment
    (`guardd.config.setting_variables`: in any case, as pydantic-settings reads them),
    sorted, each value as `guardd.secrets.shown_setting` shows it."""
    from guardd.config import setting_variables  # noqa: PLC0415

    env = os.environ if environ is None else environ
    return [f"{name}={shown_setting(key, env[name])}" for name, key in setting_variables(env)]


def shown_set(setting: str) -> str:
    """A `--set KEY=VALUE` as the report shows it: the value as `shown_setting` shows it
    (and an argument without its `=` as a value)."""
    key, eq, value = setting.partition("=")
    return f"{key}{eq}{shown_setting(key.strip(), value)}" if eq else shown_setting("", setting)


_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)(d|h|m|s)$")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_YEAR_PAST_9999 = re.compile(r"^\+?\d{5,}-\d{2}-\d{2}")


def parse_time(text: str, now: float) -> float:
    """Seconds since the epoch of a `--from` / `--to` value.

    ISO 8601 (`2026-12-01T04:00:00Z`; a time without an offset is UTC), `now`, or a time
    ago: `2h`, `-2h`, `90m`, `7d`, `30s` all count back from `now`. ValueError otherwise.
    """
    text = text.strip()
    if text == "now":
        return now
    from guardd.journal import is_stamp  # noqa: PLC0415

    m = _RELATIVE.match(text)
    if m is not None:
        ts = now - float(m.group(1)) * _UNIT[m.group(2)]
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            if _YEAR_PAST_9999.match(text):  # (datetime's own range ends there too)
                raise ValueError(f"{text!r} is not a time from 1970 to 9999") from None
            raise ValueError(
                f"{text!r} is neither ISO 8601 (2026-12-01T04:00:00Z) nor a time ago (2h, 7d)"
            ) from None
        try:
            ts = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
        except (OverflowError, ValueError):  # (year 1 with a positive offset, and the like)
            ts = math.nan
    if not is_stamp(ts):
        raise ValueError(f"{text!r} is not a time from 1970 to 9999")
    return ts


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
        # (`--from=` given empty is a usage error, never "no --from".)
        t0 = parse_time(since, now) if since is not None else None
        t1 = parse_time(until, now) if until is not None else None
    except ValueError as e:
        print(f"guardd replay: --from/--to: {e} (usage error)", file=sys.stderr)
        return 2
    if t0 is not None and t1 is not None and t0 >= t1:
        print(
            f"guardd replay: --from {since} ({_report.stamp(t0)}) is "
            f"{'after' if t0 > t1 else 'the same time as'} "
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
    # As check-config says them: a misspelt GUARDD_ variable is ignored, and a what-if
    # that silently did not apply is a wrong answer. (Said once when both configs have it.)
    for warning in dict.fromkeys(str(w) for c in (settings, *others) for w in c.warnings):
        print(warning, file=sys.stderr)
    import anyio  # noqa: PLC0415

    from guardd.exceptions import ConfigError  # noqa: PLC0415
    from guardd.observations import HistoryUnreadable  # noqa: PLC0415

    # `tempfile` learns its folder is writable by writing a file there and removing it: a
    # signal raised between the two would leave that file behind. Learnt here, before.
    tempfile.gettempdir()
    try:
        with _stopped_by_signals():
            doc = anyio.run(_replay_all, settings, others, t0, t1, list(overrides))
    except Signalled as e:
        name = signal.Signals(e.signum).name
        print(f"guardd replay: stopped by {name}; nothing was reported", file=sys.stderr)
        return 128 + e.signum
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


def _cadence_note(
    interval: float, fast: float, recorded: float | None, fed: int, thinned: int
) -> list[str]:
    """A config probing faster than the history was recorded sees rounds only as often as
    they were recorded: its counts of rounds and its staleness are the history's, said. One
    probing slower is fed only the rounds it would have made (`fed` of `fed + thinned`)."""
    notes = []
    if thinned:
        notes.append(
            f"probe rounds as this config would have made them (probe.interval {interval:g}s, "
            f"fast_interval {fast:g}s while confirming a failure): {fed:,} of the "
            f"{fed + thinned:,} recorded probes replayed, each the recorded round nearest its "
            "time; the others came sooner than it would have probed then (the live guard "
            "probing faster, or confirming a failure this config was not)"
        )
    if recorded is None or interval >= recorded * 0.99:
        return notes
    note = (
        f"probe.interval {interval:g}s is faster than the history's {recorded:g}s: probe "
        "rounds come only as often as they were recorded, so consecutive failures take "
        f"{recorded:g}s each, and a color is judged stale on the history's cadence"
    )
    return [*notes, note]


class _LiveJournal(NamedTuple):
    """The live journal as replay reads it."""

    events: list[dict[str, Any]]
    #: Why it could not be read (None: it was).
    problem: str | None
    #: Its lines that are no event (or no incident as guardd writes it).
    skipped: int
    #: Its events found again after the first, by their `id` (a line written twice), left out.
    twice: int
    #: Its events stamped more than `_JOURNAL_BACK_S` before one written before them (a
    #: clock stepped back, the file edited or concatenated): taken at their own time, said.
    back: int = 0


#: How far an event may be stamped before the events written before it unremarked: a
#: clock slewed or stepped by NTP by a little (the journal is written in order, by one
#: process).
_JOURNAL_BACK_S: Final = 30.0


def _beyond_period(
    unmatched: list[dict[str, Any]],
    real: list[dict[str, Any]],
    *,
    instance: str,
    since: float | None,
    until: float | None,
    c: Any,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """`unmatched` without the decisions within the match window of a live incident of
    their color outside `--from` .. `--to` (the live guard did act then, after the period
    ends or before it begins); and those, by their time, each with that incident's."""
    if since is None and until is None:
        return unmatched, {}
    tolerance = _match_window(c)
    outside = [
        (t, inc.get("from"), inc.get("ts"))
        for inc in _journal_incidents(real, instance)
        if not _report.within(inc.get("ts"), since, until)
        and (t := _report.seconds(inc.get("ts"))) is not None
    ]
    beyond: dict[str, str] = {}
    for d in unmatched:
        at = _report.seconds(d["at"])
        near = [
            (abs(t - at), str(ts))
            for t, color, ts in outside
            if at is not None and color == d["color"] and abs(t - at) <= tolerance
        ]
        if near:
            beyond[d["at"]] = min(near)[1]
    return [d for d in unmatched if d["at"] not in beyond], beyond


def _beyond_note(beyond: dict[str, str]) -> list[str]:
    """The note on decisions near an end of the period that detect a live incident past it."""
    if not beyond:
        return []
    shown = ", ".join(f"{at} (the live incident at {ts})" for at, ts in list(beyond.items())[:5])
    more = f" and {len(beyond) - 5} more" if len(beyond) > 5 else ""
    note = (
        f"{len(beyond)} decision(s) near an end of the period are within the match window of "
        f"a live incident outside it, never 'where the live guard did not act': {shown}{more}"
    )
    return [note]


def _moves_note(moves: Sequence[tuple[float, str, str]]) -> list[str]:
    """The note on an operator's moves the replay did not make: the replayed config
    already served their color (it held, or rolled back where the live guard did not)."""
    if not moves:
        return []
    shown = ", ".join(f"{kind} to {color} at {_report.stamp(ts)}" for ts, kind, color in moves[:5])
    more = f" and {len(moves) - 5} more" if len(moves) > 5 else ""
    note = (
        f"{len(moves)} operator move(s) made no move here, this config already serving "
        f"their color: {shown}{more}"
    )
    return [note]


def _sources_json(sim: Simulation) -> dict[str, Any]:
    """What `sim` read of each signal's source (the contract's `sources`)."""
    from guardd.replay._sources import SourceReport  # noqa: PLC0415

    sources: dict[str, Any] = {}
    for name, src in sim.sources.items():
        entry = src.to_json()
        lines = getattr(sim.signals.get(name), "lines", None)
        entry["lines"] = dict(lines) if isinstance(lines, dict) else None
        entry["bad_samples"] = sim.bad_samples.get(name, 0)
        sources[name] = entry
    for name, n in sim.bad_samples.items():
        samples = SourceReport("samples", replayed="from recorded samples")
        sources.setdefault(name, {**samples.to_json(), "lines": None})["bad_samples"] = n
    return sources


def _real_journal(path: Path, instance: str) -> _LiveJournal:
    """The live journal's events (each once), as `_LiveJournal`."""
    from guardd.fsutil import not_regular  # noqa: PLC0415
    from guardd.journal import Journal  # noqa: PLC0415

    journal = Journal(path, instance, time.time)
    try:
        # Journal.read() gives nothing for a missing file, which is not "no incident"; a
        # FIFO there would never end: both said, neither read.
        why = not_regular(path.stat().st_mode)
        if why is None:
            events = journal.read()
            kept = [e for e in events if _readable_incident(e)]
            # Every event has its own id: one found again is the same event (a write
            # retried after it reached the disk, a file concatenated), not a second one.
            seen: set[str] = set()
            once = []
            latest, back = -math.inf, 0
            for e in kept:
                key = e.get("id")
                if isinstance(key, str):
                    if key in seen:
                        continue
                    seen.add(key)
                once.append(e)
                if (ts := _report.seconds(e.get("ts"))) is not None:
                    back += ts < latest - _JOURNAL_BACK_S
                    latest = max(latest, ts)
            skipped = journal.skipped_lines + len(events) - len(kept)
            return _LiveJournal(once, None, skipped, len(kept) - len(once), back)
    except OSError as e:
        why = e.strerror or str(e)
    return _LiveJournal([], f"{path}: cannot read the journal ({why}): incidents not matched", 0, 0)


def _operator_actions(real: list[dict[str, Any]], instance: str) -> list[tuple[float, Any]]:
    """The live journal's `paused` and `resumed` events of `instance`, at their time."""
    from guardd.timestamps import parse_rfc3339  # noqa: PLC0415

    out = []
    for e in real:
        if e.get("event") in ("paused", "resumed") and e.get("guard", instance) == instance:
            try:
                out.append((parse_rfc3339(str(e.get("ts"))), e))
            except ValueError:
                continue
    return out


def _with_unjournaled(
    real: list[dict[str, Any]], sim: Simulation, instance: str, lo: float | None, hi: float | None
) -> tuple[list[dict[str, Any]], int]:
    """The journal's events with the live rollbacks the observations record and it lacks
    (no rollback of the same colors within a minute of it: a journal cut short or edited),
    each as the incident the journal would hold (`"origin": "observations"`); how many.

    Without them, the replay's rollback there read "where the live guard did not act"."""
    from guardd.timestamps import rfc3339  # noqa: PLC0415

    # (A `rollback_started` alone is no incident the report matches: its end was cut off
    # the journal, and the switch the observations hold is taken in its place.)
    journaled = [
        (t, e.get("from"), e.get("to"))
        for e in real
        if e.get("event") in _ENDS
        and e.get("guard", instance) == instance
        and (t := _report.seconds(e.get("ts"))) is not None
    ]
    added = [
        {
            "event": "rollback_completed",
            "ts": rfc3339(ts),
            "guard": instance,
            "from": source,
            "to": target,
            "reason": reason,
            "by": "guardd",
            "origin": "observations",
            # (The rule and severity as the guard's reason names them: `P0 rule: ...`.)
            **_named_rule(reason, source),
            # (Placed at its decision when the journal kept that: `_decided`.)
            **_started(real, instance, ts, source, target),
        }
        for ts, source, target, reason in sim.live_rollbacks
        if (lo is None or ts >= lo)
        and (hi is None or ts <= hi)
        and not any(
            abs(t - ts) <= _UNJOURNALED_S and (s, g) == (source, target) for t, s, g in journaled
        )
    ]
    return [*real, *added], len(added)


def _started(
    real: list[dict[str, Any]], instance: str, ts: float, source: object, target: object
) -> dict[str, Any]:
    """`{"rollback_id": ID}` of the journal's `rollback_started` of guard `instance` from
    `source` to `target` within `_UNJOURNALED_S` before the switch at `ts` whose end the
    journal lacks (the line cut off or edited out), the latest; else nothing."""
    ended = {e.get("rollback_id") for e in real if e.get("event") in _ENDS}
    ids = [
        e.get("id")
        for e in real
        if e.get("event") == "rollback_started"
        and e.get("guard", instance) == instance
        and (e.get("from"), e.get("to")) == (source, target)
        and e.get("id") not in ended
        and (t := _report.seconds(e.get("ts"))) is not None
        and ts - _UNJOURNALED_S <= t <= ts
    ]
    return {"rollback_id": ids[-1]} if ids and isinstance(ids[-1], str) else {}


_ENDS: Final = ("rollback_completed", "rollback_failed")


def _named_rule(reason: object, color: object) -> dict[str, Any]:
    """The severity and rule a guard's rollback reason (`P0 consecutive_failures: 3 >= 3
    on green; ...`) names, as a journal incident holds them; nothing for another text."""
    m = _REASON.match(reason) if isinstance(reason, str) else None
    if m is None:
        return {}
    return {"severity": m["severity"], "evidence": {"rule": m["rule"], "color": color}}


_REASON: Final = re.compile(r"(?P<severity>P[0-2]) (?P<rule>[^\s:]+):")
#: How near a journaled rollback must be to a recorded switch by guardd to be its own (s).
_UNJOURNALED_S: Final = 60.0


def _readable_incident(event: dict[str, Any]) -> bool:
    """Whether a journal event is no incident, or one as guardd writes it: a time, and a
    color (or none) where it names one. Others are counted with the lines that are no event,
    never listed as an incident of a color no guard has."""
    from guardd.timestamps import parse_rfc3339  # noqa: PLC0415

    if event.get("event") not in _report.INCIDENTS:
        return True
    try:
        parse_rfc3339(str(event.get("ts")))
    except ValueError:
        return False
    return all(event.get(k) in (None, "blue", "green") for k in ("from", "to"))


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


def _secs(seconds: float) -> str:
    """`42.5s`, `2h`, `1m15s`; a time stamped in the year 9999 is `more than a year`."""
    from guardd.config import MAX_DURATION_S  # noqa: PLC0415
    from guardd.durations import format_duration  # noqa: PLC0415

    if seconds > MAX_DURATION_S:
        return "more than a year"
    return format_duration(round(seconds, 1)) if seconds >= 60 else f"{round(seconds, 1):g}s"


def _uncovered(
    at: object, sim: Any, before: float, after: float, need: str
) -> tuple[str | None, bool]:
    """Why the history does not hold what a decision at the moment `at` was taken on, or
    None when it does: records from `before` seconds ahead of it (`need`: the failures its
    quickest rule counts) until `after` seconds short of it (the probe round it followed),
    and no stretch where records were lost in between. A history that ends, or begins,
    within the failure is no verdict on it. The flag: whether no decision can be credited
    to it either (records lost around it, or the history begins after it: the config never
    saw the failure begin)."""
    from guardd.timestamps import parse_rfc3339, rfc3339  # noqa: PLC0415

    try:
        t = parse_rfc3339(str(at))
    except ValueError:
        return "its time cannot be read", False
    if sim.first_ts is None or sim.last_ts is None:
        return "no record", False
    # (The warm-up before `--from` was replayed too: the config saw what began in it.)
    first_ts = sim.first_ts if sim.earliest_ts is None else min(sim.first_ts, sim.earliest_ts)
    if t > sim.last_ts + after:
        return f"the history ends {_secs(t - sim.last_ts)} before it", False
    if first_ts > t - before:
        if first_ts <= t:
            begins = f"the history begins {_secs(t - first_ts)} before it"
        else:
            begins = f"the history begins {_secs(first_ts - t)} after it"
        return f"{begins}, and {need} take {_secs(before)}", first_ts > t
    for end, gap in sim.gaps:
        if t - before < end and end - gap < t:
            return f"records lost for {_secs(gap)} before {rfc3339(end)}", True
    for stopped, started in sim.downs:
        # (A wall clock stepped back after a run: its times before the stop were lived by
        # the run, and the incident may be of then.)
        if stopped < t < started and not sim.lived_at(t):
            # The live guard journaled nothing while it was stopped: the journal's clock
            # and the history's disagree (one of them stepped or edited).
            until = "the end of the history" if math.isinf(started) else rfc3339(started)
            return f"guardd was stopped then, from {rfc3339(stopped)} to {until}", True
    return None, False


def _later_than_live(inc: dict[str, Any], c: Any, recorded: float | None) -> str | None:
    """Why a detection later than the live rollback is an upper bound, or None.

    From its rollback on, the live guard probed the color it rolled away from as a standby,
    every `probe.interval`; a config still serving it would have confirmed its failures at
    `probe.fast_interval`. Those rounds are not in the history: the failures it still
    needed took the recorded interval each."""
    from guardd.core.rules import BUILTIN_NAMES  # noqa: PLC0415

    delay = inc.get("delay_s")
    interval = recorded or c.probe.interval
    traffic = [
        _rule_name(rule)
        for rule in c.rules
        if getattr(c.signals.get(rule.signal), "kind", None) == "access_log"
    ]
    if (
        inc.get("event") == "rollback_completed"
        and delay is None
        and inc.get("covered") is True
        and inc.get("served") in (None, inc.get("color"))
        and traffic
    ):
        # Not firing on the requests before the live rollback is a measurement; after it
        # nginx sent the color none, so whether a traffic rule would have fired on what
        # the color kept failing is unknown (a probe rule went on judging standby rounds).
        return (
            f"until the live rollback only: from it on {inc.get('color')} got no requests, "
            f"so this config's traffic rule(s) ({', '.join(traffic)}) judged none of what it "
            "would have served had it kept serving"
        )
    if (
        inc.get("event") == "rollback_completed"
        and isinstance(delay, int | float)
        and delay > _EMPTIED_S
        and _traffic_rule(c, inc.get("detected_rule"))
    ):
        # From the live rollback on, nginx sent the color no request: its window here
        # lost its older requests with none coming in their place.
        return (
            f"not a measurement: from the live rollback on {inc.get('color')} got no "
            "requests, so this traffic rule judged a window of fewer and older requests "
            "than it would have held had the color kept serving"
        )
    if (
        inc.get("event") != "rollback_completed"
        # Only a rule on the probes waits for probe rounds (a signal's rule reads its own).
        or inc.get("detected_rule") not in BUILTIN_NAMES
        or not isinstance(delay, int | float)
        or delay <= 0
        or c.probe.confirm_interval >= interval * 0.99
    ):
        return None
    return (
        f"an upper bound: after the live rollback, {inc.get('color')} was recorded every "
        f"{interval:g}s, not at this config's fast_interval {c.probe.confirm_interval:g}s"
    )


def _log_gap(at: object, name: object, c: Any, sim: Simulation) -> str | None:
    """Why the log the rule `name` of config `c` reads (`access_log`, `log_match`) holds
    not all it judged at the moment `at` (the lines of its window before it: the files
    begin after it, rotated away; end before it; leave a hole around it), or None: it may,
    or the rule reads no log. A decision on it was taken on what was left (a caveat); an
    incident the live guard decided on it could not be seen by the config's rules: not
    covered, never "not detected"."""
    t = _report.seconds(at)
    rule = _rule_named(c, name)
    report = sim.sources.get(rule.signal) if rule is not None else None
    if report is None or t is None or rule is None:
        return None
    window = getattr(c.signals.get(rule.signal), "window", None) or c.policy.window
    why = report.covers(t, window)
    return None if why is None else f"signal {rule.signal}: {why}"


def _caveat(d: dict[str, Any], c: Any, sim: Simulation) -> str | None:
    """What decision `d` of config `c` was taken without: a rule on a log whose window
    lost lines decided on what was left, and so did a guard window judged over real
    traffic it lost lines of; None when neither."""
    if d["event"] == "qos_released":
        return _guard_window_gap(d["at"], c, sim)
    return _log_gap(d["at"], d["rule"], c, sim) if d["rule"] else None


def _guard_window_gap(at: object, c: Any, sim: Simulation) -> str | None:
    """Why the real traffic a QoS guard window ending at `at` judged (the active color's
    5xx ratio, from each `access_log` signal of config `c`) lacks lines of its window, or
    None. Released on what was left: a caveat, as `_log_gap` gives a rule's decision."""
    t = _report.seconds(at)
    if t is None:
        return None
    for name, sig in sorted(c.signals.items()):
        report = sim.sources.get(name)
        if getattr(sig, "kind", None) != "access_log" or report is None:
            continue
        why = report.covers(t, c.qos.window)
        if why is not None:
            return f"signal {name}: {why}"
    return None


def _traffic_rule(c: Any, name: object) -> bool:
    """Whether the `[[rules]]` row `name` of config `c` reads an `access_log` signal."""
    rule = _rule_named(c, name)
    signal = c.signals.get(rule.signal) if rule is not None else None
    return getattr(signal, "kind", None) == "access_log"


def _rule_named(c: Any, name: object) -> Any:
    """Config `c`'s `[[rules]]` row named `name` (a row without a name is `signal.stat`, as
    the guard names it in its evidence), or None."""
    return next((rule for rule in c.rules if _rule_name(rule) == name), None)


def _rule_name(rule: Any) -> str:
    """A `[[rules]]` row's name: its own, or `signal.stat` as the guard names it."""
    return getattr(rule, "name", None) or f"{rule.signal}.{rule.stat}"


def _journal_incidents(real: list[dict[str, Any]], instance: str) -> list[dict[str, Any]]:
    """The incidents of guard `instance` in the journal `real`, each placed at its
    decision (`_decided`)."""
    return [
        _decided(e, real)
        for e in real
        if e.get("event") in _report.INCIDENTS and e.get("guard", instance) == instance
    ]


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


def _incidents(
    c: Any,
    real: list[dict[str, Any]],
    decisions: list[dict[str, Any]],
    first: Any,
    *,
    since: float | None,
    until: float | None,
    instance: str,
    own: Any,
    warmup: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The real journal's incidents of the period, each with when config `c` detected it
    (`_report.detect`, among `decisions` and those of the `warmup` before `--from`: an
    incident just after it may have been detected just before), whether the history covers
    it (`_covered`; its logs as `c`'s own replay `own` read them) and the color `c` served
    then (`served`); and the decisions that detect no incident (`_report.unmatched`)."""
    tolerance = _match_window(c)
    lo = since if since is not None else first.first_ts
    # Without `--to`, every incident after the history too: a history that ends before
    # the journal does (its last records lost, recording stopped, a copy cut short)
    # must show what it does not cover, never look complete.
    # An incident is in the period by the time it is placed at (a rollback's decision),
    # as it is shown and matched: never dropped for its switch ending after `--to`.
    incidents = [
        inc
        for inc in _journal_incidents(real, instance)
        if _report.within(inc.get("ts"), lo, until)
    ]
    # In time order, as everything the report lists, whatever order the journal holds them
    # in (reversed, edited: `journal_out_of_order`).
    incidents.sort(key=lambda e: _report.seconds(e.get("ts")) or 0.0)
    found = _report.detect(incidents, warmup + decisions, tolerance)
    # (Before a detection in a hole of the records is unsaid below: it is still the
    # decision about that incident, never one the live guard did not take.)
    unmatched = _report.unmatched(found, decisions)
    # The failures the quickest rule counts (`consecutive_failures` rounds), and the
    # probe round a decision follows (an interval, a second's slack for its tick).
    before = c.policy.consecutive_failures * c.probe.interval
    after = max(1.0, 2 * c.probe.interval)
    need = f"consecutive_failures = {c.policy.consecutive_failures} at {c.probe.interval:g}s"
    for inc in found:
        why, lost = _uncovered(inc.get("at"), first, before, after, need)
        if why is None:
            why = _log_gap(inc.get("at"), inc.get("rule"), c, own)
            # A decision on the same log judged the window it lacks (no detection time);
            # one the config took on another signal still detects it.
            judged, detected = (
                _rule_named(c, inc.get("rule")),
                _rule_named(c, inc.get("detected_rule")),
            )
            lost = judged is not None and detected is not None and detected.signal == judged.signal
        if why is not None and inc["detected_at"] is not None and not lost:
            # Too little history around it to say it would be missed, but the config
            # did decide on it (another rule, quicker than the one counted): detected.
            why = None
        inc["covered"], inc["not_covered"] = why is None, why
        if why is not None:
            # A decision the config took after a hole in the records is no detection
            # time of an incident inside it: it never saw the failure begin.
            inc.update(detected_at=None, detected_by=None, delay_s=None)
        # (A config that served the other color then had no failure of this one to act
        # on: "not detected" alone reads as a miss.)
        t = _report.seconds(inc.get("at"))
        inc["served"] = own.switcher.served_at(t) if t is not None else None
        inc["bound"] = _later_than_live(inc, c, first.recorded_interval)
        inc["match_window_s"] = tolerance
    return found, unmatched


def _decisions_between(
    events: list[dict[str, Any]], lo: float | None, hi: float | None
) -> list[dict[str, Any]]:
    """The decisions among the replayed guard's journal `events` from `lo` to `hi`
    (seconds; None: no bound), as the report lists them (`_report.decision`)."""
    return [
        _report.decision(e)
        for e in events
        if e.get("event") in _report.DECISIONS and _report.within(e.get("ts"), lo, hi)
    ]


def _warmup_decisions(
    events: list[dict[str, Any]], since: float | None, until: float | None, window: float
) -> list[dict[str, Any]]:
    """The warm-up's last decisions, `window` seconds before `--from` (`since`; none
    without it): not of the period, but the detection of an incident just after it."""
    if since is None:
        return []
    return [
        d
        for d in _decisions_between(events, since - window, since)
        if not _report.within(d["at"], since, until)
    ]


def _journal_span(
    real: list[dict[str, Any]], sim: Simulation, instance: str
) -> tuple[tuple[float, float] | None, str | None]:
    """The stretch the live journal covers, when it holds less than the history, and why
    (else None, None).

    guardd journals `started` as each run begins, beside its `start` record: a run of the
    history with no `started` near it, before the journal's first event or after its last,
    is one the journal does not hold (cut short, rotated away, another host's). Incidents
    and the live guard's decisions outside what it holds are unknown, never "none".
    """
    times: list[float] = []
    started: list[float] = []
    for e in real:
        t = _report.seconds(e.get("ts"))
        if e.get("guard", instance) != instance or t is None:
            continue
        times.append(t)
        if e.get("event") == "started":
            started.append(t)
    missing = [t for t in sim.run_starts if not any(abs(t - u) <= _STARTED_NEAR_S for u in started)]
    if not times or not missing:
        return None, None
    lo, hi = min(times), max(times)
    before = [t for t in missing if t < lo]
    after = [t for t in missing if t > hi]
    if not before and not after:
        return None, None
    said = []
    if before:
        said.append(f"begins at {_report.stamp(lo)}, after the run(s) begun at {_runs(before)}")
    if after:
        said.append(f"ends at {_report.stamp(hi)}, before the run(s) begun at {_runs(after)}")
    why = (
        "the journal "
        + " and ".join(said)
        + " (no `started` for them: cut short, rotated away?): incidents and the live "
        "guard's decisions outside it are unknown"
    )
    return (lo if before else -math.inf, hi if after else math.inf), why


def _runs(starts: list[float]) -> str:
    """The first few of `starts`, as RFC 3339 times."""
    shown = ", ".join(str(_report.stamp(t)) for t in starts[:3])
    return shown + (f" and {len(starts) - 3} more" if len(starts) > 3 else "")


#: A traffic rule's detection this long (seconds) after the live rollback was made on a
#: window the rollback emptied (within it: the same requests the live guard judged).
_EMPTIED_S: Final = 1.0
#: How far a run's `start` record and the journal's `started` may be apart (seconds): the
#: daemon writes both as it starts, the journal after its recovery.
_STARTED_NEAR_S: Final = 30.0


def _match_window(c: GuardConfig) -> float:
    """How far apart (seconds) an incident and the decision detecting it may be."""
    return max(c.policy.window, 10 * c.probe.interval)


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
    real, journal_problem, journal_skipped, journal_twice, journal_back = _real_journal(
        journal_path, settings.instance
    )
    journal_notes: list[str] = []
    for i, s in enumerate([settings, *others]):
        sim = Simulation(s, directory, since=since, until=until, guard=settings.instance)
        sim.operator = _operator_actions(real, settings.instance)
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
        for name, rep in sim.sources.items():
            was = rep.replayed or ""
            if was.startswith("from recorded samples") and not sim.samples[name]:
                # A signal added to the config after the history was recorded: nothing of it
                # was replayed, and its rules had no data at all (never "healthy").
                rep.replayed = None
                rep.why = (
                    f"{was}, but the history holds none: its rules were inconclusive throughout"
                )
        if first is None and journal_problem is None:
            real, unjournaled = _with_unjournaled(real, sim, settings.instance, since, until)
            if unjournaled:
                journal_notes.append(
                    f"the observations hold {unjournaled} rollback(s) by guardd the journal "
                    "does not (it is cut short or edited): taken from the observations"
                )
        first = first or sim
        decisions = _decisions_between(sim.journal.events, since, until)
        warmup = _warmup_decisions(sim.journal.events, since, until, _match_window(s.config))
        for d in decisions:
            d["caveat"] = _caveat(d, s.config, sim)
        found, unmatched = _incidents(
            s.config,
            real,
            decisions,
            first,
            since=since,
            until=until,
            instance=settings.instance,
            own=sim,
            warmup=warmup,
        )
        # A decision near an end of the period may detect a live incident beyond it.
        unmatched, beyond = _beyond_period(
            unmatched, real, instance=settings.instance, since=since, until=until, c=s.config
        )
        if i == 0:
            journaled = [e for e in real if e.get("origin") != "observations"]
            span, journal_gap = _journal_span(journaled, first, settings.instance)
        if span is not None:
            # Outside what the journal holds, whether the live guard acted is unknown; and
            # within a match window of its ends too (the incident may lie past them).
            lo, hi = span[0] + _match_window(s.config), span[1] - _match_window(s.config)
            unmatched = [d for d in unmatched if lo <= (_report.seconds(d["at"]) or lo) <= hi]
        configs.append(
            {
                "label": "A" if i == 0 else "B",
                "config": str(s.source),
                "set": [shown_set(x) for x in sets] if i == 0 else [],
                "env": env,
                "notes": ([] if i == 0 else _notes(settings, s, sets))
                + _cadence_note(
                    s.config.probe.interval,
                    s.config.probe.confirm_interval,
                    sim.recorded_interval,
                    sim.probes_fed,
                    sim.thinned,
                )
                + _moves_note(sim.moves_without_effect)
                + _beyond_note(beyond),
                "decisions": decisions,
                "summary": _report.summary(decisions),
                "incidents": found,
                # Where this config acted and the live guard did not (no incident credited).
                "unmatched": [] if journal_problem else unmatched,
                "match_window_s": _match_window(s.config),
                "ticks": sim.ticks,
                "skipped_ticks": sim.skipped_ticks,
                # Each config reads the logs with its own signals (other addresses, another
                # format, a signal more): what it made of them is its own.
                "sources": _sources_json(sim),
            }
        )
    assert first is not None  # noqa: S101
    history = first.report
    if journal_problem and first.runs_without_operator:
        journal_problem += (
            f"; {first.runs_without_operator} run(s) did not record the operator's pauses "
            "and resumes, which only the journal holds: those are not replayed"
        )
    return {
        "format": 1,
        "history": {
            "dir": str(directory),
            "from": _report.stamp(since if since is not None else first.first_ts),
            "to": _report.stamp(until if until is not None else first.last_ts),
            # What the records of the period span: inside `from` .. `to` when --from/--to
            # reach past the history.
            "recorded": [_report.stamp(first.first_ts), _report.stamp(first.last_ts)],
            "files": history.files,
            "runs": first.runs,
            "records": history.records - first.warmup_records,
            "warmup_records": first.warmup_records,
            "skipped": dict(history.skipped),
            "problems": history.problems + ([journal_problem] if journal_problem else []),
            # (A directory or a FIFO under a day's name, said, is no file of that day.)
            "missing_days": _report.missing_days(
                [f for f in history.files if f not in history.unopened]
            ),
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
        # The journal holds less than the history (see `_journal_span`), or null.
        "journal_gap": "; ".join(x for x in (journal_gap, *journal_notes) if x) or None,
        "journal_skipped": journal_skipped,
        "journal_read_twice": journal_twice,
        "journal_out_of_order": journal_back,
        # A journal shared with (or copied from) another guard: its incidents are no
        # incident of this one, and are counted rather than dropped unsaid.
        "journal_other_guards": sum(
            1
            for e in real
            if e.get("event") in _report.INCIDENTS
            and e.get("guard", settings.instance) != settings.instance
        ),
        "sources": configs[0]["sources"],
        "configs": configs,
    }
