"""Time-to-rollback: from green's first 503 until nginx serves only blue, on fresh connections.

Each trial starts every guard afresh (a new state dir: no window, budget or lock left
from the trial before), waits until each has probed a few times, injects the fault at
a random phase of the probe cadence (a `touch` of green's fault file), and polls each
guard's own front nginx on fresh connections every few milliseconds. A guard's TTR is
the time from the fault to the first answer of the run of blue-only answers that lasts
`HOLD` seconds. guardd, the shell guard and monit watch the same fault in the same
trial, each switching its own front.

The floor is what any guard with the same interval and threshold must take: the
failures after the first at the interval, the wait for the first probe after the fault
(measured), the switch itself and nginx's reload settling (both measured on a
reference front by the same ln + rename + nginx -t + reload a script would do).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.context import Bench
from bench.journal import event_time
from bench.nginx import Front, fresh_get
from bench.stats import ratio, summary
from bench.subjects import Guardd, Monit, ShellGuard

HOLD = 0.5
FAILURES = 3
MONIT_UA = "Monit"
SHELL_UA = "health_guard.sh"
GUARDD_UA = "guardd-ttr"


@dataclass
class FreshPoller:
    """Polls a front on fresh connections in a thread; records (time, status, color)."""

    port: int
    gap: float = 0.003
    samples: list[tuple[float, int, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> FreshPoller:
        """Start polling."""
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"poll-{self.port}")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            status, color = fresh_get(self.port)
            self.samples.append((time.time(), status, color))
            self._stop.wait(self.gap)

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def streak_start(self, color: str, since: float, hold: float) -> float | None:
        """Start of the first run of `color`-only 2xx answers after `since` lasting `hold`."""
        start: float | None = None
        for t, status, got in list(self.samples):
            if t < since:
                continue
            if 200 <= status < 300 and got == color:
                start = t if start is None else start
                if t - start >= hold:
                    return start
            else:
                start = None
        return None

    def wait_streak(self, color: str, since: float, hold: float, timeout: float) -> float | None:
        """Wait for `streak_start` to exist; None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.streak_start(color, since, hold)
            if found is not None:
                return found
            time.sleep(0.02)
        return None


def reference_switch(ctx: Bench, reps: int) -> dict[str, Any]:
    """The switch a script does, measured: ln + rename + nginx -t + reload, and the settle."""
    front = Front(ctx.root / "ref-front", ctx.app, {"blue": "sblue", "green": "sgreen"}, "green")
    front.start()
    rows: list[dict[str, float]] = []
    try:
        color = "green"
        for _ in range(reps):
            target = "blue" if color == "green" else "green"
            poller = FreshPoller(front.port).start()
            time.sleep(0.05)
            began = time.time()
            steps = front.switch(target)
            reloaded = time.time()
            settled = poller.wait_streak(target, began, HOLD, timeout=10)
            poller.stop()
            assert settled is not None, "the reference front never settled"
            after = [(t, c) for t, s, c in poller.samples if t >= reloaded and s]
            first_new = next((t for t, c in after if c == target), settled)
            last_old = max((t for t, c in after if c == color), default=reloaded)
            rows.append(
                {
                    **steps,
                    "first_new_after_reload_s": first_new - reloaded,
                    "old_answering_after_reload_s": last_old - reloaded,
                    "settle_s": settled - reloaded,
                }
            )
            color = target
    finally:
        front.stop()
    keys = rows[0].keys()
    return {k: summary([r[k] for r in rows], 1000) for k in keys}


@dataclass
class Trial:
    """One fault and what each guard made of it."""

    fault_at: float
    ttr: dict[str, float | None]
    detect: dict[str, float | None]
    third_failure: dict[str, float | None]
    guardd_events: dict[str, float | None]


def _probe_times(ctx: Bench, since: int, ua: str, port: int, after: float) -> list[float]:
    return [
        h.t
        for h in ctx.app.hits(since)
        if h.ua.startswith(ua)
        and h.port == port
        and not h.via_front
        and h.t >= after
        and h.status >= 500
    ]


def _reset_front(front: Front) -> None:
    # A guard stopped mid-switch may leave its links beside the active one.
    for debris in front.upstream_dir.glob(".*"):
        debris.unlink(missing_ok=True)
    if front.active_on_disk() != "green":
        front.switch("green")


