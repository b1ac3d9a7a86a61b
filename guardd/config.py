"""guardd's configuration: a TOML file, overridden by `GUARDD_<SECTION>__<KEY>` variables.

Every model rejects unknown keys, and every problem is reported as
`<file>: <dotted.key>: <reason>` so that an operator can fix it without a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import grp
import json
import os
import re
import shutil
import socket
import stat
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

from guardd import _pydantic, httpfields, paths
from guardd.core.policy import PolicySpec, spec_rules
from guardd.core.rules import BUILTIN_NAMES, OPS, Rule
from guardd.core.signals import KIND_STATS, PROBE
from guardd.core.types import COLORS, Color
from guardd.core.window import MAX_SAMPLES
from guardd.durations import NUMBER as _NUMBER
from guardd.durations import format_duration, parse_duration
from guardd.exceptions import ConfigError, ConfigProblem
from guardd.fsutil import link_end, open_regular
from guardd.secrets import shown_setting

if typing.TYPE_CHECKING:
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

# Before the first model below is built (guardd/_pydantic.py says why).
_pydantic.without_plugins()

#: A config file larger than this is refused unread (the example config is about 10 KiB).
MAX_CONFIG_BYTES = 1024 * 1024
# Names end up in paths, unit names and argv: a conservative alphabet keeps them inert.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def parse_flag(value: object) -> bool:
    """A TOML boolean, or "true"/"false" from an environment variable; nothing looser."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("must be true or false")


#: The longest duration a setting takes. Nothing guardd times runs longer than a year, and
#: a bound keeps every figure derived from a duration (probes in a window, a lock's end)
#: a number a clock and a message can hold: `interval = 1e308` passed as seconds.
MAX_DURATION_S = 366 * 86400.0


def _at_most_a_year(seconds: float) -> float:
    if seconds > MAX_DURATION_S:
        raise ValueError("must be at most 8784h (a year)")
    return seconds


#: The integers TOML holds: 64-bit signed (toml.io, "Integer"). A count beyond is a slip,
#: from the file or from the environment alike.
_COUNT_RANGE = range(-(2**63), 2**63)
_OUT_OF_RANGE = "must be a 64-bit integer, as TOML's are"
#: What a TOML integer may be made of (`1_000`, `+7`, `0x1F`); anything else is no count,
#: and cannot be read as TOML meaning something else either (no `=`, quote or newline).
_INTEGER_CHARS = re.compile(r"[0-9A-Za-z_+-]{1,100}")


def _whole_number(value: object) -> object:
    """A count as written: an integer, or from the environment an integer as TOML writes it
    (`12`, `-1`, `1_000`, `0x1F`: read by `tomllib`, so a variable says what the file may).

    pydantic's lax mode reads `true` as 1, `3.0` and the text `"3.0"` as 3: a boolean or a
    float is a slip, never a count. Raises `ValueError` (`must be an integer`, or `must be a
    64-bit integer, as TOML's are` beyond TOML's range).
    """
    if isinstance(value, bool | float):
        raise ValueError(f"must be an integer, not {str(value).lower()}")  # noqa: TRY004
    if isinstance(value, str):
        text = value.strip(" \t")
        if not _INTEGER_CHARS.fullmatch(text):
            long = text.isascii() and text.isdigit()  # (more digits than a pattern takes)
            raise ValueError(_OUT_OF_RANGE if long else "must be an integer")
        try:
            value = tomllib.loads(f"count = {text}")["count"]
        except (tomllib.TOMLDecodeError, ValueError):  # (ValueError: past int()'s digits)
            raise ValueError("must be an integer") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("must be an integer")  # noqa: TRY004 - pydantic wants a ValueError
    if isinstance(value, int) and value not in _COUNT_RANGE:
        raise ValueError(_OUT_OF_RANGE)
    return value


