"""The slack_api sink against a local stand-in for Slack's Web API: threads, outages, restarts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from guardd import config
from guardd.commands import RetryPolicy
from guardd.exceptions import ConfigError
from guardd.notify import Notifier, Sink, sinks_from_config
from guardd.notify.slack_api import method_url, parse_answer, resolve_token
from guardd.secrets import Secret, redact
from tests.harness.receiver import WAIT, Reply, SlackWebApi, serve, slack_ratelimited
from tests.notify.test_delivery import (
    FAST,
    Outcomes,
    journal_event,
    notifier,
    running,
    write_config,
)

pytestmark = pytest.mark.anyio

TOKEN = "xoxb-1111111111-2222222222-guarddTESTtokenABCDEF"  # noqa: S105 - a test's own token
EVERYTHING = frozenset(
    {
        "rollback_completed",
        "rollback_failed",
        "qos_extended",
        "qos_released",
        "paused",
        "resumed",
        "hold",
        "qos_locked",
    }
)


def api_sink(base: str, *, channel: str = "#ops", name: str = "slack", token: str = TOKEN) -> Sink:
    return Sink(
        name=name,
        kind="slack_api",
        url=Secret(method_url(base)),
        events=EVERYTHING,
        token=Secret(token),
        channel=channel,
    )


def base_of(receiver: Any) -> str:
    return f"http://127.0.0.1:{receiver.port}/api"


def queued(tmp_path: Path) -> list[tuple[str, str]]:
    """(sink, event id) of every message waiting in the outbox: not the thread files."""
    files = sorted((tmp_path / "outbox").glob("[0-9]*.json"))
    return [(doc["sink"], doc["id"]) for doc in (json.loads(f.read_bytes()) for f in files)]


def event_id(posted: dict[str, Any]) -> str:
    """The journal event id a posted message names in its context block."""
    found = re.search(r"event `([^`]+)`", json.dumps(posted["blocks"]))
    assert found, posted
    return found[1]


def plant_thread(tmp_path: Path, *, channel: str, ts: str, configured: str) -> Path:
    """Leave the "slack" sink a thread record (its rollback `rb-0`, posted to `channel` at
    `ts` while the sink was configured for `configured`); return the outbox folder."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "thread-slack.json").write_text(
        json.dumps(
            {"channel": channel, "ts": ts, "configured_channel": configured, "event_id": "rb-0"}
        )
    )
    return outbox


def incident(n: int = 1) -> list[dict[str, Any]]:
    """A rollback, its guard window extended, an operator pausing, then the window released."""
    return [
        journal_event("rollback_completed", f"rb-{n}", rollback_id=f"start-{n}"),
        journal_event("qos_extended", f"ext-{n}", until="2024-05-01T12:10:00Z"),
        journal_event("paused", f"pause-{n}", by="uid:1000(ana)", severity=None),
        journal_event("qos_released", f"rel-{n}"),
    ]


async def test_an_incident_s_later_events_are_replies_in_its_thread(tmp_path: Path) -> None:
    slack = SlackWebApi(TOKEN)
    outcomes = Outcomes()
    async with serve(default=slack) as receiver:
        async with running(notifier(tmp_path, [api_sink(base_of(receiver))], outcomes)) as n:
            for event in incident():
                n.submit(event)
            await outcomes.wait_for("slack", "sent", 4)
            # After the release: a message of its own, and the next rollback a new thread.
            n.submit(journal_event("hold", "hold-after", severity="P1"))
            for event in incident(2)[:2]:
                n.submit(event)
            await outcomes.wait_for("slack", "sent", 7)
        requests = receiver.requests
    assert outcomes.of("slack") == ["sent"] * 7
    for request in requests:
        assert request.method == "POST"
        assert request.path == "/api/chat.postMessage"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert request.headers["content-type"] == "application/json; charset=utf-8"
    docs = [r.json() for r in requests]
    first, extended, paused, released, hold, second, extended2 = slack.posted
    assert first["channel"] == "#ops"
    assert "thread_ts" not in first
    assert first["text"] and first["blocks"][0]["type"] == "header"
    for reply in (extended, paused, released):
        assert reply["thread_ts"] == first["ts"]
        # Replies go to the channel ID Slack answered with: thread_ts belongs to it.
        assert reply["channel"] == "C0OPS00001"
    assert "thread_ts" not in hold
    assert "thread_ts" not in second
    assert extended2["thread_ts"] == second["ts"] != first["ts"]
    assert [d.get("thread_ts") for d in docs] == [
        None,
        first["ts"],
        first["ts"],
        first["ts"],
        None,
        None,
        second["ts"],
    ]
    assert not any(queued(tmp_path))


