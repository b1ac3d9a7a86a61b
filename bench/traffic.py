"""Real traffic: what the `access_log` signal costs, and how fast its rule decides.

`cpu`: wrk sends 2,000 req/s (bench/wrk/rate.lua) through a real nginx that logs every
request in guardd's log_format (`Front(traffic_log=...)`, the packaged
`guardd-log-format.conf`). Two guardd run side by side with the same probes and config:
one with a `[signals.traffic]` over that log and a P0 rule on it, its peer without. Over
a fixed span the CPU time of each (`procstat.CpuMeter`: per-thread schedstat) and of
nginx's worker is read; the difference between the two guardd is what the signal costs.

`decision`: 100 req/s through the same nginx (one fresh connection per request, by
guardd's demo load generator, which stamps its first 500 with the wall clock), green
healthy for a warm-up, then its fault file makes a fifth of its `/api` answers 500 while
its `/healthz` stays UP. Time to decision = the generator's first 500 answer -> guardd's
`rollback_started` journal timestamp (both wall clock on this machine). Each trial also
gets its floor: the first instant at which the generator's own answers, over the rule's
window, met the rule (ratio and min_samples); no guard reading the same requests can
decide before it, so decision - floor is the lag guardd adds (log line written, read,
ticked).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.context import Bench
from bench.journal import event_time
from bench.nginx import Front, TrafficApp
from bench.procstat import CpuMeter
from bench.stats import summary
from bench.subjects import Guardd
from guardd._demo.traffic import Traffic
from guardd.control.client import call

RATE_LUA = Path(__file__).parent / "wrk" / "rate.lua"
CPU_RATE = 2000
CPU_TARGET_PCT = 5.0
DECISION_RATE = 100.0
DECISION_TARGET_MS = 1000.0
# The rule both suites configure: P0, no `for`, as the README's example.
RULE_ABOVE = 0.05
RULE_MIN_SAMPLES = 50
SIGNAL_WINDOW_S = 10
# Healthy traffic before the fault in each decision trial: twice min_samples, so that the
# rule is conclusive (and healthy) when the fault begins.
WARM_S = 1.0


def _signal_toml(log: Path, addresses: dict[str, list[str]]) -> str:
    adr = ", ".join(f'{c} = ["{a[0]}"]' for c, a in addresses.items())
    return f"""
[signals.traffic]
kind = "access_log"
source = "file:{log}"
addresses = {{ {adr} }}
window = "{SIGNAL_WINDOW_S}s"

