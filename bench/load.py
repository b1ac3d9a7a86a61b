"""Switch under load: wrk through the guarded nginx while guardd rolls back from a failing green.

Twice: clients that keep connections alive, and clients that send `Connection: close`
(a fresh connection per request). wrk's script counts every response by 10 ms bucket,
status and the color that answered, and every request sent, so each error lands in a
phase: before the rollback started (journal `rollback_started`), during the switch
(until `rollback_completed`), or after it. A 5xx that green answered is the failing
green's; anything else (a 502, a reset, a read error) in the switch phase is the
switch's own. Socket errors carry no time in wrk; requests sent and never answered,
counted per phase, place them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.context import Bench
from bench.journal import event_time
from bench.nginx import Front
from bench.subjects import Guardd

LUA = Path(__file__).parent / "wrk" / "buckets.lua"
CONNECTIONS = 8
PHASES = ("before", "switch", "after")


def _phase(t: float, started: float | None, completed: float | None) -> str:
    if started is None or t < started:
        return "before"
    if completed is None or t < completed:
        return "switch"
    return "after"


def _lost_requests(
    data: dict[str, Any],
    fault_at: float,
    end_bucket: int,
    started: float | None,
    completed: float | None,
) -> dict[str, int]:
    """Requests sent and never answered, by phase.

    Every response is followed at once by the next request on its connection, so the
    running count of requests in flight stays at its level (the connections) except
    for a request lost to a reset: that one stays in flight for good. A rise of the
    running maximum above its level before the fault is such a loss, placed in its
    10 ms bucket. (wrk also counts a keep-alive connection closed while idle as a
    read error; that costs no request and is not counted here.)
    """
    delta: dict[int, int] = defaultdict(int)
    for b, n in data["sent"]:
        delta[b] += n
    for b, _s, _c, n in data["got"]:
        delta[b] -= n
    fault_bucket = int(fault_at * 100)
    in_flight = 0
    level = 0
    lost = dict.fromkeys(PHASES, 0)
    for b in sorted(delta):
        in_flight += delta[b]
        if b >= end_bucket - 10:
            break  # wrk stops with requests in flight: not losses
        if b < fault_bucket:
            level = max(level, in_flight)
        elif in_flight > level:
            lost[_phase(b / 100, started, completed)] += in_flight - level
            level = in_flight
    return lost


def run_mode(ctx: Bench, close: bool, duration: float) -> dict[str, Any]:
    """One wrk run with a rollback in the middle of it."""
    app = ctx.app
    mode = "close" if close else "keepalive"
    front = Front(ctx.root / f"load-{mode}", app, {"blue": "blue", "green": "green"}, "green")
    front.start()
    g = Guardd(
        ctx.root,
        f"load-{mode}",
        upstreams={"blue": [app.url("blue")], "green": [app.url("green")]},
        interval=0.2,
        failures=3,
        switch=Guardd.nginx_switch(front, verify_successes=5),
        user_agent="guardd-load",
    )
    out = ctx.root / f"wrk-{mode}.json"
    env = {**os.environ, "BENCH_WRK_OUT": str(out), "BENCH_CONNECTION_CLOSE": "1" if close else "0"}
    app.fault("green", on=False)
    try:
        g.start(ctx.hub)
        g.wait_ready(ctx.hub)
        time.sleep(1.0)
        wrk = subprocess.Popen(
            [
                "wrk",
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{duration:g}s",
                "--timeout",
                "5s",
                "-s",
                str(LUA),
                front.url,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(duration / 3)
        fault_at = app.fault("green")
        text, _ = wrk.communicate(timeout=duration + 60)
        events = g.events()
    finally:
        app.fault("green", on=False)
        g.stop()
        front.stop()
    data = json.loads(out.read_text())
    started = event_time(events, "rollback_started", fault_at - 1)
    completed = event_time(events, "rollback_completed", fault_at - 1)
    end_bucket = max(b for b, _ in data["sent"])
    responses: dict[str, dict[str, int]] = {p: defaultdict(int) for p in PHASES}
    for b, status, color, n in data["got"]:
        phase = _phase(b / 100, started, completed)
        if 200 <= status < 400:
            kind = "ok"
        elif status >= 500 and color == "green":
            kind = "green_5xx"
        else:
            kind = f"other_{status}"
        responses[phase][kind] += n
    lost = _lost_requests(data, fault_at, end_bucket, started, completed)
    socket_errors = {k: v for k, v in data["errors"].items() if k != "status"}
    switch_errors = sum(v for k, v in responses["switch"].items() if k.startswith("other_"))
    return {
        "mode": mode,
        "connections": CONNECTIONS,
        "duration_s": duration,
        "requests": data["requests"],
        "requests_per_s": round(data["requests"] / (data["duration_us"] / 1e6)),
        "fault_to_rollback_started_ms": None
        if started is None
        else round((started - fault_at) * 1000, 1),
        "switch_phase_ms": None
        if started is None or completed is None
        else round((completed - started) * 1000, 1),
        "responses": {p: dict(sorted(responses[p].items())) for p in PHASES},
        "socket_errors": socket_errors,
        "lost_requests_by_phase": lost,
        "errors_caused_by_switch": switch_errors + lost["switch"],
        "errors_after_switch": sum(v for k, v in responses["after"].items() if k != "ok")
        + lost["after"],
        "failing_green_5xx": sum(responses[p].get("green_5xx", 0) for p in PHASES),
        "wrk_tail": "\n".join(text.strip().splitlines()[-6:]),
    }


def run(ctx: Bench) -> dict[str, Any]:
    """Both client kinds."""
    duration = 6.0 if ctx.quick else 9.0
    modes = {}
    for close in (False, True):
        r = run_mode(ctx, close, duration)
        modes[r["mode"]] = r
        ctx.say(
            f"load {r['mode']}: {r['requests_per_s']} req/s, "
            f"green 5xx {r['failing_green_5xx']}, switch errors {r['errors_caused_by_switch']}, "
            f"socket errors {r['socket_errors']}"
        )
    return {
        "modes": modes,
        "target": "zero errors caused by the switch for clients on fresh connections",
        "met": modes["close"]["errors_caused_by_switch"] == 0
        and modes["close"]["errors_after_switch"] == 0,
    }
