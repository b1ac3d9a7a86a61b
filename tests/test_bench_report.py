"""`python -m bench.report`: the targets judged from a results file, and the README's table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import report as bench_report
from bench import run as bench_run

REPO = Path(__file__).resolve().parents[1]
VERSIONED = [
    "guardd",
    "python",
    "httpx",
    "nginx",
    "blackbox_exporter",
    "monit",
    "curl",
    "wrk",
    "hyperfine",
]
BEGIN, END = "<!-- bench-targets:begin -->", "<!-- bench-targets:end -->"


def results(*, idle: float, idle_tls: float, slope: float | None) -> dict[str, Any]:
    """A results file as `make bench` writes it, with the memory figures only."""
    soak = {
        "minutes": 60.0,
        "interval_s": 0.05,
        "rss_slope_after_warmup_kib_per_min": slope,
        "rss_kib_max_per_10min": [45000, 45100, 45100],
        "journal_tail_cap_bytes": 262144,
    }
    return {
        "generated_at": "2026-01-01T00:00:00Z",
        "quick": False,
        "machine": {
            "cpu_model": "Test CPU",
            "cores": 2,
            "memory_gib": 4,
            "os": "Debian",
            "kernel": "6",
            "load_avg_at_start": [0.0, 0.0, 0.0],
            "versions": dict.fromkeys(VERSIONED, "1"),
        },
        "suites": {
            "cost": {
                "ratios": {"guardd_over_blackbox_exporter": 0.4},
                "subjects": {
                    "guardd": {"idle_rss_mib": idle, "idle_https_slack_rss_mib": idle_tls}
                },
            }
        },
        "soak": soak,
    }


def report(tmp: Path, doc: dict[str, Any], readme_text: str) -> tuple[int, str, str]:
    """Run the real command on a results file and a README; (status, stderr, README after)."""
    (tmp / "latest.json").write_text(json.dumps(doc))
    readme = tmp / "README.md"
    readme.write_text(readme_text)
    argv = ["--results", str(tmp / "latest.json"), "--readme", str(readme)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.report", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr, readme.read_text()


def rows(text: str) -> dict[str, list[str]]:
    """The generated table's rows by target name: wanted, measured, ratio, met."""
    block = text[text.index(BEGIN) : text.index(END)]
    out = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("target", "---"):
            out[cells[0]] = cells[1:]
    return out


def test_the_readme_block_is_replaced_and_nothing_else(tmp_path: Path) -> None:
    before = f"# guardd\n\nintro\n\n{BEGIN}\nold hand-made table\n{END}\n\nafter\n"
    status, err, text = report(tmp_path, results(idle=38.5, idle_tls=46.0, slope=2.5), before)
    assert status == 0, err
    assert text.startswith("# guardd\n\nintro\n\n" + BEGIN)
    assert text.endswith(END + "\n\nafter\n")
    assert "old hand-made table" not in text
    table = rows(text)
    assert table["idle RSS, plain-HTTP probes, no notification sink"][1:] == [
        "38.5 MiB",
        "0.96",
        "yes",
    ]
    assert table["idle RSS, HTTPS probes and a Slack sink"][1:] == ["46.0 MiB", "1.02", "**no**"]
    cpu = table["CPU per probe vs blackbox_exporter, fresh connections for both"]
    assert cpu[2:] == ["0.8", "yes"]
    (soak,) = [v for k, v in table.items() if k.startswith("memory over time")]
    assert soak[0] == "< 10 KiB/min" and soak[2:] == ["0.25", "yes"]
    assert "journal tail cap 256 KiB" in soak[1]
    # Generated again from the same figures, the README does not change.
    again = report(tmp_path, results(idle=38.5, idle_tls=46.0, slope=2.5), text)
    assert again[0] == 0 and again[2] == text


def test_a_soak_slope_over_the_bound_is_not_met(tmp_path: Path) -> None:
    status, err, text = report(
        tmp_path, results(idle=41.0, idle_tls=44.0, slope=46.9), f"{BEGIN}\n{END}\n"
    )
    assert status == 0, err
    table = rows(text)
    (soak,) = [v for k, v in table.items() if k.startswith("memory over time")]
    assert soak[2:] == ["4.69", "**no**"]
    assert table["idle RSS, plain-HTTP probes, no notification sink"][3] == "**no**"
    assert table["idle RSS, HTTPS probes and a Slack sink"][3] == "yes"


def test_the_plain_guard_row_says_what_its_libraries_alone_take(tmp_path: Path) -> None:
    doc = results(idle=43.3, idle_tls=44.8, slope=1.0)
    doc["suites"]["cost"]["subjects"]["guardd"]["idle_libraries_and_a_model_rss_mib"] = 38.1
    status, err, text = report(tmp_path, doc, f"{BEGIN}\n{END}\n")
    assert status == 0, err
    table = rows(text)
    assert table["idle RSS, plain-HTTP probes, no notification sink"][1:] == [
        "43.3 MiB (its libraries alone, with one pydantic model: 38.1 MiB)",
        "1.08",
        "**no**",
    ]
    assert table["idle RSS, HTTPS probes and a Slack sink"][1] == "44.8 MiB"


