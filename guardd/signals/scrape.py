"""The `scrape` signal: each color's own `/metrics`, read the way Prometheus would.

Every `every` seconds each color's URL is fetched (one request in flight per color, a
deadline of `timeout` for the whole exchange, the body streamed and abandoned past
`max_bytes`), parsed by prometheus_client's exposition parser, and the series matching the
configured selectors are summed:

- `ratio = {of, to}`: per series, the increase across the window as Prometheus's
  `increase()` counts it (a counter that drops has restarted from 0: its new value is the
  increase, never a negative one), summed over the matching series; the value is
  increase(of) / increase(to), None (inconclusive) while increase(to) is 0. Unlike
  Prometheus there is no extrapolation to the window's edges: the increase is between the
  first and the last scrape in the window. A series absent from the previous scrape counts
  from 0 (a labelled counter is born at its first increment).
- `value = "selector"`: the sum of the matching series at the last scrape (a gauge).

A scrape that fails (`timeout`, `connect`, `http` status, `oversize`, `invalid` exposition
text) is counted by kind in `status()`, makes the color's reading inconclusive until a scrape
succeeds again, and sets `problem` while it lasts. Parsing runs in a worker thread, so a
large exposition never holds up the decision loop.

Each scrape's result is also a sample payload, a small JSON object handed to `on_sample`
(the daemon records it) and read back by `apply_sample` (replay): `{"outcome": "ok",
"steps": [...], "sums": [...]}` (per selector, in `selector_texts()` order: the increase of
its series since the scrape before, and the sum of its series, null when none matched), or
`{"outcome": <one of ERROR_KINDS>, "error": text}` (redacted). The window is built from
steps and sums alone, so the payload stays small whatever the exposition holds.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.to_thread
import httpx
from anyio.abc import TaskStatus
from prometheus_client.parser import text_string_to_metric_families

from guardd.clock import Clock
from guardd.core.signals import Reading
from guardd.secrets import REDACTED, redact
from guardd.signals._http import BodyRefused, read_capped

#: How a scrape can fail (the keys of `status()["errors"]`).
ERROR_KINDS: Final = ("timeout", "connect", "http", "oversize", "invalid")
#: Series one selector may match in one scrape; more is `invalid` (it bounds the window).
MAX_SERIES: Final = 10_000
#: Evidence strings are cut to this many characters.
_DETAIL_CHARS: Final = 200

# A selector: a metric name, then optionally `{label OP "value", ...}` (PromQL's syntax).
_NAME: Final = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*")
_MATCHER: Final = re.compile(
    r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"\s*(,?)\s*"
)
_ESCAPES: Final = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), text)


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed series selector: `name{label="v", label!="v", label=~"re", label!~"re"}`.

    Regular expressions are anchored at both ends, as in PromQL. A name without `_total`
    also matches `NAME_total` when no series is named `NAME` itself (the parser names a
    counter's family without `_total`; the exposition's samples keep it).
    """

    text: str
    name: str
    matchers: tuple[tuple[str, str, str | re.Pattern[str]], ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a series with `labels` is selected (an absent label is "")."""
        for label, op, want in self.matchers:
            have = labels.get(label, "")
            if op == "=":
                ok = have == want
            elif op == "!=":
                ok = have != want
            else:
                assert isinstance(want, re.Pattern)  # noqa: S101 - set so by parse_selector
                ok = want.fullmatch(have) is not None
                if op == "!~":
                    ok = not ok
            if not ok:
                return False
        return True


def parse_selector(text: str) -> Selector:
    """Parse `name{label="value", ...}`; ValueError with the reason when it is not one."""
    m = _NAME.match(text)
    if m is None:
        raise ValueError(f"{text!r} does not start with a metric name")
    name, pos = m.group(1), m.end()
    matchers: list[tuple[str, str, str | re.Pattern[str]]] = []
    if pos < len(text) and text[pos] == "{":
        pos += 1
        while True:
            rest = text[pos:].lstrip()
            if rest.startswith("}"):
                pos = len(text) - len(rest) + 1
                break
            mm = _MATCHER.match(text, pos)
            if mm is None:
                raise ValueError(f'{text!r}: expected label="value" at {text[pos:]!r}')
            label, op, raw, comma = mm.groups()
            value = _unescape(raw)
            if op in ("=~", "!~"):
                try:
                    matchers.append((label, op, re.compile(value)))
                except re.error as e:
                    why = f"{value!r} is not a regular expression: {e}"
                    raise ValueError(f"{text!r}: {why}") from None
            else:
                matchers.append((label, op, value))
            pos = mm.end()
            if not comma and not text[pos:].lstrip().startswith("}"):
                raise ValueError(f"{text!r}: expected , or }} at {text[pos:]!r}")
    if text[pos:].strip():
        raise ValueError(f"{text!r}: unexpected {text[pos:].strip()!r} after the selector")
    return Selector(text.strip(), name, tuple(matchers))


#: One scrape's matching series: label set (sorted items) -> value.
Series = dict[tuple[tuple[str, str], ...], float]


def select(families: Any, selectors: tuple[Selector, ...]) -> tuple[Series, ...]:
    """The series each selector matches in parsed `families` (prometheus_client's).

    Raises ValueError when a selector matches more than MAX_SERIES series.
    """
    exact: list[Series] = [{} for _ in selectors]
    total: list[Series] = [{} for _ in selectors]
    for family in families:
        for sample in family.samples:
            for i, sel in enumerate(selectors):
                if sample.name == sel.name:
                    into = exact[i]
                elif sample.name == sel.name + "_total" and not sel.name.endswith("_total"):
                    into = total[i]
                else:
                    continue
                if sel.matches(sample.labels) and math.isfinite(sample.value):
                    key = tuple(sorted(sample.labels.items()))
                    into[key] = into.get(key, 0.0) + sample.value
                    if len(into) > MAX_SERIES:
                        raise ValueError(f"{sel.text} matches more than {MAX_SERIES} series")
    return tuple(e or t for e, t in zip(exact, total, strict=True))


def parse(text: str, selectors: tuple[Selector, ...]) -> tuple[Series, ...]:
    """Parse exposition `text` and select; ValueError when it is not valid exposition text."""
    try:
        return select(text_string_to_metric_families(text), selectors)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the parser's other errors on junk (IndexError, ...)
        raise ValueError(f"{type(e).__name__}: {e}") from None


def increase(samples: list[Series]) -> float:
    """Sum over series of each one's increase across consecutive scrapes, as `increase()`.

    A value lower than the one before is a counter reset: the new value is that step's
    increase. A series absent from the scrape before counts from 0. Never negative.
    """
    total = 0.0
    for before, after in itertools.pairwise(samples):
        for key, value in after.items():
            prev = before.get(key, 0.0)
            total += value - prev if value >= prev else value
    return total


@dataclass(frozen=True, slots=True)
class ScrapeSpec:
    """What one `scrape` signal reads: `urls` per color, and exactly one of `ratio`
    (numerator and denominator selectors) or `value` (a gauge's selector). Durations in
    seconds; `max_bytes` bounds one exposition. ValueError(`key: reason`) when invalid."""

    urls: Mapping[str, str]
    ratio: tuple[str, str] | None = None
    value: str | None = None
    every_s: float = 5.0
    timeout_s: float = 2.0
    window_s: float = 60.0
    max_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("urls: name at least one color's /metrics URL")
        if (self.ratio is None) == (self.value is None):
            raise ValueError("ratio: give exactly one of ratio and value")
        for key in ("every_s", "timeout_s", "window_s"):
            v = getattr(self, key)
            if not (isinstance(v, int | float) and 0 < v < math.inf):
                raise ValueError(f"{key}: must be a positive number of seconds")
        if self.max_bytes < 1024:
            raise ValueError("max_bytes: must be at least 1024")
        for key, text in self.selector_texts().items():
            try:
                parse_selector(text)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None

    def selector_texts(self) -> dict[str, str]:
        """The selectors by config key (`ratio.of`, `ratio.to` or `value`)."""
        if self.ratio is not None:
            return {"ratio.of": self.ratio[0], "ratio.to": self.ratio[1]}
        assert self.value is not None  # noqa: S101 - checked above
        return {"value": self.value}


class _Scrape(Exception):
    """One failed scrape, of a kind in ERROR_KINDS."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


class _Color:
    """One color's scrapes in the window, its last outcome and its counters."""

    __slots__ = ("error", "last", "last_ok", "samples", "scrapes")

    def __init__(self, maxlen: int) -> None:
        #: Per successful scrape: (monotonic time, the increase of each ratio selector's
        #: series since the scrape before, the sum of the series each selector matched).
        #: Only the last scrape's series are kept (`last`): the window costs O(scrapes).
        self.samples: deque[tuple[float, tuple[float, ...], tuple[float | None, ...]]] = deque(
            maxlen=maxlen
        )
        self.last: tuple[Series, ...] | None = None
        self.error: str | None = None
        self.last_ok: float | None = None
        self.scrapes = 0


def shown_url(url: str) -> str:
    """`url` as status shows it: a user:password@ part (HTTP basic auth) becomes `***@`."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))


def _finite(value: object) -> bool:
    """Whether `value` is a finite JSON number (a bool is none)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cut(text: str) -> str:
    text = redact(text)
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 1] + "…"


class ScrapeSignal:
    """Scrapes each color's `/metrics` every `every_s` and keeps its window of scrapes.

    `run()` scrapes until cancelled; `reading(color, now)` is what the rules read:
    stats `{"value": v}`, `samples` = successful scrapes in the window, `last_at` = the last
    successful scrape (the signal's start before the first).
    """

    #: A fault makes only its own color's reading inconclusive (the adapter does that), so
    #: the guard keeps reading the other color while `problem` is set.
    blind_on_problem = False

    def __init__(
        self,
        name: str,
        spec: ScrapeSpec,
        clock: Clock,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.clock = clock
        self._transport = transport
        self._selectors = tuple(parse_selector(t) for t in spec.selector_texts().values())
        self.started = clock.monotonic()
        # Scrapes a window can hold, plus the one just before it (the increase's baseline).
        maxlen = math.ceil(spec.window_s / spec.every_s) + 2
        self.colors = {color: _Color(maxlen) for color in spec.urls}
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        #: Why the signal cannot read right now, else None.
        self.problem: str | None = None
        self._limiter = anyio.CapacityLimiter(1)
        #: The most body bytes held at once by a scrape (for the tests: bounded memory).
        self.max_held = 0
        #: Called with (color, payload) as each scrape's result lands (see the module's
        #: docstring); the daemon sets it to record the samples. None: nobody listens.
        self.on_sample: Callable[[str, dict[str, Any]], None] | None = None

    # ---- what the rules read -----------------------------------------------------------

    def reading(self, color: str, now: float) -> Reading | None:
        """The window of `color` at monotonic `now`; None for a color without a URL."""
        state = self.colors.get(color)
        if state is None:
            return None
        start = now - self.spec.window_s
        window = [(steps, sums) for t, steps, sums in state.samples if t >= start]
        detail: dict[str, Any] = {}
        value: float | None = None
        if self.spec.ratio is not None:
            detail["of"], detail["to"] = (_cut(t) for t in self.spec.ratio)
            if len(window) >= 2:  # an increase needs two scrapes
                # The first scrape in the window is the baseline: its step is from before.
                of = sum(steps[0] for steps, _ in window[1:])
                to = sum(steps[1] for steps, _ in window[1:])
                detail["of_increase"], detail["to_increase"] = of, to
                value = of / to if to > 0 else None
        else:
            assert self.spec.value is not None  # noqa: S101 - a ratio or a value
            detail["value_of"] = _cut(self.spec.value)
            if window:
                value = window[-1][1][0]
        if state.error is not None:
            detail["last_error"] = state.error
            value = None
        return Reading(
            samples=len(window),
            window_s=self.spec.window_s,
            stats={"value": value},
            last_at=state.last_ok if state.last_ok is not None else self.started,
            detail=detail,
        )

    def status(self) -> dict[str, Any]:
        """Counters and each color's last outcome, for `guardctl status` (no secret)."""
        return {
            "kind": "scrape",
            "state": f"scraping every {self.spec.every_s:g}s",
            "urls": {c: _cut(shown_url(u)) for c, u in self.spec.urls.items()},
            "problem": self.problem,
            "scrapes": {c: s.scrapes for c, s in self.colors.items()},
            "errors": dict(self.errors),
            "last_error": {c: s.error for c, s in self.colors.items()},
        }

    # ---- scraping ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Scrape every color every `every_s` until cancelled."""
        async with (
            httpx.AsyncClient(
                transport=self._transport,
                timeout=self.spec.timeout_s,
                follow_redirects=False,
                # A compressed body could expand past max_bytes inside one chunk.
                headers={"Accept-Encoding": "identity", "Accept": "text/plain"},
            ) as client,
            anyio.create_task_group() as tg,
        ):
            for color in self.colors:
                tg.start_soon(self._loop, client, color)
            task_status.started()

    async def _loop(self, client: httpx.AsyncClient, color: str) -> None:
        every = self.spec.every_s
        due = self.clock.monotonic()
        while True:
            await self.scrape_once(client, color)
            # The next slot on the cadence; slots missed by a slow scrape are skipped.
            now = self.clock.monotonic()
            due += every
            if due < now:
                due += math.ceil((now - due) / every) * every
            await anyio.sleep(due - now)

    async def scrape_once(self, client: httpx.AsyncClient, color: str) -> None:
        """One scrape of `color`: its window on success, its error counted on failure."""
        state = self.colors[color]
        try:
            with anyio.fail_after(self.spec.timeout_s):
                body = await self._fetch(client, self.spec.urls[color])
            text = body.decode("utf-8", "replace")
            del body
            try:
                series = await anyio.to_thread.run_sync(
                    parse, text, self._selectors, limiter=self._limiter
                )
            except ValueError as e:
                raise _Scrape("invalid", f"invalid exposition text: {e}") from None
        except _Scrape as e:
            self._failed(state, e.kind, str(e))
            return
        except TimeoutError:
            self._failed(state, "timeout", f"no answer within {self.spec.timeout_s:g}s")
            return
        except httpx.TimeoutException:
            self._failed(state, "timeout", f"no answer within {self.spec.timeout_s:g}s")
            return
        except (httpx.HTTPError, OSError) as e:
            self._failed(state, "connect", f"{type(e).__name__}: {e}")
            return
        self.record(color, self.clock.monotonic(), series)

    def record(self, color: str, now: float, series: tuple[Series, ...]) -> None:
        """Count one successful scrape of `color` at monotonic `now`: the series each
        selector matched (in `selector_texts()` order)."""
        state = self.colors[color]
        before = state.last
        steps = tuple(
            increase([before[i], s]) if before is not None else 0.0 for i, s in enumerate(series)
        )
        sums = tuple(sum(s.values()) if s else None for s in series)
        state.last = series
        self._scraped(state, now, steps, sums)
        if self.on_sample is not None:
            self.on_sample(color, {"outcome": "ok", "steps": list(steps), "sums": list(sums)})

    def apply_sample(self, color: str, data: dict[str, Any], now: float) -> None:
        """Take one payload of `on_sample` as if its scrape had ended at monotonic `now`.

        A color this signal does not scrape is ignored. Raises ValueError (the reason) for
        a payload that is not one this adapter emits (wrong outcome, or not one step and
        one sum per selector).
        """
        outcome = data.get("outcome")
        if outcome == "ok":
            n = len(self._selectors)
            steps, sums = data.get("steps"), data.get("sums")
            if not (isinstance(steps, list) and len(steps) == n and all(map(_finite, steps))):
                raise ValueError(f"steps: must be {n} finite numbers")
            if not (
                isinstance(sums, list)
                and len(sums) == n
                and all(v is None or _finite(v) for v in sums)
            ):
                raise ValueError(f"sums: must be {n} numbers or nulls")
            state = self.colors.get(color)
            if state is not None:
                self._scraped(
                    state,
                    now,
                    tuple(float(v) for v in steps),
                    tuple(None if v is None else float(v) for v in sums),
                )
            return
        if outcome not in self.errors:
            kinds = ", ".join(("ok", *ERROR_KINDS))
            raise ValueError(f"outcome: {str(outcome)[:40]!r} is not one of {kinds}")
        error = data.get("error")
        if not isinstance(error, str):
            # ValueError, not TypeError: one reason for every payload replay cannot take.
            raise ValueError("error: a failed scrape's sample needs its text")  # noqa: TRY004
        state = self.colors.get(color)
        if state is not None:
            self._fail(state, outcome, _cut(error))

    def _scraped(
        self,
        state: _Color,
        now: float,
        steps: tuple[float, ...],
        sums: tuple[float | None, ...],
    ) -> None:
        state.samples.append((now, steps, sums))
        state.last_ok = now
        state.scrapes += 1
        state.error = None
        self._set_problem()

    async def _fetch(self, client: httpx.AsyncClient, url: str) -> bytes:
        limit = self.spec.max_bytes
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise _Scrape("http", f"HTTP {response.status_code}")

            def held(size: int) -> None:
                self.max_held = max(self.max_held, size)

            try:
                return await read_capped(response, limit, held)
            except BodyRefused as e:
                if e.why == "compressed":
                    raise _Scrape("invalid", e.detail) from None
                if e.declared is not None:
                    raise _Scrape(
                        "oversize", f"{e.declared} bytes is over max_bytes ({limit})"
                    ) from None
                raise _Scrape(
                    "oversize", f"over max_bytes ({limit}) and not read further"
                ) from None

    def _failed(self, state: _Color, kind: str, why: str) -> None:
        error = _cut(f"{kind}: {why}")
        self._fail(state, kind, error)
        if self.on_sample is not None:
            color = next(c for c, s in self.colors.items() if s is state)
            self.on_sample(color, {"outcome": kind, "error": error})

    def _fail(self, state: _Color, kind: str, error: str) -> None:
        self.errors[kind] += 1
        state.error = error
        self._set_problem()

    def _set_problem(self) -> None:
        failing = [f"{c}: {s.error}" for c, s in self.colors.items() if s.error is not None]
        self.problem = "; ".join(failing) if failing else None
