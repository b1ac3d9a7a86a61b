"""What guardd's imports cost in resident memory, and what its libraries cost alone.

Two measurements, each in fresh interpreters of the venv under measurement:

- `import_costs`: VmRSS after each import of `IMPORTS`, in about the order `guardd run`
  loads them; a figure is the cost of that import given the ones above it, not alone.
- `library_floor`: the modules a real `guardd run` loaded (`daemon_modules`, from its own
  `-X importtime` report once it is READY), guardd's own left out, imported in the order
  it loaded them, then one pydantic model built. That is the idle RSS any daemon with
  these libraries starts from; the idle daemon's RSS less it is guardd's own share.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.notify import NotifyHub
from bench.subjects import Guardd

# What `guardd run` loads, in about its order: cli.py's own imports, the config's
# (pydantic), the runtime's (anyio, structlog, the supervisor with prometheus_client and
# the guard), what the first `anyio.run` and READY load (asyncio, the control socket),
# then what only some configs load: pydantic-settings with a `GUARDD_<SECTION>__<KEY>`
# variable set, and what HTTPS probes or a notification sink load.
IMPORTS = [
    "guardd.cli",
    "tomllib",
    "pydantic_core",
    "pydantic",
    "pydantic.main",
    "pydantic.fields",
    "guardd.core.policy",
    "guardd.config",
    "anyio",
    "structlog",
    "guardd.logs",
    "guardd.commands",
    "prometheus_client",
    "http.server",
    "guardd.metrics",
    "h11",
    "guardd.probes.http",
    "guardd.observations",
    "guardd.signals",
    "guardd.guard",
    "guardd.supervisor",
    "asyncio",
    "anyio._backends._asyncio",
    "ssl",
    "guardd.control.server",
    "guardd.operator",
    "ctypes",
    "pydantic_settings",
    "httpx",
    "stamina",
    "guardd.notify",
    "guardd.notify.slack",
]

_RSS = """
def rss():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0
"""

_IMPORT_CHILD = (
    "import importlib, json, sys\n"
    + _RSS
    + """
rows = [['(interpreter)', rss(), len(sys.modules)]]
for name in sys.argv[1:]:
    importlib.import_module(name)
    rows.append([name, rss(), len(sys.modules)])
print(json.dumps(rows))
"""
)

# The daemon tried some imports that found nothing (its libraries' optional extras, other
# platforms' modules: `rich`, `nt`): they find nothing here either, and are counted. Any
# other failure is the measurement's, and raised.
_FLOOR_CHILD = (
    "import gc, importlib, json, sys\n"
    + _RSS
    + """
failed = 0
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        failed += 1
libraries = rss()
from pydantic import BaseModel, ConfigDict, Field
class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    interval: float = 1.0
    urls: dict[str, list[str]] = Field(default_factory=dict)
Section(interval=2.0, urls={"blue": ["http://127.0.0.1/"]})
gc.collect()
print(json.dumps({"libraries": libraries, "with_a_model": rss(), "failed": failed}))
"""
)

# `-X importtime` (PYTHONPROFILEIMPORTTIME) writes one line per import to stderr:
# "import time:  self [us] | cumulative | <indented module name>".
_IMPORT_TIME = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def _children(python: Path, code: str, args: list[str], runs: int) -> list[Any]:
    """What `runs` fresh interpreters running `code` with `args` printed, as JSON each;
    out of any directory of the checkout, so that its `guardd` is not the one imported.
    Raises `subprocess.CalledProcessError` when one fails."""
    answers = []
    for _ in range(runs):
        done = subprocess.run(
            [str(python), "-c", code, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            cwd=tempfile.gettempdir(),
        )
        answers.append(json.loads(done.stdout))
    return answers


def import_costs(python: Path, runs: int) -> list[dict[str, Any]]:
    """Per import of `IMPORTS`: the median KiB of RSS it added and the modules it loaded."""
    samples: list[list[list[Any]]] = _children(python, _IMPORT_CHILD, IMPORTS, runs)
    out = []
    for i, (name, _, _) in enumerate(samples[0]):
        added = [s[i][1] - (s[i - 1][1] if i else 0) for s in samples]
        modules = samples[0][i][2] - (samples[0][i - 1][2] if i else 0)
        out.append(
            {
                "import": name,
                "rss_mib": round(statistics.median(added) / 1024, 2),
                "modules": modules,
                "total_mib": round(statistics.median(s[i][1] for s in samples) / 1024, 1),
            }
        )
    return out


def imported_modules(log: str) -> list[str]:
    """The modules an `-X importtime` report names, in the order their imports ended,
    each once."""
    seen: dict[str, None] = {}
    for line in log.splitlines():
        m = _IMPORT_TIME.match(line)
        if m:
            seen.setdefault(m.group(1), None)
    return list(seen)


def daemon_modules(g: Guardd, hub: NotifyHub) -> list[str]:
    """Start `g` with `-X importtime`, wait for READY, stop it: the modules it loaded.

    `g` must be stopped; it is stopped again on return. Its log keeps the report.
    """
    start = g.log_path.stat().st_size if g.log_path.exists() else 0
    g.start(hub, env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        g.wait_ready(hub)
    finally:
        g.stop()
    with g.log_path.open("rb") as f:
        f.seek(start)
        modules = imported_modules(f.read().decode(errors="replace"))
    if not modules:
        raise RuntimeError(f"guardd {g.name}: no -X importtime report in its log")
    return modules


def library_floor(python: Path, modules: list[str], runs: int) -> dict[str, Any]:
    """The median RSS (MiB) of `python` importing `modules` but guardd's, and with one
    pydantic model built as well; how many modules it imported and how many failed."""
    libraries = [m for m in modules if m.split(".")[0] not in ("guardd", "__main__")]
    samples: list[dict[str, int]] = _children(python, _FLOOR_CHILD, libraries, runs)
    return {
        "libraries_rss_mib": round(statistics.median(s["libraries"] for s in samples) / 1024, 1),
        "libraries_and_a_model_rss_mib": round(
            statistics.median(s["with_a_model"] for s in samples) / 1024, 1
        ),
        "modules": len(libraries),
        "modules_not_found": samples[0]["failed"],
        "guardd_modules": len(modules) - len(libraries),
    }
