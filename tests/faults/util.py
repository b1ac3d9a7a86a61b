"""What the fault tests measure: a daemon's memory and fds, its metrics, its journal on disk."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from guardd.control import client
from tests.harness.daemon import Daemon, Lab, log_lines, wait_until


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors a process holds."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def metrics_port(d: Daemon, timeout: float = 20) -> int:
    """The port the daemon's metrics endpoint bound (the config asks for port 0)."""

    def find() -> int | None:
        for line in log_lines(d):
            if line.get("event") == "metrics_listening":
                return int(line["port"])
        return None

    return int(wait_until(find, timeout, "the metrics_listening log line"))


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def status(lab: Lab, timeout: float = 10) -> dict[str, Any]:
    """`status` over the control socket, in-process (fast; guardctl is tested elsewhere)."""
    return client.call(lab.socket_path, "status", timeout=timeout)


def guardctl_json(lab: Lab, *argv: str) -> Any:
    """The real guardctl with `--json`, parsed (an object, or `history`'s list)."""
    from tests.harness.daemon import guardctl  # noqa: PLC0415 - keeps the import list short

    result = guardctl("--config", str(lab.config_path), *argv, "--json")
    return json.loads(result.stdout)


def journal_raw_lines(path: Path) -> list[str]:
    """The journal's lines exactly as on disk (the last one may lack its newline)."""
    return path.read_bytes().decode("utf-8", "replace").split("\n")


def assert_journal_well_formed(path: Path) -> list[dict[str, Any]]:
    """Every line parses as a JSON event and the file ends with a newline; the events."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} ends in a torn line: {data[-200:]!r}"
    events = []
    for n, line in enumerate(data.split(b"\n")[:-1], 1):
        assert line.strip(), f"{path}:{n}: an empty line"
        doc = json.loads(line)  # raises on a torn or garbled line
        assert isinstance(doc, dict) and doc.get("event"), f"{path}:{n}: not an event: {line!r}"
        events.append(doc)
    return events


def nginx_accepts(lab: Lab) -> bool:
    """Whether `nginx -t` accepts the configuration the active link makes."""
    return (
        subprocess.run(
            lab.nginx.test_command, capture_output=True, check=False, timeout=30
        ).returncode
        == 0
    )


def color_of_link(lab: Lab) -> str | None:
    """The color whose target file the active link resolves to."""
    resolved = lab.nginx.active_link.resolve()
    for color, target in lab.nginx.targets.items():
        if target.resolve() == resolved:
            return color
    return None


def status_lines(lab: Lab) -> list[str]:
    """Every STATUS= the daemon sent over sd_notify."""
    assert lab.notify is not None
    return [m for m in lab.notify.lines() if m.startswith("STATUS=")]


class FaultLab(Lab):
    """A `Lab` whose green may be probed at a hostile URL, with extra TOML appended.

    nginx still proxies to the real green app; only guardd's probe of green moves.
    """

    def __init__(
        self,
        tmp: Path,
        *,
        green_probe_url: str | None = None,
        extra_toml: str = "",
        **overrides: Any,
    ) -> None:
        self.green_probe_url = green_probe_url
        self.extra_toml = extra_toml
        super().__init__(tmp, **overrides)

    def config_text(self) -> str:
        """The lab's TOML, green's probe URL replaced when one is set."""
        text = super().config_text()
        if self.green_probe_url is not None:
            text = text.replace(f'url = "{self.green.url}"', f'url = "{self.green_probe_url}"')
        return text + self.extra_toml


class MakeFaultLab(Protocol):
    """The faults `make_lab` fixture: a `FaultLab` in the test's tmp dir, torn down after.

    Takes `FaultLab`'s keywords: `green_probe_url`, `extra_toml` and those of `Lab`.
    """

    def __call__(self, **overrides: Any) -> FaultLab: ...


def figure(name: str, **values: object) -> None:
    """Record a measured figure in `$GUARDD_FAULT_FIGURES` (JSON lines) when it is set.

    The fault tests assert their bounds; the figures are what they saw, for the
    reliability table.
    """
    target = os.environ.get("GUARDD_FAULT_FIGURES")
    if target:
        with Path(target).open("a") as f:
            f.write(json.dumps({"figure": name, **values}, default=str) + "\n")
