"""SIGHUP applies every section it can, with a real daemon, a real nginx and real receivers.

A changed `switch.verify_url` verifies the next rollback; a changed `[[notify]]` delivers the
next events to the new sink; `metrics.listen` moves; and `config_reloaded` names exactly the
keys that wait for a restart, which keep their running values meanwhile. A file that
cannot be applied is refused whole, the previous config running on.
"""

from __future__ import annotations

import gzip
import json
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from guardd.control import client
from tests.faults.util import guardctl_json, status
from tests.harness.daemon import Daemon, Lab, MakeLab, wait_until
from tests.harness.nginx import free_port
from tests.harness.receiver import Receiver, Reply, serve

pytestmark = pytest.mark.nginx
UP = Reply(200, {"Content-Type": "application/json"}, b'{"status": "UP"}')


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A real HTTP receiver answering `{"status": "UP"}`, served from a background loop."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve(default=UP)) as rec,
    ):
        yield rec


def write(lab: Lab, notify_env: str | None = None, **overrides: object) -> None:
    """The lab's config with overrides, and a webhook sink whose URL is in `notify_env`."""
    lab.overrides.update(overrides)
    text = lab.config_text()
    if notify_env is not None:
        text += (
            f'\n[[notify]]\nkind = "webhook"\nurl_env = "{notify_env}"\n'
            'events = ["rollback", "config_reloaded"]\n'
        )
    lab.config_path.write_text(text)


def reload(d: Daemon, lab: Lab) -> dict[str, Any]:
    """SIGHUP, and the config_reloaded event it produced."""
    seen = len(d.events())
    d.signal(signal.SIGHUP)
    return d.wait_event("config_reloaded", after=seen)


def requests_to(rec: Receiver, event: str) -> list[dict[str, Any]]:
    out = []
    for r in list(rec.requests):
        body = r.json()
        if body.get("event") == event:
            out.append(body)
    return out


def test_a_changed_verify_url_verifies_the_next_rollback(make_lab: MakeLab) -> None:
    with receiver() as front:
        lab: Lab = make_lab()
        d = lab.daemon()
        event = reload_with(d, lab, switch__verify_url=front.url)
        lab.green.set_mode("http_503")
        done = d.wait_event("rollback_completed")
        # The verifier probed the new URL, on fresh connections, until it passed 3 times.
        assert len(front.requests) >= 3, done
        assert all(r.headers.get("connection") == "close" for r in front.requests)
        assert event["changed"] == ["switch.verify_url"]
        assert event["restart_required"] == []
        assert d.stop() == 0


def test_the_front_door_watched_follows_verify_url_across_reloads(make_lab: MakeLab) -> None:
    with receiver() as front:
        lab: Lab = make_lab()
        d = lab.daemon()
        reload_with(d, lab, switch__verify_url=front.url)
        # The new front door is probed all the time, not only after a switch.
        wait_until(lambda: len(front.requests) >= 5, 30, "the new front door probed")
        wait_until(
            lambda: (status(lab)["front_door"] or {}).get("healthy") is True,
            30,
            "the new front door healthy",
        )
        reload_with(d, lab, switch__verify_url=None)
        wait_until(lambda: status(lab)["front_door"] is None, 30, "no front door watched")
        asked = len(front.requests)
        reload_with(d, lab, switch__verify_url=front.url)
        wait_until(lambda: len(front.requests) >= asked + 3, 30, "watched again")
        # The old verifier, closed by the reloads, never surfaced as an error or a mismatch.
        trouble = [e for e in d.events() if e["event"] in ("alert", "hold")]
        assert trouble == []
        assert status(lab)["warnings"] == []
        assert d.stop() == 0


def reload_with(
    d: Daemon, lab: Lab, notify_env: str | None = None, **overrides: object
) -> dict[str, Any]:
    write(lab, notify_env, **overrides)
    return reload(d, lab)


def test_a_changed_notify_sink_gets_the_next_events(make_lab: MakeLab) -> None:
    with receiver() as first, receiver() as second:
        lab: Lab = make_lab()
        write(lab, "HOOK_FIRST")
        env = {"HOOK_FIRST": first.url, "HOOK_SECOND": second.url}
        d = lab.daemon(env=env)
        event = reload_with(d, lab, "HOOK_FIRST", policy__consecutive_failures=4)
        wait_until(lambda: requests_to(first, "config_reloaded"), 30, "the first sink to hear")

        event = reload_with(d, lab, "HOOK_SECOND")
        # The config_reloaded that announces the change already goes to the new sink.
        wait_until(
            lambda: [b for b in requests_to(second, "config_reloaded") if b["id"] == event["id"]],
            30,
            "config_reloaded at the second sink",
        )
        lab.green.set_mode("http_503")
        done = d.wait_event("rollback_completed")
        wait_until(
            lambda: [b for b in requests_to(second, "rollback_completed") if b["id"] == done["id"]],
            30,
            "rollback_completed at the second sink",
        )
        assert requests_to(first, "rollback_completed") == []
        assert event["id"] not in [b["id"] for b in requests_to(first, "config_reloaded")]
        assert event["changed"] == ["notify"]
        assert d.stop() == 0


