"""guardctl: the operator's command line for a running guardd.

It speaks the control protocol over guardd's Unix socket, except `qos status`, which
reads the lock file itself so that a deploy script gets an answer with guardd down.
Only the standard library is imported: guardctl runs in deploy scripts and checks,
where every start-up millisecond counts.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from guardd import paths
from guardd._version import __version__
from guardd.control import protocol
from guardd.control.client import call
from guardd.exceptions import ControlError, DaemonUnreachable, NotPermitted, Refused
from guardd.qoslock import read_lock
from guardd.render import render_change, render_history, render_qos, render_status, use_color

__all__ = ["main", "parse_duration", "status_exit_code"]

# Monitoring-plugin exit codes of `status`.
OK: Final = 0
WARNING: Final = 1
CRITICAL: Final = 2
UNKNOWN: Final = 3
# Exit codes of the commands that change something.
DONE: Final = 0
REFUSED: Final = 1
UNREACHABLE: Final = 3
NOT_PERMITTED: Final = 4
# `qos status`.
NO_LOCK: Final = 0
LOCK_HELD: Final = 1

READ_TIMEOUT_S: Final = 5.0
# A switch runs nginx's test and reload and then verifies through the front door; and
# guardd serializes changes, so a pause may wait behind a rollback in flight.
CHANGE_TIMEOUT_S: Final = 120.0

_DURATION: Final = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|h)?")
_UNIT_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in "250ms", "3s", "5m", "1h" or a plain number of seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use e.g. 250ms, 30s, 5m, 1h or plain seconds"
        )
    seconds = float(match["number"]) * _UNIT_S[match["unit"]]
    if not (math.isfinite(seconds) and 0 < seconds <= protocol.MAX_LOCK_S):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: must be above 0 and at most 366 days"
        )
    return seconds


def _history_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= protocol.MAX_HISTORY_LIMIT:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: must be a whole number >= 1")
    return limit


def status_exit_code(status: Mapping[str, Any]) -> int:
    """OK, WARNING or CRITICAL for a status object, as a monitoring check reads it."""
    state = status.get("state")
    if state == "hold":
        return CRITICAL
    qos = status.get("qos")
    upstreams = status.get("upstreams")
    active = upstreams.get(status.get("active")) if isinstance(upstreams, Mapping) else None
    # A stale active color is unknown, and unknown is not OK.
    active_ok = (
        isinstance(active, Mapping) and active.get("healthy") is True and not active.get("stale")
    )
    locked = isinstance(qos, Mapping) and bool(qos.get("locked"))
    warned = bool(status.get("warnings"))  # e.g. the front door and the probes disagree
    if state != "steady" or status.get("paused") or locked or not active_ok or warned:
        return WARNING
    return OK


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one guardd instance listens and keeps its lock."""

    instance: str
    socket: Path
    lock_file: Path


def _warn(message: str) -> None:
    print(f"guardctl: {message}", file=sys.stderr)


def _read_config(path: Path, *, explicit: bool) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            _warn(f"{path}: no such file; using the default socket and lock paths")
    except PermissionError:
        # The config may be root's alone; the default paths usually still work.
        if explicit:
            _warn(f"{path}: not readable; using the default socket and lock paths")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        _warn(f"{path}: cannot read config ({e}); using the default socket and lock paths")
    return {}


def _setting(config: Mapping[str, Any], section: str, key: str) -> str | None:
    table = config.get(section)
    value = table.get(key) if isinstance(table, Mapping) else None
    return value if isinstance(value, str) and value else None


def _resolve(args: argparse.Namespace) -> _Target:
    config_path = args.config or paths.config_file(args.instance)
    config = _read_config(config_path, explicit=args.config is not None)
    instance = args.instance
    if instance is None:
        named = config.get("instance")
        # Like guardd itself: the config's `instance`, else the config file's stem.
        instance = (
            named
            if isinstance(named, str) and named
            else (config_path.stem if config else "default")
        )
    socket = args.socket or Path(
        _setting(config, "control", "socket") or paths.control_socket(instance)
    )
    lock_file = Path(_setting(config, "qos", "lock_file") or paths.qos_lock_file(instance))
    return _Target(instance, socket, lock_file)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _cmd_status(args: argparse.Namespace, target: _Target) -> int:
    try:
        status = call(target.socket, "status", {}, timeout=READ_TIMEOUT_S)
    except ControlError as e:
        print(f"UNKNOWN: guardd {target.instance}: {e}")
        return UNKNOWN
    if args.json:
        _print_json(status)
    else:
        sys.stdout.write(render_status(status, color=use_color(sys.stdout)))
    return status_exit_code(status)


