"""How fast guardd's access-log signal reads nginx's JSON lines, beside a bare json.loads loop.

    python -m bench.access_log [--lines 300000] [--rounds 5] [--out DIR]

One generated log (guardd's log_format: both colors, 2 % 5xx, some retries and lines of
neither color) is read, in the same run and on the same core, by

- `bare`: `for line in f: json.loads(line)`, the least any Python reader of the log pays,
  with `f` opened in text mode and in binary mode (the faster of the two is the baseline);
- `guardd`: the signal's own path from bytes to counts: read chunks, split lines, parse,
  attribute, place in time and count in the color's window (no shedding budget).

Each is run `--rounds` times alternately and its best round kept (the least disturbed by
other work on the machine). The figures are lines per second and the ratio guardd / bare;
the goals are a ratio of at least 0.5 and at least 100,000 lines/s. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.context import emit
from guardd.clock import SystemClock
from guardd.signals.access_log import READ_CHUNK, AccessLogSignal, AccessLogSpec, _Tail

BLUE = ("10.0.0.5:8080", "10.0.0.6:8080")
GREEN = ("10.0.1.5:8080", "10.0.1.6:8080")


def generate(path: Path, lines: int, seed: int = 1) -> None:
    """Write `lines` log lines in guardd's format."""
    rng = random.Random(seed)
    now = time.time()
    with path.open("w") as f:
        for i in range(lines):
            pick = rng.random()
            if pick < 0.02:
                addr, ustatus, urt = f"{GREEN[0]}, {BLUE[1]}", "502, 200", "0.001, 0.004"
            elif pick < 0.03:
                addr, ustatus, urt = "10.9.9.9:80", "200", "0.002"
            else:
                addr = rng.choice(BLUE + GREEN)
                ustatus = "503" if rng.random() < 0.02 else "200"
                urt = f"{rng.expovariate(200):.3f}"
            record = {
                "msec": f"{now + i / 1000:.3f}",
                "status": ustatus.rpartition(" ")[2],
                "upstream_addr": addr,
                "upstream_status": ustatus,
                "request_time": urt.rpartition(" ")[2],
                "upstream_response_time": urt,
            }
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def bare(path: Path, mode: str) -> tuple[int, float]:
    """Lines read and seconds taken by a bare json.loads loop (text or binary mode)."""
    started = time.perf_counter()
    n = 0
    with path.open(mode) as f:
        for line in f:
            json.loads(line)
            n += 1
    return n, time.perf_counter() - started


def guardd(path: Path, lines: int) -> tuple[int, float, dict[str, int]]:
    """Lines counted and seconds taken by the signal's read, split and parse path."""
    spec = AccessLogSpec(
        source=f"file:{path}",
        addresses={"blue": BLUE, "green": GREEN},
        max_lines_per_s=10 * lines,
    )
    signal = AccessLogSignal("bench", spec, SystemClock())
    fd = os.open(path, os.O_RDONLY)
    try:
        tail = _Tail(fd, (0, 0), 0, 0.0)
        started = time.perf_counter()
        while chunk := os.read(fd, READ_CHUNK):
            signal.ingest(signal._split(tail, chunk))
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    return sum(signal.lines.values()), elapsed, dict(signal.lines)


def main(argv: list[str] | None = None) -> int:
    """Run both readers alternately, print and optionally write the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.access_log", description=__doc__)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write access_log.json here too")
    args = parser.parse_args(argv)
    result = measure(args.lines, args.rounds)
    emit(result, args.out, "access_log.json")
    return 0


def measure(lines: int, rounds: int) -> dict[str, Any]:
    """Lines per second of guardd's parser and of a bare json.loads loop, same file, one core."""
    # One core: both readers on the same one, so the ratio compares like with like; the
    # caller's affinity is given back (`make bench` runs other suites after this one).
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        with tempfile.TemporaryDirectory(prefix="guardd-bench-log-") as tmp:
            log = Path(tmp) / "access.log"
            generate(log, lines)
            best = {"bare_text": float("inf"), "bare_binary": float("inf"), "guardd": float("inf")}
            outcomes: dict[str, int] = {}
            for _ in range(rounds):
                for mode, key in (("r", "bare_text"), ("rb", "bare_binary")):
                    n, elapsed = bare(log, mode)
                    assert n == lines, (key, n)
                    best[key] = min(best[key], elapsed)
                n, elapsed, outcomes = guardd(log, lines)
                assert n == lines, ("guardd", n)
                best["guardd"] = min(best["guardd"], elapsed)
    finally:
        os.sched_setaffinity(0, before)
    # The baseline is the faster of the two bare loops (text mode decodes in C).
    baseline = min(best["bare_text"], best["bare_binary"])
    result: dict[str, Any] = {
        "lines": lines,
        "rounds": rounds,
        "bytes_per_line": round(log_size_per_line(lines), 1),
        "bare_text_lines_per_s": round(lines / best["bare_text"]),
        "bare_binary_lines_per_s": round(lines / best["bare_binary"]),
        "guardd_lines_per_s": round(lines / best["guardd"]),
        "ratio": round(baseline / best["guardd"], 3),
        "outcomes": outcomes,
        "python": sys.version.split()[0],
    }
    result["goals_met"] = result["ratio"] >= 0.5 and result["guardd_lines_per_s"] >= 100_000
    return result


def log_size_per_line(lines: int) -> float:
    """The mean size of a generated line in bytes (a small sample, same generator)."""
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "s.log"
        generate(sample, min(lines, 2000))
        return sample.stat().st_size / min(lines, 2000)


if __name__ == "__main__":
    sys.exit(main())
