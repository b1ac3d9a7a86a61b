"""Two builds of guardd side by side: CPU per guard, the same guards, at the same time.

    uv run --frozen python -m bench.ab --base REV [--guards 10] [--interval 1.0]
        [--window 60] [--rounds 2] [--base-set K=V]... [--new-set K=V]... [--out DIR]

`base` is guardd at git revision REV (`git archive`, its own lock), `new` this checkout;
each is installed as an operator would (`bench.tools.runtime_install`). N guards of each
probe their own pair of nginx endpoints every `--interval` s (state-file switcher, metrics
on, the defaults otherwise), started alternately; over each window, their CPU (per-thread
schedstat) gives ms of CPU per second per guard, and the ratio new / base. Rounds
alternate which build starts first, each with fresh daemons: where a process happens to
run moves one daemon's figure by several percent, a group's much less, and a build that
always started first would carry that order's bias. `--base-set`/`--new-set` put
`section.key = value` (TOML) in one side's config: with `--base HEAD`, a same-build
comparison of two settings (recording off: `--new-set state.keep_observations='"0"'`);
with nothing set, an A/A run shows the noise of the method.

Nothing is asserted: the figures are printed as JSON (and written to DIR/ab.json).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.context import COLORS, emit
from bench.nginx import AppServer
from bench.notify import NotifyHub
from bench.procstat import CpuMeter
from bench.subjects import Guardd, Install
from bench.tools import runtime_install

REPO = Path(__file__).resolve().parent.parent
SIDES = ("base", "new")


def _tree(rev: str, dest: Path) -> Path:
    """The files of guardd at `rev`, unpacked into `dest`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev],
        check=True,
        capture_output=True,
    ).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _settings(pairs: list[str]) -> dict[str, str]:
    """`section.key=value` (value as TOML) to {`section.key`: `value`}."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"bench.ab: not section.key=value: {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _apply(config: Path, settings: dict[str, str]) -> None:
    """Put each `section.key = value` at the head of its table in `config`."""
    text = config.read_text()
    for dotted, value in settings.items():
        section, key = dotted.split(".", 1)
        head = f"\n[{section}]\n"
        if head not in text:
            raise SystemExit(f"bench.ab: the guard's config has no [{section}]")
        text = text.replace(head, f"{head}{key} = {value}\n", 1)
    config.write_text(text)


def _round(
    root: Path,
    app: AppServer,
    hub: NotifyHub,
    *,
    installs: dict[str, Install],
    settings: dict[str, dict[str, str]],
    first: str,
    guards: int,
    interval: float,
    window: float,
) -> dict[str, Any]:
    """Fresh guards of both builds, `first`'s started first in each pair; one window."""
    order = (first, next(s for s in SIDES if s != first))
    started: dict[str, list[Guardd]] = {s: [] for s in SIDES}
    try:
        for i in range(guards):
            for side in order:
                n = 2 * (i * 2 + SIDES.index(side))
                name = f"ab-{side}-{first}-first-{i:02d}"
                g = Guardd(
                    root,
                    name,
                    upstreams={"blue": [app.pool_url(n)], "green": [app.pool_url(n + 1)]},
                    interval=interval,
                    switch=Guardd.state_file_switch(root / name / "active.json", "green"),
                    user_agent=f"guardd-{name}",
                )
                g.install = installs[side]
                _apply(g.config_path, settings[side])
                started[side].append(g.start(hub))
        for g in [g for side in started.values() for g in side]:
            g.wait_ready(hub, timeout=300)
        time.sleep(5.0)  # past start-up: first rounds, first batches, threads started
        meters = {s: [CpuMeter(g.pid) for g in started[s]] for s in SIDES}
        for m in [m for side in meters.values() for m in side]:
            m.start()
        t0 = time.monotonic()
        time.sleep(window)
        for m in [m for side in meters.values() for m in side]:
            m.stop()
        seconds = time.monotonic() - t0
    finally:
        for g in [g for side in started.values() for g in side]:
            g.stop()
    row: dict[str, Any] = {"started_first": first, "window_s": round(seconds, 1)}
    for side in SIDES:
        cpu = sum(m.used or 0.0 for m in meters[side])
        row[f"{side}_ms_per_s_per_guard"] = round(cpu / seconds / guards * 1000, 3)
    row["ratio_new_over_base"] = round(
        row["new_ms_per_s_per_guard"] / row["base_ms_per_s_per_guard"], 3
    )
    return row


def measure(
    base: str,
    *,
    guards: int,
    interval: float,
    window: float,
    rounds: int,
    settings: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """Both builds, `rounds` rounds alternating which starts first; see the module doc."""
    root = Path(tempfile.mkdtemp(prefix="guardd-bench-ab-"))
    root.chmod(0o700)
    app = AppServer(root / "app", COLORS, pool=4 * guards)
    app.start()
    hub = NotifyHub(root / "notify.sock")
    try:
        installs = {
            "base": runtime_install(root, root / "base-venv", _tree(base, root / "base-tree")),
            "new": runtime_install(root, root / "new-venv"),
        }
        rows = [
            _round(
                root,
                app,
                hub,
                installs=installs,
                settings=settings,
                first=SIDES[r % 2],
                guards=guards,
                interval=interval,
                window=window,
            )
            for r in range(rounds)
        ]
    finally:
        hub.close()
        app.stop()
        shutil.rmtree(root, ignore_errors=True)
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", base], check=True, capture_output=True, text=True
    ).stdout.strip()
    return {
        "base": revision,
        "new": "this checkout",
        "installs": {s: i.kind for s, i in installs.items()},
        "settings": settings,
        "guards_per_build": guards,
        "interval_s": interval,
        "rounds": rows,
        "ratio_new_over_base_median": round(
            statistics.median(r["ratio_new_over_base"] for r in rows), 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, print the figures as JSON, and optionally write them to DIR/ab.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--guards", type=int, default=10, help="guards of each build")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-set", action="append", default=[], metavar="K=V")
    parser.add_argument("--new-set", action="append", default=[], metavar="K=V")
    parser.add_argument("--out", type=Path, help="write ab.json here too")
    args = parser.parse_args(argv)
    settings = {"base": _settings(args.base_set), "new": _settings(args.new_set)}
    result = measure(
        args.base,
        guards=args.guards,
        interval=args.interval,
        window=args.window,
        rounds=args.rounds,
        settings=settings,
    )
    emit(result, args.out, "ab.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
