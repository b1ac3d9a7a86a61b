"""Delivery against real receivers on loopback: retries, Retry-After, hung sinks, restarts."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from guardd import config
from guardd.commands import RetryPolicy
from guardd.exceptions import ConfigError
from guardd.metrics import GuardMetrics
from guardd.notify import (
    DEFAULT_EVENTS,
    EVENT_GROUPS,
    JOURNAL_EVENTS,
    Notifier,
    Sink,
    SinkKind,
    build_notifier,
    expand_events,
    resolve_url,
    sinks_from_config,
)
from guardd.notify._delivery import _retry_after
from guardd.secrets import Secret
from tests.harness.receiver import HANG, WAIT, Received, Reply, closed_port, serve

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(attempts=5, base_delay=0.05, max_delay=0.2)
# Pauses of a few seconds allowed: a server's Retry-After is obeyed up to max_delay.
PATIENT = RetryPolicy(attempts=5, base_delay=0.05, max_delay=5.0)


def journal_event(
    name: str = "rollback_completed", event_id: str = "ev-1", **extra: Any
) -> dict[str, Any]:
    """A journal event as guardd writes it (docs/contract.md §4), with its id and evidence."""
    return {
        "ts": "2024-05-01T12:00:00Z",
        "event": name,
        "guard": "threader",
        "from": "green",
        "to": "blue",
        "reason": "p0: 5xx ratio 0.80 >= 0.50",
        "severity": "P0",
        "by": "guardd",
        "id": event_id,
        "evidence": {"rule": "p0_error_ratio", "threshold": 0.5, "value": 0.8, "samples": 12},
        **extra,
    }


def sink(
    url: str,
    *,
    name: str = "hook",
    kind: SinkKind = "webhook",
    events: Iterable[str] = DEFAULT_EVENTS,
    timeout: float = 10.0,
) -> Sink:
    return Sink(name=name, kind=kind, url=Secret(url), events=frozenset(events), timeout=timeout)


class Outcomes:
    """Records `on_outcome` calls and lets a test wait for them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._changed: anyio.Event | None = None

    def __call__(self, sink: str, outcome: str) -> None:
        self.seen.append((sink, outcome))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def of(self, sink: str) -> list[str]:
        return [outcome for s, outcome in self.seen if s == sink]

    async def wait_for(self, sink: str, outcome: str, count: int = 1) -> None:
        with anyio.fail_after(WAIT):
            while self.of(sink).count(outcome) < count:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()


@asynccontextmanager
async def running(notifier: Notifier) -> AsyncIterator[Notifier]:
    """`notifier` running until the block ends, then cancelled the way SIGTERM does."""
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        try:
            yield notifier
        finally:
            tg.cancel_scope.cancel()


def notifier(
    tmp_path: Path,
    sinks: list[Sink],
    outcomes: Outcomes | None = None,
    retry: RetryPolicy = FAST,
    **kwargs: Any,
) -> Notifier:
    return Notifier(
        instance="threader",
        sinks=sinks,
        retry=retry,
        outbox_dir=tmp_path / "outbox",
        on_outcome=outcomes or Outcomes(),
        **kwargs,
    )


def outbox_ids(tmp_path: Path) -> list[tuple[str, str]]:
    """(sink, event id) of every message file left in the outbox, oldest first."""
    files = sorted((tmp_path / "outbox").glob("*.json"))
    return [(doc["sink"], doc["id"]) for doc in (json.loads(f.read_bytes()) for f in files)]


def ids(requests: list[Received]) -> list[str]:
    return [r.headers["idempotency-key"] for r in requests]


