"""Deliver notifications: a durable queue per sink, each drained by its own sender task.

`Notifier.submit` only appends to a list in memory, so the decision path never waits for
a disk or a network. The notifier's intake task writes each event to the outbox once per
sink that wants it; one sender task per sink then posts the queue in order, retrying
with stamina, and forgets a message durably only once it is delivered or given up.

httpx and stamina are loaded at the first delivery, in a worker thread (`_Client`): a
guard whose sinks have nothing to say does not carry an HTTP client, its TLS context and
its CA bundle (about 4 MiB resident), and the event loop never stalls on the import.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import json
import math
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus

from guardd._version import __version__
from guardd.commands import retrying
from guardd.core.types import JOURNAL_EVENTS, URGENT_EVENTS, NotificationOutcome
from guardd.exceptions import StorageError
from guardd.notify import slack_api
from guardd.notify.discord import discord_message
from guardd.notify.outbox import CorruptMessageError, Message, Outbox
from guardd.notify.slack import slack_message
from guardd.notify.webhook import webhook_body, webhook_headers
from guardd.secrets import Secret, redact

if TYPE_CHECKING:
    import httpx

SinkKind = Literal["slack", "slack_api", "discord", "webhook"]

#: Names that stand for several events in a sink's `events`.
EVENT_GROUPS: Final[Mapping[str, frozenset[str]]] = {
    # Not rollback_started: one clear message per incident, saying how it ended.
    "rollback": frozenset({"rollback_completed", "rollback_failed"}),
    "qos": frozenset({"qos_locked", "qos_extended", "qos_released"}),
    "switch": frozenset({"switch", "promote", "external_switch"}),
}
#: Undelivered messages kept per sink; past it the oldest is dropped.
MAX_PENDING: Final = 1000
# A page cuts off a delivery in flight only once that delivery has taken this long (s):
# a message that goes at once (the `external_switch` that explains a `hold` queued a few
# milliseconds after it) keeps its place, and a page waits at most this for a slow one.
PREEMPT_AFTER_S: Final = 1.0
# How long a stopping notifier may take to write events submitted just before the stop.
_SAVE_ON_STOP_GRACE: Final = 2.0
_DETAIL_BYTES: Final = 256
# Slack's answer to chat.postMessage echoes the message: a few kilobytes.
_MAX_ANSWER_BYTES: Final = 256 * 1024
_REMEMBERED_DELIVERIES: Final = 1000
# An event id goes into an HTTP header and a log line, so it is kept to harmless characters.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")
_MAX_DEPTH: Final = 16


def expand_events(names: Iterable[str]) -> frozenset[str]:
    """The journal event names meant by `names`, groups expanded; unknown names are errors."""
    if isinstance(names, str):
        names = (names,)
    wanted: set[str] = set()
    for name in names:
        if name in EVENT_GROUPS:
            wanted |= EVENT_GROUPS[name]
        elif name in JOURNAL_EVENTS:
            wanted.add(name)
        else:
            known = ", ".join([*sorted(EVENT_GROUPS), *sorted(JOURNAL_EVENTS)])
            raise ValueError(f"unknown event {name!r}; expected one of: {known}")
    return frozenset(wanted)


#: What a sink gets when its configuration names no events.
DEFAULT_EVENTS: Final = expand_events(
    ("rollback", "hold", "alert", "external_switch", "qos_extended", "qos_released")
)


@dataclass(frozen=True, slots=True)
class Sink:
    """One destination of notifications; `name` labels its metrics and log lines.

    For `slack_api`, `url` is the `chat.postMessage` URL, `token` the bot token and
    `channel` where the incidents go.
    """

    name: str
    kind: SinkKind
    url: Secret
    events: frozenset[str]
    timeout: float = 10.0
    token: Secret | None = None
    channel: str = ""


class RetrySettings(Protocol):
    """How often and how patiently to try (`guardd.commands.RetryPolicy` or `[retry]`)."""

    @property
    def attempts(self) -> int: ...

    @property
    def base_delay(self) -> float: ...

    @property
    def max_delay(self) -> float: ...


def resolve_url(
    *, url: str | None, url_env: str | None, url_file: Path | None, environ: Mapping[str, str]
) -> Secret:
    """The webhook URL from exactly one source; reasons for failing never contain the URL.

    A relative `url_file` is looked up in `$CREDENTIALS_DIRECTORY`, where systemd puts what
    `LoadCredential=` loads, so `url_file = "slack"` works in a hardened unit.
    """
    given = [url is not None, url_env is not None, url_file is not None]
    if given.count(True) != 1:
        raise ValueError("set exactly one of url, url_env or url_file")
    if url is not None:
        raw, source = url, "url"
    elif url_env is not None:
        if (value := environ.get(url_env)) is None:
            raise ValueError(f"environment variable {url_env} is not set")
        raw, source = value, f"environment variable {url_env}"
    else:
        assert url_file is not None  # noqa: S101 - one of the three is set, checked above
        raw, source = _read_url_file(url_file, environ), f"file {url_file}"
    value = raw.strip()
    if not value:
        raise ValueError(f"{source} is empty")
    secret = Secret(value)
    _hide_url_parts(secret)
    check_http_url(value, source)
    return secret


def _read_url_file(path: Path, environ: Mapping[str, str]) -> str:
    if not path.is_absolute() and (credentials := environ.get("CREDENTIALS_DIRECTORY")):
        path = Path(credentials) / path
    try:
        with path.open("rb") as f:
            data = f.read(64 * 1024)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


def check_http_url(value: str, source: str) -> None:
    """Raise `ValueError` naming `source` unless `value` is an http(s) URL with a host."""
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        # urllib's message quotes the bad part of the URL, so it is not passed on.
        raise ValueError(f"{source} is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{source} is not an http:// or https:// URL")
    if not parts.hostname or not port_ok:
        raise ValueError(f"{source} has no valid host")
    if any(c.isspace() or ord(c) < 0x20 for c in value):
        raise ValueError(f"{source} contains whitespace or control characters")


def _hide_url_parts(url: Secret) -> None:
    """Register the token-bearing parts of `url` too, so `redact` hides them when quoted alone."""
    try:
        parts = urlsplit(url.reveal())
        password = parts.password
    except ValueError:
        return
    pieces = [parts.path, parts.query, password or ""]
    pieces += [parts.path + "?" + parts.query] if parts.query else []
    # A path segment that looks like an id or a token: Slack's and Discord's are both.
    pieces += [
        s
        for s in parts.path.split("/")
        if len(s) >= 16 or (len(s) >= 8 and any(c.isdigit() for c in s))
    ]
    for piece in pieces:
        Secret(piece)


class _AttemptError(Exception):
    """One attempt failed; `reason` is safe to log."""

    def __init__(
        self, reason: str, retry_after: float | None = None, *, slack_error: str = ""
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        # slack_api: the `error` of Slack's answer, to tell a lost thread from the rest.
        self.slack_error = slack_error


class _TransientError(_AttemptError):
    """The receiver may accept the same message later: a timeout, a 5xx, a 429."""


class _PermanentError(_AttemptError):
    """Sending the same message again cannot help: a 4xx, a bad URL."""


def _backoff(error: Exception, *, longest: float) -> bool | float:
    """stamina's hook: retry only what may pass later, after the pause the server asked
    for, but never longer than `longest` (`retry.max_delay`): a `Retry-After: 3600` obeyed
    would hold every page behind it for an hour, in silence, where a few more attempts
    (dropped when they are spent, said in the log and the metrics) cost nothing."""
    if isinstance(error, _TransientError):
        return True if error.retry_after is None else min(error.retry_after, longest)
    return False


def _urgent(message: Message) -> bool:
    """Whether `message` is a page that goes ahead of older ones (`URGENT_EVENTS`)."""
    return message.event.get("event") in URGENT_EVENTS


def _ignore_outcome(sink: str, outcome: str) -> None:
    """Count nothing: the default when no metrics are wired."""


def _ignore_storage_error(kind: str) -> None:
    """Count nothing: the default when no metrics are wired."""


@dataclass(slots=True, eq=False)
class _Submitted:
    """An event accepted by `submit` that the intake task has not written yet."""

    event: dict[str, Any]
    event_id: str
    sinks: tuple[str, ...]
    at: float


@dataclass(slots=True)
class _SinkState:
    """The queue of one sink and what its sender is doing."""

    sink: Sink
    queue: deque[Message] = field(default_factory=deque)
    pending_ids: set[str] = field(default_factory=set)
    # The pending messages whose delivery began at least once (failed, or cut off).
    tried_ids: set[str] = field(default_factory=set)
    delivered_ids: OrderedDict[str, None] = field(default_factory=OrderedDict)
    in_flight: Message | None = None
    ready: anyio.Event | None = None
    # The delivery under way, while a page may cut in ahead of it (`Notifier._send_loop`),
    # and when it began (monotonic s).
    preemptible: anyio.CancelScope | None = None
    in_flight_since: float = 0.0
    # slack_api: the incident thread replies go to, as kept in the outbox directory.
    thread: slack_api.Thread | None = None

    def wake(self) -> None:
        if self.ready is not None:
            self.ready.set()


class _Client:
    """The notifier's httpx.AsyncClient, made at the first delivery and then shared."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None) -> None:
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._lock = anyio.Lock()

    def _make(self) -> httpx.AsyncClient:
        import httpx  # noqa: PLC0415 - loaded when there is something to send

        retrying()  # stamina too, while off the event loop: every retry needs it
        return httpx.AsyncClient(
            transport=self._transport,
            follow_redirects=False,
            headers={"User-Agent": f"guardd/{__version__}"},
        )

    async def get(self) -> httpx.AsyncClient:
        """The client; the first call imports httpx and builds it in a worker thread."""
        async with self._lock:
            if self._client is None:
                # Importing httpx and loading its CA bundle take tens of milliseconds of
                # CPU: a thread keeps the decision loop turning meanwhile.
                self._client = await anyio.to_thread.run_sync(self._make)
            return self._client

    async def aclose(self) -> None:
        """Close the client, if one was made."""
        if self._client is not None:
            await self._client.aclose()