def _not_a_flag(value: object) -> object:
    """A number as written: pydantic's lax mode reads `true` as 1.0, and `p0_error_ratio =
    true` would be a rule that fires only at 100 %: a boolean is a slip, never a number."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")  # noqa: TRY004
    return value


def _a_path(value: object) -> object:
    """A path as written: never empty. pydantic reads `""` as `Path(".")`, the folder the
    process runs in, and guardctl reads an unset key's default path: an empty
    `GUARDD_QOS__LOCK_FILE=` (a template's unset variable) would part guardd and a deploy
    gate onto different lock files. Raises `ValueError` (`must not be empty`)."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


#: A file or folder guardd reads or writes: a non-empty path.
SettingPath = Annotated[Path, BeforeValidator(_a_path)]


def _absolute(path: Path) -> Path:
    """A path others share with guardd, absolute: guardd runs in `/` under systemd, a
    deploy script's guardctl and nginx elsewhere, and a relative path would name a
    different file for each. Raises `ValueError` (`must be an absolute path`)."""
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    return path


#: A path guardd shares with guardctl or nginx (the lock, the state, the socket, the
#: switch's files): absolute. (A credential file may be relative: to systemd's
#: $CREDENTIALS_DIRECTORY.)
SharedPath = Annotated[SettingPath, AfterValidator(_absolute)]
#: A number (a ratio, a threshold): never a boolean.
Number = Annotated[float, BeforeValidator(_not_a_flag)]
#: A count (failures, samples, attempts, bytes): an integer, never a boolean or a float.
Count = Annotated[int, BeforeValidator(_whole_number)]
#: The least `switch.timeout`: see `SwitchConfig._timeout`.
MIN_SWITCH_TIMEOUT_S = 1.0
Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_at_most_a_year)]
Flag = Annotated[bool, BeforeValidator(parse_flag)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
#: A probe's cadence: a hundred rounds a second at most. `1ms` (or `1e-9`) passed, and the
#: daemon, or a replay's ticks over a week at that cadence, would never keep up.
ProbeCadence = Annotated[Duration, Field(ge=0.01)]
Ratio = Annotated[Number, Field(ge=0.0, le=1.0)]
#: Probes counted in a window or in a row: at most what a probe window keeps. More in a
#: window, and the rules reading it could never conclude (a policy silently without its
#: ratio and latency rules); a streak that long (27 minutes at 10 probes a second) is no P0.
ProbeCount = Annotated[Count, Field(ge=1, le=MAX_SAMPLES)]


# Whether validation also looks at the host: files, links, executables (`check-config`
# without --offline). A context variable, because pydantic-settings passes no context.
_HOST_CHECKS: ContextVar[bool] = ContextVar("guardd_host_checks", default=False)
# What the host checks found that guardd runs with, holding (`_link_state`): warnings,
# (dotted key, reason), collected by `load` while it validates. None: not collecting.
_HOST_WARNINGS: ContextVar[list[tuple[str, str]] | None] = ContextVar(
    "guardd_host_warnings", default=None
)
# Problems found by a section's own checks: (key inside the section, reason). The key is
# dotted text, or its parts when one may hold a dot itself (a header name).
Found = list[tuple[str | tuple[str, ...], str]]


class _Section(BaseModel):
    # allow_inf_nan: TOML and JSON read `nan` and `inf` as floats. A NaN compares false with
    # everything, so a rule `above = nan` would never fire and a window of `nan` seconds
    # would hold nothing, silently; no setting of guardd means anything at infinity either.
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    def _cross_checks(self, invalid: frozenset[str]) -> Found:  # noqa: ARG002 - for subclasses
        """Rules across keys; each skips itself when a key it reads is in `invalid`."""
        return []

    def _host_checks(self, invalid: frozenset[str]) -> Found:  # noqa: ARG002 - for subclasses
        """What only the host can tell (files, links, executables); same skipping."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # pydantic runs an "after" validator only when every key is valid, so a rule across
        # keys would hide until the others are fixed. Here the rules run on the valid keys
        # (the invalid ones at their defaults), and every problem is raised at once.
        try:
            model = handler(data)
            errors: list[Any] = []
        except ValidationError as e:
            errors = e.errors()
            invalid = frozenset(str(err["loc"][0]) for err in errors if err["loc"])
            if not isinstance(data, Mapping) or not invalid:
                raise
            try:
                model = handler({k: v for k, v in data.items() if k not in invalid})
            except ValidationError:
                raise e from None
        else:
            invalid = frozenset()
        found = model._cross_checks(invalid)
        if _HOST_CHECKS.get():
            found += model._host_checks(invalid)
        if errors or found:
            raise _validation_error(cls.__name__, errors, found)
        return model


#: The error types pydantic-core can build an error of by name. Others come from pydantic's
#: own Python validators (`path_type` for a `Path` given a number): raised again by name,
#: one of them stopped `check-config` with a KeyError.
_CORE_ERROR_TYPES: Final = frozenset(get_args(ErrorType))


def _validation_error(title: str, errors: list[Any], found: Found) -> ValidationError:
    details = [
        InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {}))
        if e["type"] in _CORE_ERROR_TYPES
        else InitErrorDetails(
            type=PydanticCustomError(e["type"], "{reason}", {"reason": e["msg"]}),
            loc=e["loc"],
            input=e["input"],
        )
        for e in errors
    ]
    details += [
        InitErrorDetails(
            type=PydanticCustomError("guardd_check", "{reason}", {"reason": reason}),
            loc=_loc(key),
            input=None,
        )
        for key, reason in found
    ]
    return ValidationError.from_exception_data(title, details)


def _loc(key: str | tuple[str, ...]) -> tuple[int | str, ...]:
    if isinstance(key, tuple):
        return key
    return tuple(int(p) if p.isdigit() else p for p in key.split(".")) if key else ()


def _header_problems(key: str, headers: Mapping[str, str]) -> Found:
    """What makes the `headers` table at `key` unsendable, each problem at its header's
    key (`key.NAME`), never quoting a value.

    A name that is not an HTTP token is not shown either (it may be a whole
    `Authorization: Bearer ...` line): it is counted instead, "header 2", as written.
    """
    found: Found = []
    for i, (name, value) in enumerate(headers.items(), start=1):
        if why := httpfields.name_problem(name):
            found.append((key, f"header {i} (in the order written): {why}"))
        elif name.lower() in _FRAMING:
            found.append(((key, name), "a probe is a GET without a body: guardd frames it"))
        elif why := httpfields.value_problem(value):
            found.append(((key, name), why))
    lowered = [n.lower() for n in headers]
    for name in sorted({n for n in lowered if lowered.count(n) > 1}):
        found.append((key, f"{name} is given twice (header names are case-insensitive)"))
    return found


#: Headers of the message's framing, which guardd writes (a GET without a body): one from the
#: config would contradict them and every probe would fail. (`Host` may be given: it then
#: replaces the URL's, for a virtual host behind an address.)
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "te", "upgrade"})


def _check_http_url(url: str) -> str:
    # Schemes are case-insensitive (RFC 3986 §3.1): HTTP:// is http://.
    if not re.match(r"^https?://[^\s/]+", url, re.IGNORECASE):
        raise ValueError("must be an http:// or https:// URL")
    if any(c.isspace() or not c.isprintable() for c in url):
        # No request line can carry it (h11 refuses it at every probe): said here, once, and
        # the URL not repeated (it may hold a password, and the characters are unprintable).
        raise ValueError(
            "must not contain spaces, tabs, line breaks or other control characters "
            "(write a space in a path as %20)"
        )
    try:
        port = urlsplit(url).port
    except ValueError:
        port = 0  # out of range, or not a number
    if port == 0:
        # Not repeated from the URL: it may hold a password.
        raise ValueError("the port must be a number from 1 to 65535")
    return url


_PLACEHOLDER = re.compile(r"\{(color|instance)\}")


def _can(path: Path, mode: int) -> bool:
    # With the effective ids: guardd's unit grants capabilities that access() would ignore.
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _executable(command: str) -> str | None:
    """Why `command` (argv[0]) cannot be run, or None."""
    if "/" not in command:
        return None if shutil.which(command) else f'"{command}" is not on PATH'
    path = Path(command)
    if not path.exists():
        return f"{command}: no such file"
    if not path.is_file() or not _can(path, os.X_OK):
        return f"{command}: not executable"
    return None


def _readable_file(path: Path) -> str | None:
    if not path.exists():
        return f"{path}: no such file"
    if not path.is_file():
        return f"{path}: not a regular file"
    if not _can(path, os.R_OK):
        return f"{path}: not readable"
    return None


def same_url(url: str) -> tuple[str, str, int | None, str, str]:
    """What two spellings of one URL share: the scheme and host in any case, the scheme's
    port written or not, a path with or without its trailing slash. (Names are not
    resolved: `localhost` and `127.0.0.1` stay apart, as a check without the host.)"""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        port = None
    path = parts.path.rstrip("/") or "/"
    return (parts.scheme.lower(), (parts.hostname or "").lower(), port, path, parts.query)


def group_problem(name: str | None) -> str | None:
    """Why `name` (a group name or a numeric gid) names no group on this host, or None."""
    if name is None or name.isdigit():
        return None
    try:
        grp.getgrnam(name)
    except KeyError:
        return f"no group {name!r} on this host"
    return None


def _writable_dir(folder: Path, why: str) -> str | None:
    if not folder.is_dir():
        return f"directory {folder} does not exist"
    if not _can(folder, os.W_OK | os.X_OK):
        return f"cannot write in {folder} ({why})"
    return None


def not_switchable(target: Path, ends: Sequence[Path]) -> str | None:
    """Why guardd cannot switch by rewriting `target`, or None. One check for start,
    reload and `check-config`.

    - An alias of the active link (`ends`: the colors' targets): a link to another symlink
      that is none of them. Swapping it would change nothing nginx reads, and a guard of
      the real link would not know of this one.
    - Without `ends`, a state file reached through a link: guardd replaces the state file
      itself.
    - A target with more than one name (a hard link, `ln -P`): a switch replaces the name
      guardd knows, and the others keep what it held before. A reader of another name
      (nginx, the service) sees no switch while guardd says "switch: done", and a guard
      of another name takes a lock of its own.
    """
    try:
        st = os.lstat(target)
    except OSError:
        return None  # (a missing target is the callers' own problem to name)
    if not ends:
        if stat.S_ISLNK(st.st_mode):
            return (
                f"{target} is a symlink; guardd replaces the state file itself, never through "
                "a link: set switch.path to the file"
            )
    elif link_end(target, ends) != target:
        return (
            f"{target} points at {target.readlink()}, itself a symlink and none of "
            "switch.targets: point it straight at one of them, or set switch.active_link to "
            "the link nginx includes"
        )
    # Only for what guardd replaces: a symlink (nginx), or the state file. Anything else in
    # the link's place (a file, a directory, whose `..` is a second link) is no target to
    # switch: guardd holds on it, as on a link that names no color.
    replaced = stat.S_ISLNK(st.st_mode) or (not ends and stat.S_ISREG(st.st_mode))
    if replaced and st.st_nlink > 1:
        return (
            f"{target} has {st.st_nlink} hard links; a switch replaces this name only, and the "
            "others keep the old target: remove the other names"
        )
    return None


def _active_link(link: Path, targets: Mapping[Color, Path] | None) -> str | None:
    """Why guardd cannot swap `link` between `targets`, or None; a link that names no
    target now is `_link_state`'s warning, not this."""
    ends = list(targets.values()) if targets is not None and set(targets) == set(COLORS) else None
    if ends is not None and link.is_symlink() and (why := not_switchable(link, ends)):
        return why
    return _writable_dir(link.parent, "a switch writes the new link beside the old one")


def _link_state(link: Path, targets: Mapping[Color, Path] | None) -> str | None:
    """Why `link` names none of `targets` now (missing, not a symlink, pointing elsewhere),
    or None. A state, not a mistake of the config: guardd starts (and reloads) on it and
    holds, with deploys locked, until it names one: refused at start, there would be no
    guard at all, and nothing to lock deploys."""
    try:
        text = str(link.readlink())
    except FileNotFoundError:
        why = f"{link}: no such symlink; create it pointing at the active color's target"
    except OSError:
        why = f"{link}: not a symlink; guardd switches by replacing a symlink to a target"
    else:
        if targets is None or set(targets) != set(COLORS):
            return None
        resolved = link.resolve()
        if any(text == str(t) or t.resolve() == resolved for t in targets.values()):
            return None
        why = f"{link} points at {text}, which is none of switch.targets"
    return f"{why}; until it names a target, guardd holds and deploys are locked"


class UpstreamConfig(_Section):
    """Where one color is probed: one URL, or several with a quorum."""

    url: str | None = None
    """The health URL of this color (http or https)."""
    urls: list[str] | None = None
    """Several health URLs of this color, judged together by `quorum`."""
    quorum: Literal["all", "any", "majority"] = "all"
    """With `urls`: how many must pass for a round to pass: all, any or majority."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v)

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must list at least one URL")
        return [_check_http_url(u) for u in v]

    def _cross_checks(self, invalid: frozenset[str]) -> Found:
        if not invalid & {"url", "urls"} and (self.url is None) == (self.urls is None):
            return [("", "set exactly one of url or urls")]
        return []

    @property
    def all_urls(self) -> list[str]:
        """The probed URLs, whichever key gave them."""
        return [self.url] if self.url is not None else list(self.urls or [])


class ProbeConfig(_Section):
    """How every color is probed."""

    interval: ProbeCadence = 1.0
    """The normal cadence of each color's probe round (at least 10ms)."""
    fast_interval: ProbeCadence | None = None
    """The cadence while the active color is failing, to confirm fast (default: interval)."""
    timeout: PositiveDuration = 2.0
    """The hard deadline of one probe: connect, headers and body."""
    expect_status: Literal["2xx"] | list[Annotated[Count, Field(ge=100, le=599)]] = "2xx"
    """`"2xx"`, or a list of accepted status codes (at least one)."""
    expect_json: dict[str, Any] | None = None
    """Keys that must match in the JSON body (a subset match); unset: the body is not parsed."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Headers sent with every probe; values of token-like names are never logged. Names
    are HTTP tokens, none twice, none that frames the message (Content-Length,
    Transfer-Encoding, Connection, TE, Upgrade); values are ASCII without CR, LF or other
    control characters, and without a space at either end. A `Host` replaces the URL's."""
    max_body_bytes: Annotated[Count, Field(ge=0, le=64 * 1024 * 1024)] = 65536
    """The most of a body read, before and after decoding; a longer one fails `expect_json`."""
    follow_redirects: Flag = False
    """Follow redirects; otherwise a redirect is a failure (`http_other`)."""
    verify_tls: Flag = True
    """Verify https certificates."""
    ca_file: SettingPath | None = None
    """A CA bundle to verify https certificates against instead of the system's."""
    keepalive: Flag = False
    """Reuse a kept-alive connection between probes: a color refusing new ones still passes."""

    def _cross_checks(self, invalid: frozenset[str]) -> Found:
        # Headers are refused here, not at the first probe: a value h11 cannot send would
        # fail every probe, and h11's reason quotes the value (a token) in its message.
        found = [] if "headers" in invalid else _header_problems("headers", self.headers)
        if invalid & {"interval", "fast_interval"}:
            return found
        if self.fast_interval is not None and self.fast_interval > self.interval:
            found.append(("fast_interval", "must not be longer than interval"))
        return found

    def _host_checks(self, invalid: frozenset[str]) -> Found:
        if "ca_file" in invalid or self.ca_file is None:
            return []
        why = _readable_file(self.ca_file)
        return [("ca_file", why)] if why else []

    @field_validator("expect_status", mode="before")
    @classmethod
    def _some_status(cls, v: object) -> object:
        # An empty list accepts no answer: every probe would fail, and guardd hold.
        if isinstance(v, list) and not v:
            raise ValueError('accepts no status at all: list at least one, or use "2xx"')
        return v

    @property
    def confirm_interval(self) -> float:
        """The cadence while the active color is failing."""
        return self.fast_interval if self.fast_interval is not None else self.interval


class PolicyConfig(_Section):
    """When a failing active color is rolled back, and when guardd holds instead."""

    rollback_to: Literal["blue", "green", "previous"] = "previous"
    """Where automatic rollbacks go: blue, green, or previous (the standby color)."""
    consecutive_failures: ProbeCount = 3
    """P0: the active color fails this many probes in a row (at most 16384)."""
    window: PositiveDuration = 60.0
    """The sliding window for ratios and latency."""
    min_samples: ProbeCount = 5
    """Ratio and latency rules need this many samples in the window (at most 16384, the
    probes a window keeps)."""
    p0_error_ratio: Annotated[Number, Field(gt=0.0, le=1.0)] = 0.50
    """P0: failed-probe ratio of the active color over the window."""
    p1_error_ratio: Annotated[Number, Field(gt=0.0, le=1.0)] = 0.10
    """P1: failed-probe ratio, once sustained for `p1_sustain`."""
    p1_latency: PositiveDuration = 30.0
    """P1: window p95 latency of the active color, once sustained."""
    p1_sustain: Annotated[Duration, Field(ge=0)] = 120.0
    """How long a P1 condition must hold before guardd rolls back."""
    p2_error_ratio: Annotated[Number, Field(gt=0.0, le=1.0)] = 0.03
    """P2 (alert only): failed-probe ratio."""
    p2_latency: PositiveDuration = 10.0
    """P2 (alert only): window p95 latency."""
    latency_regression: Annotated[Number, Field(ge=0.0)] = 0.0
    """When > 0, P1 once the active p95 exceeds this many times the standby's p95."""
    promote_successes: ProbeCount = 5
    """`guardctl promote` needs this many passing probes in a row of the standby (at most
    16384)."""
    max_rollbacks: Annotated[Count, Field(ge=0)] = 3
    """The rollback budget: automatic rollbacks allowed within `budget_window`."""
    budget_window: PositiveDuration = 3600.0
    """The span the rollback budget counts over (from the journal, across restarts)."""
    dry_run: Flag = False
    """Decide, journal and notify, but never switch."""
    builtin_rules: Flag = True
    """The keys above are rules over the probe signal; false leaves only `[[rules]]`."""

    def spec(self) -> PolicySpec:
        """These keys as the core reads them (no `[[rules]]` of its own yet)."""
        return PolicySpec(**self.model_dump())

    def _cross_checks(self, invalid: frozenset[str]) -> Found:
        found: Found = []
        # A lower severity fires at a lower ratio: each key is named by the order it breaks.
        for lower, higher in (("p1", "p0"), ("p2", "p1")):
            low, high = f"{lower}_error_ratio", f"{higher}_error_ratio"
            if not invalid & {low, high} and getattr(self, low) > getattr(self, high):
                got = f"got {lower}={getattr(self, low)}, {higher}={getattr(self, high)}"
                found.append((low, f"must not exceed {high} ({got})"))
        if not invalid & {"p1_latency", "p2_latency"} and self.p2_latency > self.p1_latency:
            found.append(("p2_latency", "must not exceed p1_latency"))
        return found


_SOURCE = re.compile(r"^(file|syslog):/.+$")


# An address as nginx logs it in $upstream_addr: `host:port`, `[v6]:port` or `unix:/path`.
_UPSTREAM_ADDR = re.compile(r"unix:/\S+|\[[0-9A-Fa-f:.]+\]:\d{1,5}|[^\s:/\[\]]+:\d{1,5}")


class AccessLogSignalConfig(_Section):
    """`[signals.NAME]` with `kind = "access_log"`: the requests nginx served, per color."""

    kind: Literal["access_log"]
    """The kind of signal."""
    source: str
    """`file:/path/to/access.log` or `syslog:/path/to/guardd.sock` (nginx logs to it)."""
    addresses: dict[Color, list[str]] | None = None
    """Upstream `host:port` addresses of each color (default: from the switch targets)."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Other JSON field names for `msec`, `status`, `upstream_addr`, `upstream_status`,
    `request_time`, `upstream_response_time`."""
    window: PositiveDuration | None = None
    """The span of the statistics (default: `policy.window`)."""
    stale_after: PositiveDuration | None = None
    """No request logged for this long: the signal is stale and its rules inconclusive."""
    max_line_bytes: Annotated[Count, Field(ge=256, le=1024 * 1024)] = 16384
    """Longer lines are skipped and counted as `oversize`."""
    max_lines_per_s: Annotated[Count, Field(ge=1)] = 50_000
    """The parsing budget: lines beyond it in a second are counted as `shed`."""
    socket_group: str | None = None
    """`syslog:` only: the socket's group (nginx's workers'), mode 0660; unset: mode 0666."""

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not _SOURCE.match(v):
            raise ValueError("must be file:/absolute/path or syslog:/absolute/path.sock")
        return v

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: dict[Color, list[str]] | None) -> dict[Color, list[str]] | None:
        if v is not None:
            both = sorted(set(v.get("blue", ())) & set(v.get("green", ())))
            if both:
                raise ValueError(f"{', '.join(both)} given to both colors: which one served?")
            if not any(v.values()):
                raise ValueError("no address given: requests could not be attributed")
            for address in (a for addresses in v.values() for a in addresses):
                if not _UPSTREAM_ADDR.fullmatch(address):
                    # Compared with $upstream_addr as is: anything else matches no request.
                    raise ValueError(
                        f"{address!r} is no address nginx logs as $upstream_addr: "
                        "host:port, [v6]:port or unix:/path"
                    )
        return v

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, str]) -> dict[str, str]:
        known = {
            "msec", "status", "upstream_addr", "upstream_status", "request_time",
            "upstream_response_time",
        }  # fmt: skip
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return v


