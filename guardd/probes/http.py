"""HTTP probes: one GET on a fresh connection, a hard deadline, a bounded body.

The deadline covers the whole exchange (connect, TLS handshake, headers and body), so a
server that accepts and never answers, or dribbles its body a byte a second, costs at
most `timeout`. Redirects are not followed unless configured. Every probe opens a fresh
connection: an upstream that no longer accepts connections must not pass on one it
accepted long ago. The exchange itself is `guardd.probes.wire` (h11 over anyio streams,
TLS by the standard `ssl` module, imported only for https); bodies are decoded by
`guardd.probes.body`, bounded before and after decoding; whatever the upstream sends
becomes an outcome. An injected httpx transport (tests: `guardd.testing.MockProber`)
replaces the wire with httpx, through the same judging code.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urljoin

import anyio

from guardd.core.types import Outcome
from guardd.probes import wire
from guardd.probes.body import BodyDecoder, json_mismatch, parse_json, raw_limit, summarize
from guardd.secrets import redact

if TYPE_CHECKING:
    import ssl

    import httpx

Quorum = Literal["all", "any", "majority"]


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """What a probe sends and what it expects back."""

    timeout: float = 2.0
    expect_status: str | Sequence[int] = "2xx"
    expect_json: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    max_body_bytes: int = 65536
    follow_redirects: bool = False
    verify_tls: bool = True
    ca_file: Path | None = None
    keepalive: bool = False


# The most of a failing answer's body read for its summary in `last_error`.
SUMMARY_BODY_BYTES = 16384
# Redirects followed at most, with `follow_redirects` (httpx's own default).
MAX_REDIRECTS = 20


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe round of a color."""

    outcome: Outcome
    latency_s: float
    error: str | None = None
    status: int | None = None
    #: The value of the answer's `named_by` header (`HttpProber`), None when the prober
    #: keeps none or the answer had none: which color answered, as the front door says.
    served_by: str | None = None

    @property
    def ok(self) -> bool:
        """Whether every expectation held."""
        return self.outcome is Outcome.OK


def _status_ok(spec: ProbeSpec, status: int) -> bool:
    if isinstance(spec.expect_status, str):
        return 200 <= status < 300
    return status in spec.expect_status


def _ssl_context(spec: ProbeSpec) -> ssl.SSLContext | bool:
    if not spec.verify_tls:
        return False
    return _verifying_context(None if spec.ca_file is None else str(spec.ca_file))


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    import ssl  # noqa: PLC0415  (only a config with https probes pays for it)

    # verify_tls = false: encrypt, but accept any certificate and name.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_context(spec: ProbeSpec) -> ssl.SSLContext:
    if not spec.verify_tls:
        return _unverified_context()
    return _verifying_context(None if spec.ca_file is None else str(spec.ca_file))


class _Answer(Protocol):
    """What the judging code needs of an answer: httpx's Response or the wire's."""

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@functools.cache
def _verifying_context(ca_file: str | None) -> ssl.SSLContext:
    # One context per trust store for the whole process: loading a CA bundle costs
    # megabytes and milliseconds, and every client (each color, the verifier) needs one.
    # Without ca_file, the system's store (Debian's ca-certificates) is trusted.
    import ssl  # noqa: PLC0415  (only a config with https probes pays for it)

    return ssl.create_default_context(cafile=ca_file)


