"""`bench.imports`: the modules a daemon loaded, read from its `-X importtime` report, and
what they take in a fresh interpreter without guardd's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import imports


def importtime_report(code: str) -> str:
    """What `python -X importtime` writes to stderr running `code`."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr


def test_the_report_gives_each_module_once_in_the_order_its_import_ended() -> None:
    log = importtime_report("import json; import json; import email.utils")
    modules = imports.imported_modules(log + "\nan unrelated line of the daemon's log\n")
    assert len(modules) == len(set(modules))
    # A package's import ends after the submodules it imports.
    assert modules.index("json.decoder") < modules.index("json")
    assert modules.index("email") < modules.index("email.utils")
    assert not [m for m in modules if " " in m or "|" in m or m.startswith("import")]


def test_a_report_with_no_import_lines_gives_nothing() -> None:
    assert imports.imported_modules("guardd: started\nimport time: self [us] | x\n") == []


def test_the_floor_leaves_guardd_out_and_counts_what_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A guardd module that would fail if imported: left out, never imported.
    (tmp_path / "guardd").mkdir()
    (tmp_path / "guardd" / "__init__.py").write_text("raise SystemExit('imported guardd')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    floor = imports.library_floor(
        Path(sys.executable),
        ["json", "guardd", "guardd.cli", "__main__", "no_such_module_here", "pydantic"],
        runs=1,
    )
    assert floor["modules"] == 3
    assert floor["guardd_modules"] == 3
    assert floor["modules_not_found"] == 1
    assert 0 < floor["libraries_rss_mib"] <= floor["libraries_and_a_model_rss_mib"]


def test_a_module_that_fails_other_than_by_not_being_there_fails_the_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_library.py").write_text("raise RuntimeError('half installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(subprocess.CalledProcessError) as caught:
        imports.library_floor(Path(sys.executable), ["json", "broken_library"], runs=1)
    assert "half installed" in caught.value.stderr