class Notifier:
    """Deliver journal events to Slack, Discord and webhooks without ever delaying a decision."""

    def __init__(
        self,
        *,
        instance: str,
        sinks: Sequence[Sink],
        retry: RetrySettings,
        outbox_dir: Path,
        on_outcome: Callable[[str, str], None] = _ignore_outcome,
        on_storage_error: Callable[[str], None] = _ignore_storage_error,
        transport: httpx.AsyncBaseTransport | None = None,
        logger: Any = None,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = MAX_PENDING,
    ) -> None:
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique: {names}")
        if retry.attempts < 1:
            raise ValueError("retry.attempts must be >= 1")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.instance = instance
        self._sinks = {s.name: _SinkState(s) for s in sinks}
        self._routes: dict[str, tuple[str, ...]] = {
            event: tuple(s.name for s in sinks if event in s.events)
            for event in set().union(*(s.events for s in sinks))
        }
        self._retry = retry
        self._outbox = Outbox(outbox_dir)
        self._on_outcome = on_outcome
        self._on_storage_error = on_storage_error
        self._transport = transport
        self._log = logger if logger is not None else structlog.get_logger("guardd.notify")
        self._clock = clock
        self._max_pending = max_pending
        self._inbox: deque[_Submitted] = deque()
        self._inbox_ready: anyio.Event | None = None
        # Taken from the inbox, being written to the outbox now.
        self._unwritten: list[_Submitted] = []
        # Messages whose file could not be written: nothing to unlink once they are done.
        self._unsaved: set[int] = set()
        self._started = False
        for s in sinks:
            _hide_url_parts(s.url)

    def submit(self, event: Mapping[str, Any]) -> None:
        """Queue `event` for every sink that wants it; never blocks, never raises.

        Call it from the event loop's thread (or before `run`), as the guard does.
        """
        try:
            self._submit(event)
        except Exception as e:  # noqa: BLE001 - a decision must go on whatever an event holds
            self._log.error("notification_submit_failed", error=redact(repr(e)))

    def pending(self) -> int:
        """Undelivered (sink, event) pairs, for status."""
        queued = sum(len(state.queue) for state in self._sinks.values())
        return queued + sum(len(item.sinks) for item in (*self._unwritten, *self._inbox))

    @property
    def sinks(self) -> tuple[Sink, ...]:
        """Where it sends, URLs and tokens as resolved when it was built."""
        return tuple(state.sink for state in self._sinks.values())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled, starting with what an earlier run left in the outbox.

        On cancellation, events submitted but not written yet are written first (for at
        most a moment), so that the next start delivers them.
        """
        if self._started:
            raise RuntimeError("a Notifier runs only once; make a new one to restart")
        self._started = True
        self._inbox_ready = anyio.Event()
        await self._load()
        client = _Client(self._transport)
        try:
            async with anyio.create_task_group() as tg:
                for state in self._sinks.values():
                    tg.start_soon(self._send_loop, client, state, name=f"notify:{state.sink.name}")
                task_status.started()
                await self._intake()
        finally:
            with anyio.move_on_after(_SAVE_ON_STOP_GRACE, shield=True):
                await self._admit()
            with anyio.CancelScope(shield=True):
                await client.aclose()

    # -- intake -------------------------------------------------------------------------

    def _submit(self, event: Mapping[str, Any]) -> None:
        name = event.get("event")
        if not isinstance(name, str) or not (sinks := self._routes.get(name)):
            return
        plain = _plain(event, 0)
        assert isinstance(plain, dict)  # noqa: S101 - a Mapping becomes a dict
        raw_id = plain.get("id")
        if isinstance(raw_id, str) and _SAFE_ID.match(raw_id):
            event_id = raw_id
        elif raw_id in (None, ""):
            event_id = plain["id"] = uuid.uuid4().hex
            self._log.warning(
                "notification_event_without_id", journal_event=name, event_id=event_id
            )
        else:
            # Still stable, so that the same odd id is still deduplicated.
            digest = hashlib.sha256(str(raw_id).encode("utf-8", "replace")).hexdigest()
            event_id = f"h-{digest[:32]}"
        if len(self._inbox) >= self._max_pending:
            # Only when run() is not draining the inbox; the oldest goes, as in the outbox.
            oldest = self._inbox.popleft()
            for sink in oldest.sinks:
                self._dropped(sink, oldest.event_id, "too many notifications waiting to be written")
        self._inbox.append(_Submitted(plain, event_id, sinks, self._clock()))
        if self._inbox_ready is not None:
            self._inbox_ready.set()

    async def _intake(self) -> None:
        while True:
            if not self._inbox:
                self._inbox_ready = anyio.Event()
                await self._inbox_ready.wait()
                continue
            await self._admit()

    async def _admit(self) -> None:
        """Write what was submitted to the outbox, then hand it to the senders."""
        # Out of the inbox first, so that submit's cap never drops what is being written;
        # cancelled before the write, it is still in _unwritten for the stop path.
        self._unwritten += self._inbox
        self._inbox.clear()
        batch = self._unwritten
        if not batch:
            return
        messages: list[Message] = []
        seen: set[tuple[str, str]] = set()
        for item in batch:
            for name in item.sinks:
                state = self._sinks[name]
                key = (name, item.event_id)
                if (
                    key in seen
                    or item.event_id in state.pending_ids
                    or item.event_id in state.delivered_ids
                ):
                    self._log.info("notification_duplicate", sink=name, event_id=item.event_id)
                    continue
                seen.add(key)
                messages.append(self._outbox.new_message(name, item.event_id, item.event, item.at))
        # Once started, the write is not abandoned: what follows runs even when cancelled.
        failed, sync_error = (
            await anyio.to_thread.run_sync(self._save, messages) if messages else ([], None)
        )
        self._unwritten = []
        for message, why in failed:
            self._unsaved.add(message.seq)
            self._storage_failed(
                "outbox_write_failed", why, sink=message.sink, event_id=message.event_id
            )
        if sync_error is not None:
            self._storage_failed("outbox_sync_failed", sync_error)
        evicted: list[Message] = []
        for message in messages:
            evicted += self._enqueue(message)
        if evicted:
            with anyio.CancelScope(shield=True):
                await self._forget(evicted)

    def _save(self, messages: list[Message]) -> tuple[list[tuple[Message, str]], str | None]:
        failed = self._outbox.save(messages)
        if len(failed) == len(messages):
            return failed, None
        try:
            self._outbox.sync()
        except StorageError as e:
            return failed, str(e)
        return failed, None

    def _enqueue(self, message: Message) -> list[Message]:
        """Queue `message` for its sender; returns what had to be dropped to make room."""
        state = self._sinks[message.sink]
        evicted = []
        while len(state.queue) >= self._max_pending:
            victim = next((m for m in state.queue if m is not state.in_flight), None)
            if victim is None:
                break
            state.queue.remove(victim)
            state.pending_ids.discard(victim.event_id)
            state.tried_ids.discard(victim.event_id)
            self._dropped(
                message.sink,
                victim.event_id,
                f"more than {self._max_pending} notifications pending; oldest dropped",
            )
            evicted.append(victim)
        state.queue.append(message)
        state.pending_ids.add(message.event_id)
        state.wake()
        if state.preemptible is not None and _urgent(message):
            # The page goes first, once the delivery under way has had PREEMPT_AFTER_S; the
            # message cut off goes on after it.
            cut_at = state.in_flight_since + PREEMPT_AFTER_S
            state.preemptible.deadline = min(state.preemptible.deadline, cut_at)
        return evicted

    async def _load(self) -> None:
        try:
            messages, problems = await anyio.to_thread.run_sync(self._outbox.load)
        except (OSError, StorageError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._storage_failed("outbox_unreadable", why, directory=str(self._outbox.directory))
            return
        for problem in problems:
            self._log.error(
                "outbox_corrupt_message_skipped",
                problem=redact(problem),
                directory=str(self._outbox.directory),
            )
        orphans = [m for m in messages if m.sink not in self._sinks]
        if orphans:
            # Kept on disk: the sink may come back with the next configuration.
            self._log.warning(
                "outbox_messages_for_unknown_sinks",
                count=len(orphans),
                sinks=sorted({m.sink for m in orphans}),
            )
        duplicates, evicted = [], []
        for message in messages:
            if (state := self._sinks.get(message.sink)) is None:
                continue
            if message.event_id in state.pending_ids:
                duplicates.append(message)
                continue
            evicted += self._enqueue(message)
        if loaded := len(messages) - len(orphans) - len(duplicates):
            self._log.info("notifications_loaded", count=loaded)
        await self._forget(duplicates + evicted)
        for state in self._sinks.values():
            if state.sink.kind == "slack_api":
                state.thread = await self._load_thread(state.sink.name)

    async def _load_thread(self, sink: str) -> slack_api.Thread | None:
        """The thread an earlier run left open for `sink`; None (a new message) if unreadable."""
        try:
            doc = await anyio.to_thread.run_sync(self._outbox.load_thread, sink)
            return None if doc is None else slack_api.Thread.from_json(doc)
        except (OSError, CorruptMessageError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._storage_failed("outbox_thread_unreadable", why, sink=sink)
            return None

    # -- senders ------------------------------------------------------------------------

    async def _send_loop(self, client: _Client, state: _SinkState) -> None:
        while True:
            while not state.queue:
                state.ready = anyio.Event()
                await state.ready.wait()
            # In the order they came, but a page (`URGENT_EVENTS`) goes ahead of messages
            # whose delivery already failed or was cut off; a slack_api sink keeps the
            # order whole, since its replies go to the thread open then.
            keep_order = state.sink.kind == "slack_api"
            message = state.in_flight = (
                state.queue[0]
                if keep_order
                else next(
                    (m for m in state.queue if _urgent(m) or m.event_id not in state.tried_ids),
                    state.queue[0],
                )
            )
            state.tried_ids.add(message.event_id)
            delivered = False
            try:
                with anyio.CancelScope() as scope:
                    if not keep_order and not _urgent(message):
                        state.preemptible = scope
                        state.in_flight_since = anyio.current_time()
                        if any(_urgent(m) for m in state.queue):
                            # A page queued behind it already: the same grace, from now.
                            scope.deadline = state.in_flight_since + PREEMPT_AFTER_S
                    delivered = await self._deliver(client, state, message)
            finally:
                # Cancelled mid-delivery, the message stays queued and in the outbox.
                state.in_flight = state.preemptible = None
            if scope.cancelled_caught:
                # A page came: it goes now, and this message from its first attempt after.
                self._log.info(
                    "notification_preempted", sink=state.sink.name, event_id=message.event_id
                )
                continue
            with anyio.CancelScope(shield=True):
                await self._settle(state, message, delivered=delivered)

    async def _deliver(self, client: _Client, state: _SinkState, message: Message) -> bool:
        """Post `message` until it is accepted, rejected or out of attempts; True if sent."""
        sink = state.sink
        journal_event = message.event.get("event")
        log = self._log.bind(sink=sink.name, event_id=message.event_id, journal_event=journal_event)
        thread = None
        if sink.kind == "slack_api":
            thread = slack_api.thread_for(state.thread, journal_event, sink.channel)
            log = log.bind(thread_ts=None if thread is None else thread.ts)
        answer = b""
        try:
            body, headers = _request_for(sink, message, self.instance, thread)
        except Exception as e:  # noqa: BLE001 - one odd event must not stop the sink
            why = f"cannot build the message: {redact(repr(e))}"
            self._dropped(sink.name, message.event_id, why)
            return False
        http = await client.get()
        attempts = 0
        try:
            async for attempt in retrying().retry_context(
                on=functools.partial(_backoff, longest=self._retry.max_delay),
                attempts=self._retry.attempts,
                # Bounded by attempts alone: a total deadline would cut the last attempts short.
                timeout=None,
                wait_initial=self._retry.base_delay,
                wait_max=self._retry.max_delay,
                wait_jitter=self._retry.base_delay,
            ):
                with attempt:
                    attempts = attempt.num
                    if attempts > 1:
                        self._outcome(sink.name, "retried")
                    try:
                        answer = await _post(http, sink, body, headers)
                    except _TransientError as e:
                        log.warning(
                            "notification_attempt_failed",
                            attempt=attempts,
                            reason=e.reason,
                            retry_after=e.retry_after,
                        )
                        raise
        except _TransientError as e:
            self._dropped(
                sink.name, message.event_id, f"gave up after {attempts} attempts: {e.reason}"
            )
            return False
        except _PermanentError as e:
            if thread is not None and e.slack_error in slack_api.THREAD_ERRORS:
                # The thread is gone (deleted, archived): the message still goes, on its own.
                log.warning("notification_thread_lost", reason=e.reason)
                await self._advance_thread(state, message, ("", ""), lost=True)
                return await self._deliver(client, state, message)
            self._dropped(sink.name, message.event_id, e.reason)
            return False
        self._outcome(sink.name, "sent")
        waited = None if message.queued_at is None else round(self._clock() - message.queued_at, 3)
        log.info("notification_sent", attempts=attempts, queued_s=waited)
        if sink.kind == "slack_api":
            await self._advance_thread(state, message, slack_api.parse_answer(answer))
        return True

    async def _advance_thread(
        self, state: _SinkState, message: Message, answer: tuple[str, str], *, lost: bool = False
    ) -> None:
        """Open, keep or close the sink's thread after delivering `message`, durably.

        Written before the message leaves the outbox: a crash in between posts the message
        again rather than losing the thread its replies need. `lost`: Slack no longer has
        the thread, so it is forgotten whatever `message` is.
        """
        new = (
            None
            if lost
            else slack_api.next_thread(
                state.thread,
                message.event.get("event"),
                configured_channel=state.sink.channel,
                answer=answer,
                event_id=message.event_id,
            )
        )
        if new == state.thread:
            return
        state.thread = new
        doc = None if new is None else new.to_json()
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self._outbox.save_thread, state.sink.name, doc)
            except StorageError as e:
                self._storage_failed("outbox_thread_write_failed", str(e), sink=state.sink.name)
        self._log.info(
            "notification_thread_opened" if new is not None else "notification_thread_closed",
            sink=state.sink.name,
            event_id=message.event_id,
            thread_ts=None if new is None else new.ts,
        )

    async def _settle(self, state: _SinkState, message: Message, *, delivered: bool) -> None:
        """Forget a delivered or dropped message, in memory and then on disk."""
        for i, queued in enumerate(state.queue):
            if queued is message:
                del state.queue[i]
                break
        state.pending_ids.discard(message.event_id)
        state.tried_ids.discard(message.event_id)
        if delivered:
            state.delivered_ids[message.event_id] = None
            while len(state.delivered_ids) > _REMEMBERED_DELIVERIES:
                state.delivered_ids.popitem(last=False)
        await self._forget([message])

    async def _forget(self, messages: list[Message]) -> None:
        on_disk = [m for m in messages if m.seq not in self._unsaved]
        self._unsaved.difference_update(m.seq for m in messages)
        if not on_disk:
            return
        try:
            await anyio.to_thread.run_sync(self._outbox.remove, on_disk)
        except StorageError as e:
            # It may be delivered again after a restart: at least once beats never.
            self._storage_failed("outbox_remove_failed", str(e), count=len(on_disk))

    # -- reporting ----------------------------------------------------------------------

    def _dropped(self, sink: str, event_id: str, reason: str) -> None:
        self._log.error("notification_dropped", sink=sink, event_id=event_id, reason=reason)
        self._outcome(sink, "dropped")

    def _outcome(self, sink: str, outcome: NotificationOutcome) -> None:
        try:
            self._on_outcome(sink, outcome)
        except Exception as e:  # noqa: BLE001 - a metrics bug must not stop deliveries
            self._log.error("notification_outcome_callback_failed", error=redact(repr(e)))

    def _storage_failed(self, log_event: str, why: str, **fields: Any) -> None:
        self._log.error(log_event, error=redact(why), **fields)
        try:
            self._on_storage_error("outbox")
        except Exception as e:  # noqa: BLE001 - a metrics bug must not stop deliveries
            self._log.error("notification_storage_callback_failed", error=redact(repr(e)))


def _request_for(
    sink: Sink, message: Message, instance: str, thread: slack_api.Thread | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers that deliver `message` to `sink` (a reply in `thread`, if given)."""
    headers = {"Content-Type": "application/json"}
    if sink.kind == "slack_api":
        assert sink.token is not None  # noqa: S101 - sinks_from_config always sets it
        doc = slack_api.post_message(
            message.event, instance=instance, channel=sink.channel, thread=thread
        )
        headers = slack_api.headers(sink.token)
    elif sink.kind == "slack":
        doc = slack_message(message.event, instance=instance)
    elif sink.kind == "discord":
        doc = discord_message(message.event, instance=instance)
    else:
        doc = webhook_body(message.event)
        headers |= webhook_headers(message.event_id)
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode(), headers


