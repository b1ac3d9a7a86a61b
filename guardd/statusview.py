"""The status view: what guardctl and systemd are shown of a running guard.

Owns the shapes of the `status --json` object (docs/contract.md §1, with its front door,
warnings and last decision) and of systemd's one-line STATUS=. It only reads the guard
and the lock file; nothing here changes state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from guardd import qoslock
from guardd._version import __version__
from guardd.core.machine import Alert, Decision, Hold, Reapply, Rollback
from guardd.core.types import COLORS, GUARDD, other
from guardd.timestamps import rfc3339

if TYPE_CHECKING:
    from guardd.guard import Guard

#: `warnings` while `policy.dry_run` is on (docs/contract.md §1).
DRY_RUN_WARNING = (
    "policy.dry_run is on: guardd journals and notifies the rollbacks it would make, and makes none"
)


def snapshot(guard: Guard) -> dict[str, Any]:
    """The docs/contract.md §1 `status --json` object."""
    now = guard.clock.monotonic()
    machine = guard.machine
    lock = qoslock.read_lock(guard.s.lock_file)
    upstreams: dict[str, Any] = {}
    for color in COLORS:
        st = machine.stats(color, now)
        stale = machine.is_stale(color, now)
        upstreams[color] = {
            "healthy": None if stale else st.consecutive_failures == 0,
            "stale": stale,
            "consecutive_failures": st.consecutive_failures,
            "consecutive_successes": st.consecutive_successes,
            "error_ratio": _r(st.error_ratio),
            "samples": st.samples,
            "p50_ms": _r(st.p50_ms),
            "p95_ms": _r(st.p95_ms),
            "last_error": st.last_error,
            "last_probe_age_s": None
            if st.last_probe_at is None
            else round(now - st.last_probe_at, 3),
        }
    hold = machine.hold
    return {
        "guard": guard.s.instance,
        "front_door": front_door_doc(guard, now),
        "warnings": warnings(guard),
        "state": guard.state.value,
        "active": guard.active,
        "standby": other(guard.active) if guard.active else None,
        "rollback_to": machine.rollback_target(guard.active) if guard.active else None,
        "paused": guard.paused is not None,
        "paused_reason": (guard.paused or {}).get("reason"),
        "dry_run": guard.s.policy.dry_run,
        "hold_reason": hold.reason if hold else None,
        "no_rollback_target": guard.protection_lost(),
        "qos": qos_doc(guard, lock),
        "fleet": guard.fleet.summary() if guard.fleet is not None else None,
        "upstreams": upstreams,
        "rules": rules_doc(guard, now),
        "signals": signals_doc(guard, now),
        "last_event": guard.journal.recent[-1] if guard.journal.recent else None,
        "last_decision": guard.last_decision,
        "storage": {
            "ok": not guard.storage.failing,
            "errors": guard.storage.errors,
            "last_error": guard.storage.last_error,
            "journal_backlog": guard.journal.backlog,
        },
        "recording": guard.recording() if guard.recording is not None else {"enabled": False},
        "probe_interval_s": guard.s.probe_interval,
        "uptime_s": round(now - guard.started_mono, 1),
        "version": __version__,
    }


def qos_doc(guard: Guard, lock: qoslock.LockInfo) -> dict[str, Any]:
    """`status --json`'s `qos`: the lock file's, or in a fleet the fleet's lock as
    `qos status` answers it (`"locked": null, "unknown": true` while etcd cannot be read)."""
    if guard.fleet is not None:
        return guard.fleet.qos_doc()
    doc = lock.to_json()
    own = guard.qos.own_lock
    # Whether the lock held is guardd's own, which it judges and releases; another's
    # (written by hand, another tool) it never removes.
    owned = doc["owned"] = lock.held and own is not None and own.info == lock
    window = guard.qos.window_json()
    if owned and window is not None:
        # guardd's own guard window: how long it is still watched, and what it saw so far.
        doc["window"] = window
    elif lock.held and own is None and window is not None:
        # Beneath another's lock (`QosKeeper.beneath`): its lock comes back if that one goes.
        doc["window"] = {**window, "beneath": True}
    if not lock.held and guard.rolling_back:
        # A switch in flight: its lock (a guard window, a hold's) is written as it ends,
        # and a rollback stuck at nginx's reload, with its undo, lasts a few switch.timeouts.
        # No deploy starts meanwhile: the traffic is moving because a color failed.
        doc |= {"locked": True, "by": GUARDD, "reason": qoslock.IN_FLIGHT}
    return doc


def rules_doc(guard: Guard, now: float) -> list[dict[str, Any]]:
    """Each rule of the table with its state on each color at the last tick (contract §1).

    A rule's state is `ok`, `pending` (holds, not yet for its `for`), `firing` or
    `inconclusive` (with `why`: `3 of 5 samples`, `signal stale`, ...); `since` is when a
    pending or firing condition began (RFC 3339). A color without a verdict (not probed
    yet since start, or since traffic moved to it) is `inconclusive`, `not judged yet`.
    """
    wall = guard.clock.wall()
    rows: dict[str, dict[str, Any]] = {}
    for rule in guard.machine.policy.table.rules:
        # Each color as not judged until its verdict below says otherwise.
        unjudged = {
            "state": "inconclusive",
            "since": None,
            "value": None,
            "samples": 0,
            "min_samples": rule.min_samples,
            "why": "not judged yet",
        }
        rows[rule.name] = {
            "rule": rule.name,
            "signal": rule.signal,
            "stat": rule.stat,
            "condition": rule.describe(),
            "severity": rule.severity,
            "for_s": rule.for_s,
            "dry_run": rule.dry_run,
            **{color: dict(unjudged) for color in COLORS},
        }
    for color, verdict in guard.machine.verdicts.items():
        for st in verdict.states:
            row = rows.get(st.rule)
            if row is None:
                continue  # a rule a reload removed since the last tick
            row[color] = {
                "state": st.state,
                "since": None if st.since is None else rfc3339(wall - (now - st.since)),
                "value": st.value,
                "samples": st.samples,
                "min_samples": st.min_samples,
                "why": st.why,
            }
    return list(rows.values())


def signals_doc(guard: Guard, now: float) -> dict[str, Any]:
    """Each signal besides the probe: its source's state and counters, and per color the
    statistics of its window at the last tick with the baseline they are compared with."""
    stale = set(guard.machine.stale_signals(guard.active, now)) if guard.active else set()
    out: dict[str, Any] = {}
    for name, signal in guard.signals.items():
        doc = dict(signal.status())
        doc["problem"] = guard.signal_problems.get(name) or doc.get("problem")
        doc["stale"] = name in stale
        for color in COLORS:
            reading = guard.readings.get(name, {}).get(color)
            doc[color] = (
                None
                if reading is None
                else {
                    "samples": reading.samples,
                    "window_s": reading.window_s,
                    **{k: _r(v) for k, v in sorted(reading.stats.items())},
                    "baseline": guard.machine.baseline(name, color),
                }
            )
        out[name] = doc
    return out


def front_door_doc(guard: Guard, now: float) -> dict[str, Any] | None:
    """The front door as `status --json` shows it; None when it is not watched."""
    if guard.verifier is None:
        return None
    fd = guard.machine.front_door
    stale = guard.machine.front_door_stale(now)
    return {
        "healthy": None if stale else fd.ok,
        "stale": stale,
        "streak": fd.streak,
        "last_error": fd.last_error,
        "last_probe_age_s": None if fd.last_at is None else round(now - fd.last_at, 3),
    }


def warnings(guard: Guard) -> list[str]:
    """What an operator should look at although nothing is failing outright."""
    found: list[str] = []
    if guard.s.policy.dry_run:
        # Not a failure, but no protection either: the operator must not read a calm
        # status as "guardd would have rolled that back".
        found.append(DRY_RUN_WARNING)
    mismatch = guard.machine.mismatch
    if mismatch is not None:
        found.append(f"mismatch: {mismatch}")
    if guard.cannot_switch is not None:
        found.append(guard.cannot_switch)
    found += [
        f"signal {name} is stale: its rules are inconclusive" for name in stale_signals(guard)
    ]
    if guard.foreign_journal:
        found.append(
            f"state.dir's journal also holds guard {', '.join(guard.foreign_journal)}: their "
            "rollbacks count in this guard's budget; give each guard its own state.dir"
        )
    found += [
        f"signal {name} gives nothing: {problem}"
        for name, problem in sorted(guard.signal_problems.items())
        if problem is not None
    ]
    if guard.fleet is not None:
        found += guard.fleet.warnings()
    if guard.reload_rejected is not None:
        found.append(guard.reload_rejected)
    if guard.restart_pending:
        found.append(
            f"config: {', '.join(guard.restart_pending)} changed in the file and take effect "
            "at the next start (systemctl restart)"
        )
    recording = guard.recording() if guard.recording is not None else {}
    if recording.get("last_error"):
        found.append(
            f"observations are not being recorded ({recording['last_error']}); "
            "guarding goes on, and the write is tried again every second"
        )
    return found


def stale_signals(guard: Guard) -> list[str]:
    """The signals with `stale_after` that said nothing of the active color for too long."""
    if guard.active is None:
        return []
    return guard.machine.stale_signals(guard.active, guard.clock.monotonic())


def status_line(guard: Guard) -> str:
    """The one-line STATUS= summary for systemd."""
    now = guard.clock.monotonic()
    machine = guard.machine
    parts = [f"active={guard.active or 'unknown'}", f"state={guard.state.value}"]
    for color in COLORS:
        w = machine.windows[color]
        if machine.is_stale(color, now):
            parts.append(f"{color}=stale")
        elif w.consecutive_failures:
            parts.append(
                f"{color}=down({w.consecutive_failures}/{guard.s.policy.consecutive_failures})"
            )
        else:
            parts.append(f"{color}=up")
    if guard.fleet is not None and guard.fleet.qos_unknown_why() is not None:
        parts.append("qos=unknown")  # the fleet's lock cannot be read: never "free"
    else:
        parts.append("qos=locked" if guard.qos.held else "qos=free")
    if guard.protection_lost() is not None:
        parts.append("no-rollback-target")
    if guard.paused is not None:
        parts.append("paused")
    if guard.s.policy.dry_run:
        parts.append("dry-run")
    if guard.storage.failing:
        parts.append("storage=failing(" + ",".join(sorted(guard.storage.failing)) + ")")
    if machine.mismatch is not None:
        parts.append("front_door=mismatch")
    parts += [f"signal={name}:stale" for name in stale_signals(guard)]
    if guard.fleet is not None and (word := guard.fleet.status_word()):
        parts.append(word)
    if guard.reload_rejected is not None:
        parts.append("reload=rejected")
    return " ".join(parts)


def decision_doc(decision: Decision, wall: float, not_taken: str | None = None) -> dict[str, Any]:
    """`last_decision` of `status --json`: what a tick did and why, stamped `wall`;
    `not_taken`: why its rollback was not taken here (a fleet node's), else None."""
    verdict = decision.verdict
    action = "none"
    for a in decision.actions:
        action = {Rollback: "rollback", Hold: "hold", Alert: "alert", Reapply: "reapply"}[type(a)]
    if decision.blocked_by and action == "none":
        action = f"blocked:{decision.blocked_by}"
    severity = verdict.severity if verdict else None
    reason = verdict.reason if verdict else None
    evidence = verdict.evidence if verdict else None
    last = decision.actions[-1] if decision.actions else None
    if isinstance(last, Rollback | Hold | Alert):
        # What was done, in its own words: an alert about the standby ("no safe rollback:
        # blue is down") is not the active color's verdict ("healthy").
        severity, reason, evidence = last.severity, last.reason, last.evidence
    elif isinstance(last, Reapply):
        reason = last.reason
    return {
        "ts": rfc3339(wall),
        "action": action,
        "severity": severity,
        "reason": reason,
        "evidence": evidence.to_dict() if evidence is not None else None,
        "not_taken": not_taken,
    }


def _r(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(v, 4)
