"""guardd's idle RSS alone, as `make bench`'s cost suite measures it, in about two minutes.

    python -m bench.idle_rss [--runs 3] [--settle 10] [--venv DIR] [--no-reload] [--json]

The two idle guards of `bench/cost.py`, with the same configs (`cost.idle_guardd`,
`cost.idle_tls_guardd`): interval 1 h, nginx switcher, metrics on, watchdog on; one
with plain-HTTP probes and no notification sink, one with HTTPS probes (a private CA in
`probe.ca_file`) and a `slack` sink posting to a local Slack-like receiver. guardd runs
from a runtime-only venv (`uv export --no-dev`, `bench.tools.runtime_install`) as in
`make bench`; `--venv DIR` builds it in DIR, or reuses the one there (guardd reinstalled
from this checkout), for repeated runs.

Each run starts both daemons afresh, waits for READY=1, lets them idle `--settle`
seconds and reads VmRSS from /proc/PID/status; then (unless `--no-reload`) sends SIGHUP,
waits for `config_reloaded` in the journal, idles again and reads it once more. The
figures are the medians over the runs. The cost suite reads its figure after a 60 s
window: `--settle 60` waits as long.

It also prints, from `bench.imports`: the libraries' floor (the plain-HTTP guard started
once more with `-X importtime`, and a fresh interpreter of the same venv importing every
module it loaded but guardd's own, then building one pydantic model: the idle RSS the
libraries alone come to), and what each import of `bench.imports.IMPORTS` adds, in the
order the daemon loads them (a figure is the cost of that import given the ones above
it, not alone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import cost, subjects
from bench.context import Bench
from bench.imports import daemon_modules, import_costs, library_floor
from bench.nginx import AppServer, Front
from bench.notify import NotifyHub
from bench.procstat import rss_kib
from bench.subjects import Guardd, Install
from bench.tools import runtime_install
from bench.webhook import SlackHook


def _wait_event(g: Guardd, kind: str, after: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for e in g.events() if e.get("event") == kind) <= after:
        if g.proc is None or g.proc.poll() is not None:
            raise RuntimeError(f"guardd {g.name} exited:\n{g.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"guardd {g.name}: no {kind} within {timeout:g}s\n{g.log_tail()}")
        time.sleep(0.1)


def _settled_rss_mib(pid: int, settle: float) -> float:
    time.sleep(settle)
    return round(rss_kib(pid) / 1024, 1)


def one_run(
    ctx: Bench, guards: dict[str, Guardd], settle: float, reload: bool
) -> dict[str, dict[str, float]]:
    """Start every guard, read its idle RSS (and again after a SIGHUP reload), stop it."""
    out: dict[str, dict[str, float]] = {k: {} for k in guards}
    try:
        for g in guards.values():
            g.start(ctx.hub)
        for g in guards.values():
            g.wait_ready(ctx.hub)
        time.sleep(settle)
        for key, g in guards.items():
            out[key]["idle_rss_mib"] = round(rss_kib(g.pid) / 1024, 1)
        if reload:
            before = {
                k: sum(1 for e in g.events() if e.get("event") == "config_reloaded")
                for k, g in guards.items()
            }
            for g in guards.values():
                assert g.proc is not None
                g.proc.send_signal(signal.SIGHUP)
            for key, g in guards.items():
                _wait_event(g, "config_reloaded", before[key])
            time.sleep(settle)
            for key, g in guards.items():
                out[key]["after_reload_rss_mib"] = round(rss_kib(g.pid) / 1024, 1)
    finally:
        for g in guards.values():
            g.stop()
    return out


def measure(root: Path, install: Install, runs: int, settle: float, reload: bool) -> dict[str, Any]:
    """The medians of `runs` runs of both idle guards, and the import costs."""
    subjects.INSTALL = install
    app = AppServer(root / "app", {"sblue": "blue", "sgreen": "green"})
    app.start()
    hub = NotifyHub(root / "notify.sock")
    ctx = Bench(root=root, quick=False, app=app, hub=hub)
    front = Front(root / "front", app, {"blue": "sblue", "green": "sgreen"}, "blue")
    front.start()
    ups, ca_file = cost.start_tls_upstreams(ctx)
    slack = SlackHook().start()
    try:
        steady = {"blue": [app.url("sblue")], "green": [app.url("sgreen")]}
        guards = {
            "plain_http": cost.idle_guardd(ctx, steady, cost.idle_switch(ctx, front, "idle")),
            "https_slack": cost.idle_tls_guardd(
                ctx, ups, ca_file, slack, cost.idle_switch(ctx, front, "idle-tls")
            ),
        }
        results = []
        for i in range(runs):
            results.append(one_run(ctx, guards, settle, reload))
            ctx.say(f"run {i + 1}/{runs}: {json.dumps(results[-1])}")
        floor = library_floor(install.python, daemon_modules(guards["plain_http"], hub), runs)
    finally:
        slack.stop()
        for u in ups:
            u.stop()
        front.stop()
        hub.close()
        app.stop()
    medians = {
        key: {
            figure: statistics.median(r[key][figure] for r in results) for figure in results[0][key]
        }
        for key in results[0]
    }
    return {
        "install": install.kind,
        "settle_s": settle,
        "runs": results,
        "median": medians,
        "imports": import_costs(install.python, runs),
        "libraries": floor,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print; `--json` prints the whole document instead of a table."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.idle_rss", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=10.0, help="idle seconds before a reading")
    parser.add_argument(
        "--venv", type=Path, help="where to build the runtime venv, or reuse one built there"
    )
    parser.add_argument("--no-reload", action="store_true", help="skip the SIGHUP reading")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="guardd-idle-rss-"))
    root.chmod(0o700)
    try:
        install = runtime_install(root, args.venv.resolve() if args.venv else None)
        result = measure(root, install, args.runs, args.settle, not args.no_reload)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"guardd from {result['install']}; median of {args.runs} runs, {args.settle:g} s idle")
    for key, figures in result["median"].items():
        shown = ", ".join(f"{k} {v:g} MiB" for k, v in figures.items())
        print(f"  {key:12s} {shown}")
    lib = result["libraries"]
    print(
        f"the libraries alone: the {lib['modules']} modules plain_http's `guardd run` loaded "
        f"besides its {lib['guardd_modules']} own ({lib['modules_not_found']} of them optional "
        f"and not installed), {lib['libraries_rss_mib']:g} MiB; with one pydantic model, "
        f"{lib['libraries_and_a_model_rss_mib']:g} MiB"
    )
    print("import costs (each after the ones above it):")
    for row in result["imports"]:
        print(
            f"  {row['import']:28s} +{row['rss_mib']:5.2f} MiB  "
            f"+{row['modules']:3d} modules  = {row['total_mib']:5.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