class PrometheusSignalConfig(_Section):
    """`[signals.NAME]` with `kind = "prometheus"`: a PromQL instant query per color."""

    kind: Literal["prometheus"]
    """The kind of signal."""
    url: str
    """The Prometheus server's base URL (`http://127.0.0.1:9090`)."""
    query: str
    """A PromQL instant query; `{color}` and `{instance}` are substituted."""
    every: PositiveDuration = 10.0
    """How often the query runs, per color."""
    timeout: PositiveDuration = 2.0
    """The deadline of one query."""
    stale_after: PositiveDuration | None = None
    """No answer for this long: the signal is stale, its rules inconclusive, one alert."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_http_url(v)

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        if "{color}" not in v:
            # One query for both colors: each would read the other's value as its own.
            raise ValueError("must name {color}: without it both colors read the same value")
        return v


def _check_selector(text: str) -> str:
    # Imported here: only a config with a scrape signal pays for the scrape module.
    from guardd.signals.scrape import parse_selector  # noqa: PLC0415

    parse_selector(text)
    return text


class ScrapeRatioConfig(_Section):
    """`ratio = { of = 'selector', to = 'selector' }`: increase of one over the other."""

    of: str
    """The numerator's series selector, e.g. `agent_runs_total{result="failed"}`."""
    to: str
    """The denominator's series selector, e.g. `agent_runs_total`."""

    @field_validator("of", "to")
    @classmethod
    def _selector(cls, v: str) -> str:
        return _check_selector(v)


class ScrapeSignalConfig(_Section):
    """`[signals.NAME]` with `kind = "scrape"`: each color's own `/metrics`."""

    kind: Literal["scrape"]
    """The kind of signal."""
    urls: dict[Color, str]
    """The `/metrics` URL of each color."""
    ratio: ScrapeRatioConfig | None = None
    """The increase of `of` over the increase of `to` across the window."""
    value: str | None = None
    """A gauge's series selector, read as it is (instead of `ratio`)."""
    every: PositiveDuration = 5.0
    """How often each color is scraped."""
    timeout: PositiveDuration = 2.0
    """The deadline of one scrape."""
    window: PositiveDuration | None = None
    """The span counter increases are taken over (default: `policy.window`)."""
    max_bytes: Annotated[Count, Field(ge=1024)] = 8 * 1024 * 1024
    """A larger exposition is not read (inconclusive, counted)."""
    stale_after: PositiveDuration | None = None
    """No scrape for this long: the signal is stale, its rules inconclusive, one alert."""

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: dict[Color, str]) -> dict[Color, str]:
        for url in v.values():
            _check_http_url(url)
        return v

    @field_validator("value")
    @classmethod
    def _value(cls, v: str | None) -> str | None:
        return None if v is None else _check_selector(v)

    def _cross_checks(self, invalid: frozenset[str]) -> Found:
        if invalid & {"ratio", "value"}:
            return []
        if (self.ratio is None) == (self.value is None):
            return [("ratio", "give exactly one of ratio and value")]
        return []


class LogMatchSignalConfig(_Section):
    """`[signals.NAME]` with `kind = "log_match"`: lines of each color's log matching a pattern."""

    kind: Literal["log_match"]
    """The kind of signal."""
    paths: dict[Color, SharedPath]
    """The log file of each color."""
    patterns: Annotated[list[str], Field(min_length=1)]
    """Regular expressions, matched per line (Python `re` syntax)."""
    window: PositiveDuration | None = None
    """The span counts are taken over (default: `policy.window`)."""
    max_line_bytes: Annotated[Count, Field(ge=256, le=1024 * 1024)] = 16384
    """Longer lines are skipped and counted as `oversize`."""
    stale_after: PositiveDuration | None = None
    """The log cannot be read for this long: the signal is stale, one alert."""

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression: {e}") from None
        return v


# Every `kind` a [signals.NAME] may have: the kinds of the core's vocabulary but the probe.
_SIGNAL_KINDS = tuple(kind for kind in KIND_STATS if kind != PROBE)
SignalConfig = Annotated[
    AccessLogSignalConfig | PrometheusSignalConfig | ScrapeSignalConfig | LogMatchSignalConfig,
    Field(discriminator="kind"),
]


class RuleConfig(_Section):
    """One `[[rules]]` row: a statistic of a signal against a threshold."""

    signal: str
    """`probe` or the name of a `[signals.NAME]` table."""
    stat: str
    """A statistic the signal yields (docs/contract.md §2)."""
    above: Number | None = None
    """Fires when the statistic is at or above this."""
    below: Number | None = None
    """Fires when the statistic is at or below this."""
    above_baseline: Annotated[Number, Field(gt=0.0)] | None = None
    """Fires when the statistic is at least this many times its baseline."""
    above_standby: Annotated[Number, Field(gt=0.0)] | None = None
    """Fires when the statistic exceeds this many times the standby color's."""
    severity: Literal["P0", "P1", "P2"]
    """P0 and P1 roll back; P2 alerts."""
    for_: Annotated[Duration, Field(ge=0)] | None = Field(default=None, alias="for")
    """How long the condition must hold (default: 0 for P0 and P2, `policy.p1_sustain`
    for P1)."""
    min_samples: Annotated[Count, Field(ge=0)] | None = None
    """Fewer samples in the window: inconclusive (default: `policy.min_samples`)."""
    name: str | None = None
    """The rule's name in evidence, status and metrics (default: `SIGNAL.STAT`)."""
    dry_run: Flag = False
    """Journal and notify what the rule would do; never act on it."""

    model_config = ConfigDict(populate_by_name=False)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _RULE_NAME.match(v):
            raise ValueError("may use letters, digits and _.- only (at most 64)")
        return v

    def _cross_checks(self, invalid: frozenset[str]) -> Found:
        if invalid & set(OPS):
            return []
        given = [k for k in OPS if getattr(self, k) is not None]
        if len(given) == 1:
            return [] if "stat" in invalid else _threshold_problems(self)
        if not given:
            return [("", f"needs one of {', '.join(OPS)}")]
        return [(given[1], f"give one threshold, not both {given[0]} and {given[1]}")]


_RULE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Statistics that are ratios (0 ... 1) whatever the signal.
_RATIO_STATS = frozenset({"error_ratio"})


