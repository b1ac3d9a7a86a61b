"""HTTP probes with httpx: one client per color, a hard deadline, a bounded body.

The deadline covers the whole exchange (connect, headers and body), so a server that
accepts and never answers, or dribbles its body a byte a second, costs at most
`timeout`. Redirects are not followed unless configured.
"""

from __future__ import annotations

import functools
import json
import ssl
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx

from guardd.core.types import Outcome
from guardd.secrets import redact

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


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe round of a color."""

    outcome: Outcome
    latency_s: float
    error: str | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        """Whether every expectation held."""
        return self.outcome is Outcome.OK


def _status_ok(spec: ProbeSpec, status: int) -> bool:
    if isinstance(spec.expect_status, str):
        return 200 <= status < 300
    return status in spec.expect_status


def _json_matches(expected: Mapping[str, Any], actual: object) -> bool:
    # A subset match: every expected key must be present with an equal (or matching) value.
    if not isinstance(actual, dict):
        return False
    for key, want in expected.items():
        if key not in actual:
            return False
        got = actual[key]
        if isinstance(want, Mapping):
            if not _json_matches(want, got):
                return False
        elif got != want:
            return False
    return True


def _ssl_context(spec: ProbeSpec) -> ssl.SSLContext | bool:
    if not spec.verify_tls:
        return False
    return _verifying_context(None if spec.ca_file is None else str(spec.ca_file))


@functools.cache
def _verifying_context(ca_file: str | None) -> ssl.SSLContext:
    # One context per trust store for the whole process: loading a CA bundle costs
    # megabytes and milliseconds, and every client (each color, the verifier) needs one.
    # Without ca_file, the system's store (Debian's ca-certificates) is trusted.
    return ssl.create_default_context(cafile=ca_file)


class HttpProber:
    """Probes one color's URLs, each with its own reused client, and applies the quorum.

    A client per URL keeps each connection pool tiny: httpx scans its whole pool on every
    request, so one client holding a hundred connections made a round quadratic.
    """

    def __init__(
        self,
        urls: Sequence[str],
        spec: ProbeSpec,
        *,
        quorum: Quorum = "all",
        transport: httpx.AsyncBaseTransport | None = None,
        max_concurrency: int = 10,
    ) -> None:
        if not urls:
            raise ValueError("a prober needs at least one URL")
        self.urls = list(urls)
        self.spec = spec
        self.quorum = quorum
        self._limit = anyio.CapacityLimiter(max(1, min(max_concurrency, len(self.urls))))
        verify = _ssl_context(spec)
        self._clients = {
            url: httpx.AsyncClient(
                headers=dict(spec.headers),
                timeout=httpx.Timeout(spec.timeout),
                follow_redirects=spec.follow_redirects,
                verify=verify,
                limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
                transport=transport,
                trust_env=False,
            )
            for url in dict.fromkeys(self.urls)
        }

    async def aclose(self) -> None:
        """Close the client and its pooled connections."""
        for client in self._clients.values():
            await client.aclose()

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
        """Probe one URL under the hard deadline."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.spec.timeout):
                outcome, error, status = await self._exchange(url)
        except TimeoutError:
            outcome, error, status = (
                Outcome.TIMEOUT,
                f"no answer within {self.spec.timeout:g}s",
                None,
            )
        except httpx.TimeoutException:
            outcome, error, status = (
                Outcome.TIMEOUT,
                f"no answer within {self.spec.timeout:g}s",
                None,
            )
        except httpx.TooManyRedirects:
            outcome, error, status = Outcome.HTTP_OTHER, "too many redirects", None
        except (httpx.TransportError, ssl.SSLError, OSError) as e:
            outcome, error, status = Outcome.CONNECT_ERROR, _describe(e), None
        return ProbeResult(outcome, time.perf_counter() - started, error, status)

    async def _exchange(self, url: str) -> tuple[Outcome, str | None, int | None]:
        async with self._clients[url].stream("GET", url) as response:
            status = response.status_code
            if not _status_ok(self.spec, status):
                await response.aclose()
                kind = Outcome.HTTP_5XX if status >= 500 else Outcome.HTTP_OTHER
                return kind, f"HTTP {status}", status
            body = bytearray()
            too_big = False
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.spec.max_body_bytes:
                    too_big = True
                    break
        if self.spec.expect_json is None:
            return Outcome.OK, None, status
        if too_big:
            return (
                Outcome.BODY_MISMATCH,
                f"body larger than max_body_bytes={self.spec.max_body_bytes}",
                status,
            )
        try:
            doc = json.loads(bytes(body))
        except (UnicodeDecodeError, ValueError):
            return Outcome.BODY_MISMATCH, "body is not JSON", status
        if not _json_matches(self.spec.expect_json, doc):
            return Outcome.BODY_MISMATCH, f"body does not match expect_json: {_clip(doc)}", status
        return Outcome.OK, None, status


def _clip(doc: object, limit: int = 120) -> str:
    text = json.dumps(doc, separators=(",", ":"), default=str)
    return redact(text if len(text) <= limit else text[: limit - 1] + "…")


def _describe(e: BaseException) -> str:
    # httpx messages can embed the URL; redact in case it carries a credential.
    text = str(e) or type(e).__name__
    return redact(f"{type(e).__name__}: {text}")[:200]
