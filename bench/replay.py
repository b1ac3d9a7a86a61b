"""How fast `guardd replay` goes over a day of probe history and over a million
access-log lines, and how much memory it takes.

    uv run --frozen python -m bench.replay [--hours 24] [--lines 1000000] [--rounds 3] [--out DIR]

- `probes`: a day of probe history at a 200 ms interval (both colors: about 864,000
  probe rounds), written with the daemon's own `Recorder` into a temp dir, green failing
  for a minute in the middle (one rollback); then `guardd replay --json` over it.
- `access_log`: `--lines` nginx lines at 100 requests a second in guardd's log_format,
  rotated as logrotate leaves them (`access.log.2.gz`, `access.log.1`, `access.log`),
  with probe history at 1 s beside them; then `guardd replay --json` over both.

Each replay is the real command in its own process, run `--rounds` times over the same
files: the median wall time (each round's beside it) and the highest peak RSS (its VmHWM,
sampled until it exits) are reported. One round is not enough on a shared VM: the same
replay took from 7.9 to 11.8 s in one hour of 2026-12-02, the neighbours' load alone.
Targets: 10 s for the day of probes, 20 s for the million lines; each case says its
ratio to its target and whether it was met. Nothing is asserted. `make bench` runs this
as its `replay` suite (`measure`).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import subjects
from bench.tools import runtime_install
from guardd.observations import Recorder

DAY0 = 1_796_083_200.0  # 2026-12-01T00:00:00Z
BLUE, GREEN = "10.0.0.5:8080", "10.0.1.5:8080"


def _config(tmp: Path, state: Path, interval: str, extra: str = "") -> Path:
    path = tmp / "bench.toml"
    path.write_text(
        f"""instance = "bench"
