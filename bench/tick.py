"""The CPU cost of one decision tick, beside the implementation before it, in the same run.

    python -m bench.tick [--ticks 20000] [--rounds 5] [--out DIR]

Two paths, each fed the same generated probe history (fixed seed) by both implementations:

- `core`: the pure machine, as a replay of probe history drives it: two
  `GuardMachine.observe` (one per color) and one `GuardMachine.decide` per tick, with the
  default `[policy]` and a probe every 200 ms;
- `guard`: the daemon's tick, `Guard.tick` with two `Guard.observe` before it (metrics,
  state file, QoS keeper; `guardd.testing.build_guard`, a manual clock, no I/O but the
  state file), as each probe round of a running guard pays it.

Each history is `steady` (every probe passes, latency uniform in 1-20 ms) or `mixed`
(jitter, 2 % failed probes, slow spells that bring P2 and P1 latency alerts, short
outages of the standby).

The peer, `base`, is guardd as it was before the tick was made cheaper (commit `BASE`,
taken with `git archive` into a temp dir and run in a child interpreter that imports it
instead of this tree). Rounds alternate between the two; each round reports CPU time
(process time, so other work on the machine slows it less) per tick, and the median
round is kept. Each implementation also hashes every decision of one untimed pass:
`decisions_identical` says whether both decided the same on every tick.

Figures: us per tick for each, the ratio base / new, what a day of probe history at
200 ms (432,000 ticks) costs to replay, and the CPU share of 50 guards probing at 1 s.
Goals: core <= 12 us, guard tick <= 40 us. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

# The child interpreter of a base round puts the base tree first on sys.path before it
# imports this module: these `guardd` imports are then the base's.
import guardd
from bench.context import emit
from guardd.core.machine import Facts, GuardMachine
from guardd.core.policy import PolicySpec
from guardd.core.types import Outcome
from guardd.probes.http import ProbeResult
from guardd.testing import build_guard

#: guardd before the decision tick was made cheaper: the peer of every figure here.
BASE = "7717013bce71211ce36bc921c6600bc3a19f708e"
REPO = Path(__file__).resolve().parent.parent
DAY_TICKS = 432_000  # one tick per 200 ms probe round, 24 h
CORE_GOAL_US = 12.0
GUARD_GOAL_US = 40.0
PATHS = ("core", "guard")
HISTORIES = ("steady", "mixed")
INTERVAL = 0.2

# (blue outcome, blue latency s, green outcome, green latency s) for each tick.
Round = tuple[str, float, str, float]


def history(kind: str, ticks: int, seed: int = 7) -> list[Round]:
    """The probe results of `ticks` rounds, the same for every implementation."""
    rng = random.Random(seed)  # reproducible load, not a secret
    rounds: list[Round] = []
    for i in range(ticks):
        if kind == "steady":
            rounds.append(("ok", rng.uniform(0.001, 0.02), "ok", rng.uniform(0.001, 0.02)))
            continue
        phase = (i // 500) % 8
        green_lat = rng.lognormvariate(-5.0, 0.5)  # about 7 ms
        if phase == 3:
            green_lat *= 40  # a slow spell: hundreds of ms
        green = "http_5xx" if rng.random() < 0.02 else "ok"
        blue = "ok" if phase != 6 or rng.random() < 0.3 else "timeout"
        rounds.append((blue, rng.lognormvariate(-5.0, 0.3), green, green_lat))
    return rounds


def _core(rounds: list[Round], record: Callable[[Any], None] | None) -> float:
    """Seconds of CPU for the pure machine over `rounds`."""
    machine = GuardMachine(PolicySpec(), INTERVAL)
    observe, decide = machine.observe, machine.decide
    outcomes = {o.value: o for o in Outcome}
    now = 1000.0
    started = time.process_time()
    for blue, blue_lat, green, green_lat in rounds:
        now += INTERVAL
        observe("blue", now, outcomes[blue], blue_lat, None)
        observe("green", now + 0.01, outcomes[green], green_lat, None)
        decision = decide(Facts(now=now + 0.01, active="green"))
        if record is not None:
            record((decision, machine.verdicts))
    return time.process_time() - started


def _guard(rounds: list[Round], record: Callable[[Any], None] | None) -> float:
    """Seconds of CPU for `Guard.observe` x 2 + `Guard.tick` over `rounds`."""
    outcomes = {o.value: o for o in Outcome}
    results = [
        (ProbeResult(outcomes[b], bl, None if b == "ok" else b), ProbeResult(outcomes[g], gl))
        for b, bl, g, gl in rounds
    ]
    with tempfile.TemporaryDirectory(prefix="guardd-bench-tick-") as tmp:
        rig = build_guard(Path(tmp), interval=INTERVAL)
        guard, clock = rig.guard, rig.clock

        async def run() -> float:
            started = time.process_time()
            for blue, green in results:
                clock.advance(INTERVAL)
                guard.observe("blue", blue)
                guard.observe("green", green)
                decision = await guard.tick()
                if record is not None:
                    record((decision.state, decision.actions, decision.blocked_by))
            return time.process_time() - started

        return anyio.run(run)


def measure_here(path: str, kind: str, ticks: int, digest: bool) -> dict[str, Any]:
    """One round of `path` on the `kind` history, by whichever guardd this interpreter imports."""
    rounds = history(kind, ticks)
    fn = _core if path == "core" else _guard
    out: dict[str, Any] = {"guardd": str(Path(guardd.__file__).parent)}
    if digest:
        h = hashlib.sha256()
        fn(rounds, lambda d: h.update(repr(d).encode()))
        out["digest"] = h.hexdigest()
    else:
        out["us_per_tick"] = fn(rounds, None) / ticks * 1e6
    return out


def _base_tree(dest: Path) -> str | None:
    """Unpack guardd at `BASE` into `dest`; the reason when it cannot."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", BASE, "guardd"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"cannot take guardd at {BASE[:12]} from git: {e}"
    return None


