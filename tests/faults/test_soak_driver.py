"""`make soak` stays runnable: its driver, run briefly, produces a passing summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.nginx


def test_soak_driver_runs_and_writes_its_summary(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "tests.soak.soak", "--minutes", "0.1", "--out", str(out)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == []
    assert summary["rollbacks"] >= 1 and summary["journal_torn_lines"] == 0
    assert summary["series"] and {"blue", "green"} <= summary["probe_period_s"].keys()
    assert (out / "summary.md").read_text().startswith("# guardd soak: PASS")
