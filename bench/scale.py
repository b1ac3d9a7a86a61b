"""Scale: many guardd instances on one host, and one instance guarding a wide color.

Instances: N guardd processes at a 1 s interval, each guarding its own pair of app
endpoints with the state-file switcher. Over a window: their total CPU (% of one
core), total RSS and PSS, and whether each kept its cadence, judged from the app's
access log (every probe of every instance is a logged request on its own port).

Quorum: one instance whose active color has 100 backend URLs (quorum "majority") at
a falling interval. A round is the 100 requests of one probe of that color (rounds
never overlap: the next starts after the last answer), so the log gives each round's
duration; CPU per round is the process's CPU over the window / rounds.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

from bench.context import Bench
from bench.procstat import CpuMeter, pss_kib, rss_kib
from bench.stats import percentile, summary
from bench.subjects import Guardd

SCALE_INTERVAL = 1.0
WIDE = 100


def run_instances(ctx: Bench) -> dict[str, Any]:
    """N instances at 1 s: total CPU, total memory, cadence."""
    n = 10 if ctx.quick else 50
    window = 20.0 if ctx.quick else 60.0
    app = ctx.app
    guards: list[Guardd] = []
    try:
        for i in range(n):
            pair = {"blue": [app.pool_url(2 * i)], "green": [app.pool_url(2 * i + 1)]}
            root = ctx.root / "scale"
            switch = Guardd.state_file_switch(root / f"state-{i}.json", "green")
            g = Guardd(
                root,
                f"scale{i:02d}",
                upstreams=pair,
                interval=SCALE_INTERVAL,
                switch=switch,
                user_agent=f"guardd-scale{i:02d}",
            )
            guards.append(g.start(ctx.hub))
        t_start = time.monotonic()
        for g in guards:
            g.wait_ready(ctx.hub, timeout=300)
        startup = time.monotonic() - t_start
        ctx.say(f"scale: {n} instances ready in {startup:.1f}s; measuring {window:.0f}s")
        time.sleep(5)
        meters = [CpuMeter(g.pid) for g in guards]
        mark = app.mark()
        t0 = time.time()
        for m in meters:
            m.start()
        time.sleep(window)
        for m in meters:
            m.stop()
        t1 = time.time()
        rss = [rss_kib(g.pid) for g in guards]
        pss = [pss_kib(g.pid) for g in guards]
        hits = [h for h in app.hits(mark) if t0 <= h.t <= t1]
    finally:
        for g in guards:
            g.stop()
    by_port: dict[int, list[float]] = {}
    for h in hits:
        by_port.setdefault(h.port, []).append(h.t)
    expected = int(window / SCALE_INTERVAL)
    on_cadence = 0
    worst_gap = 0.0
    all_gaps: list[float] = []
    for i in range(n):
        ok = True
        for port in (app.pool[2 * i], app.pool[2 * i + 1]):
            times = sorted(by_port.get(port, []))
            gaps = [b - a for a, b in itertools.pairwise(times)]
            all_gaps += gaps
            worst_gap = max([worst_gap, *gaps])
            if len(times) < expected - 1 or (gaps and max(gaps) > 1.5 * SCALE_INTERVAL):
                ok = False
        on_cadence += ok
    cpu = sum(m.used or 0.0 for m in meters)
    return {
        "instances": n,
        "interval_s": SCALE_INTERVAL,
        "window_s": round(t1 - t0, 1),
        "startup_s": round(startup, 1),
        "total_cpu_pct_of_one_core": round(cpu / (t1 - t0) * 100, 2),
        "cpu_pct_per_instance": round(cpu / (t1 - t0) * 100 / n, 3),
        "total_rss_mib": round(sum(rss) / 1024, 1),
        "total_pss_mib": round(sum(pss) / 1024, 1),
        "rss_per_instance_mib": round(statistics.median(rss) / 1024, 1),
        "instances_on_cadence": on_cadence,
        "probe_gap_ms": summary(all_gaps, 1000),
        "worst_gap_ms": round(worst_gap * 1000, 1),
        "target": {"total_cpu_pct": 10.0, "all_on_cadence": True},
        "met": cpu / (t1 - t0) * 100 <= 10.0 and on_cadence == n,
    }


def run_quorum(ctx: Bench) -> dict[str, Any]:
    """One instance, its active color 100 URLs wide, at a falling interval."""
    intervals = (2.0, 0.5, 0.25, 0.1) if ctx.quick else (2.0, 1.0, 0.5, 0.25, 0.1, 0.05)
    app = ctx.app
    wide_ports = set(app.pool[:WIDE])
    rows: list[dict[str, Any]] = []
    for interval in intervals:
        window = max(6.0, 4 * interval) if ctx.quick else max(10.0, 6 * interval)
        root = ctx.root / "quorum"
        switch = Guardd.state_file_switch(root / "state.json", "green")
        g = Guardd(
            root,
            f"wide{int(interval * 1000)}",
            upstreams={"green": [app.pool_url(i) for i in range(WIDE)], "blue": [app.url("sblue")]},
            quorum="majority",
            interval=interval,
            switch=switch,
            user_agent=f"guardd-wide{int(interval * 1000)}",
        )
        mark = app.mark()
        g.start(ctx.hub)
        try:
            g.wait_ready(ctx.hub)
            time.sleep(2)
            meter = CpuMeter(g.pid)
            t0 = time.time()
            meter.start()
            time.sleep(window)
            meter.stop()
            t1 = time.time()
        finally:
            g.stop()
        ua = f"guardd-wide{int(interval * 1000)}"
        times = sorted(h.t for h in app.hits(mark) if h.ua == ua and h.port in wide_ports)
        rounds = [times[i : i + WIDE] for i in range(0, len(times) - WIDE + 1, WIDE)]
        in_window = [r for r in rounds if t0 <= r[0] <= t1]
        durations = [r[-1] - r[0] for r in in_window]
        starts = [r[0] for r in in_window]
        periods = [b - a for a, b in itertools.pairwise(starts)]
        # Rounds per second from the first round's start to the last's: no edge effects.
        achieved = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else 0.0
        cpu = meter.used or 0.0
        p95 = percentile(durations, 0.95)
        rows.append(
            {
                "interval_ms": round(interval * 1000),
                "rounds": len(in_window),
                "rounds_per_s": round(achieved, 2),
                "target_rounds_per_s": round(1 / interval, 2),
                "cpu_per_round_ms": round(cpu / len(in_window) * 1000, 2) if in_window else None,
                "cpu_pct_of_one_core": round(cpu / (t1 - t0) * 100, 1),
                "round_ms": summary(durations, 1000),
                "period_ms": summary(periods, 1000),
                "window_s": round(t1 - t0, 1),
                "on_cadence": achieved >= 0.95 / interval and (p95 is not None and p95 < interval),
            }
        )
        ctx.say(
            f"quorum {interval * 1000:.0f}ms: {achieved:.2f} rounds/s, "
            f"round p50 {rows[-1]['round_ms']['median']}ms, cpu {rows[-1]['cpu_pct_of_one_core']}%"
        )
    kept = [r["interval_ms"] for r in rows if r["on_cadence"]]
    lost = [r["interval_ms"] for r in rows if not r["on_cadence"]]
    return {
        "urls": WIDE,
        "quorum": "majority",
        "intervals": rows,
        "shortest_interval_on_cadence_ms": min(kept) if kept else None,
        "first_interval_off_cadence_ms": max(lost) if lost else None,
    }
