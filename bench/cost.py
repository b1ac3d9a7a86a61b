"""Cost per probe and memory: guardd beside the tools people use, in the same minute.

Every subject probes the same steady endpoints at the same rate (10 probes/s) at the
same time, so a busy machine slows them all alike and the ratios stand:

- guardd, interval 300 ms on two colors and the front door (`switch.verify_url`, probed
  at `probe.interval` as well: three probes a round), nginx switcher, metrics on,
  watchdog on; and an idle guardd (interval 1 h) whose CPU over the window is subtracted;
- blackbox_exporter driven through `/probe?module=http_2xx` at 10/s; and an idle one;
- the shell loop `health_guard.sh 0.1 URL` (bash + curl + sleep), children included;
- a bare httpx.AsyncClient loop, the floor of any httpx-based Python prober, and a bare
  asyncio-streams loop, the floor of any Python prober at all (bench/floor.py);
- monit with one HTTP check at its 1 s cycle (CPU per cycle);
- for memory only, a second idle guardd with HTTPS probes (a local TLS upstream per
  color, `probe.ca_file` trusting a private CA) and a `slack` sink (a local Slack-like
  webhook receiver): what TLS and the notification client add to the idle RSS.

After the window the idle plain-HTTP guard starts once more, with `-X importtime`, and a
fresh interpreter imports every module it loaded but guardd's own (`bench.imports`): the
idle RSS its libraries alone come to, reported beside its own.

CPU per probe = (CPU over the window - the idle twin's) / probes the app logged from
that subject in the window; guardd's front-door probes reach the app through the front
nginx and count as probes, as they cost as much. The active guardd and blackbox_exporter
then keep running for the soak, which reads their memory 10 minutes after they started.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A test dependency: the bench runs from the development venv (guardd from a runtime one).
import trustme

from bench.context import Bench
from bench.imports import daemon_modules, library_floor
from bench.nginx import Front
from bench.procstat import CpuMeter, hwm_kib, pss_kib, rss_kib
from bench.stats import ratio
from bench.subjects import (
    BlackboxDriver,
    BlackboxExporter,
    Floor,
    Guardd,
    Monit,
    ShellGuard,
)
from bench.webhook import SlackHook
from tests.harness.hostile import Hostile

RATE = 10.0  # probes per second, for every subject
UA = {
    "guardd": "guardd-cost",
    "guardd_idle": "guardd-idle",
    "guardd_idle_https_slack": "guardd-idle-tls",
    "blackbox_exporter": "Blackbox Exporter",
    "shell_loop": "shell-cost",
    "httpx_floor": "httpx-floor",
    "asyncio_floor": "asyncio-floor",
    "monit": "Monit",
}


@dataclass
class Soak:
    """The cost subjects; the active guardd and blackbox_exporter outlive the cost window."""

    ctx: Bench
    duration: float
    front: Front
    guardd: Guardd
    guardd_idle: Guardd
    blackbox: BlackboxExporter
    blackbox_idle: BlackboxExporter
    driver: BlackboxDriver
    shell: ShellGuard
    httpx: Floor
    asyncio: Floor
    monit: Monit
    # The idle guardd with HTTPS probes and a Slack sink, its TLS upstreams and receiver.
    idle_tls: Guardd
    tls_upstreams: list[Hostile]
    slack: SlackHook
    started: float = field(default_factory=time.monotonic)
    ready_at: float = 0.0
    samples: list[dict[str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _sampler: threading.Thread | None = None
    extras_stopped: bool = False

    def _sample(self) -> dict[str, float]:
        row = {"t_s": round(time.monotonic() - self.started, 1)}
        for name, pid in (("guardd", self.guardd.pid), ("blackbox_exporter", self.blackbox.pid)):
            row[f"{name}_rss_mib"] = round(rss_kib(pid) / 1024, 1)
        return row

    def _run(self) -> None:
        while not self._stop.wait(30.0):
            self.samples.append(self._sample())

    def idle_tls_probes(self) -> int:
        """Requests the HTTPS upstreams answered (the idle guard's probes at start)."""
        return sum(u.requests for u in self.tls_upstreams)

    def retire_extras(self) -> None:
        """Stop everything but the soak's guardd and blackbox_exporter."""
        if self.extras_stopped:
            return
        self.extras_stopped = True
        for stop in (
            self.shell.stop,
            self.httpx.stop,
            self.asyncio.stop,
            self.monit.stop,
            self.guardd_idle.stop,
            self.blackbox_idle.stop,
            self.idle_tls.stop,
            *(u.stop for u in self.tls_upstreams),
            self.slack.stop,
        ):
            stop()

    def finish(self) -> dict[str, Any]:
        """Wait out the soak; memory then, and the samples on the way."""
        self.retire_extras()
        remaining = self.duration - (time.monotonic() - self.started)
        if remaining > 0:
            self.ctx.say(f"soak: {remaining:.0f}s to go")
            time.sleep(remaining)
        final = self._sample()
        g = self.guardd.pid
        return {
            "duration_s": round(time.monotonic() - self.started, 1),
            "guardd_probes_logged": sum(
                1 for h in self.ctx.app.hits() if h.ua.startswith(UA["guardd"])
            ),
            "guardd_rss_mib": final["guardd_rss_mib"],
            "guardd_pss_mib": round(pss_kib(g) / 1024, 1),
            "guardd_peak_rss_mib": round(hwm_kib(g) / 1024, 1),
            "blackbox_exporter_rss_mib": final["blackbox_exporter_rss_mib"],
            "samples": self.samples,
        }

    def stop(self) -> None:
        """Stop every subject."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        self.retire_extras()
        self.driver.stop()
        self.guardd.stop()
        self.blackbox.stop()
        self.front.stop()


def start_soak(ctx: Bench, duration: float) -> Soak:
    """Start every cost subject and wait until each is probing."""
    app = ctx.app
    steady = {"blue": [app.url("sblue")], "green": [app.url("sgreen")]}
    front = Front(ctx.root / "cost-front", app, {"blue": "sblue", "green": "sgreen"}, "blue")
    front.start()
    switch = Guardd.nginx_switch(front)
    mark = app.mark()
    g = Guardd(
        ctx.root,
        "cost",
        upstreams=steady,
        # Each round probes blue, green and the front door.
        interval=3 / RATE,
        switch=switch,
        user_agent=UA["guardd"],
    ).start(ctx.hub)
    gi = idle_guardd(ctx, steady, idle_switch(ctx, front, "idle")).start(ctx.hub)
    tls_upstreams, ca_file = start_tls_upstreams(ctx)
    slack = SlackHook().start()
    tls_switch = idle_switch(ctx, front, "idle-tls")
    gt = idle_tls_guardd(ctx, tls_upstreams, ca_file, slack, tls_switch).start(ctx.hub)
    bb = BlackboxExporter(ctx.root / "blackbox").start()
    bbi = BlackboxExporter(ctx.root / "blackbox-idle").start()
    driver = BlackboxDriver(bb, [app.url("sblue"), app.url("sgreen")], RATE).start()
    shell = ShellGuard(
        ctx.root / "shell-cost",
        interval=1 / RATE,
        url=app.url("sblue"),
        user_agent=UA["shell_loop"],
    ).start()
    urls = [app.url("sblue"), app.url("sgreen")]
    hx = Floor(ctx.root / "floors", "httpx", urls, 1 / RATE).start()
    aio = Floor(ctx.root / "floors", "asyncio", urls, 1 / RATE).start()
    monit = Monit(ctx.root / "monit-cost", port=app.port_of["sblue"]).start()
    soak = Soak(
        ctx,
        duration,
        front,
        g,
        gi,
        bb,
        bbi,
        driver,
        shell,
        hx,
        aio,
        monit,
        gt,
        tls_upstreams,
        slack,
    )
    try:
        g.wait_ready(ctx.hub)
        gi.wait_ready(ctx.hub)
        gt.wait_ready(ctx.hub)
        for key in (
            "guardd",
            "blackbox_exporter",
            "shell_loop",
            "httpx_floor",
            "asyncio_floor",
            "monit",
        ):
            ctx.wait_hit(mark, 60, ua=UA[key])
    except BaseException:
        soak.stop()
        raise
    soak.ready_at = time.monotonic()
    soak._sampler = threading.Thread(target=soak._run, name="soak", daemon=True)
    soak._sampler.start()
    return soak


def idle_switch(ctx: Bench, front: Front, name: str) -> dict[str, Any]:
    """The `[switch]` of the idle guard `name`: the front's, through a link of its own (the
    front's is the measured guard's)."""
    return Guardd.nginx_switch(front, link=ctx.root / f"{name}-link" / "app_active.conf")


def idle_guardd(ctx: Bench, upstreams: dict[str, list[str]], switch: dict[str, Any]) -> Guardd:
    """The idle guardd (interval 1 h, plain-HTTP probes, no sink), not started."""
    return Guardd(
        ctx.root,
        "idle",
        upstreams=upstreams,
        interval=3600.0,
        switch=switch,
        user_agent=UA["guardd_idle"],
        # The QoS and policy windows must hold policy.min_samples probes at this interval.
        qos_window="6h",
        policy={"window": "6h"},
    )


def idle_tls_guardd(
    ctx: Bench,
    tls_upstreams: list[Hostile],
    ca_file: Path,
    slack: SlackHook,
    switch: dict[str, Any],
) -> Guardd:
    """The idle guardd with HTTPS probes (trusting `ca_file`) and a `slack` sink, not started."""
    return Guardd(
        ctx.root,
        "idle-tls",
        upstreams={c: [u.url] for c, u in zip(("blue", "green"), tls_upstreams, strict=True)},
        interval=3600.0,
        switch=switch,
        user_agent=UA["guardd_idle_https_slack"],
        qos_window="6h",
        policy={"window": "6h"},
        probe={"ca_file": str(ca_file)},
        extra_toml=f'\n[[notify]]\nkind = "slack"\nurl = "{slack.url}"\n',
    )


def start_tls_upstreams(ctx: Bench) -> tuple[list[Hostile], Path]:
    """Two HTTPS health endpoints with a certificate from a private CA, and the CA's PEM."""
    ca = trustme.CA()
    ca_file = ctx.root / "bench-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ups = [Hostile("ok", tls=server, color=c) for c in ("blue", "green")]
    for u in ups:
        u.start()
    return ups, ca_file