def test_config_reloaded_names_the_keys_that_wait_for_a_restart(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    same = reload(d, lab)
    assert same["changed"] == []
    assert same["restart_required"] == []
    assert same["reason"] == "configuration reloaded"

    elsewhere: Path = lab.tmp / "state-elsewhere"
    port = free_port()
    client.call(lab.socket_path, "qos_lock", {"for_s": 600, "reason": "freeze"}, timeout=10)
    event = reload_with(
        d,
        lab,
        state__dir=str(elsewhere),
        control__mode="0600",
        metrics__listen=f"127.0.0.1:{port}",
        probe__timeout="900ms",
        qos__lock_file=str(lab.tmp / "elsewhere.lock"),
    )
    assert event["changed"] == [
        "control.mode", "metrics.listen", "probe.timeout", "qos.lock_file", "state.dir",
    ]  # fmt: skip
    assert event["restart_required"] == ["control.mode", "qos.lock_file", "state.dir"]
    assert event["reason"] == (
        "configuration reloaded; the changes to control.mode, qos.lock_file, state.dir take "
        "effect at the next restart"
    )
    # The lock held stays held, where it was.
    assert status(lab)["qos"]["locked"] is True
    assert lab.lock_file.exists() and not (lab.tmp / "elsewhere.lock").exists()
    # Applied: the metrics endpoint moved. Not applied: the journal is where it was.
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'guardd_build_info{guard="lab"' in text
    assert not elsewhere.exists()
    assert json.loads(d.journal_path.read_text().splitlines()[-1])["event"] == "config_reloaded"
    assert oct(lab.socket_path.stat().st_mode & 0o777) == "0o666"
    # Until the next start, status says so (the journal's event scrolls away).
    pending = (
        "config: control.mode, qos.lock_file, state.dir changed in the file and take effect "
        "at the next start (systemctl restart)"
    )
    assert pending in status(lab)["warnings"]
    # Another reload still says so; the file put back as at the start, not.
    reload_with(d, lab, probe__timeout="800ms")
    assert pending in status(lab)["warnings"]
    for key in ("state__dir", "control__mode", "qos__lock_file"):
        del lab.overrides[key]
    reload_with(d, lab)
    assert [w for w in status(lab)["warnings"] if w.startswith("config:")] == []
    assert d.stop() == 0


def test_a_header_value_with_a_newline_is_refused_and_never_shown(make_lab: MakeLab) -> None:
    # A token pasted with its newline: h11 cannot send it, and its reason quotes it. The
    # reload is refused like any invalid file, and the token is shown nowhere.
    secret = "SEKRET-reload-qzxw"  # noqa: S105 - a fake, to prove it is hidden
    sink = '\n[[notify]]\nkind = "webhook"\nurl_env = "HOOK"\nevents = ["alert", "rollback"]\n'
    with receiver() as hook:
        lab: Lab = make_lab()
        lab.config_path.write_text(lab.config_text() + sink)
        d = lab.daemon(env={"HOOK": hook.url})
        seen = len(d.events())
        lab.overrides["probe__headers"] = {"Authorization": f"Bearer {secret}\n"}
        lab.config_path.write_text(lab.config_text() + sink)
        d.signal(signal.SIGHUP)
        refused = d.wait_event(
            "alert", after=seen, where=lambda e: "reload rejected" in (e.get("reason") or "")
        )
        assert refused["reason"] == (
            f"reload rejected, still running the previous config: {lab.config_path}: "
            "probe.headers.Authorization: the value must not contain CR, LF or other control "
            "characters"
        )
        wait_until(
            lambda: [b for b in requests_to(hook, "alert") if b["id"] == refused["id"]],
            30,
            "the refusal at the sink",
        )
        # The previous config still probes both colors: a failing green is rolled back to
        # blue (under the refused one, every probe of both would fail to be sent).
        lab.green.set_mode("http_503")
        d.wait_event("rollback_completed", after=seen)
        assert [e for e in d.events()[seen:] if e["event"] == "config_reloaded"] == []
        surfaces = {
            "log": d.log(),
            "journal": d.raw_journal(),
            "status": json.dumps(status(lab)),
            "history": json.dumps(guardctl_json(lab, "history")),
            "notifications": json.dumps([r.json() for r in list(hook.requests)]),
        }
        assert d.stop() == 0
    for path in lab.state_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".gz":  # the observations, each probe round's error with them
                data = gzip.decompress(data)
            surfaces[str(path)] = data.decode("utf-8", "replace")
    assert any(path.endswith("state.json") for path in surfaces)
    for where, text in surfaces.items():
        assert "SEKRET" not in text and "qzxw" not in text, f"the token leaked into {where}"


@pytest.mark.parametrize("mistake", ["misspelt", "swapped"])
def test_a_reload_is_checked_on_this_host_as_check_config_checks_it(
    make_lab: MakeLab, mistake: str
) -> None:
    # Valid files that only this host can tell are wrong. A typo in a target's path,
    # applied, would first fail at the next rollback's `nginx -t`; two targets swapped
    # would pass it, and every switch would then serve the color it moved away from.
    lab: Lab = make_lab()
    d = lab.daemon()
    seen = len(d.events())
    blue, green = (str(lab.nginx.targets[c]) for c in ("blue", "green"))
    if mistake == "misspelt":
        wrong = blue.replace("blue.conf", "bleu.conf")
        assert wrong != blue
        text = lab.config_text().replace(blue, wrong)
        why = f"switch.targets.blue: {wrong}: no such file"
    else:
        text = lab.config_text().replace(blue, "@B@").replace(green, blue).replace("@B@", green)
        port = urlsplit(lab.green.url).port
        why = (
            f"switch.targets.blue: {green} proxies to 127.0.0.1:{port}, where upstreams.green "
            "is probed, and to no address of upstreams.blue: a switch to blue would serve green"
        )
    lab.config_path.write_text(text)
    d.signal(signal.SIGHUP)
    refused = d.wait_event(
        "alert", after=seen, where=lambda e: "reload rejected" in (e.get("reason") or "")
    )
    assert refused["reason"].startswith(
        f"reload rejected, still running the previous config: {lab.config_path}: {why}"
    ), refused
    # Status says it until a reload is taken, not only the journal's alert.
    (said,) = [w for w in status(lab)["warnings"] if w.startswith("config:")]
    assert "was rejected, and guardd still runs the config it had: " in said and why in said
    assert lab.notify is not None
    lab.notify.wait_for(lambda m: m.startswith("STATUS=") and "reload=rejected" in m)
    # The previous targets still switch: a failing green is rolled back to blue.
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed", after=seen)
    assert lab.nginx.wait_serving_only("blue")
    assert [e for e in d.events()[seen:] if e["event"] == "config_reloaded"] == []
    lab.write_config()  # the file as it was
    reload(d, lab)
    assert [w for w in status(lab)["warnings"] if w.startswith("config:")] == []
    assert d.stop() == 0


# A loopback address for a name server that takes every query and answers none.
SILENT_RESOLVER = "127.0.0.77"


def test_a_reload_waiting_on_the_resolver_stalls_no_probe_or_answer(make_lab: MakeLab) -> None:
    # The host checks of a reload resolve the names in the upstream files, as nginx would.
    # A resolver that does not answer must cost the reload its time, and nothing else: the
    # probes go on and guardd answers meanwhile.
    lab: Lab = make_lab()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((SILENT_RESOLVER, 53))
        resolv = lab.tmp / "resolv.conf"
        resolv.write_text(f"nameserver {SILENT_RESOLVER}\noptions timeout:8 attempts:1\n")
        # This guardd alone sees that resolv.conf: its own mount namespace.
        mount = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        d = lab.daemon(prefix=["unshare", "--mount", "--", "sh", "-c", mount, str(resolv)])
        blue = lab.nginx.targets["blue"]
        # A name under .test (RFC 2606): in no hosts file, so it goes to the resolver.
        blue.write_text(blue.read_text() + "upstream spare { server slow-lookup.guardd.test; }\n")
        assert lab.notify is not None
        seen, events = len(lab.notify.messages), len(d.events())
        d.signal(signal.SIGHUP)
        at_reload, reloading_at, _ = lab.notify.wait_for("RELOADING=1", after=seen)
        answers = 0
        while time.monotonic() - reloading_at < 3.0:
            doc = status(lab, timeout=2.0)  # a stalled event loop would not answer in time
            answers += 1
            for color in ("blue", "green"):
                assert doc["upstreams"][color]["last_probe_age_s"] < 1.0, doc["upstreams"]
        ready = [m for _, m in lab.notify.messages[at_reload:] if m.startswith("READY=1")]
        assert ready == [], "the reload was over before the probes were looked at"
        assert answers >= 3
        d.wait_event("config_reloaded", timeout=30, after=events)
    assert d.stop() == 0


def test_a_metrics_address_that_cannot_be_served_keeps_the_one_scraped(make_lab: MakeLab) -> None:
    # A port another process holds is a valid config: only the bind can tell. Prometheus
    # scrapes the old address until the new one works, and the journal says why.
    port = free_port()
    lab: Lab = make_lab(metrics__listen=f"127.0.0.1:{port}")
    d = lab.daemon()
    assert "guardd_build_info" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        seen = len(d.events())
        event = reload_with(d, lab, metrics__listen=busy)
        assert event["changed"] == ["metrics.listen"]
        said = d.wait_event("alert", after=seen, where=lambda e: "metrics.listen" in e["reason"])
        assert said["reason"].startswith(f"metrics.listen {busy} cannot be served ("), said
        assert said["reason"].endswith(f"/metrics stays on 127.0.0.1:{port}")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "guardd_build_info" in text
    assert d.stop() == 0