def run_setting(ctx: Bench, interval: float, trials: int) -> dict[str, Any]:
    """`trials` faults at one interval, guardd, the shell guard and (at 1 s) monit side by side."""
    app = ctx.app
    tag = f"{int(interval * 1000)}ms"
    pair = {"blue": "blue", "green": "green"}
    fronts = {"guardd": Front(ctx.root / f"ttr-{tag}-guardd", app, pair, "green")}
    fronts["shell"] = Front(ctx.root / f"ttr-{tag}-shell", app, pair, "green")
    with_monit = interval >= 1.0
    if with_monit:
        fronts["monit"] = Front(ctx.root / f"ttr-{tag}-monit", app, pair, "green")
    for f in fronts.values():
        f.start()
    green_port = app.port_of["green"]
    guardd = Guardd(
        ctx.root,
        f"ttr-{tag}",
        upstreams={"blue": [app.url("blue")], "green": [app.url("green")]},
        interval=interval,
        failures=FAILURES,
        switch=Guardd.nginx_switch(fronts["guardd"], verify_successes=3),
        user_agent=GUARDD_UA,
    )
    uas = {"guardd": GUARDD_UA, "shell": SHELL_UA, "monit": MONIT_UA}
    results: list[Trial] = []
    timeouts = dict.fromkeys(fronts, 0)
    rng = random.Random(1234)  # the phases differ between trials, not between runs
    try:
        for n in range(trials):
            app.fault("green", on=False)
            for f in fronts.values():
                _reset_front(f)
            pollers = {k: FreshPoller(f.port).start() for k, f in fronts.items()}
            for k, p in pollers.items():
                if p.wait_streak("green", time.time(), 0.15, timeout=10) is None:
                    raise RuntimeError(f"front of {k} does not serve green before trial {n}")
                p.stop()
            mark = app.mark()
            guardd.start(ctx.hub)
            shell = ShellGuard(
                ctx.root / f"ttr-{tag}-shell",
                interval=interval,
                url=app.url("green"),
                front=fronts["shell"],
                failures=FAILURES,
            ).start()
            monit = (
                Monit(
                    ctx.root / f"ttr-{tag}-monit",
                    port=green_port,
                    front=fronts["monit"],
                    failures=FAILURES,
                ).start()
                if with_monit
                else None
            )
            try:
                guardd.wait_ready(ctx.hub)
                ctx.wait_hit(mark, 30, ua=SHELL_UA, port=green_port)
                if monit is not None:
                    ctx.wait_hit(mark, 30, ua=MONIT_UA, port=green_port)
                # A few passing probes first, then the fault at a random phase of the cadence.
                time.sleep(max(1.0, 3 * interval) + rng.uniform(0, interval))
                pollers = {k: FreshPoller(f.port).start() for k, f in fronts.items()}
                time.sleep(0.02)
                fault_at = app.fault("green")
                limit = 10 + 4 * FAILURES * interval
                ttr: dict[str, float | None] = {}
                for k, p in pollers.items():
                    at = p.wait_streak("blue", fault_at, HOLD, timeout=limit)
                    ttr[k] = None if at is None else at - fault_at
                    timeouts[k] += at is None
            finally:
                for p in pollers.values():
                    p.stop()
                guardd.stop()
                shell.stop()
                if monit is not None:
                    monit.stop()
            detect: dict[str, float | None] = {}
            third: dict[str, float | None] = {}
            for k in fronts:
                fails = _probe_times(ctx, mark, uas[k], green_port, fault_at)
                detect[k] = fails[0] - fault_at if fails else None
                third[k] = fails[FAILURES - 1] - fault_at if len(fails) >= FAILURES else None
            events = guardd.events()
            results.append(
                Trial(
                    fault_at,
                    ttr,
                    detect,
                    third,
                    {
                        "rollback_started": _rel(event_time(events, "rollback_started"), fault_at),
                        "rollback_completed": _rel(
                            event_time(events, "rollback_completed"), fault_at
                        ),
                    },
                )
            )
            ctx.say(
                f"ttr {tag} trial {n + 1}/{trials}: "
                + " ".join(f"{k}={_ms(v)}" for k, v in ttr.items())
            )
    finally:
        app.fault("green", on=False)
        for f in fronts.values():
            f.stop()
    return _summarize(interval, results, timeouts)


def _rel(t: float | None, base: float) -> float | None:
    return None if t is None else t - base


def _ms(v: float | None) -> str:
    return "timeout" if v is None else f"{v * 1000:.0f}ms"


def _round_ms(v: float | None) -> float | None:
    """Seconds as milliseconds to 0.1 ms; None (a timeout) stays None."""
    return None if v is None else round(v * 1000, 1)