def _curl_peak_rss_kib(url: str) -> int:
    # The shell loop's memory is bash's plus that of the curl it forks on every probe.
    proc = subprocess.Popen(["curl", "-fsS", "-m", "2", "-o", "/dev/null", url])
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return int(usage.ru_maxrss)


def run(ctx: Bench, soak: Soak) -> dict[str, Any]:
    """Measure one window with every subject probing; then retire all but the soak's."""
    window = 15.0 if ctx.quick else 60.0
    settle = 3.0 - (time.monotonic() - soak.ready_at)
    if settle > 0:
        time.sleep(settle)
    pids = {
        "guardd": soak.guardd.pid,
        "guardd_idle": soak.guardd_idle.pid,
        "guardd_idle_https_slack": soak.idle_tls.pid,
        "blackbox_exporter": soak.blackbox.pid,
        "blackbox_exporter_idle": soak.blackbox_idle.pid,
        "shell_loop": soak.shell.proc.pid if soak.shell.proc else 0,
        "httpx_floor": soak.httpx.pid,
        "asyncio_floor": soak.asyncio.pid,
        "monit": soak.monit.proc.pid if soak.monit.proc else 0,
    }
    meters = {k: CpuMeter(pid, children=k == "shell_loop") for k, pid in pids.items()}
    ctx.say(f"cost: measuring {window:.0f}s")
    mark = ctx.app.mark()
    t0 = time.time()
    for m in meters.values():
        m.start()
    time.sleep(window)
    for m in meters.values():
        m.stop()
    t1 = time.time()
    rss = {k: round(rss_kib(pid) / 1024, 1) for k, pid in pids.items()}
    pss = {k: round(pss_kib(pid) / 1024, 1) for k, pid in pids.items()}
    # Through the front nginx come only guardd's front-door probes (every other subject
    # dials the app directly): they are probes it sent, at the same cost as the others.
    hits = [h for h in ctx.app.hits(mark) if t0 <= h.t <= t1]

    def probes(key: str) -> int:
        return sum(1 for h in hits if h.ua.startswith(UA[key]))

    cpu = {k: m.used or 0.0 for k, m in meters.items()}
    n = {
        k: probes(k)
        for k in (
            "guardd",
            "blackbox_exporter",
            "shell_loop",
            "httpx_floor",
            "asyncio_floor",
            "monit",
        )
    }
    curl_kib = _curl_peak_rss_kib(ctx.app.url("sblue"))
    soak.retire_extras()
    # Under the idle guard's RSS, what its libraries alone come to (bench.imports): it
    # starts once more, with -X importtime, now that the window is over.
    floor = library_floor(
        soak.guardd_idle.installed.python,
        daemon_modules(soak.guardd_idle, ctx.hub),
        1 if ctx.quick else 3,
    )

    def per_probe_us(busy: float, idle: float, count: int) -> float | None:
        return round((busy - idle) / count * 1e6, 1) if count else None

    subjects: dict[str, Any] = {
        "guardd": {
            "probes": n["guardd"],
            "front_door_probes": sum(
                1 for h in hits if h.via_front and h.ua.startswith(UA["guardd"])
            ),
            "cpu_s": round(cpu["guardd"], 3),
            "idle_cpu_s": round(cpu["guardd_idle"], 3),
            "idle_cpu_ms_per_s": round(cpu["guardd_idle"] / (t1 - t0) * 1000, 3),
            "cpu_per_probe_us": per_probe_us(cpu["guardd"], cpu["guardd_idle"], n["guardd"]),
            "cpu_per_probe_us_idle_included": per_probe_us(cpu["guardd"], 0, n["guardd"]),
            "rss_mib": rss["guardd"],
            "pss_mib": pss["guardd"],
            "idle_rss_mib": rss["guardd_idle"],
            "idle_pss_mib": pss["guardd_idle"],
            "idle_libraries_rss_mib": floor["libraries_rss_mib"],
            "idle_libraries_and_a_model_rss_mib": floor["libraries_and_a_model_rss_mib"],
            "idle_https_slack_rss_mib": rss["guardd_idle_https_slack"],
            "idle_https_slack_pss_mib": pss["guardd_idle_https_slack"],
            "idle_https_slack_probes": soak.idle_tls_probes(),
            "idle_https_slack_deliveries": len(soak.slack.received),
        },
        "blackbox_exporter": {
            "probes": n["blackbox_exporter"],
            "cpu_s": round(cpu["blackbox_exporter"], 3),
            "idle_cpu_s": round(cpu["blackbox_exporter_idle"], 3),
            "idle_cpu_ms_per_s": round(cpu["blackbox_exporter_idle"] / (t1 - t0) * 1000, 3),
            "cpu_per_probe_us": per_probe_us(
                cpu["blackbox_exporter"], cpu["blackbox_exporter_idle"], n["blackbox_exporter"]
            ),
            "rss_mib": rss["blackbox_exporter"],
            "idle_rss_mib": rss["blackbox_exporter_idle"],
            "driver_sent": soak.driver.sent,
            "driver_succeeded": soak.driver.succeeded,
        },
        "shell_loop": {
            "probes": n["shell_loop"],
            "cpu_s": round(cpu["shell_loop"], 3),
            "cpu_per_probe_us": per_probe_us(cpu["shell_loop"], 0, n["shell_loop"]),
            "rss_mib": round(rss["shell_loop"] + curl_kib / 1024, 1),
            "bash_rss_mib": rss["shell_loop"],
            "curl_peak_rss_mib": round(curl_kib / 1024, 1),
        },
        **{
            k: {
                "probes": n[k],
                "cpu_s": round(cpu[k], 3),
                "cpu_per_probe_us": per_probe_us(cpu[k], 0, n[k]),
                "rss_mib": rss[k],
            }
            for k in ("httpx_floor", "asyncio_floor")
        },
        "monit": {
            "probes": n["monit"],
            "cpu_s": round(cpu["monit"], 3),
            "cpu_per_probe_us": per_probe_us(cpu["monit"], 0, n["monit"]),
            "rss_mib": rss["monit"],
        },
    }
    g = subjects["guardd"]["cpu_per_probe_us"]
    return {
        "window_s": round(t1 - t0, 1),
        "rate_per_s": RATE,
        "cpu_measured_by": {k: "schedstat" if m.precise else "ticks" for k, m in meters.items()},
        "subjects": subjects,
        "ratios": {
            f"guardd_over_{k}": ratio(g, subjects[k]["cpu_per_probe_us"])
            for k in ("blackbox_exporter", "shell_loop", "httpx_floor", "asyncio_floor", "monit")
        },
    }
