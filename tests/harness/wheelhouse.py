"""Wheels of guardd and its locked runtime dependencies, installable offline in the test rootfs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.harness.rootfs import HarnessError

# The rootfs runs Debian's /usr/bin/python3, a CPython 3.11: wheels built by any CPython 3.11
# on this glibc carry the same cp311/manylinux tags.
TARGET_PYTHON = "3.11"


def uv_binary() -> str:
    """The uv that `make` installed or found: ``$UV`` first, as the Makefile exports it.

    `make bootstrap` installs uv into ``~/.cache/guardd-uv`` when none is on PATH, and that
    directory is never on PATH: the Makefile passes its absolute path down as ``UV``.
    Raises HarnessError naming both places when neither has one.
    """
    found = os.environ.get("UV") or shutil.which("uv")
    if not found or not (Path(found).is_absolute() or shutil.which(found)):
        raise HarnessError(
            "no uv: run the tests through `make test` (it installs uv and exports UV), "
            "or set UV=/path/to/uv"
        )
    return found


def build_wheelhouse(project: Path, dest: Path) -> Path:
    """Build wheels of guardd and every runtime dependency into ``dest`` and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    uv = uv_binary()
    _run([uv, "build", "--wheel", "--out-dir", str(dest), str(project)], cwd=project)
    requirements = dest / "requirements.txt"
    exported = _run(
        [
            uv,
            "export",
            "--frozen",
            "--no-dev",
            "--no-emit-project",
            "--no-hashes",
            "--format",
            "requirements-txt",
        ],
        cwd=project,
    )
    requirements.write_text(exported.stdout)
    # `pip wheel`, not `pip download --only-binary`: sdnotify is published as an sdist only.
    _run(
        [
            uv,
            "run",
            "--no-project",
            "--isolated",
            "--python",
            TARGET_PYTHON,
            "--with",
            "pip",
            "--",
            "python",
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--prefer-binary",
            "--wheel-dir",
            str(dest),
            "--requirement",
            str(requirements),
        ],
        cwd=dest,
    )
    guardd_wheel(dest)  # fail here, not at install time, if the project wheel is missing
    return dest


def guardd_wheel(wheelhouse: Path) -> Path:
    """Return the single guardd wheel in ``wheelhouse``."""
    wheels = sorted(wheelhouse.glob("guardd-*.whl"))
    if len(wheels) != 1:
        raise HarnessError(f"expected one guardd wheel in {wheelhouse}, found {wheels}")
    return wheels[0]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a build step, raising with its output when it fails."""
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HarnessError(
            f"`{' '.join(argv)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done
