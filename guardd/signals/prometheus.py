"""The `prometheus` signal: one PromQL instant query per color, its single sample.

Every `every` seconds each color's query (the template with `{color}` and `{instance}`
replaced) is sent as `GET {url}/api/v1/query?query=...`, one at a time per color, each
within `timeout` for the whole exchange. The answer must be one sample: an instant vector
of exactly one series, or a scalar. Every query ends in one outcome of `OUTCOMES`:

- `ok`: one finite sample; the color's value until the next query;
- `empty`: an empty vector (the series does not exist, or no rate yet): no value;
- `many`: more than one series: no value, and the labels of the first few are the problem;
- `nan`: NaN or ±Inf (0/0 when there was no traffic): no value;
- `promql`: Prometheus refused the query (`status: error`; its `error` text is the problem);
- `http`: another non-2xx answer;
- `timeout`: no whole answer within `timeout`;
- `unreachable`: no connection, or it broke (Prometheus down);
- `too_large`: the answer is longer than `MAX_ANSWER_BYTES` (read no further);
- `invalid`: not JSON, not Prometheus' shape, a matrix or string, or compressed unasked.

Only `ok` gives a value; the others make the color's reading inconclusive. All but `ok`,
`empty` and `nan` (answers that are well-formed but carry no value) set `problem` while
they last. `Reading.last_at` is the time of the last `ok` (or the signal's start), so the
rules' `stale_after` counts from the last value whatever came after it.

Each query's outcome is also a sample payload, a small JSON object handed to `on_sample`
(the daemon records it) and read back by `apply_sample` (replay): `{"outcome": "ok",
"value": v}` or `{"outcome": <another of OUTCOMES>, "error": why}` (why redacted, or null).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import httpx
from anyio.abc import TaskStatus

from guardd._version import __version__
from guardd.clock import Clock
from guardd.core.signals import Reading
from guardd.core.types import COLORS
from guardd.secrets import Secret, redact
from guardd.signals._http import BodyRefused, read_capped

#: What became of a query (the keys of `status()["queries"]`).
OUTCOMES: Final = (
    "ok",
    "empty",
    "many",
    "nan",
    "promql",
    "http",
    "timeout",
    "unreachable",
    "too_large",
    "invalid",
)
#: Outcomes that are an answer without a value, not a fault of the source.
_NO_VALUE: Final = frozenset({"ok", "empty", "nan"})
#: An instant query of one sample answers in a few hundred bytes; far more is not read.
MAX_ANSWER_BYTES: Final = 1024 * 1024
#: Evidence and problems are cut to this many characters.
MAX_TEXT: Final = 200
#: The series of a `many` answer whose labels the problem names.
NAMED_SERIES: Final = 3


@dataclass(frozen=True, slots=True)
class PrometheusSpec:
    """What one `prometheus` signal asks and how.

    `url`: the server's base URL (`http://127.0.0.1:9090`, optionally with a path prefix).
    `query`: the PromQL template; `{color}` and `{instance}` are replaced, nothing else (the
    other braces are PromQL's own). `instance`: the guard's instance name. `every`,
    `timeout`: seconds. ValueError(`key: reason`) at construction for an impossible value.
    """

    url: str
    query: str
    instance: str
    every: float = 10.0
    timeout: float = 2.0

    def __post_init__(self) -> None:
        try:
            parsed = httpx.URL(self.url)
        except (httpx.InvalidURL, TypeError) as e:
            raise ValueError(f"url: {e}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("url: must be an http:// or https:// URL")
        if not self.query.strip():
            raise ValueError("query: must not be empty")
        for key in ("every", "timeout"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{key}: must be a positive number of seconds")

    def query_for(self, color: str) -> str:
        """The query sent for `color`: the template with its two placeholders replaced."""
        return self.query.replace("{color}", color).replace("{instance}", self.instance)

    @property
    def endpoint(self) -> str:
        """`{url}/api/v1/query`, the path appended to any prefix the URL has."""
        return self.url.rstrip("/") + "/api/v1/query"


class QueryFailed(Exception):
    """A query that gave no value: `outcome` (one of `OUTCOMES`) and why, in words."""

    def __init__(self, outcome: str, why: str) -> None:
        super().__init__(why)
        self.outcome = outcome
        self.why = why


def _text(text: str) -> str:
    """`text` on one line, redacted, cut to `MAX_TEXT` characters."""
    text = redact(" ".join(text.split()))
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _labels(series: object) -> str:
    """`name{a="1",b="2"}` of one result series, as PromQL writes it (`{}` when it has no
    label or is malformed)."""
    metric = series.get("metric") if isinstance(series, dict) else None
    if not isinstance(metric, dict):
        return "{}"
    labels = ",".join(
        f"{k}={json.dumps(str(v))}" for k, v in sorted(metric.items()) if k != "__name__"
    )
    return f"{metric.get('__name__', '')}{{{labels}}}"


def _sample(pair: object) -> float:
    """The value of a `[timestamp, "value"]` pair; QueryFailed(`nan`/`invalid`)."""
    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str)):
        raise QueryFailed("invalid", 'a sample is not [timestamp, "value"]')
    try:
        value = float(pair[1])
    except ValueError:
        raise QueryFailed("invalid", f"a sample's value {pair[1][:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise QueryFailed("nan", f"the value is {pair[1][:10]}")
    return value


def parse_answer(body: bytes) -> float:
    """The one value of a successful `/api/v1/query` answer `body`.

    Raises QueryFailed: `promql` (`status: error`, with Prometheus' `error` text), `empty`,
    `many` (naming the labels of the first `NAMED_SERIES` series), `nan`, `invalid`.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        # RecursionError: a body of `[[[[...` nests deeper than the parser goes.
        raise QueryFailed("invalid", "the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise QueryFailed("invalid", "the answer is not a JSON object")
    if doc.get("status") == "error":
        why = doc.get("error")
        kind = doc.get("errorType")
        text = f"{kind}: {why}" if isinstance(kind, str) and kind else str(why)
        raise QueryFailed("promql", _text(f"Prometheus refused the query: {text}"))
    data = doc.get("data")
    if doc.get("status") != "success" or not isinstance(data, dict):
        raise QueryFailed("invalid", "the answer is neither success nor error")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _sample(result)
    if kind != "vector":
        raise QueryFailed("invalid", _text(f"the result is a {kind}, not a vector or a scalar"))
    if not isinstance(result, list):
        raise QueryFailed("invalid", "the vector is not a list")
    if not result:
        raise QueryFailed("empty", "the query matched no series")
    if len(result) > 1:
        named = ", ".join(_labels(s) for s in result[:NAMED_SERIES])
        more = ", ..." if len(result) > NAMED_SERIES else ""
        raise QueryFailed(
            "many", _text(f"{len(result)} series where one is expected: {named}{more}")
        )
    series = result[0]
    if not isinstance(series, dict):
        raise QueryFailed("invalid", "a series is not an object")
    return _sample(series.get("value"))


@dataclass(slots=True)
class _Color:
    """What the last query of one color said."""

    query: str
    outcome: str | None = None
    value: float | None = None
    #: Monotonic time of the last `ok` answer, None before the first.
    value_at: float | None = None
    #: Monotonic time the last query ended.
    answered_at: float | None = None
    #: Why the last query gave no value (None after `ok`).
    why: str | None = None


class PrometheusSignal:
    """Asks Prometheus one instant query per color every `every` seconds.

    `run()` queries until cancelled; `reading(color, now)` is what the rules read (no I/O).
    `queries[outcome]` counts every query by its outcome (monotonic totals).
    """

    #: A fault makes only its own color's reading inconclusive (the adapter does that), so
    #: the guard keeps reading the other color while `problem` is set.
    blind_on_problem = False

    def __init__(
        self,
        name: str,
        spec: PrometheusSpec,
        clock: Clock,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.clock = clock
        self._transport = transport
        self._started = clock.monotonic()
        self.colors: dict[str, _Color] = {c: _Color(spec.query_for(c)) for c in COLORS}
        self.queries: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        #: Why a color's query gives no answer right now (unreachable, several series, a
        #: PromQL error, ...), else None; an empty or NaN answer is not a problem.
        self.problem: str | None = None
        url = httpx.URL(spec.url)
        if url.password:
            Secret(url.password)  # registered: redact() now scrubs it wherever it shows
        # Shown in status: credentials in the URL are not.
        self.shown_url = str(url.copy_with(username=None, password=None))
        #: Called with (color, payload) as each query's outcome lands (see the module's
        #: docstring); the daemon sets it to record the samples. None: nobody listens.
        self.on_sample: Callable[[str, dict[str, Any]], None] | None = None

    # ---- what the rules read ------------------------------------------------------------

    def _why_not(self) -> str | None:
        """Why the source cannot be read right now (the same for both colors said once)."""
        found = {c: s.why for c, s in self.colors.items() if s.why and s.outcome not in _NO_VALUE}
        if not found:
            return None
        if len(found) == len(self.colors) and len(set(found.values())) == 1:
            return next(iter(found.values()))  # the source itself, not one color's query
        return "; ".join(f"{c}: {why}" for c, why in found.items())

    def reading(self, color: str, now: float) -> Reading | None:
        """The value of `color`'s last query, if it gave one and is not older than two
        rounds; None for a color it does not know. No I/O."""
        state = self.colors.get(color)
        if state is None:
            return None
        value = state.value
        fresh = 2 * self.spec.every + self.spec.timeout
        if state.outcome != "ok" or state.value_at is None or now - state.value_at > fresh:
            value = None
        return Reading(
            samples=0 if value is None else 1,
            window_s=self.spec.every,
            stats={"value": value},
            last_at=self._started if state.value_at is None else state.value_at,
            detail={"query": _text(state.query), "value": value},
        )

    def status(self) -> dict[str, Any]:
        """The source, the counts of query outcomes and each color's last one (no secret)."""
        return {
            "kind": "prometheus",
            "url": redact(self.shown_url),
            "state": f"querying every {self.spec.every:g}s",
            "every_s": self.spec.every,
            "problem": self.problem,
            "queries": dict(self.queries),
            "last": {
                color: {
                    "outcome": s.outcome,
                    "error": s.why,
                    "age_s": None
                    if s.answered_at is None
                    else round(self.clock.monotonic() - s.answered_at, 3),
                }
                for color, s in self.colors.items()
            },
        }

    # ---- querying ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Query each color every `every` seconds until cancelled; never raises for what
        Prometheus answers."""
        async with (
            httpx.AsyncClient(
                headers={
                    "Accept": "application/json",
                    # The answer is read raw and bounded (`_read_capped`).
                    "Accept-Encoding": "identity",
                    "User-Agent": f"guardd/{__version__}",
                },
                timeout=httpx.Timeout(self.spec.timeout),
                follow_redirects=False,
                limits=httpx.Limits(max_connections=len(COLORS)),
                transport=self._transport,
                # Prometheus is a named server, not the internet: no proxy from the environment.
                trust_env=False,
            ) as client,
            anyio.create_task_group() as tg,
        ):
            for color in self.colors:
                tg.start_soon(self._loop, client, color)
            task_status.started()

    async def _loop(self, client: httpx.AsyncClient, color: str) -> None:
        state = self.colors[color]
        while True:
            began = self.clock.monotonic()
            # One query at a time per color: the next one waits for this one to end.
            await self.query_once(client, state)
            await anyio.sleep(max(0.0, began + self.spec.every - self.clock.monotonic()))

    async def query_once(self, client: httpx.AsyncClient, state: _Color) -> None:
        """Send `state`'s query once and record its outcome."""
        data: dict[str, Any]
        try:
            value = await self._ask(client, state.query)
        except QueryFailed as e:
            data = {"outcome": e.outcome, "error": e.why}
        else:
            data = {"outcome": "ok", "value": value}
        self._land(state, data, self.clock.monotonic())
        if self.on_sample is not None:
            color = next(c for c, s in self.colors.items() if s is state)
            self.on_sample(color, data)

    def apply_sample(self, color: str, data: dict[str, Any], now: float) -> None:
        """Take one payload of `on_sample` as if its query had ended at monotonic `now`.

        A color this signal does not query is ignored. Raises ValueError (the reason) for
        a payload that is not one this adapter emits.
        """
        outcome = data.get("outcome")
        if outcome not in self.queries:
            raise ValueError(f"outcome: {str(outcome)[:40]!r} is not one of {', '.join(OUTCOMES)}")
        if outcome == "ok":
            value = data.get("value")
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError("value: an ok sample needs a finite number")
            data = {"outcome": "ok", "value": float(value)}
        else:
            why = data.get("error")
            if why is not None and not isinstance(why, str):
                raise ValueError("error: must be a text or null")
            data = {"outcome": outcome, "error": None if why is None else _text(why)}
        state = self.colors.get(color)
        if state is not None:
            self._land(state, data, now)

    def _land(self, state: _Color, data: dict[str, Any], now: float) -> None:
        """One query's outcome `data` (a sample payload), ended at monotonic `now`."""
        outcome = data["outcome"]
        if outcome == "ok":
            state.value, state.value_at, state.why = data["value"], now, None
        else:
            state.why = data.get("error")
        state.outcome = outcome
        state.answered_at = now
        self.queries[outcome] += 1
        self.problem = self._why_not()

    async def _ask(self, client: httpx.AsyncClient, query: str) -> float:
        timeout = self.spec.timeout
        try:
            # httpx's timeout bounds each read; this bounds the whole exchange.
            with anyio.fail_after(timeout):
                async with client.stream(
                    "GET", self.spec.endpoint, params={"query": query}
                ) as response:
                    body = await _read_capped(response)
        except QueryFailed:
            raise
        except (TimeoutError, httpx.TimeoutException):
            raise QueryFailed("timeout", f"no answer within {timeout:g}s") from None
        except (httpx.RequestError, OSError) as e:
            # httpx may quote the URL in its messages: only a redacted text goes on.
            why = _text(f"{type(e).__name__}: {e}") if str(e) else type(e).__name__
            raise QueryFailed("unreachable", why) from None
        if response.status_code != 200:
            try:
                parse_answer(body)  # Prometheus' own errors come with 400, 422, 503
            except QueryFailed as e:
                if e.outcome == "promql":
                    raise
            raise QueryFailed("http", f"HTTP {response.status_code}")
        return parse_answer(body)


async def _read_capped(response: httpx.Response) -> bytes:
    """The answer's body; QueryFailed: `too_large` past `MAX_ANSWER_BYTES` (read no further),
    `invalid` when compressed (guardd asks for identity; a compressed one could be a bomb)."""
    try:
        return await read_capped(response, MAX_ANSWER_BYTES)
    except BodyRefused as e:
        if e.why == "compressed":
            raise QueryFailed("invalid", _text(f"a {e.coding} answer, not asked for")) from None
        if e.declared is not None:
            raise QueryFailed(
                "too_large", f"an answer of {e.declared} bytes (at most {MAX_ANSWER_BYTES})"
            ) from None
        raise QueryFailed("too_large", f"an answer longer than {MAX_ANSWER_BYTES} bytes") from None