[upstreams.blue]
url = "http://127.0.0.1:9/healthz"
[upstreams.green]
url = "http://127.0.0.1:10/healthz"
[switch]
kind = "state-file"
path = "{tmp}/deploy-state.json"
[probe]
interval = "{interval}"
[policy]
rollback_to = "blue"
consecutive_failures = 3
window = "30s"
[qos]
window = "1m"
lock_file = "{tmp}/qos.lock"
[state]
dir = "{state}"
{extra}"""
    )
    return path


def write_probes(state: Path, hours: float, interval: float, *, incident: bool) -> int:
    """`hours` of probe rounds of both colors every `interval` s; the record count."""
    clock = {"wall": DAY0, "mono": 1000.0}
    rec = Recorder(
        state / "observations",
        "bench",
        keep_s=3650 * 86400,
        wall=lambda: clock["wall"],
        monotonic=lambda: clock["mono"],
    )
    rec.start(active="green", probe_interval_s=interval)
    rounds = int(hours * 3600 / interval)
    bad = range(rounds // 2, rounds // 2 + int(60 / interval)) if incident else range(0)
    n = 1
    for i in range(rounds):
        for color in ("blue", "green"):
            clock["wall"] += interval / 2
            clock["mono"] += interval / 2
            if color == "green" and i in bad:
                rec.probe(color, "http_5xx", 0.004, "HTTP 503", 503)
            else:
                rec.probe(color, "ok", 0.004, None, 200)
            n += 1
        if len(rec._pending) >= 50_000:  # a batch, as the daemon's writer takes them
            rec.write()
    rec.write()
    rec.close()
    return n


def write_log(logs: Path, lines: int, rate: float) -> None:
    """`lines` lines at `rate` a second from DAY0, in three rotated files."""
    logs.mkdir(parents=True)
    third = lines // 3
    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(gzip.open(logs / "access.log.2.gz", "wt")),
            stack.enter_context((logs / "access.log.1").open("w")),
            stack.enter_context((logs / "access.log").open("w")),
        ]
        _lines(files, lines, third, rate)


def _lines(files: list[Any], lines: int, third: int, rate: float) -> None:
    for i in range(lines):
        status = "502" if i % 50 == 0 else "200"
        doc = {
            "msec": f"{DAY0 + i / rate:.3f}",
            "status": status,
            "upstream_addr": GREEN,
            "upstream_status": status,
            "request_time": "0.005",
            "upstream_response_time": "0.004",
        }
        files[min(2, i // third)].write(json.dumps(doc, separators=(",", ":")) + "\n")


def _hwm_kib(pid: int) -> int | None:
    """The high-water mark of `pid`'s resident memory since its exec (KiB), or None once gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def run_replay(config: Path) -> dict[str, Any]:
    """The real `guardd replay --json` in its own process: wall time, peak RSS, summary.

    The `guardd` of `bench.subjects.INSTALL`: under `make bench` (and `main`) a
    runtime-only venv, as an operator installs it (the development venv's lint tools bring
    rich, which structlog then imports: about 0.25 s more at every start).

    Peak RSS is the child's VmHWM, read every 20 ms until it exits: wait4's ru_maxrss would
    also count the bench's own memory, which a forked child carries over its exec on Linux.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [str(subjects.INSTALL.guardd), "replay", "--config", str(config), "--json"],
            stdout=out,
            stderr=err,
        )
        peak = 0
        while True:
            # WNOWAIT: the child stays a zombie, so it is reaped below, once.
            done = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if done is not None:
                break
            peak = max(peak, _hwm_kib(proc.pid) or 0)
            time.sleep(0.02)
        proc.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"guardd replay failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    doc = json.loads(stdout)
    c = doc["configs"][0]
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak / 1024, 1),
        "records": doc["history"]["records"],
        "ticks": c["ticks"],
        "summary": c["summary"],
        "lines": {k: v["lines"] for k, v in doc["sources"].items()},
    }


#: The targets (seconds of wall time): a day of probes, a million access-log lines.
TARGETS = {"probes": 10.0, "access_log": 20.0}


def rounds(config: Path, n: int) -> dict[str, Any]:
    """`run_replay` `n` times over the same files: the last round's figures, with the
    median of the rounds' seconds in `seconds`, each round's in `rounds_s`, and the
    highest peak RSS."""
    runs = [run_replay(config) for _ in range(max(1, n))]
    return {
        **runs[-1],
        "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
        "rounds_s": [r["seconds"] for r in runs],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }


def measure(hours: float = 24.0, lines: int = 1_000_000, n_rounds: int = 3) -> dict[str, Any]:
    """Both measurements (`make bench`'s `replay` suite): each case's seconds (the median
    of `n_rounds` runs), peak RSS, what was replayed, its target, the ratio seconds /
    target and whether it was met."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="guardd-bench-replay-") as d:
        tmp = Path(d) / "probes"
        tmp.mkdir()
        t = time.perf_counter()
        n = write_probes(tmp / "state", hours, 0.2, incident=True)
        written = time.perf_counter() - t
        print(f"probes: {n} records of {hours:g} h at 200 ms written in {written:.1f}s")
        results["probes"] = {"hours": hours, "records_written": n, **rounds(
            _config(tmp, tmp / "state", "200ms"), n_rounds)}  # fmt: skip
        print(f"probes: {json.dumps(results['probes'])}")
        tmp = Path(d) / "access_log"
        tmp.mkdir()
        rate = 100.0
        write_probes(tmp / "state", lines / rate / 3600, 1.0, incident=False)
        write_log(tmp / "logs", lines, rate)
        signal = f"""
[signals.traffic]
kind = "access_log"
source = "file:{tmp}/logs/access.log"
addresses = {{ blue = ["{BLUE}"], green = ["{GREEN}"] }}
window = "60s"
"""
        results["access_log"] = {"lines_written": lines, **rounds(
            _config(tmp, tmp / "state", "1s", signal), n_rounds)}  # fmt: skip
        print(f"access_log: {json.dumps(results['access_log'])}")
    for case, target in TARGETS.items():
        r = results[case]
        r["target_s"] = target
        r["ratio_to_target"] = round(r["seconds"] / target, 2)
        r["met"] = r["seconds"] <= target
    results["targets"] = {"probes_s": TARGETS["probes"], "access_log_s": TARGETS["access_log"]}
    results["met"] = {case: results[case]["met"] for case in TARGETS}
    return results


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print them (and write `replay.json` to `--out`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each replay (median)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="guardd-bench-replay-venv-") as root:
        subjects.INSTALL = runtime_install(Path(root))
        print(f"guardd from {subjects.INSTALL.kind}")
        results = measure(args.hours, args.lines, args.rounds)
    results["guardd_install"] = subjects.INSTALL.kind
    print(json.dumps(results["met"]))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "replay.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