def _cmd_history(args: argparse.Namespace, target: _Target) -> int:
    try:
        result = call(target.socket, "history", {"limit": args.limit}, timeout=READ_TIMEOUT_S)
    except DaemonUnreachable as e:
        _warn(str(e))
        return UNREACHABLE
    except ControlError as e:
        _warn(str(e))
        return REFUSED
    events = result.get("events")
    if not isinstance(events, list):
        _warn("guardd's history answer has no event list")
        return REFUSED
    if args.json:
        _print_json(events)
    else:
        shown = [e for e in events if isinstance(e, Mapping)]
        sys.stdout.write(render_history(shown, color=use_color(sys.stdout)))
    return OK


def _change(target: _Target, cmd: str, payload: dict[str, Any]) -> int:
    try:
        result = call(target.socket, cmd, payload, timeout=CHANGE_TIMEOUT_S)
    except NotPermitted as e:
        _warn(f"not permitted: {e}")
        return NOT_PERMITTED
    except Refused as e:
        _warn(f"refused: {e}")
        return REFUSED
    except DaemonUnreachable as e:
        _warn(str(e))
        if cmd in ("qos_lock", "qos_unlock"):
            verb = "touch" if cmd == "qos_lock" else "rm"
            _warn(f"with guardd down, the lock can be changed by hand: {verb} {target.lock_file}")
        return UNREACHABLE
    except ControlError as e:
        _warn(f"failed: {e}")
        return REFUSED
    sys.stdout.write(render_change(cmd, result))
    return DONE


def _cmd_switch(args: argparse.Namespace, target: _Target) -> int:
    return _change(
        target, "switch", {"color": args.color, "force": args.force, "reason": args.reason}
    )


def _cmd_rollback(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "rollback", {"reason": args.reason})


def _cmd_promote(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "promote", {"reason": args.reason})


def _cmd_pause(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "pause", {"reason": args.reason})


def _cmd_resume(_args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "resume", {})


def _cmd_qos_status(args: argparse.Namespace, target: _Target) -> int:
    lock = read_lock(target.lock_file).to_json()
    if args.json:
        _print_json(lock)
    else:
        sys.stdout.write(render_qos(lock, str(target.lock_file), color=use_color(sys.stdout)))
    return LOCK_HELD if lock["locked"] else NO_LOCK


def _cmd_qos_lock(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "qos_lock", {"for_s": args.for_s, "reason": args.reason})


def _cmd_qos_unlock(_args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "qos_unlock", {})


_CHANGE_EXITS: Final = """\
exit codes:
  0  done
  1  refused by guardd (the message says why)
  2  usage error
  3  guardd unreachable
  4  not permitted (needs root, guardd's user or control.admin_group)"""

_MAIN_EPILOG: Final = """\
examples:
  guardctl --instance threader status
  guardctl --instance threader history --limit 20
  guardctl --instance threader rollback --reason "checkout 500s after release 2026.11.3"
  guardctl --instance threader qos status && ./deploy.sh

where guardctl looks:
  socket     --socket, else control.socket in the config, else /run/guardd/INSTANCE.sock
  lock file  qos.lock_file in the config, else /run/guardd/INSTANCE.qos.lock
  config     --config, else $GUARDD_CONFIG, else /etc/guardd/INSTANCE.toml
  instance   --instance, else the config's `instance`, else the config file's stem

exit codes:
  status          0 OK, 1 WARNING, 2 CRITICAL (hold), 3 UNKNOWN (guardd unreachable)
  history         0 done, 1 failed, 3 guardd unreachable
  qos status      0 no lock (deploys allowed), 1 lock held
  other commands  0 done, 1 refused, 3 guardd unreachable, 4 not permitted
  usage errors    2 (except for `status`, where 2 means CRITICAL)

Run `guardctl COMMAND --help` for the details of a command."""

Runner = Callable[[argparse.Namespace, _Target], int]


@dataclass(frozen=True, slots=True)
class _Command:
    name: str
    summary: str
    description: str
    epilog: str
    run: Runner


