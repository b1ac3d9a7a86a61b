"""The `scrape` signal's cost beside Prometheus scraping the same /metrics, in one run.

    uv run --frozen python -m bench.scrape [--series 10000] [--every 5] [--seconds 60] [--out DIR]

One target (a small HTTP server in its own process) serves a fixed exposition of `--series`
series (`agent_runs_total{result}` and gauges). At the same time and for the same span:

- guardd's side: a process that runs `guardd.signals.scrape.ScrapeSignal` (httpx, the
  prometheus_client parser, the selectors, the window) on that target every `--every` s,
  reading a `ratio` as a rule would, every second;
- Debian's /usr/bin/prometheus scraping it at the same interval, and an idle twin (the same
  binary with no target) whose CPU over the span is subtracted, as the `cost` suite does.

CPU is utime + stime from /proc over the span (children not included: none are started);
scrapes are counted by the target, by User-Agent. RSS growth is guardd's process RSS at the
end of the span minus its RSS after its first scrape (the parser's and the window's growth),
with its peak (VmHWM). Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.context import emit
from bench.procstat import cpu_seconds, hwm_kib, rss_kib

PROMETHEUS = "/usr/bin/prometheus"


def exposition(series: int) -> bytes:
    """A /metrics text of `series` series, about 60 bytes each."""
    lines = [
        "# HELP agent_runs_total Agent runs by result.",
        "# TYPE agent_runs_total counter",
        'agent_runs_total{result="ok"} 30000',
        'agent_runs_total{result="failed"} 1000',
        "# HELP app_series A large app's other series.",
        "# TYPE app_series gauge",
    ]
    lines += [f'app_series{{n="{i}",shard="s{i % 16}"}} {i}.5' for i in range(series - 2)]
    return ("\n".join(lines) + "\n").encode()


def serve(body_path: Path, port_file: Path) -> None:
    """The target: /metrics answers the file's bytes; /count the scrapes by User-Agent."""
    body = body_path.read_bytes()
    counts: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:
            if self.path == "/count":
                data = json.dumps(counts).encode()
                ctype = "application/json"
            else:
                agent = self.headers.get("User-Agent", "")
                counts["prometheus" if agent.startswith("Prometheus") else "guardd"] += 1
                data, ctype = body, "text/plain; version=0.0.4; charset=utf-8"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever()


