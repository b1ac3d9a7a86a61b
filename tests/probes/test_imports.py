"""A guard loads what its configuration needs: plain-HTTP probes never load httpx."""

from __future__ import annotations

import subprocess
import sys

from tests.harness.hostile import Hostile

PROBE_AND_LIST = """
import sys
import anyio
import guardd.supervisor
from guardd.probes.http import HttpProber, ProbeSpec

async def main() -> None:
    prober = HttpProber([sys.argv[1]], ProbeSpec(timeout=5, expect_json={"status": "UP"}))
    result = await prober.probe()
    assert result.ok, result.error
    await prober.aclose()

anyio.run(main)
print(" ".join(sorted(m for m in ("httpx", "httpcore", "aiohttp", "guardd.notify",
      "guardd.signals.prometheus", "guardd.signals.scrape", "guardd.demo") if m in sys.modules)))
"""


def test_a_plain_http_probe_loads_no_http_client_library() -> None:
    with Hostile("ok") as server:
        out = subprocess.run(
            [sys.executable, "-c", PROBE_AND_LIST, server.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert server.requests == 1
    assert out.stdout.split() == [], out.stdout