async def test_5xx_is_retried_until_delivered_exactly_once(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve([Reply(500), Reply(500), Reply(200)]) as receiver:
        n = notifier(tmp_path, [sink(receiver.url)], outcomes)
        async with running(n):
            n.submit(journal_event())
            await outcomes.wait_for("hook", "sent")
        requests = receiver.requests
    assert len(requests) == 3
    assert ids(requests) == ["ev-1"] * 3
    assert outcomes.of("hook") == ["retried", "retried", "sent"]
    assert n.pending() == 0
    assert outbox_ids(tmp_path) == []


async def test_a_page_goes_ahead_of_an_older_message_being_retried(tmp_path: Path) -> None:
    """A P2 alert the receiver keeps refusing is retried with backoff; the rollback page
    submitted meanwhile goes at once, not after the alert's attempts are spent, and the
    alert goes on after it, from its first attempt (tens of seconds of retries stood
    between a rollback and its page)."""
    slow = RetryPolicy(attempts=10, base_delay=2.0, max_delay=2.0)
    outcomes = Outcomes()
    async with serve(default=Reply(500)) as receiver:
        n = notifier(tmp_path, [sink(receiver.url)], outcomes, retry=slow)
        async with running(n):
            n.submit(journal_event("alert", "al-1"))
            await receiver.wait_for(1)
            receiver.default = Reply(200)
            n.submit(journal_event("rollback_completed", "rb-1"))
            await outcomes.wait_for("hook", "sent", count=2)
        requests = receiver.requests
    assert ids(requests)[:1] == ["al-1"]
    assert ids(requests)[-2:] == ["rb-1", "al-1"], ids(requests)
    assert n.pending() == 0 and outbox_ids(tmp_path) == []


async def test_a_page_keeps_its_place_behind_a_message_that_goes_at_once(tmp_path: Path) -> None:
    """The `external_switch` that explains a `hold` is journaled a few milliseconds before
    it: a healthy receiver gets them in that order, the reason first."""
    outcomes = Outcomes()
    async with serve() as receiver:
        n = notifier(tmp_path, [sink(receiver.url)], outcomes)
        async with running(n):
            n.submit(journal_event("external_switch", "ex-1"))
            n.submit(journal_event("hold", "ho-1"))
            n.submit(journal_event("alert", "al-1"))
            await outcomes.wait_for("hook", "sent", count=3)
        assert ids(receiver.requests) == ["ex-1", "ho-1", "al-1"]
    assert outcomes.of("hook") == ["sent"] * 3


async def test_429_retry_after_seconds_is_honoured(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve([Reply(429, {"Retry-After": "1"}), Reply(200)]) as receiver:
        n = notifier(tmp_path, [sink(receiver.url)], outcomes, retry=PATIENT)
        async with running(n):
            n.submit(journal_event())
            first, second = await receiver.wait_for(2)
            await outcomes.wait_for("hook", "sent")
    # A lower bound, on the receiver's own clock: never sooner than the server asked.
    assert second.at - first.at >= 1.0
    assert outcomes.of("hook") == ["retried", "sent"]


async def test_429_retry_after_http_date_is_honoured(tmp_path: Path) -> None:
    not_before = int(time.time()) + 2
    date = email.utils.formatdate(not_before, usegmt=True)
    async with serve([Reply(429, {"Retry-After": date}), Reply(200)]) as receiver:
        n = notifier(tmp_path, [sink(receiver.url)], retry=PATIENT)
        async with running(n):
            n.submit(journal_event())
            _, second = await receiver.wait_for(2)
    assert second.wall >= not_before


async def test_a_retry_after_longer_than_max_delay_waits_max_delay(tmp_path: Path) -> None:
    """`Retry-After: 3600` obeyed would hold this page, and every one behind it, for an
    hour in silence: it waits `retry.max_delay` (here 0.2 s), then tries again."""
    outcomes = Outcomes()
    async with serve([Reply(429, {"Retry-After": "3600"}), Reply(200)]) as receiver:
        n = notifier(tmp_path, [sink(receiver.url)], outcomes)
        async with running(n):
            n.submit(journal_event())
            await outcomes.wait_for("hook", "sent")
    assert outcomes.of("hook") == ["retried", "sent"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("1", 1.0),
        (" 2 ", 2.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("1.5", 1.5),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: no wait
    ],
)
def test_retry_after_parsing(header: str | None, expected: float | None) -> None:
    assert _retry_after(header) == expected


def test_retry_after_http_date_in_the_future() -> None:
    wait = _retry_after(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert wait is not None
    assert 28 <= wait <= 30


async def test_a_hung_sink_delays_no_one(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve(default=HANG) as hung, serve() as good:
        n = notifier(
            tmp_path,
            [sink(hung.url, name="hung", timeout=60), sink(good.url, name="good")],
            outcomes,
        )
        with anyio.fail_after(WAIT):  # generous; leaving `running` must not wait for "hung"
            async with running(n):
                n.submit(journal_event(event_id="ev-1"))
                await hung.wait_for(1)
                await outcomes.wait_for("good", "sent")
                files_before = sorted(p.name for p in (tmp_path / "outbox").iterdir())
                # submit does no I/O: nothing reaches the disk until the notifier's task runs.
                n.submit(journal_event(event_id="ev-2"))
                n.submit(journal_event(event_id="ev-3"))
                assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == files_before
                assert n.pending() == 1 + 2 * 2
                assert ids(await good.wait_for(3)) == ["ev-1", "ev-2", "ev-3"]
                await outcomes.wait_for("good", "sent", 3)
                assert n.pending() == 3
        assert len(hung.requests) == 1
    assert outcomes.of("hung") == []
    assert outbox_ids(tmp_path) == [("hung", "ev-1"), ("hung", "ev-2"), ("hung", "ev-3")]


async def test_cancelling_run_is_prompt_with_a_hung_request_in_flight(tmp_path: Path) -> None:
    async with serve(default=HANG) as hung:
        n = notifier(tmp_path, [sink(hung.url, timeout=600)])
        with anyio.fail_after(WAIT):  # generous: a failure here means run() ignored the cancel
            async with anyio.create_task_group() as tg:
                await tg.start(n.run)
                n.submit(journal_event())
                await hung.wait_for(1)
                tg.cancel_scope.cancel()
    assert outbox_ids(tmp_path) == [("hook", "ev-1")]


async def test_cancelling_run_during_a_backoff_keeps_the_message(tmp_path: Path) -> None:
    outcomes = Outcomes()
    slow = RetryPolicy(attempts=5, base_delay=600, max_delay=600)
    async with serve(default=Reply(503)) as receiver:
        n = notifier(tmp_path, [sink(receiver.url)], outcomes, retry=slow)
        with anyio.fail_after(WAIT):
            async with running(n):
                n.submit(journal_event())
                await receiver.wait_for(1)
    assert outcomes.of("hook") == []
    assert outbox_ids(tmp_path) == [("hook", "ev-1")]


async def test_an_event_submitted_just_before_the_stop_is_kept(tmp_path: Path) -> None:
    async with serve(default=HANG) as hung:
        n = notifier(tmp_path, [sink(hung.url)])
        async with running(n):
            n.submit(journal_event(event_id="ev-last"))
        # Cancelled before its intake ran, so never sent: run() wrote it on the way out.
        assert hung.requests == []
    assert outbox_ids(tmp_path) == [("hook", "ev-last")]


async def test_a_receiver_that_never_answers_times_out_and_is_retried(tmp_path: Path) -> None:
    outcomes = Outcomes()
    retry = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1)
    async with serve(default=HANG) as hung:
        with capture_logs() as logs:
            async with running(
                notifier(tmp_path, [sink(hung.url, timeout=0.2)], outcomes, retry=retry)
            ) as n:
                n.submit(journal_event())
                await outcomes.wait_for("hook", "dropped")
        assert len(hung.requests) == 2
    assert outcomes.of("hook") == ["retried", "dropped"]
    [dropped] = [e for e in logs if e["event"] == "notification_dropped"]
    assert dropped["reason"] == "gave up after 2 attempts: no answer within 0.2s"


async def test_undelivered_messages_survive_a_restart_and_are_delivered_once(
    tmp_path: Path,
) -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/hooks/a1b2c3d4e5f6a7b8"
    patient = RetryPolicy(attempts=100, base_delay=0.05, max_delay=0.1)
    first = Outcomes()
    async with running(notifier(tmp_path, [sink(url)], first, retry=patient)) as n:
        for i in range(3):
            n.submit(journal_event(event_id=f"ev-{i}"))
        await first.wait_for("hook", "retried")
    assert "sent" not in first.of("hook")
    assert outbox_ids(tmp_path) == [("hook", "ev-0"), ("hook", "ev-1"), ("hook", "ev-2")]

    second = Outcomes()
    async with serve(port=port, path="/hooks/a1b2c3d4e5f6a7b8") as receiver:
        async with running(notifier(tmp_path, [sink(url)], second, retry=patient)) as n:
            assert n.pending() == 3
            await second.wait_for("hook", "sent", 3)
        assert ids(receiver.requests) == ["ev-0", "ev-1", "ev-2"]
        assert receiver.requests[0].json()["event"] == "rollback_completed"
        assert outbox_ids(tmp_path) == []

        third = Outcomes()
        async with running(notifier(tmp_path, [sink(url)], third, retry=patient)) as n:
            assert n.pending() == 0
            # A new event goes through, and only it: nothing old is sent again before it.
            n.submit(journal_event(event_id="ev-new"))
            await third.wait_for("hook", "sent")
        assert ids(receiver.requests) == ["ev-0", "ev-1", "ev-2", "ev-new"]
    assert third.of("hook") == ["sent"]


async def test_given_up_after_attempts_with_an_error_log(tmp_path: Path) -> None:
    outcomes = Outcomes()
    retry = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1)
    async with serve(default=Reply(503, body=b"try later")) as receiver:
        with capture_logs() as logs:
            async with running(
                notifier(tmp_path, [sink(receiver.url)], outcomes, retry=retry)
            ) as n:
                n.submit(journal_event())
                await outcomes.wait_for("hook", "dropped")
        assert len(receiver.requests) == 3
    assert outcomes.of("hook") == ["retried", "retried", "dropped"]
    [dropped] = [e for e in logs if e["event"] == "notification_dropped"]
    assert dropped["log_level"] == "error"
    assert dropped["sink"] == "hook"
    assert dropped["event_id"] == "ev-1"
    assert dropped["reason"] == "gave up after 3 attempts: HTTP 503: try later"
    assert outbox_ids(tmp_path) == []


async def test_a_400_is_final(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve([Reply(400, body=b"invalid_payload")]) as receiver:
        with capture_logs() as logs:
            async with running(notifier(tmp_path, [sink(receiver.url)], outcomes)) as n:
                n.submit(journal_event(event_id="ev-bad"))
                await outcomes.wait_for("hook", "dropped")
                # The sink goes on with the next message; the rejected one is not tried again.
                n.submit(journal_event(event_id="ev-good"))
                await outcomes.wait_for("hook", "sent")
        assert ids(receiver.requests) == ["ev-bad", "ev-good"]
    assert outcomes.of("hook") == ["dropped", "sent"]
    [dropped] = [e for e in logs if e["event"] == "notification_dropped"]
    assert dropped["reason"] == "HTTP 400: invalid_payload"


@pytest.mark.parametrize("ahead", [3601, 86400, "date"], ids=["3601s", "a-day", "a-date-2h-ahead"])
async def test_a_retry_after_past_an_hour_is_waited_max_delay_never_a_drop(
    tmp_path: Path, ahead: int | str
) -> None:
    """However far ahead the receiver asks (a clock an hour off gives such a date), the
    page is not dropped: it waits `retry.max_delay`, as for any longer pause, and goes."""
    value = (
        email.utils.formatdate(time.time() + 2 * 3600, usegmt=True)
        if ahead == "date"
        else str(ahead)
    )
    outcomes = Outcomes()
    async with serve([Reply(429, {"Retry-After": value}), Reply(200)]) as receiver:
        async with running(notifier(tmp_path, [sink(receiver.url)], outcomes)) as n:
            n.submit(journal_event())
            await outcomes.wait_for("hook", "sent")
        assert len(receiver.requests) == 2
    assert outcomes.of("hook") == ["retried", "sent"]


async def test_each_sink_gets_only_the_events_it_wants(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve() as qos_only, serve() as everything:
        wanted = expand_events(["rollback", "qos", "switch", "hold", "alert"])
        n = notifier(
            tmp_path,
            [
                sink(qos_only.url, name="qos", events=["qos_released"]),
                sink(everything.url, name="all", events=wanted),
            ],
            outcomes,
        )
        async with running(n):
            for i, name in enumerate(
                [
                    "rollback_completed",
                    "qos_locked",
                    "alert",
                    "switch",
                    "probe_noise",
                    "started",
                    "qos_released",
                ]
            ):
                n.submit(journal_event(name, event_id=f"ev-{i}"))
            await outcomes.wait_for("all", "sent", 5)
            # Delivered in order per sink: had anything else been queued for "qos", it
            # would have arrived before qos_released.
            [only] = await qos_only.wait_for(1)
        assert only.json()["event"] == "qos_released"
        assert len(qos_only.requests) == 1
        assert [r.json()["event"] for r in everything.requests] == [
            "rollback_completed",
            "qos_locked",
            "alert",
            "switch",
            "qos_released",
        ]


async def test_default_events_skip_rollback_started(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve() as receiver:
        async with running(notifier(tmp_path, [sink(receiver.url)], outcomes)) as n:
            n.submit(journal_event("rollback_started", event_id="ev-0"))
            n.submit(journal_event("rollback_completed", event_id="ev-1"))
            await outcomes.wait_for("hook", "sent")
        assert ids(receiver.requests) == ["ev-1"]


async def test_the_same_event_id_is_delivered_once(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve() as receiver:
        async with running(notifier(tmp_path, [sink(receiver.url)], outcomes)) as n:
            n.submit(journal_event(event_id="ev-1"))
            n.submit(journal_event(event_id="ev-1"))
            await outcomes.wait_for("hook", "sent")
            n.submit(journal_event(event_id="ev-1"))  # again, after it was delivered
            n.submit(journal_event(event_id="ev-2"))
            await outcomes.wait_for("hook", "sent", 2)
        assert ids(receiver.requests) == ["ev-1", "ev-2"]


async def test_each_kind_posts_json_with_its_headers(tmp_path: Path) -> None:
    event = journal_event(event_id="ev-7")
    outcomes = Outcomes()
    async with serve() as slack, serve() as discord, serve() as hook:
        n = notifier(
            tmp_path,
            [
                sink(slack.url, name="s", kind="slack"),
                sink(discord.url, name="d", kind="discord"),
                sink(hook.url, name="w", kind="webhook"),
            ],
            outcomes,
        )
        async with running(n):
            n.submit(event)
            [s] = await slack.wait_for(1)
            [d] = await discord.wait_for(1)
            [w] = await hook.wait_for(1)
    for request in (s, d, w):
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"].startswith("guardd/")
    assert w.json() == event
    assert w.headers["idempotency-key"] == "ev-7"
    assert s.json()["blocks"][0]["text"]["text"] == "guardd threader: rollback green → blue"
    assert d.json()["embeds"][0]["title"] == "guardd threader: rollback green → blue"
    assert d.json()["allowed_mentions"] == {"parse": []}


async def test_no_url_or_token_in_logs_or_outbox(tmp_path: Path) -> None:
    outcomes = Outcomes()
    retry = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1)
    down = f"http://127.0.0.1:{closed_port()}/services/T0/B0/c0ffee0123456789abcdef01"
    async with serve(default=HANG) as hung, serve() as bad, serve() as echo:
        # Hostile receivers that quote the URL, or just its token, back in their answers.
        echo.default = Reply(500, body=echo.url.encode())
        token = bad.url.rsplit("/", 1)[1].encode()
        bad.script.extend([Reply(500, body=b"bad token " + token), Reply(418, body=token)])
        urls = [down, hung.url, bad.url, echo.url]
        sinks = [
            sink(down, name="down"),
            sink(hung.url, name="hung", timeout=0.2),
            sink(bad.url, name="bad"),
            sink(echo.url, name="echo", kind="slack"),
        ]
        with capture_logs() as logs:
            async with running(notifier(tmp_path, sinks, outcomes, retry=retry)) as n:
                n.submit(journal_event())
                for name in ("down", "hung", "bad", "echo"):
                    await outcomes.wait_for(name, "dropped")
                n.submit(journal_event(event_id="ev-2"))
        outbox = b"".join(p.read_bytes() for p in (tmp_path / "outbox").glob("*.json"))
    assert any(e["event"] == "notification_attempt_failed" for e in logs)
    assert any(e["event"] == "stamina.retry_scheduled" for e in logs)
    text = "\n".join(repr(entry) for entry in logs)
    tokens = [url.rsplit("/", 1)[1] for url in urls]
    for secret in urls + tokens:
        assert secret not in text
        assert secret.encode() not in outbox
    assert "***" in text  # the echoed URL was there, and was redacted


async def test_a_broken_outbox_does_not_stop_delivery(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the state dir should be")
    storage_errors: list[str] = []
    outcomes = Outcomes()
    async with serve() as receiver:
        with capture_logs() as logs:
            n = Notifier(
                instance="threader",
                sinks=[sink(receiver.url)],
                retry=FAST,
                outbox_dir=tmp_path / "not-a-dir" / "outbox",
                on_outcome=outcomes,
                on_storage_error=storage_errors.append,
            )
            async with running(n):
                n.submit(journal_event())
                await outcomes.wait_for("hook", "sent")
        assert ids(receiver.requests) == ["ev-1"]
    assert storage_errors
    assert set(storage_errors) == {"outbox"}
    events = {e["event"] for e in logs if e["log_level"] == "error"}
    assert {"outbox_unreadable", "outbox_write_failed"} <= events


async def test_a_corrupt_outbox_file_is_skipped(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    good = {"v": 1, "sink": "hook", "id": "ev-old", "event": journal_event(event_id="ev-old")}
    (outbox / "000000000001.json").write_text('{"v": 1, "sink": "hook", "id": "ev-t')  # torn
    (outbox / "000000000002.json").write_text(json.dumps(good))
    (outbox / "000000000003.json").write_text('["not", "a", "message"]')
    (outbox / "README").write_text("not ours; left alone")
    outcomes = Outcomes()
    async with serve() as receiver:
        with capture_logs() as logs:
            async with running(notifier(tmp_path, [sink(receiver.url)], outcomes)) as n:
                await outcomes.wait_for("hook", "sent")
                n.submit(journal_event(event_id="ev-new"))
                await outcomes.wait_for("hook", "sent", 2)
        assert ids(receiver.requests) == ["ev-old", "ev-new"]
    skipped = [e for e in logs if e["event"] == "outbox_corrupt_message_skipped"]
    assert len(skipped) == 2
    assert all(e["log_level"] == "error" for e in skipped)
    left = sorted(p.name for p in outbox.iterdir())
    assert left == ["000000000001.json.corrupt", "000000000003.json.corrupt", "README"]


async def test_the_outbox_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with serve(default=HANG) as hung:
        with capture_logs() as logs:
            n = notifier(tmp_path, [sink(hung.url, timeout=60)], outcomes, max_pending=2)
            async with running(n):
                n.submit(journal_event(event_id="ev-1"))
                await hung.wait_for(1)  # ev-1 is in flight now and is not the one dropped
                for i in (2, 3, 4):
                    n.submit(journal_event(event_id=f"ev-{i}"))
                await outcomes.wait_for("hook", "dropped", 2)
                assert n.pending() == 2
    assert outbox_ids(tmp_path) == [("hook", "ev-1"), ("hook", "ev-4")]
    dropped = [e["event_id"] for e in logs if e["event"] == "notification_dropped"]
    assert dropped == ["ev-2", "ev-3"]


async def test_submit_before_run_is_bounded_too(tmp_path: Path) -> None:
    outcomes = Outcomes()
    n = notifier(tmp_path, [sink("http://127.0.0.1:9/x")], outcomes, max_pending=2)
    for i in range(5):
        n.submit(journal_event(event_id=f"ev-{i}"))
    assert n.pending() == 2
    assert outcomes.of("hook") == ["dropped"] * 3


async def test_submit_never_raises_on_odd_events(tmp_path: Path) -> None:
    outcomes = Outcomes()
    odd: list[Any] = [
        {},
        {"event": ["unhashable"]},
        {"event": "rollback_completed"},  # no id: one is made
        journal_event(event_id="id with spaces\nand a newline"),
        journal_event(
            event_id="ev-nan",
            evidence={"value": float("nan"), "raw": b"\xff", "set": {1}, "obj": object()},
        ),
        journal_event(event_id="ev-deep", evidence=_deep(50)),
        {"event": "alert", "id": "ev-x", ("tuple", "key"): 1},
    ]
    async with serve() as receiver:
        async with running(notifier(tmp_path, [sink(receiver.url)], outcomes)) as n:
            for event in odd:
                n.submit(event)
            await outcomes.wait_for("hook", "sent", 5)
        bodies = [r.json() for r in receiver.requests]
    assert len(bodies) == 5
    assert bodies[0]["event"] == "rollback_completed"
    assert len(bodies[0]["id"]) == 32
    assert bodies[1]["id"] == "id with spaces\nand a newline"  # the body keeps it as journaled
    assert receiver.requests[1].headers["idempotency-key"].startswith("h-")
    assert bodies[2]["evidence"]["value"] is None
    assert bodies[4]["('tuple', 'key')"] == 1


def _deep(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        doc = {"next": doc}
    return doc


async def test_a_failing_outcome_callback_does_not_stop_delivery(tmp_path: Path) -> None:
    def broken(sink: str, outcome: str) -> None:
        raise RuntimeError("metrics are broken")

    async with serve() as receiver:
        n = Notifier(
            instance="threader",
            sinks=[sink(receiver.url)],
            retry=FAST,
            outbox_dir=tmp_path / "outbox",
            on_outcome=broken,
        )
        async with running(n):
            n.submit(journal_event(event_id="ev-1"))
            n.submit(journal_event(event_id="ev-2"))
            assert ids(await receiver.wait_for(2)) == ["ev-1", "ev-2"]


async def test_run_is_once_per_notifier(tmp_path: Path) -> None:
    async with running(notifier(tmp_path, [sink("http://127.0.0.1:9/x")])) as n:
        with pytest.raises(RuntimeError, match="runs only once"):
            await n.run()


def test_sink_names_must_be_unique(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        notifier(tmp_path, [sink("http://127.0.0.1:9/a"), sink("http://127.0.0.1:9/b")])


# -- expand_events and resolve_url ---------------------------------------------------------


def test_expand_events_groups_and_names() -> None:
    assert expand_events(["rollback"]) == {"rollback_completed", "rollback_failed"}
    assert expand_events(["qos"]) == {"qos_locked", "qos_extended", "qos_released"}
    assert expand_events(["switch"]) == {"switch", "promote", "external_switch"}
    assert expand_events(["hold", "qos_released"]) == {"hold", "qos_released"}
    assert expand_events("alert") == {"alert"}
    assert expand_events([]) == frozenset()
    assert sorted(DEFAULT_EVENTS) == [
        "alert",
        "external_switch",
        "hold",
        "qos_extended",
        "qos_released",
        "rollback_completed",
        "rollback_failed",
    ]


def test_expand_events_names_the_bad_entry() -> None:
    with pytest.raises(ValueError, match="unknown event 'rolback'"):
        expand_events(["hold", "rolback"])


def test_resolve_url_from_each_source(tmp_path: Path) -> None:
    url = "https://hooks.slack.com/services/T0/B0/abcdefabcdef0123"
    (tmp_path / "slack").write_text(f"  {url}\n")
    env = {"SLACK_WEBHOOK_URL": f"{url}\n", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    for secret in (
        resolve_url(url=url, url_env=None, url_file=None, environ={}),
        resolve_url(url=None, url_env="SLACK_WEBHOOK_URL", url_file=None, environ=env),
        resolve_url(url=None, url_env=None, url_file=tmp_path / "slack", environ={}),
        # Relative: looked up where systemd's LoadCredential= puts it.
        resolve_url(url=None, url_env=None, url_file=Path("slack"), environ=env),
    ):
        assert secret.reveal() == url
        assert url not in repr(secret)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({}, "set exactly one of url, url_env or url_file"),
        ({"url": "https://a.example/x", "url_env": "X"}, "set exactly one"),
        ({"url_env": "UNSET_VAR"}, "environment variable UNSET_VAR is not set"),
        ({"url_env": "EMPTY_VAR"}, "environment variable EMPTY_VAR is empty"),
        ({"url": "ftp://files.example/s3cr3t-t0ken"}, "url is not an http:// or https:// URL"),
        ({"url": "https:///s3cr3t-t0ken"}, "url has no valid host"),
        ({"url": "https://a.example:99999/s3cr3t-t0ken"}, "url is not a valid URL"),
        ({"url": "s3cr3t-t0ken"}, "url is not an http:// or https:// URL"),
        ({"url": "https://a.example/s3cr3t t0ken"}, "contains whitespace"),
    ],
)
def test_resolve_url_reasons_never_quote_the_url(kwargs: dict[str, Any], reason: str) -> None:
    args: dict[str, Any] = {
        "url": None,
        "url_env": None,
        "url_file": None,
        "environ": {"EMPTY_VAR": "  "},
    } | kwargs
    with pytest.raises(ValueError, match=reason) as caught:
        resolve_url(**args)
    assert "s3cr3t" not in str(caught.value)


def test_resolve_url_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read .*missing: No such file"):
        resolve_url(url=None, url_env=None, url_file=tmp_path / "missing", environ={})
    (tmp_path / "binary").write_bytes(b"https://a.example/\xff\xfe")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        resolve_url(url=None, url_env=None, url_file=tmp_path / "binary", environ={})


# -- from the configuration to a running notifier ---------------------------------------------


def write_config(tmp_path: Path, notify: str) -> Path:
    path = tmp_path / "threader.toml"
    path.write_text(f"""\
instance = "threader"
[upstreams.blue]
url = "http://127.0.0.1:9009/healthz"
[upstreams.green]
url = "http://127.0.0.1:9010/healthz"
[switch]
kind = "state-file"
path = "{tmp_path / "deploy-state.json"}"
[state]
dir = "{tmp_path / "state"}"
{notify}
""")
    return path


def test_sinks_from_config_names_kinds_and_events(tmp_path: Path) -> None:
    settings = config.load(
        write_config(
            tmp_path,
            """
[[notify]]
kind = "webhook"
url_env = "HOOK_URL"
[[notify]]
kind = "slack"
name = "ops"
url = "https://hooks.slack.com/services/T0/B0/abcdef0123456789"
events = ["qos", "hold"]
timeout = "3s"
""",
        )
    )
    webhook, ops = sinks_from_config(
        settings.config.notify,
        source="threader.toml",
        environ={"HOOK_URL": "http://127.0.0.1:1/hook"},
    )
    assert (webhook.name, webhook.kind, webhook.events) == ("webhook-0", "webhook", DEFAULT_EVENTS)
    assert webhook.url.reveal() == "http://127.0.0.1:1/hook"
    assert (ops.name, ops.kind, ops.timeout) == ("ops", "slack", 3.0)
    assert ops.events == {"qos_locked", "qos_extended", "qos_released", "hold"}


def test_sinks_from_config_reports_every_bad_sink(tmp_path: Path) -> None:
    settings = config.load(
        write_config(
            tmp_path,
            """
[[notify]]
kind = "webhook"
url_env = "UNSET_HOOK_URL"
[[notify]]
kind = "discord"
url = "https://discord.example/api/webhooks/1/t"
events = ["rollbacks"]
[[notify]]
kind = "slack"
name = "dup"
url = "https://hooks.slack.com/services/T0/B0/abcdef0123456789"
[[notify]]
kind = "slack"
name = "dup"
url = "https://hooks.slack.com/services/T0/B0/abcdef0123456789"
""",
        )
    )
    with pytest.raises(ConfigError) as caught:
        sinks_from_config(settings.config.notify, environ={}, source="threader.toml")
    assert [str(p) for p in caught.value.problems] == [
        "threader.toml: notify[0].url_env: environment variable UNSET_HOOK_URL is not set",
        "threader.toml: notify[1].events: unknown event 'rollbacks'; expected one of: "
        + ", ".join([*sorted(EVENT_GROUPS), *sorted(JOURNAL_EVENTS)]),
        "threader.toml: notify[3].name: 'dup' is used twice",
    ]


async def test_build_notifier_counts_in_the_guard_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = GuardMetrics("threader", "0.1.0")

    def sample(outcome: str) -> float | None:
        return metrics.registry.get_sample_value(
            "guardd_notifications_total",
            {"guard": "threader", "sink": "webhook-0", "outcome": outcome},
        )

    async with serve([Reply(503), Reply(200)]) as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        settings = config.load(
            write_config(
                tmp_path,
                """
[[notify]]
kind = "webhook"
url_env = "HOOK_URL"
""",
            )
        )
        n = build_notifier(settings, FAST, metrics, structlog.get_logger())
        assert sample("sent") == 0.0  # declared before anything is sent
        async with running(n):
            n.submit(journal_event(event_id="ev-1"))
            n.submit(journal_event(event_id="ev-2"))
            # One sender per sink, in order: ev-2 arriving means ev-1's 200 was counted.
            await receiver.wait_for(3)
        assert (tmp_path / "state" / "outbox").is_dir()
    assert (sample("retried"), sample("sent"), sample("dropped")) == (1.0, 1.0, 0.0)
