"""A switch that does not verify through the front door is undone, and the journal says why.

Real nginx, real upstreams, a real guardd: the switch target is made to lie (a reload
that does nothing, an upstream file that proxies elsewhere) and guardd must put the
previous target back, reload, and journal the failed step and the color really served.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.daemon import Daemon, Lab, MakeLab, guardctl, wait_until
from tests.harness.jsondoc import json_object
from tests.harness.nginx import free_port

pytestmark = pytest.mark.nginx

# Short enough that a verify that cannot pass gives up quickly (it gets half of it).
FAST = {"switch__timeout": "4s"}


def ctl(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    return guardctl("--config", str(lab.config_path), *argv)


def status(lab: Lab) -> dict[str, Any]:
    return json_object(ctl(lab, "status", "--json").stdout)


def link_color(lab: Lab) -> str | None:
    text = lab.nginx.active_link.readlink()
    return next((c for c, p in lab.nginx.targets.items() if Path(text) == p), None)


def point_at(lab: Lab, color: str, port: int) -> None:
    """Rewrite `color`'s upstream file so that it proxies to `port` (nginx -t still passes)."""
    lab.nginx.targets[color].write_text(f"upstream lab_app {{\n    server 127.0.0.1:{port};\n}}\n")


def assert_failed_verify(entry: dict[str, Any], serving: str | None) -> None:
    assert entry["step"] == "verify", entry
    assert entry["serving"] == serving, entry
    assert "verify failed:" in entry["reason"] and "answers passed" in entry["reason"], entry
    assert "timed out" not in entry["reason"], entry


def assert_undone_to_green(lab: Lab, d: Daemon, after: int) -> None:
    """Green is linked and alone served again, and an alert (past journal line `after`)
    says the verify failed with green serving."""
    assert link_color(lab) == "green"
    assert lab.nginx.wait_serving_only("green", hold=0.5, timeout=20)
    alert = d.wait_event("alert", after=after, where=lambda e: e.get("step") is not None)
    assert_failed_verify(alert, serving="green")


def force_a_failing_blue(lab: Lab, d: Daemon) -> int:
    """Make blue answer 503, force a switch to it and check guardctl says it was undone.

    Returns how many journal lines there were before the switch.
    """
    lab.blue.set_mode("http_503")
    count = len(d.events())
    result = ctl(lab, "switch", "blue", "--force")
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert "switch to blue failed at verify and was undone" in said, said
    return count


def test_rollback_with_a_reload_that_does_nothing_is_undone(make_lab: MakeLab) -> None:
    # reload_command = true: nginx keeps serving the failing green whatever the link says.
    lab: Lab = make_lab(switch__reload_command=["true"], **FAST)
    d = lab.daemon()
    lab.green.set_mode("http_503")
    failed = d.wait_event("rollback_failed", timeout=60)
    assert_failed_verify(failed, serving="green")
    assert "HTTP 503" in failed["reason"]
    assert failed["from"] == "green" and failed["to"] == "blue"
    assert link_color(lab) == "green", "the link the rollback wrote is taken back"
    assert wait_until(lambda: d.state().get("active") == "green", 10, "state.json active=green")
    assert wait_until(lambda: status(lab)["state"] == "hold", 10, "hold")
    # An operator resumes: guardd must not believe blue is serving, and must not call it steady.
    count = len(d.events())
    assert ctl(lab, "resume").returncode == 0
    again = d.wait_event("rollback_failed", after=count, timeout=60)
    assert_failed_verify(again, serving="green")
    doc = status(lab)
    assert doc["active"] == "green" and doc["state"] == "hold"
    assert ctl(lab, "status").returncode == 2
    assert lab.nginx.served_color() is None, "the front door really is failing"
    assert d.stop() == 0


def test_rollback_to_a_config_that_keeps_serving_the_old_color_is_undone(make_lab: MakeLab) -> None:
    # blue's upstream file proxies to green's port: nginx -t passes, the reload is real,
    # blue's own probes pass, and yet the front door still answers with the failing green.
    lab: Lab = make_lab(**FAST)
    point_at(lab, "blue", lab.green.port)
    d = lab.daemon()
    lab.green.set_mode("http_503")
    failed = d.wait_event("rollback_failed", timeout=60)
    assert_failed_verify(failed, serving="green")
    assert link_color(lab) == "green"
    assert lab.nginx.served_color() is None
    hold = d.wait_event("hold")
    assert "verify" in hold["reason"]
    assert d.stop() == 0


