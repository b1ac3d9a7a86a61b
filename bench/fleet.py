"""Fleet bench: time from the fault to every nginx serving only blue, three nodes through
etcd beside one node alone, in the same run.

    uv run --frozen python -m bench.fleet [--trials 5]

`make bench` runs it as the `fleet` suite (`run`), into latest.json and latest.md.
Each trial starts the setup afresh (green active), makes green answer 503 and polls every
nginx on fresh connections; a node counts as done from the first answer of a run of only
blue answers held for `HOLD_S`. The fleet's figure is its slowest node's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.context import Bench
from bench.stats import ratio, summary
from tests.harness.daemon import Lab
from tests.harness.fleet import FleetLab
from tests.harness.nginx import Nginx

HOLD_S = 0.5
TIMEOUT_S = 60.0


def _all_blue_after(fronts: list[Nginx], fault_at: float) -> float:
    """Seconds from `fault_at` until every front has served only blue for HOLD_S."""
    since: list[float | None] = [None] * len(fronts)
    deadline = fault_at + TIMEOUT_S
    while time.monotonic() < deadline:
        for i, front in enumerate(fronts):
            now = time.monotonic()
            if front.served_color() == "blue":
                since[i] = since[i] or now
            else:
                since[i] = None
        starts = [s for s in since if s is not None]
        if len(starts) == len(fronts) and time.monotonic() - max(starts) >= HOLD_S:
            return max(starts) - fault_at
        time.sleep(0.005)
    raise RuntimeError("not every nginx served only blue in time")


def trial_single(tmp: Path) -> float:
    lab = Lab(tmp)
    try:
        lab.daemon()
        fault = time.monotonic()
        lab.green.set_mode("http_503")
        return _all_blue_after([lab.nginx], fault)
    finally:
        lab.close()


def trial_fleet(tmp: Path) -> float:
    fleet = FleetLab(tmp)
    try:
        fleet.start()
        fault = time.monotonic()
        fleet.green.set_mode("http_503")
        return _all_blue_after([lab.nginx for lab in fleet.labs], fault)
    finally:
        fleet.close()


def measure(trials: int, say: Any = print) -> tuple[list[float], list[float]]:
    """`trials` interleaved pairs: (one node's times, the fleet's slowest node's times), s."""
    single: list[float] = []
    fleet: list[float] = []
    for n in range(trials):
        with tempfile.TemporaryDirectory(prefix="guardd-bench-fleet-") as tmp:
            (Path(tmp) / "one").mkdir()
            (Path(tmp) / "fleet").mkdir()
            single.append(trial_single(Path(tmp) / "one"))
            fleet.append(trial_fleet(Path(tmp) / "fleet"))
        say(f"trial {n + 1}: one node {single[-1] * 1000:.0f} ms, fleet {fleet[-1] * 1000:.0f} ms")
    return single, fleet


def run(ctx: Bench) -> dict[str, Any]:
    """The `fleet` suite of `make bench`: both distributions (ms) and their ratio."""
    single, fleet = measure(3 if ctx.quick else 10, ctx.say)
    one, three = summary(single, 1000), summary(fleet, 1000)
    return {
        "hold_s": HOLD_S,
        "one_node_ms": one,
        "fleet_ms": three,
        "fleet_over_one_node_median": ratio(three["median"], one["median"]),
    }


def main() -> None:
    """Run the trials, interleaved, and print both distributions."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    single, fleet = measure(args.trials)
    for name, values in (("one node alone", single), ("3-node fleet (slowest)", fleet)):
        print(
            f"{name:<24} median {statistics.median(values) * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms over {len(values)} trials"
        )


if __name__ == "__main__":
    main()
