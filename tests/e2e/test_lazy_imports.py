"""A running guardd loads what its configuration uses, when it first uses it.

The daemon runs with `PYTHONPROFILEIMPORTTIME=1` (`python -X importtime`): the interpreter
writes one line per module it imports to stderr, which the harness keeps in the daemon's
log, so the test reads what the real process loaded, and when.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal

from guardd.control import client
from tests.harness.daemon import Daemon, Lab, MakeLab, log_lines, wait_until
from tests.harness.receiver import Receiver, serve

pytestmark = pytest.mark.nginx

IMPORT_LOG = {"PYTHONPROFILEIMPORTTIME": "1"}
# Loaded only by a configuration (or a moment) that needs them: the notification client,
# the retry library, the HTTP signals, the file-following signals, the demo; difflib only
# for an invalid config's suggestions; pydantic-settings (and dotenv) only when a
# `GUARDD_<SECTION>__<KEY>` variable is set.
LAZY = (
    "httpx",
    "httpcore",
    "certifi",
    "stamina",
    "tenacity",
    "guardd.notify",
    "guardd.signals.prometheus",
    "guardd.signals.scrape",
    "guardd.signals.access_log",
    "guardd.signals.log_match",
    "guardd.signals._tail",
    "guardd.core.traffic",
    "difflib",
    "guardd.demo",
    "aiohttp",
    "pydantic_settings",
    "dotenv",
)


def imported(d: Daemon) -> set[str]:
    """Every module the daemon imported so far, from its `-X importtime` lines."""
    names = set()
    for line in d.log().splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def loaded(d: Daemon) -> list[str]:
    """The LAZY modules (or their submodules) the daemon imported so far."""
    names = imported(d)
    assert "guardd.supervisor" in names, "no import log: is PYTHONPROFILEIMPORTTIME honoured?"
    return sorted(m for m in LAZY if any(n == m or n.startswith(f"{m}.") for n in names))


def at_work(lab: Lab) -> None:
    """Wait for a few probe rounds of each color and answer one control command."""
    wait_until(
        lambda: all(
            u["samples"] >= 3 for u in client.call(lab.socket_path, "status")["upstreams"].values()
        ),
        30,
        "three probes of each color",
    )


def test_a_plain_http_guard_loads_no_http_client_and_no_retry_library(
    make_lab: MakeLab,
) -> None:
    lab = make_lab()
    d = lab.daemon(env=IMPORT_LOG)
    # Started (its nginx check passed at once), probing, answering status.
    at_work(lab)
    assert loaded(d) == []


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A Slack-like webhook receiver (answers 200) served from a background event loop."""
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(serve()) as rec:
        yield rec


def test_a_slack_sink_loads_its_http_client_at_the_first_delivery(make_lab: MakeLab) -> None:
    with receiver() as rec:
        lab = make_lab()
        sink = '\n[[notify]]\nkind = "slack"\nurl_env = "GUARDD_TEST_HOOK"\nevents = ["rollback"]\n'
        lab.config_path.write_text(lab.config_text() + sink)
        d = lab.daemon(env={**IMPORT_LOG, "GUARDD_TEST_HOOK": rec.url})
        at_work(lab)
        # The sink is configured, but nothing has been sent: no client yet.
        assert "guardd.notify" in loaded(d)
        assert [m for m in loaded(d) if m in ("httpx", "httpcore", "certifi")] == []
        lab.green.set_mode("http_503")
        d.wait_event("rollback_completed")
        wait_until(lambda: rec.requests, 30, "the rollback's notification")
        message = rec.requests[0].json()
        assert message["blocks"] and "blue" in message["text"], message
        assert {"httpx", "httpcore", "stamina"} <= set(loaded(d))


def test_a_reload_that_fails_once_loads_stamina_and_retries_through_structlog(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab()
    # nginx's own reload behind a first attempt that fails: the switch must retry it.
    failed_once = tmp_path / "failed-once"
    reload = tmp_path / "reload-fails-once.sh"
    reload.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{failed_once}" ]; then touch "{failed_once}"; echo busy >&2; exit 1; fi\n'
        f"exec {shlex.join(lab.nginx.reload_command)}\n"
    )
    reload.chmod(0o755)
    lab.write_config(switch__reload_command=[str(reload)])
    d = lab.daemon(env=IMPORT_LOG)
    at_work(lab)
    assert "stamina" not in loaded(d)
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=30)
    assert failed_once.exists()
    assert "stamina" in loaded(d)
    # stamina's hook is structlog's (the daemon's JSON log), never its Prometheus one.
    retries = [e for e in log_lines(d) if e.get("event") == "stamina.retry_scheduled"]
    assert len(retries) == 1, retries
    assert retries[0]["retry_num"] == 1
