"""guardctl's responsiveness: process start to exit, timed by hyperfine against a live guardd.

hyperfine runs in several short passes over all the commands, and the medians are
taken over every pass, so a burst of load elsewhere hits each command alike.

`python3 -c pass` (the same interpreter, no imports) is timed in the same run, so the
report can say how much of guardctl's time is the interpreter starting at all.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from typing import TYPE_CHECKING, Any

from bench import subjects
from bench.context import Bench
from bench.stats import ratio

if TYPE_CHECKING:
    from bench.cost import Soak

TARGETS_MS = {"status": 150.0, "qos_status": 100.0}


def run(ctx: Bench, soak: Soak | None) -> dict[str, Any]:
    """hyperfine over `guardctl status`, `guardctl qos status` and a bare interpreter."""
    assert soak is not None, "ctl needs the soak's guardd"
    g = soak.guardd
    ctl = subjects.INSTALL.guardctl
    commands = {
        "status": f"{ctl} --socket {g.socket} status",
        "status_json": f"{ctl} --socket {g.socket} status --json",
        "qos_status": f"{ctl} --config {g.config_path} qos status",
        "python_startup": f"{subjects.INSTALL.python} -c pass",
    }
    rounds = 3 if ctx.quick else 5
    per_round = 5 if ctx.quick else 8
    times: dict[str, list[float]] = {name: [] for name in commands}
    codes: dict[str, set[int]] = {name: set() for name in commands}
    for n in range(rounds):
        out_file = ctx.root / f"hyperfine-{n}.json"
        argv = ["hyperfine", "-N", "--ignore-failure", "--warmup", "2", "--runs"]
        argv += [str(per_round), "--style", "none", "--export-json", str(out_file)]
        for name, cmd in commands.items():
            argv += ["--command-name", name, cmd]
        subprocess.run(argv, check=True, capture_output=True, timeout=600)
        for r in json.loads(out_file.read_text())["results"]:
            times[r["command"]] += r["times"]
            codes[r["command"]] |= set(r.get("exit_codes") or [])
    runs = rounds * per_round
    rows: dict[str, Any] = {}
    for name, ts in times.items():
        rows[name] = {
            "median_ms": round(statistics.median(ts) * 1000, 1),
            "mean_ms": round(statistics.fmean(ts) * 1000, 1),
            "stddev_ms": round(statistics.pstdev(ts) * 1000, 1),
            "min_ms": round(min(ts) * 1000, 1),
            "max_ms": round(max(ts) * 1000, 1),
            "runs": len(ts),
            "exit_codes": sorted(codes[name]),
        }
    for name, target in TARGETS_MS.items():
        rows[name]["target_ms"] = target
        rows[name]["met"] = rows[name]["median_ms"] <= target
        rows[name]["over_python_startup"] = ratio(
            rows[name]["median_ms"], rows["python_startup"]["median_ms"]
        )
    return {"runs": runs, "commands": dict(commands.items()), "results": rows}