def _summarize(interval: float, trials: list[Trial], timeouts: dict[str, int]) -> dict[str, Any]:
    tools: dict[str, Any] = {}
    for k, timed_out in timeouts.items():
        ttrs = [t.ttr[k] for t in trials if t.ttr[k] is not None]
        detects = [t.detect[k] for t in trials if t.detect[k] is not None]
        thirds = [t.third_failure[k] for t in trials if t.third_failure[k] is not None]
        tools[k] = {
            "ttr_ms": summary([v for v in ttrs if v is not None], 1000),
            "timeouts": timed_out,
            "detection_phase_ms": summary([v for v in detects if v is not None], 1000),
            "confirmed_after_ms": summary([v for v in thirds if v is not None], 1000),
        }
        # From the last failing probe needed to nginx serving only blue: the guard's own part.
        own = [
            ttr - third
            for t in trials
            if (ttr := t.ttr[k]) is not None and (third := t.third_failure[k]) is not None
        ]
        tools[k]["confirmed_to_blue_only_ms"] = summary(own, 1000)
    decision = [
        t.guardd_events["rollback_started"] - t.third_failure["guardd"]
        for t in trials
        if t.guardd_events["rollback_started"] is not None and t.third_failure["guardd"] is not None
    ]
    completed = [
        t.guardd_events["rollback_completed"] - t.guardd_events["rollback_started"]
        for t in trials
        if t.guardd_events["rollback_completed"] is not None
        and t.guardd_events["rollback_started"] is not None
    ]
    tools["guardd"]["decision_ms"] = summary(decision, 1000)
    tools["guardd"]["switch_and_verify_ms"] = summary(completed, 1000)
    return {
        "interval_ms": round(interval * 1000),
        "failures": FAILURES,
        "trials": len(trials),
        "tools": tools,
        "trials_ms": [
            {
                k: {
                    "ttr": _round_ms(t.ttr[k]),
                    "detect": _round_ms(t.detect[k]),
                }
                for k in t.ttr
            }
            for t in trials
        ],
    }


def floor_ms(setting: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """The floor of a setting and guardd's TTR against it."""
    phase = setting["tools"]["guardd"]["detection_phase_ms"]["mean"]
    if phase is None:
        return {}
    switch = ref["total_s"]["median"]
    settle = ref["settle_s"]["median"]
    floor = (setting["failures"] - 1) * setting["interval_ms"] + phase + switch + settle
    out: dict[str, Any] = {
        "floor_ms": round(floor, 1),
        "parts_ms": {
            "failures_after_the_first": (setting["failures"] - 1) * setting["interval_ms"],
            "mean_detection_phase": phase,
            "switch": switch,
            "reload_settle": settle,
        },
        "target_p95_ms": round(floor + 100, 1),
    }
    fixed = (setting["failures"] - 1) * setting["interval_ms"] + switch + settle
    for k, v in setting["tools"].items():
        out[f"{k}_median_over_floor"] = ratio(v["ttr_ms"]["median"], floor)
        out[f"{k}_p95_over_floor"] = ratio(v["ttr_ms"]["p95"], floor)
        # The same floor trial by trial, with that trial's own detection phase in place of
        # the mean: what the guard adds, free of where in the cadence the fault fell.
        excess = [
            t[k]["ttr"] - t[k]["detect"] - fixed
            for t in setting["trials_ms"]
            if t[k]["ttr"] is not None and t[k]["detect"] is not None
        ]
        v["excess_over_own_floor_ms"] = summary(excess)
    p95 = setting["tools"]["guardd"]["ttr_ms"]["p95"]
    out["guardd_p95_met"] = p95 is not None and p95 <= floor + 100
    ex = setting["tools"]["guardd"]["excess_over_own_floor_ms"]["p95"]
    out["guardd_excess_p95_met"] = ex is not None and ex <= 100
    return out


def run(ctx: Bench) -> dict[str, Any]:
    """The whole TTR suite."""
    trials = 5 if ctx.quick else 20
    ctx.say("ttr: reference switch")
    ref = reference_switch(ctx, 4 if ctx.quick else 10)
    out: dict[str, Any] = {"reference_switch_ms": ref, "hold_s": HOLD, "settings": {}}
    for interval in (0.2, 1.0):
        setting = run_setting(ctx, interval, trials)
        setting["floor"] = floor_ms(setting, ref)
        out["settings"][f"{int(interval * 1000)}ms"] = setting
    return out
