"""guardctl: the operator's command line for a running guardd.

It speaks the control protocol over guardd's Unix socket, except `qos status`, which
reads the lock file itself so that a deploy script gets an answer with guardd down.
Only the standard library is imported: guardctl runs in deploy scripts and checks,
where every start-up millisecond counts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import io
import json
import math
import os
import pwd
import stat
import sys
import textwrap
import time
import tomllib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

from guardd import durations, paths
from guardd._version import __version__
from guardd.core.types import COLORS, GUARDD
from guardd.exceptions import (
    ControlError,
    DaemonUnreachable,
    DaemonUnresponsive,
    NotPermitted,
    Refused,
)
from guardd.qoslock import IN_FLIGHT, LockInfo, LockUnknown, check_lock, unknown_json
from guardd.render import render_change, render_history, render_qos, render_status, use_color
from guardd.stdio import answering
from guardd.timestamps import parse_rfc3339

__all__ = ["main", "parse_duration", "status_exit_code"]

#: What `guardctl wait` can wait for.
WAIT_CONDITIONS: Final = ("steady", "healthy", "unlocked")
# _LAZY_CTLWATCH: `guardd.ctlwatch` is imported where it is used. `--watch`, `wait`,
# `--wait`, `incident` and an UNKNOWN status need it; a plain `status` or `qos status` (a
# deploy script's question, asked often) does not, and its imports (the incident builder
# and the journal's reader) are a part of guardctl's start-up.
# _LAZY_CLIENT: so is the control socket's client (`socket`, the protocol's vocabulary):
# `qos status` with a config reads the lock file and never talks to guardd unless the lock
# has expired.


def call(
    socket_path: Path, cmd: str, args: dict[str, Any] | None = None, *, timeout: float
) -> dict[str, Any]:
    """`guardd.control.client.call`: the daemon's answer to `cmd`; its `ControlError`s."""
    from guardd.control import client  # noqa: PLC0415 - _LAZY_CLIENT

    return client.call(socket_path, cmd, args, timeout=timeout)


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
# Every command, when guardctl cannot establish which guard it asks about or what its
# lock says: never "allowed" or "done" on a guess (docs/contract.md §1).
CANNOT_TELL: Final = 3

READ_TIMEOUT_S: Final = 5.0
# `qos status` asks a running guardd about an expired lock; the answer is only a remark.
PEEK_TIMEOUT_S: Final = 2.0
# A switch runs nginx's test and reload and then verifies through the front door; and
# guardd serializes changes, so a pause may wait behind a rollback in flight.
CHANGE_TIMEOUT_S: Final = 120.0


def parse_duration(text: str) -> float:
    """Seconds in "250ms", "3s", "5m", "1h", "1m30s" or a plain number of seconds: the
    config's grammar (`guardd.durations`)."""
    try:
        seconds = durations.parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use e.g. 250ms, 30s, 5m, 1h30m or plain seconds"
        ) from None
    from guardd.control import protocol  # noqa: PLC0415 - _LAZY_CLIENT

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
    from guardd.control import protocol  # noqa: PLC0415 - _LAZY_CLIENT

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
    decided = status.get("last_decision")
    if (
        not active_ok
        and isinstance(decided, Mapping)
        and decided.get("action") == "rollback"
        and str(decided.get("not_taken") or "").startswith("etcd")
    ):
        # A fleet node that cannot write the rollback its failing color calls for (etcd
        # out of reach, no local_fallback): as a hold, nothing will act on it.
        return CRITICAL
    # A lock that cannot be told (a fleet node without etcd) is no "no lock" either.
    locked = not isinstance(qos, Mapping) or qos.get("locked") is not False
    lost = status.get("no_rollback_target")  # the rollback target is down: no protection
    warned = bool(status.get("warnings"))  # e.g. the front door and the probes disagree
    # The journal or state.json not written: a restart would lose a hold, a pause, the lock.
    storage = status.get("storage")
    failing = isinstance(storage, Mapping) and storage.get("ok") is False
    if (
        state != "steady"
        or status.get("paused")
        or locked
        or not active_ok
        or lost
        or warned
        or failing
    ):
        return WARNING
    return OK


class _CannotTell(Exception):
    """guardctl cannot establish which guard it asks about or what its lock says (UNKNOWN);
    the message says how to fix it.

    `source` is `"fleet"` when it is the fleet's lock that cannot be read, for the
    `qos status --json` UNKNOWN object (docs/contract.md §1).
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one guardd instance listens, keeps its lock and its journal.

    `instance` is None when only `--socket` names the guard: then its lock file and
    state are known to that guardd alone.
    """

    instance: str | None
    socket: Path
    lock_file: Path | None
    state_dir: Path | None
    #: The config's `[fleet]` table, when it has one: the QoS lock is then the fleet's.
    fleet: Mapping[str, Any] | None = None

    @property
    def label(self) -> str:
        """How messages name the guard."""
        return self.instance if self.instance is not None else str(self.socket)


def _warn(message: str) -> None:
    print(f"guardctl: {message}", file=sys.stderr)


def _naming_hint() -> str:
    """How to name an instance, with the instances found on this host."""
    found = paths.instances()
    if not found:
        return (
            f"no guardd instance found here (no {paths.config_dir()}/NAME.toml, "
            f"no {paths.runtime_dir()}/NAME.sock, no state in {paths.state_root()}/NAME); "
            "name one with --instance NAME or --config PATH"
        )
    return f"instances here: {', '.join(found)}; name one with --instance NAME"


def _another_hint(target: _Target) -> str:
    """How to ask another instance than `target`, and which there are."""
    found = paths.instances()
    listed = f"; instances here: {', '.join(found)}" if found else ""
    return f"instance {target.label}; name another with --instance NAME or --config PATH{listed}"


def _only_instance() -> str:
    found = paths.instances()
    if len(found) == 1:
        return found[0]
    if not found:
        raise _CannotTell(_naming_hint())
    raise _CannotTell(
        f"several guardd instances here ({', '.join(found)}): name one with --instance NAME"
    )


def _whoami() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _permission_fix(path: Path) -> str:
    """What lets this user read `path`: its group, when the group may read it, or root."""
    if os.geteuid() == 0:
        # Root refused: "run as root" would send the operator in a circle.
        return (
            "root may not read it here either: check its mode, owner and ACL, and whether "
            "this container or sandbox took root's CAP_DAC_OVERRIDE or a MAC policy denies it"
        )
    try:
        st = path.stat()
    except OSError:
        return "run guardctl as root"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    if st.st_mode & stat.S_IRGRP and st.st_gid != 0:
        return f"add {_whoami()} to group {group} (usermod -aG {group} {_whoami()}) or run as root"
    # Readable by root alone: the README's set-up gives it the guardd group (0640 root:guardd).
    return (
        f"give it a group that may read it (chgrp guardd {path}; chmod 0640 {path}) and add "
        f"{_whoami()} to that group (usermod -aG guardd {_whoami()}), or run guardctl as root"
    )


