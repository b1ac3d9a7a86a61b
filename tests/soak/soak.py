"""The soak: guardd at `interval = 50ms` under a scripted mix of failures, watched for drift.

    python -m tests.soak.soak [--minutes 10] [--out soak-report]

A real lab (two upstreams, a private nginx, `guardd run`) cycles through failures that
must roll back (503, hang, wrong body, both colors down then blue back), noise that must
not (1 % 5xx, slow answers, a failing standby), and operator work (unlock, switch back).
Every few seconds it samples the daemon's RSS, open file descriptors, decision ticks and
probe counts. At the end it fits a line through RSS and fds (the slope per minute), checks
that the probe cadence stayed within 10 % of the interval, and writes `summary.json` and
`summary.md`. Exit status 0 when every bound held, 1 when one did not.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guardd.control import client
from guardd.exceptions import ControlError, Refused
from guardd.journal import RECENT_BYTES
from tests.faults.util import FaultLab, metric, metrics_port, open_fds, rss_kib, scrape, status
from tests.harness.daemon import Daemon, wait_until
from tests.harness.upstream import Mode

MAX_MINUTES = 120.0
INTERVAL = 0.05
SAMPLE_EVERY = 5.0
# Bounds, checked only when the run is long enough for a slope to mean something.
SLOPE_MIN_MINUTES = 3.0
RSS_SLOPE_KIB_PER_MIN = 512.0
# A long run must level off: after its first LONG_WARMUP_MINUTES (imports, pools, the
# journal's in-memory tail filling to its byte bound) RSS may grow by this much at most.
LONG_MIN_MINUTES = 20.0
LONG_WARMUP_MINUTES = 10.0
LONG_RSS_SLOPE_KIB_PER_MIN = 10.0
FD_SLOPE_PER_MIN = 0.5
CADENCE_TOLERANCE = 0.10


@dataclass
class Sample:
    """One look at the daemon."""

    t: float
    rss_kib: int
    fds: int
    ticks: float
    probes: dict[str, float]


@dataclass
class Summary:
    """What the soak saw."""

    minutes: float
    interval_s: float
    phases: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    rss_kib_first: int = 0
    rss_kib_last: int = 0
    rss_slope_kib_per_min: float = 0.0
    # After LONG_WARMUP_MINUTES, for a run of at least LONG_MIN_MINUTES (else None).
    rss_slope_after_warmup_kib_per_min: float | None = None
    # The highest RSS of each 10-minute block: a plateau shows as equal figures.
    rss_kib_max_per_10min: list[int] = field(default_factory=list)
    journal_tail_cap_bytes: int = RECENT_BYTES
    fds_first: int = 0
    fds_last: int = 0
    fd_slope_per_min: float = 0.0
    probe_period_s: dict[str, dict[str, float]] = field(default_factory=dict)
    tick_period_s: dict[str, float] = field(default_factory=dict)
    rollbacks: int = 0
    journal_lines: int = 0
    journal_torn_lines: int = 0
    failures: list[str] = field(default_factory=list)
    # [seconds, rss KiB, fds, decision ticks] per sample, to plot or refit.
    series: list[list[float]] = field(default_factory=list)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in points], [v for _, v in points]).slope * 60.0


class Sampler(threading.Thread):
    """Samples the daemon every `SAMPLE_EVERY` seconds until stopped."""

    def __init__(self, d: Daemon, port: int) -> None:
        super().__init__(name="soak-sampler")
        self.d = d
        self.port = port
        self.samples: list[Sample] = []
        self.stop_event = threading.Event()
        self.started = time.monotonic()

    def take(self) -> None:
        """One sample now."""
        m = scrape(self.port)
        self.samples.append(
            Sample(
                t=time.monotonic() - self.started,
                rss_kib=rss_kib(self.d.pid),
                fds=open_fds(self.d.pid),
                ticks=metric(m, "guardd_decision_ticks_total"),
                probes={c: metric(m, "guardd_probe_total", color=c) for c in ("blue", "green")},
            )
        )

    def run(self) -> None:
        """Sample until told to stop."""
        while True:
            self.take()
            if self.stop_event.wait(SAMPLE_EVERY):
                return


class Script:
    """The scripted mix of failures, one phase after another."""

    def __init__(self, lab: FaultLab, d: Daemon, summary: Summary) -> None:
        self.lab = lab
        self.d = d
        self.summary = summary

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """A control command as root."""
        return client.call(self.lab.socket_path, cmd, args, timeout=30)

    def phase(self, name: str, act: Callable[[], None]) -> None:
        """Run one phase, recording how long it took and whether it went as expected."""
        started = time.monotonic()
        count = len(self.d.events())
        ok, error = True, None
        try:
            act()
        except (AssertionError, ControlError) as e:
            ok, error = False, str(e).splitlines()[0]
            self.summary.failures.append(f"phase {name}: {error}")
            self.back_to_green()  # the next phase starts from the usual place
        events = [e["event"] for e in self.d.events()[count:]]
        self.summary.phases.append(
            {
                "phase": name,
                "ok": ok,
                "error": error,
                "seconds": round(time.monotonic() - started, 2),
                "rollbacks": events.count("rollback_completed"),
                "holds": events.count("hold"),
            }
        )

    def back_to_green(self) -> None:
        """The operator redeploys green: both healthy, lock released, traffic on green."""
        self.lab.blue.set_mode("ok")
        self.lab.green.set_mode("ok")
        # As an operator would, wait until green's failures have left the policy window:
        # switching onto a window still full of them would be rolled back by the ratio rule.
        wait_until(
            lambda: status(self.lab)["upstreams"]["green"]["error_ratio"] == 0,
            60,
            "green's window clean",
        )
        if self.lab.lock_file.exists():
            # The guard window may pass on its own meanwhile: then there is nothing to unlock.
            with contextlib.suppress(Refused):
                self.call("qos_unlock")
        if status(self.lab)["paused"] or status(self.lab)["state"] == "hold":
            self.call("resume")
        if status(self.lab)["active"] != "green":
            self.call("switch", {"color": "green", "force": True, "reason": "soak: redeploy"})
        wait_until(lambda: self.lab.nginx.served_color() == "green", 30, "green served")

    def rollback_on(self, mode: Mode, **kw: Any) -> Callable[[], None]:
        """A phase: green fails in `mode`, guardd must roll back to blue."""

        def act() -> None:
            count = len(self.d.events())
            self.lab.green.set_mode(mode, **kw)
            self.d.wait_event("rollback_completed", after=count, timeout=60)
            assert self.lab.nginx.wait_serving_only("blue", hold=0.3, timeout=30), "blue"
            self.back_to_green()

        return act

    def quiet_during(self, seconds: float, setup: Callable[[], None]) -> Callable[[], None]:
        """A phase: noise for `seconds` that must not move traffic."""

        def act() -> None:
            count = len(self.d.events())
            setup()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                moved = [e for e in self.d.events()[count:] if e["event"] == "rollback_started"]
                assert not moved, f"noise caused a rollback: {moved[0]['reason']}"
                time.sleep(0.5)
            self.back_to_green()

        return act

    def both_down_then_blue_back(self) -> None:
        """A phase: both colors fail (hold), then blue recovers (rollback)."""
        count = len(self.d.events())
        self.lab.blue.set_mode("http_503")
        self.lab.green.set_mode("http_503")
        self.d.wait_event("hold", after=count, timeout=60)
        self.lab.blue.set_mode("ok")
        self.d.wait_event("rollback_completed", after=count, timeout=60)
        self.back_to_green()

    def phases_of_a_cycle(self) -> list[tuple[str, Callable[[], None]]]:
        """One round of the mix, in order."""
        lab = self.lab
        return [
            ("green_503", self.rollback_on("http_503")),
            (
                "noise_1pct_5xx",
                self.quiet_during(
                    10,
                    lambda: lab.green.set_mode(
                        "random_5xx", probability=0.01, seed=len(self.summary.phases)
                    ),
                ),
            ),
            ("green_hang", self.rollback_on("hang")),
            ("slow_green", self.quiet_during(5, lambda: lab.green.set_mode("slow", delay=0.2))),
            ("green_not_json", self.rollback_on("not_json")),
            ("standby_down", self.quiet_during(5, lambda: lab.blue.set_mode("http_503"))),
            ("both_down_then_blue", self.both_down_then_blue_back),
        ]

    def run_until(self, deadline: float) -> None:
        """Cycle through the phases until `deadline` (monotonic); a phase is never cut."""
        while True:
            for name, act in self.phases_of_a_cycle():
                if time.monotonic() >= deadline:
                    return
                self.phase(name, act)


def soak(minutes: float, out: Path, work: Path) -> Summary:
    """Run the soak for `minutes` and return what it saw."""
    summary = Summary(minutes=minutes, interval_s=INTERVAL)
    lab = FaultLab(
        work,
        metrics__listen="127.0.0.1:0",
        probe__interval=f"{INTERVAL}s",
        probe__fast_interval=f"{INTERVAL}s",
        probe__timeout="1s",
        policy__window="5s",
        policy__min_samples=20,
        policy__max_rollbacks=100000,
        qos__window="2s",
    )
    try:
        d = lab.daemon()
        sampler = Sampler(d, metrics_port(d))
        sampler.start()
        script = Script(lab, d, summary)
        try:
            script.run_until(time.monotonic() + minutes * 60)
        finally:
            sampler.stop_event.set()
            sampler.join()
            sampler.take()
        if d.stop() != 0:
            summary.failures.append("guardd did not stop cleanly")
        raw = d.journal_path.read_bytes().split(b"\n")
        summary.journal_lines = len(raw) - 1
        summary.journal_torn_lines = sum(1 for line in raw[:-1] if not _parses(line))
        summary.rollbacks = sum(1 for e in d.events() if e["event"] == "rollback_completed")
        _judge(summary, sampler.samples)
    finally:
        lab.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1) + "\n")
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _judge(summary: Summary, samples: list[Sample]) -> None:
    """Fill in the figures and the failures."""
    summary.samples = len(samples)
    summary.series = [[round(s.t, 1), s.rss_kib, s.fds, s.ticks] for s in samples]
    first, last = samples[0], samples[-1]
    summary.rss_kib_first, summary.rss_kib_last = first.rss_kib, last.rss_kib
    summary.fds_first, summary.fds_last = first.fds, last.fds
    # The first minute is warm-up (imports, pools, caches); the slope is what follows.
    steady = [s for s in samples if s.t >= 60.0] or samples
    summary.rss_slope_kib_per_min = round(slope_per_minute([(s.t, s.rss_kib) for s in steady]), 1)
    summary.fd_slope_per_min = round(slope_per_minute([(s.t, s.fds) for s in steady]), 3)
    blocks: dict[int, int] = {}
    for s in samples:
        block = int(s.t // 600)
        blocks[block] = max(blocks.get(block, 0), s.rss_kib)
    summary.rss_kib_max_per_10min = [blocks[b] for b in sorted(blocks)]
    if summary.minutes >= LONG_MIN_MINUTES:
        late = [(s.t, float(s.rss_kib)) for s in samples if s.t >= LONG_WARMUP_MINUTES * 60]
        summary.rss_slope_after_warmup_kib_per_min = round(slope_per_minute(late), 2)
    pairs = list(itertools.pairwise(samples))
    for color in ("blue", "green"):
        # A color's probes slow down only while it hangs (a probe waits out its timeout).
        periods = [
            (b.t - a.t) / (b.probes[color] - a.probes[color])
            for a, b in pairs
            if b.probes[color] > a.probes[color]
        ]
        summary.probe_period_s[color] = {
            "median": round(statistics.median(periods), 4),
            "min": round(min(periods), 4),
        }
    # A switch holds the tick for its nginx reload and verification; the median window
    # is the cadence, the slowest one shows what a switch costs it.
    ticks = [(b.t - a.t) / max(1.0, b.ticks - a.ticks) for a, b in pairs]
    summary.tick_period_s = {
        "median": round(statistics.median(ticks), 4),
        "max": round(max(ticks), 4),
    }
    if summary.tick_period_s["median"] > INTERVAL * (1 + CADENCE_TOLERANCE):
        summary.failures.append(
            f"decision ticks slower than the interval: "
            f"{summary.tick_period_s['median']}s > {INTERVAL}s + 10 %"
        )
    # Green hangs in some phases (each probe then waits out its timeout); blue never does.
    blue = summary.probe_period_s["blue"]["median"]
    if abs(blue - INTERVAL) > INTERVAL * CADENCE_TOLERANCE:
        summary.failures.append(f"blue probe period {blue}s off the interval")
    if summary.journal_torn_lines:
        summary.failures.append(f"{summary.journal_torn_lines} torn journal lines")
    if summary.minutes >= SLOPE_MIN_MINUTES:
        if summary.rss_slope_kib_per_min > RSS_SLOPE_KIB_PER_MIN:
            summary.failures.append(f"RSS grows {summary.rss_slope_kib_per_min} KiB/min")
        if summary.fd_slope_per_min > FD_SLOPE_PER_MIN:
            summary.failures.append(f"fds grow {summary.fd_slope_per_min}/min")
    late_slope = summary.rss_slope_after_warmup_kib_per_min
    if late_slope is not None and late_slope > LONG_RSS_SLOPE_KIB_PER_MIN:
        summary.failures.append(
            f"RSS grows {late_slope} KiB/min after the first {LONG_WARMUP_MINUTES:g} minutes"
        )


def _markdown(s: Summary) -> str:
    ok = "PASS" if not s.failures else "FAIL"
    lines = [
        f"# guardd soak: {ok}",
        "",
        (
            f"{s.minutes:g} minutes at `interval = {s.interval_s * 1000:g}ms`, "
            f"{s.samples} samples, {s.rollbacks} rollbacks."
        ),
        "",
        "| figure | value |",
        "|---|---|",
        f"| RSS first → last | {s.rss_kib_first} → {s.rss_kib_last} KiB |",
        f"| RSS slope (after the first minute) | {s.rss_slope_kib_per_min} KiB/min |",
        *(
            [
                (
                    f"| RSS slope (after the first {LONG_WARMUP_MINUTES:g} minutes) | "
                    f"{s.rss_slope_after_warmup_kib_per_min} KiB/min "
                    f"(bound {LONG_RSS_SLOPE_KIB_PER_MIN:g}) |"
                )
            ]
            if s.rss_slope_after_warmup_kib_per_min is not None
            else []
        ),
        (
            "| RSS, highest of each 10 minutes | "
            + " → ".join(f"{k / 1024:.1f}" for k in s.rss_kib_max_per_10min)
            + " MiB |"
        ),
        f"| journal's in-memory tail, bound | {s.journal_tail_cap_bytes // 1024} KiB of lines |",
        f"| open fds first → last | {s.fds_first} → {s.fds_last} |",
        f"| fd slope (after the first minute) | {s.fd_slope_per_min}/min |",
        *(
            f"| {c} probe period (median, min) | {p['median']} s, {p['min']} s |"
            for c, p in s.probe_period_s.items()
        ),
        (
            f"| decision-tick period over {SAMPLE_EVERY:g} s (median, slowest) | "
            f"{s.tick_period_s['median']} s, {s.tick_period_s['max']} s |"
        ),
        f"| journal lines / torn | {s.journal_lines} / {s.journal_torn_lines} |",
        "",
        "| phase | runs | failed | rollbacks | holds |",
        "|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(p["phase"] for p in s.phases))
    for name in names:
        runs = [p for p in s.phases if p["phase"] == name]
        lines.append(
            f"| {name} | {len(runs)} | {sum(not p['ok'] for p in runs)} | "
            f"{sum(p['rollbacks'] for p in runs)} | {sum(p['holds'] for p in runs)} |"
        )
    if s.failures:
        lines += ["", "Failures:", "", *(f"- {f}" for f in s.failures)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `make soak`."""
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=MAX_MINUTES,
        help=f"how long to soak (at most {MAX_MINUTES:g})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("soak-report"),
        help="where summary.json and summary.md go (default soak-report/)",
    )
    args = parser.parse_args(argv)
    minutes = min(max(args.minutes, 0.1), MAX_MINUTES)
    with tempfile.TemporaryDirectory(prefix="guardd-soak-") as work:
        summary = soak(minutes, args.out, Path(work))
    sys.stdout.write((args.out / "summary.md").read_text())
    return 0 if not summary.failures else 1


if __name__ == "__main__":
    sys.exit(main())