def run_guardd(url: str, every: float, report: Path) -> None:
    """guardd's side: the scrape signal on `url`, read once a second, until SIGTERM."""
    import anyio  # noqa: PLC0415 - only this role needs them

    from guardd.clock import SystemClock  # noqa: PLC0415
    from guardd.signals.scrape import ScrapeSignal, ScrapeSpec  # noqa: PLC0415

    spec = ScrapeSpec(
        urls={"green": url},
        ratio=('agent_runs_total{result="failed"}', "agent_runs_total"),
        every_s=every,
        timeout_s=every,
        window_s=every * 12,
    )
    sig = ScrapeSignal("runs", spec, SystemClock())
    out: dict[str, Any] = {}
    trail: dict[str, int] = {}

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as stop:
            async with anyio.create_task_group() as tg:
                await tg.start(sig.run)

                async def read() -> None:
                    while True:
                        sig.reading("green", SystemClock().monotonic())
                        n = sig.colors["green"].scrapes
                        if n >= 1 and "rss_first_kib" not in out:
                            out["rss_first_kib"] = rss_kib(os.getpid())
                        # RSS after scrape n, to see whether it settles or keeps growing.
                        trail.setdefault(str(n), rss_kib(os.getpid()))
                        await anyio.sleep(1.0)

                tg.start_soon(read)
                async for _ in stop:
                    tg.cancel_scope.cancel()
                    break

    anyio.run(main)
    out.update(
        scrapes=sig.colors["green"].scrapes,
        errors=sig.errors,
        rss_end_kib=rss_kib(os.getpid()),
        hwm_kib=hwm_kib(os.getpid()),
        max_held_bytes=sig.max_held,
        rss_kib_after_scrape=trail,
    )
    report.write_text(json.dumps(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_file(path: Path, proc: subprocess.Popen[bytes], what: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def _prometheus(tmp: Path, name: str, target: str | None, every: float) -> subprocess.Popen[bytes]:
    d = tmp / name
    d.mkdir()
    jobs = (
        [{"job_name": "app", "static_configs": [{"targets": [target]}], "metrics_path": "/metrics"}]
        if target
        else []
    )
    config = {"global": {"scrape_interval": f"{every:g}s"}, "scrape_configs": jobs}
    (d / "prometheus.yml").write_text(json.dumps(config))
    log = (d / "log").open("wb")
    return subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{_free_port()}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _counts(port: int) -> dict[str, int]:
    import httpx  # noqa: PLC0415

    doc: dict[str, int] = httpx.get(f"http://127.0.0.1:{port}/count", timeout=10).json()
    return doc


def measure(series: int, every: float, seconds: float) -> dict[str, Any]:
    """Run the target, guardd's side and Prometheus (and its idle twin) for `seconds`."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="guardd-bench-scrape-") as t:
        tmp = Path(t)
        body = tmp / "metrics.txt"
        body.write_bytes(exposition(series))
        me = [sys.executable, "-m", "bench.scrape"]
        try:
            target = subprocess.Popen([*me, "--serve", str(body), str(tmp / "port")])
            procs.append(target)
            port = int(_wait_file(tmp / "port", target, "the target"))
            url = f"http://127.0.0.1:{port}/metrics"
            report = tmp / "guardd.json"
            guardd = subprocess.Popen([*me, "--guardd", url, str(every), str(report)])
            procs.append(guardd)
            prom = (
                _prometheus(tmp, "prom", f"127.0.0.1:{port}", every)
                if Path(PROMETHEUS).exists()
                else None
            )
            idle = _prometheus(tmp, "idle", None, every) if prom is not None else None
            procs += [p for p in (prom, idle) if p is not None]
            # Warm-up: both have scraped at least twice (imports, first allocations, TSDB).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                c = _counts(port)
                if c.get("guardd", 0) >= 2 and (prom is None or c.get("prometheus", 0) >= 2):
                    break
                time.sleep(0.2)
            c0 = _counts(port)
            cpu0 = {n: cpu_seconds(p.pid) for n, p in _named(guardd, prom, idle).items()}
            time.sleep(seconds)
            c1 = _counts(port)
            cpu1 = {n: cpu_seconds(p.pid) for n, p in _named(guardd, prom, idle).items()}
            guardd.send_signal(signal.SIGTERM)
            guardd.wait(30)
            side = json.loads(report.read_text())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(30)
                if p.poll() is None:
                    p.kill()
                    p.wait()
    cpu = {n: cpu1[n] - cpu0[n] for n in cpu1}
    g_scrapes = c1.get("guardd", 0) - c0.get("guardd", 0)
    p_scrapes = c1.get("prometheus", 0) - c0.get("prometheus", 0)
    out: dict[str, Any] = {
        "series": series,
        "every_s": every,
        "span_s": seconds,
        "exposition_bytes": len(exposition(series)),
        "guardd": {
            "scrapes": g_scrapes,
            "cpu_s": round(cpu["guardd"], 3),
            "cpu_ms_per_scrape": round(1000 * cpu["guardd"] / g_scrapes, 1) if g_scrapes else None,
            "rss_after_first_scrape_kib": side.get("rss_first_kib"),
            "rss_end_kib": side["rss_end_kib"],
            "rss_growth_kib": side["rss_end_kib"] - side.get("rss_first_kib", side["rss_end_kib"]),
            "peak_rss_kib": side["hwm_kib"],
            "rss_kib_after_scrape": side["rss_kib_after_scrape"],
            "errors": side["errors"],
        },
    }
    if "prometheus" in cpu:
        net = cpu["prometheus"] - cpu["idle"]
        out["prometheus"] = {
            "scrapes": p_scrapes,
            "cpu_s": round(cpu["prometheus"], 3),
            "idle_twin_cpu_s": round(cpu["idle"], 3),
            "cpu_ms_per_scrape": round(1000 * net / p_scrapes, 1) if p_scrapes else None,
        }
        g, p = out["guardd"]["cpu_ms_per_scrape"], out["prometheus"]["cpu_ms_per_scrape"]
        out["ratio_cpu_per_scrape_guardd_over_prometheus"] = (
            round(g / p, 2) if g is not None and p else None
        )
    return out


def _named(
    guardd: subprocess.Popen[bytes],
    prom: subprocess.Popen[bytes] | None,
    idle: subprocess.Popen[bytes] | None,
) -> dict[str, subprocess.Popen[bytes]]:
    named = {"guardd": guardd}
    if prom is not None and idle is not None:
        named |= {"prometheus": prom, "idle": idle}
    return named


def main(argv: list[str] | None = None) -> int:
    """Measure and print (and with --out, write scrape.json)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--serve"]:
        serve(Path(args[1]), Path(args[2]))
        return 0
    if args[:1] == ["--guardd"]:
        run_guardd(args[1], float(args[2]), Path(args[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__)
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, help="write scrape.json here too")
    ns = parser.parse_args(args)
    result = measure(ns.series, ns.every, ns.seconds)
    emit(result, ns.out, "scrape.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
