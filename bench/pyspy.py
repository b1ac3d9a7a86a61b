"""Profile a running guardd with py-spy under one of the bench's workloads.

    python -m bench.pyspy [--scenario single|wide|idle] [--seconds 30] [--py-spy PATH]

Starts the app nginx, a front nginx and one guardd switching it (single: two colors
at 100 ms, the cost suite's workload at twice the rate; wide: a 100-URL color, quorum
majority, at 250 ms; idle: interval 1 h), attaches `py-spy record` for the given
time, and prints the functions with the most samples, inclusive and self, from the
collapsed stacks. The raw stacks and a flame graph land in --out (default: a temp
dir), named after the scenario.
py-spy is not a dependency of guardd: install it where you like (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import cost
from bench.context import COLORS, Bench
from bench.nginx import AppServer, Front
from bench.notify import NotifyHub
from bench.subjects import Guardd


def top(collapsed: Path, n: int = 25) -> str:
    """The `n` frames with most samples, inclusive and self, as text."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")[1:] if ";" in stack else [stack]
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in inclusive.most_common(n)]
    lines += ["", "self:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in own.most_common(n)]
    return "\n".join(lines)


def main() -> int:
    """Run one scenario under py-spy."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.pyspy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", choices=("single", "wide", "idle"), default="single")
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="guardd-profile-"))
    app = AppServer(root / "app", COLORS, pool=100)
    app.start()
    hub = NotifyHub(root / "notify.sock")
    front = Front(root / "front", app, {"blue": "sblue", "green": "sgreen"}, "green")
    front.start()
    switch = Guardd.nginx_switch(front)
    if args.scenario == "wide":
        g = Guardd(
            root,
            "wide",
            upstreams={"green": [app.pool_url(i) for i in range(100)], "blue": [app.url("sblue")]},
            quorum="majority",
            interval=0.25,
            switch=switch,
        )
    elif args.scenario == "single":
        g = Guardd(
            root,
            args.scenario,
            upstreams={"blue": [app.url("sblue")], "green": [app.url("sgreen")]},
            interval=0.1,
            switch=switch,
        )
    else:
        # The cost suite's idle guard (interval 1 h), so that both profile the same one.
        g = cost.idle_guardd(
            Bench(root, quick=True, app=app, hub=hub),
            {"blue": [app.url("sblue")], "green": [app.url("sgreen")]},
            switch,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"guardd-profile-{args.scenario}.txt"
    svg = args.out / f"guardd-profile-{args.scenario}.svg"
    try:
        g.start(hub)
        g.wait_ready(hub)
        time.sleep(2)
        # Collapsed stacks for the table, then a shorter flame graph for people.
        for fmt, path, seconds in (
            ("raw", raw, args.seconds),
            ("flamegraph", svg, min(10, args.seconds)),
        ):
            subprocess.run(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(g.pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    str(args.rate),
                    "--format",
                    fmt,
                    "--output",
                    str(path),
                    "--nonblocking",
                ],
                # py-spy fails when it took no sample (an idle guard may sleep through
                # the flame graph's shorter span): the table's stacks are what count.
                check=fmt == "raw",
                capture_output=True,
            )
    finally:
        g.stop()
        front.stop()
        hub.close()
        app.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(top(raw))
    print(f"\nstacks: {raw}\nflame graph: {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
