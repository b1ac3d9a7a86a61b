"""Slack Block Kit, Discord embeds and webhook bodies, checked by validators of their limits."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardd.notify import JOURNAL_EVENTS, discord_message, slack_message, webhook_body
from guardd.notify import discord as discord_mod
from guardd.notify.webhook import ELLIPSIS, truncate

# -- validators: what Slack's and Discord's APIs accept, written from their documentation ---

SLACK_TEXT_TYPES = {"plain_text", "mrkdwn"}
# The one `<...>` form guardd emits on purpose: Slack's date formatting.
SLACK_DATE = re.compile(r"<!date\^\d+\^\{date_short_pretty\} \{time_secs\}\|[^<>|]*>")
SLACK_ENTITY = re.compile(r"&(amp|lt|gt);")


def units(text: str) -> int:
    """UTF-16 code units: the stricter of the counts receivers use."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def check_text(obj: Mapping[str, Any], limit: int, *, types: set[str] = SLACK_TEXT_TYPES) -> str:
    assert set(obj) <= {"type", "text", "emoji", "verbatim"}, obj
    assert obj["type"] in types, obj
    text = obj["text"]
    assert isinstance(text, str)
    assert 1 <= units(text) <= limit, (units(text), limit)
    if obj["type"] == "mrkdwn":
        check_mrkdwn(text)
    return text


def check_mrkdwn(text: str) -> None:
    """No raw `<`, `>` or `&` from event text: no pings, links or broken entities."""
    bare = SLACK_DATE.sub("", text)
    assert "<" not in bare, text
    assert ">" not in bare, text
    assert "&" not in SLACK_ENTITY.sub("", bare), text


def validate_slack(message: Mapping[str, Any]) -> None:
    """Raise AssertionError unless `message` is a Block Kit incoming-webhook payload in limits."""
    assert set(message) == {"text", "blocks"}
    assert isinstance(message["text"], str)
    assert 1 <= units(message["text"]) <= 3000
    check_mrkdwn(message["text"])
    blocks = message["blocks"]
    assert 1 <= len(blocks) <= 50
    assert blocks[0]["type"] == "header"
    for block in blocks:
        kind = block["type"]
        if kind == "header":
            assert set(block) == {"type", "text"}
            check_text(block["text"], 150, types={"plain_text"})
        elif kind == "section":
            assert set(block) <= {"type", "text", "fields", "block_id"}
            assert "text" in block or "fields" in block
            if "text" in block:
                check_text(block["text"], 3000)
            if "fields" in block:
                assert 1 <= len(block["fields"]) <= 10
                for item in block["fields"]:
                    check_text(item, 2000)
        elif kind == "context":
            assert set(block) == {"type", "elements"}
            assert 1 <= len(block["elements"]) <= 10
            for element in block["elements"]:
                check_text(element, 3000)
        else:
            raise AssertionError(f"unexpected block type {kind!r}")
    json.dumps(message, allow_nan=False)


def validate_discord(message: Mapping[str, Any]) -> None:
    """Raise AssertionError unless `message` is a Discord webhook payload within embed limits."""
    assert set(message) == {"content", "embeds", "allowed_mentions"}
    assert message["allowed_mentions"] == {"parse": []}
    assert 1 <= units(message["content"]) <= 2000
    assert 1 <= len(message["embeds"]) <= 10
    total = 0
    for embed in message["embeds"]:
        assert set(embed) <= {"title", "description", "color", "fields", "timestamp", "footer"}
        assert 1 <= units(embed["title"]) <= 256
        assert 1 <= units(embed["description"]) <= 4096
        assert isinstance(embed["color"], int)
        assert 0 <= embed["color"] <= 0xFFFFFF
        assert len(embed["fields"]) <= 25
        for item in embed["fields"]:
            assert set(item) == {"name", "value", "inline"}
            assert 1 <= units(item["name"]) <= 256
            assert 1 <= units(item["value"]) <= 1024
            assert isinstance(item["inline"], bool)
            total += units(item["name"]) + units(item["value"])
        assert 1 <= units(embed["footer"]["text"]) <= 2048
        if "timestamp" in embed:
            datetime.fromisoformat(embed["timestamp"])
        total += units(embed["title"]) + units(embed["description"])
        total += units(embed["footer"]["text"])
    assert total <= 6000, total
    json.dumps(message, allow_nan=False)


