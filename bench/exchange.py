"""CPU per probe exchange in one process: guardd's prober beside bare loops, same nginx.

    uv run --frozen python -m bench.exchange [--probes 2000] [--rounds 2]

Each loop GETs one nginx endpoint `--probes` times on a fresh connection each time
(`Connection: close`, as guardd probes by default) and reads the whole answer; the CPU
time of this process (user + system: the kernel's side of connect and close counts) is
divided by the probes. The loops run in turn, `--rounds` times, and each one's median
is printed:

- `guardd`: `HttpProber.probe` with `expect_json`, what the daemon calls each round;
- `asyncio-streams`: `asyncio.open_connection`, write, `readuntil`, `read` (the floor of
  a prober on asyncio's streams);
- `anyio-connect_tcp`: `anyio.connect_tcp` and `aclose` only, no request (the connection
  alone, as guardd opened it before it dialled address literals itself);
- `socket-anyio-wait`: a non-blocking socket waited on with `anyio.wait_writable` /
  `anyio.wait_readable`, what guardd's prober now dials an address literal with.

Nothing is asserted; the figures move with the machine's load, the ratios less.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import anyio

from bench.nginx import AppServer
from guardd.probes.http import HttpProber, ProbeSpec

Loop = Callable[[str, int], Awaitable[None]]


def _request(url: str) -> bytes:
    parts = urlsplit(url)
    return (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
    ).encode()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


async def guardd(url: str, n: int) -> None:
    """guardd's own prober, one URL, judged as the daemon judges it."""
    prober = HttpProber([url], ProbeSpec(timeout=2.0, expect_json={"status": "UP"}))
    try:
        for _ in range(n):
            result = await prober.probe()
            if not result.ok:
                raise RuntimeError(f"probe failed: {result.error}")
    finally:
        await prober.aclose()


async def asyncio_streams(url: str, n: int) -> None:
    """asyncio's streams, the answer read to its end."""
    parts = urlsplit(url)
    request = _request(url)
    for _ in range(n):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()
        writer.close()


async def anyio_connect_tcp(url: str, n: int) -> None:
    """`anyio.connect_tcp` and `aclose`: the connection alone."""
    host, port = _address(url)
    for _ in range(n):
        stream = await anyio.connect_tcp(host, port)
        await stream.aclose()


async def socket_anyio_wait(url: str, n: int) -> None:
    """A non-blocking socket and anyio's readiness waits, the answer read to its end."""
    address = _address(url)
    request = _request(url)
    for _ in range(n):
        with socket.socket() as sock:
            sock.setblocking(False)
            try:
                sock.connect(address)
            except BlockingIOError:
                await anyio.wait_writable(sock)
            sock.send(request)
            while True:
                try:
                    if not sock.recv(65536):
                        break
                except BlockingIOError:
                    await anyio.wait_readable(sock)


LOOPS: dict[str, Loop] = {
    "guardd": guardd,
    "asyncio-streams": asyncio_streams,
    "anyio-connect_tcp": anyio_connect_tcp,
    "socket-anyio-wait": socket_anyio_wait,
}


def cpu_per_probe_us(loop: Loop, url: str, n: int) -> float:
    """This process's CPU time per probe of `loop` (µs)."""
    started = time.process_time()
    anyio.run(loop, url, n)
    return (time.process_time() - started) / n * 1e6


def main() -> int:
    """Print each loop's CPU per probe (µs), median of the rounds."""
    parser = argparse.ArgumentParser(prog="python -m bench.exchange", description=__doc__)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="guardd-bench-exchange-") as tmp:
        app = AppServer(Path(tmp), {"sblue": "blue"})
        app.start()
        try:
            url = app.url("sblue")
            taken: dict[str, list[float]] = {name: [] for name in LOOPS}
            for _ in range(args.rounds):
                for name, loop in LOOPS.items():
                    taken[name].append(cpu_per_probe_us(loop, url, args.probes))
        finally:
            app.stop()
    floor = statistics.median(taken["asyncio-streams"])
    for name, values in taken.items():
        us = statistics.median(values)
        print(f"{name:20} {us:8.0f} µs CPU per probe  ({us / floor:.2f} x asyncio-streams)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