async def test_an_outage_delays_the_replies_without_losing_them(tmp_path: Path) -> None:
    slack = SlackWebApi(TOKEN)
    outcomes = Outcomes()
    retry = RetryPolicy(attempts=8, base_delay=0.05, max_delay=2.0)  # (Retry-After: 1 is obeyed)
    async with serve(default=slack) as receiver:
        sink = api_sink(base_of(receiver))
        async with running(notifier(tmp_path, [sink], outcomes, retry=retry)) as n:
            n.submit(incident()[0])
            await outcomes.wait_for("slack", "sent")
            # Slack has a bad minute: 503s, a rate limit, its own errors, a proxy's page.
            receiver.script.extend(
                [
                    Reply(503, body=b"upstream connect error"),
                    slack_ratelimited(1),
                    Reply(200, {"Content-Type": "application/json"}, b'{"ok":false,'),
                    Reply(200, {}, json.dumps({"ok": False, "error": "internal_error"}).encode()),
                    Reply(200, {}, b"<html>bad gateway</html>"),
                    Reply(
                        200, {}, json.dumps({"ok": False, "error": "service_unavailable"}).encode()
                    ),
                ]
            )
            for event in incident()[1:]:
                n.submit(event)
            await outcomes.wait_for("slack", "sent", 4)
    assert outcomes.of("slack").count("dropped") == 0
    assert outcomes.of("slack").count("retried") == 6
    first, *replies = slack.posted
    assert [r["thread_ts"] for r in replies] == [first["ts"]] * 3
    assert [event_id(r) for r in replies] == ["ext-1", "pause-1", "rel-1"]
    # The rate limit (the third request) was waited out as its Retry-After asked.
    assert receiver.requests[3].at - receiver.requests[2].at >= 0.9


async def test_a_restart_between_the_rollback_and_the_release_still_threads(
    tmp_path: Path,
) -> None:
    slack = SlackWebApi(TOKEN)
    rollback, extended, paused, released = incident()
    # Slow retries: the first run is stopped in the middle of its backoff.
    patient = RetryPolicy(attempts=3, base_delay=30.0, max_delay=30.0)
    async with serve(default=slack) as receiver:
        port = receiver.port
        outcomes = Outcomes()
        async with running(
            notifier(tmp_path, [api_sink(base_of(receiver))], outcomes, retry=patient)
        ) as n:
            n.submit(rollback)
            await outcomes.wait_for("slack", "sent")
    thread_file = tmp_path / "outbox" / "thread-slack.json"
    kept = json.loads(thread_file.read_bytes())
    assert kept["ts"] == slack.posted[0]["ts"]
    assert TOKEN not in thread_file.read_text()

    # Slack is unreachable while guardd runs again and the window is extended.
    outcomes = Outcomes()
    with capture_logs() as logs:
        async with running(
            notifier(tmp_path, [api_sink(f"http://127.0.0.1:{port}/api")], outcomes, retry=patient)
        ) as n:
            n.submit(extended)
            with anyio.fail_after(WAIT):
                # A captured log is a plain list: nothing to wait on but the list itself.
                while not any(e["event"] == "notification_attempt_failed" for e in logs):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
    assert queued(tmp_path) == [("slack", "ext-1")]

    # Slack is back, guardd starts a third time: the reply and the rest still thread.
    outcomes = Outcomes()
    async with (
        serve(default=slack, port=port) as receiver,
        running(notifier(tmp_path, [api_sink(base_of(receiver))], outcomes, retry=FAST)) as n,
    ):
        n.submit(paused)
        n.submit(released)
        await outcomes.wait_for("slack", "sent", 3)
    first, *replies = slack.posted
    assert event_id(first) == "rb-1"
    assert [event_id(r) for r in replies] == ["ext-1", "pause-1", "rel-1"]
    assert [r["thread_ts"] for r in replies] == [first["ts"]] * 3
    # The release closed the incident: nothing left to reply to.
    assert not thread_file.exists()
    assert queued(tmp_path) == []