# -- events, ordinary and hostile --------------------------------------------------------------


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": "2024-05-01T12:00:00Z",
        "event": "rollback_completed",
        "guard": "threader",
        "from": "green",
        "to": "blue",
        "reason": "p0: 5xx ratio 0.80 >= 0.50 over 12 samples",
        "severity": "P0",
        "by": "guardd",
        "id": "ev-1",
        "evidence": {
            "rule": "p0_error_ratio",
            "threshold": 0.5,
            "value": 0.8,
            "samples": 12,
            "error_ratio": 0.8,
            "p50_ms": 3.1,
            "p95_ms": 712.25,
        },
    }
    return base | fields


HOSTILE_TEXT = [
    "x" * 10_000,
    "<!channel> <!here> <@U123> @everyone @here <https://evil.example|click> &amp; & < >",
    "*bold* _it_ ~strike~ `code` ```block``` > quote # head [a](https://evil.example) ||spoiler||",
    "\\" * 5000,
    "&" * 5000,
    "<" * 5000,
    "🔥" * 5000,  # astral: two UTF-16 units each
    "é\u0301" * 3000 + "مرحبا" * 300 + "\u202e" + "漢字" * 500,
    "line\n" * 3000,
    "nul\x00 bell\x07 esc\x1b del\x7f lone\ud800 surrogate",
    "",
    " ",
]

EVENTS = [
    *(event(event=name) for name in sorted(JOURNAL_EVENTS)),
    *(event(severity=s) for s in ("P0", "P1", "P2", None, "weird", 42)),
    *(event(reason=text) for text in HOSTILE_TEXT),
    *(event(**{"from": text, "to": text}) for text in HOSTILE_TEXT),
    *(event(by=text, severity=text) for text in HOSTILE_TEXT),
    event(evidence={f"k{i}_{'x' * 300}": "v" * 5000 for i in range(100)}),
    event(evidence={"rule": "`" * 500, "value": float("nan"), "samples": None}),
    event(evidence=["not", "a", "dict"]),
    event(evidence={"nested": {"deep": [1, 2, {"x": "<!channel>"}]}, "flag": True}),
    event(ts="not a time"),
    event(ts="2024-05-01T12:00:00"),
    event(id="x" * 5000, ts="`|<>&" * 100),
    event(reason=None, **{"from": None, "to": None}),
    {"event": "hold"},
    {},
]


@pytest.mark.parametrize("ev", EVENTS)
def test_slack_messages_are_valid_block_kit(ev: dict[str, Any]) -> None:
    validate_slack(slack_message(ev, instance="threader"))


@pytest.mark.parametrize("ev", EVENTS)
def test_discord_messages_are_within_embed_limits(ev: dict[str, Any]) -> None:
    validate_discord(discord_message(ev, instance="threader"))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    reason=st.text(max_size=8000),
    names=st.tuples(st.text(max_size=300), st.text(max_size=300)),
    evidence=st.dictionaries(
        st.text(max_size=40),
        st.one_of(st.floats(), st.integers(), st.text(max_size=500), st.none(), st.booleans()),
        max_size=30,
    ),
)
def test_any_text_makes_valid_messages(
    reason: str, names: tuple[str, str], evidence: dict[str, Any]
) -> None:
    ev = event(reason=reason, evidence=evidence, **{"from": names[0], "to": names[1]})
    validate_slack(slack_message(ev, instance="threader"))
    validate_discord(discord_message(ev, instance="threader"))


