"""The access-log signal fed by a real nginx with guardd's shipped log_format.

nginx spreads real requests over two real upstreams (round robin) and logs them with
`packaging/nginx/guardd-log-format.conf`, to a file or to guardd's syslog socket; what the
signal counts per color is compared with what the client received from each color.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from guardd.signals.access_log import AccessLogSignal, AccessLogSpec
from tests.harness.nginx import Nginx, free_port
from tests.harness.upstream import Upstream
from tests.signals.access_log_lib import running, until

pytestmark = [pytest.mark.nginx, pytest.mark.anyio]
PROJECT = Path(__file__).resolve().parents[2]
LOG_FORMAT = PROJECT / "packaging/nginx/guardd-log-format.conf"
REQUESTS = 3000
WORKERS = 4


class LoggingNginx(Nginx):
    """The harness's nginx, logging with guardd's format and balancing over both colors.

    `/` goes round robin to blue and green; `/retry` to a dead port first (given to green
    in the signal's addresses, so that guessing from the first address would be wrong),
    then on to blue.
    """

    def __init__(self, tmp: Path, blue: Upstream, green: Upstream, access_log: str) -> None:
        super().__init__(tmp, {"blue": blue, "green": green})
        self.access_log = access_log
        self.dead_port = free_port()
        self.reopen_command = ["reopen" if arg == "reload" else arg for arg in self.reload_command]

    def _render(self, temp_paths: str) -> str:
        base = super()._render(temp_paths)
        head, _, _ = base.partition("http {")
        blue, green = self.upstreams["blue"].port, self.upstreams["green"].port
        return f"""{head.replace("worker_processes 1;", "worker_processes 2;")}http {{
    include {LOG_FORMAT};
    access_log {self.access_log} guardd;
{temp_paths}
    upstream both {{
        server 127.0.0.1:{blue};
        server 127.0.0.1:{green};
    }}
    upstream retry {{
        server 127.0.0.1:{self.dead_port} max_fails=0;
        server 127.0.0.1:{blue};
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://both;
            proxy_next_upstream off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location /retry {{
            proxy_pass http://retry;
            proxy_next_upstream error;
        }}
    }}
}}
"""

    def reopen(self) -> None:
        """`nginx -s reopen`, as logrotate's postrotate runs it."""
        subprocess.run(self.reopen_command, check=True, capture_output=True, timeout=30)


class Client:
    """A small asyncio client: what each color answered, by the X-Color it sent back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.colors: Counter[str] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()

    @property
    def answered(self) -> int:
        return sum(self.colors.values())

    async def send(self, n: int, path: str = "/") -> None:
        """`n` GETs of `path` over `WORKERS` kept-alive connections."""
        left = n

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                answer = await client.get(path)
                color = answer.headers.get("X-Color", "none")
                self.colors[color] += 1
                self.statuses[color, answer.status_code] += 1

        limits = httpx.Limits(max_connections=WORKERS)
        async with (
            httpx.AsyncClient(base_url=self.url, limits=limits, timeout=10.0) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(WORKERS):
                tg.start_soon(worker, client)


def counted(signal: AccessLogSignal, color: str, cls: str | None = None) -> int:
    return sum(n for (c, k), n in signal.requests.items() if c == color and cls in (None, k))


def within_one_percent(got: int, sent: int) -> bool:
    """Counted within 1 % of what was sent, and never more (nothing counted twice)."""
    return sent * 0.99 <= got <= sent


@pytest.fixture
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    with Upstream("blue") as blue, Upstream("green") as green:
        # Some errors, so that the classes are checked as well as the totals.
        green.set_mode("random_5xx", probability=0.1, seed=7)
        yield blue, green


def addresses(nginx: LoggingNginx) -> dict[str, tuple[str, ...]]:
    blue, green = nginx.upstreams["blue"].port, nginx.upstreams["green"].port
    return {
        "blue": (f"127.0.0.1:{blue}",),
        "green": (f"127.0.0.1:{green}", f"127.0.0.1:{nginx.dead_port}"),
    }


async def settle(signal: AccessLogSignal, client: Client) -> None:
    """Wait until the signal has counted what the client got, or as near as it will.

    A copytruncate may lose the few lines written between the copy and the truncation, so
    "done" is: at least 99 % counted, and then nothing more for half a second.
    """
    total = client.answered
    await until(
        lambda: sum(signal.lines.values()) >= total * 0.99,
        f"{total} lines",
        within=30,
        show=signal.status,
    )
    seen = (sum(signal.lines.values()), anyio.current_time())

    def quiet() -> bool:
        nonlocal seen
        now = sum(signal.lines.values())
        if now != seen[0]:
            seen = (now, anyio.current_time())
        return now >= total or anyio.current_time() - seen[1] > 0.5

    await until(quiet, "the count to settle", within=30, show=signal.status)


def assert_counts_match(signal: AccessLogSignal, client: Client, green: Upstream) -> None:
    assert client.colors.keys() == {"blue", "green"}, client.colors
    for color in ("blue", "green"):
        assert within_one_percent(counted(signal, color), client.colors[color]), (
            color,
            counted(signal, color),
            client.colors[color],
        )
    assert within_one_percent(counted(signal, "green", "5xx"), client.statuses["green", 503])
    assert client.statuses["green", 503] == green.counts["http_503"]
    assert signal.lines["unparsed"] == signal.lines["unattributed"] == 0
    assert signal.lines["oversize"] == signal.lines["shed"] == 0


@pytest.mark.parametrize("rotation", ["none", "rename_reopen", "copytruncate"])
async def test_file_counts_each_color_through_rotation(
    tmp_path: Path, upstreams: tuple[Upstream, Upstream], rotation: str
) -> None:
    blue, green = upstreams
    log = tmp_path / "access.log"
    nginx = LoggingNginx(tmp_path, blue, green, str(log))
    with nginx:
        spec = AccessLogSpec(source=f"file:{log}", addresses=addresses(nginx), poll_interval_s=0.1)
        async with running(spec) as signal:
            client = Client(f"http://127.0.0.1:{nginx.port}")
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, REQUESTS)
                await until(lambda: client.answered >= REQUESTS // 2, "half the traffic")
                if rotation == "rename_reopen":
                    log.rename(tmp_path / "access.log.1")
                    await anyio.to_thread.run_sync(nginx.reopen)
                elif rotation == "copytruncate":
                    await anyio.to_thread.run_sync(_copytruncate, log)
            assert client.answered == REQUESTS
            await settle(signal, client)
            if rotation == "rename_reopen":
                assert signal.rotations == 1
                assert log.stat().st_size > 0  # nginx really writes to the new file
            if rotation == "copytruncate":
                assert signal.truncations == 1
            assert_counts_match(signal, client, green)


def _copytruncate(log: Path) -> None:
    # What logrotate's copytruncate does: copy, then truncate in place.
    shutil.copyfile(log, log.with_suffix(".log.1"))
    with log.open("r+") as f:
        f.truncate(0)


async def test_retried_requests_are_the_color_that_answered(
    tmp_path: Path, upstreams: tuple[Upstream, Upstream]
) -> None:
    blue, green = upstreams
    log = tmp_path / "access.log"
    nginx = LoggingNginx(tmp_path, blue, green, str(log))
    with nginx:
        spec = AccessLogSpec(source=f"file:{log}", addresses=addresses(nginx), poll_interval_s=0.1)
        async with running(spec) as signal:
            client = Client(f"http://127.0.0.1:{nginx.port}")
            await client.send(200, "/retry")
            await settle(signal, client)
            assert client.colors == {"blue": 200}
            assert counted(signal, "blue", "2xx") == 200
            assert counted(signal, "green") == 0
            assert signal.lines["unattributed"] == signal.lines["unparsed"] == 0
    # The scenario really happened: nginx logged retries, dead address first.
    retried = [x for x in log.read_text().splitlines() if f":{nginx.dead_port}, " in x]
    assert len(retried) >= 50


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # A short path (unix sockets stop at 108 bytes) that nginx's workers can reach.
    where = Path(tempfile.mkdtemp(prefix="guardd-ngx-", dir="/tmp"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where)


async def test_syslog_socket_counts_match(
    tmp_path: Path, sock_dir: Path, upstreams: tuple[Upstream, Upstream]
) -> None:
    blue, green = upstreams
    sock = sock_dir / "web.access.sock"
    target = f"syslog:server=unix:{sock},nohostname"
    nginx = LoggingNginx(tmp_path, blue, green, target)
    with nginx:
        spec = AccessLogSpec(source=f"syslog:{sock}", addresses=addresses(nginx))
        async with running(spec) as signal:
            client = Client(f"http://127.0.0.1:{nginx.port}")
            await client.send(REQUESTS)
            await settle(signal, client)
            assert_counts_match(signal, client, green)
            reading = signal.reading("green", anyio.current_time())
            assert reading is not None
            assert reading.samples == counted(signal, "green")
            assert reading.stats["p50_ms"] is not None
