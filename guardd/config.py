"""guardd's configuration: a TOML file, overridden by `GUARDD_<SECTION>__<KEY>` variables.

Every model rejects unknown keys, and every problem is reported as
`<file>: <dotted.key>: <reason>` so that an operator can fix it without a traceback.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from guardd import paths
from guardd.exceptions import ConfigError, ConfigProblem

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# Names end up in paths, unit names and argv: a conservative alphabet keeps them inert.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def parse_duration(value: object) -> float:
    """Seconds from `"250ms"`, `"3s"`, `"5m"`, `"1h"` or a plain number of seconds."""
    if isinstance(value, bool):  # pydantic turns a ValueError into the operator's message
        raise ValueError('must be a duration such as "250ms", "3s", "5m" or seconds')  # noqa: TRY004
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    raise ValueError('must be a duration such as "250ms", "3s", "5m" or seconds')


def parse_flag(value: object) -> bool:
    """A TOML boolean, or "true"/"false" from an environment variable; nothing looser."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("must be true or false")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Flag = Annotated[bool, BeforeValidator(parse_flag)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
Ratio = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _check_http_url(url: str) -> str:
    # Schemes are case-insensitive (RFC 3986 §3.1): HTTP:// is http://.
    if not re.match(r"^https?://[^\s/]+", url, re.IGNORECASE):
        raise ValueError("must be an http:// or https:// URL")
    return url


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

    @model_validator(mode="after")
    def _one_source(self) -> UpstreamConfig:
        if (self.url is None) == (self.urls is None):
            raise ValueError("set exactly one of url or urls")
        return self

    @property
    def all_urls(self) -> list[str]:
        """The probed URLs, whichever key gave them."""
        return [self.url] if self.url is not None else list(self.urls or [])


class ProbeConfig(_Section):
    """How every color is probed."""

    interval: PositiveDuration = 1.0
    """The normal cadence of each color's probe round."""
    fast_interval: PositiveDuration | None = None
    """The cadence while the active color is failing, to confirm fast (default: interval)."""
    timeout: PositiveDuration = 2.0
    """The hard deadline of one probe: connect, headers and body."""
    expect_status: Literal["2xx"] | list[Annotated[int, Field(ge=100, le=599)]] = "2xx"
    """`"2xx"`, or a list of accepted status codes."""
    expect_json: dict[str, Any] | None = None
    """Keys that must match in the JSON body (a subset match); unset: the body is not parsed."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Headers sent with every probe; values of token-like names are never logged."""
    max_body_bytes: Annotated[int, Field(ge=0, le=64 * 1024 * 1024)] = 65536
    """The most of a body read, before and after decoding; a longer one fails `expect_json`."""
    follow_redirects: Flag = False
    """Follow redirects; otherwise a redirect is a failure (`http_other`)."""
    verify_tls: Flag = True
    """Verify https certificates."""
    ca_file: Path | None = None
    """A CA bundle to verify https certificates against instead of the system's."""
    keepalive: Flag = False
    """Reuse a kept-alive connection between probes: a color refusing new ones still passes."""

    @model_validator(mode="after")
    def _cadence(self) -> ProbeConfig:
        if self.fast_interval is not None and self.fast_interval > self.interval:
            raise ValueError("fast_interval: must not be longer than interval")
        return self

    @property
    def confirm_interval(self) -> float:
        """The cadence while the active color is failing."""
        return self.fast_interval if self.fast_interval is not None else self.interval