async def test_slack_s_refusals_are_final_and_name_the_error(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve(default=SlackWebApi(TOKEN)) as receiver:
        sinks = [
            api_sink(base_of(receiver), name="wrong-token", token="xoxb-not-the-right-one"),  # noqa: S106
            api_sink(base_of(receiver), name="no-channel", channel="#nowhere"),
        ]
        with capture_logs() as logs:
            async with running(notifier(tmp_path, sinks, outcomes)) as n:
                n.submit(incident()[0])
                await outcomes.wait_for("wrong-token", "dropped")
                await outcomes.wait_for("no-channel", "dropped")
    assert outcomes.of("wrong-token") == ["dropped"]
    assert outcomes.of("no-channel") == ["dropped"]
    reasons = {e["sink"]: e["reason"] for e in logs if e["event"] == "notification_dropped"}
    assert reasons == {
        "wrong-token": "Slack refused it: invalid_auth",
        "no-channel": "Slack refused it: channel_not_found",
    }
    # A refused rollback opens no thread: what follows is a message of its own.
    assert not (tmp_path / "outbox" / "thread-no-channel.json").exists()


async def test_a_thread_of_another_channel_or_a_broken_one_is_not_replied_to(
    tmp_path: Path,
) -> None:
    slack = SlackWebApi(TOKEN)
    # Opened while the sink posted to another channel, before a reload changed it.
    outbox = plant_thread(
        tmp_path, channel="C0OTHER001", ts="1699999999.000001", configured="#elsewhere"
    )
    (outbox / "thread-torn.json").write_bytes(b'{"channel": "C0OPS00001", "ts": ')
    outcomes = Outcomes()
    async with serve(default=slack) as receiver:
        sinks = [api_sink(base_of(receiver)), api_sink(base_of(receiver), name="torn")]
        with capture_logs() as logs:
            async with running(notifier(tmp_path, sinks, outcomes)) as n:
                n.submit(incident()[1])
                await outcomes.wait_for("slack", "sent")
                await outcomes.wait_for("torn", "sent")
    assert [p.get("thread_ts") for p in slack.posted] == [None, None]
    assert any(e["event"] == "outbox_thread_unreadable" and e["sink"] == "torn" for e in logs)


async def test_the_token_is_never_logged_stored_or_quoted(tmp_path: Path) -> None:
    outcomes = Outcomes()
    retry = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1)
    echo = json.dumps({"ok": False, "error": f"bad {TOKEN}"}).encode()
    async with serve(default=Reply(500, body=f"Bearer {TOKEN}".encode())) as hostile:
        hostile.script.extend([Reply(200, {}, echo)])
        with capture_logs() as logs:
            async with running(
                notifier(tmp_path, [api_sink(base_of(hostile))], outcomes, retry=retry)
            ) as n:
                n.submit(incident()[0])
                n.submit(incident()[1])
                await outcomes.wait_for("slack", "dropped", 2)
    text = "\n".join(repr(entry) for entry in logs)
    assert TOKEN not in text
    assert "***" in text
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "outbox").iterdir() if p.is_file())
    assert TOKEN.encode() not in on_disk
    assert TOKEN not in repr(api_sink("http://x"))
    assert redact(f"Authorization: Bearer {TOKEN}") == "Authorization: Bearer ***"


def test_resolve_token_reasons_never_quote_the_token(tmp_path: Path) -> None:
    spaced = "xoxb-has a space-9f8e7d6c5b4a"
    (tmp_path / "token").write_text(spaced + "\n")
    with pytest.raises(ValueError, match="is not a Slack token") as caught:
        resolve_token(token_env=None, token_file=tmp_path / "token", environ={})
    assert spaced not in str(caught.value)
    assert redact(f"got {spaced}") == "got ***"
    (tmp_path / "good").write_text(TOKEN + "\n")
    assert (
        resolve_token(
            token_env=None,
            token_file=Path("good"),
            environ={"CREDENTIALS_DIRECTORY": str(tmp_path)},
        ).reveal()
        == TOKEN
    )
    from_env = resolve_token(token_env="T", token_file=None, environ={"T": TOKEN})  # noqa: S106
    assert from_env.reveal() == TOKEN
    cases: list[tuple[dict[str, Any], str]] = [
        ({"token_env": "UNSET", "token_file": None}, "environment variable UNSET is not set"),
        ({"token_env": "EMPTY", "token_file": None}, "environment variable EMPTY is empty"),
        ({"token_env": None, "token_file": None}, "set exactly one of token_env or token_file"),
        ({"token_env": None, "token_file": tmp_path / "missing"}, "cannot read"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(ValueError, match=reason):
            resolve_token(environ={"EMPTY": " \n"}, **kwargs)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"ok": true, "channel": "C1", "ts": "1503435956.000247"}', ("C1", "1503435956.000247")),
        # Posted, but with nothing to thread on: delivered, no thread.
        (b'{"ok": true}', ("", "")),
        (b'{"ok": true, "channel": "C1", "ts": "<!channel>"}', ("", "")),
    ],
)
def test_parse_answer(body: bytes, expected: tuple[str, str]) -> None:
    assert parse_answer(body) == expected


