"""Tools the Makefile installs off PATH are passed down, never looked up on PATH.

`make bootstrap` installs uv into ``~/.cache/guardd-uv`` when a machine has none, and that
directory is not on PATH: a test, benchmark or packaging script that ran a bare ``uv``
passed only on machines where someone had installed uv by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness.rootfs import HarnessError
from tests.harness.wheelhouse import uv_binary

ROOT = Path(__file__).resolve().parent.parent
# An argv whose program is a bare "uv" (Python), or a shell line that runs `uv` by name.
BARE_PY = re.compile(r"""[\[(]\s*["']uv["']\s*,""")
BARE_SH = re.compile(r"""(^|[;&|(]\s*|\$\(\s*)uv\s""", re.MULTILINE)


def _sources() -> list[Path]:
    files = [ROOT / "Makefile", ROOT / ".ci" / "run"]
    for folder in ("tests", "bench", "packaging"):
        files += sorted((ROOT / folder).rglob("*.py")) + sorted((ROOT / folder).rglob("*.sh"))
    return [f for f in files if f != Path(__file__).resolve()]


def test_no_source_runs_a_bare_uv() -> None:
    offenders = []
    for path in _sources():
        text = path.read_text()
        pattern = BARE_PY if path.suffix == ".py" else BARE_SH
        offenders += [
            f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            for m in pattern.finditer(text)
        ]
    assert offenders == []


def test_the_makefile_exports_uv() -> None:
    assert re.search(r"^export UV$", (ROOT / "Makefile").read_text(), re.MULTILINE)


def test_uv_binary_takes_the_exported_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "uv"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("UV", str(fake))
    assert uv_binary() == str(fake)


def test_uv_binary_without_uv_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("UV", raising=False)
    with pytest.raises(HarnessError, match="make test"):
        uv_binary()
