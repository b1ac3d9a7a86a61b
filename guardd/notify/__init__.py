"""Notifications to Slack, Discord and webhooks: durable, retried, never in a decision's way."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from guardd.core.types import JOURNAL_EVENTS
from guardd.exceptions import ConfigError, ConfigProblem
from guardd.notify._delivery import (
    DEFAULT_EVENTS,
    EVENT_GROUPS,
    MAX_PENDING,
    Notifier,
    RetrySettings,
    Sink,
    SinkKind,
    check_http_url,
    expand_events,
    resolve_url,
)
from guardd.notify.discord import discord_message
from guardd.notify.slack import slack_message
from guardd.notify.slack_api import DEFAULT_API_URL, check_channel, method_url, resolve_token
from guardd.notify.webhook import webhook_body, webhook_headers
from guardd.secrets import Secret

if TYPE_CHECKING:
    from guardd.config import NotifyConfig, Settings
    from guardd.metrics import GuardMetrics

__all__ = [
    "DEFAULT_EVENTS",
    "EVENT_GROUPS",
    "JOURNAL_EVENTS",
    "MAX_PENDING",
    "Notifier",
    "RetrySettings",
    "Sink",
    "SinkKind",
    "build_notifier",
    "discord_message",
    "expand_events",
    "resolve_url",
    "sink_problems",
    "sinks_from_config",
    "slack_message",
    "webhook_body",
    "webhook_headers",
]


def sink_problems(notify: Sequence[NotifyConfig], *, source: str) -> list[ConfigProblem]:
    """What the `[[notify]]` tables get wrong on their own, with no look at this host
    (`check-config --offline` says it too): `events` naming an unknown event, or none at
    all (a sink sent nothing), and a sink name used twice, given or `kind-index`."""
    problems: list[ConfigProblem] = []
    names: set[str] = set()
    for index, n in enumerate(notify):
        where = f"notify[{index}]"
        if n.events is not None and not n.events:
            problems.append(
                ConfigProblem(
                    source,
                    f"{where}.events",
                    "names no event: the sink would be sent nothing (leave events out for "
                    "the default ones)",
                )
            )
        elif n.events is not None:
            try:
                expand_events(n.events)
            except ValueError as e:
                problems.append(ConfigProblem(source, f"{where}.events", str(e)))
        name = _name(n, index)
        if name in names:
            problems.append(ConfigProblem(source, f"{where}.name", f"{name!r} is used twice"))
        names.add(name)
    return problems


def _name(n: NotifyConfig, index: int) -> str:
    return n.name or f"{n.kind}-{index}"


def sinks_from_config(
    notify: Sequence[NotifyConfig], *, environ: Mapping[str, str], source: str
) -> list[Sink]:
    """The sinks of the `[[notify]]` tables; raise `ConfigError` naming every bad key
    (`sink_problems`' and those of this host: a `url_env` unset, a `url_file` unreadable).

    A sink is named by its `name`, else by its kind and position (`slack-0`).
    """
    sinks: list[Sink] = []
    problems = sink_problems(notify, source=source)
    for index, n in enumerate(notify):
        name = _name(n, index)
        where = f"notify[{index}]"
        try:
            events = DEFAULT_EVENTS if n.events is None else expand_events(n.events)
        except ValueError:
            continue  # (said by sink_problems)
        if n.kind == "slack_api":
            api_sink = _slack_api_sink(
                n, name, events=events, environ=environ, source=source, where=where
            )
            if isinstance(api_sink, ConfigProblem):
                problems.append(api_sink)
                continue
            sinks.append(api_sink)
            continue
        url_key = "url" if n.url is not None else "url_env" if n.url_env is not None else "url_file"
        try:
            url = resolve_url(
                url=None if n.url is None else n.url.get_secret_value(),
                url_env=n.url_env,
                url_file=n.url_file,
                environ=environ,
            )
        except ValueError as e:
            problems.append(ConfigProblem(source, f"{where}.{url_key}", str(e)))
            continue
        sinks.append(Sink(name=name, kind=n.kind, url=url, events=events, timeout=n.timeout))
    if problems:
        # In the file's order, this host's problems among the file's own.
        order = {f"notify[{i}]": i for i in range(len(notify))}
        raise ConfigError(sorted(problems, key=lambda p: order.get(p.key.split(".")[0], 0)))
    return sinks


def _slack_api_sink(
    n: NotifyConfig,
    name: str,
    *,
    events: frozenset[str],
    environ: Mapping[str, str],
    source: str,
    where: str,
) -> Sink | ConfigProblem:
    """The `slack_api` sink of one `[[notify]]` table, or the problem with it."""
    token_key = "token_env" if n.token_env is not None else "token_file"
    try:
        token = resolve_token(token_env=n.token_env, token_file=n.token_file, environ=environ)
    except ValueError as e:
        return ConfigProblem(source, f"{where}.{token_key}", str(e))
    try:
        channel = check_channel(n.channel or "")
    except ValueError as e:
        return ConfigProblem(source, f"{where}.channel", str(e))
    api_url = n.api_url or DEFAULT_API_URL
    try:
        check_http_url(api_url, "api_url")
    except ValueError as e:
        return ConfigProblem(source, f"{where}.api_url", str(e))
    # Not a secret, but a Sink's url is one; the token travels in a header instead.
    url = Secret(method_url(api_url))
    return Sink(
        name=name,
        kind="slack_api",
        url=url,
        events=events,
        timeout=n.timeout,
        token=token,
        channel=channel,
    )


def build_notifier(
    settings: Settings, retry: RetrySettings, metrics: GuardMetrics, log: Any
) -> Notifier:
    """The daemon's notifier: sinks from the config, the outbox in the state dir, metrics wired."""
    sinks = sinks_from_config(
        settings.config.notify, environ=os.environ, source=str(settings.source)
    )
    metrics.declare_sinks(s.name for s in sinks)
    return Notifier(
        instance=settings.instance,
        sinks=sinks,
        retry=retry,
        outbox_dir=settings.state_dir / "outbox",
        on_outcome=metrics.notification,
        on_storage_error=metrics.storage_error,
        logger=log,
    )