def test_sinks_from_config_builds_a_slack_api_sink(tmp_path: Path) -> None:
    settings = config.load(
        write_config(
            tmp_path,
            """
[[notify]]
kind = "slack_api"
token_env = "SLACK_BOT_TOKEN"
channel = "#ops"
[[notify]]
kind = "slack_api"
name = "gateway"
token_file = "slack-token"
channel = "C0OPS00001"
api_url = "http://127.0.0.1:8080/api/"
[[notify]]
kind = "slack"
url_env = "SLACK_WEBHOOK_URL"
""",
        )
    )
    (tmp_path / "slack-token").write_text(TOKEN)
    api, gateway, webhook = sinks_from_config(
        settings.config.notify,
        source="threader.toml",
        environ={
            "SLACK_BOT_TOKEN": TOKEN,
            "CREDENTIALS_DIRECTORY": str(tmp_path),
            "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/abcdef0123456789",
        },
    )
    assert (api.name, api.kind, api.channel) == ("slack_api-0", "slack_api", "#ops")
    assert api.url.reveal() == "https://slack.com/api/chat.postMessage"
    assert api.token is not None and api.token.reveal() == TOKEN
    assert gateway.url.reveal() == "http://127.0.0.1:8080/api/chat.postMessage"
    assert (webhook.kind, webhook.token) == ("slack", None)


def test_config_keys_belong_to_their_kind(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
[[notify]]
kind = "slack_api"
token_env = "T"
url_env = "U"
[[notify]]
kind = "slack"
url_env = "U"
channel = "#ops"
token_file = "x"
[[notify]]
kind = "slack_api"
token_env = "T"
token_file = "x"
channel = "#ops"
""",
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    text = str(caught.value)
    assert 'notify[0].url_env: not a key of kind "slack_api"' in text
    assert "notify[0].channel: required for kind slack_api" in text
    assert 'notify[1].token_file: not a key of kind "slack"' in text
    assert 'notify[1].channel: not a key of kind "slack"' in text
    assert "notify[2]: set exactly one of token_env or token_file" in text
    assert "Traceback" not in text


def test_sinks_from_config_reports_a_bad_token_or_channel(tmp_path: Path) -> None:
    settings = config.load(
        write_config(
            tmp_path,
            """
[[notify]]
kind = "slack_api"
token_env = "UNSET_TOKEN"
channel = "#ops"
[[notify]]
kind = "slack_api"
token_env = "SLACK_BOT_TOKEN"
channel = "#ops with spaces"
""",
        )
    )
    with pytest.raises(ConfigError) as caught:
        sinks_from_config(
            settings.config.notify, environ={"SLACK_BOT_TOKEN": TOKEN}, source="threader.toml"
        )
    assert [str(p) for p in caught.value.problems] == [
        "threader.toml: notify[0].token_env: environment variable UNSET_TOKEN is not set",
        "threader.toml: notify[1].channel: must be a channel ID (C0123ABCD) or a name (#ops)",
    ]
    # (An api_url that is not http(s) is the config's own error: testdata/invalid-notify-url.)
    assert TOKEN not in str(caught.value)


async def test_the_notifier_keeps_one_thread_per_sink(tmp_path: Path) -> None:
    slack = SlackWebApi(TOKEN)
    outcomes = Outcomes()
    async with serve(default=slack) as receiver:
        late = api_sink(base_of(receiver), name="late")
        late = Sink(
            name="late",
            kind="slack_api",
            url=late.url,
            events=frozenset({"qos_extended"}),
            token=late.token,
            channel="#ops",
        )
        n: Notifier = notifier(tmp_path, [api_sink(base_of(receiver)), late], outcomes)
        async with running(n):
            n.submit(incident()[0])
            await outcomes.wait_for("slack", "sent")
            n.submit(incident()[1])
            await outcomes.wait_for("slack", "sent", 2)
            await outcomes.wait_for("late", "sent")
    # "late" never saw the rollback, so its extension is no reply.
    threaded = {(event_id(p), p["channel"], p.get("thread_ts")) for p in slack.posted}
    rollback_ts = slack.posted[0]["ts"]
    assert threaded == {
        ("rb-1", "#ops", None),
        ("ext-1", "C0OPS00001", rollback_ts),
        ("ext-1", "#ops", None),
    }


async def test_a_reply_whose_thread_slack_lost_is_posted_on_its_own(tmp_path: Path) -> None:
    slack = SlackWebApi(TOKEN)
    # A thread Slack does not know (the rollback message was deleted, say).
    outbox = plant_thread(tmp_path, channel="C0OPS00001", ts="1600000000.000001", configured="#ops")
    outcomes = Outcomes()
    async with serve(default=slack) as receiver:
        with capture_logs() as logs:
            async with running(notifier(tmp_path, [api_sink(base_of(receiver))], outcomes)) as n:
                n.submit(incident()[1])
                n.submit(incident()[2])
                await outcomes.wait_for("slack", "sent", 2)
        asked = [r.json().get("thread_ts") for r in receiver.requests]
    assert outcomes.of("slack") == ["sent", "sent"]
    assert asked == ["1600000000.000001", None, None]
    assert [event_id(p) for p in slack.posted] == ["ext-1", "pause-1"]
    assert [e["event"] for e in logs if e["event"] == "notification_thread_lost"] == [
        "notification_thread_lost"
    ]
    assert not (outbox / "thread-slack.json").exists()