class HttpProber:
    """Probes one color's URLs, each on a fresh connection, and applies the quorum.

    `connector` is the seam that opens connections (`guardd.probes.wire.Connector`); an
    httpx `transport` replaces the wire altogether (one client per URL, as before).
    `probe` and `probe_url` never raise for anything an upstream does.
    """

    def __init__(
        self,
        urls: Sequence[str],
        spec: ProbeSpec,
        *,
        quorum: Quorum = "all",
        transport: httpx.AsyncBaseTransport | None = None,
        max_concurrency: int = 10,
        named_by: str | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a prober needs at least one URL")
        self.urls = list(urls)
        self.spec = spec
        # The header whose value each answer's result keeps (`ProbeResult.served_by`), as
        # the wire's headers are looked up: in lower case.
        self.named_by = None if named_by is None else named_by.lower()
        self.quorum = quorum
        self._limit = anyio.CapacityLimiter(max(1, min(max_concurrency, len(self.urls))))
        # The operator's header names are sent as written; the two guardd sets are
        # looked up without regard to case.
        headers = dict(spec.headers)
        named = {k.lower() for k in headers}
        if "accept-encoding" not in named:
            # guardd decodes bodies itself, bounded; asking for identity spares the work.
            headers["Accept-Encoding"] = "identity"
        if not spec.keepalive:
            headers = {k: v for k, v in headers.items() if k.lower() != "connection"}
            headers["Connection"] = "close"
        self._clients: dict[str, httpx.AsyncClient] | None = None
        if transport is not None:
            self._clients = _httpx_clients(self.urls, spec, headers, transport)
        # The wire sends what httpx sent by default, the operator's headers after.
        sent = {"accept": "*/*", "user-agent": "guardd"}
        self._headers = [(k, v) for k, v in sent.items() if k not in named] + list(headers.items())
        # The seam that opens a connection (`wire.Connector`): tests may replace it.
        self.connector: wire.Connector = wire.connect
        self._targets: dict[str, wire.Target] = {}
        # keepalive = true: one idle connection per URL between probes.
        self._idle: dict[str, wire.Idle] = {}

    async def aclose(self) -> None:
        """Close the clients of an injected transport and any kept-alive connection."""
        for client in (self._clients or {}).values():
            await client.aclose()
        idle, self._idle = self._idle, {}
        for kept in idle.values():
            await kept.stream.aclose()

    async def probe(self) -> ProbeResult:
        """One round: every URL once, judged by the quorum."""
        if len(self.urls) == 1:
            return await self.probe_url(self.urls[0])
        results: list[ProbeResult] = [ProbeResult(Outcome.TIMEOUT, 0.0)] * len(self.urls)

        async def one(i: int, url: str) -> None:
            async with self._limit:
                results[i] = await self.probe_url(url)

        async with anyio.create_task_group() as tg:
            for i, url in enumerate(self.urls):
                tg.start_soon(one, i, url)
        return self._judge(results)

    def _judge(self, results: list[ProbeResult]) -> ProbeResult:
        passed = sum(r.ok for r in results)
        n = len(results)
        need = {"all": n, "any": 1, "majority": n // 2 + 1}[self.quorum]
        latency = max(r.latency_s for r in results)
        if passed >= need:
            return ProbeResult(Outcome.OK, latency)
        failures = [r for r in results if not r.ok]
        worst = Counter(r.outcome for r in failures).most_common(1)[0][0]
        first = next(r for r in failures if r.outcome is worst)
        return ProbeResult(
            worst,
            latency,
            f"{passed}/{n} passed (quorum {self.quorum}); {first.error}",
            first.status,
        )

    async def probe_url(self, url: str) -> ProbeResult:
        """Probe one URL under the hard deadline; every failure is an outcome, not a raise."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.spec.timeout) as scope:
                # A failing answer's body is read for its summary only until shortly before
                # the deadline, so a dribbling 503 still reads as a 503. (From the scope's
                # deadline: asking the clock again costs a look-up of the running loop.)
                summary_by = scope.deadline - self.spec.timeout * 0.2
                outcome, error, status, named = await self._exchange(url, summary_by)
                return ProbeResult(outcome, time.perf_counter() - started, error, status, named)
        except TimeoutError:
            outcome, error, status = _timed_out(self.spec)
        except wire.ProtocolError as e:
            outcome, error, status = Outcome.CONNECT_ERROR, _describe(e, url), None
        except OSError as e:  # ssl.SSLError is an OSError (and a certificate's, a ValueError)
            outcome, error, status = Outcome.CONNECT_ERROR, _describe(e, url), None
        except wire.RequestError as e:
            # Headers it cannot send: guardd's own words, which quote no header value.
            outcome, error, status = Outcome.CONNECT_ERROR, str(e), None
        except ValueError as e:
            # A URL the wire cannot dial.
            outcome, error, status = Outcome.CONNECT_ERROR, redact(str(e))[:200], None
        except Exception as e:
            httpx = _loaded("httpx")
            if httpx is None or not isinstance(e, httpx.HTTPError):
                raise
            outcome, error, status = _httpx_outcome(e, url, self.spec)
        return ProbeResult(outcome, time.perf_counter() - started, error, status)

    async def _exchange(
        self, url: str, summary_by: float
    ) -> tuple[Outcome, str | None, int | None, str | None]:
        """The judged answer to a GET of `url`, and the value of its `named_by` header."""
        # Redirects are followed here, each redirect's body unread: a client that follows
        # them itself (httpx) reads each one whole, without a bound.
        for _ in range(MAX_REDIRECTS + 1):
            response, status, location = await self._send(url)
            try:
                if self.spec.follow_redirects and location is not None:
                    url = location
                    continue
                named = None if self.named_by is None else _header(response, self.named_by)
                judged = (*await self._judge_answer(response, status, summary_by), named)
                if self.spec.keepalive and isinstance(response, wire.Response):
                    kept = response.keep()
                    if kept is not None:
                        self._idle[url] = kept
                        response = None
                return judged
            finally:
                if response is not None:
                    await response.aclose()
        return Outcome.HTTP_OTHER, "too many redirects", None, None

    async def _send(self, url: str) -> tuple[Any, int, str | None]:
        """The answer to a GET of `url`, its status and the redirect's absolute URL."""
        if self._clients is not None:
            client = self._clients.get(url) or next(iter(self._clients.values()))
            response = await client.send(
                client.build_request("GET", url), stream=True, follow_redirects=False
            )
            following = response.next_request
            moved = None if following is None else str(following.url)
            return response, response.status_code, moved
        target = self._targets.get(url)
        if target is None:
            target = wire.Target(url)
            if len(self._targets) < 4 * len(self.urls):  # redirect targets: a few, not all
                self._targets[url] = target
        tls = _tls_context(self.spec) if target.scheme == "https" else None
        answer = await wire.get(
            target,
            self._headers,
            tls=tls,
            connector=self.connector,
            idle=self._idle.pop(url, None),
        )
        location = answer.headers.get("location")
        if answer.status not in wire.REDIRECTS or not location:
            return answer, answer.status, None
        return answer, answer.status, urljoin(url, location)

    async def _judge_answer(
        self, response: _Answer, status: int, summary_by: float
    ) -> tuple[Outcome, str | None, int | None]:
        spec = self.spec
        encoding = _header(response, "content-encoding")
        if not _status_ok(spec, status):
            kind = Outcome.HTTP_5XX if status >= 500 else Outcome.HTTP_OTHER
            summary = await _read_summary(
                response, encoding, min(spec.max_body_bytes, SUMMARY_BODY_BYTES), summary_by
            )
            if summary and summary.startswith(f"{status} "):
                # An error page titled as its status (nginx's `502 Bad Gateway`): said once.
                summary = summary[len(f"{status} ") :]
            error = f"HTTP {status}" + (f" {summary}" if summary else "")
            return kind, error, status
        if spec.expect_json is None:
            # Only the status is judged: read (a bounded part of) the body as sent, so
            # a broken transfer still shows, but do not decode it.
            await _drain(response, raw_limit(spec.max_body_bytes))
            return Outcome.OK, None, status
        decoder = BodyDecoder(encoding, spec.max_body_bytes)
        await _read_into(response, decoder)
        if decoder.error is not None:
            return Outcome.BODY_MISMATCH, decoder.error, status
        if decoder.too_big:
            return (
                Outcome.BODY_MISMATCH,
                f"body larger than max_body_bytes={spec.max_body_bytes}",
                status,
            )
        doc, not_json = parse_json(bytes(decoder.body))
        if not_json is not None:
            return Outcome.BODY_MISMATCH, not_json, status
        why = json_mismatch(spec.expect_json, doc)
        if why is not None:
            return Outcome.BODY_MISMATCH, f"body does not match expect_json: {why}", status
        return Outcome.OK, None, status


def _header(response: _Answer, name: str) -> str | None:
    headers: Any = getattr(response, "headers", {})
    value = headers.get(name)
    return None if value is None else str(value)


def _timed_out(spec: ProbeSpec) -> tuple[Outcome, str | None, int | None]:
    return Outcome.TIMEOUT, f"no answer within {spec.timeout:g}s", None


def _httpx_outcome(
    e: Exception, url: str, spec: ProbeSpec
) -> tuple[Outcome, str | None, int | None]:
    """What an injected httpx transport's error means."""
    import httpx  # noqa: PLC0415  (only an injected transport needs it)

    if isinstance(e, httpx.TimeoutException):
        return _timed_out(spec)
    if isinstance(e, httpx.TooManyRedirects):
        return Outcome.HTTP_OTHER, "too many redirects", None
    if isinstance(e, httpx.DecodingError):
        # guardd decodes bodies itself; this is a defence should httpx ever try.
        return Outcome.BODY_MISMATCH, _describe(e, url), None
    if isinstance(e, httpx.TransportError):
        return Outcome.CONNECT_ERROR, _describe(e, url), None
    raise e


def _httpx_clients(
    urls: Sequence[str],
    spec: ProbeSpec,
    headers: dict[str, str],
    transport: httpx.AsyncBaseTransport,
) -> dict[str, httpx.AsyncClient]:
    import httpx  # noqa: PLC0415  (only an injected transport needs it)

    return {
        url: httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(spec.timeout),
            verify=_ssl_context(spec),
            limits=httpx.Limits(
                max_connections=2, max_keepalive_connections=1 if spec.keepalive else 0
            ),
            transport=transport,
            trust_env=False,
        )
        for url in dict.fromkeys(urls)
    }


async def _read_into(response: _Answer, decoder: BodyDecoder) -> None:
    # aiter_raw: the bytes as sent; httpx's own decoders expand a chunk without a bound.
    async for chunk in response.aiter_raw():
        decoder.feed(chunk)
        if decoder.done:
            return
    decoder.finish()


async def _drain(response: _Answer, limit: int) -> None:
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read > limit:
            return


async def _read_summary(
    response: _Answer, encoding: str | None, limit: int, deadline: float
) -> str | None:
    """A summary of a failing answer's body; a body that cannot be read gives none."""
    decoder = BodyDecoder(encoding, limit)
    # The status already tells the story; a broken or slow body adds nothing to it.
    with (
        anyio.CancelScope(deadline=deadline) as scope,
        contextlib.suppress(*_read_errors()),
    ):
        await _read_into(response, decoder)
    if decoder.error is not None or (scope.cancelled_caught and not decoder.body):
        return None
    return summarize(bytes(decoder.body[:limit]))


def _loaded(name: str) -> Any:
    """Module `name` if it is imported and done importing, else None; never imports it.

    Another thread may be importing it right now (httpx, at a notification sink's first
    delivery): a module still importing may lack the very names asked for, and nothing of
    it can have raised here yet (`__spec__._initializing`, set by the import system while
    the module runs).
    """
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def _read_errors() -> tuple[type[BaseException], ...]:
    httpx = _loaded("httpx")
    return (OSError, wire.ProtocolError) + (() if httpx is None else (httpx.TransportError,))


# What an errno means to an operator reading `last_error`.
_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connect timed out",
    errno.EPIPE: "connection closed by peer",
    errno.ECONNABORTED: "connection aborted",
}


