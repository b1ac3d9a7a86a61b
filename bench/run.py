"""`make bench`: guardd against the tools it replaces, measured side by side in one run.

    python -m bench.run [--quick]
        [--only cost,ctl,ttr,scale,quorum,load,traffic,parse,scrape,fleet,tick,recording,replay]
        [--out DIR]

Suites (bench/README.md says what each measures and why):
  cost    CPU per probe and memory of guardd, blackbox_exporter, the shell loop, monit
          and bare httpx and asyncio loops, all probing at the same rate at the same
          time; the guardd and blackbox_exporter processes stay up for the memory soak
  ctl     wall time of `guardctl status` and `guardctl qos status` (hyperfine)
  ttr     time-to-rollback of guardd, the shell guard and monit on the same faults
  scale   50 guardd instances at 1 s; one instance with a 100-URL color
  load    wrk through nginx during a rollback: where the client-visible errors fall
  traffic guardd's CPU with an access_log signal at 2,000 logged req/s, and the time from
          the first 500 to the traffic rule's rollback decision at 100 req/s
  parse   access-log lines parsed per second by guardd beside a bare json.loads loop
  scrape  CPU per scrape of a 10k-series /metrics by guardd beside Prometheus's own scrape
  fleet   time from the fault to every nginx serving only blue: three guardd nodes through
          a 3-member etcd cluster beside one node alone, interleaved
  tick    CPU per decision tick (pure core; the daemon's Guard.tick) beside guardd before
          the tick was made cheaper, on the same probe history
  recording  CPU per probe of guardd with observations recorded and without, side by side
  replay  wall time of `guardd replay` over a day of probe history at 200 ms and over a
          million access-log lines (bench/replay.py), each beside its target
Every figure lands in DIR/latest.json and DIR/latest.md (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    access_log,
    cost,
    ctl,
    fleet,
    load,
    recording,
    replay,
    report,
    scale,
    scrape,
    subjects,
    tick,
    traffic,
    ttr,
)
from bench.context import COLORS, Bench
from bench.nginx import AppServer
from bench.notify import NotifyHub
from bench.tools import ensure_tools, machine, runtime_install

SUITES = (
    "cost",
    "ctl",
    "ttr",
    "scale",
    "quorum",
    "load",
    "traffic",
    "parse",
    "scrape",
    "fleet",
    "tick",
    "recording",
    "replay",
)
# The soak reads memory this long after the guardd and blackbox_exporter it watches started.
SOAK_S = 600.0
QUICK_SOAK_S = 60.0
# 50 guardd instances plus a 100-URL color: the app needs this many plain endpoints.
POOL = 100


def stop_on_sigterm() -> None:
    """Make SIGTERM (`timeout`, a cancelled job) stop the run as Ctrl-C does, through every
    `finally`: its default action ends the process at once and left the nginx, guardd and
    exporters the run had started running, and its temporary folder behind."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    """Run the suites, write the results; 0 unless a suite crashed."""
    stop_on_sigterm()
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer trials, shorter windows, a 1-minute soak (for development)",
    )
    parser.add_argument(
        "--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites: {', '.join(sorted(unknown))}")

    installed = ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="guardd-bench-"))
    # Root-run nginx workers drop to nobody unless told otherwise; our configs say root,
    # and the temp dir stays private to this user.
    root.chmod(0o700)
    subjects.INSTALL = runtime_install(root)
    started_wall = time.time()
    results: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
        "quick": args.quick,
        "machine": machine(),
        "installed_now": installed,
        "guardd_install": {
            "kind": subjects.INSTALL.kind,
            "packages": subjects.INSTALL.packages,
        },
        "suites": {},
        "errors": {},
    }
    app = AppServer(root / "app", COLORS, pool=POOL)
    app.start()
    hub = NotifyHub(root / "notify.sock")
    ctx = Bench(root=root, quick=args.quick, app=app, hub=hub)
    soak: cost.Soak | None = None
    runners: dict[str, Callable[[], Any]] = {
        "ctl": lambda: ctl.run(ctx, soak),
        "ttr": lambda: ttr.run(ctx),
        "scale": lambda: scale.run_instances(ctx),
        "quorum": lambda: scale.run_quorum(ctx),
        "load": lambda: load.run(ctx),
        "traffic": lambda: traffic.run(ctx),
        "parse": lambda: access_log.measure(50_000 if args.quick else 300_000, 5),
        "scrape": lambda: scrape.measure(10_000, 5.0, 30.0 if args.quick else 120.0),
        "fleet": lambda: fleet.run(ctx),
        "tick": lambda: tick.measure(5_000 if args.quick else 20_000, 3 if args.quick else 5),
        "recording": lambda: recording.run(ctx, window=10.0 if args.quick else 20.0, windows=3),
        # The full sizes even with --quick: the targets are set for them (about a minute).
        "replay": replay.measure,
    }
    try:
        if "cost" in only or "ctl" in only:
            ctx.say("cost: starting the subjects")
            soak = cost.start_soak(ctx, QUICK_SOAK_S if args.quick else SOAK_S)
        if "cost" in only and soak is not None:
            _guarded(results, "cost", lambda: cost.run(ctx, soak))
        for name in SUITES[1:]:
            if name in only:
                ctx.say(f"{name}: starting")
                _guarded(results, name, runners[name])
        if soak is not None:
            ctx.say("soak: waiting for the memory reading")
            results["suites"].setdefault("cost", {})["soak"] = soak.finish()
    finally:
        if soak is not None:
            soak.stop()
        hub.close()
        app.stop()
        if args.keep:
            ctx.say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    results["duration_s"] = round(time.time() - started_wall, 1)
    # The hour-long soak is `make soak`'s, kept beside these results; judged with them.
    results["soak"] = report.load_soak(args.out / "soak.json")
    results["targets"] = report.targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "latest.md").write_text(report.markdown(results))
    ctx.say(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    print(report.markdown(results))
    return 1 if results["errors"] else 0


def _guarded(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    # One suite failing must not lose the figures of the others.
    try:
        results["suites"][name] = fn()
    except Exception as e:  # noqa: BLE001 - reported in the results and on stderr
        traceback.print_exc()
        results["errors"][name] = f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    sys.exit(main())