def test_a_readme_without_the_markers_is_refused_untouched(tmp_path: Path) -> None:
    status, err, text = report(
        tmp_path, results(idle=38.0, idle_tls=44.0, slope=1.0), "# no block here\n"
    )
    assert status == 2
    assert "bench-targets:begin" in err
    assert text == "# no block here\n"


def test_rejudge_takes_the_kept_soak_into_the_results(tmp_path: Path) -> None:
    doc = results(idle=39.0, idle_tls=44.0, slope=None)
    del doc["soak"]
    doc["suites"] = {}  # the figures of the suites do not matter here
    (tmp_path / "latest.json").write_text(json.dumps(doc))
    kept = results(idle=0, idle_tls=0, slope=3.0)["soak"] | {"series": [[0, 1, 2, 3]]}
    (tmp_path / "soak.json").write_text(json.dumps(kept))
    argv = ["--results", str(tmp_path / "latest.json"), "--rejudge"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.report", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    after = json.loads((tmp_path / "latest.json").read_text())
    assert after["soak"]["rss_slope_after_warmup_kib_per_min"] == 3.0
    assert "series" not in after["soak"]
    (soak,) = [t for t in after["targets"] if t["target"].startswith("memory over time")]
    assert soak["met"] is True and soak["ratio"] == 0.3
    md = (tmp_path / "latest.md").read_text()
    assert "| 0.3 | yes |" in md


def test_a_run_of_the_ctl_suite_alone_is_reported(tmp_path: Path) -> None:
    """`python -m bench.run --only ctl` starts the cost suite's daemons for the soak only:
    its results have a `cost` with the soak and no subjects, and are reported."""
    doc = results(idle=39.0, idle_tls=44.0, slope=None)
    ctl = {"median_ms": 120.0, "mean_ms": 121.0, "stddev_ms": 3.0, "min_ms": 110.0}
    doc["suites"] = {
        "ctl": {
            "runs": 40,
            "commands": {},
            "results": {
                "status": {**ctl, "max_ms": 130.0, "target_ms": 150.0, "met": True},
                "qos_status": {**ctl, "max_ms": 130.0, "target_ms": 100.0, "met": False},
                "python_startup": {**ctl, "max_ms": 30.0},
            },
        },
        "cost": {"soak": {"minutes": 1.0}},
    }
    doc["targets"] = bench_report.targets(doc)
    text = bench_report.markdown(doc)  # what `bench.run` writes to latest.md
    assert "| guardctl status | 120.0 ms |" in text  # the section of its own
    targets = text[text.index("## Targets") :].split("\n## ")[0]
    table = rows(f"{BEGIN}\n{targets}\n{END}")
    assert table["guardctl status"][1:] == ["120.0 ms", "0.8", "yes"]
    assert table["guardctl qos status"][3] == "**no**"


def test_the_recording_target_shows_each_start_order(tmp_path: Path) -> None:
    """The recording suite measures the pair in both start orders (the pair is not
    symmetric): the target is judged on the median over both, each order's beside it."""
    doc = results(idle=39.0, idle_tls=44.0, slope=None)
    window = {"on": {"probes": 800}, "off": {"probes": 800, "cpu_per_probe_us": 1700.0}}
    doc["suites"] = {
        "recording": {
            "probes_per_s_each": 40.0,
            "windows": [
                {**window, "overhead_pct": pct, "started_first": first}
                for pct, first in ((2.0, "on"), (-0.4, "on"), (3.9, "off"), (4.6, "off"))
            ],
            "overhead_pct_median": 3.0,
            "overhead_pct_median_on_started_first": 0.8,
            "overhead_pct_median_off_started_first": 4.3,
            "target_overhead_pct": 5.0,
            "met": True,
            "recorder_in_process": {"total_us_per_record": 20.5},
            "overhead_pct_from_recorder_cost": 1.2,
            "observations_bytes_per_probe": 16.6,
        }
    }
    doc["targets"] = bench_report.targets(doc)
    targets = bench_report.markdown(doc)
    targets = targets[targets.index("## Targets") :].split("\n## ")[0]
    (row,) = [v for k, v in rows(f"{BEGIN}\n{targets}\n{END}").items() if k.startswith("recording")]
    assert row[0] == "overhead <= 5 %"
    assert row[1].startswith(
        "3.0 % (median of 4 windows, from -0.4 to 4.6 %; 0.8 % with a recording daemon "
        "started first, 4.3 % second)"
    ), row[1]
    assert row[2:] == ["0.6", "yes"]


def test_sigterm_stops_a_bench_run_through_its_cleanup() -> None:
    """SIGTERM raises SystemExit(143) in `python -m bench.run`, so that its `finally`
    blocks stop what it started, as after Ctrl-C."""
    cleaned: list[bool] = []

    def terminated() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            # Python runs the handler at its next instruction; this only bounds the wait
            # if it ever came later (sleep wakes for a signal's handler).
            for _ in range(500):
                time.sleep(0.01)
        finally:
            cleaned.append(True)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        bench_run.stop_on_sigterm()
        with pytest.raises(SystemExit) as stopped:
            terminated()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert cleaned == [True]