[[rules]]
signal = "traffic"
stat = "error_ratio"
above = {RULE_ABOVE}
severity = "P0"
min_samples = {RULE_MIN_SAMPLES}
"""


def _guardd(
    ctx: Bench, name: str, app: TrafficApp, *, interval: float, signal_log: Path | None
) -> Guardd:
    addresses = {c: [f"127.0.0.1:{app.port_of[c]}"] for c in ("blue", "green")}
    return Guardd(
        ctx.root,
        name,
        upstreams={"blue": [app.url("blue")], "green": [app.url("green")]},
        interval=interval,
        switch=Guardd.state_file_switch(ctx.root / name / "deploy-state.json", "green"),
        user_agent="guardd-traffic",
        extra_toml="" if signal_log is None else _signal_toml(signal_log, addresses),
    )


def _lines(path: Path, start: int, end: int) -> int:
    with path.open("rb") as f:
        f.seek(start)
        return f.read(end - start).count(b"\n")


def run_cpu(ctx: Bench, app: TrafficApp) -> dict[str, Any]:
    """guardd with and without the signal, and nginx's worker, at CPU_RATE logged req/s."""
    span = 20.0 if ctx.quick else 60.0
    warm = 5.0
    log = ctx.root / "traffic-cpu-front" / "guardd.access.log"
    front = Front(
        ctx.root / "traffic-cpu-front",
        app,
        {"blue": "blue", "green": "green"},
        "green",
        traffic_log=log,
    )
    front.start()
    with_signal = _guardd(ctx, "traffic-cpu-signal", app, interval=1.0, signal_log=log)
    without = _guardd(ctx, "traffic-cpu-plain", app, interval=1.0, signal_log=None)
    threads = 2
    env = {
        **os.environ,
        "BENCH_RATE": str(CPU_RATE),
        "BENCH_THREADS": str(threads),
        "BENCH_PATH": "/api/orders",
    }
    wrk: subprocess.Popen[str] | None = None
    app.fault("green", on=False)
    try:
        for g in (with_signal, without):
            g.start(ctx.hub)
        for g in (with_signal, without):
            g.wait_ready(ctx.hub)
        wrk = subprocess.Popen(
            [
                "wrk",
                f"-t{threads}",
                "-c32",
                f"-d{warm + span + 5:g}s",
                "--timeout",
                "5s",
                "-s",
                str(RATE_LUA),
                f"http://127.0.0.1:{front.port}/api/orders",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(warm)
        workers = front.worker_pids()
        meters = {
            "guardd_with_signal": CpuMeter(with_signal.pid),
            "guardd_without_signal": CpuMeter(without.pid),
            **{f"nginx_worker_{i}": CpuMeter(pid) for i, pid in enumerate(workers)},
        }
        size0 = log.stat().st_size
        t0 = time.monotonic()
        for m in meters.values():
            m.start()
        time.sleep(span)
        used = {k: m.stop() for k, m in meters.items()}
        elapsed = time.monotonic() - t0
        size1 = log.stat().st_size
        status = call(with_signal.socket, "status", timeout=5.0)
        wrk_text, _ = wrk.communicate(timeout=warm + span + 60)
    finally:
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
            wrk.wait()
        for g in (with_signal, without):
            g.stop()
        front.stop()
    logged = _lines(log, size0, size1)
    pct = {k: round(100 * v / elapsed, 2) for k, v in used.items()}
    nginx_pct = round(sum(v for k, v in pct.items() if k.startswith("nginx_worker")), 2)
    signal_doc = (status.get("signals") or {}).get("traffic") or {}
    guardd_pct = pct["guardd_with_signal"]
    return {
        "span_s": round(elapsed, 1),
        "wanted_rate": CPU_RATE,
        "logged_lines_per_s": round(logged / elapsed),
        "cpu_pct_of_one_core": {
            "guardd_with_signal": guardd_pct,
            "guardd_without_signal": pct["guardd_without_signal"],
            "signal_alone": round(guardd_pct - pct["guardd_without_signal"], 2),
            "nginx_worker": nginx_pct,
        },
        "cpu_s": {k: round(v, 3) for k, v in used.items()},
        "guardd_lines": signal_doc.get("lines"),
        "probe_interval_s": 1.0,
        "wrk_tail": "\n".join(wrk_text.strip().splitlines()[-4:]),
        "target": f"guardd with the signal <= {CPU_TARGET_PCT:g} % of one core",
        "met": guardd_pct <= CPU_TARGET_PCT,
    }


def _floor(answers: list[tuple[float, int]], fault_at: float) -> float | None:
    """The first answer time at which the rule, over the generator's own answers, held."""
    window = float(SIGNAL_WINDOW_S)
    for i, (t, _) in enumerate(answers):
        if t < fault_at:
            continue
        recent = [s for u, s in answers[: i + 1] if u > t - window]
        errors = sum(1 for s in recent if s >= 500)
        if len(recent) >= RULE_MIN_SAMPLES and errors / len(recent) >= RULE_ABOVE:
            return t
    return None


class _Recording(Traffic):
    """The demo's load generator, keeping each answer's wall time and status."""

    def __init__(self, port: int, rate: float) -> None:
        super().__init__(port, rate)
        self.log: list[tuple[float, int]] = []

    def _one(self) -> tuple[str, int]:
        color, status = super()._one()
        self.log.append((time.time(), status))
        return color, status


def run_decision(ctx: Bench, app: TrafficApp) -> dict[str, Any]:
    """First 500 -> `rollback_started`, several trials, each with its own floor."""
    n = 3 if ctx.quick else 10
    log = ctx.root / "traffic-ttd-front" / "guardd.access.log"
    front = Front(
        ctx.root / "traffic-ttd-front",
        app,
        {"blue": "blue", "green": "green"},
        "green",
        traffic_log=log,
    )
    front.start()
    trials: list[dict[str, Any]] = []
    try:
        for i in range(n):
            app.fault("green", on=False)
            g = _guardd(ctx, f"traffic-ttd-{i}", app, interval=1.0, signal_log=log)
            gen = _Recording(front.port, DECISION_RATE)
            try:
                g.start(ctx.hub)
                g.wait_ready(ctx.hub)
                gen.start()
                time.sleep(WARM_S)
                fault_at = app.fault("green")
                deadline = time.monotonic() + 30
                started = None
                while started is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    started = event_time(g.events(), "rollback_started", fault_at - 1)
            finally:
                gen.stop()
                app.fault("green", on=False)
                g.stop()
            first = gen.first_5xx
            floor = _floor(gen.log, fault_at)
            evidence = next(
                (e.get("evidence") for e in g.events() if e.get("event") == "rollback_started"),
                None,
            )
            trials.append(
                {
                    "first_500_to_decision_ms": None
                    if started is None or first is None
                    else round((started - first) * 1000, 1),
                    "first_500_to_floor_ms": None
                    if floor is None or first is None
                    else round((floor - first) * 1000, 1),
                    "floor_to_decision_ms": None
                    if floor is None or started is None
                    else round((started - floor) * 1000, 1),
                    "rule": (evidence or {}).get("rule"),
                    "samples": (evidence or {}).get("samples"),
                    "value": (evidence or {}).get("value"),
                }
            )
            ctx.say(f"traffic decision trial {i + 1}/{n}: {trials[-1]}")
    finally:
        front.stop()

    def col(key: str) -> list[float]:
        return [t[key] for t in trials if t[key] is not None]

    decided = col("first_500_to_decision_ms")
    stats = summary(decided)
    return {
        "rate": DECISION_RATE,
        "error_share": TrafficApp.ERROR_SHARE,
        "warm_s": WARM_S,
        "rule": {
            "stat": "error_ratio",
            "above": RULE_ABOVE,
            "min_samples": RULE_MIN_SAMPLES,
            "window_s": SIGNAL_WINDOW_S,
            "for_s": 0,
        },
        "trials": trials,
        "decided": f"{len(decided)}/{n}",
        "first_500_to_decision_ms": stats,
        "first_500_to_floor_ms": summary(col("first_500_to_floor_ms")),
        "floor_to_decision_ms": summary(col("floor_to_decision_ms")),
        "target": f"first 500 -> rollback_started <= {DECISION_TARGET_MS:g} ms (p95)",
        "met": len(decided) == n
        and stats["p95"] is not None
        and stats["p95"] <= DECISION_TARGET_MS,
    }


def run(ctx: Bench) -> dict[str, Any]:
    """Both measures, on one traffic app."""
    app = TrafficApp(ctx.root / "traffic-app")
    app.start()
    try:
        cpu = run_cpu(ctx, app)
        c = cpu["cpu_pct_of_one_core"]
        ctx.say(
            f"traffic cpu: {cpu['logged_lines_per_s']} lines/s; guardd "
            f"{c['guardd_with_signal']} % (without the signal {c['guardd_without_signal']} %), "
            f"nginx worker {c['nginx_worker']} %"
        )
        decision = run_decision(ctx, app)
        ctx.say(f"traffic decision: {decision['first_500_to_decision_ms']}")
    finally:
        app.stop()
    return {"cpu": cpu, "decision": decision}