_COMMANDS: Final = (
    _Command(
        "status",
        "show state, health of both colors, QoS lock and last decision",
        "Show the guard's state: the active color, each color's health (healthy, "
        "consecutive failures, window 5xx ratio, p50/p95 latency, last error, age of the "
        "last probe), the rollback target, the QoS lock, the paused flag, the last "
        "decision with its evidence, the last event and the uptime. A color whose last "
        "probe is older than three intervals is shown as stale, never as healthy.\n\n"
        "The exit code follows the monitoring-plugin convention, so `guardctl status` "
        "can serve as a Nagios/Icinga check.",
        """\
examples:
  guardctl --instance threader status
  guardctl --instance threader status --json | jq .upstreams.green

exit codes:
  0  OK: the active color is healthy, no QoS lock, not paused, state steady
  1  WARNING: degraded, guard window, rolling back, starting, QoS lock held, paused,
     or the active color is not (known to be) healthy
  2  CRITICAL: hold - the active color fails and no safe switch exists
  3  UNKNOWN: guardd is unreachable""",
        _cmd_status,
    ),
    _Command(
        "history",
        "show the event journal, newest last",
        "Show guardd's event journal, one line per event (time, event, from->to, "
        "severity, who, reason), newest last.",
        """\
examples:
  guardctl --instance threader history
  guardctl --instance threader history --limit 5 --json

exit codes:
  0  done
  1  guardd answered with an error
  3  guardd unreachable""",
        _cmd_history,
    ),
    _Command(
        "switch",
        "switch traffic to COLOR",
        "Switch traffic to COLOR now. guardd refuses when COLOR is not healthy or the QoS "
        "lock is held; --force overrides both. The switch is journaled with your user.",
        f"""\
examples:
  guardctl --instance threader switch blue --reason "green leaks memory"
  guardctl --instance threader switch green --force --reason "blue host is being drained"

{_CHANGE_EXITS}""",
        _cmd_switch,
    ),
    _Command(
        "rollback",
        "switch to the rollback target now and take the QoS lock",
        "Switch to the rollback target (policy.rollback_to) now, as guardd would on a "
        "failing release, and take the QoS lock so that no deploy follows until the "
        "guard window has passed with the SLOs met.",
        f"""\
examples:
  guardctl --instance threader rollback --reason "checkout 500s after 2026.11.3"

{_CHANGE_EXITS}""",
        _cmd_rollback,
    ),
    _Command(
        "promote",
        "switch to the standby color if it passes the promotion gate",
        "Switch traffic to the standby color, but only if it passes the promotion gate: "
        "healthy for policy.promote_successes probes in a row, and the QoS lock not held.",
        f"""\
examples:
  guardctl --instance threader promote --reason "release 2026.11.4"

{_CHANGE_EXITS}""",
        _cmd_promote,
    ),
    _Command(
        "pause",
        "stop automatic actions (probing and metrics go on)",
        "Stop guardd's automatic actions: no rollback, no hold, no lock is taken or "
        "released. Probing, metrics and alerts go on. `guardctl resume` undoes it.",
        f"""\
examples:
  guardctl --instance threader pause --reason "nginx maintenance, CHG-4711"

{_CHANGE_EXITS}""",
        _cmd_pause,
    ),
    _Command(
        "resume",
        "restart automatic actions",
        "Restart guardd's automatic actions after `pause`, or leave a hold that waits "
        "for an operator.",
        f"""\
examples:
  guardctl --instance threader resume

{_CHANGE_EXITS}""",
        _cmd_resume,
    ),
)

_QOS_COMMANDS: Final = (
    _Command(
        "status",
        "is a deploy allowed now?",
        "Tell whether a deploy is allowed now. This reads the QoS lock file directly, so "
        "it answers quickly and also when guardd is down. Any file at the lock path "
        "blocks deploys, even an empty one made with `touch`.",
        """\
examples:
  guardctl --instance threader qos status && ./deploy.sh
  guardctl --instance threader qos status --json

exit codes:
  0  no lock: deploys allowed
  1  lock held: deploys blocked (the reason and until when are printed)""",
        _cmd_qos_status,
    ),
    _Command(
        "lock",
        "take the QoS lock by hand",
        "Take the QoS lock: deploys, `promote` and `switch` without --force are refused "
        "until it is released or expires.",
        f"""\
examples:
  guardctl --instance threader qos lock --for 2h --reason "black friday freeze"
  guardctl --instance threader qos lock --for 90   # seconds

durations: 250ms, 30s, 5m, 1h or a plain number of seconds; without --for the lock
stays until `guardctl qos unlock`.

{_CHANGE_EXITS}""",
        _cmd_qos_lock,
    ),
    _Command(
        "unlock",
        "release the QoS lock by hand",
        "Release the QoS lock, whoever took it.",
        f"""\
examples:
  guardctl --instance threader qos unlock

{_CHANGE_EXITS}""",
        _cmd_qos_unlock,
    ),
)