def _no_address(data: Mapping[str, Any]) -> str | None:
    """Why no request could be attributed with the addresses guardd would derive, or None."""
    from guardd.upstream_addresses import color_addresses  # noqa: PLC0415 - host checks only

    switch, upstreams = data.get("switch"), data.get("upstreams")
    if switch is None or upstreams is None:
        return None  # their own problems are shown
    found, problems = color_addresses(
        given=None,
        targets=switch.targets if switch.kind == "nginx" else None,
        probe_urls={c: u.all_urls for c, u in upstreams.items()},
    )
    if any(found.values()):
        return None
    return (
        "no upstream address belongs to one color only"
        + (f" ({'; '.join(problems)})" if problems else "")
        + "; give `addresses`"
    )


def _threshold_problems(rule: RuleConfig) -> Found:
    """A threshold that makes a rule fire always, or never: every statistic is >= 0."""
    if rule.stat == "value":
        return []  # a query's or a gauge's value may be anything, negative included
    if rule.above is not None:
        if rule.above <= 0:
            return [("above", f"{rule.above:g} fires always: every {rule.stat} is >= 0")]
        if rule.stat in _RATIO_STATS and rule.above > 1:
            return [("above", f"{rule.above:g} never fires: {rule.stat} is at most 1")]
    if rule.below is not None and rule.below < 0:
        return [("below", f"{rule.below:g} never fires: every {rule.stat} is >= 0")]
    if rule.below is not None and rule.stat in _RATIO_STATS and rule.below >= 1:
        return [("below", f"{rule.below:g} fires always: {rule.stat} is at most 1")]
    for key in ("above_baseline", "above_standby"):
        factor = getattr(rule, key)
        if factor is not None and factor <= 1:
            return [(key, f"{factor:g} must be above 1: else it fires on no change")]
    return []


class SwitchConfig(_Section):
    """How traffic is moved: an nginx symlink, a state file, or a command."""

    kind: Literal["nginx", "state-file", "command"] = "nginx"
    """How traffic moves: nginx (symlink swap), state-file, or command."""
    timeout: PositiveDuration = 30.0
    """The bound on a whole switch, verification included (at least 1s)."""
    active_link: SharedPath | None = None
    """nginx: the symlink nginx includes, pointing at one of `targets`."""
    targets: dict[Color, SharedPath] | None = None
    """nginx: the upstream file of each color."""
    test_command: list[str] = Field(default_factory=lambda: ["nginx", "-t"])
    """nginx: validates the configuration with the new link (argv, no shell)."""
    reload_command: list[str] | None = None
    """The reload argv (nginx default: `nginx -s reload`; optional for state-file)."""
    path: SharedPath | None = None
    """state-file: the JSON file whose `activeColor` key names the active color."""
    command: list[str] | None = None
    """command: the argv run to switch; `{color}` and `{instance}` are substituted."""
    verify_url: str | None = None
    """The front door: probed all the time, and after a switch until `verify_successes` pass."""
    verify_successes: Annotated[Count, Field(ge=1)] = 3
    """Passing fresh-connection answers in a row that verify a switch."""
    verify_header: str | None = None
    """A header of the front door's answers naming the color that answered (`blue` or
    `green`): a switch verifies, and the front door agrees, only with that color's answers."""

    @field_validator("verify_url")
    @classmethod
    def _verify(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v)

    @field_validator("verify_header")
    @classmethod
    def _verify_header(cls, v: str | None) -> str | None:
        if v is not None and (why := httpfields.name_problem(v)):
            raise ValueError(why)
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        # Below this every switch fails and is undone, and guardd holds instead of rolling
        # back: `nginx -t` and a reload take 14 ms on an idle host with a two-line config
        # (bench/results, "Reference switch"), and seconds with a large one.
        if v < MIN_SWITCH_TIMEOUT_S:
            raise ValueError(
                f"must be at least {MIN_SWITCH_TIMEOUT_S:g}s: a switch runs the test and "
                "reload commands and then verifies; shorter, every switch would fail and "
                "be undone"
            )
        return v

    @field_validator("test_command", "reload_command", "command")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0]):
            raise ValueError('must be a non-empty argv list, e.g. ["nginx", "-s", "reload"]')
        return v

    def _cross_checks(self, invalid: frozenset[str]) -> Found:
        if "kind" in invalid:
            return []
        needs = {
            "nginx": ["active_link", "targets"],
            "state-file": ["path"],
            "command": ["command"],
        }
        found: Found = [
            (key, f'required when kind = "{self.kind}"')
            for key in needs[self.kind]
            if key not in invalid and getattr(self, key) is None
        ]
        if self.kind == "nginx" and self.targets is not None and set(self.targets) != set(COLORS):
            found.append(("targets", "must name a file for both blue and green"))
        header_alone = self.verify_header is not None and self.verify_url is None
        if header_alone and not invalid & {"verify_header", "verify_url"}:
            found.append(("verify_header", "needs verify_url: the front door it reads"))
        return found

    def _host_checks(self, invalid: frozenset[str]) -> Found:
        if "kind" in invalid:
            return []
        found: Found = []

        def executable(key: str, argv: list[str] | None) -> None:
            if key not in invalid and argv and (why := _executable(argv[0])):
                found.append((key, why))

        if self.kind == "nginx":
            executable("test_command", self.test_command)
            executable("reload_command", self.effective_reload_command)
            for color, target in (self.targets or {}).items():
                if "targets" not in invalid and (why := _readable_file(target)):
                    found.append((f"targets.{color}", why))
            if "active_link" not in invalid and self.active_link is not None:
                targets = None if "targets" in invalid else self.targets
                if why := _active_link(self.active_link, targets):
                    found.append(("active_link", why))
                elif (warned := _HOST_WARNINGS.get()) is not None and (
                    why := _link_state(self.active_link, targets)
                ):
                    warned.append(("switch.active_link", why))
        elif self.kind == "state-file":
            executable("reload_command", self.reload_command)
            path = None if "path" in invalid else self.path
            if path is not None and (
                why := _writable_dir(path.parent, "it is replaced there")
                or not_switchable(path, [])
            ):
                found.append(("path", why))
        elif self.command and not _PLACEHOLDER.search(self.command[0]):
            # An executable named by {color} or {instance} is only known at switch time.
            executable("command", self.command)
        return found

    @property
    def effective_reload_command(self) -> list[str] | None:
        """The reload argv: nginx defaults to `nginx -s reload`, others to none."""
        if self.reload_command is not None:
            return self.reload_command
        return ["nginx", "-s", "reload"] if self.kind == "nginx" else None


class QosConfig(_Section):
    """The guard window that holds deploys after a rollback."""

    lock_file: SharedPath | None = None
    """The QoS lock file (default: `$RUNTIME_DIRECTORY/<instance>.qos.lock`)."""
    window: PositiveDuration = 300.0
    """The guard window after a rollback; at least policy.min_samples times probe.interval."""
    max_error_ratio: Ratio = 0.01
    """The active color's 5xx answers over the window must stay at or under this."""
    min_health_ratio: Ratio = 0.99
    """Its passing probes over the window must stay at or above this; else extended."""


class NotifyConfig(_Section):
    """One notification sink."""

    kind: Literal["slack", "slack_api", "discord", "webhook"]
    """slack (incoming webhook, Block Kit), slack_api (a bot token, incidents threaded),
    discord (embeds) or webhook (the journal event as JSON)."""
    name: str | None = None
    """The sink's name in metrics and logs (default: kind-index)."""
    url: SecretStr | None = None
    """The webhook URL (prefer url_env or url_file: secrets stay out of config files)."""
    url_env: str | None = None
    """The environment variable holding the URL."""
    url_file: SettingPath | None = None
    """A file holding the URL, e.g. a systemd credential under /run/credentials."""
    token_env: str | None = None
    """slack_api: the environment variable holding the bot token (xoxb-...)."""
    token_file: SettingPath | None = None
    """slack_api: a file holding the bot token, e.g. a systemd credential."""
    channel: str | None = None
    """slack_api: the channel to post to, an ID (C0123ABC) or a name (#ops)."""
    api_url: str | None = None
    """slack_api: the Web API's base URL (default https://slack.com/api)."""
    events: list[str] | None = None
    """Journal event names or groups (rollback, qos, switch) this sink receives (default:
    rollback, hold, alert, external_switch, qos_extended, qos_released)."""
    timeout: PositiveDuration = 10.0
    """The deadline of one delivery attempt."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: SecretStr | None) -> SecretStr | None:
        # Checked without the host, so `check-config --offline` says it too (the message
        # never repeats the URL: it holds the webhook's token).
        if v is not None:
            _check_http_url(v.get_secret_value())
        return v

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v)

    def _cross_checks(self, invalid: frozenset[str]) -> Found:
        found: Found = [] if "kind" in invalid else self._source_checks(invalid)
        if self.name is not None and not _SAFE_NAME.match(self.name):
            found.append(("name", "may use letters, digits and _.@- only"))
        return found

    def _source_checks(self, invalid: frozenset[str]) -> Found:
        # A webhook kind takes a url; slack_api takes a token and a channel instead.
        webhook_keys: tuple[str, ...] = ("url", "url_env", "url_file")
        api_keys: tuple[str, ...] = ("token_env", "token_file", "channel", "api_url")
        sources, other = webhook_keys, api_keys
        if self.kind == "slack_api":
            sources, other = ("token_env", "token_file"), webhook_keys
        found: Found = [
            (k, f'not a key of kind "{self.kind}"') for k in other if getattr(self, k) is not None
        ]
        given = [k for k in sources if getattr(self, k) is not None]
        if not invalid & set(sources) and len(given) != 1:
            found.append(("", f"set exactly one of {', '.join(sources[:-1])} or {sources[-1]}"))
        if self.kind == "slack_api" and "channel" not in invalid and not self.channel:
            found.append(("channel", "required for kind slack_api"))
        return found


class RetryConfig(_Section):
    """Retries of notifications and switch commands."""

    attempts: Annotated[Count, Field(ge=1, le=100)] = 5
    """Attempts of a notification or switch command before giving up."""
    base_delay: PositiveDuration = 1.0
    """The first backoff; it doubles, with jitter, up to `max_delay`."""
    max_delay: PositiveDuration = 30.0
    """The longest backoff between attempts."""

    def _cross_checks(self, invalid: frozenset[str]) -> Found:
        if not invalid & {"base_delay", "max_delay"} and self.max_delay < self.base_delay:
            return [("max_delay", "must not be shorter than base_delay")]
        return []


class MetricsConfig(_Section):
    """The Prometheus endpoint; an empty `listen` turns it off."""

    listen: str = ""
    """host:port of the Prometheus endpoint (`/metrics`); empty turns it off."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v and not re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$", v):
            raise ValueError('must be host:port, e.g. "127.0.0.1:9105" or "[::1]:9105"')
        if v and int(v.rpartition(":")[2]) > 65535:  # 0: any free port (tests use it)
            raise ValueError("the port must be a number from 0 to 65535")
        return v


