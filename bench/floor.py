"""The floors of a Python prober: the least any prober built on these parts can cost.

    python -m bench.floor httpx|asyncio INTERVAL URL [URL...]

GETs the URLs in turn, one every INTERVAL seconds, until SIGTERM, and parses each
JSON body. `httpx`: one reused httpx.AsyncClient, the client guardd probes with.
`asyncio`: one kept-alive connection per URL driven by asyncio streams and a
hand-written HTTP/1.1 exchange (plain http only), under `asyncio.timeout`. guardd's
own cost per probe is its client's floor plus its window, policy, metrics and state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

UA = {"httpx": "httpx-floor", "asyncio": "asyncio-floor"}


def _httpx_getter(client: httpx.AsyncClient) -> Callable[[str], Awaitable[None]]:
    async def get(url: str) -> None:
        response = await client.get(url)
        response.raise_for_status()
        response.json()

    return get


def _asyncio_getter() -> Callable[[str], Awaitable[None]]:
    conns: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def get(url: str) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        request = (
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"User-Agent: {UA['asyncio']}\r\n\r\n"
        ).encode()
        async with asyncio.timeout(2.0):
            if url not in conns:
                conns[url] = await asyncio.open_connection(host, port)
            reader, writer = conns[url]
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError):
                del conns[url]
                writer.close()
                raise
        if not head.startswith(b"HTTP/1.1 2"):
            raise ValueError(head.split(b"\r\n", 1)[0].decode())
        json.loads(body)

    return get


async def main(kind: str, interval: float, urls: list[str]) -> None:
    """Probe until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with httpx.AsyncClient(
        timeout=2.0, headers={"User-Agent": UA["httpx"]}, trust_env=False
    ) as client:
        get = _httpx_getter(client) if kind == "httpx" else _asyncio_getter()
        next_at = loop.time()
        i = 0
        while not stop.is_set():
            try:
                await get(urls[i % len(urls)])
            except (httpx.HTTPError, OSError, TimeoutError, ValueError) as e:
                print(f"probe failed: {e!r}", file=sys.stderr)
            i += 1
            next_at += interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3:]))