def _globals(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # Subcommands take the global options too (`guardctl status --instance x`); there
    # they default to "not given" so that they do not overwrite what came before.
    default: Any = None if defaults else argparse.SUPPRESS
    group = parser.add_argument_group("instance options")
    group.add_argument(
        "--instance",
        metavar="NAME",
        default=default,
        help="guardd instance to talk to (default: default)",
    )
    group.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        default=default,
        help="guardd config to find the socket and lock file in",
    )
    group.add_argument(
        "--socket",
        metavar="PATH",
        type=Path,
        default=default,
        help="control socket path; overrides the config",
    )


def _subparser(
    parent: argparse._SubParsersAction[argparse.ArgumentParser], command: _Command, prog_words: str
) -> argparse.ArgumentParser:
    sub = parent.add_parser(
        command.name,
        help=command.summary,
        description=_paragraphs(command.description),
        epilog=command.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        prog=f"guardctl {prog_words}",
    )
    sub.set_defaults(run=command.run)
    return sub


def _paragraphs(text: str) -> str:
    # Descriptions are filled here and epilogs kept as written, hence the raw formatter.
    return "\n\n".join(textwrap.fill(part, width=78) for part in text.split("\n\n"))


def build_parser() -> argparse.ArgumentParser:
    """The guardctl argument parser."""
    parser = argparse.ArgumentParser(
        prog="guardctl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_MAIN_EPILOG,
        description=_paragraphs(
            "guardctl is the operator's tool for guardd, the guard of blue/green upstreams "
            "behind nginx. It shows the guard's state and journal, moves traffic, pauses "
            "automatic actions, and takes or releases the QoS lock that blocks deploys."
        ),
    )
    _globals(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"guardctl {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        sub = _subparser(commands, command, command.name)
        _globals(sub, defaults=False)
        if command.name in ("status", "history"):
            sub.add_argument(
                "--json", action="store_true", help="print guardd's answer as JSON instead of text"
            )
        if command.name == "history":
            sub.add_argument(
                "--limit", metavar="N", type=_history_limit, help="only the last N events"
            )
        if command.name == "switch":
            sub.add_argument(
                "color", metavar="COLOR", choices=protocol.COLORS, help="blue or green"
            )
            sub.add_argument(
                "--force",
                action="store_true",
                help="switch even if COLOR is unhealthy or the QoS lock is held",
            )
        if command.name in ("switch", "rollback", "promote", "pause"):
            sub.add_argument(
                "--reason", metavar="TEXT", help="why; goes to the journal and the notifications"
            )

    qos = commands.add_parser(
        "qos",
        help="QoS lock: status, lock, unlock",
        prog="guardctl qos",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "The QoS lock blocks deploys while guardd watches a color after a rollback. "
            "`qos status` reads the lock file directly; `lock` and `unlock` ask guardd, "
            "which journals them."
        ),
        epilog="examples:\n  guardctl --instance threader qos status\n"
        '  guardctl --instance threader qos lock --for 30m --reason "incident 812"\n'
        "  guardctl --instance threader qos unlock",
    )
    _globals(qos, defaults=False)
    qos_commands = qos.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in _QOS_COMMANDS:
        sub = _subparser(qos_commands, command, f"qos {command.name}")
        _globals(sub, defaults=False)
        if command.name == "status":
            sub.add_argument("--json", action="store_true", help="print the lock as JSON")
        if command.name == "lock":
            sub.add_argument(
                "--for",
                dest="for_s",
                metavar="DURATION",
                type=parse_duration,
                help="release the lock after this long (default: never)",
            )
            sub.add_argument("--reason", metavar="TEXT", help="why; shown to whoever is blocked")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run guardctl and return its exit code."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A reason or error in a script the terminal cannot show must not crash the output.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        run: Runner = args.run
        code = run(args, _resolve(args))
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `guardctl history | head`: the reader left; say nothing more, and let the
        # interpreter's final flush go to /dev/null instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