class PolicyConfig(_Section):
    """When a failing active color is rolled back, and when guardd holds instead."""

    rollback_to: Literal["blue", "green", "previous"] = "previous"
    """Where automatic rollbacks go: blue, green, or previous (the standby color)."""
    consecutive_failures: Annotated[int, Field(ge=1)] = 3
    """P0: the active color fails this many probes in a row."""
    window: PositiveDuration = 60.0
    """The sliding window for ratios and latency."""
    min_samples: Annotated[int, Field(ge=1)] = 5
    """Ratio and latency rules need this many samples in the window."""
    p0_error_ratio: Annotated[float, Field(gt=0, le=1)] = 0.50
    """P0: failed-probe ratio of the active color over the window."""
    p1_error_ratio: Annotated[float, Field(gt=0, le=1)] = 0.10
    """P1: failed-probe ratio, once sustained for `p1_sustain`."""
    p1_latency: PositiveDuration = 30.0
    """P1: window p95 latency of the active color, once sustained."""
    p1_sustain: Annotated[Duration, Field(ge=0)] = 120.0
    """How long a P1 condition must hold before guardd rolls back."""
    p2_error_ratio: Annotated[float, Field(gt=0, le=1)] = 0.03
    """P2 (alert only): failed-probe ratio."""
    p2_latency: PositiveDuration = 10.0
    """P2 (alert only): window p95 latency."""
    latency_regression: Annotated[float, Field(ge=0)] = 0.0
    """When > 0, P1 once the active p95 exceeds this many times the standby's p95."""
    promote_successes: Annotated[int, Field(ge=1)] = 5
    """`guardctl promote` needs this many passing probes in a row of the standby."""
    max_rollbacks: Annotated[int, Field(ge=0)] = 3
    """The rollback budget: automatic rollbacks allowed within `budget_window`."""
    budget_window: PositiveDuration = 3600.0
    """The span the rollback budget counts over (from the journal, across restarts)."""
    dry_run: Flag = False
    """Decide, journal and notify, but never switch."""

    @model_validator(mode="after")
    def _ordered(self) -> PolicyConfig:
        if not self.p2_error_ratio <= self.p1_error_ratio <= self.p0_error_ratio:
            raise ValueError(
                "p1_error_ratio: must lie between p2_error_ratio and p0_error_ratio "
                f"(got p2={self.p2_error_ratio}, p1={self.p1_error_ratio}, "
                f"p0={self.p0_error_ratio})"
            )
        if self.p2_latency > self.p1_latency:
            raise ValueError("p2_latency: must not exceed p1_latency")
        return self


class SwitchConfig(_Section):
    """How traffic is moved: an nginx symlink, a state file, or a command."""

    kind: Literal["nginx", "state-file", "command"] = "nginx"
    """How traffic moves: nginx (symlink swap), state-file, or command."""
    timeout: PositiveDuration = 30.0
    """The bound on a whole switch, verification included."""
    active_link: Path | None = None
    """nginx: the symlink nginx includes, pointing at one of `targets`."""
    targets: dict[Color, Path] | None = None
    """nginx: the upstream file of each color."""
    test_command: list[str] = Field(default_factory=lambda: ["nginx", "-t"])
    """nginx: validates the configuration with the new link (argv, no shell)."""
    reload_command: list[str] | None = None
    """The reload argv (nginx default: `nginx -s reload`; optional for state-file)."""
    path: Path | None = None
    """state-file: the JSON file whose `activeColor` key names the active color."""
    command: list[str] | None = None
    """command: the argv run to switch; `{color}` and `{instance}` are substituted."""
    verify_url: str | None = None
    """After a switch, probe through the front door until `verify_successes` pass."""
    verify_successes: Annotated[int, Field(ge=1)] = 3
    """Passing fresh-connection answers in a row that verify a switch."""

    @field_validator("verify_url")
    @classmethod
    def _verify(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v)

    @field_validator("test_command", "reload_command", "command")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0]):
            raise ValueError('must be a non-empty argv list, e.g. ["nginx", "-s", "reload"]')
        return v

    @model_validator(mode="after")
    def _kind_needs(self) -> SwitchConfig:
        if self.kind == "nginx":
            if self.active_link is None:
                raise ValueError('active_link: required when kind = "nginx"')
            if self.targets is None or set(self.targets) != set(COLORS):
                raise ValueError("targets: must name a file for both blue and green")
        elif self.kind == "state-file" and self.path is None:
            raise ValueError('path: required when kind = "state-file"')
        elif self.kind == "command" and self.command is None:
            raise ValueError('command: required when kind = "command"')
        return self

    @property
    def effective_reload_command(self) -> list[str] | None:
        """The reload argv: nginx defaults to `nginx -s reload`, others to none."""
        if self.reload_command is not None:
            return self.reload_command
        return ["nginx", "-s", "reload"] if self.kind == "nginx" else None


class QosConfig(_Section):
    """The guard window that holds deploys after a rollback."""

    lock_file: Path | None = None
    """The QoS lock file (default: `$RUNTIME_DIRECTORY/<instance>.qos.lock`)."""
    window: PositiveDuration = 300.0
    """The guard window after a rollback."""
    max_error_ratio: Ratio = 0.01
    """The active color's 5xx answers over the window must stay at or under this."""
    min_health_ratio: Ratio = 0.99
    """Its passing probes over the window must stay at or above this; else extended."""