def _in_base(base: Path, path: str, kind: str, ticks: int, digest: bool) -> dict[str, Any]:
    # A child interpreter whose `guardd` is the base tree (first on sys.path) and whose
    # `bench` is this one.
    code = (
        "import json, sys\n"
        f"sys.path[0:0] = [{str(base)!r}, {str(REPO)!r}]\n"
        "from bench.tick import measure_here\n"
        f"print(json.dumps(measure_here({path!r}, {kind!r}, {ticks}, {digest})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=base, check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["guardd"].startswith(str(base)):  # pragma: no cover - a broken sys.path
        raise RuntimeError(f"the base run imported guardd from {result['guardd']}")
    return result


def measure(ticks: int, rounds: int) -> dict[str, Any]:
    """Both implementations, alternately, on both paths and histories; see the module doc."""
    result: dict[str, Any] = {"ticks": ticks, "rounds": rounds, "base": BASE, "paths": {}}
    tmp = Path(tempfile.mkdtemp(prefix="guardd-bench-base-"))
    # One core for both (the children inherit it), as for the parse suite: the ratio then
    # compares like with like. The caller's affinity is given back.
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        problem = _base_tree(tmp)
        result["base_error"] = problem
        for path in PATHS:
            # The daemon's tick is costlier: fewer ticks give as steady a figure.
            n = ticks if path == "core" else max(1, ticks // 4)
            for kind in HISTORIES:
                new: list[float] = []
                old: list[float] = []
                for _ in range(rounds):
                    new.append(measure_here(path, kind, n, False)["us_per_tick"])
                    if problem is None:
                        old.append(_in_base(tmp, path, kind, n, False)["us_per_tick"])
                row: dict[str, Any] = {
                    "ticks": n,
                    "new_us": round(statistics.median(new), 2),
                    "new_rounds_us": [round(x, 2) for x in new],
                }
                if old:
                    row["base_us"] = round(statistics.median(old), 2)
                    row["base_rounds_us"] = [round(x, 2) for x in old]
                    row["ratio_base_over_new"] = round(row["base_us"] / row["new_us"], 1)
                    mine = measure_here(path, kind, n, True)["digest"]
                    theirs = _in_base(tmp, path, kind, n, True)["digest"]
                    row["decisions_identical"] = mine == theirs
                result["paths"][f"{path}_{kind}"] = row
    finally:
        os.sched_setaffinity(0, before)
        shutil.rmtree(tmp, ignore_errors=True)
    p = result["paths"]
    core_us = max(p["core_steady"]["new_us"], p["core_mixed"]["new_us"])
    guard_us = max(p["guard_steady"]["new_us"], p["guard_mixed"]["new_us"])
    result["core_us"] = core_us
    result["guard_us"] = guard_us
    result["replay_day_s"] = round(core_us * DAY_TICKS / 1e6, 1)
    # 50 guards at 1 s: one tick and two probe rounds a second each (probe I/O not counted).
    result["fifty_guards_pct_of_core"] = round(50 * guard_us / 1e6 * 100, 2)
    result["decisions_identical"] = all(r.get("decisions_identical", False) for r in p.values())
    result["core_goal_us"] = CORE_GOAL_US
    result["guard_goal_us"] = GUARD_GOAL_US
    result["goals_met"] = (
        core_us <= CORE_GOAL_US and guard_us <= GUARD_GOAL_US and result["decisions_identical"]
    )
    result["python"] = sys.version.split()[0]
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure, print the figures as JSON, and optionally write them to DIR/tick.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.tick", description=__doc__)
    parser.add_argument("--ticks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write tick.json here too")
    args = parser.parse_args(argv)
    result = measure(args.ticks, args.rounds)
    emit(result, args.out, "tick.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
