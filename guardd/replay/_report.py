"""What a replay found, as one JSON document and as text (docs/contract.md, "replay")."""

from __future__ import annotations

import heapq
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from guardd.core.types import GUARDD
from guardd.timestamps import parse_rfc3339, rfc3339

#: The journal events a replay reports: its decisions, and the switches that were made.
DECISIONS: Final = (
    "rollback_completed",
    "rollback_failed",
    "hold",
    "alert",
    "qos_locked",
    "qos_extended",
    "qos_released",
    "switch",
    "promote",
    "external_switch",
    # An operator's pause and resume, replayed from the live journal: a resume refills
    # the rollback budget, so what follows may differ from what was decided without it.
    "paused",
    "resumed",
)
#: How each is named in the text report.
_SHOWN: Final = {
    "rollback_completed": "rollback",
    "rollback_failed": "rollback failed",
    "qos_locked": "qos lock",
    "qos_extended": "qos extended",
    "qos_released": "qos release",
    "external_switch": "external switch",
}
_MOVES: Final = ("rollback_completed", "rollback_failed", "switch", "promote", "external_switch")
#: Journal events that are incidents a config should detect.
INCIDENTS: Final = ("rollback_completed", "rollback_failed", "hold")
#: The text report's words for line outcomes whose name says little to an operator.
_LINE_WORDS: Final = {"shed": "over budget", "late": "late (ended before the window)"}
_DAY: Final = re.compile(r"-(\d{4}-\d{2}-\d{2})\.jsonl\.gz$")


def decision(event: dict[str, Any]) -> dict[str, Any]:
    """One decision of the JSON report, from a journal event of the replayed guard."""
    evidence = event.get("evidence") if isinstance(event.get("evidence"), dict) else None
    return {
        "at": event.get("ts"),
        "event": event.get("event"),
        "color": event.get("from"),
        "to": event.get("to"),
        "rule": evidence.get("rule") if evidence else None,
        "severity": event.get("severity"),
        "by": event.get("by"),
        "reason": event.get("reason"),
        "evidence": evidence,
    }


def summary(decisions: list[dict[str, Any]]) -> dict[str, int]:
    """Counts of the decisions by kind."""

    def n(kind: str) -> int:
        return sum(1 for d in decisions if d["event"] == kind)

    return {
        "rollbacks": n("rollback_completed") + n("rollback_failed"),
        "holds": n("hold"),
        "alerts": n("alert"),
        "qos_locks": n("qos_locked"),
        "qos_extended": n("qos_extended"),
        "qos_releases": n("qos_released"),
    }


def seconds(value: object) -> float | None:
    """The RFC 3339 stamp `value` in seconds since the epoch; None when it is none."""
    try:
        return parse_rfc3339(str(value))
    except ValueError:
        return None


def within(value: object, lo: float | None, hi: float | None) -> bool:
    """Whether the RFC 3339 stamp `value` lies within [lo, hi] (an open end: no bound)."""
    t = seconds(value)
    return t is not None and (lo is None or t >= lo) and (hi is None or t <= hi)


def detect(
    incidents: list[dict[str, Any]], decisions: list[dict[str, Any]], tolerance_s: float
) -> list[dict[str, Any]]:
    """For each real incident, when the replayed config took a decision about it.

    A decision about an incident is a rollback, a hold or an alert with a severity (a dry
    run's "would roll back") about the same color, within `tolerance_s` of it either way:
    the nearest in time (a hold taken earlier is not the rollback the config took with
    the live one).
    """
    acting = _acting(decisions)
    times = [seconds(inc.get("ts")) for inc in incidents]
    # Each decision is credited to one incident at most: the pairs nearest in time first
    # (a dry run's one alert is not the detection of a hold and of the rollback after it).
    pairs = sorted(
        (abs(t - at), i, j)
        for i, (inc, at) in enumerate(zip(incidents, times, strict=True))
        if at is not None
        for j, (t, d) in enumerate(acting)
        if abs(t - at) <= tolerance_s and d["color"] == inc.get("from")
    )
    credited: dict[int, int] = {}
    taken: set[int] = set()
    for _, i, j in pairs:
        if i not in credited and j not in taken:
            credited[i] = j
            taken.add(j)
    out = []
    for i, (inc, at) in enumerate(zip(incidents, times, strict=True)):
        found = acting[credited[i]] if i in credited else None
        evidence = inc.get("evidence")
        rule = evidence.get("rule") if isinstance(evidence, dict) else None
        nearest = None
        if found is None and at is not None:
            # Not detected within the match window: the config's nearest decision about
            # the color, if any, said (it may have acted well before, or after).
            near = min(
                (
                    (abs(t - at), j)
                    for j, (t, d) in enumerate(acting)
                    if d["color"] == inc.get("from")
                ),
                default=None,
            )
            if near is not None:
                t, d = acting[near[1]]
                nearest = {
                    "at": d["at"],
                    "event": d["event"],
                    "delay_s": round(t - at, 3),
                    # Within the match window, it is the detection of another incident.
                    "detects_another": near[1] in taken,
                }
        out.append(
            {
                # Read from a file anyone may have edited: the time as every other time
                # of the report is written, a rule only when it is a name.
                "at": stamp(at) if at is not None else inc.get("ts"),
                "event": inc.get("event"),
                "color": inc.get("from"),
                "to": inc.get("to"),
                "rule": rule if isinstance(rule, str) else None,
                "detected_at": found[1]["at"] if found else None,
                "detected_by": found[1]["event"] if found else None,
                "detected_rule": found[1].get("rule") if found else None,
                "delay_s": round(found[0] - at, 3) if found and at is not None else None,
                "nearest": nearest,
            }
        )
    return out


