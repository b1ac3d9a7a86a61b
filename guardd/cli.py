"""`guardd`: run the guard, check a config, run the demo."""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from guardd import paths
from guardd._version import __version__

if TYPE_CHECKING:
    from guardd.config import Settings

_EPILOG = """\
exit status:
  run           0 clean stop, 1 fatal runtime error (e.g. state.dir not writable by this
                user), 2 invalid configuration
  check-config  0 valid, 2 invalid
  replay        0 it ran, 1 the history cannot be read or holds no record in the period,
                2 invalid configuration or usage (a bad or reversed --from/--to)
  demo          0 when the demo rolled back as expected

Config lookup: --config, else $GUARDD_CONFIG, else /etc/guardd/<instance>.toml
(/etc/guardd/default.toml without --instance).
Every key can be overridden by GUARDD_<SECTION>__<KEY>, e.g. GUARDD_POLICY__CONSECUTIVE_FAILURES=5.

Where guardd keeps its files (the config's key, else systemd's directory, else the path):
  state     state.dir, else $STATE_DIRECTORY, else /var/lib/guardd/<instance>
  socket    control.socket, else $RUNTIME_DIRECTORY/<instance>.sock,
            else /run/guardd/<instance>.sock
  QoS lock  qos.lock_file, else $RUNTIME_DIRECTORY/<instance>.qos.lock,
            else /run/guardd/<instance>.qos.lock
guardd@.service gives the same paths. Outside systemd the defaults need root: as another
user, set all three keys, and give guardctl the same file with --config.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardd",
        description="Guard a blue/green pair behind nginx: probe both colors, roll back a "
        "failing active color, and hold deploys until the SLOs hold.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"guardd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the guard in the foreground until SIGTERM/SIGINT",
        description="Run the guard in the foreground until SIGTERM or SIGINT; "
        "SIGHUP reloads the config (the old one stays on error).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, help="config file (default: see below)")
    run.add_argument("--instance", help="instance name (default: the config's, else its stem)")
    run.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    check = sub.add_parser(
        "check-config",
        help="validate a config and print a summary",
        description="Validate a config file; print a one-line summary, or "
        "one `file: key: reason` line per problem. Without --offline it also checks "
        "this host: commands, nginx targets and active link, the state file's directory.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("path", type=Path)
    check.add_argument(
        "--offline",
        action="store_true",
        help="skip the host checks (files, links, executables): for a config in a repository's CI",
    )
    check.add_argument("--instance", help=argparse.SUPPRESS)
    rep = sub.add_parser(
        "replay",
        help="judge a config on the recorded history, in simulated time",
        description="Run a config over what guardd recorded in <state.dir>/observations/ "
        "(and the access logs and applications' logs where they lie) in simulated time: "
        "every decision it would have taken, a summary, and for each incident in the real "
        "journal when this config would have detected it. Contacts no upstream, switches "
        "nothing, writes nothing in state.dir.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="the config to judge (default: $GUARDD_CONFIG, else /etc/guardd/default.toml)",
    )
    rep.add_argument(
        "--from",
        dest="since",
        metavar="TIME",
        help="ISO 8601 (UTC without an offset) or a time ago: 2h, 7d (default: all history)",
    )
    rep.add_argument(
        "--to", dest="until", metavar="TIME", help="as --from (default: the end of the history)"
    )
    rep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key: dotted TOML key = TOML value (policy.consecutive_failures=10, "
        "rules.0.above=0.08); repeatable",
    )
    rep.add_argument(
        "--compare",
        type=Path,
        metavar="PATH",
        action="append",
        help="another config, replayed side by side (once)",
    )
    rep.add_argument("--json", action="store_true", help="one JSON document (docs/contract.md)")
    demo = sub.add_parser(
        "demo",
        help="run the embedded demo: a real rollback in under a minute",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--seconds", type=float, default=45.0, help="how long the demo may run at most (default 45)"
    )
    return parser


#: A time ago written with its minus (`-2h`, docs/contract.md): argparse takes it for an
#: option unless it is glued to its flag.
_TIME_AGO = re.compile(r"^-\d+(?:\.\d+)?[dhms]$")


def _glued(argv: Sequence[str]) -> list[str]:
    """`argv` with `--from -2h` (and `--to`) written as `--from=-2h`."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--from", "--to") and _TIME_AGO.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `guardd` command."""
    parser = _parser()
    args = parser.parse_args(_glued(sys.argv[1:] if argv is None else argv))
    if getattr(args, "compare", None) and len(args.compare) > 1:
        # (argparse would keep the last one, and the first would be dropped unsaid.)
        parser.error("--compare: given more than once: replay sets one config beside --config")
    if args.command == "check-config":
        return _check(args.path, args.instance, offline=args.offline)
    if args.command == "run":
        return _run(args.config, args.instance, args.log_level)
    if args.command == "replay":
        try:
            from guardd.replay import replay  # noqa: PLC0415 - only replay pays for it
            from guardd.stdio import answering  # noqa: PLC0415

            return answering(
                "guardd replay",
                functools.partial(
                    replay,
                    args.config,
                    since=args.since,
                    until=args.until,
                    overrides=args.set,
                    compare=args.compare[0] if args.compare else None,
                    as_json=args.json,
                ),
            )
        except KeyboardInterrupt:
            # Ctrl-C while it loads (its modules, the config), before replay's own
            # handlers say it: the same answer, without a traceback.
            print("guardd replay: stopped by SIGINT; nothing was reported", file=sys.stderr)
            return 128 + signal.SIGINT
    from guardd.demo import run_demo  # noqa: PLC0415 - the demo pulls in test-like machinery

    return run_demo(seconds=args.seconds)


def _load(
    path: Path,
    instance: str | None,
    *,
    host_checks: bool = False,
    overrides: Sequence[str] = (),
) -> Settings | None:
    from guardd import config  # noqa: PLC0415 - keep --help and --version fast
    from guardd.exceptions import ConfigError  # noqa: PLC0415

    try:
        return config.load(path, instance=instance, host_checks=host_checks, overrides=overrides)
    except ConfigError as e:
        for problem in [*e.problems, *e.warnings]:
            print(problem, file=sys.stderr)
        return None


def _check(path: Path, instance: str | None, *, offline: bool) -> int:
    settings = _load(path, instance, host_checks=not offline)
    if settings is None:
        return 2
    from guardd.exceptions import ConfigError, ConfigProblem  # noqa: PLC0415
    from guardd.notify import sink_problems, sinks_from_config  # noqa: PLC0415

    for warning in settings.warnings:
        print(warning, file=sys.stderr)
    problems: list[ConfigProblem] = []
    if offline:
        # Resolving url_env / url_file would read this host: what the file alone says.
        problems = sink_problems(settings.config.notify, source=str(path))
    else:
        try:
            sinks_from_config(settings.config.notify, environ=os.environ, source=str(path))
        except ConfigError as e:
            problems = e.problems
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 2
    print(settings.summary())
    return 0


def _run(config_path: Path | None, instance: str | None, level: str) -> int:
    path = config_path or (
        Path(os.environ["GUARDD_CONFIG"])
        if os.environ.get("GUARDD_CONFIG")
        else paths.config_file(instance)
    )
    settings = _load(path, instance)
    if settings is None:
        return 2
    import anyio  # noqa: PLC0415

    from guardd import logs  # noqa: PLC0415
    from guardd.commands import log_retries_through_structlog  # noqa: PLC0415
    from guardd.supervisor import Supervisor, startup_problems  # noqa: PLC0415

    if problems := startup_problems(settings):
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    logs.configure(settings.instance, level=level)
    for warning in settings.warnings:
        logs.get_logger().warning("config_warning", problem=str(warning))
    # Retries are logged through structlog only: stamina's default Prometheus hook would
    # register in the global registry, which guardd never serves.
    log_retries_through_structlog()
    supervisor = Supervisor(settings, instance_arg=instance)
    try:
        return anyio.run(supervisor.run)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled inside; belt and braces
        return 0


if __name__ == "__main__":
    sys.exit(main())
