"""The tools the suite compares against, installed from Debian when missing, and the machine."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.subjects import Install

# command -> Debian package
TOOLS = {
    "nginx": "nginx-light",
    "wrk": "wrk",
    "prometheus-blackbox-exporter": "prometheus-blackbox-exporter",
    "monit": "monit",
    "hyperfine": "hyperfine",
    "curl": "curl",
}
_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def which(cmd: str) -> str | None:
    """The path of `cmd`, looking in sbin too."""
    return shutil.which(cmd, path=_PATH)


def ensure_tools() -> list[str]:
    """Install the Debian packages of missing tools (as root); the packages installed."""
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if which(cmd) is None})
    if not missing:
        return []
    if os.geteuid() != 0:
        raise SystemExit(f"bench: missing {', '.join(missing)}; install them or run as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"bench: installing {' '.join(missing)}", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    # monit and blackbox_exporter come with system services; the suite runs its own copies,
    # so a policy-rc.d keeps the packages from starting theirs (unless one is already there).
    policy = Path("/usr/sbin/policy-rc.d")
    placed = not policy.exists()
    if placed:
        policy.write_text("#!/bin/sh\n# placed by guardd's bench while it installs\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env=env,
            timeout=900,
            stdout=subprocess.DEVNULL,
        )
    finally:
        if placed:
            policy.unlink(missing_ok=True)
    still = [cmd for cmd in TOOLS if which(cmd) is None]
    if still:
        raise SystemExit(f"bench: still missing after apt-get: {', '.join(still)}")
    return missing


def runtime_install(root: Path, venv: Path | None = None, source: Path | None = None) -> Install:
    """guardd as an operator installs it: a venv with its runtime dependencies only.

    The development venv also holds the test and lint tools, and some of them change
    what guardd loads (structlog imports rich when it can find it), so the figures
    would not be an installed guardd's. The locked versions come from `uv export
    --no-dev`, from uv's cache when it has them, bytecode compiled at install as a
    package manager would. Falls back to the development venv, and says so, if that
    cannot be built (no uv, no network and an empty cache). `venv` (default
    `root/runtime-venv`) may hold one built before: its packages are synced again and
    guardd reinstalled from this checkout, or from the tree `source` (`bench.ab`: another
    commit's, with its own lock).
    """
    uv = os.environ.get("UV") or which("uv")
    if uv is None:
        print("bench: no uv; measuring the dev venv", file=sys.stderr)
        return Install(Path(sys.executable).parent, "the development venv (no uv)")
    venv = venv or root / "runtime-venv"
    repo = source or Path(__file__).resolve().parent.parent
    py = str(venv / "bin" / "python")
    pip = [uv, "pip", "install", "-q", "--python", py, "--compile-bytecode"]
    req = root / f"{venv.name}-requirements.txt"
    try:
        req.write_text(
            _run(
                [uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "-q"],
                cwd=repo,
            )
        )
        if not (venv / "bin" / "python").exists():
            _run([uv, "venv", "-q", "--python", sys.executable, str(venv)])
        _run([*pip, "-r", str(req)])
        _run([*pip, "--no-deps", "--reinstall", str(repo)])
        frozen = _run([uv, "pip", "freeze", "--python", py]).splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        why = getattr(e, "stderr", None) or str(e)
        print(f"bench: no runtime venv ({why!s:.300}); measuring the dev venv", file=sys.stderr)
        return Install(Path(sys.executable).parent, "the development venv (runtime venv failed)")
    return Install(venv / "bin", "a runtime-only venv (uv export --no-dev)", frozen)


def _run(argv: list[str], cwd: Path | None = None) -> str:
    repo = cwd or Path(__file__).resolve().parent.parent
    done = subprocess.run(argv, cwd=repo, check=True, capture_output=True, text=True, timeout=600)
    return done.stdout


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "unavailable"
    return (
        (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr) else ""
    )


def _version(text: str) -> str:
    found = re.search(r"\d+\.\d+(?:\.\d+)?", text)
    return found.group(0) if found else text


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, kernel and the versions of everything measured."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    os_name = "unknown"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            os_name = line.partition("=")[2].strip('"')
    from guardd._version import __version__  # noqa: PLC0415

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_name,
        "load_avg_at_start": list(os.getloadavg()),
        "versions": {
            "guardd": __version__,
            "python": platform.python_version(),
            "httpx": _pkg_version("httpx"),
            "anyio": _pkg_version("anyio"),
            "pydantic": _pkg_version("pydantic"),
            "nginx": _version(_first_line([which("nginx") or "nginx", "-v"])),
            "curl": _version(_first_line(["curl", "--version"])),
            "bash": _version(_first_line(["bash", "--version"])),
            "monit": _version(_first_line(["monit", "-V"])),
            "blackbox_exporter": _version(
                _first_line(["prometheus-blackbox-exporter", "--version"])
            ),
            "wrk": _version(_first_line(["wrk", "-v"]).replace("debian/", "")),
            "hyperfine": _version(_first_line(["hyperfine", "--version"])),
        },
    }


def _pkg_version(name: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(name)