def test_forced_switch_to_a_failing_blue_is_undone(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(**FAST)
    d = lab.daemon()
    lab.blue.set_mode("http_503")
    count = len(d.events())
    result = ctl(lab, "switch", "blue", "--force")
    assert result.returncode == 1, result
    said = result.stdout + result.stderr
    assert "failed at verify and was undone" in said, said
    assert "HTTP 503" in said and "green is served" in said, said
    assert_undone_to_green(lab, d, after=count)
    assert status(lab)["active"] == "green"
    assert d.stop() == 0


def test_promote_that_does_not_verify_is_undone(make_lab: MakeLab) -> None:
    # blue itself is healthy (its probes pass the promotion gate), but its upstream file
    # points nowhere: through the front door it answers 502.
    lab: Lab = make_lab(**FAST)
    point_at(lab, "blue", free_port())
    d = lab.daemon()
    wait_until(
        lambda: status(lab)["upstreams"]["blue"]["consecutive_successes"] >= 5, 30, "promotable"
    )
    count = len(d.events())
    result = ctl(lab, "promote")
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert "promote to blue failed at verify and was undone" in said, said
    assert "HTTP 502" in said, said
    assert_undone_to_green(lab, d, after=count)
    assert not [e for e in d.events()[count:] if e["event"] == "promote"]
    assert d.stop() == 0


def test_resumed_rollback_that_does_not_verify_is_undone(make_lab: MakeLab) -> None:
    # A crash between the rename and the reload; at restart recover() "reloads" (true),
    # so the link names blue while nginx still serves the failing green.
    lab: Lab = make_lab(switch__reload_command=["true"], **FAST)
    (lab.fault_dir / "after_renamed").touch()
    d = lab.daemon()
    lab.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_renamed.reached").exists, 30, "the switch to pause")
    d.kill9()
    (lab.fault_dir / "after_renamed").unlink()
    assert link_color(lab) == "blue"
    d2 = lab.daemon()
    failed = d2.wait_event("rollback_failed", timeout=60)
    started = [e for e in d2.events() if e["event"] == "rollback_started"]
    assert failed["rollback_id"] == started[-1]["id"]
    assert "resumed" in failed["reason"]
    # At start-up no probe of green has run yet: guardd cannot tell who answers, and says so.
    assert_failed_verify(failed, serving=None)
    assert "which color is served is unknown" in failed["reason"]
    assert link_color(lab) == "green"
    assert wait_until(lambda: status(lab)["active"] == "green", 10, "active green")
    assert d2.stop() == 0


def test_command_switch_that_does_not_verify_is_undone_with_the_previous_color(
    make_lab: MakeLab,
) -> None:
    # A deploy command that really moves nginx (link + reload) to a failing blue: the
    # undo runs the command again for green, and guardd's record says green.
    lab: Lab = make_lab(**FAST)
    calls = lab.tmp / "calls"
    deploy = lab.tmp / "deploy"
    upstream_dir = lab.nginx.targets["blue"].parent
    link = shlex.quote(str(lab.nginx.active_link))
    deploy.write_text(
        "#!/bin/sh\nset -e\n"
        f'echo "$1" >> {shlex.quote(str(calls))}\n'
        f'ln -sfn "{upstream_dir}/lab_$1.conf" {link}\n'
        f"{shlex.join(lab.nginx.reload_command)}\n"
    )
    deploy.chmod(0o755)
    lab.write_config(switch__kind="command", switch__command=[str(deploy), "{color}"])
    d = lab.daemon()
    assert ctl(lab, "switch", "green", "--force").returncode == 0
    count = force_a_failing_blue(lab, d)
    assert calls.read_text().split() == ["green", "blue", "green"]
    assert_undone_to_green(lab, d, after=count)
    assert status(lab)["active"] == "green"
    assert d.stop() == 0


def test_state_file_switch_that_does_not_verify_is_restored_byte_for_byte(
    make_lab: MakeLab,
) -> None:
    # The app's reload moves nginx to whatever the state file names; blue fails behind it.
    # The undo puts the file back exactly (every other key kept) and reloads again.
    lab: Lab = make_lab(**FAST)
    state = lab.tmp / "deploy-state.json"
    state.write_text('{"version": "2.4.1", "activeColor": "green", "replicas": 3}\n')
    before = state.read_bytes()
    reload_app = lab.tmp / "reload-app"
    upstream_dir = lab.nginx.targets["blue"].parent
    reload_app.write_text(
        "#!/bin/sh\nset -e\n"
        f"color=$({shlex.quote(sys.executable)} -c 'import json,sys; "
        f'print(json.load(open(sys.argv[1]))["activeColor"])\' {shlex.quote(str(state))})\n'
        f'ln -sfn "{upstream_dir}/lab_$color.conf" {shlex.quote(str(lab.nginx.active_link))}\n'
        f"{shlex.join(lab.nginx.reload_command)}\n"
    )
    reload_app.chmod(0o755)
    lab.write_config(
        switch__kind="state-file", switch__path=str(state), switch__reload_command=[str(reload_app)]
    )
    d = lab.daemon()
    assert status(lab)["active"] == "green"
    count = force_a_failing_blue(lab, d)
    assert state.read_bytes() == before
    assert_undone_to_green(lab, d, after=count)
    assert d.stop() == 0


@pytest.mark.parametrize("step", ["test", "verify"])
def test_an_operators_rollback_that_fails_says_so_and_holds(make_lab: MakeLab, step: str) -> None:
    # `guardctl rollback` is an acting command: one whose switch failed (nginx -t refusing
    # blue's file, or a blue that answers 502 through the front door) and was undone is
    # refused, exit 1, never "done".
    lab: Lab = make_lab(**FAST)
    if step == "test":
        lab.nginx.targets["blue"].write_text("upstream lab_app { this is not nginx }\n")
    else:
        point_at(lab, "blue", free_port())
    d = lab.daemon()
    count = len(d.events())
    result = ctl(lab, "rollback", "--reason", "checkout 500s")
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert f"rollback to blue failed at {step}:" in said, said
    assert "undone, green is served; guardd holds until an operator acts" in said, said
    assert "done" not in said.replace("undone", ""), said
    failed = d.wait_event("rollback_failed", after=count)
    assert (failed["step"], failed["by"].startswith("uid:")) == (step, True), failed
    assert "failed at" in d.wait_event("hold", after=count)["reason"]
    assert link_color(lab) == "green"
    assert lab.nginx.wait_serving_only("green", hold=0.5, timeout=20)
    assert status(lab)["state"] == "hold"
    assert d.stop() == 0


# The lab's upstreams name themselves in `X-Color`, and nginx passes it on: the front door
# then says which color answered (docs/contract.md, `switch.verify_header`).
NAMED = {"switch__verify_header": "X-Color", **FAST}


def promotable(lab: Lab) -> None:
    wait_until(
        lambda: status(lab)["upstreams"]["blue"]["consecutive_successes"] >= 5, 30, "blue's window"
    )


def switch_to_blue_refused(lab: Lab, why: str, *argv: str) -> tuple[Daemon, int, str]:
    """Start guardd and switch to blue once blue may be: refused, `why` in what it says.
    The daemon, the journal's length before the switch, and what the command said."""
    d = lab.daemon()
    promotable(lab)
    count = len(d.events())
    result = ctl(lab, "switch", "blue", *argv)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert why in said, said
    return d, count, said


def test_a_switch_nginx_never_loads_is_undone_when_the_front_door_names_the_color(
    make_lab: MakeLab,
) -> None:
    """Both colors healthy, a reload that does nothing: every answer through the front door
    passes, and only its `X-Color` tells that green still answers. Undone, and said so."""
    lab: Lab = make_lab(switch__reload_command=["true"], **NAMED)
    why = "the answer is not blue's: X-Color: 'green'"
    d, count, said = switch_to_blue_refused(lab, why, "--reason", "release 7")
    assert "switch to blue failed at verify and was undone" in said, said
    assert "green is served" in said, said
    assert_undone_to_green(lab, d, after=count)
    assert status(lab)["active"] == "green"
    assert not [e for e in d.events()[count:] if e["event"] == "switch"]
    assert d.stop() == 0


def test_a_switch_nginx_loads_verifies_with_the_color_named(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(**NAMED)
    d = lab.daemon()
    promotable(lab)
    result = ctl(lab, "switch", "blue", "--reason", "release 7")
    assert result.returncode == 0, result.stdout + result.stderr
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    assert d.wait_event("switch")["to"] == "blue"
    assert link_color(lab) == "blue"
    assert d.stop() == 0


def test_the_front_door_naming_another_color_is_a_mismatch_and_reapplied(
    make_lab: MakeLab,
) -> None:
    """The link flipped by hand to blue, nginx not reloaded: both colors pass their probes
    and the front door passes, but it names green. guardd says so and re-applies blue."""
    lab: Lab = make_lab(**NAMED, policy__window="3s")  # (its episode ends sooner)
    d = lab.daemon()
    count = len(d.events())
    lab.nginx.active_link.unlink()
    lab.nginx.active_link.symlink_to(lab.nginx.targets["blue"])
    d.wait_event("external_switch", after=count)
    alert = d.wait_event(
        "alert", after=count, where=lambda e: str(e.get("reason", "")).startswith("mismatch:")
    )
    assert (
        "the front door fails (the answer is not blue's: X-Color: 'green') while the probes "
        "of blue pass" in alert["reason"]
    ), alert
    d.wait_event("alert", after=count, where=lambda e: e.get("reapplied") is True)
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    d.wait_event("alert", after=count, where=lambda e: "agree again" in e.get("reason", ""))
    assert not [e for e in d.events()[count:] if e["event"] == "hold"]
    assert d.stop() == 0


def name_the_file_in_force(lab: Lab, header: str, blue_port: int | None = None) -> None:
    """The README's recipe: each color's file maps `$lab_served_color` to its color, and
    the front door adds it as `header`; nginx reloaded (by the lab: guardd's may not).
    `blue_port`: where blue's file proxies (a bad edit), instead of blue's application."""
    for color, target in lab.nginx.targets.items():
        text = lab.nginx.write_target(color).read_text()
        if color == "blue" and blue_port is not None:
            text = text.replace(str(lab.blue.port), str(blue_port))
        target.write_text(f"{text}map $host $lab_served_color {{ default {color}; }}\n")
    conf = lab.nginx.conf.read_text()
    if header not in conf:
        added = f"add_header {header} $lab_served_color always;"
        conf = conf.replace("proxy_next_upstream off;", f"proxy_next_upstream off;\n{added}")
        lab.nginx.conf.write_text(conf)
    lab.nginx.reload()


def test_the_nginx_recipe_names_the_target_in_force(make_lab: MakeLab) -> None:
    """The README's recipe, where the upstreams name no color: each color's file maps a
    variable to its color, and the front door adds it as a header. A reload that does
    nothing leaves green's file in force, and the header says so."""
    lab: Lab = make_lab(
        switch__reload_command=["true"], switch__verify_header="X-Served-Color", **FAST
    )
    name_the_file_in_force(lab, "X-Served-Color")
    d, count, _ = switch_to_blue_refused(lab, "the answer is not blue's: X-Served-Color: 'green'")
    assert_undone_to_green(lab, d, after=count)
    assert d.stop() == 0


def test_an_answer_naming_two_colors_verifies_neither(make_lab: MakeLab) -> None:
    """The application names itself in `X-Color` and nginx adds the file in force's color
    on a second `X-Color` line. Crossed (blue's file proxies to green's application), the
    answer names both: it verifies nothing, whichever line comes last. Mended, both lines
    name blue, and the switch verifies."""
    lab: Lab = make_lab(**NAMED)
    # A bad edit: blue's file proxies to green's application.
    name_the_file_in_force(lab, "X-Color", blue_port=lab.green.port)
    d, count, _ = switch_to_blue_refused(lab, "the answer is not blue's: X-Color: 'green, blue'")
    # (The lab's own look at what nginx serves reads one X-Color: the journal tells.)
    assert link_color(lab) == "green"
    alert = d.wait_event("alert", after=count, where=lambda e: e.get("step") is not None)
    assert_failed_verify(alert, serving="green")  # (both lines: green, green)

    name_the_file_in_force(lab, "X-Color")
    result = ctl(lab, "switch", "blue")
    assert result.returncode == 0, result.stdout + result.stderr
    assert d.wait_event("switch", after=count)["to"] == "blue"
    assert link_color(lab) == "blue"
    assert d.stop() == 0