def _where(url: str) -> str:
    try:
        return wire.Target(url).where
    except (ValueError, TypeError):
        return "?"


def _describe(e: BaseException, url: str) -> str:
    """A failure in an operator's words: `connection refused (127.0.0.1:9011)`."""
    where = _where(url)
    chain: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text: str | None = None
    # ssl and httpx are looked up, not imported: a config without https probes (or a
    # prober without an injected transport) never loads them, and then none is theirs.
    ssl = _loaded("ssl")
    httpx = _loaded("httpx")
    for cause in chain:
        if ssl is not None and isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or "verification failed"
            text = f"TLS certificate rejected ({where}): {reason}"
        elif ssl is not None and isinstance(cause, ssl.SSLError):
            reason = (cause.reason or str(cause)).replace("_", " ").lower()
            text = f"TLS handshake failed ({where}): {reason}"
        elif isinstance(cause, socket.gaierror):
            host = where.rsplit(":", 1)[0]
            text = f"DNS lookup failed ({host}): {cause.strerror or cause}"
        elif isinstance(cause, OSError) and cause.errno is not None:
            said = _ERRNO_TEXT.get(cause.errno) or os.strerror(cause.errno).lower()
            text = f"{said} ({where})"
        if text is not None:
            break
    if text is None:
        if httpx is not None and isinstance(e, httpx.LocalProtocolError):
            # What guardd was about to send was refused: h11's reason quotes the header
            # (an `Authorization` value), so none of it is kept.
            text = f"cannot send this request ({where}): a header name or value is not valid HTTP"
        elif isinstance(e, wire.ProtocolError) or (
            httpx is not None and isinstance(e, httpx.RemoteProtocolError)
        ):
            detail = str(e).rstrip(".") or "malformed answer"
            text = f"protocol error ({where}): {detail[:1].lower() + detail[1:]}"
        elif httpx is not None and isinstance(e, httpx.DecodingError):
            text = f"body does not decode ({where}): {e}"
        else:
            detail = str(e) or type(e).__name__
            text = f"{type(e).__name__} ({where}): {detail}"
    # httpx messages can embed the URL; redact in case it carries a credential.
    return redact(text)[:200]