async def _post(
    client: httpx.AsyncClient, sink: Sink, body: bytes, headers: dict[str, str]
) -> bytes:
    """One attempt; raises `_TransientError` or `_PermanentError` unless answered 2xx.

    Returns the answer's body for `slack_api` (whose 200 may still be a refusal), else b"".
    """
    import httpx  # noqa: PLC0415 - loaded by `_Client` before any post

    try:
        # httpx's timeout bounds each read; this bounds the whole exchange.
        with anyio.fail_after(sink.timeout):
            async with client.stream(
                "POST", sink.url.reveal(), content=body, headers=headers, timeout=sink.timeout
            ) as response:
                if response.is_success:
                    if sink.kind != "slack_api":
                        return b""
                    answer = await _read_capped(response, _MAX_ANSWER_BYTES)
                    try:
                        slack_api.parse_answer(answer)
                    except slack_api.SlackApiError as e:
                        reason = f"Slack refused it: {redact(e.error)}"
                        if e.transient:
                            raise _TransientError(reason, slack_error=e.error) from None
                        raise _PermanentError(reason, slack_error=e.error) from None
                    return answer
                detail = await _detail(response)
    except _AttemptError:
        raise
    except (TimeoutError, httpx.TimeoutException):
        raise _TransientError(f"no answer within {sink.timeout:g}s") from None
    except httpx.UnsupportedProtocol:
        raise _PermanentError("the URL is not http or https") from None
    except (httpx.RequestError, OSError) as e:
        # httpx may quote the URL in its messages: only a redacted text goes on.
        raise _TransientError(f"{type(e).__name__}: {redact(str(e)) or 'no detail'}") from None
    except Exception as e:  # noqa: BLE001 - an unexpected error must not kill the sender
        raise _PermanentError(f"{type(e).__name__}: {redact(str(e)) or 'no detail'}") from None
    status = response.status_code
    if status == 429:
        # However long the pause asked for, it is waited up to retry.max_delay (`_backoff`):
        # never a drop, whatever a receiver's clock says.
        wait = _retry_after(response.headers.get("Retry-After"))
        raise _TransientError(f"HTTP 429{detail}", retry_after=wait)
    if status >= 500:
        raise _TransientError(f"HTTP {status}{detail}")
    raise _PermanentError(f"HTTP {status}{detail}")


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of the answer: a receiver cannot make guardd hold more."""
    data = b""
    # Decoded: Slack compresses its answers when asked, and httpx asks.
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            break
    return data[:limit]


async def _detail(response: httpx.Response) -> str:
    """The start of an error answer, for the log: receivers say what they disliked."""
    data = b""
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= _DETAIL_BYTES:
            break
    text = " ".join(data[:_DETAIL_BYTES].decode("utf-8", "replace").split())
    return f": {redact(text)}" if text else ""


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _plain(value: object, depth: int) -> object:
    """`value` as plain JSON data: what the outbox can write and every receiver can parse."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= _MAX_DEPTH:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v, depth + 1) for v in value]
    return str(value)