def _read_config(path: Path, *, instance: str, explicit: bool) -> dict[str, Any] | None:
    """The config as a table; None when there is none at the default path."""
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise _CannotTell(
                f"{path}: no such config file; fix --config or $GUARDD_CONFIG, "
                "or name the instance with --instance NAME"
            ) from None
        return None
    except PermissionError:
        # The config says where the socket and the lock are; the defaults are a guess.
        raise _CannotTell(
            f"{path}: permission denied; guardctl reads it to find {instance}'s socket and "
            f"lock file: {_permission_fix(path)}"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise _CannotTell(
            f"{path}: not valid TOML ({e}); check it with `guardd check-config {path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise _CannotTell(f"{path}: cannot read config ({why})") from None
    if problem := _refused_keys(table):
        raise _CannotTell(_refusal(str(path), problem, path))
    return _with_environment(table, os.environ, path)


# The keys guardd's config takes at its top ("") and in the sections guardctl reads, each
# of which takes `GUARDD_<SECTION>__<KEY>` from the environment as guardd does, so the two
# never disagree on where the socket, lock or etcd are. The models in guardd/config.py
# are the source (tests/control/test_guardctl.py keeps these the same): guardctl does not
# import them, as pydantic would double a deploy gate's time.
_KNOWN_KEYS: Final[Mapping[str, frozenset[str]]] = {
    section: frozenset(keys.split())
    for section, keys in {
        "": "control fleet instance metrics notify policy probe qos retry rules signals state "
        "switch upstreams",
        "control": "admin_group group mode socket",
        "qos": "lock_file max_error_ratio min_health_ratio window",
        "state": "dir keep_observations",
        "fleet": "ca_file cert_file etcd key_file lease_ttl local_fallback node password_file "
        "prefix quorum size username",
    }.items()
}
_ENV_SECTIONS: Final = tuple(section for section in _KNOWN_KEYS if section)
# The settings that say where guardctl looks: each a non-empty string.
_WHERE_KEYS: Final = frozenset(
    (("", "instance"), ("control", "socket"), ("qos", "lock_file"), ("state", "dir"))
)


def _refused_keys(config: Mapping[str, Any]) -> str | None:
    """`key: reason` for the first setting of `config` (a config file's table) that guardd
    refuses and that would move where guardctl looks: an unknown key at the top or in a
    section guardctl reads (`[qoss]`, `qos.lockfile`: guardctl would read the default
    lock path, guardd refuses to start), such a section that is no table, or a path or
    `instance` that is no string or is empty. None when there is none."""
    for key, value in config.items():
        if key not in _KNOWN_KEYS[""]:
            return f"{key}: unknown key"
        if key in _ENV_SECTIONS:
            if not isinstance(value, Mapping):
                return f"{key}: must be a table"
            for inner, setting in value.items():
                if problem := _refused_setting(key, inner, setting):
                    return problem
        elif problem := _refused_setting("", key, value):
            return problem
    return None


def _refused_setting(section: str, key: str, value: object) -> str | None:
    """`section.key: reason` when guardd refuses `key` in `section` ("" the top) as
    guardctl reads it, else None."""
    dotted = f"{section}.{key}" if section else key
    if key not in _KNOWN_KEYS[section]:
        return f"{dotted}: unknown key"
    if (section, key) in _WHERE_KEYS:
        if not isinstance(value, str):
            return f"{dotted}: must be a string"
        if not value.strip():
            return f"{dotted}: must not be empty"
        if section and not value.startswith("/"):
            # Relative to guardctl's folder here and to `/` for guardd: two files.
            return f"{dotted}: must be an absolute path"
    return None


def _refusal(origin: str, problem: str, path: Path) -> str:
    """What guardctl says of a setting guardd refuses, from `origin` (the file, or `env
    NAME`): where guardd's socket, lock or state are cannot be told from it."""
    return (
        f"{origin}: {problem}: guardd refuses this setting, so where its socket, lock and "
        f"state are cannot be told; `guardd check-config {path}` says how to fix it"
    )


def _with_environment(
    config: dict[str, Any], environ: Mapping[str, str], path: Path
) -> dict[str, Any]:
    """`config` with the `GUARDD_<SECTION>__<KEY>` variables of `environ` laid over it, as
    guardd's settings lay them (names case-insensitive; a value that is a JSON list or
    object, such as `GUARDD_FLEET__ETCD='["http://10.0.0.1:2379"]'`, decoded as one).

    Raises `_CannotTell` for a variable guardd refuses in those sections (an unknown or
    deeper key, an empty path): guardctl would look where guardd, which refuses to start
    with it, does not. `path` is the config's, for the fix.
    """
    for name, value in environ.items():
        section, sep, key = name.upper().removeprefix("GUARDD_").partition("__")
        section, key = section.lower(), key.lower()
        if not name.upper().startswith("GUARDD_") or not sep or section not in _ENV_SECTIONS:
            continue
        problem = _refused_setting(section, key.replace("__", "."), value)
        if problem is not None:
            raise _CannotTell(_refusal(f"env {name}", problem, path))
        parsed: Any = value
        if value.lstrip()[:1] in ("[", "{"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(value)
        table = config.get(section)
        config[section] = {**(table if isinstance(table, Mapping) else {}), key: parsed}
    return config


def _setting(config: Mapping[str, Any] | None, section: str, key: str) -> str | None:
    table = config.get(section) if config is not None else None
    value = table.get(key) if isinstance(table, Mapping) else None
    return value if isinstance(value, str) and value else None


def _explicit_config(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config)
    env = os.environ.get("GUARDD_CONFIG")
    return Path(env) if env else None


def _resolve(args: argparse.Namespace) -> _Target:
    """The guard the command line names; `_CannotTell` when that cannot be established.

    An instance exists when its config file, its control socket or its state
    (state.json or events.jsonl) is there (docs/contract.md §1).
    """
    explicit = _explicit_config(args)
    instance: str | None = args.instance
    if instance is None and explicit is None:
        if args.socket is not None:
            return _Target(None, args.socket, None, None)
        instance = _only_instance()
    config_path = explicit or paths.config_file(instance)
    # Like guardd itself: --instance, else the config's `instance`, else the file's stem;
    # the stem names the instance in messages even when the file cannot be read.
    config = _read_config(
        config_path, instance=instance or config_path.stem, explicit=bool(explicit)
    )
    if instance is None:
        named = config.get("instance") if config is not None else None
        instance = named if isinstance(named, str) and named else config_path.stem
    socket = Path(_setting(config, "control", "socket") or paths.control_socket(instance))
    lock_file = Path(_setting(config, "qos", "lock_file") or paths.qos_lock_file(instance))
    state_dir = Path(_setting(config, "state", "dir") or paths.state_dir(instance))
    if config is not None or paths.is_socket(socket) or paths.has_state(state_dir):
        fleet = config.get("fleet") if config is not None else None
        target = _Target(
            instance,
            args.socket or socket,
            lock_file,
            state_dir,
            fleet if isinstance(fleet, Mapping) else None,
        )
        if args.instance is not None and explicit is not None and config is not None:
            named = config.get("instance")
            _confirm_instance(
                target, config_path, named if isinstance(named, str) and named else config_path.stem
            )
        return target
    if args.socket is not None:
        # The socket is named, not the instance: its lock and journal are that guardd's.
        return _Target(None, args.socket, None, None)
    raise _CannotTell(
        f"no guardd instance {instance!r}: no {config_path}, no socket {socket}, "
        f"no state in {state_dir}; {_naming_hint()}"
    )


def _confirm_instance(target: _Target, config_path: Path, named: str) -> None:
    """`--instance` and `--config` disagree: only the guardd listening may say which is meant.

    `guardd run --config F --instance X` is legitimate, so a differing name is no error by
    itself; but a typo in `--instance` must not report on the config's guard as if it were
    the one asked about (docs/contract.md §1). Raises `_CannotTell` unless the guardd at the
    socket answers as `target.instance`.
    """
    if named == target.instance:
        return
    try:
        answered = call(target.socket, "status", {}, timeout=READ_TIMEOUT_S).get("guard")
    except ControlError as e:
        raise _CannotTell(
            f"{config_path} is instance {named!r}, not {target.instance!r}, and no guardd "
            f"answers at {target.socket} to say which is meant ({e}); fix --instance, or drop it"
        ) from None
    if answered != target.instance:
        raise _CannotTell(
            f"no guardd instance {target.instance!r}: the guardd at {target.socket} "
            f"(from {config_path}) is {answered!r}; fix --instance, or drop it"
        )


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _cmd_status(args: argparse.Namespace, target: _Target) -> int:
    if args.watch:
        from guardd import ctlwatch  # noqa: PLC0415 - see _LAZY_CTLWATCH

        return ctlwatch.watch(
            target.socket,
            target.label,
            _another_hint(target),
            interval=args.interval,
            as_json=args.json,
            guard=target.instance,
        )
    try:
        status = call(target.socket, "status", {}, timeout=READ_TIMEOUT_S)
    except DaemonUnreachable as e:
        raise _CannotTell(f"guardd {target.label}: {e} ({_another_hint(target)})") from None
    except ControlError as e:
        raise _CannotTell(f"guardd {target.label}: {e}") from None
    if args.json:
        _print_json(status)
    else:
        sys.stdout.write(render_status(status, color=use_color(sys.stdout)))
    return status_exit_code(status)


def fleet_status_lines(doc: Mapping[str, Any]) -> list[str]:
    """`fleet status`'s text: a head line, the warnings, a row per node. Cut off from etcd,
    it says first that the fleet is UNKNOWN now, and marks every row as last read."""
    desired = doc.get("desired") or {}
    reachable = bool(doc.get("etcd_reachable"))
    # (No decision yet is said as `status` says it, never as a generation 0.)
    decided = (
        f"desired {desired['color']} (generation {desired.get('generation')})"
        if desired.get("color")
        else "no desired color yet"
    )
    head = (
        f"fleet {doc.get('prefix')}: leader {doc.get('leader') or 'none'}, {decided}, "
        f"{doc.get('rollbacks', 0)} rollback(s)"
    )
    # Cut off, all below is the fleet as last read: said first, and on every line.
    lines = [head if reachable else f"UNKNOWN now; as last read: {head}"]
    if not reachable:
        lines.append(
            f"WARNING: etcd is unreachable from {doc.get('node')}: {doc.get('problem')}; "
            "the leader, the desired color and every node below are as last read, "
            "not as they are now"
        )
    # What `status` warns of for the fleet on this node (a second guardd under a node's
    # name, a node that diverges, ...); etcd unreachable is said above.
    lines += [
        f"WARNING: {w}"
        for w in doc.get("warnings", [])
        if doc.get("etcd_reachable") or "etcd is unreachable" not in w
    ]
    lines += [
        f"  {n['node']:<16} "
        + ("LOST, last seen: " if n.get("lost") else "")
        + f"serves {n.get('serving') or 'unknown':<6} generation "
        f"{n.get('generation')}  "
        + (
            f"lease expired {n.get('lost_for_s')}s ago, record {n.get('lease_age_s')}s old"
            if n.get("lost")
            else f"lease age {n.get('lease_age_s')}s"
        )
        + ("  leader" if n.get("leader") else "")
        + ("  HOLD" if n.get("state") == "hold" else "")
        + (
            ("  ALERT: lost" if n.get("lost") else "  ALERT: not the desired color")
            if n.get("alert")
            else ""
        )
        + ("" if reachable else "  (as last read)")
        for n in doc.get("nodes", [])
    ]
    return lines


def _cmd_fleet_status(args: argparse.Namespace, target: _Target) -> int:
    try:
        doc = call(target.socket, "fleet_status", {}, timeout=READ_TIMEOUT_S)
    except ControlError as e:
        why = f"guardd {target.label}: {e}"
        if not args.json:
            print(f"UNKNOWN: {why}")
            return UNKNOWN
        # A pipeline parsing the answer gets one saying UNKNOWN, never plain text.
        _warn(f"UNKNOWN: {why}")
        _print_json(
            {"unknown": True, "warning": why, "etcd_reachable": None, "nodes": [], "alerts": []}
        )
        return UNKNOWN
    if args.json:
        _print_json(doc)
    else:
        print("\n".join(fleet_status_lines(doc)))
    if not doc.get("etcd_reachable"):
        return UNKNOWN
    desired_color = (doc.get("desired") or {}).get("color")
    nodes = doc.get("nodes", [])
    # 0 only when every node is known to serve the desired color: a lost node's color is
    # unknown, and one still switching diverges (alerted on after `switch.timeout`).
    diverges = any(
        n.get("lost") or (desired_color and n.get("serving") != desired_color) for n in nodes
    )
    # A second guardd under a node's name is a warning even while it serves the right color.
    # Any warning (a decision in etcd guardd did not write, ...) is worth a look too.
    warned = bool(doc.get("warnings"))
    # A node that holds makes no automatic switch: its users are not protected.
    holds = any(n.get("state") == "hold" for n in nodes)
    return WARNING if doc.get("alerts") or doc.get("twins") or diverges or warned or holds else OK


def _cmd_history(args: argparse.Namespace, target: _Target) -> int:
    try:
        result = call(target.socket, "history", {"limit": args.limit}, timeout=READ_TIMEOUT_S)
    except DaemonUnreachable as e:
        # The journal is a file: with guardd down it still tells what happened.
        journal, path = _read_journal(
            target, args.limit, why=f"guardd {target.label} is not answering ({e})"
        )
        _warn(f"guardd {target.label} is not answering ({e}); read {path}")
        result = {"events": journal}
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


def _read_journal(
    target: _Target, limit: int | None, *, why: str
) -> tuple[list[dict[str, Any]], Path]:
    """The newest `limit` events of the journal file, skipping torn lines, and its path."""
    if target.state_dir is None:
        raise _CannotTell(f"{why}; name the instance with --instance NAME to read its journal")
    from guardd.journal import event_of  # noqa: PLC0415 - only with guardd down

    path = target.state_dir / "events.jsonl"
    events: deque[dict[str, Any]] = deque(maxlen=limit)
    try:
        with path.open("rb") as f:
            # A line torn by a crash is skipped; guardd seals it at its next start.
            events.extend(e for raw in f if (e := event_of(raw)) is not None)
    except FileNotFoundError:
        raise _CannotTell(f"{why} and there is no journal at {path}") from None
    except PermissionError:
        raise _CannotTell(
            f"{why} and {path} is not readable: {_permission_fix(path.parent)}"
        ) from None
    except OSError as e:
        raise _CannotTell(f"{why} and {path} cannot be read ({e.strerror or e})") from None
    return list(events), path


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
        _warn(f"{e} ({_another_hint(target)})")
        if cmd == "qos_lock" and target.lock_file is not None:
            _warn(f"with guardd down, a lock can be taken by hand: touch {target.lock_file}")
        elif cmd == "qos_unlock" and target.lock_file is not None:
            # A guard window guardd took is kept in state.json and put back at start, so
            # an rm now would not end it (docs/contract.md §3): only guardd can.
            _warn(
                "with guardd down, a lock guardd took comes back when it starts (its guard "
                "window is kept in state.json): start guardd, then `guardctl qos unlock`; "
                f"a lock another tool made can be removed by hand: rm {target.lock_file}"
            )
        return UNREACHABLE
    except ControlError as e:
        _warn(f"failed: {e}")
        return REFUSED
    sys.stdout.write(render_change(cmd, result))
    return DONE


def _cmd_switch(args: argparse.Namespace, target: _Target) -> int:
    payload = {"color": args.color, "force": args.force, "reason": args.reason}
    if args.wait is not None:
        from guardd import ctlwatch  # noqa: PLC0415 - see _LAZY_CTLWATCH

        return ctlwatch.change_and_wait(target.socket, "switch", payload, timeout=args.wait)
    return _change(target, "switch", payload)


def _cmd_rollback(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "rollback", {"reason": args.reason})


def _cmd_promote(args: argparse.Namespace, target: _Target) -> int:
    if args.wait is not None:
        from guardd import ctlwatch  # noqa: PLC0415 - see _LAZY_CTLWATCH

        return ctlwatch.change_and_wait(
            target.socket, "promote", {"reason": args.reason}, timeout=args.wait
        )
    return _change(target, "promote", {"reason": args.reason})


def _cmd_wait(args: argparse.Namespace, target: _Target) -> int:
    from guardd import ctlwatch  # noqa: PLC0415 - see _LAZY_CTLWATCH

    return ctlwatch.wait_for(target.socket, target.label, args.condition, timeout=args.timeout)


def _cmd_incident(args: argparse.Namespace, target: _Target) -> int:
    # The journal file is the whole story and is there with guardd down; guardd's
    # history (its recent events) is the way in for a user who may not read the file.
    try:
        events, _path = _read_journal(target, None, why="cannot read the journal")
    except _CannotTell as unreadable:
        from guardd.control import protocol  # noqa: PLC0415 - _LAZY_CLIENT

        try:
            answer = call(
                target.socket,
                "history",
                {"limit": protocol.MAX_HISTORY_LIMIT},
                timeout=READ_TIMEOUT_S,
            )
        except ControlError:
            raise unreadable from None
        events = [e for e in answer.get("events") or [] if isinstance(e, dict)]
    else:
        events += _unwritten(target, _path, {e.get("id") for e in events})
    form = "json" if args.json else "markdown" if args.markdown else "text"
    from guardd import ctlwatch  # noqa: PLC0415 - see _LAZY_CTLWATCH

    return ctlwatch.incident(events, None if args.last else args.rollback, form=form)


def _unwritten(target: _Target, path: Path, known: set[object]) -> list[dict[str, Any]]:
    """The events a running guardd journaled and could not write to `path` yet (its state
    disk full or failing: `storage.journal_backlog`), but those whose id is `known` (written
    meanwhile); none when it does not answer."""
    from guardd.control import protocol  # noqa: PLC0415 - _LAZY_CLIENT

    try:
        status = call(target.socket, "status", {}, timeout=PEEK_TIMEOUT_S)
        storage = status.get("storage")
        backlog = storage.get("journal_backlog") if isinstance(storage, Mapping) else None
        if not isinstance(backlog, int) or isinstance(backlog, bool) or backlog <= 0:
            return []
        limit = min(backlog, protocol.MAX_HISTORY_LIMIT)
        answer = call(target.socket, "history", {"limit": limit}, timeout=READ_TIMEOUT_S)
    except ControlError:
        return []
    events = [
        e for e in answer.get("events") or [] if isinstance(e, dict) and e.get("id") not in known
    ]
    if not events:
        return []
    _warn(f"{len(events)} events guardd could not write to {path} yet are read from its memory")
    return events


def _cmd_pause(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "pause", {"reason": args.reason})


def _cmd_resume(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "resume", {"reason": args.reason})


def _expired(until: object) -> bool:
    """Whether a lock's `until` (RFC 3339) has passed; false when it says no time."""
    if not isinstance(until, str):
        return False
    try:
        return parse_rfc3339(until) < time.time()
    except ValueError:
        return False


def _expiry_note(target: _Target, by: object) -> str:
    """What happens to an expired lock: it stays until guardd, when it runs, releases it;
    one another tool wrote (`by` neither guardd, nor an operator's `uid:`, nor the fleet's)
    guardd never removes: it holds until someone does."""
    if not (by == GUARDD or (isinstance(by, str) and by.startswith(("uid:", "fleet:")))):
        return (
            "expired, but not taken through guardd, which never removes it: it holds until "
            "it is removed (`guardctl qos unlock`)"
        )
    try:
        answer = call(target.socket, "qos_status", {}, timeout=PEEK_TIMEOUT_S)
    except DaemonUnreachable:
        return "expired; guardd judges it when it runs: released, or its guard window goes on"
    except ControlError:
        return "expired; guardd releases it when it runs"
    if by != GUARDD and answer.get("locked") and answer.get("owned") is False:
        # An operator's `uid:` lock guardd did not take (written by hand while it was down):
        # guardd never removes a lock it did not take.
        return (
            "expired, but guardd did not take it (written by hand?) and never removes it: it "
            "holds until it is removed (`guardctl qos unlock`)"
        )
    return "expired; guardd releases it, or extends the guard window, at its next check"


def _cmd_qos_status(args: argparse.Namespace, target: _Target) -> int:
    if target.lock_file is None:
        # Only --socket names the guard: its lock file is known to that guardd alone.
        try:
            lock = call(target.socket, "qos_status", {}, timeout=READ_TIMEOUT_S)
        except ControlError as e:
            raise _CannotTell(
                f"{e}; with only --socket, the lock file is guardd's to tell: "
                "name the instance with --instance NAME or --config PATH"
            ) from None
        where = f"guardd at {target.socket}"
        if lock.get("unknown") or not isinstance(lock.get("locked"), bool):
            # A fleet node that cannot reach etcd: the fleet's lock is unknown, not absent;
            # and an answer that does not say true or false is no "no lock" either.
            source = lock.get("source")
            raise _CannotTell(
                f"guardd at {target.socket}: "
                f"{lock.get('warning') or 'its answer does not say whether the lock is held'}",
                source=source if isinstance(source, str) else None,
            )
    else:
        try:
            lock = check_lock(target.lock_file).to_json()
        except LockUnknown as e:
            raise _CannotTell(
                f"cannot tell whether {target.instance}'s QoS lock is held: {e} "
                f"(is guardd {target.instance} installed and started? "
                "else name the right one with --instance NAME or --config PATH)"
            ) from None
        where = str(target.lock_file)
        if target.fleet is not None:
            # The fleet's lock decides; a lock held only in this host's file blocks too.
            fleet = _fleet_lock(target)
            if fleet.get("locked") or not lock.get("locked"):
                lock, where = fleet, "the fleet's lock in etcd"
            else:
                lock = {**lock, "source": "local"}
        elif not lock.get("locked"):
            lock, where = _unless_guardd_holds(target, lock, where)
    expired = bool(lock.get("locked")) and _expired(lock.get("until"))
    note = _expiry_note(target, lock.get("by")) if expired else None
    if args.json:
        _print_json({**lock, "expired": expired})
    else:
        sys.stdout.write(render_qos(lock, where, color=use_color(sys.stdout), note=note))
    return LOCK_HELD if lock.get("locked") else NO_LOCK


def _unless_guardd_holds(
    target: _Target, lock: dict[str, Any], where: str
) -> tuple[dict[str, Any], str]:
    """`lock`, read as no lock from `where`, unless the guardd running there holds one.

    That guardd may have been given another lock file than this config names (a
    `GUARDD_QOS__LOCK_FILE` in its unit's environment), or be moving traffic: its word
    then decides. Asked only before saying "allowed". A guardd that cannot be asked
    (down, or its socket not this user's) leaves what its state.dir says
    (`_unless_left_held`); one that takes the question and never answers is UNKNOWN.
    """
    if not paths.is_socket(target.socket):
        # No guardd there to ask (and no client to load: _LAZY_CLIENT).
        # (Not "not running": a socket removed by hand leaves guardd running, unreachable.)
        why = (
            f"no socket at {target.socket} (guardd {target.label} is not running, or cannot "
            "be asked)"
        )
        return _unless_left_held(target, lock, where, why)
    try:
        held = call(target.socket, "qos_status", {}, timeout=PEEK_TIMEOUT_S)
    except DaemonUnresponsive as e:
        # Not down: frozen or wedged, maybe in the middle of a rollback. No "allowed" then.
        raise _CannotTell(
            f"guardd at {target.socket} takes connections but does not answer ({e}): "
            f"whether deploys may go is unknown, though {where} holds no lock"
        ) from None
    except ControlError as e:
        why = f"guardd at {target.socket} cannot be asked ({e})"
        return _unless_left_held(target, lock, where, why)
    if held.get("locked") is False:
        return lock, where
    if held.get("unknown") or not isinstance(held.get("locked"), bool):
        raise _CannotTell(f"guardd at {target.socket}: {held.get('warning') or 'no answer'}")
    if held.get("reason") == IN_FLIGHT:
        _warn(f"guardd at {target.socket} is moving traffic: deploys wait until it ends")
    else:
        _warn(
            f"guardd at {target.socket} holds a QoS lock that {where} does not show: its "
            "qos.lock_file is another file (a GUARDD_QOS__LOCK_FILE in its environment?)"
        )
    return held, f"guardd at {target.socket}"


def _unless_left_held(
    target: _Target, lock: dict[str, Any], where: str, why: str
) -> tuple[dict[str, Any], str]:
    """`lock`, no lock in `where`, unless what guardd left in its state.dir says deploys
    must wait, when guardd cannot be asked (`why`): a rollback its journal shows begun and
    never ended (killed mid-switch: it resumes or undoes it at its next start), an
    operator's move state.json shows not ended, a state.json that is no state document (a
    hold at the next start), or a lock of its own that state.json keeps (the lock file
    removed meanwhile: it takes the lock back when it starts). UNKNOWN when those files
    cannot be read."""
    if target.state_dir is None:
        return lock, where
    from guardd.journal import open_rollback, tail_events  # noqa: PLC0415 - guardd unasked

    journal, state = target.state_dir / "events.jsonl", target.state_dir / "state.json"
    try:
        _state_dir_of(target.state_dir, target.label, where, why)
        pending = open_rollback(tail_events(journal))
        saved, unreadable = _saved_state(state)
    except OSError as e:
        raise _CannotTell(
            f"{why}, and its state in {target.state_dir} cannot be read "
            f"({e.strerror or e}): whether a switch is in flight, or a lock of its own "
            f"waits to be taken back, is unknown, though {where} holds no lock"
        ) from None
    owner = saved.get("guard")
    if isinstance(owner, str) and target.instance is not None and owner != target.instance:
        # Another instance's folder: what it keeps says nothing of this guard's lock.
        raise _CannotTell(
            f"{why}, and its state.dir {target.state_dir} holds guard {owner}'s state, not "
            f"{target.instance}'s: whether a switch is in flight, or a lock of its own waits "
            f"to be taken back, is unknown, though {where} holds no lock"
        )

    def left(reason: str, locked_at: str | None = None) -> dict[str, Any]:
        return dict(LockInfo(True, reason, locked_at, None, GUARDD).to_json())

    if pending is not None:
        _warn(f"{why}; its journal shows a rollback begun and not ended")
        begun = str(pending.get("ts"))
        return left(
            f"a rollback guardd began at {begun} has not ended (guardd resumes or undoes it "
            "when it runs): deploys wait until it ends",
            begun,
        ), str(journal)
    moving = saved.get("moving")
    if isinstance(moving, Mapping):
        # An operator's switch or promote, killed mid-way: guardd finishes or tells it at
        # its next start, and the front door may serve either color meanwhile.
        _warn(f"{why}; its state.json shows an operator's {moving.get('event')} not ended")
        return left(
            f"a {moving.get('event')} to {moving.get('target')} by {moving.get('by')} has not "
            "ended (guardd tells how it ended when it runs): deploys wait until it ends"
        ), str(state)
    if unreadable is not None:
        _warn(f"{why}; its {state} is {unreadable}")
        return left(
            f"{state} is {unreadable}: guardd starts in a hold, with its lock, until an "
            "operator looks (`guardctl resume`)"
        ), str(state)
    own = saved.get("qos")
    if isinstance(own, Mapping):
        _warn(f"{why}; its state.json keeps a QoS lock it takes back when it starts")
        fields = ("reason", "until", "locked_at", "by")
        return {"locked": True, **{k: own.get(k) for k in fields}}, str(state)
    # No lock, as the contract answers with guardd down; but a pipeline must not read it
    # as "guarded": nothing watches the deploy, nor rolls it back, until guardd runs.
    said = f"{why}: no QoS lock, but nothing guards a deploy until guardd runs again"
    _warn(said)
    return {**lock, "warning": said}, where


def _state_dir_of(state_dir: Path, label: str, where: str, why: str) -> None:
    """Raise `_CannotTell` unless guardd `label`'s state.dir holds its state
    (`paths.has_state`: state.json or events.jsonl, which a guardd that ran leaves both).

    No state there is no proof of no lock: a guardd that never ran with this config, or
    one whose state.dir is another folder (a GUARDD_STATE__DIR in its unit, or in this
    shell, or the folder above the instance's), whose rollback or lock this cannot see.
    Raises `OSError` when the folder cannot be looked at.
    """
    if paths.has_state(state_dir):
        return
    try:
        mode = state_dir.stat().st_mode
    except FileNotFoundError:
        what = "does not exist"
    else:
        dir_ = stat.S_ISDIR(mode)
        what = "holds no state.json or events.jsonl" if dir_ else "is not a directory"
    raise _CannotTell(
        f"{why}, and its state.dir {state_dir} {what}: guardd {label} never "
        "ran with this state.dir, or runs with another; whether a switch is in flight, or a "
        f"lock of its own waits to be taken back, is unknown, though {where} holds no lock"
    )


def _saved_state(state: Path) -> tuple[Mapping[str, Any], str | None]:
    """state.json as guardd left it (`statefile.read_only`): no file is no state."""
    from guardd.statefile import read_only  # noqa: PLC0415 - guardd unasked

    try:
        raw = state.read_bytes()
    except FileNotFoundError:
        return {}, None
    return read_only(raw)


def _fleet_lock(target: _Target) -> dict[str, Any]:
    """With `[fleet]`, the lock is the fleet's: read from etcd (UNKNOWN when it cannot be)."""
    from guardd.fleet import lockread  # noqa: PLC0415 - only with [fleet]

    try:
        return lockread.read_fleet_lock(
            target.fleet or {}, target.instance or "", timeout=PEEK_TIMEOUT_S
        )
    except lockread.FleetLockUnknown as e:
        raise _CannotTell(
            f"cannot tell whether the fleet's QoS lock ({target.instance}) is held: {e}",
            source="fleet",
        ) from None


def _cmd_qos_lock(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "qos_lock", {"for_s": args.for_s, "reason": args.reason})


def _cmd_qos_unlock(args: argparse.Namespace, target: _Target) -> int:
    return _change(target, "qos_unlock", {"reason": args.reason})


_CHANGE_EXITS: Final = """\
exit codes:
  0  done
  1  refused by guardd (the message says why)
  2  usage error
  3  guardd unreachable, or which guard is meant cannot be told
  4  not permitted (needs root, guardd's user or control.admin_group)"""

_MAIN_EPILOG: Final = """\
examples:
  guardctl --instance threader status
  guardctl --instance threader history --limit 20
  guardctl --instance threader rollback --reason "checkout 500s after release 2026.11.3"
  guardctl --instance threader qos status && ./deploy.sh

where guardctl looks (guardd's own defaults, under systemd and outside it):
  socket     --socket, else control.socket in the config, else /run/guardd/INSTANCE.sock
  lock file  qos.lock_file in the config, else /run/guardd/INSTANCE.qos.lock
  config     --config, else $GUARDD_CONFIG, else /etc/guardd/INSTANCE.toml
  instance   --instance, else from --config or $GUARDD_CONFIG (its `instance`, else
             the file name's stem), else the only instance on this host
  instances  /etc/guardd/NAME.toml, /run/guardd/NAME.sock, /var/lib/guardd/NAME/
             holding state.json or events.jsonl
A guardd run by hand with other paths in its config: pass that config with --config.

exit codes:
  status          0 OK, 1 WARNING, 2 CRITICAL (hold), 3 UNKNOWN
  history         0 done (from the journal file when guardd is down), 1 failed, 3 UNKNOWN
  incident        0 done (from the journal file), 1 no such incident, 3 UNKNOWN
  wait, --wait    0 done, 1 still not at the deadline (the last reason is printed),
                  3 guardd not answering at the deadline, 4 not permitted
  qos status      0 no lock (deploys allowed), 1 lock held, 3 UNKNOWN
  other commands  0 done, 1 refused, 3 guardd unreachable or UNKNOWN, 4 not permitted
  usage errors    2 (except for `status`, where 2 means CRITICAL)
UNKNOWN is every case where guardctl cannot tell which guard it asks about or what
it says: the config cannot be read, no such instance, several and none named, the
lock directory missing. One line says what could not be read and how to fix it.

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
        "consecutive failures, window error ratio, samples, p50/p95 latency, last error, "
        "age of the last probe), the rollback target, the QoS lock, the paused flag, the "
        "last decision with its evidence, the last event and the uptime. A color whose "
        "last probe is older than three intervals is shown as stale, never as healthy.\n\n"
        "ERR% is the window's failed-probe ratio: every failed probe counts (5xx, other "
        "statuses, timeouts, refused connections, body mismatches), not only 5xx.\n\n"
        "The exit code follows the monitoring-plugin convention, so `guardctl status` "
        "can serve as a Nagios/Icinga check.",
        """\
examples:
  guardctl --instance threader status
  guardctl --instance threader status --json | jq .upstreams.green
  guardctl --instance threader status --watch --interval 2s

--watch redraws the status in place on a terminal every --interval (default 1s);
when stdout is not a terminal it prints one line per change (state, active color,
health, QoS lock, pause, hold) and one per journal event; with --json, the status
object on each change. Ctrl-C ends it with 130; it ends with 3 when guardd goes away.
NO_COLOR turns colors off.

exit codes:
  0  OK: the active color is healthy, no QoS lock, not paused, state steady
  1  WARNING: degraded, guard window, rolling back, starting, QoS lock held, paused,
     the active color is not (known to be) healthy, or the rollback target is down
  2  CRITICAL: hold - the active color fails and no safe switch exists (in a fleet
     also: it fails and this node cannot write the rollback: etcd is unreachable)
  3  UNKNOWN: guardd is unreachable, or which guard is meant cannot be told; with
     --json, stdout is then {"unknown": true, "warning": ..., "state": null, ...}""",
        _cmd_status,
    ),
    _Command(
        "history",
        "show the event journal, newest last",
        "Show guardd's event journal, one line per event (time, event, from->to, "
        "severity, who, reason), newest last. With guardd down, the journal file "
        "(events.jsonl in the state directory) is read instead, and guardctl says so.",
        """\
examples:
  guardctl --instance threader history
  guardctl --instance threader history --limit 5 --json

exit codes:
  0  done
  1  guardd answered with an error
  3  guardd unreachable and its journal unreadable, or which guard is meant
     cannot be told""",
        _cmd_history,
    ),
    _Command(
        "switch",
        "switch traffic to COLOR",
        "Switch traffic to COLOR now. guardd refuses when COLOR is unhealthy or stale, "
        "when its window's failed-probe ratio is at or above policy.p0_error_ratio (guardd "
        "would roll it back at once), or when the QoS lock is held; --force overrides all "
        "three, and also sets COLOR when the switch target names neither color. The switch "
        "is journaled with your user.",
        f"""\
examples:
  guardctl --instance threader switch blue --reason "green leaks memory"
  guardctl --instance threader switch green --force --reason "blue host is being drained"
  guardctl --instance threader switch green --wait 5m --reason "release 2026.11.4"

--wait DURATION retries while guardd refuses (a color not yet healthy, the QoS lock),
saying why every few seconds on stderr, and exits 1 with the last reason at the
deadline (3 when guardd was not answering then).

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
        "fresh and healthy for policy.promote_successes probes in a row, AND its window's "
        "failed-probe ratio under policy.p1_error_ratio (judged once the window holds "
        "policy.min_samples), AND the QoS lock not held. There is no --force: "
        "`guardctl switch` is the override.",
        f"""\
examples:
  guardctl --instance threader promote --reason "release 2026.11.4"
  guardctl --instance threader promote --wait 2m --reason "release 2026.11.4"   # in CI

--wait DURATION retries while the gate does not pass, saying why every few seconds on
stderr, and exits 1 with the last reason at the deadline (3 when guardd was not
answering then).

{_CHANGE_EXITS}""",
        _cmd_promote,
    ),
    _Command(
        "pause",
        "stop automatic actions (probing and metrics go on)",
        "Stop guardd's automatic actions: no automatic rollback and no hold. Probing, "
        "metrics and alerts go on, and so does the guard window of a QoS lock guardd took "
        "(it is still released or extended). `guardctl resume` undoes it.",
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
        "for an operator; either way the rollback budget is re-armed.",
        f"""\
examples:
  guardctl --instance threader resume
  guardctl --instance threader resume --reason "db failover done, CHG-4712"

{_CHANGE_EXITS}""",
        _cmd_resume,
    ),
    _Command(
        "wait",
        "wait until the guard is steady, the active color healthy, or the lock gone",
        "Wait until guardd's status meets CONDITION, for a pipeline step: `steady` (state "
        "steady: no guard window, rollback, hold or pause), `healthy` (the active color is "
        "fresh, its probes pass, and no rule fires or is pending on it), `unlocked` (no "
        "QoS lock: the guard window has passed). Why it is still waiting goes to stderr "
        "every few seconds. A guardd that does not answer is waited out like any other "
        "reason, until the deadline.",
        """\
examples:
  guardctl --instance threader wait unlocked --timeout 10m && ./deploy.sh
  guardctl --instance threader wait healthy --timeout 2m

exit codes:
  0  the condition is met
  1  not met at the deadline (the last reason is printed)
  2  usage error
  3  guardd not answering at the deadline, the QoS lock still UNKNOWN then (a fleet
     node that cannot read the fleet's lock: never `unlocked`), or which guard is meant
     cannot be told""",
        _cmd_wait,
    ),
    _Command(
        "incident",
        "the timeline of a rollback, for a post-mortem",
        "Show one incident from the journal: the change before it (promote, switch or an "
        "external switch), the first failing evidence, the decision and its rule, the "
        "switch and its verification, the QoS lock with its extensions and release, and "
        "the operators' actions with who did them; and the time to detect, the time to "
        "recover and the time under lock. It reads events.jsonl, so it works with guardd "
        "down. ROLLBACK is a rollback id (or the start of one) or an incident id "
        "INC-YYYYMMDD-N: the date of the rollback and its number among that day's "
        "rollbacks in the journal, which never changes. Without ROLLBACK, the last one.",
        """\
examples:
  guardctl --instance threader incident --last --markdown   # paste into Slack or a report
  guardctl --instance threader incident INC-20261130-1 --json

exit codes:
  0  done
  1  no such incident in the journal
  2  usage error
  3  the journal cannot be read (and guardd does not answer), or which guard is meant
     cannot be told""",
        _cmd_incident,
    ),
)

_QOS_COMMANDS: Final = (
    _Command(
        "status",
        "is a deploy allowed now?",
        "Tell whether a deploy is allowed now. This reads the QoS lock file directly, so "
        "it answers quickly and also when guardd is down. Any file at the lock path "
        "blocks deploys, even an empty one made with `touch`, and so does a lock past "
        "its `until` until guardd releases it. When guardctl cannot tell (the config "
        "cannot be read, no such instance, the lock directory is missing) it exits 3, "
        "never 0.",
        """\
examples:
  guardctl --instance threader qos status && ./deploy.sh
  guardctl --instance threader qos status --json

exit codes:
  0  no lock: deploys allowed
  1  lock held: deploys blocked (the reason and until when are printed)
  3  UNKNOWN: cannot tell; deploys must wait (the line printed says how to fix it);
     with --json, stdout is then {"locked": null, "unknown": true, "warning": ...}""",
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
  guardctl --instance threader qos unlock --reason "incident 812 closed"

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
        help="guardd instance to talk to (default: the only one on this host)",
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


def build_parser(
    path: Sequence[str] = (), parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """The guardctl argument parser; with `path` (`("qos", "status")`), only that command's.

    A parser of one command parses every command line naming it the same way the whole
    parser does: the others are only left out, never told apart differently. See
    `_parse` for why it exists.
    """
    parser = parser_class(
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
        if path and path[0] != command.name:
            continue
        sub = _subparser(commands, command, command.name)
        _globals(sub, defaults=False)
        if command.name in ("status", "history", "incident"):
            sub.add_argument(
                "--json", action="store_true", help="print guardd's answer as JSON instead of text"
            )
        if command.name == "status":
            sub.add_argument(
                "--watch",
                action="store_true",
                help="keep showing the status: redrawn on a terminal, a line per change otherwise",
            )
            sub.add_argument(
                "--interval",
                metavar="DURATION",
                type=parse_duration,
                default=1.0,
                help="how often --watch asks guardd (default: 1s)",
            )
        if command.name in ("switch", "promote"):
            sub.add_argument(
                "--wait",
                metavar="DURATION",
                type=parse_duration,
                help="retry while guardd refuses, for up to DURATION (e.g. 2m)",
            )
        if command.name == "wait":
            sub.add_argument(
                "condition",
                metavar="CONDITION",
                choices=WAIT_CONDITIONS,
                help="steady, healthy or unlocked",
            )
            sub.add_argument(
                "--timeout",
                metavar="DURATION",
                type=parse_duration,
                required=True,
                help="give up after this long (e.g. 10m)",
            )
        if command.name == "incident":
            which = sub.add_mutually_exclusive_group()
            which.add_argument(
                "rollback",
                metavar="ROLLBACK",
                nargs="?",
                help="a rollback id (or its start) or INC-YYYYMMDD-N; default: the last",
            )
            which.add_argument("--last", action="store_true", help="the last incident (default)")
            sub.add_argument(
                "--markdown",
                action="store_true",
                help="Markdown for Slack, Discord or a post-mortem",
            )
        if command.name == "history":
            sub.add_argument(
                "--limit", metavar="N", type=_history_limit, help="only the last N events"
            )
        if command.name == "switch":
            sub.add_argument("color", metavar="COLOR", choices=COLORS, help="blue or green")
            sub.add_argument(
                "--force",
                action="store_true",
                help="switch even if COLOR is unhealthy or the QoS lock is held",
            )
        if command.name in ("switch", "rollback", "promote", "pause", "resume"):
            sub.add_argument(
                "--reason", metavar="TEXT", help="why; goes to the journal and the notifications"
            )
    if not path or path[0] == "fleet":
        _fleet_parser(commands)
    if not path or path[0] == "qos":
        _qos_parser(commands, path[1:])
    return parser


def _fleet_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = commands.add_parser(
        "fleet",
        help="the fleet of guardd nodes coordinated through etcd",
        prog="guardctl fleet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show the fleet this guardd belongs to (`[fleet]`).",
    )
    _globals(fleet, defaults=False)
    fleet_commands = fleet.add_subparsers(title="commands", metavar="COMMAND", required=True)
    fleet_status = _subparser(
        fleet_commands,
        _Command(
            "status",
            "every node, its served color, generation and lease age, and the leader",
            "Show every node of the fleet: the color it serves, the generation it applied, "
            "the age of its record, and which node leads.",
            "exit codes:\n  0  every node serves the desired color\n"
            "  1  WARNING: a node diverges, is lost or holds, or a warning\n"
            "  3  UNKNOWN: guardd or etcd cannot be reached",
            _cmd_fleet_status,
        ),
        "fleet status",
    )
    _globals(fleet_status, defaults=False)
    fleet_status.add_argument("--json", action="store_true", help="print the fleet as JSON")


def _qos_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], path: Sequence[str]
) -> None:
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
        if path and path[0] != command.name:
            continue
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
        if command.name == "unlock":
            sub.add_argument("--reason", metavar="TEXT", help="why; journaled with the release")


# The global options that take a value, as `_command_path` must step over them.
_VALUE_OPTIONS: Final = ("--instance", "--config", "--socket")
# Each command word and the words that may follow it (none: the command is named).
_WORDS: Final[dict[str, tuple[str, ...]]] = {
    **dict.fromkeys((c.name for c in _COMMANDS), ()),
    "fleet": ("status",),
    "qos": tuple(c.name for c in _QOS_COMMANDS),
}


def _command_path(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The command words `argv` names (`("qos", "status")`), or None when unsure.

    Unsure is any word before the last command word that is neither a global option
    taking a value (or an abbreviation of one, as argparse accepts) nor that value:
    `--help` or `--version` there shows the whole parser's text, so only the whole
    parser may answer it.
    """
    names = _WORDS
    path: list[str] = []
    words = iter(argv)
    for word in words:
        if word.startswith("-"):
            name, inline, _ = word.partition("=")
            if len(name) < 3 or not any(option.startswith(name) for option in _VALUE_OPTIONS):
                return None
            if not inline:
                next(words, None)  # its value
        elif word in names:
            path.append(word)
            below = names[word]
            if not below:
                return tuple(path)
            names = dict.fromkeys(below, ())
        else:
            return None
    return None


class _Unsure(Exception):
    """A command line the one command's parser would refuse (`_parse` asks the whole one)."""


class _OneCommandParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Unsure(message)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse guardctl's command line.

    Building the whole parser costs more than the rest of `guardctl qos status`
    together (sixteen subparsers and their help texts), and a deploy script asks it
    often: so the parser of the command the line names parses it first. A line it
    refuses, or whose command is unclear, goes to the whole parser, whose error,
    help and usage texts are then exactly those of before.
    """
    path = _command_path(argv)
    if path is not None:
        with contextlib.suppress(_Unsure):
            return build_parser(path, _OneCommandParser).parse_args(argv)
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run guardctl and return its exit code."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A reason or error in a script the terminal cannot show must not crash the output.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        args = _parse(sys.argv[1:] if argv is None else argv)
        return answering("guardctl", functools.partial(_main, args))
    except KeyboardInterrupt:
        return 130


def _main(args: argparse.Namespace) -> int:
    run: Runner = args.run
    target: _Target | None = None
    try:
        target = _resolve(args)
        return run(args, target)
    except _CannotTell as e:
        guard = target.instance if target is not None else args.instance
        return _cannot_tell(args, e, guard)


def _cannot_tell(args: argparse.Namespace, e: _CannotTell, guard: str | None) -> int:
    """Say UNKNOWN (docs/contract.md §1) and return `CANNOT_TELL`.

    The line goes to stdout for `status`, a monitoring check whose verdict is the first
    line of stdout, and to stderr otherwise. With `--json`, `status` and `qos status`
    print it on stderr and the UNKNOWN object on stdout: a pipeline parsing the answer
    gets one saying UNKNOWN, never an empty or unparseable stdout.
    """
    run: Runner = args.run
    why = str(e)
    if not getattr(args, "json", False) or run not in (_cmd_status, _cmd_qos_status):
        if run is _cmd_status:
            print(f"UNKNOWN: {why}")
        else:
            _warn(f"UNKNOWN: {why}")
        return CANNOT_TELL
    _warn(f"UNKNOWN: {why}")
    if run is _cmd_qos_status:
        doc: dict[str, Any] = {**unknown_json(why, source=e.source), "expired": False}
    else:
        from guardd import ctlwatch  # noqa: PLC0415 - see _LAZY_CTLWATCH

        doc = ctlwatch.unknown_status(guard, why)
    if getattr(args, "watch", False):
        print(json.dumps(doc))  # `status --watch --json` prints compact lines
    else:
        _print_json(doc)
    return CANNOT_TELL


if __name__ == "__main__":
    sys.exit(main())