def missing_days(files: list[str]) -> list[str]:
    """The UTC days between the first and last observation file that have no file."""
    days = sorted({m.group(1) for f in files if (m := _DAY.search(Path(f).name))})
    if len(days) < 2:
        return []
    first = datetime.strptime(days[0], "%Y-%m-%d").replace(tzinfo=UTC)
    last = datetime.strptime(days[-1], "%Y-%m-%d").replace(tzinfo=UTC)
    have = set(days)
    out = []
    day = first
    while day < last:
        day += timedelta(days=1)
        if day.strftime("%Y-%m-%d") not in have:
            out.append(day.strftime("%Y-%m-%d"))
    return out


def _evidence_text(evidence: dict[str, Any] | None) -> str:
    if not evidence:
        return ""
    keys = ("value", "threshold", "samples", "consecutive_failures", "error_ratio", "window_s")
    return " ".join(f"{k}={evidence[k]}" for k in keys if evidence.get(k) is not None)


def _row(d: dict[str, Any], label: str | None) -> list[str]:
    color = d["color"] or "-"
    if d["to"] and d["event"] in _MOVES:
        color = f"{color} -> {d['to']}"
    head = f"{d['at']}  " + (f"[{label}] " if label else "")
    head += f"{_SHOWN.get(d['event'], d['event']):<15} {color:<14} {d['severity'] or '-':<3} "
    head += d["rule"] or "-"
    lines = [head, f"    {d['reason']}"]
    ev = _evidence_text(d["evidence"])
    if ev:
        lines.append(f"    evidence: {ev}")
    if d.get("caveat"):
        lines.append(f"    taken on what was left: {d['caveat']}")
    return lines


def render(doc: dict[str, Any]) -> str:
    """The text report of a JSON report `doc`."""
    out: list[str] = []
    h = doc["history"]
    configs = doc["configs"]
    labels: list[str | None] = [c["label"] for c in configs] if len(configs) > 1 else [None]
    pairs = list(zip(configs, labels, strict=True))
    recorded = h.get("recorded") or [h["from"], h["to"]]
    span = f"{h['from'] or '-'} .. {h['to'] or '-'}"
    if recorded != [h["from"], h["to"]]:
        span += f" (recorded: {recorded[0] or '-'} .. {recorded[1] or '-'})"
    if any(step["step_s"] < 0 for step in h["clock_steps"]):
        span += " (the wall clock was stepped back within it: times repeat, see Skipped)"
    out.append(
        f"guardd replay of {h['dir']}: {span}, "
        f"{h['runs']} run(s), {h['records']} records"
        + (
            f" (and {h['warmup_records']} before it, replayed for the state at its start)"
            if h.get("warmup_records")
            else ""
        )
    )
    for c, label in pairs:
        sets = "".join(f" --set {x}" for x in c["set"])
        if label or sets:
            # (One config without --set: the command line says it all.)
            out.append(f"  [{label}] {c['config']}{sets}" if label else f"  {c['config']}{sets}")
        out.extend(f"      {note}" for note in c.get("notes") or [])
    if configs and configs[0].get("env"):
        out.append("  settings from the environment: " + " ".join(configs[0]["env"]))
    out.append("")
    # Each config's decisions in the order it took them (by the monotonic clock: a wall
    # clock stepped back puts later ones at earlier times), the configs merged by time.
    rows = list(
        heapq.merge(
            *(
                [(d["at"] or "", i, d, label) for d in c["decisions"]]
                for i, (c, label) in enumerate(pairs)
            ),
            key=lambda r: (r[0], r[1]),
        )
    )
    if not rows:
        out.append("No decision: the replayed config(s) took none over this history.")
    for _, _, d, label in rows:
        out.extend(_row(d, label))
    out.append("")
    for c, label in pairs:
        s = c["summary"]
        out.append(
            ("Summary" + (f" [{label}]" if label else "") + ": ")
            + f"{s['rollbacks']} rollback(s), {s['holds']} hold(s), {s['alerts']} alert(s), "
            f"{s['qos_locks']} QoS lock(s) ({s['qos_releases']} released, "
            f"{s['qos_extended']} extended)"
        )
    out.append("")
    out.extend(_incidents(doc, pairs))
    out.append("")
    out.extend(_skipped(doc))
    return "\n".join(out) + "\n"