def test_slack_message_says_what_happened_and_what_to_do() -> None:
    message = slack_message(event(), instance="threader")
    header, facts, evidence, context, act = message["blocks"]
    assert header["text"]["text"] == "guardd threader: rollback green → blue"
    assert [f["text"] for f in facts["fields"]] == [
        "*Severity*\nP0",
        "*From → To*\ngreen → blue",
        "*Reason*\np0: 5xx ratio 0.80 &gt;= 0.50 over 12 samples",
        "*By*\nguardd",
    ]
    assert [f["text"] for f in evidence["fields"]] == [
        "*Rule*\n`p0_error_ratio`",
        "*Threshold*\n0.5",
        "*Value*\n0.8",
        "*Samples*\n12",
        "*Error ratio*\n0.8",
        "*p50*\n3.1 ms",
        "*p95*\n712.2 ms",
    ]
    assert context["elements"][0]["text"].startswith("<!date^1714564800^")
    assert "event `ev-1`" in context["elements"][0]["text"]
    assert "`guardctl --instance threader status`" in act["text"]["text"]
    # Traffic is on the rollback target: what happened is the incident's to tell.
    assert "`guardctl --instance threader incident --last`" in act["text"]["text"]
    assert "rollback`" not in act["text"]["text"]
    assert message["text"].startswith("guardd threader: rollback green → blue: p0")


@pytest.mark.parametrize(
    ("fields", "title", "then"),
    [
        ({"event": "alert", "to": None}, "alert green", "rollback"),
        ({"event": "hold", "to": None}, "hold green", "resume"),
        ({"event": "promote", "from": "blue", "to": "green"}, "promote blue → green", "rollback"),
        ({"event": "qos_released", "from": None, "to": None}, "QoS lock released", None),
        ({"event": "switch", "from": None, "to": "green"}, "switch → green", "rollback"),
    ],
)
def test_each_page_says_its_colors_as_they_are_and_what_to_run_next(
    fields: dict[str, Any], title: str, then: str | None
) -> None:
    """No `→ ?` for an end the event has not; the command worth running next, never
    `rollback` where traffic already is on the rollback target."""
    message = slack_message(event(**fields), instance="threader")
    header = message["blocks"][0]["text"]["text"]
    assert header.startswith(f"guardd threader: {title}") and "?" not in header, header
    act = message["blocks"][-1]["text"]["text"]
    assert act.startswith("*Act:* `guardctl --instance threader status`"), act
    if then is not None:
        assert f"`guardctl --instance threader {then}`" in act, act


def test_slack_qos_events_also_point_at_qos_status() -> None:
    act = slack_message(event(event="qos_extended"), instance="threader")["blocks"][-1]
    assert "`guardctl --instance threader qos status`" in act["text"]["text"]


def test_slack_mentions_and_links_are_neutralised() -> None:
    message = slack_message(
        event(reason="<!channel> <https://evil.example|x> & co"), instance="threader"
    )
    reason = message["blocks"][1]["fields"][2]["text"]
    assert reason == "*Reason*\n&lt;!channel&gt; &lt;https://evil.example|x&gt; &amp; co"


def test_slack_truncation_ends_in_an_ellipsis_and_no_half_entity() -> None:
    message = slack_message(event(reason="a" + "&" * 5000), instance="threader")
    reason = message["blocks"][1]["fields"][2]["text"]
    assert reason.endswith(ELLIPSIS)
    assert reason.removesuffix(ELLIPSIS).endswith("&amp;")


def test_discord_message_says_what_happened() -> None:
    message = discord_message(event(), instance="threader")
    [embed] = message["embeds"]
    assert embed["title"] == "guardd threader: rollback green → blue"
    assert embed["description"] == "p0: 5xx ratio 0.80 \\>= 0.50 over 12 samples"
    assert embed["color"] == discord_mod.RED
    assert embed["timestamp"] == "2024-05-01T12:00:00+00:00"
    assert embed["footer"]["text"] == "guardd threader · event ev-1"
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Severity"] == "P0"
    assert fields["Rule"] == "p0\\_error\\_ratio"
    assert fields["p95"] == "712.2 ms"
    assert "`guardctl --instance threader incident --last`" in fields["Act"]