class ControlConfig(_Section):
    """The control socket guardctl talks to."""

    socket: SharedPath | None = None
    """The control socket (default: `$RUNTIME_DIRECTORY/<instance>.sock`)."""
    mode: str = "0660"
    """The socket's file mode: who may connect and run read-only commands."""
    group: str | None = None
    """The socket's group."""
    admin_group: str | None = None
    """Members may run mutating commands, besides root and guardd's own uid."""

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if not re.match(r"^0?[0-7]{3}$", v):
            raise ValueError('must be an octal file mode such as "0660"')
        return v

    def _host_checks(self, invalid: frozenset[str]) -> Found:
        return [
            (key, why)
            for key in ("group", "admin_group")
            if key not in invalid and (why := group_problem(getattr(self, key)))
        ]


class StateConfig(_Section):
    """Where the journal, state and outbox live."""

    dir: SharedPath | None = None
    """The journal, state.json and outbox (default: `$STATE_DIRECTORY`)."""
    keep_observations: Annotated[Duration, Field(ge=0)] = 168 * 3600.0
    """How long `observations/` keeps what guardd observed, for replay (whole UTC days
    older than this are deleted); 0 records nothing."""


class FleetConfig(_Section):
    """Several guardd nodes in front of the same colors, one decision through etcd."""

    etcd: list[str] = Field(min_length=1)
    """The etcd members' client URLs (http:// or https://), tried in turn."""
    node: str | None = Field(default=None, min_length=1)
    """This node's name in the fleet (default: the host name)."""
    prefix: str | None = None
    """Where the fleet's keys live in etcd (default: `/guardd/<instance>`)."""
    lease_ttl: PositiveDuration = 5.0
    """The lease of the leader key and of this node's record; a dead leader is replaced
    after at most this long. At least `1s` (etcd grants whole seconds)."""
    size: Annotated[Count, Field(ge=1)] = 2
    """How many nodes the fleet has. Until this many were seen under `prefix` (live
    records or last ones, this node's included), the fleet's QoS lock is UNKNOWN: a
    mistyped `prefix` or an `etcd` of another fleet finds an empty prefix, and a fleet of
    one there would answer "deploys allowed" while the real one is locked. `1`: a fleet
    of one node on purpose."""
    quorum: Literal["leader", "majority"] = "leader"
    """`majority`: a P0/P1 rollback needs most live nodes to see the active color fail."""
    local_fallback: Flag = False
    """With etcd unreachable, decide alone (true) or make no automatic switch (false)."""
    ca_file: SettingPath | None = None
    """CA bundle that signs etcd's certificate."""
    cert_file: SettingPath | None = None
    """Client certificate for etcd (with key_file)."""
    key_file: SettingPath | None = None
    """Client key for etcd."""
    username: str | None = None
    """etcd user (with password_file)."""
    password_file: SettingPath | None = None
    """File holding the etcd user's password; never logged."""

    @field_validator("etcd")
    @classmethod
    def _etcd(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for i, url in enumerate(v, 1):
            try:
                _check_http_url(url)
            except ValueError as e:
                # Which one, by its place: the text may hold a password, never repeated.
                raise ValueError(f"item {i}: {e}") from None
            parts = urlsplit(url)
            if parts.username is not None or parts.password is not None:
                # A password in the URL would reach logs and status; etcd's own are files.
                raise ValueError("credentials in a URL; use username and password_file")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(
                    f"{url}: a member's address is scheme://host:port, without a path "
                    "(guardd adds /v3/...)"
                )
            member = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
            if member in seen:
                raise ValueError(f"{url}: the same member is listed twice")
            seen.add(member)
        return v

    @field_validator("node")
    @classmethod
    def _node(cls, v: str | None) -> str | None:
        # The name is a key under the prefix (nodes/<node>, seen/<node>): one path segment.
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}", v):
            raise ValueError(
                f"{v!r}: letters, digits and ._@- only (at most 63, starting with a letter "
                'or digit), e.g. "lb-a"'
            )
        return v

    @field_validator("lease_ttl")
    @classmethod
    def _lease_ttl(cls, v: float) -> float:
        # etcd grants leases in whole seconds, at least one: a shorter lease would be
        # granted longer than said, and a dead leader replaced later than configured.
        if v < 1.0:
            raise ValueError("at least 1s: etcd grants leases in whole seconds")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or v.endswith("/")):
            raise ValueError('must start with "/" and not end with one, e.g. "/guardd/web"')
        return v

    def _cross_checks(self, invalid: frozenset[str]) -> Found:  # noqa: ARG002 - none read twice
        found: Found = []
        if (self.cert_file is None) != (self.key_file is None):
            found.append(("cert_file", "cert_file and key_file go together"))
        if (self.username is None) != (self.password_file is None):
            found.append(("username", "username and password_file go together"))
        return found

    def _host_checks(self, invalid: frozenset[str]) -> Found:
        found: Found = []
        for key in ("ca_file", "cert_file", "key_file", "password_file"):
            path = getattr(self, key)
            if key not in invalid and path is not None and (why := _readable_file(path)):
                found.append((key, why))
        return found


