"""A real Prometheus server on loopback, scraping the targets a test names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import httpx

Series = dict[str, Any]
Predicate = Callable[[list[Series]], bool]

PROMETHEUS = "prometheus"
PROMTOOL = "promtool"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.2


def ensure_prometheus() -> tuple[str, str]:
    """Return the paths of prometheus and promtool, installing Debian's package if missing."""
    found = shutil.which(PROMETHEUS), shutil.which(PROMTOOL)
    if None not in found:
        return str(found[0]), str(found[1])
    apt_get = shutil.which("apt-get")
    if apt_get is None or os.geteuid() != 0:
        raise RuntimeError(
            "prometheus/promtool not on PATH and cannot install them here: "
            "run `apt-get install --no-install-recommends prometheus` as root"
        )
    # The package's maintainer scripts may try to start the system service; outside systemd,
    # invoke-rc.d and /usr/sbin/policy-rc.d keep that from happening.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        [apt_get, "update"],
        [apt_get, "install", "-y", "--no-install-recommends", "prometheus"],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    found = shutil.which(PROMETHEUS), shutil.which(PROMTOOL)
    if None in found:
        raise RuntimeError("installed Debian's prometheus, yet prometheus/promtool are missing")
    return str(found[0]), str(found[1])


def _free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """Runs /usr/bin/prometheus against `targets` (job "guardd") with a throwaway TSDB.

    `rule_files` are loaded and evaluated every `scrape_interval`; `target_labels` are added
    to every target, as the `guard` label is in packaging/prometheus/scrape.yml.
    """

    def __init__(
        self,
        targets: list[str],
        tmp: Path,
        scrape_interval: str = "1s",
        *,
        rule_files: Sequence[Path] = (),
        target_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.targets = targets
        self.target_labels = dict(target_labels or {})
        self.dir = tmp
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.config_path = tmp / "prometheus.yml"
        self.log_path = tmp / "prometheus.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        """The base URL of the running server's HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusServer:
        prometheus, _ = ensure_prometheus()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._client = httpx.Client(timeout=10.0)
        try:
            # The port is picked before Prometheus binds it, so another process may win the
            # race; try again on a new port rather than fail the test.
            for _attempt in range(3):
                self.port = _free_port()
                self._start(prometheus)
                if self._wait_ready():
                    return self
                self._stop()
                if "address already in use" not in self.log():
                    break
        except BaseException:
            self.close()
            raise
        log = self.log()
        self.close()
        raise RuntimeError(f"prometheus did not become ready; its log:\n{log[-4000:]}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and release the HTTP client; safe to call twice."""
        self._stop()
        if self._client is not None:
            self._client.close()
            self._client = None

    def stop(self) -> None:
        """Stop the server as an outage would; `restart` brings it back (same port, TSDB)."""
        self._stop()

    def restart(self) -> None:
        """Start the stopped server again on its port, with its TSDB; wait until ready."""
        prometheus, _ = ensure_prometheus()
        self._start(prometheus)
        if not self._wait_ready():
            raise RuntimeError(f"prometheus did not come back; its log:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """Return what Prometheus logged so far, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def query(self, promql: str) -> list[Series]:
        """Evaluate an instant query now; return the result vector."""
        assert self._client is not None, "PrometheusServer is not running"
        response = self._client.get(f"{self.url}/api/v1/query", params={"query": promql})
        return _vector(promql, response)

    def wait_for_query(
        self, promql: str, predicate: Predicate, timeout: float = 30.0
    ) -> list[Series]:
        """Re-run `promql` until `predicate` accepts its result; fail with the evidence if not."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(self._timeout_report(promql, result, timeout))
            time.sleep(POLL_INTERVAL)

    async def query_async(self, promql: str) -> list[Series]:
        """Like `query`, without blocking an event loop that also runs the code under test."""
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(f"{self.url}/api/v1/query", params={"query": promql})
        return _vector(promql, response)

    async def wait_for_query_async(
        self,
        promql: str,
        predicate: Predicate,
        # Not anyio.fail_after: on timeout the report shows the last result and the targets.
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> list[Series]:
        """Like `wait_for_query`, without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            result = await self.query_async(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(self._timeout_report(promql, result, timeout))
            await anyio.sleep(POLL_INTERVAL)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path> and return its `data`, e.g. api("rules", type="alert")."""
        assert self._client is not None, "PrometheusServer is not running"
        response = self._client.get(f"{self.url}/api/v1/{path}", params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"/api/v1/{path} failed: {response.status_code} {body}")
        return body["data"]

    def targets_health(self) -> list[dict[str, Any]]:
        """Return the active targets with their health and last scrape error."""
        return [
            {k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "labels")}
            for t in self.api("targets")["activeTargets"]
        ]

    def _write_config(self) -> None:
        # JSON is YAML, and needs no YAML library in the test environment.
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": "guardd",
                    # guardd labels its own series with `guard`; keep them as they are.
                    "honor_labels": True,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": self.targets, "labels": self.target_labels}],
                }
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def _start(self, prometheus: str) -> None:
        argv = [
            prometheus,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=info",
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _wait_ready(self) -> bool:
        """Poll /-/ready until it answers 200; False if the process died first."""
        assert self._process is not None
        assert self._client is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                if self._client.get(f"{self.url}/-/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(POLL_INTERVAL)
        return False

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _timeout_report(self, promql: str, result: list[Series], timeout: float) -> str:
        try:
            targets: object = self.targets_health()
        except (httpx.HTTPError, AssertionError) as e:
            targets = f"unavailable: {e!r}"
        return (
            f"{promql!r} did not satisfy the predicate within {timeout}s.\n"
            f"last result: {result}\ntargets: {targets}\nprometheus log tail:\n"
            f"{self.log()[-2000:]}"
        )


def _vector(promql: str, response: httpx.Response) -> list[Series]:
    """Unpack an instant-query answer, which must be a vector."""
    body = response.json()
    if response.status_code != 200 or body.get("status") != "success":
        raise AssertionError(f"query {promql!r} failed: {response.status_code} {body}")
    data = body["data"]
    if data["resultType"] != "vector":
        raise AssertionError(f"query {promql!r} returned a {data['resultType']}, not a vector")
    result: list[Series] = data["result"]
    return result
