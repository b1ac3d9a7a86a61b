"""A real guardd threads an incident in Slack across a restart, against a stand-in Web API."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.test_dashboard import TOKEN, slack_api
from tests.harness.daemon import Lab, MakeLab, guardctl, wait_until
from tests.harness.receiver import SlackWebApi

pytestmark = pytest.mark.nginx


def event_id(posted: dict[str, object]) -> str:
    """The journal event id a posted message names in its context block."""
    found = re.search(r"event `([^`]+)`", json.dumps(posted["blocks"]))
    assert found, posted
    return found[1]


def test_a_restart_between_the_rollback_and_the_release_still_threads(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    with slack_api() as rec:
        slack = rec.default
        assert isinstance(slack, SlackWebApi)
        # Long enough a guard window that the restart surely falls inside it.
        lab: Lab = make_lab(qos__window="8s")
        lab.config_path.write_text(
            lab.config_text()
            + '\n[[notify]]\nkind = "slack_api"\ntoken_env = "GUARDD_TEST_TOKEN"\n'
            f'channel = "#ops"\napi_url = "http://127.0.0.1:{rec.port}/api"\n'
            'events = ["rollback", "qos", "paused", "resumed"]\n'
        )
        env = {"GUARDD_TEST_TOKEN": TOKEN}
        d = lab.daemon(env=env)
        lab.green.set_mode("http_503")
        rollback = d.wait_event("rollback_completed")
        wait_until(lambda: slack.posted, 30, "the rollback's message")
        res = guardctl("--config", str(lab.config_path), "pause", "--reason", "looking into it")
        assert res.returncode == 0, res.stderr
        wait_until(lambda: len(slack.posted) >= 3, 30, "qos_locked and paused as replies")
        assert d.stop() == 0
        before = len(d.events())
        assert not any(e["event"] == "qos_released" for e in d.events())

        d2 = lab.daemon(env=env)
        res = guardctl("--config", str(lab.config_path), "resume")
        assert res.returncode == 0, res.stderr
        released = d2.wait_event("qos_released", after=before, timeout=60)
        wait_until(
            lambda: any(event_id(p) == released["id"] for p in slack.posted),
            30,
            "the release's reply",
        )
        status = guardctl("--config", str(lab.config_path), "status", "--json")
        assert status.returncode in (0, 1), status.stderr
        assert d2.stop() == 0
        journal = (lab.state_dir / "events.jsonl").read_text()
        log = d.log() + d2.log()

    first, *replies = slack.posted
    assert event_id(first) == rollback["id"]
    assert "thread_ts" not in first
    names = {e["id"]: e["event"] for e in d2.events()}
    threaded = [names[event_id(r)] for r in replies]
    # A restart slower than three probe intervals (a loaded machine) moves the guard
    # window on, journaled and threaded as any reply: where it belongs, or not at all.
    if "qos_extended" in threaded:
        assert threaded.index("qos_extended") == 2, threaded
        threaded.remove("qos_extended")
        [moved] = [e for e in d2.events() if e["event"] == "qos_extended"]
        assert "restart" in moved["reason"], moved
    assert threaded == ["qos_locked", "paused", "resumed", "qos_released"]
    # Every reply, a moved window's among them, in the rollback's thread.
    assert [r["thread_ts"] for r in replies] == [first["ts"]] * len(replies)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in rec.requests)
    # The token is used, never shown: not in the journal, the logs, or the status.
    for text in (journal, log, status.stdout, status.stderr):
        assert TOKEN not in text
    assert not (lab.state_dir / "outbox" / "thread-slack_api-0.json").exists()