class GuardConfig(BaseModel):
    """The whole configuration of one guarded service.

    A plain model: `load` validates a file with it when no `GUARDD_<SECTION>__<KEY>`
    variable is set, and with `_with_environment()`'s subclass (pydantic-settings) when
    one is. The config is pydantic-settings' `BaseSettings` config, less what only its
    sources read.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,  # as BaseSettings does: defaults go through the validators
        allow_inf_nan=False,  # as every section
    )

    instance: str | None = None
    """The instance name (default: the config file's stem)."""
    upstreams: dict[Color, UpstreamConfig]
    """The blue and green colors."""
    probe: ProbeConfig = ProbeConfig()
    """How colors are probed."""
    policy: PolicyConfig = PolicyConfig()
    """The severity table and the rollback budget."""
    switch: SwitchConfig
    """How traffic moves."""
    qos: QosConfig = QosConfig()
    """The QoS guard window."""
    notify: list[NotifyConfig] = Field(default_factory=list)
    """Notification sinks."""
    retry: RetryConfig = RetryConfig()
    """Retries of notifications and switch commands."""
    metrics: MetricsConfig = MetricsConfig()
    """The Prometheus endpoint."""
    control: ControlConfig = ControlConfig()
    """The control socket."""
    state: StateConfig = StateConfig()
    """Where state lives."""
    signals: dict[str, SignalConfig] = Field(default_factory=dict)
    """Signals besides the probe, by name."""
    rules: list[RuleConfig] = Field(default_factory=list)
    """The rule table; it follows the built-in rules of `[policy]`."""
    fleet: FleetConfig | None = None
    """Coordination with other guardd nodes through etcd; none: this node decides alone."""

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str | None) -> str | None:
        if v is not None and not _SAFE_NAME.match(v):
            raise ValueError("may use letters, digits and _.@- only (at most 64)")
        return v

    @field_validator("upstreams", mode="wrap")
    @classmethod
    def _both_colors(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Checked on the raw table, so that a missing color shows with every other problem.
        given = value if isinstance(value, Mapping) else {}
        missing = [c for c in COLORS if c not in given]
        found: Found = [("", f"missing {', '.join(missing)}")] if missing else []
        try:
            validated = handler(value)
        except ValidationError as e:
            if not found or not isinstance(value, Mapping):
                raise
            raise _validation_error("upstreams", e.errors(), found) from None
        # One URL probed as both colors: every probe of one is a probe of the other, so a
        # failing color could be neither told apart nor rolled back from.
        shared = (
            not found
            and isinstance(validated, Mapping)
            and set(COLORS) <= set(validated)
            and {same_url(u) for u in validated["blue"].all_urls}
            & {same_url(u) for u in validated["green"].all_urls}
        )
        if shared:  # (not quoted: a URL may hold a password)
            why = "probes a URL that upstreams.blue probes too; each color needs its own"
            found.append(("green", why))
        if found:
            raise _validation_error("upstreams", [], found)
        return validated

    @field_validator("switch", mode="after")
    @classmethod
    def _front_door_is_no_color(cls, switch: SwitchConfig, info: ValidationInfo) -> SwitchConfig:
        # The front door is what users reach (nginx): a color's own URL there would vouch
        # for that color whichever one nginx serves, and never see nginx at all.
        upstreams: dict[Color, UpstreamConfig] | None = info.data.get("upstreams")
        if switch.verify_url is None or not upstreams:
            return switch
        door = same_url(switch.verify_url)
        for color, upstream in upstreams.items():
            if door in {same_url(u) for u in upstream.all_urls}:
                why = (
                    f"is a URL of upstreams.{color}; the front door is the address users "
                    "reach through nginx, which serves whichever color is active"
                )
                raise _validation_error("switch", [], [("verify_url", why)])
        return switch

    @field_validator("switch", mode="after")
    @classmethod
    def _verification_holds_an_answer(
        cls, switch: SwitchConfig, info: ValidationInfo
    ) -> SwitchConfig:
        # Verification has half of switch.timeout (docs/contract.md §5): a budget shorter
        # than one front-door answer may take fails every switch whose first answer is slow.
        probe: ProbeConfig | None = info.data.get("probe")
        if switch.verify_url is None or probe is None:
            return switch
        half = switch.timeout / 2
        if half < probe.timeout:
            why = (
                f"{switch.timeout:g}s leaves verification through verify_url {half:g}s "
                f"(half), less than one answer may take (probe.timeout {probe.timeout:g}s); "
                f"make it at least {2 * probe.timeout:g}s"
            )
            raise _validation_error("switch", [], [("timeout", why)])
        return switch

    @field_validator("switch", mode="after")
    @classmethod
    def _targets_proxy_to_their_own_color(
        cls, switch: SwitchConfig, info: ValidationInfo
    ) -> SwitchConfig:
        # On this host only: an upstream file that proxies to the other color's servers
        # (two files swapped, or one copied over the other) passes every check of its own,
        # and then every switch to that color serves the other one.
        upstreams: dict[Color, UpstreamConfig] | None = info.data.get("upstreams")
        if not _HOST_CHECKS.get() or switch.kind != "nginx" or not switch.targets or not upstreams:
            return switch
        from guardd.upstream_addresses import crossed_targets  # noqa: PLC0415 - host checks only

        crossed = crossed_targets(switch.targets, {c: u.all_urls for c, u in upstreams.items()})
        if crossed:
            raise _validation_error(
                "switch", [], [(f"targets.{c}", why) for c, why in sorted(crossed.items())]
            )
        return switch

    @field_validator("signals", mode="after")
    @classmethod
    def _signal_names(cls, signals: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        found: Found = []
        for name, table in signals.items():
            if name == PROBE or not _RULE_NAME.match(name):
                why = f"may use letters, digits and _.- only; {PROBE!r} is the built-in probe"
                found.append((name, why))
            if _HOST_CHECKS.get() and isinstance(table, AccessLogSignalConfig):
                folder = Path(table.source.partition(":")[2]).parent
                if not folder.is_dir():
                    found.append((f"{name}.source", f"{folder} is not a directory on this host"))
                lacking = _no_address(info.data) if table.addresses is None else None
                if lacking is not None:
                    found.append((f"{name}.addresses", lacking))
        if found:
            raise _validation_error("signals", [], found)
        return signals

    @field_validator("rules", mode="after")
    @classmethod
    def _rules_read_real_signals(
        cls, rules: list[RuleConfig], info: ValidationInfo
    ) -> list[RuleConfig]:
        # A field validator, not a model one: it runs beside the other sections' problems.
        # `signals` and `policy` are validated before `rules`; when one is invalid, what
        # depends on it is not judged (its own problem is shown).
        signals: dict[str, Any] | None = info.data.get("signals")
        policy: PolicyConfig | None = info.data.get("policy")
        found: Found = []
        taken: set[str] = set()
        if policy is not None and policy.builtin_rules:
            taken = {r.name for r in spec_rules(policy.spec())}
        for i, rule in enumerate(rules):
            name = rule.name or f"{rule.signal}.{rule.stat}"
            if policy is not None and name in taken:
                found.append(
                    (f"{i}.name", f"{name!r} is taken by another rule"
                     + (" (built in: set policy.builtin_rules = false to replace the built-in "
                        "rules)" if name in BUILTIN_NAMES else "; give this one a `name`"))
                )  # fmt: skip
            taken.add(name)
            if signals is None:
                continue
            kind = PROBE if rule.signal == PROBE else None
            if rule.signal in signals:
                kind = signals[rule.signal].kind
            if kind is None:
                names = [PROBE, *sorted(signals)]
                near = _close_match(rule.signal, names)
                hint = f"did you mean {near}?" if near else f"known: {', '.join(names)}"
                found.append((f"{i}.signal", f"no signal {rule.signal!r}; {hint}"))
                continue
            stats = KIND_STATS[kind]
            if rule.stat not in stats:
                found.append((f"{i}.stat", f"{kind} signals yield {', '.join(sorted(stats))}"))
            if kind == "prometheus" and (rule.min_samples or 0) > 1:
                why = "a prometheus signal gives one sample (its query's value) at most"
                found.append((f"{i}.min_samples", why))
            if kind == PROBE and (rule.min_samples or 0) > MAX_SAMPLES:
                why = f"a probe window keeps {MAX_SAMPLES} probes: the rule could never conclude"
                found.append((f"{i}.min_samples", why))
        if found:
            raise _validation_error("rules", [], found)
        return rules

    def policy_spec(self) -> PolicySpec:
        """The policy the core evaluates: `[policy]`, the compiled `[[rules]]`, and each
        signal's `stale_after`."""
        rules = tuple(self._compile(r) for r in self.rules)
        stale = {n: s.stale_after for n, s in self.signals.items() if s.stale_after is not None}
        return dataclasses.replace(self.policy.spec(), rules=rules, stale_after=stale)

    def _compile(self, r: RuleConfig) -> Rule:
        op, threshold = next((k, v) for k in OPS if (v := getattr(r, k)) is not None)
        for_s = r.for_
        if for_s is None and r.severity == "P1":
            for_s = self.policy.p1_sustain
        return Rule(
            name=r.name or f"{r.signal}.{r.stat}",
            signal=r.signal,
            stat=r.stat,
            severity=r.severity,
            op=op,
            threshold=threshold,
            for_s=for_s,
            min_samples=self._min_samples(r),
            dry_run=r.dry_run,
        )

    def _min_samples(self, r: RuleConfig) -> int:
        if r.min_samples is not None:
            return r.min_samples
        signal = self.signals.get(r.signal)
        if signal is not None and signal.kind == "prometheus":
            return 1  # its value is current or it is not: one sample at most
        return self.policy.min_samples

    @model_validator(mode="after")
    def _windows_hold_min_samples(self) -> GuardConfig:
        # Both windows are judged on at least policy.min_samples probes. A guard window too
        # short to hold them could only ever be extended; a policy window too short leaves
        # every ratio and latency rule inconclusive for good (consecutive_failures alone
        # could act).
        need = self.policy.min_samples * self.probe.interval
        found: Found = [
            (
                key,
                (
                    f"{span:g}s holds at most {int(span / self.probe.interval)} probes at "
                    f"probe.interval {self.probe.interval:g}s; policy.min_samples is "
                    f"{self.policy.min_samples}, so it must be at least {need:g}s"
                ),
            )
            for key, span in (
                ("qos.window", self.qos.window),
                ("policy.window", self.policy.window),
            )
            if span < need
        ]
        if found:
            raise _validation_error("GuardConfig", [], found)  # both, when both are short
        return self

    @model_validator(mode="after")
    def _lock_file_is_its_own(self) -> GuardConfig:
        # guardd writes the lock over whatever is at qos.lock_file, and an unlock deletes
        # it: a path that names another file guardd keeps or moves traffic with would lose
        # the journal, or an nginx upstream file, at the first rollback.
        lock = self.qos.lock_file
        if lock is None:
            return self
        # On this host, as the paths resolve (a folder reached through a symlink names the
        # same file); without host checks, as they are written.
        same: Callable[[Path], str] = os.path.realpath if _HOST_CHECKS.get() else os.path.normpath
        others: dict[str, str] = {}
        if self.state.dir is not None:
            for name in ("events.jsonl", "state.json", "fleet.json", "guardd.pid"):
                others[same(self.state.dir / name)] = f"guardd's {name}"
        for color, target in sorted((self.switch.targets or {}).items()):
            others[same(target)] = f"switch.targets.{color}"
        for key in ("active_link", "path"):
            path = getattr(self.switch, key)
            if path is not None:
                # (The link itself, not what it points at: that is a target, above.)
                others[os.path.normpath(path) if key == "active_link" else same(path)] = (
                    f"switch.{key}"
                )
        if self.control.socket is not None:
            others[same(self.control.socket)] = "control.socket"
        other = others.get(same(lock))
        if other is not None:
            raise ValueError(
                f"qos.lock_file: is {other}; guardd writes its lock there and an unlock "
                "removes it: give the lock a file of its own"
            )
        return self


def setting_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Each variable of `environ` that pydantic-settings reads into the config, as set
    (in any case), with the dotted key it sets (`GUARDD_FLEET__ETCD` -> `fleet.etcd`),
    sorted by name."""
    return [
        (name, ".".join(_variable_path(name))) for name in sorted(environ) if _names_a_setting(name)
    ]


def _names_a_setting(name: str) -> bool:
    """Whether pydantic-settings would read environment variable `name` into GuardConfig:
    `GUARDD_<FIELD>` or `GUARDD_<FIELD>__...`, in any case (it is not case-sensitive)."""
    return name.lower().startswith("guardd_") and (
        _variable_path(name)[0] in GuardConfig.model_fields
    )


def _variable_path(name: str) -> list[str]:
    """The keys a `GUARDD_` variable names, in lower case: `GUARDD_FLEET__ETCD` ->
    `["fleet", "etcd"]`."""
    return name.lower().removeprefix("guardd_").split("__")


def _variable(env: Mapping[str, str], key: Sequence[str | int]) -> str | None:
    """The variable of `env` that sets `key` (`("probe", "timeout")`), named as it was set:
    pydantic-settings reads it in any case. None when none does."""
    wanted = "GUARDD_" + "__".join(str(p).upper() for p in key)
    return next((name for name in env if name.upper() == wanted), None)


def _variable_beneath(env: Mapping[str, str], key: Sequence[str | int]) -> str | None:
    """The first variable of `env` (by name) that sets a key under `key`, or None."""
    prefix = "GUARDD_" + "__".join(str(p).upper() for p in key) + "__"
    return min((name for name in env if name.upper().startswith(prefix)), default=None)


def _validator_for(doc: Mapping[str, Any], environ: Mapping[str, str]) -> type[GuardConfig]:
    """GuardConfig itself when pydantic-settings would only hand `doc` on to it, else the
    pydantic-settings subclass that lays the environment over `doc`."""
    # pydantic-settings also matches the document's own top-level keys without regard to
    # case (`[Probe]` is `probe`): any key that is not a field's exact name goes its way,
    # so that such a file reads, and fails, exactly as before.
    if all(key in GuardConfig.model_fields for key in doc) and not any(
        _names_a_setting(name) for name in environ
    ):
        return GuardConfig
    return _with_environment()


@functools.cache
def _with_environment() -> type[GuardConfig]:
    """GuardConfig as a pydantic-settings `BaseSettings`: `GUARDD_<SECTION>__<KEY>` variables
    (JSON for a table or list) override the document's keys, which arrive as init kwargs.

    Imported and built here, not at import: pydantic-settings and what it loads (dotenv,
    every source provider) add about 1 MiB to the daemon's RSS, and a daemon configured by
    its file alone never reads them. `load` comes here at start and at each reload
    (SIGHUP), never while a decision is made.
    """
    from pydantic_settings import BaseSettings, SettingsConfigDict  # noqa: PLC0415

    class _FromEnvironment(GuardConfig, BaseSettings):
        __doc__ = GuardConfig.__doc__
        model_config = SettingsConfigDict(
            env_prefix="GUARDD_",
            env_nested_delimiter="__",
            extra="forbid",
            frozen=True,
            allow_inf_nan=False,
            nested_model_default_partial_update=False,
            use_attribute_docstrings=True,
            title="GuardConfig",  # its validation errors name the config as they always have
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],  # noqa: ARG003 - signature fixed by pydantic-settings
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
            file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            # The TOML document arrives as init kwargs; the environment overrides it.
            return (env_settings, init_settings)

    # And so does its repr.
    _FromEnvironment.__name__ = _FromEnvironment.__qualname__ = "GuardConfig"
    return _FromEnvironment


class Settings:
    """A validated config plus the facts derived from where it was loaded."""

    def __init__(
        self,
        config: GuardConfig,
        *,
        source: Path,
        instance: str,
        warnings: list[ConfigProblem] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.instance = instance
        #: Valid but probably not meant, e.g. `interval = 1000` (16m40s): shown, not fatal.
        self.warnings = warnings or []

    @property
    def state_dir(self) -> Path:
        """`state.dir`, else the systemd or conventional default."""
        return self.config.state.dir or paths.state_dir(self.instance)

    @property
    def control_socket(self) -> Path:
        """`control.socket`, else the default for this instance."""
        return self.config.control.socket or paths.control_socket(self.instance)

    @property
    def lock_file(self) -> Path:
        """`qos.lock_file`, else the default for this instance."""
        return self.config.qos.lock_file or paths.qos_lock_file(self.instance)

    def summary(self) -> str:
        """A one-line description for `check-config` and logs."""
        c = self.config
        ups = " ".join(f"{k}={len(c.upstreams[k].all_urls)}url" for k in COLORS)
        return (
            f"{self.source}: ok: instance={self.instance} {ups} switch={c.switch.kind} "
            f"interval={c.probe.interval:g}s failures={c.policy.consecutive_failures} "
            f"rollback_to={c.policy.rollback_to} notify={len(c.notify)}"
            # A fleet node says which node it is and of how many etcd members (not contacted).
            + (
                f" fleet={c.fleet.node or socket.gethostname()}@{len(c.fleet.etcd)}etcd"
                if c.fleet is not None
                else ""
            )
        )


def load(
    path: Path,
    *,
    instance: str | None = None,
    host_checks: bool = False,
    overrides: Sequence[str] = (),
) -> Settings:
    """Read, merge and validate a config file; raise `ConfigError` listing every problem.

    With `host_checks`, also what only this host can tell: that the commands exist and are
    executable, the nginx targets and active link, the state file's directory, `ca_file`.
    `overrides`: `dotted.key=TOML value` texts (`guardd replay --set`) laid over the file
    before it is validated, so that their problems read as the file's do.
    """
    shown = str(path)
    try:
        # Only a regular file, and a bounded read: a FIFO behind the name would hang
        # check-config and every start, /dev/zero would fill the memory.
        with open_regular(path) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([ConfigProblem(shown, "(file)", f"cannot read: {e.strerror}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [ConfigProblem(shown, "(file)", f"larger than {MAX_CONFIG_BYTES // 1024} KiB")]
        )
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(shown, "(file)", "not UTF-8 text")]) from None
    except tomllib.TOMLDecodeError as e:
        line = re.search(r"at line (\d+)", str(e))
        where = f"line {line.group(1)}" if line else "(file)"
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError([ConfigProblem(shown, where, f"invalid TOML: {reason}")]) from None
    except ValueError:
        # tomllib reads an integer through int(), which refuses more than 4300 digits.
        reason = "invalid TOML: an integer of more than 4300 digits"
        raise ConfigError([ConfigProblem(shown, "(file)", reason)]) from None
    if overrides:
        _override(doc, overrides, shown)
    token = _HOST_CHECKS.set(host_checks)
    host_warnings: list[tuple[str, str]] = []
    warnings_token = _HOST_WARNINGS.set(host_warnings)
    try:
        config = _validator_for(doc, os.environ)(**doc)
    except ValidationError as e:
        raise ConfigError(
            _problems(e, shown, os.environ),
            _bare_numbers(doc, shown, os.environ) + _warned(shown, host_warnings),
        ) from None
    except ValueError as e:
        # pydantic-settings' own error (`SettingsError`): a variable it could not decode
        # for a field that takes a list or a table, before any validation.
        raise ConfigError(_environment_problems(str(e), os.environ)) from None
    finally:
        _HOST_CHECKS.reset(token)
        _HOST_WARNINGS.reset(warnings_token)
    name = instance or config.instance or path.stem
    if not _SAFE_NAME.match(name):
        raise ConfigError(
            [ConfigProblem(shown, "instance", "may use letters, digits and _.@- only (at most 64)")]
        )
    warnings = _bare_numbers(doc, shown, os.environ)
    warned = {w.key for w in warnings}
    warnings += [w for w in _fleet_warnings(config, shown, os.environ) if w.key not in warned]
    warnings += _policy_warnings(config, shown, os.environ)
    warnings += _near_miss_variables(os.environ)
    warnings += _warned(shown, host_warnings)
    return Settings(config, source=path, instance=name, warnings=warnings)


def _warned(shown: str, found: list[tuple[str, str]]) -> list[ConfigProblem]:
    """The host checks' warnings (`_HOST_WARNINGS`) as `file: key: warning: reason` lines."""
    return [ConfigProblem(shown, key, f"warning: {why}") for key, why in found]


#: guardd's own variables that are not settings (`guardd.paths`, the fault points, the demo).
_GUARDD_VARIABLES = frozenset(
    {"GUARDD_CONFIG", "GUARDD_STATE_ROOT", "GUARDD_FAULT_DIR", "GUARDD_DEMO_WEBHOOK_URL"}
)


def _near_miss_variables(env: Mapping[str, str]) -> list[ConfigProblem]:
    """A warning for each `GUARDD_` variable that names no setting but nearly does, and so
    is ignored: one underscore where two belong (`GUARDD_FLEET_NODE`), or a section that is
    misspelt (`GUARDD_FLEETX__NODE`). Other `GUARDD_` variables (guardd's own, a packaging
    script's) are not settings and are left alone."""
    found = []
    fields = list(GuardConfig.model_fields)
    for name in sorted(env):
        lowered = name.lower()
        if (
            not lowered.startswith("guardd_")
            or _names_a_setting(name)
            or name.upper() in _GUARDD_VARIABLES
        ):
            continue
        rest = lowered.removeprefix("guardd_")
        section, double, key = rest.partition("__")
        near: str | None
        if double:
            near = _close_match(section, fields)
        else:
            # One underscore where two belong: the longest section the name begins with.
            near = max((f for f in fields if rest.startswith(f + "_")), key=len, default=None)
            key = rest[len(near) + 1 :] if near is not None else ""
        if near is not None and key:
            meant = f"{near}.{key.replace('__', '.')}"
            found.append(
                ConfigProblem(
                    f"env {name}",
                    meant,
                    "warning: names no setting and is ignored; did you mean "
                    f"GUARDD_{meant.replace('.', '__').upper()}?",
                )
            )
    return found


#: A lease longer than this keeps a dead leader's lead (and its node's record) that long.
_LONG_LEASE_S = 60.0


def _policy_warnings(
    config: GuardConfig, shown: str, env: Mapping[str, str]
) -> list[ConfigProblem]:
    """`policy.max_rollbacks = 0`: valid, and rarely meant: no automatic rollback at all,
    every failure of the active color a hold for an operator."""
    if config.policy.max_rollbacks != 0:
        return []
    set_as = _variable(env, ("policy", "max_rollbacks"))
    return [
        ConfigProblem(
            f"env {set_as}" if set_as is not None else shown,
            "policy.max_rollbacks",
            "warning: 0 allows no automatic rollback: every failure of the active color is a "
            "hold that waits for an operator",
        )
    ]


def _fleet_warnings(config: GuardConfig, shown: str, env: Mapping[str, str]) -> list[ConfigProblem]:
    """Warnings about `[fleet]` that are valid settings but rarely meant: a lease of more
    than a minute (the fleet waits that long for a dead leader's successor), and TLS files
    given while no etcd URL is https:// (they are not used)."""
    fleet = config.fleet
    if fleet is None:
        return []

    def origin(key: str) -> str:
        set_as = _variable(env, ("fleet", key))
        return f"env {set_as}" if set_as is not None else shown

    found = []
    if fleet.lease_ttl > _LONG_LEASE_S:
        found.append(
            ConfigProblem(
                origin("lease_ttl"),
                "fleet.lease_ttl",
                f"warning: a leader that dies keeps the lead for up to "
                f"{format_duration(fleet.lease_ttl)} (a few seconds is usual: 5s)",
            )
        )
    if not any(url.lower().startswith("https://") for url in fleet.etcd):
        found += [
            ConfigProblem(
                origin(key), f"fleet.{key}", "warning: not used: no fleet.etcd URL is https://"
            )
            for key in ("ca_file", "cert_file", "key_file")
            if getattr(fleet, key) is not None
        ]
    return found


def _environment_problems(said: str, env: Mapping[str, str]) -> list[ConfigProblem]:
    """`env NAME: key: reason` for each `GUARDD_` variable of the field pydantic-settings
    could not decode (`said` names it), the ones that are not JSON first among them."""
    m = re.search(r'field "([A-Za-z0-9_]+)"', said)
    field = m.group(1) if m else None
    names = sorted(
        name
        for name in env
        if _names_a_setting(name) and (field is None or _variable_path(name)[0] == field)
    )

    def suspect(name: str) -> bool:
        # A list or a table whose value is not JSON: what pydantic-settings cannot decode.
        kind = _kind_at(_variable_path(name))
        if not (
            typing.get_origin(kind) in (list, dict)
            or (isinstance(kind, type) and issubclass(kind, BaseModel))
        ):
            return False
        try:
            json.loads(env[name])
        except ValueError:
            return True
        return False

    names = [n for n in names if suspect(n)] or names
    reason = (
        "cannot be read: a list or a table set in the environment is written as JSON "
        '(["http://a:2379", "http://b:2379"], {"key": "value"})'
    )
    return [
        ConfigProblem(f"env {name}", ".".join(_variable_path(name)), reason) for name in names
    ] or [ConfigProblem("env", field or "(environment)", reason)]


_OVERRIDE_PART = re.compile(r"^(?:[A-Za-z0-9_-]+|\d+)$")


def _override(doc: dict[str, Any], overrides: Sequence[str], shown: str) -> None:
    """Lay each `dotted.key=TOML value` over `doc`; `rules.0.above` (or `rules[0].above`)
    reaches into a list. Raises `ConfigError` naming the key for one that cannot be set."""
    problems: list[ConfigProblem] = []
    for text in overrides:
        key, eq, raw = text.partition("=")
        key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
        parts = key.split(".")
        if not eq or not key or not all(_OVERRIDE_PART.match(p) for p in parts):
            # Neither the argument nor its key is named as typed: without its `=` the whole
            # argument may be a value, a secret too (`shown_setting` judges it).
            said = shown_setting("", text)
            problems.append(ConfigProblem(shown, "(--set)", f"--set {said!r}: not KEY=VALUE"))
            continue
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except ValueError:  # (TOMLDecodeError, and an integer of over 4300 digits)
            said = shown_setting(key, raw.strip())
            problems.append(
                ConfigProblem(
                    shown, key, f"--set: {said!r} is not a TOML value (quote text: '\"...\"')"
                )
            )
            continue
        where: Any = doc
        for i, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: i + 1])
            if isinstance(where, list):
                if not (part.isdigit() and int(part) < len(where)):
                    problems.append(ConfigProblem(shown, key, f"--set: there is no {prefix}"))
                    break
                where = where[int(part)]
            elif part not in where and parts[i + 1].isdigit():
                # An item of a list the file does not have: nothing to lay a value over.
                problems.append(ConfigProblem(shown, key, f"--set: the file has no {prefix}"))
                break
            else:
                where = where.setdefault(part, {})
            if not isinstance(where, dict | list):
                problems.append(ConfigProblem(shown, key, f"--set: {prefix} is not a table"))
                break
        else:
            last = parts[-1]
            if isinstance(where, list):
                if not (last.isdigit() and int(last) < len(where)):
                    problems.append(ConfigProblem(shown, key, f"--set: there is no {key}"))
                    continue
                where[int(last)] = value
            else:
                where[last] = value
    if problems:
        raise ConfigError(problems)