@pytest.mark.parametrize(
    ("fields", "color"),
    [
        ({"severity": "P0"}, discord_mod.RED),
        ({"severity": "P1"}, discord_mod.ORANGE),
        ({"severity": "P2"}, discord_mod.AMBER),
        ({"severity": None, "event": "qos_released"}, discord_mod.GREEN),
        ({"severity": None, "event": "hold"}, discord_mod.RED),
        ({"severity": None, "event": "paused"}, discord_mod.GREY),
    ],
)
def test_discord_color_by_severity_then_event(fields: dict[str, Any], color: int) -> None:
    assert discord_message(event(**fields), instance="threader")["embeds"][0]["color"] == color


def test_discord_huge_reason_is_cut_with_an_ellipsis() -> None:
    [embed] = discord_message(event(reason="*" * 10_000), instance="threader")["embeds"]
    assert embed["description"].endswith(ELLIPSIS)
    body = embed["description"].removesuffix(ELLIPSIS)
    # Whole escapes only: never a lone backslash that would escape the ellipsis.
    assert body.endswith("\\*")
    assert (len(body) - len(body.rstrip("\\*"))) % 2 == 0


def test_discord_keeps_the_reason_when_evidence_is_huge() -> None:
    ev = event(evidence={f"key{i}": "v" * 1000 for i in range(40)}, reason="the reason")
    message = discord_message(ev, instance="threader")
    validate_discord(message)
    [embed] = message["embeds"]
    assert embed["description"] == "the reason"
    assert embed["fields"][-1]["name"] == "Act"


def test_webhook_body_is_the_event_unchanged() -> None:
    ev = event(extra={"anything": [1, 2]})
    assert webhook_body(ev) == ev
    assert json.loads(json.dumps(webhook_body(ev))) == ev


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("eleven char", 10, "eleven ch…"),
        ("🔥🔥🔥🔥🔥🔥", 5, "🔥🔥…"),  # two units each
    ],
)
def test_truncate(text: str, limit: int, expected: str) -> None:
    assert truncate(text, limit) == expected
    assert units(truncate(text, limit)) <= limit


# -- the validators themselves catch what they are for --------------------------------------


def _broken_slack() -> list[dict[str, Any]]:
    good = slack_message(event(), instance="threader")
    header_too_long = json.loads(json.dumps(good))
    header_too_long["blocks"][0]["text"]["text"] = "h" * 151
    mrkdwn_header = json.loads(json.dumps(good))
    mrkdwn_header["blocks"][0]["text"]["type"] = "mrkdwn"
    too_many_fields = json.loads(json.dumps(good))
    too_many_fields["blocks"][1]["fields"] *= 3
    raw_mention = json.loads(json.dumps(good))
    raw_mention["blocks"][1]["fields"][2]["text"] = "*Reason*\n<!channel>"
    unknown_block = json.loads(json.dumps(good))
    unknown_block["blocks"].append({"type": "carousel"})
    too_many_blocks = json.loads(json.dumps(good))
    too_many_blocks["blocks"] *= 11
    return [
        header_too_long,
        mrkdwn_header,
        too_many_fields,
        raw_mention,
        unknown_block,
        too_many_blocks,
    ]


@pytest.mark.parametrize("message", _broken_slack())
def test_the_slack_validator_rejects_broken_messages(message: dict[str, Any]) -> None:
    with pytest.raises(AssertionError):
        validate_slack(message)


def _broken_discord() -> list[dict[str, Any]]:
    good = discord_message(event(), instance="threader")
    long_title = json.loads(json.dumps(good))
    long_title["embeds"][0]["title"] = "t" * 257
    empty_value = json.loads(json.dumps(good))
    empty_value["embeds"][0]["fields"][0]["value"] = ""
    over_total = json.loads(json.dumps(good))
    over_total["embeds"][0]["description"] = "d" * 4096
    over_total["embeds"][0]["fields"] += [{"name": "n", "value": "v" * 1024, "inline": True}] * 2
    pings = json.loads(json.dumps(good))
    del pings["allowed_mentions"]
    return [long_title, empty_value, over_total, pings]


@pytest.mark.parametrize("message", _broken_discord())
def test_the_discord_validator_rejects_broken_messages(message: dict[str, Any]) -> None:
    with pytest.raises(AssertionError):
        validate_discord(message)