def _acting(decisions: list[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """The decisions that detect an incident, with their time: a rollback, a hold, or an
    alert with a severity (a dry run's "would roll back"), the config's own. An operator's
    move replayed as they made it (`by` someone else) is no detection of the config's:
    credited, every config would "detect" every incident an operator ended, at once."""
    return [
        (t, d)
        for d in decisions
        if (t := seconds(d["at"])) is not None
        and d.get("by") in (GUARDD, None)
        and (
            d["event"] in ("rollback_completed", "rollback_failed", "hold")
            or (d["event"] == "alert" and d["severity"] in ("P0", "P1"))
        )
    ]


def unmatched(found: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The decisions of `decisions` that would detect an incident but are credited to none
    of `found` (`detect`'s answer): where the config acted and the live guard did not."""
    credited = {(inc["detected_at"], inc["detected_by"], inc["color"]) for inc in found}
    return [
        {k: d[k] for k in ("at", "event", "color", "to", "rule", "severity")}
        for _, d in _acting(decisions)
        if (d["at"], d["event"], d["color"]) not in credited
    ]


def _incidents(doc: dict[str, Any], pairs: list[tuple[dict[str, Any], str | None]]) -> list[str]:
    incidents = pairs[0][0]["incidents"]
    if doc.get("journal_problem"):
        return [f"Incidents: unknown: {doc['journal_problem']}"]
    gap = [f"  ({doc['journal_gap']})"] if doc.get("journal_gap") else []
    if not incidents:
        return [
            f"Incidents in {doc['journal']}: none in this period.",
            *gap,
            *_unmatched(pairs),
        ]
    out = [f"Incidents in {doc['journal']}:", *gap]
    for i, inc in enumerate(incidents):
        shown = _SHOWN.get(inc["event"], inc["event"])
        where = inc["color"] or "-"
        if inc["to"] and inc["event"] != "hold":
            where += f" -> {inc['to']}"
        out.append(f"  {inc['at']}  {shown} {where} ({inc['rule'] or 'no rule'})")
        for c, label in pairs:
            found = c["incidents"][i]
            prefix = f"    [{label}] " if label else "    "
            if found["detected_at"] is None:
                if found.get("covered", True):
                    near = found.get("nearest")
                    served = found.get("served")
                    if near is not None:
                        shown_near = _SHOWN.get(near["event"], near["event"])
                        another = ", the detection of another incident" * near["detects_another"]
                        out.append(
                            prefix + f"not detected within {found['match_window_s']:g}s of it "
                            f"(the nearest decision on {inc['color']}: {shown_near} at "
                            f"{near['at']}, {near['delay_s']:+g}s{another})"
                        )
                    elif served is not None and inc["color"] is not None and served != inc["color"]:
                        out.append(
                            prefix + f"not detected: this config served {served} then, not "
                            f"{inc['color']}: no failure of it to act on"
                        )
                    else:
                        out.append(prefix + "not detected")
                    if found.get("bound"):
                        out.append(prefix + f"  ({found['bound']})")
                else:
                    why = found.get("not_covered") or "no record around it"
                    out.append(prefix + f"not covered by the history ({why})")
                continue
            by = _SHOWN.get(found["detected_by"], found["detected_by"])
            out.append(
                prefix + f"detected at {found['detected_at']} ({found['delay_s']:+g}s, {by})"
            )
            if found.get("bound"):
                out.append(prefix + f"  ({found['bound']})")
    return out + _unmatched(pairs)


def _unmatched(pairs: list[tuple[dict[str, Any], str | None]]) -> list[str]:
    """The lines of the decisions no live incident matches (none: no line)."""
    out = []
    for c, label in pairs:
        for d in c.get("unmatched") or []:
            shown = _SHOWN.get(d["event"], d["event"])
            where = d["color"] or "-"
            if d["to"] and d["event"] != "hold":
                where += f" -> {d['to']}"
            out.append(
                (f"  [{label}] " if label else "  ")
                + f"{d['at']}  {shown} {where} ({d['rule'] or 'no rule'}): no such incident "
                f"in the journal within {c['match_window_s']:g}s: the live guard did not "
                "act then"
            )
    if out:
        out.insert(0, "Decided where the live guard did not:")
    return out


def _skipped(doc: dict[str, Any]) -> list[str]:
    h = doc["history"]
    out = ["Skipped:"]
    if not (
        any(h["skipped"].values())
        or h["problems"]
        or h["clock_steps"]
        or h["missing_days"]
        or h["gaps"]
        or doc.get("journal_skipped")
        or doc.get("journal_read_twice")
        or doc.get("journal_out_of_order")
        or doc.get("journal_other_guards")
    ):
        out.append("  nothing in the observations")
    if doc.get("journal_skipped"):
        out.append(
            f"  {doc['journal_skipped']} journal line(s) of {doc['journal']}: "
            "not an event as guardd writes it"
        )
    if doc.get("journal_read_twice"):
        out.append(
            f"  {doc['journal_read_twice']} journal event(s) of {doc['journal']}: found again "
            "(the same id: a line written twice), read once"
        )
    if doc.get("journal_out_of_order"):
        out.append(
            f"  {doc['journal_out_of_order']} journal event(s) of {doc['journal']}: stamped "
            "over 30s before an event written before them (a clock stepped back, the file "
            "edited or concatenated): taken at their own time"
        )
    if doc.get("journal_other_guards"):
        out.append(
            f"  {doc['journal_other_guards']} incident(s) of {doc['journal']}: of another "
            "guard than the one replayed, not matched"
        )
    out.extend(
        f"  {n} corrupt gzip member(s) of the observations: their lines past the damage lost"
        if why == "corrupt member"  # (a member, not a line: how many lines it held is unknown)
        else f"  {n} observation line(s): {why}"
        for why, n in sorted(h["skipped"].items())
    )
    out.extend(f"  {problem}" for problem in h["problems"])
    out.extend(f"  no observation file for {day}" for day in h["missing_days"])
    out.extend(
        f"  no record for {gap['seconds']:g}s before {gap['until']}: records lost, "
        "not ticked through (or guardd down without saying it stopped)"
        for gap in h["gaps"]
    )
    out.extend(
        f"  wall clock stepped {step['step_s']:+g}s at {step['at']} "
        "(spacing kept by the monotonic clock)"
        for step in h["clock_steps"]
    )
    out.extend(_source_lines(doc["sources"]))
    for c in doc["configs"][1:]:
        if c.get("sources", doc["sources"]) != doc["sources"]:
            out.append(f"  as [{c['label']}] read them (its own signals):")
            out.extend(f"  {line}" for line in _source_lines(c["sources"]))
    return out


def _source_lines(sources: dict[str, Any]) -> list[str]:
    """The `Skipped:` lines of what a config read of each signal's source."""
    out: list[str] = []
    for name, src in sources.items():
        lines = src.get("lines") or {}
        counted = ", ".join(f"{_LINE_WORDS.get(k, k)} {v}" for k, v in lines.items() if v)
        how = src["replayed"] or f"not replayed: {src['why']}"
        if src["replayed"] and src["why"]:
            how += f" ({src['why']})"
        out.append(f"  signal {name} ({src['kind']}): {how}")
        if counted:
            out.append(f"    lines: {counted}")
        if lines.get("shed"):
            out.append(
                "    over budget: lines beyond the signal's max_lines_per_s in their second, "
                "counted but not parsed (as the daemon does); the figures are a lower bound"
            )
        if src["outside_history"]:
            out.append(
                f"    {src['outside_history']} line(s)/sample(s) not replayed: outside the "
                "recorded history (before its first record, after its last or --to, or "
                "while the daemon was down)"
            )
        if src.get("repeated_lines"):
            out.append(
                f"    {src['repeated_lines']} line(s) read once: the same lines found twice "
                "(a copy of a rotation or of a file's own lines: see below)"
            )
        if src.get("out_of_order_lines"):
            out.append(
                f"    {src['out_of_order_lines']} line(s) not replayed: stamped within the "
                "history, but found after lines later than them (a log concatenated out of "
                "order, or the same lines twice); replay reads a log as it was written: give "
                "it the rotated files as logrotate left them"
            )
        if src.get("untimed_lines"):
            out.append(
                f"    {src['untimed_lines']} line(s) without a time of their own: taken with "
                "the line before them, and counted with it (under lines when replayed)"
            )
        if src.get("ahead_lines"):
            out.append(
                f"    {src['ahead_lines']} line(s) stamped ahead of the lines written after "
                "them: replayed when written, with the lines before them"
            )
        out.extend(f"    {problem}" for problem in src["problems"])
        if src.get("bad_samples"):
            out.append(f"    {src['bad_samples']} recorded sample(s) this signal could not take")
    return out


def stamp(ts: float | None) -> str | None:
    """RFC 3339 of `ts`, or None."""
    return None if ts is None else rfc3339(ts)