# Durations a person may write in milliseconds by mistake: a bare number is seconds.
_SHORT_DURATIONS = [
    ("probe", "interval"),
    ("probe", "fast_interval"),
    ("probe", "timeout"),
    ("policy", "p1_latency"),
    ("policy", "p2_latency"),
    ("switch", "timeout"),
    ("retry", "base_delay"),
    ("retry", "max_delay"),
    ("fleet", "lease_ttl"),
]
_BARE_NUMBER_LIMIT = 100


def _bare_numbers(
    doc: Mapping[str, Any], shown: str, env: Mapping[str, str]
) -> list[ConfigProblem]:
    """A warning for each interval, timeout or lease given as a bare number >= 100
    (seconds), a signal's `timeout`, `every` and `stale_after` included."""
    keys: list[tuple[str | int, ...]] = list(_SHORT_DURATIONS)
    notify = doc.get("notify")
    if isinstance(notify, list):
        keys += [("notify", i, "timeout") for i in range(len(notify))]
    signals = doc.get("signals")
    if isinstance(signals, Mapping):
        keys += [
            ("signals", str(name), key)
            for name in signals
            for key in ("timeout", "every", "stale_after")
        ]
    warnings = []
    for key in keys:
        set_as = _variable(env, key)
        value: Any
        if set_as is not None:
            origin, value = f"env {set_as}", env[set_as].strip()
        else:
            origin, value = shown, _lookup(doc, key)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            continue
        if isinstance(value, str) and not _NUMBER.match(value):
            continue
        seconds = float(value)
        # (Not finite, or past a year: the value's own error says it, not this warning.)
        if _BARE_NUMBER_LIMIT <= seconds <= MAX_DURATION_S:
            written = f"{value:g}" if isinstance(value, float) else str(value)
            dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in key).lstrip(".")
            warnings.append(
                ConfigProblem(
                    origin,
                    dotted,
                    f'warning: {written} = {format_duration(seconds)}; did you mean "{written}ms"?',
                )
            )
    return warnings