class NotifyConfig(_Section):
    """One notification sink."""

    kind: Literal["slack", "discord", "webhook"]
    """slack (Block Kit), discord (embeds) or webhook (the journal event as JSON)."""
    name: str | None = None
    """The sink's name in metrics and logs (default: kind-index)."""
    url: SecretStr | None = None
    """The webhook URL (prefer url_env or url_file: secrets stay out of config files)."""
    url_env: str | None = None
    """The environment variable holding the URL."""
    url_file: Path | None = None
    """A file holding the URL, e.g. a systemd credential under /run/credentials."""
    events: list[str] | None = None
    """Journal event names or groups (rollback, qos, switch) this sink receives."""
    timeout: PositiveDuration = 10.0
    """The deadline of one delivery attempt."""

    @model_validator(mode="after")
    def _one_source(self) -> NotifyConfig:
        given = [k for k in ("url", "url_env", "url_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of url, url_env or url_file")
        if self.name is not None and not _SAFE_NAME.match(self.name):
            raise ValueError("name: may use letters, digits and _.@- only")
        return self


class RetryConfig(_Section):
    """Retries of notifications and switch commands."""

    attempts: Annotated[int, Field(ge=1, le=100)] = 5
    """Attempts of a notification or switch command before giving up."""
    base_delay: PositiveDuration = 1.0
    """The first backoff; it doubles, with jitter, up to `max_delay`."""
    max_delay: PositiveDuration = 30.0
    """The longest backoff between attempts."""

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.max_delay < self.base_delay:
            raise ValueError("max_delay: must not be shorter than base_delay")
        return self


class MetricsConfig(_Section):
    """The Prometheus endpoint; an empty `listen` turns it off."""

    listen: str = ""
    """host:port of the Prometheus endpoint (`/metrics`); empty turns it off."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v and not re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$", v):
            raise ValueError('must be host:port, e.g. "127.0.0.1:9105" or "[::1]:9105"')
        return v


class ControlConfig(_Section):
    """The control socket guardctl talks to."""

    socket: Path | None = None
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


class StateConfig(_Section):
    """Where the journal, state and outbox live."""

    dir: Path | None = None
    """The journal, state.json and outbox (default: `$STATE_DIRECTORY`)."""


class GuardConfig(BaseSettings):
    """The whole configuration of one guarded service."""

    model_config = SettingsConfigDict(
        env_prefix="GUARDD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=False,
        use_attribute_docstrings=True,
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

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str | None) -> str | None:
        if v is not None and not _SAFE_NAME.match(v):
            raise ValueError("may use letters, digits and _.@- only (at most 64)")
        return v

    @model_validator(mode="after")
    def _both_colors(self) -> GuardConfig:
        missing = [c for c in COLORS if c not in self.upstreams]
        if missing:
            raise ValueError(f"upstreams: missing {', '.join(missing)}")
        return self


class Settings:
    """A validated config plus the facts derived from where it was loaded."""

    def __init__(self, config: GuardConfig, *, source: Path, instance: str) -> None:
        self.config = config
        self.source = source
        self.instance = instance

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
        )


def load(path: Path, *, instance: str | None = None) -> Settings:
    """Read, merge and validate a config file; raise `ConfigError` listing every problem."""
    shown = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([ConfigProblem(shown, "(file)", f"cannot read: {e.strerror}")]) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(shown, "(file)", "not UTF-8 text")]) from None
    except tomllib.TOMLDecodeError as e:
        line = re.search(r"at line (\d+)", str(e))
        where = f"line {line.group(1)}" if line else "(file)"
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError([ConfigProblem(shown, where, f"invalid TOML: {reason}")]) from None
    try:
        config = GuardConfig(**doc)
    except ValidationError as e:
        raise ConfigError(_problems(e, shown, os.environ)) from None
    name = instance or config.instance or path.stem
    if not _SAFE_NAME.match(name):
        raise ConfigError(
            [ConfigProblem(shown, "instance", "may use letters, digits and _.@- only (at most 64)")]
        )
    return Settings(config, source=path, instance=name)


_REASONS = {
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
    "path_type": "must be a path",
}


def _problems(error: ValidationError, shown: str, env: Mapping[str, str]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    seen: set[tuple[str, str]] = set()
    for err in error.errors():
        loc = [part for part in err["loc"] if not _is_union_branch(part)]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        key = key or "(top level)"
        reason = _reason(err)
        # A model validator names the key it is about as "key: reason"; fold it into the path.
        if err["type"] == "value_error" and (m := re.match(r"^([a-z0-9_]+): (.*)$", reason)):
            key = f"{key}.{m.group(1)}" if key != "(top level)" else m.group(1)
            reason = m.group(2)
        env_name = "GUARDD_" + "__".join(str(p).upper() for p in loc)
        origin = f"env {env_name}" if loc and env_name in env else shown
        if (key, reason) not in seen:
            seen.add((key, reason))
            problems.append(ConfigProblem(origin, key, reason))
    return problems


def _is_union_branch(part: int | str) -> bool:
    # pydantic names the branch of a union it tried (e.g. "list[int]", "literal['2xx']").
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _reason(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx and kind.startswith(("greater", "less")):
            return f"must be {op} {ctx[bound]}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = str(err["msg"])
    return _REASONS.get(kind, msg[:1].lower() + msg[1:])