def _lookup(doc: Any, key: tuple[str | int, ...]) -> Any:
    for part in key:
        if isinstance(part, int):
            doc = doc[part] if isinstance(doc, list) and part < len(doc) else None
        else:
            doc = doc.get(part) if isinstance(doc, Mapping) else None
    return doc


_REASONS = {
    # nan, inf, or a number past a float's range (1e400) from the environment.
    "finite_number": "must be a finite number",
    "extra_forbidden": "unknown key",
    "missing": "required",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    # A discriminated union's item (a signal, a sink) that is no table at all.
    "model_attributes_type": "must be a table",
    "path_type": "must be a path",
}


def _problems(error: ValidationError, shown: str, env: Mapping[str, str]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    seen: set[tuple[str, str]] = set()
    for err in error.errors():
        loc = [part for part in err["loc"] if not _is_union_branch(part)]
        if len(loc) > 2 and loc[0] == "signals" and loc[2] in _SIGNAL_KINDS:
            del loc[2]  # pydantic names the kind it validated as: not a key of the file
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("kind")
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        key = key or "(top level)"
        reason = _reason(err)
        if err["type"] == "extra_forbidden" and (near := _nearest_key(loc)):
            reason += f"; did you mean {near}?"
        # A model validator names the key it is about as "key: reason"; fold it into the path.
        path: list[str | int] = list(loc)
        if err["type"] == "value_error" and (m := re.match(r"^([a-z0-9_.]+): (.*)$", reason)):
            key = f"{key}.{m.group(1)}" if key != "(top level)" else m.group(1)
            reason = m.group(2)
            path += m.group(1).split(".")
        # The variable that set the key, or a table it is in (GUARDD_PROBE__HEADERS sets
        # every header): the longest such prefix of the key's path.
        set_as = next(
            (v for n in range(len(path), 0, -1) if (v := _variable(env, path[:n])) is not None),
            None,
        )
        # Variables beneath the key (GUARDD_NOTIFY__0__URL) made it a table of their own:
        # the environment sets a list, and a list's item, whole, as JSON.
        if (
            set_as is None
            and (set_as := _variable_beneath(env, path))
            and err["type"] == ("list_type")
        ):
            whole = "GUARDD_" + "__".join(str(p).upper() for p in path)
            reason += f" (the environment sets a list whole, as JSON: {whole}='[...]')"
        if set_as is not None and (broken := _broken_json(env.get(set_as))) is not None:
            # A table or a list whose JSON does not parse: said as such, once, rather than
            # as whatever type the text was then tried as (`must be a table`).
            reason = f"cannot be read: {broken}"
        origin = f"env {set_as}" if set_as is not None else shown
        if set_as is None:
            reason += _set_elsewhere(reason, env)
        if (key, reason) not in seen:
            seen.add((key, reason))
            problems.append(ConfigProblem(origin, key, reason))
    return _one_per_union(problems)


def _set_elsewhere(reason: str, env: Mapping[str, str]) -> str:
    """` (probe.interval is set by env GUARDD_PROBE__INTERVAL)` for each key a file's problem
    names (a rule across keys) that a variable set: the file holds only half of it, and
    the fix may be in the environment. "" when none is."""
    named = sorted({m.group(0) for m in _DOTTED_KEY.finditer(reason)})
    said = [
        f"{key} is set by env {var}"
        for key in named
        if (var := _variable(env, key.split("."))) is not None
    ]
    return f" ({'; '.join(said)})" if said else ""


# A setting named in a reason: `probe.interval`, `qos.window` (a section and a key).
_DOTTED_KEY = re.compile(r"\b[a-z]+\.[a-z_]+\b")


def _one_per_union(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """A key that is a word or a list (`expect_status = "2xx"` or `[200, 204]`) fails both
    ways at once: one line for it, not two that contradict each other. A list whose item
    is wrong needs only the item's line; a value that is neither, one line for both."""

    def word(p: ConfigProblem) -> bool:
        return p.reason.startswith("must be one of ")

    def alongside(p: ConfigProblem, test: Callable[[ConfigProblem], bool]) -> bool:
        return any(q.key == p.key and test(q) for q in problems)

    out: list[ConfigProblem] = []
    for p in problems:
        if word(p) and any(q.key.startswith((f"{p.key}[", f"{p.key}.")) for q in problems):
            continue  # the list branch names its bad item
        if word(p) and alongside(p, lambda q: q.reason == "must be a list"):
            out.append(ConfigProblem(p.file, p.key, f"{p.reason}, or a list"))
        elif not (p.reason == "must be a list" and alongside(p, word)):
            out.append(p)
    return out


def _broken_json(value: str | None) -> str | None:
    """Why `value`, written as a JSON table or list (`{...`, `[...`), does not parse; None
    when it parses or is no such text."""
    if value is None or not value.lstrip().startswith(("{", "[")):
        return None
    try:
        json.loads(value)
    except ValueError as e:
        return f"invalid JSON: {e}"
    return None


def _nearest_key(loc: list[int | str]) -> str | None:
    """The known key of the table at `loc[:-1]` closest to the unknown `loc[-1]`."""
    kind = _kind_at(loc[:-1])
    if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
        return None
    # A key is written as its alias where it has one (`for`, a keyword in Python: `for_`).
    known = [field.alias or name for name, field in kind.model_fields.items()]
    return _close_match(str(loc[-1]), known)


def _kind_at(loc: Sequence[int | str]) -> Any:
    """The type of the key at `loc` (unwrapped: `_unwrap`), None when there is no such key."""
    kind: Any = GuardConfig
    for part in loc:
        kind = _unwrap(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            field = kind.model_fields.get(str(part))
            if field is None:
                return None
            kind = field.annotation
        elif typing.get_origin(kind) in (list, dict):
            kind = typing.get_args(kind)[-1]  # an index or a color: the item's type
        else:
            return None
    return _unwrap(kind)


def _close_match(word: str, known: Sequence[str]) -> str | None:
    """The known word closest to a misspelt `word`, if any is close enough."""
    # Loaded only for an invalid file: a valid one never pays difflib's import.
    import difflib  # noqa: PLC0415

    near = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return near[0] if near else None


def _unwrap(kind: Any) -> Any:
    """The table or list type inside Optional/Annotated/unions, else `kind` itself."""
    origin = typing.get_origin(kind)
    if origin is Annotated:
        return _unwrap(typing.get_args(kind)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(kind):
            inner = _unwrap(arg)
            if typing.get_origin(inner) in (list, dict) or (
                isinstance(inner, type) and issubclass(inner, BaseModel)
            ):
                return inner
    return kind


def _is_union_branch(part: int | str) -> bool:
    # pydantic names the branch of a union it tried (e.g. "list[int]", "literal['2xx']").
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _reason(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx and kind.startswith(("greater", "less")):
            return f"must be {op} {ctx[bound]}"
    if kind == "union_tag_invalid":
        return f"must be one of {ctx.get('expected_tags', '')}"
    if kind == "union_tag_not_found":
        return f"missing: one of {', '.join(repr(k) for k in _SIGNAL_KINDS)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "guardd_check":
        return str(ctx["reason"])
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return f"must hold at least {least} item{'s' if least != 1 else ''}"
    if kind == "string_too_short":
        return "must not be empty"
    msg = str(err["msg"])
    return _REASONS.get(kind, msg[:1].lower() + msg[1:])
