"""Several guardd nodes, one decision: three real daemons, each with its own nginx in front
of the same blue and green upstreams, coordinated through a real 3-member etcd cluster."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shlex
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guardd import qoslock
from guardd.fleet.coordinator import SAFETY_READ_S
from guardd.timestamps import parse_rfc3339
from tests.harness.daemon import Daemon, Lab, guardctl, wait_until
from tests.harness.daemon import lab as make_lab
from tests.harness.fleet import PREFIX, FleetLab
from tests.harness.upstream import Upstream

pytestmark = pytest.mark.nginx


#: `make_fleet(**overrides)`: a fleet whose nodes' configs take `overrides`, closed after
#: the test whatever it did.
MakeFleet = Callable[..., FleetLab]


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> FleetLab:
    """A fleet of three nodes with the lab's defaults."""
    return make_fleet()


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[MakeFleet]:
    made: list[FleetLab] = []

    def make(**overrides: Any) -> FleetLab:
        root = tmp_path / f"fleet{len(made)}"
        root.mkdir()
        fleet = FleetLab(root, **overrides)
        made.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in made:
            fleet.close()


def applied(d: Daemon, generation: int) -> dict[str, Any]:
    return d.wait_event(
        "rollback_completed", timeout=60, where=lambda e: e.get("generation") == generation
    )


def green_fails_and_the_fleet_rolls_back(fleet: FleetLab) -> None:
    """Green answers 503: every nginx serves only blue, and every node journals the
    rollback as generation 1."""
    fleet.green.set_mode("http_503")
    assert fleet.all_serve("blue")
    for d in fleet.daemons:
        applied(d, 1)


def every_node_at(fleet: FleetLab, generation: int, timeout: float = 60) -> None:
    """Wait until every node's record (`fleet status`) says it applied `generation`."""
    wait_until(
        lambda: all(n["generation"] == generation for n in fleet.fleet_status(0)["nodes"]),
        timeout,
        f"every node at generation {generation}",
        poll=0.3,
    )


def only_blue_served_for(fleet: FleetLab, seconds: float) -> None:
    """For `seconds`, every nginx answers fresh connections from blue only (a node that
    tried green again would show it)."""
    end = time.monotonic() + seconds
    served: set[str | None] = set()
    while time.monotonic() < end:
        served |= {lab.nginx.served_color(timeout=2.0) for lab in fleet.labs}
    assert served == {"blue"}, served


def test_green_fails_the_whole_fleet_rolls_back_once(fleet: FleetLab) -> None:
    fleet.start()
    assert all(lab.nginx.served_color() == "green" for lab in fleet.labs)
    fleet.green.set_mode("http_503")
    assert fleet.all_serve("blue")
    for d in fleet.daemons:
        done = applied(d, 1)
        assert done["from"] == "green" and done["to"] == "blue"
    status = fleet.fleet_status(0)
    assert status["rollbacks"] == 1
    assert status["desired"]["color"] == "blue" and status["desired"]["generation"] == 1
    assert status["leader"] in {"n0", "n1", "n2"}
    every_node_at(fleet, 1, timeout=30)
    assert {n["serving"] for n in fleet.fleet_status(0)["nodes"]} == {"blue"}
    # Every node's last decision is the rollback it serves, not one its machine left to
    # the leader (nor an older one).
    for lab in fleet.labs:
        decided = status_of(lab)["last_decision"]
        assert decided["action"] == "rollback" and not decided.get("not_taken"), decided
    # Each node's own status says where it stands in the fleet.
    for i, lab in enumerate(fleet.labs):
        assert status_of(lab)["fleet"] == {
            "node": f"n{i}",
            "leader": status["leader"],
            "desired": "blue",
            "generation": 1,
            "applied": 1,
            "etcd_reachable": True,
            "last_read": None,
        }
        text = guardctl("status", socket=lab.socket_path).stdout
        assert re.search(rf"fleet +node n{i} \(leader.*desired blue generation 1, applied", text)
    # One rollback in the fleet's history, and no node applied a generation twice.
    for d in fleet.daemons:
        completed = [e for e in d.events() if e["event"] == "rollback_completed"]
        assert [e["generation"] for e in completed] == [1]
    # Every node journals the decision's severity, the leader's as the followers'.
    severities = {
        e["severity"]
        for d in fleet.daemons
        for e in d.events()
        if e["event"] in ("rollback_started", "rollback_completed")
    }
    assert len(severities) == 1 and severities <= {"P0", "P1"}, severities
    # One election, journaled by the node that won it.
    elected = [e for d in fleet.daemons for e in d.events() if e["event"] == "fleet_leader"]
    assert [(e["node"], e["previous"]) for e in elected] == [(status["leader"], None)]
    assert isinstance(elected[0]["revision"], int) and elected[0]["revision"] > 0


def test_qos_status_answers_from_the_fleets_lock_on_every_node(make_fleet: MakeFleet) -> None:
    # A guard window longer than a loaded machine takes to ask three nodes (the lab's is 2 s).
    fleet = make_fleet(qos__window="30s")
    fleet.start()
    for lab in fleet.labs:
        out = guardctl("qos", "status", "--json", socket=lab.socket_path)
        assert out.returncode == 0, out
        assert json.loads(out.stdout)["source"] == "fleet"
    fleet.green.set_mode("http_503")
    assert fleet.all_serve("blue")

    wait_until(
        lambda: all(blocked_by_the_fleet(lab) for lab in fleet.labs),
        60,
        "the fleet's lock on every node",
        poll=0.2,
    )
    # The local lock file carries it too (each node mirrors it in its next round), so a
    # CI gate reading the file is blocked.
    wait_until(
        lambda: all(lab.lock_file.exists() for lab in fleet.labs),
        60,
        "the fleet's lock mirrored into every node's lock file",
        poll=0.2,
    )


def promote(lab: Lab) -> tuple[int, str]:
    """`guardctl promote` on `lab`, retried while green has not yet passed the local gate."""

    def attempt() -> tuple[int, str] | None:
        out = guardctl("promote", "--reason", "release 42", socket=lab.socket_path)
        said = out.stdout + out.stderr
        return None if "not ready for promotion" in said else (out.returncode, said)

    result: tuple[int, str] = wait_until(attempt, 60, "promote past the local gate", poll=0.3)
    return result


def test_a_node_whose_nginx_rejects_the_target_refuses_the_promote_fleet_wide(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet(active="blue")
    fleet.start()
    broken = fleet.labs[1].nginx.targets["green"]
    good = broken.read_text()
    broken.write_text("upstream lab_app { this is not nginx; }\n")
    code, said = promote(fleet.labs[0])
    assert code == 1, said
    assert "n1" in said and "not every node is ready" in said
    assert "n0" not in said.split("ready:", 1)[1] and "n2" not in said.split("ready:", 1)[1]
    for lab, d in zip(fleet.labs, fleet.daemons, strict=True):
        assert lab.nginx.wait_serving_only("blue", hold=0.3)
        assert lab.nginx.active_link.resolve() == lab.nginx.targets["blue"].resolve()
        assert not [e for e in d.events() if e["event"] in ("promote", "rollback_started")]
    assert PREFIX + "/desired" not in fleet.etcd.range(PREFIX + "/", prefix=True)
    # Fixed, the same promote goes through on every node as one generation.
    broken.write_text(good)
    code, said = promote(fleet.labs[2])
    assert code == 0, said
    assert fleet.all_serve("green")
    for d in fleet.daemons:
        done = d.wait_event("promote", timeout=60)
        assert done["generation"] == 1 and done["to"] == "green"


def test_a_node_that_may_not_switch_its_link_refuses_the_prepare_untouched(
    make_fleet: MakeFleet,
) -> None:
    """Another process took node 1's switch lock: node 1 answers the fleet's prepare with
    why, and never tests the target (nginx's test swaps the link for a moment)."""
    fleet = make_fleet(active="blue")
    fleet.start()
    link = fleet.labs[1].nginx.active_link
    lock = link.parent / f".{link.name}.guardd.lock"
    theirs = fleet.tmp / "theirs.lock"
    theirs.write_text("4242\n")
    fd = os.open(theirs, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        theirs.replace(lock)  # (in place the instant the node's file is gone)
        refused = f"guardd does not switch {link} now: its lock cannot be held: "
        wait_until(
            lambda: any(w.startswith(refused) for w in status_of(fleet.labs[1])["warnings"]),
            20,
            "node 1's warning",
        )
        before = fleet.daemons[1].log()
        code, said = promote(fleet.labs[0])
        assert code == 1, said
        assert "not every node is ready" in said and f"n1: {refused}" in said, said
        assert "nginx_switch_undone" not in fleet.daemons[1].log()[len(before) :]
    finally:
        os.close(fd)
    for lab in fleet.labs:
        assert lab.nginx.wait_serving_only("blue", hold=0.3)


def status_of(lab: Lab) -> dict[str, Any]:
    out = guardctl("status", "--json", socket=lab.socket_path)
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict), out
    return doc


def test_a_node_cut_off_from_etcd_keeps_its_color_then_converges(make_fleet: MakeFleet) -> None:
    fleet = make_fleet()
    proxy = fleet.through_proxy(2)
    fleet.start()
    cut = fleet.labs[2]
    proxy.stop()

    def says_unreachable() -> bool:
        warned = any("etcd is unreachable" in w for w in status_of(cut).get("warnings", []))
        assert cut.notify is not None
        seen = any("fleet=etcd-unreachable" in m for m in cut.notify.lines())
        return warned and seen

    wait_until(says_unreachable, 60, "the cut-off node's WARNING and STATUS=", poll=0.2)
    # Cut off, the node cannot tell whether the fleet's lock is held: no deploy.
    lock_is_unknown_on(cut)
    # Nor what the fleet is now: what it shows is as last read (if anything), and says so.
    out = guardctl("fleet", "status", socket=cut.socket_path)
    assert out.returncode == 3 and out.stdout.startswith("UNKNOWN now; as last read: fleet"), out
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("  ")]
    assert all(ln.endswith("(as last read)") for ln in rows), out
    out = guardctl("status", socket=cut.socket_path)
    assert out.returncode == 1 and "etcd is unreachable" in out.stdout, out
    assert "node n2, etcd not answering: the fleet's state (its leader too) is UNKNOWN" in (
        out.stdout
    ), out
    # `--json` too: no leader, color or generation named as if known; the last read aside.
    said = status_of(cut)["fleet"]
    assert said["etcd_reachable"] is False
    assert (said["leader"], said["desired"], said["generation"]) == (None, None, None), said
    # (As last read, if anything: cut off right after its start, it may have read nothing.)
    assert set(said["last_read"] or {}) == {"leader", "desired", "generation"}, said
    fleet.green.set_mode("http_503")
    assert fleet.labs[0].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    assert fleet.labs[1].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    applied(fleet.daemons[0], 1)
    applied(fleet.daemons[1], 1)
    # The cut-off node saw green fail too, but made no switch on its own.
    cut_d = fleet.daemons[2]
    wait_until(
        lambda: cut.nginx.served_color() is None, 30, "green failing through the cut-off node"
    )
    assert cut.nginx.active_link.resolve() == cut.nginx.targets["green"].resolve()
    assert not [e for e in cut_d.events() if e["event"].startswith("rollback")]
    # It says so, once: in its journal and among its warnings while it lasts.
    unacted = "does not roll back to blue: etcd is unreachable"
    cut_d.wait_event("alert", timeout=30, where=lambda e: unacted in e["reason"])
    assert any(unacted in w for w in status_of(cut)["warnings"])
    # Its last decision was a rollback, not taken here: its status says so, and why.
    decided = status_of(cut)["last_decision"]
    assert decided["action"] == "rollback", decided
    assert decided["not_taken"] == "etcd is unreachable and fleet.local_fallback is false"
    out = guardctl("status", socket=cut.socket_path)
    assert "rollback P0 (not taken here: etcd is unreachable" in out.stdout, out
    assert out.returncode == 2, out  # CRITICAL: as a hold, nothing will act on green
    fleet.rounds_pass()
    assert sum(unacted in e.get("reason", "") for e in cut_d.events()) == 1
    proxy.start()
    assert cut.nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    applied(cut_d, 1)
    wait_until(
        lambda: not any("etcd" in w for w in status_of(cut).get("warnings", [])),
        60,
        "the WARNING gone once etcd answers",
    )


def test_the_leader_killed_mid_rollback_is_replaced_and_follows_when_back(
    make_fleet: MakeFleet,
) -> None:
    # A guard window longer than the test: the rollback's lock must be the fleet's though
    # the leader that decided it died before it could publish it.
    fleet = make_fleet(qos__window="10m")
    fleet.start()
    old = fleet.leader()
    assert old is not None
    lab = fleet.labs[old]
    # The leader stops with the new link renamed in, before nginx is reloaded onto it.
    (lab.fault_dir / "after_renamed").write_text("")
    fleet.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_renamed.reached").exists, 60, "the leader mid-rollback")
    fleet.daemons[old].kill9()
    # Its guardd dead, its nginx still on green, the rollback written: its host's gate
    # (guardctl reading the config, the lock file and etcd) says no deploy, not "allowed".
    code, doc, said = qos_status(lab, config=True)
    assert code == 1 and doc is not None, said
    assert f"has not converged on blue: node n{old}" in str(doc["reason"]), doc
    (lab.fault_dir / "after_renamed").unlink()
    others = [i for i in range(3) if i != old]
    wait_until(lambda: fleet.leader() not in (None, old), 60, "another leader", poll=0.1)
    for i in others:
        assert fleet.labs[i].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
        applied(fleet.daemons[i], 1)
    new = fleet.leader()
    assert new is not None
    elected = fleet.daemons[new].wait_event(
        "fleet_leader", timeout=30, where=lambda e: e["previous"] == f"n{old}"
    )
    first = fleet.daemons[old].events()
    term = next(e["revision"] for e in first if e["event"] == "fleet_leader")
    assert elected["node"] == f"n{new}" and elected["revision"] > term
    # The new leader's own guard window (the rollback it applied) is the fleet's lock.
    wait_until(
        lambda: (fleet.etcd.range(PREFIX + "/qos").get(PREFIX + "/qos") or {}).get("locked"),
        30,
        "the rollback's lock published as the fleet's",
    )
    for i in others:
        out = guardctl("qos", "status", "--json", socket=fleet.labs[i].socket_path)
        assert out.returncode == 1 and json.loads(out.stdout)["locked"] is True, out
    restarted = lab.daemon()
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    wait_until(
        lambda: (
            {n["node"]: n["generation"] for n in fleet.fleet_status(others[0])["nodes"]}
            == {"n0": 1, "n1": 1, "n2": 1}
        ),
        60,
        "every node, the old leader too, at generation 1",
    )
    status = fleet.fleet_status(old)
    assert status["leader"] != f"n{old}"
    assert status["rollbacks"] == 1 and status["desired"]["generation"] == 1
    for d in [*fleet.daemons, restarted]:
        generations = [e["generation"] for e in d.events() if e["event"] == "rollback_completed"]
        assert len(generations) == len(set(generations)) and set(generations) <= {1}


def test_a_node_stopped_mid_rollback_leaves_the_color_it_serves_in_its_record(
    make_fleet: MakeFleet,
) -> None:
    """SIGTERM reaches a follower between the rename and the reload of the fleet's rollback:
    it finishes the switch before it stops, and its last record says blue, so the fleet
    does not take the stopped node for one still on green."""
    fleet = make_fleet()
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    f = next(i for i in range(3) if i != leader)
    lab, d = fleet.labs[f], fleet.daemons[f]
    (lab.fault_dir / "after_renamed").write_text("")
    fleet.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_renamed.reached").exists, 60, "the follower mid-rollback")
    d.signal(signal.SIGTERM)
    (lab.fault_dir / "after_renamed").unlink()
    assert d.stop() == 0
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=30)
    seen = fleet.etcd.range(PREFIX + f"/seen/n{f}")[PREFIX + f"/seen/n{f}"]
    assert (seen["serving"], seen["generation"]) == ("blue", 1), seen
    rows = {r["node"]: r for r in fleet.fleet_status(leader)["nodes"]}
    assert rows[f"n{f}"]["serving"] == "blue", rows


def test_one_etcd_member_down_the_fleet_works_two_down_no_node_switches(
    fleet: FleetLab,
) -> None:
    fleet.start()
    fleet.etcd.kill(0)

    def fresh_everywhere() -> bool:
        # Each node's record is rewritten every round: fresh records are writes that passed.
        for i in range(3):
            doc = fleet.fleet_status(i)
            if not doc["etcd_reachable"] or doc["leader"] is None:
                return False
            if len(doc["nodes"]) != 3 or any(n["lease_age_s"] > 1 for n in doc["nodes"]):
                return False
        return True

    wait_until(fresh_everywhere, 60, "the fleet working on 2 of 3 etcd members", poll=0.2)
    assert not any(status_of(lab)["warnings"] for lab in fleet.labs)
    fleet.etcd.kill(1)

    def all_warn() -> bool:
        return all(
            any("etcd is unreachable" in w for w in status_of(lab)["warnings"])
            for lab in fleet.labs
        )

    wait_until(all_warn, 60, "every node saying etcd is unreachable", poll=0.2)
    fleet.green.set_mode("http_503")
    # Every node sees green fail past the rollback threshold, and none switches alone.
    wait_until(
        lambda: all(
            status_of(lab)["upstreams"]["green"]["consecutive_failures"] >= 6 for lab in fleet.labs
        ),
        60,
        "green failing on every node",
        poll=0.2,
    )
    for lab, d in zip(fleet.labs, fleet.daemons, strict=True):
        assert lab.nginx.active_link.resolve() == lab.nginx.targets["green"].resolve()
        assert not [e for e in d.events() if e["event"].startswith("rollback")]
        out = guardctl("fleet", "status", socket=lab.socket_path)
        assert out.returncode == 3 and "etcd is unreachable" in out.stdout, out
        assert lab.notify is not None
        assert any("fleet=etcd-unreachable" in m for m in lab.notify.lines())


def n1_cannot_apply_the_rollback(fleet: FleetLab) -> tuple[str, dict[str, Any]]:
    """n1's nginx rejects blue, and green fails: n0 and n2 roll back to blue, n1 journals
    `rollback_failed`. Returns n1's good blue target text (to mend it) and that event."""
    target = fleet.labs[1].nginx.targets["blue"]
    good = target.read_text()
    target.write_text("upstream lab_app { not nginx; }\n")
    fleet.green.set_mode("http_503")
    assert fleet.labs[0].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    assert fleet.labs[2].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    return good, fleet.daemons[1].wait_event("rollback_failed", timeout=60)


def test_a_node_that_cannot_apply_the_rollback_is_reported_on_every_node(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet(switch__timeout="2s")
    fleet.start()
    _, failed = n1_cannot_apply_the_rollback(fleet)
    # The journal ties the failure to the fleet's decision it failed to apply.
    assert failed["generation"] == 1 and failed["fleet_node"] in {"n0", "n1", "n2"}, failed

    def reported_everywhere() -> bool:
        for i, lab in enumerate(fleet.labs):
            if fleet.fleet_status(i)["alerts"] != ["n1"]:
                return False
            if not any("node n1 serves green" in w for w in status_of(lab)["warnings"]):
                return False
        return True

    wait_until(reported_everywhere, 60, "n1 reported as diverging on every node", poll=0.2)
    out = guardctl("fleet", "status", socket=fleet.labs[0].socket_path)
    assert out.returncode == 1 and "ALERT" in out.stdout, out
    for d in fleet.daemons:
        d.wait_event("alert", timeout=30, where=lambda e: "node n1 serves" in e["reason"])
    # n1 tries again, each time after twice as long (2 s, then 4 s): not a failed rollback
    # in its journal every switch.timeout.
    failed = wait_until(
        lambda: (f := [parse_rfc3339(e["ts"]) for e in fleet.daemons[1].events()
                       if e["event"] == "rollback_failed"])[2:] and f,
        60,
        "n1's third try",
        poll=0.2,
    )  # fmt: skip
    first, second = failed[1] - failed[0], failed[2] - failed[1]
    # The gaps are the waits (2 s, then 4 s) plus a try each, whose length varies with load.
    assert first >= 2.0 and second >= 4.0, failed


def test_the_fleets_lock_holds_until_a_late_node_applied_the_rollback(
    make_fleet: MakeFleet,
) -> None:
    """A node whose nginx rejects the rollback keeps serving the failing color: the
    leader's guard window passes its SLOs but goes on (deploys stay blocked on every node)
    until that node applies it; then the late node's own window, taken over its copy of the
    fleet's lock, ends with the fleet's, and no lock is left anywhere."""
    fleet = make_fleet(switch__timeout="2s", qos__window="6s")
    fleet.start()
    late = fleet.labs[1]
    good, _ = n1_cannot_apply_the_rollback(fleet)
    leader = fleet.leader()
    assert leader is not None and leader != 1
    wait_until(lambda: all(lab.lock_file.exists() for lab in fleet.labs), 30, "every lock file")
    # Gates on every host, testing their lock files as often as they can.
    missing: list[tuple[int, float]] = []
    done = threading.Event()

    def gates() -> None:
        while not done.is_set():
            missing.extend((i, time.monotonic()) for i, lab in enumerate(fleet.labs)
                           if not lab.lock_file.exists())  # fmt: skip
            done.wait(0.005)

    watcher = threading.Thread(target=gates, daemon=True)
    watcher.start()
    mark = len(fleet.daemons[1].events())
    try:
        # The window is due twice and its SLOs held (blue is fine), but n1 serves green.
        for _ in range(2):
            extended = fleet.daemons[leader].wait_event(
                "qos_extended",
                timeout=60,
                after=len(fleet.daemons[leader].events()),
                where=lambda e: "n1 serves green" in e["reason"],
            )
        fleet.rounds_pass()
    finally:
        done.set()
        watcher.join(timeout=10)
    assert "has not converged on blue" in extended["reason"], extended
    assert missing == [], f"a gate found its lock file missing {len(missing)} times"
    assert all(blocked_by_the_fleet(lab) for lab in fleet.labs)
    # Every gate, through the socket and from the config, says why first: the lock's own
    # end would not open it.
    for lab in fleet.labs:
        for config in (False, True):
            code, doc, said = qos_status(lab, config=config)
            assert code == 1 and doc is not None, said
            assert doc["reason"].startswith("the fleet has not converged on blue: node n1"), doc
            assert "(and the QoS lock holds: rollback green -> blue" in doc["reason"], doc
    # n1's copy follows the extensions: journaled as extended, never ended and taken again.
    moved = fleet.daemons[1].events()[mark:]
    assert [e for e in moved if e["event"] == "qos_extended"], moved
    assert not [e for e in moved if e["event"] in ("qos_released", "qos_locked")], moved
    rows = {n["node"]: n for n in fleet.fleet_status(leader)["nodes"]}
    assert rows["n1"]["serving"] == "green", rows

    mark = len(fleet.daemons[1].events())
    leader_mark = len(fleet.daemons[leader].events())
    late.nginx.targets["blue"].write_text(good)
    assert late.nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    fleet.daemons[leader].wait_event(
        "alert", timeout=30, where=lambda e: "node n1 serves the desired blue again" in e["reason"]
    )
    # n1's own window, taken over its copy of the fleet's lock: a window with an end, not
    # "someone else's lock, until unlocked".
    taken = fleet.daemons[1].wait_event(
        "qos_locked",
        timeout=30,
        after=mark,
        where=lambda e: e["reason"].startswith("rollback green -> blue"),
    )
    assert taken["until"] is not None and "already held" not in taken["reason"], taken
    # The late node gets its whole window: the leader's goes on while it runs, until just
    # after it ends (n1's record says when), not a whole `qos.window` more.
    waited = fleet.daemons[leader].wait_event(
        "qos_extended",
        timeout=60,
        after=leader_mark,
        where=lambda e: "the guard window of node n1 still runs" in e["reason"],
    )
    behind = parse_rfc3339(waited["until"]) - parse_rfc3339(taken["until"])
    assert 0.5 <= behind <= 1.5, (waited, taken)
    wait_until(
        lambda: (
            all(not lab.lock_file.exists() for lab in fleet.labs)
            and all(allowed(lab) for lab in fleet.labs)
        ),
        90,
        "the fleet's lock released everywhere once every node serves blue",
        poll=0.3,
    )
    fleet.rounds_pass()
    assert not any(lab.lock_file.exists() for lab in fleet.labs)
    assert fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]["locked"] is False


def test_a_late_nodes_window_after_an_operators_unlock_is_the_fleets_lock(
    make_fleet: MakeFleet,
) -> None:
    """An operator unlocks the fleet while one node cannot apply the rollback (the gates
    stay locked: the fleet has not converged). When that node applies it at last, its
    guard window is the fleet's lock: every host's gate stays locked until it passes, then
    every lock ends."""
    fleet = make_fleet(switch__timeout="2s", qos__window="4s")
    fleet.start()
    late = fleet.labs[1]
    good, _ = n1_cannot_apply_the_rollback(fleet)
    wait_until(lambda: all(lab.lock_file.exists() for lab in fleet.labs), 30, "every lock file")
    out = guardctl("qos", "unlock", socket=fleet.labs[0].socket_path)
    assert out.returncode == 0, out
    wait_until(
        lambda: not any(fleet.labs[i].lock_file.exists() for i in (0, 2)), 60, "n0, n2 unlocked"
    )
    # n1 holds (its rollback failed): its own file keeps its hold's lock.
    wait_until(
        lambda: (qoslock.read_lock(late.lock_file).reason or "").startswith("guardd holds: "),
        30,
        "n1's hold lock",
    )
    # Unlocked, but n1 serves green still: no gate says "deploys allowed".
    for lab in fleet.labs:
        code, doc, said = qos_status(lab)
        assert code == 1 and doc is not None, said
        assert "has not converged on blue" in doc["reason"], doc
    mark = [len(d.events()) for d in fleet.daemons]
    late.nginx.targets["blue"].write_text(good)
    assert late.nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    taken = fleet.daemons[1].wait_event(
        "qos_locked",
        timeout=30,
        after=mark[1],
        where=lambda e: e["reason"].startswith("rollback green -> blue"),
    )
    # Every other host mirrors it as the fleet's lock, taken on n1.
    for i in (0, 2):
        copy = fleet.daemons[i].wait_event(
            "qos_locked", timeout=30, after=mark[i], where=lambda e: e.get("fleet_node") == "n1"
        )
        assert copy["reason"].startswith("the fleet's QoS lock: rollback green -> blue"), copy
    assert all(blocked_by_the_fleet(lab) for lab in fleet.labs)
    # Its end is the fleet's: no lock left anywhere, and n1 says why.
    fleet.daemons[1].wait_event("qos_released", timeout=60, after=mark[1])
    wait_until(
        lambda: (
            not any(lab.lock_file.exists() for lab in fleet.labs)
            and all(allowed(lab) for lab in fleet.labs)
        ),
        60,
        "the late node's window over, every gate open",
        poll=0.3,
    )
    assert taken["until"] is not None, taken
    assert fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]["locked"] is False


def test_the_fleets_lock_waits_for_a_followers_failing_window_then_ends_on_its_own(
    make_fleet: MakeFleet,
) -> None:
    """One follower's guard window does not hold (here: its P2 latency bound is a hundredth
    of a millisecond, so the rule fires on every color): the leader's window, met on its own
    probes, goes on while that node's is not met, and no gate opens. Once that node's
    window is met, the fleet's lock ends on its own (a window that failed once does not
    hold the fleet forever)."""
    fleet = make_fleet(qos__window="6s")
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    f = next(i for i in range(3) if i != leader)
    d = fleet.daemons[f]
    mark = len(d.events())
    fleet.labs[f].write_config(qos__window="2s", policy__p2_latency="0.01ms")
    d.signal(signal.SIGHUP)
    d.wait_event("config_reloaded", timeout=30, after=mark)
    fleet.green.set_mode("http_503")
    assert fleet.all_serve("blue")
    d.wait_event("qos_extended", timeout=60)
    extended = fleet.daemons[leader].wait_event(
        "qos_extended",
        timeout=60,
        where=lambda e: f"the guard window of node n{f} is not met" in e["reason"],
    )
    assert extended["reason"].startswith("SLOs held"), extended
    fleet.rounds_pass()
    assert all(blocked_by_the_fleet(lab) for lab in fleet.labs)
    assert all(lab.lock_file.exists() for lab in fleet.labs)
    # The follower's bound back to the default: its next window is met, and then the
    # leader's, and every lock ends without an operator.
    mark = len(d.events())
    fleet.labs[f].write_config(policy__p2_latency=None)
    d.signal(signal.SIGHUP)
    d.wait_event("config_reloaded", timeout=30, after=mark)
    wait_until(
        lambda: (
            not any(lab.lock_file.exists() for lab in fleet.labs)
            and all(allowed(lab) for lab in fleet.labs)
        ),
        120,
        "every lock gone once the follower's window is met",
        poll=0.3,
    )


def test_a_reload_keeps_the_fleet_settings_until_the_next_start(fleet: FleetLab) -> None:
    fleet.start()
    lab, d = fleet.labs[0], fleet.daemons[0]
    lab.write_config(fleet__lease_ttl="3s", probe__timeout="900ms")
    d.signal(signal.SIGHUP)
    done = d.wait_event("config_reloaded", timeout=60)
    assert done["restart_required"] == ["fleet.lease_ttl"]
    assert "probe.timeout" in done["changed"]
    assert fleet.fleet_status(0)["etcd_reachable"] is True


def test_majority_quorum_one_nodes_view_does_not_switch_the_fleet(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(fleet__quorum="majority")
    blind = Upstream("green", mode="http_503").start()
    try:
        fleet.start()
        leader = fleet.leader()
        assert leader is not None
        lab, d = fleet.labs[leader], fleet.daemons[leader]
        # Only the leader's probes see green fail: a blip of its own network, say.
        lab.green = blind
        lab.write_config()
        d.signal(signal.SIGHUP)
        d.wait_event("config_reloaded", timeout=60)
        wait_until(
            lambda: status_of(lab)["upstreams"]["green"]["consecutive_failures"] >= 6,
            60,
            "the leader seeing green fail",
            poll=0.2,
        )
        for other_lab, other in zip(fleet.labs, fleet.daemons, strict=True):
            assert other_lab.nginx.served_color() == "green"
            assert not [e for e in other.events() if e["event"].startswith("rollback")]
        assert PREFIX + "/desired" not in fleet.etcd.range(PREFIX + "/", prefix=True)
        # Every node sees it now: the majority is there, and the fleet rolls back once.
        green_fails_and_the_fleet_rolls_back(fleet)
    finally:
        blind.stop()


def blocked_by_the_fleet(lab: Lab) -> bool:
    """`qos status` on `lab` says the fleet's lock holds: exit 1, locked, from the fleet."""
    code, doc, _ = qos_status(lab)
    return code == 1 and doc is not None and doc["source"] == "fleet" and doc["locked"] is True


def allowed(lab: Lab, *, config: bool = False) -> bool:
    """`qos status` on `lab` says deploys are allowed (exit 0)."""
    return qos_status(lab, config=config)[0] == 0


def qos_status(lab: Lab, *, config: bool = False) -> tuple[int, dict[str, Any] | None, str]:
    """`guardctl qos status --json`, through the node's socket or (`config`) its config."""
    where = ("--config", str(lab.config_path)) if config else ()
    out = guardctl("qos", "status", "--json", *where, socket=None if config else lab.socket_path)
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        doc = None
    return out.returncode, doc if isinstance(doc, dict) else None, out.stdout + out.stderr


def test_a_node_alone_under_its_prefix_never_says_deploys_allowed(make_fleet: MakeFleet) -> None:
    """A node that finds no other under `fleet.prefix` (a mistyped prefix, another fleet's
    etcd, or the first node up) cannot tell its fleet's lock: every gate on it says
    UNKNOWN, never "allowed", until `fleet.size` nodes were seen there."""
    fleet = make_fleet(nodes=2)
    alone = fleet.labs[0]
    fleet.daemons = [alone.daemon()]

    def unknown_for_size() -> bool:
        code, doc, _ = qos_status(alone)
        return code == 3 and doc is not None and "fleet.size" in str(doc.get("warning"))

    wait_until(unknown_for_size, 60, "the lone node's gate UNKNOWN for fleet.size")
    # Its leader has written the fleet's first release all the same: the gates do not
    # read that as "allowed".
    assert fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]["locked"] is False
    code, doc, text = qos_status(alone, config=True)
    assert code == 3, text
    assert doc is not None and doc["unknown"] is True, text
    assert f"only 1 of the fleet's 2 nodes (fleet.size) seen under {PREFIX} (n0)" in text
    status = guardctl("status", "--json", socket=alone.socket_path)
    assert status.returncode == 1, status
    shown = json.loads(status.stdout)
    assert shown["qos"]["unknown"] is True, shown
    assert any("fleet.size" in w for w in shown["warnings"]), shown
    out = guardctl("fleet", "status", "--json", socket=alone.socket_path)
    assert out.returncode == 1, out
    assert any("fleet.size" in w for w in json.loads(out.stdout)["warnings"]), out.stdout
    # The second node: the fleet is the configured one, and its (released) lock counts.
    fleet.daemons.append(fleet.labs[1].daemon())
    for lab in fleet.labs:
        wait_until(functools.partial(allowed, lab), 60, "deploys allowed over the socket")
        assert allowed(lab, config=True)
    out = guardctl("fleet", "status", "--json", socket=alone.socket_path)
    assert out.returncode == 0, out


def test_a_hand_written_record_under_a_nodes_name_is_replaced_by_the_node(
    make_fleet: MakeFleet,
) -> None:
    """guardd writes a node's record only under its lease: one without (an `etcdctl put`)
    is not another guardd's, and the node writes its own over it, no clash."""
    fleet = make_fleet(nodes=2)
    fleet.start()
    key = f"{PREFIX}/nodes/n1"
    fleet.etcd.put(key, json.dumps({"serving": "green", "generation": 99}))
    assert not fleet.etcd.lease_of(key)

    def own_record() -> bool:
        doc = fleet.etcd.range(key).get(key)
        return bool(fleet.etcd.lease_of(key)) and isinstance(doc, dict) and "window" in doc

    wait_until(own_record, 30, "n1's own record, under its lease, in place of the hand's")
    # Past the time a clash is told (one and a half leases): none is.
    fleet.rounds_pass(6)
    for i in range(2):
        doc = fleet.fleet_status(i)
        assert doc["twins"] == [], doc
        assert not [w for w in doc["warnings"] if "another guardd" in w], doc


def test_qos_lock_and_unlock_on_any_node_are_the_fleets(fleet: FleetLab) -> None:
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    followers = [i for i in range(3) if i != leader]
    out = guardctl(
        "qos", "lock", "--for", "1h", "--reason", "freeze 7",
        socket=fleet.labs[followers[0]].socket_path,
    )  # fmt: skip
    assert out.returncode == 0, out

    def everywhere(locked: bool) -> bool:
        for lab in fleet.labs:
            for config in (False, True):
                code, doc, _ = qos_status(lab, config=config)
                if doc is None or code != (1 if locked else 0) or doc["source"] != "fleet":
                    return False
                if locked and doc["reason"] != "freeze 7":
                    return False
            if lab.lock_file.exists() != locked:
                return False
        return True

    wait_until(lambda: everywhere(True), 60, "the follower's lock on every node", poll=0.2)
    assert fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]["locked"] is True
    # Unlocked on another node (the leader), it is unlocked everywhere.
    out = guardctl(
        "qos", "unlock", "--reason", "freeze 7 over", socket=fleet.labs[leader].socket_path
    )
    assert out.returncode == 0, out
    wait_until(lambda: everywhere(False), 60, "the fleet's lock gone on every node", poll=0.2)
    released = fleet.daemons[leader].wait_event("qos_released", timeout=30)
    assert released["reason"] == "freeze 7 over", released  # the operator's why, journaled
    d = fleet.daemons[followers[0]]
    released = d.wait_event(
        "qos_released", timeout=30, where=lambda e: e["by"].startswith("fleet:")
    )
    assert "freeze 7 over" in released["reason"], released
    # etcd gone: every node says the fleet's lock is UNKNOWN, never "unlocked".
    fleet.etcd.stop()
    for lab in fleet.labs:
        code, doc, said = qos_status(lab, config=True)
        assert code == 3 and "cannot tell" in said, said
        assert doc is not None and doc["unknown"] is True and doc["locked"] is None, said
        wait_until(
            functools.partial(lambda lab: qos_status(lab)[0] == 3, lab),
            60,
            "UNKNOWN over the socket with etcd gone",
            poll=0.2,
        )
        out = guardctl("qos", "unlock", socket=lab.socket_path)
        assert out.returncode == 1 and "etcd is unreachable" in out.stderr, out


def test_a_fleet_lock_for_a_while_ends_on_every_node(fleet: FleetLab) -> None:
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    follower = next(i for i in range(3) if i != leader)
    out = guardctl(
        "qos", "lock", "--for", "8s", "--reason", "short freeze",
        socket=fleet.labs[follower].socket_path,
    )  # fmt: skip
    assert out.returncode == 0, out

    def each(locked: bool) -> bool:
        for lab in fleet.labs:
            code, doc, _ = qos_status(lab)
            if doc is None or code != (1 if locked else 0) or lab.lock_file.exists() != locked:
                return False
        return True

    wait_until(lambda: each(True), 60, "the lock on every node", poll=0.1)
    # Its `until` passed: the leader ends the fleet's lock, and every node's copy goes.
    wait_until(lambda: each(False), 60, "the lock gone on every node after its until", poll=0.2)
    assert fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]["locked"] is False
    # The node it was taken on journals its end once: not again when the leader's release
    # of the fleet's copy arrives (two more rounds of every node).
    fleet.rounds_pass()
    ends = [e for e in fleet.daemons[follower].events() if e["event"] == "qos_released"]
    assert len(ends) == 1, ends
    # Every other node's journal says what its gate did: the copy taken, then gone, once
    # each, naming the node the lock was taken on (the leader that ended it too).
    for i in set(range(3)) - {follower}:
        events = fleet.daemons[i].events()
        taken = [e for e in events if e["event"] == "qos_locked"]
        gone = [e for e in events if e["event"] == "qos_released"]
        assert len(taken) == 1 and len(gone) == 1, (i, taken, gone)
        assert taken[0]["by"].startswith("fleet:uid:") and "short freeze" in taken[0]["reason"]
        assert taken[0]["fleet_node"] == f"n{follower}", taken
        assert gone[0]["by"].startswith("fleet:"), gone


def test_a_frozen_node_is_shown_lost_then_is_an_alert(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(switch__timeout="2s")
    frozen: Daemon | None = None
    try:
        fleet.start()
        leader = fleet.leader()
        assert leader is not None
        i = next(j for j in range(3) if j != leader)
        others = [j for j in range(3) if j != i]
        frozen = fleet.daemons[i]
        frozen.signal(signal.SIGSTOP)

        def lost_on_first() -> bool:
            rows = fleet.fleet_status(others[0])["nodes"]
            return any(n["node"] == f"n{i}" and n["lost"] for n in rows)

        wait_until(lost_on_first, 60, f"n{i} shown lost", poll=0.2)
        # Lost, before its alert is due: its color is unknown, so not "every node serves
        # the desired color" (exit 0).
        out = guardctl("fleet", "status", socket=fleet.labs[others[0]].socket_path)
        assert out.returncode == 1 and "LOST" in out.stdout, out
        assert re.search(rf"n{i} .*lease expired [0-9.]+s ago, record [0-9.]+s old", out.stdout)
        # How long it is lost counts from its lease's end here, not from its last record.
        rows = fleet.fleet_status(others[0])["nodes"]
        row = next(n for n in rows if n["node"] == f"n{i}")
        assert row["lost_for_s"] is not None and row["lost_for_s"] <= row["lease_age_s"], row
        assert all(n["lost_for_s"] is None for n in rows if not n["lost"])

        def lost_everywhere() -> bool:
            for j in others:
                doc = fleet.fleet_status(j)
                row = next((n for n in doc["nodes"] if n["node"] == f"n{i}"), None)
                if row is None or not row["lost"] or row["lease"] != "expired":
                    return False
                assert row["serving"] == "green" and row["generation"] == 0
                if doc["alerts"] != [f"n{i}"]:
                    return False
                if not any(f"node n{i} is lost" in w for w in status_of(fleet.labs[j])["warnings"]):
                    return False
            return True

        wait_until(lost_everywhere, 60, f"n{i} lost and an alert on the others", poll=0.2)
        out = guardctl("fleet", "status", socket=fleet.labs[others[0]].socket_path)
        assert out.returncode == 1 and "ALERT" in out.stdout and "lost" in out.stdout, out
        for j in others:
            fleet.daemons[j].wait_event(
                "alert", timeout=30, where=lambda e: f"node n{i} is lost" in e["reason"]
            )
        # An operator's rollback meanwhile: done on the live nodes, and the answer says
        # which node it did not reach.
        out = guardctl("rollback", "--reason", "x", socket=fleet.labs[others[0]].socket_path)
        assert out.returncode == 0, out
        assert f"done on the live nodes; not on n{i} (lost" in out.stdout, out
        assert "apply generation 1 when back" in out.stdout, out
        frozen.signal(signal.SIGCONT)
        frozen = None
        wait_until(
            lambda: all(
                not fleet.fleet_status(j)["alerts"]
                and all(not n["lost"] for n in fleet.fleet_status(j)["nodes"])
                for j in range(3)
            ),
            60,
            "the thawed node live again everywhere",
            poll=0.2,
        )
        applied(fleet.daemons[i], 1)
        # The alert's end is journaled where it was raised.
        for j in others:
            fleet.daemons[j].wait_event(
                "alert",
                timeout=30,
                where=lambda e: f"node n{i} serves the desired blue again" in e["reason"],
            )
    finally:
        if frozen is not None:
            frozen.signal(signal.SIGCONT)


def test_local_fallback_a_cut_off_node_rolls_back_alone_and_says_so(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(fleet__local_fallback=True)
    proxy = fleet.through_proxy(2)
    fleet.start()
    cut, cut_d = fleet.labs[2], fleet.daemons[2]
    proxy.stop()
    wait_until(
        lambda: any("decides alone" in w for w in status_of(cut).get("warnings", [])),
        60,
        "the cut-off node saying it decides alone",
        poll=0.2,
    )
    fleet.green.set_mode("http_503")
    for i in (0, 1):
        assert fleet.labs[i].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
        applied(fleet.daemons[i], 1)
    # The cut-off node rolls back on its own, and its journal says so.
    assert cut.nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    done = cut_d.wait_event("rollback_completed", timeout=60)
    assert done["local_fallback"] is True and "generation" not in done
    assert done["severity"] in ("P0", "P1") and "decided alone" in done["reason"]
    started = cut_d.wait_event("rollback_started", timeout=5)
    assert started["local_fallback"] is True
    # Meanwhile etcd forgets the history the cut-off node's watch would resume from.
    fleet.etcd.compact()
    proxy.start()
    wait_until(
        lambda: (
            {n["node"]: n["generation"] for n in fleet.fleet_status(0)["nodes"]}
            == {"n0": 1, "n1": 1, "n2": 1}
        ),
        60,
        "the cut-off node at the fleet's generation once back",
        poll=0.2,
    )
    # It already served blue: the fleet's generation is taken, not applied twice.
    assert [e["event"] for e in cut_d.events() if e["event"] == "rollback_completed"] == [
        "rollback_completed"
    ]


def test_nodes_follow_the_fleet_by_watch_not_by_polling(fleet: FleetLab) -> None:
    fleet.start()
    wait_until(
        lambda: fleet.etcd.metric("etcd_debugging_mvcc_watcher_total") >= 3,
        30,
        "a watch from every node",
        poll=0.2,
    )
    # Idle, each node rewrites its record every third of its lease (a transaction: over
    # its own record only); it reads the whole prefix only as a safety net, not at every
    # round as a poll would.
    writes, reads = fleet.etcd.calls("Txn"), fleet.etcd.calls("Range")
    wait_until(lambda: fleet.etcd.calls("Txn") - writes >= 30, 60, "30 record refreshes", poll=0.2)
    read = fleet.etcd.calls("Range") - reads
    assert read <= 6, f"{read} range reads for 30 record refreshes"
    # And a change still reaches every node at once: the fleet rolls back as one.
    green_fails_and_the_fleet_rolls_back(fleet)


def logged(d: Daemon, text: str) -> bool:
    """Whether `d`'s log has `text`."""
    return text in d.log()


def test_a_watch_gone_silent_is_noticed_by_the_nodes_own_record(fleet: FleetLab) -> None:
    """The etcd member every node watches on is frozen (its connections stay open, silent):
    each node's own record, written through another member, does not come through its
    watch, so the node reads the prefix afresh there at once, not after the watch's idle
    time, and a lock taken meanwhile reaches every gate."""
    fleet.start()
    # Member 1 leads, so that the writes go on at once without member 0 (no election).
    fleet.etcd.lead_from(1)
    # A write through member 0 just before it freezes: every watch on it hears of it, so
    # none reaches its idle time (10 s) and moves to a live member before the lock's
    # records are due. A watch that did would be right, but would test nothing here.
    fleet.etcd.put(PREFIX + "/test-mark", "before the freeze")
    fleet.etcd.freeze(0)
    try:
        out = guardctl("qos", "lock", "--reason", "freeze 9", socket=fleet.labs[1].socket_path)
        assert out.returncode == 0, out
        for d in fleet.daemons:
            wait_until(functools.partial(logged, d, "fleet_watch_stuck"), 60, "a stuck watch")
        wait_until(
            lambda: all(blocked_by_the_fleet(lab) for lab in fleet.labs), 60, "every gate locked"
        )
    finally:
        fleet.etcd.thaw(0)


def lock_is_unknown_on(node: Lab) -> None:
    """Every surface of `node` that answers "is the QoS lock held" says UNKNOWN, never
    "deploys allowed"."""
    doc = status_of(node)
    assert doc["qos"]["locked"] is None and doc["qos"]["unknown"] is True, doc["qos"]
    config = ("--config", str(node.config_path))
    out = guardctl(*config, "status")
    assert out.returncode != 0, out
    assert "deploys allowed" not in out.stdout and "UNKNOWN, deploys not allowed" in out.stdout
    for where in (config, ("--socket", str(node.socket_path))):
        out = guardctl(*where, "wait", "unlocked", "--timeout", "2s")
        assert out.returncode == 3 and "unlocked" not in out.stdout, out
        assert "UNKNOWN" in out.stderr, out
    for via_config in (False, True):
        code, answer, said = qos_status(node, config=via_config)
        assert code == 3, said
        # What a CI gate parses says UNKNOWN too, never an empty answer.
        assert answer is not None, said
        assert (answer["locked"], answer["unknown"], answer["source"]) == (None, True, "fleet")
    notify = node.notify
    assert notify is not None

    def last_status() -> str:
        return ([m for m in notify.lines() if "STATUS=" in m] or [""])[-1]

    wait_until(
        lambda: "qos=unknown" in last_status(),
        60,
        "STATUS= saying qos=unknown",
        poll=0.2,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_node_that_never_reached_etcd_never_says_deploys_allowed(tmp_path: Path) -> None:
    # A typo'd port: etcd is never read, and the empty local lock file proves nothing.
    port = _closed_port()
    with make_lab(
        tmp_path,
        fleet__etcd=[f"http://127.0.0.1:{_closed_port()}"],
        fleet__node="n0",
        fleet__lease_ttl="2s",
        metrics__listen=f"127.0.0.1:{port}",
    ) as node:
        node.daemon()
        assert not node.lock_file.exists()
        lock_is_unknown_on(node)
        # What Prometheus scrapes says it cannot tell too: NaN, never 0 ("not locked").
        wait_until(
            lambda: qos_locked_metric(port) == "NaN",
            30,
            "guardd_qos_locked NaN on /metrics",
            poll=0.2,
        )


def qos_locked_metric(port: int) -> str | None:
    """The `guardd_qos_locked` sample as /metrics shows it on `port` (its text)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(("guardd_qos_locked ", "guardd_qos_locked{")):
                return str(line.rsplit(" ", 1)[1])
    return None


def lock_on(fleet: FleetLab, node: int, reason: str, for_: str | None = None) -> str:
    """`guardctl qos lock [--for for_] --reason reason` on `node`, done (exit 0) and then
    held everywhere (`lock_everywhere`); the answer's text."""
    when = ("--for", for_) if for_ is not None else ()
    out = guardctl("qos", "lock", *when, "--reason", reason, socket=fleet.labs[node].socket_path)
    assert out.returncode == 0, out
    wait_until(lambda: lock_everywhere(fleet, reason), 60, f"{reason!r} everywhere", poll=0.2)
    return out.stdout


def lock_everywhere(fleet: FleetLab, reason: str) -> bool:
    """The fleet's lock with `reason` in etcd, and the same reason and until on every node:
    in `status`, in `qos status`, and in its lock file (what a CI gate on the host reads)."""
    held = fleet.etcd.range(PREFIX + "/qos").get(PREFIX + "/qos")
    if not isinstance(held, dict) or held.get("reason") != reason:
        return False
    for node in fleet.labs:
        code, doc, _ = qos_status(node)
        qos = status_of(node)["qos"]
        local = qoslock.read_lock(node.lock_file)
        for shown in (doc or {}, qos, local.to_json()):
            if (shown.get("reason"), shown.get("until")) != (reason, held["until"]):
                return False
        if code != 1:
            return False
    return True


def test_a_second_guardd_with_a_nodes_name_is_a_clash_never_its_record(
    make_fleet: MakeFleet,
) -> None:
    """A fourth guardd configured with n1's name: it never overwrites n1's record (the
    fleet keeps seeing the real n1), and says so, once, in its journal, its warnings and
    STATUS=; every other node warns of it, and while it serves another color than the
    fleet's, the fleet has not converged: no gate allows a deploy."""
    fleet = make_fleet(qos__window="4s", switch__timeout="2s")
    fleet.start()
    clash = "another guardd publishes as node n1"
    real = fleet.etcd.lease_of(PREFIX + "/nodes/n1")
    assert real
    (fleet.tmp / "twin").mkdir()
    twin = Lab(
        fleet.tmp / "twin",
        upstreams=(fleet.blue, fleet.green),
        fleet__etcd=fleet.etcd.client_urls,
        fleet__node="n1",
        fleet__lease_ttl="2s",
    )
    try:
        twin_d = twin.daemon()
        said = twin_d.wait_event(
            "alert",
            timeout=60,
            where=lambda e: clash in e["reason"],
        )
        assert "give each node its own fleet.node" in said["reason"]
        assert any(clash in w for w in status_of(twin)["warnings"])
        assert twin.notify is not None
        wait_until(
            lambda: any("fleet=name-clash" in m for m in twin.notify.lines()),  # type: ignore[union-attr]
            30,
            "fleet=name-clash in STATUS=",
        )
        # The fleet's n1 is the real one all along: its record, under its own lease.
        fleet.rounds_pass()
        for i in (0, 2):
            rows = {r["node"]: r for r in fleet.fleet_status(i)["nodes"]}
            assert sorted(rows) == ["n0", "n1", "n2"], rows
        assert fleet.etcd.lease_of(PREFIX + "/nodes/n1") == real
        clashes = [e for e in twin_d.events() if clash in e.get("reason", "")]
        assert len(clashes) == 1, clashes
        # The others (the real n1 too) see it.
        for i in range(3):
            assert fleet.fleet_status(i)["twins"] == ["n1"]
            warned = status_of(fleet.labs[i])["warnings"]
            assert any("a second guardd runs as node n1" in w for w in warned), warned
        # `fleet status` says so too, in text, and is no "all is well" (exit 1 WARNING),
        # though every node serves the desired color.
        out = guardctl("fleet", "status", socket=fleet.labs[0].socket_path)
        assert out.returncode == 1, out
        assert "WARNING: fleet: a second guardd runs as node n1" in out.stdout, out
        # The twin's nginx cannot take blue: the fleet rolls back, the twin stays on green,
        # and the fleet's lock holds on every node past its window, naming the twin.
        twin.nginx.targets["blue"].write_text("upstream lab_app { not nginx; }\n")
        fleet.green.set_mode("http_503")
        assert fleet.all_serve("blue")
        twin_d.wait_event("rollback_failed", timeout=60)
        leader = fleet.leader()
        assert leader is not None
        fleet.daemons[leader].wait_event(
            "qos_extended",
            timeout=60,
            where=lambda e: "a second guardd named n1 serves green" in e["reason"],
        )
        # (Locked by the leader's extended window, which names the twin as its reason.)
        assert all(qos_status(lab, config=True)[0] == 1 for lab in fleet.labs)
    finally:
        twin.close()


def test_a_lock_taken_while_the_nodes_test_a_switch_refuses_the_switch(
    make_fleet: MakeFleet,
) -> None:
    """An operator's `switch` (no --force) passed the gate, and while the nodes test the
    target another operator freezes deploys on another node: the switch is refused, and
    no node moves. (The gate holds until the decision is written, not only at its start.)"""
    fleet = make_fleet()
    fleet.start()
    slow, d = fleet.labs[1], fleet.daemons[1]
    testing, go = fleet.tmp / "testing", fleet.tmp / "go"
    script = fleet.tmp / "slow-test"
    # n1's nginx test waits for the test's word, so the lock comes while it runs.
    script.write_text(
        f"#!/bin/sh\ntouch {testing}\nwhile [ ! -e {go} ]; do sleep 0.05; done\n"
        f"exec {shlex.join(slow.nginx.test_command)}\n"
    )
    script.chmod(0o755)
    mark = len(d.events())
    slow.write_config(switch__test_command=[str(script)])
    d.signal(signal.SIGHUP)
    d.wait_event("config_reloaded", timeout=30, after=mark)
    answers: list[Any] = []
    switch = threading.Thread(
        target=lambda: answers.append(
            guardctl("switch", "blue", "--reason", "deploy", socket=fleet.labs[0].socket_path)
        ),
        daemon=True,
    )
    switch.start()
    try:
        wait_until(testing.exists, 30, "n1 testing blue")
        # (n1 mirrors it once its test is over: its fleet rounds wait for the test.)
        locked = guardctl("qos", "lock", "--for", "1h", "--reason", "freeze during the switch",
                          socket=fleet.labs[2].socket_path)  # fmt: skip
        assert locked.returncode == 0, locked
    finally:
        go.touch()
        switch.join(timeout=120)
    (out,) = answers
    said = out.stdout + out.stderr
    assert out.returncode != 0, out
    assert "the fleet's QoS lock changed while the nodes tested blue" in said, said
    assert "freeze during the switch" in said, said
    wait_until(lambda: lock_everywhere(fleet, "freeze during the switch"), 60, "the freeze")
    fleet.rounds_pass()
    assert all(lab.nginx.served_color() == "green" for lab in fleet.labs)
    assert not any(e["event"] == "switch" for x in fleet.daemons for e in x.events())


def test_a_paused_leader_hands_over_the_lead_and_the_fleet_still_rolls_back(
    fleet: FleetLab,
) -> None:
    """`pause` on the leader stops that node deciding, not the whole fleet: it hands the
    leader key over, and green failing is rolled back by the node that took it."""
    fleet.start()
    old = fleet.leader()
    assert old is not None
    d = fleet.daemons[old]
    mark = len(d.events())
    out = guardctl("pause", "--reason", "maintenance", socket=fleet.labs[old].socket_path)
    assert out.returncode == 0, out
    handed = d.wait_event(
        "fleet_leader", timeout=30, after=mark, where=lambda e: e["previous"] == f"n{old}"
    )
    assert handed["node"] is None and "is paused" in handed["reason"], handed
    wait_until(lambda: fleet.leader() not in (None, old), 30, "another leader", poll=0.1)
    green_fails_and_the_fleet_rolls_back(fleet)
    assert fleet.leader() != old
    # Resumed, it follows: the lead stays where it went.
    out = guardctl("resume", socket=fleet.labs[old].socket_path)
    assert out.returncode == 0, out
    fleet.rounds_pass()
    assert fleet.leader() not in (None, old)


def test_every_node_paused_while_green_fails_no_gate_allows_a_deploy(
    make_fleet: MakeFleet,
) -> None:
    """Every node paused: no node decides, and green's users meet its 503s; every gate, on
    every host, says locked ("guardd is paused while green fails") until green recovers."""
    # Green fails until its errors leave the policy window: a short one, a short wait.
    fleet = make_fleet(policy__window="8s")
    fleet.start()
    for lab in fleet.labs:
        out = guardctl("pause", "--reason", "maintenance", socket=lab.socket_path)
        assert out.returncode == 0, out
    fleet.green.set_mode("http_503")

    def every_gate_locked() -> bool:
        for lab in fleet.labs:
            for config in (False, True):
                code, doc, _ = qos_status(lab, config=config)
                if code != 1 or doc is None or "is paused while green fails" not in doc["reason"]:
                    return False
        return True

    wait_until(every_gate_locked, 60, "every gate locked while paused on a failing green")
    assert all(lab.nginx.served_color() is None for lab in fleet.labs)  # nobody switched
    fleet.green.set_mode("ok")
    wait_until(lambda: all(allowed(lab) for lab in fleet.labs), 120, "every gate open again")


def test_a_replaced_fleet_lock_reaches_every_node(fleet: FleetLab) -> None:
    fleet.start()
    lock_on(fleet, 1, "short", "15s")
    lock_on(fleet, 1, "long", "1h")
    # Replaced by its owner with another reason and until too (a longer freeze).
    lock_on(fleet, 1, "longer", "2h")
    # From another node, a lock never shortens the fleet's: refused, naming the lock.
    out = guardctl("qos", "lock", "--for", "10m", "--reason", "shorter",
                   socket=fleet.labs[2].socket_path)  # fmt: skip
    assert out.returncode != 0, out
    assert "the fleet's lock (longer, fleet:uid:" in out.stdout + out.stderr, out
    assert "holds longer than asked" in out.stdout + out.stderr, out
    # A freeze until unlocked is the longest: it replaces it; then nothing shorter does.
    lock_on(fleet, 0, "freeze")
    out = guardctl("qos", "lock", "--for", "24h", "--reason", "a day",
                   socket=fleet.labs[2].socket_path)  # fmt: skip
    assert out.returncode != 0 and "until unlocked" in out.stdout + out.stderr, out
    fleet.rounds_pass()
    assert lock_everywhere(fleet, "freeze")


def test_an_old_release_does_not_release_a_rollbacks_lock(make_fleet: MakeFleet) -> None:
    # A guard window that outlasts the test: its lock ends only if something releases it.
    fleet = make_fleet(qos__window="10m")
    fleet.start()
    # The fleet's lock was taken and released by an operator: etcd keeps that release.
    out = guardctl("qos", "lock", "--reason", "freeze", socket=fleet.labs[0].socket_path)
    assert out.returncode == 0, out
    wait_until(lambda: all(n.lock_file.exists() for n in fleet.labs), 60, "the lock everywhere")
    out = guardctl("qos", "unlock", socket=fleet.labs[0].socket_path)
    assert out.returncode == 0, out
    wait_until(
        lambda: not any(n.lock_file.exists() for n in fleet.labs), 60, "the lock gone everywhere"
    )
    released = [sum(e["event"] == "qos_released" for e in d.events()) for d in fleet.daemons]
    green_fails_and_the_fleet_rolls_back(fleet)

    def rollback_locked_everywhere() -> bool:
        held = fleet.etcd.range(PREFIX + "/qos").get(PREFIX + "/qos")
        published = {n["generation"] for n in fleet.fleet_status(0)["nodes"]} == {1}
        return bool(isinstance(held, dict) and held.get("locked") and published)

    wait_until(rollback_locked_everywhere, 60, "the rollback's lock in the fleet", poll=0.2)
    # More rounds on every node: an old release acted on would be acted on by then. (Not a
    # lease age lower than one read before: a record just renewed reads 0.0, never lower.)
    fleet.rounds_pass()
    for node, d, before in zip(fleet.labs, fleet.daemons, released, strict=True):
        again = [e for e in d.events() if e["event"] == "qos_released"][before:]
        assert not again, again  # nobody unlocked since
        assert qoslock.read_lock(node.lock_file).held
        code, doc, said = qos_status(node)
        assert code == 1 and doc is not None, said


def noticed_the_store_went_back(fleet: FleetLab, *, new_cluster: bool = False) -> None:
    """Every node journals, once, that etcd's store went back (and from which revision).

    The same cluster restored: its revision is below the one the node knew. A new cluster:
    its cluster_id says so, whatever revision its own writes took it to by the node's read
    (the nodes publish again at once, and may reach the old revision first)."""
    for d in fleet.daemons:
        said = d.wait_event(
            "alert", timeout=60, where=lambda e: "etcd's store went back" in e["reason"]
        )
        assert "restored from a backup?" in said["reason"]
        if new_cluster:
            assert "(its cluster_id changed: a new cluster)" in said["reason"], said
        else:
            assert said["previous_revision"] > said["revision"], said
    for d in fleet.daemons:
        # (Not what the leader writes back afterwards, "... before etcd's store went back".)
        alerts = [
            e for e in d.events() if e.get("reason", "").startswith("fleet: etcd's store went back")
        ]
        assert len(alerts) == 1, alerts


def generations(fleet: FleetLab) -> dict[str, int]:
    return {n["node"]: n["generation"] for n in fleet.fleet_status(0)["nodes"]}


def test_after_etcd_is_wiped_the_fleet_decides_above_the_old_generations(
    fleet: FleetLab,
) -> None:
    fleet.start()
    green_fails_and_the_fleet_rolls_back(fleet)
    fleet.green.set_mode("ok")
    before = fleet.etcd.revision()
    # The store starts over (an empty backup restored): revision 1, no desired, no leader.
    fleet.etcd.wipe()
    assert fleet.etcd.revision() < before
    noticed_the_store_went_back(fleet)
    # The fleet's decision survives: the new leader writes desired again as generation 1
    # from what the nodes applied, and nobody applies it twice.
    wait_until(
        lambda: (
            (fleet.etcd.range(PREFIX + "/desired").get(PREFIX + "/desired") or {}).get("generation")
            == 1
        ),
        60,
        "desired written again as generation 1",
        poll=0.2,
    )
    desired = fleet.etcd.range(PREFIX + "/desired")[PREFIX + "/desired"]
    assert desired["color"] == "blue"
    # The fleet's rollback budget survives too: the one rollback before is written back.
    wait_until(
        lambda: len(fleet.etcd.range(PREFIX + "/rollbacks").get(PREFIX + "/rollbacks") or []) == 1,
        60,
        "the fleet's rollbacks written back",
        poll=0.2,
    )
    wait_until(
        lambda: generations(fleet) == {"n0": 1, "n1": 1, "n2": 1},
        60,
        "every node's record in the new store, at generation 1",
        poll=0.2,
    )
    # An operator's switch afterwards is a generation above the old ones, applied by every
    # node; its two phases ride on the watch (the prepare reaches every node at once).
    started = time.monotonic()
    out = guardctl(
        "switch", "green", "--force", "--reason", "after the restore",
        socket=fleet.labs[1].socket_path,
    )  # fmt: skip
    assert out.returncode == 0, out
    assert fleet.all_serve("green")
    for d in fleet.daemons:
        done = d.wait_event("switch", timeout=60, where=lambda e: e.get("generation") == 2)
        assert done["to"] == "green"
    took = time.monotonic() - started
    assert took < SAFETY_READ_S / 2, f"the switch took {took:.1f}s: the watch did not follow"
    # And the one after it too (an operator's rollback), at generation 3 everywhere.
    out = guardctl("rollback", "--reason", "again", socket=fleet.labs[2].socket_path)
    assert out.returncode == 0, out
    assert fleet.all_serve("blue")
    for d in fleet.daemons:
        applied(d, 3)
        # Each generation applied once: the rewritten generation 1 was not applied again.
        completed = [e["generation"] for e in d.events() if e["event"] == "rollback_completed"]
        assert completed == [1, 3], completed
        assert [e["generation"] for e in d.events() if e["event"] == "switch"] == [2]
    wait_until(
        lambda: generations(fleet) == {"n0": 3, "n1": 3, "n2": 3},
        60,
        "every node at generation 3",
        poll=0.2,
    )


def test_a_lock_lost_with_etcds_store_is_published_again_and_no_stale_expiry_ends_it(
    fleet: FleetLab,
) -> None:
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    follower = next(i for i in range(3) if i != leader)
    old_id = fleet.etcd.cluster_id()
    # A lock taken on the leader, due to end in a while; then the cluster is replaced.
    lock_on(fleet, leader, "before", "40s")
    until = fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]["until"]
    fleet.etcd.wipe(new_cluster=True)
    assert fleet.etcd.cluster_id() != old_id
    noticed_the_store_went_back(fleet, new_cluster=True)
    # Its owner publishes it again: the fleet's lock is not lost with the store.
    wait_until(lambda: lock_everywhere(fleet, "before"), 60, "the lock back in etcd", poll=0.2)
    assert fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]["until"] == until
    # Replaced on another node in the new store, the new lock is everywhere, the owner's
    # file too; the old lock's end releases nothing (no stale expiry, no spurious release).
    marks = [len(d.events()) for d in fleet.daemons]
    lock_on(fleet, follower, "after", "1h")
    assert time.time() < parse_rfc3339(until), "the new lock mirrored only at the old one's end"
    past_until(until)
    held = fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]
    assert held["locked"] is True and held["reason"] == "after", held
    assert lock_everywhere(fleet, "after")
    for d, mark in zip(fleet.daemons, marks, strict=True):
        released = [e for e in d.events()[mark:] if e["event"] == "qos_released"]
        assert not released, released


def test_the_fleets_keys_deleted_from_etcd_never_open_a_gate_and_are_put_back(
    make_fleet: MakeFleet,
) -> None:
    """`etcdctl del --prefix` under a fleet that rolled back and holds the rollback's lock:
    no gate on any host (socket or --config) ever says "deploys allowed" meanwhile; the
    lock, the decision and the rollback budget come back as the nodes knew them."""
    fleet = make_fleet(qos__window="10m")
    fleet.start()
    green_fails_and_the_fleet_rolls_back(fleet)
    wait_until(lambda: all(blocked_by_the_fleet(lab) for lab in fleet.labs), 60, "the lock")
    # An operator's resume: the budget counts only rollbacks after it, so it must survive.
    out = guardctl("resume", "--reason", "ack", socket=fleet.labs[1].socket_path)
    assert out.returncode == 0, out
    keys = fleet.etcd.range(PREFIX + "/", prefix=True)
    spent, lock = keys[PREFIX + "/rollbacks"], keys[PREFIX + "/qos"]
    rearmed = keys[PREFIX + "/rearmed"]
    assert len(spent) == 1 and lock["locked"] is True and rearmed["reason"] == "ack", keys
    answers: list[tuple[int, str]] = []
    done = threading.Event()

    def gates() -> None:
        while not done.is_set():
            for lab in fleet.labs:
                for config in (False, True):
                    code, _, said = qos_status(lab, config=config)
                    answers.append((code, said))

    watcher = threading.Thread(target=gates, daemon=True)
    watcher.start()
    try:
        assert fleet.etcd.delete(PREFIX + "/", prefix=True) > 0

        def put_back() -> bool:
            now = fleet.etcd.range(PREFIX + "/", prefix=True)
            return (
                now.get(PREFIX + "/rollbacks") == spent
                and now.get(PREFIX + "/rearmed") == rearmed
                and (now.get(PREFIX + "/qos") or {}).get("reason") == lock["reason"]
                and (now.get(PREFIX + "/desired") or {}).get("color") == "blue"
            )

        wait_until(
            put_back, 90, "the budget, the resume, the lock and the decision put back", poll=0.3
        )
        fleet.rounds_pass()
    finally:
        done.set()
        watcher.join(timeout=60)
    assert len(answers) >= 6, answers
    allowed = [said for code, said in answers if code == 0]
    assert not allowed, allowed[:3]
    told = [
        e
        for d in fleet.daemons
        for e in d.events()
        if "is gone from etcd" in (e.get("reason") or "") and "never deletes it" in e["reason"]
    ]
    assert told, "no node said the fleet's keys were gone"
    assert all(blocked_by_the_fleet(lab) for lab in fleet.labs)


def copy_of_lock_taken_on(node: str) -> Callable[[dict[str, Any]], bool]:
    """Whether a journal event is about a copy of the fleet's lock taken on `node` (the
    tests' locks there say "on <node>")."""
    return lambda e: e.get("fleet_node") == node and f"on {node}" in e["reason"]


def past_until(until: str, margin: float = 4.0) -> None:
    """Wait until the wall clock is `margin` seconds past the RFC 3339 time `until`: the
    leader's expiry round and every node's lock step have had their turn by then."""
    end = parse_rfc3339(until) + margin
    wait_until(lambda: time.time() > end, end - time.time() + 30, f"{margin}s past {until}")


def test_an_operators_lock_replaced_from_another_node_is_mirrored_and_ends_quietly(
    fleet: FleetLab,
) -> None:
    fleet.start()
    for a, b, how_long in ((1, 2, "12s"), (0, 1, "10s")):
        lock_on(fleet, a, f"on n{a}", how_long)
        until = fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]["until"]
        mark = len(fleet.daemons[a].events())
        # Taken on another host, for longer: the answer says what it replaced, and n{a}'s
        # own file now mirrors the fleet's lock, by fleet:<who>.
        said = lock_on(fleet, b, f"on n{b}", "1h")
        assert f"it replaces the fleet's lock (on n{a}, fleet:uid:" in said, said
        local = qoslock.read_lock(fleet.labs[a].lock_file)
        assert (local.by or "").startswith("fleet:"), local
        # n{a}'s gate now holds n{b}'s lock: its journal says so, and when: at once, not
        # only when n{a}'s own lock would have ended (the daemon's time, not the test's,
        # which a busy machine stretches).
        mirrored = fleet.daemons[a].wait_event(
            "qos_locked", timeout=30, after=mark, where=copy_of_lock_taken_on(f"n{b}")
        )
        assert parse_rfc3339(mirrored["ts"]) < parse_rfc3339(until), (mirrored, until)
        past_until(until)
        assert lock_everywhere(fleet, f"on n{b}")
        again = [e for e in fleet.daemons[a].events()[mark:] if e["event"] == "qos_released"]
        assert not again, again
        # Unlocked by the operator: every node's file is free again, for the next round.
        out = guardctl("qos", "unlock", socket=fleet.labs[b].socket_path)
        assert out.returncode == 0, out
        wait_until(
            lambda: not any(n.lock_file.exists() for n in fleet.labs),
            60,
            "the lock gone everywhere",
            poll=0.2,
        )


def test_a_rollback_asked_on_a_follower_locks_the_whole_fleet_until_its_window_passes(
    make_fleet: MakeFleet,
) -> None:
    """The guard window of a rollback the leader did not decide itself (an operator's, asked
    on a follower) is the fleet's lock all the same: every node says deploys are blocked and
    a promote from a third node is refused, until the window passes; then every node
    releases it, journaled as the releasing node's."""
    # 12 s: the checks below, two rounds apart, must fit in the window on a busy machine.
    fleet = make_fleet(qos__window="12s")
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    follower, third = [i for i in range(3) if i != leader][:2]
    out = guardctl("rollback", "--reason", "bad release", socket=fleet.labs[follower].socket_path)
    assert out.returncode == 0, out
    assert fleet.all_serve("blue")

    wait_until(
        lambda: all(blocked_by_the_fleet(lab) for lab in fleet.labs), 30, "locked everywhere"
    )
    wait_until(lambda: all(lab.lock_file.exists() for lab in fleet.labs), 30, "every lock file")
    held = fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]
    assert held["locked"] is True and "rollback green -> blue" in held["reason"], held
    # An operator's rollback spends none of the fleet's automatic-rollback budget.
    assert fleet.fleet_status(leader)["rollbacks"] == 0
    # Still blocked a few rounds later (a copy must not be dropped as the fleet's lock
    # read "unlocked" a moment before): the gate on every host, and a promote.
    fleet.rounds_pass()
    assert all(blocked_by_the_fleet(lab) for lab in fleet.labs)
    promoted = guardctl("promote", "--reason", "x", socket=fleet.labs[third].socket_path)
    assert promoted.returncode == 1 and "QoS lock" in promoted.stdout + promoted.stderr
    # The window passes: released on every node, each release said by a node.
    wait_until(
        lambda: (
            all(not lab.lock_file.exists() for lab in fleet.labs)
            and all(not blocked_by_the_fleet(lab) for lab in fleet.labs)
        ),
        60,
        "the fleet's lock released everywhere",
        poll=0.3,
    )
    released = [e for d in fleet.daemons for e in d.events() if e["event"] == "qos_released"]
    assert released and all(e["by"] != "fleet:unknown" for e in released), released
    assert not [e for e in released if "(released)" in e["reason"]], released
    assert all(fleet.labs[i].nginx.served_color() == "blue" for i in range(3))
    # The other nodes' journals name the node the operator asked on.
    for i in set(range(3)) - {follower}:
        done = applied(fleet.daemons[i], 1)
        assert done["by"].startswith("fleet:uid:") and done["fleet_node"] == f"n{follower}"


def test_resume_on_any_node_re_arms_the_fleets_budget_and_ends_every_hold(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet(policy__max_rollbacks=1)
    fleet.start()
    green_fails_and_the_fleet_rolls_back(fleet)
    fleet.green.set_mode("ok")
    leader = fleet.leader()
    assert leader is not None
    follower = next(i for i in range(3) if i != leader)
    wait_until(
        lambda: guardctl("qos", "status", socket=fleet.labs[follower].socket_path).returncode == 0,
        60,
        "the rollback's guard window over",
        poll=0.3,
    )
    code, said = promote(fleet.labs[follower])
    assert code == 0, said
    assert fleet.all_serve("green")
    # Green fails again: the fleet's budget (1 an hour) is spent, every node holds.
    fleet.green.set_mode("http_503")
    for d in fleet.daemons:
        d.wait_event("hold", timeout=60, where=lambda e: "budget" in str(e.get("reason")))
    for lab in fleet.labs:  # held on the failing color: no node switched
        assert lab.nginx.active_link.resolve() == lab.nginx.targets["green"].resolve()

    # Users meet a failing green and no node will act: no gate says "deploys allowed".
    wait_until(lambda: gates_say_hold(fleet), 30, "every gate locked by the hold", poll=0.2)
    # An operator resumes on a follower: the fleet rolls back, every node's hold ends.
    mark = len(fleet.daemons[leader].events())
    out = guardctl("resume", socket=fleet.labs[follower].socket_path)
    assert out.returncode == 0, out
    assert fleet.all_serve("blue")
    for i, d in enumerate(fleet.daemons):
        if i != follower:
            resumed = d.wait_event("resumed", timeout=30)
            assert resumed["by"] == "fleet:uid:0(root)", resumed
            assert resumed["reason"].startswith(f"the fleet was resumed on n{follower}")
    status = fleet.fleet_status(leader)
    assert status["rollbacks"] == 2 and status["desired"]["color"] == "blue"
    # The rollback's guard window takes the hold's lock's place: a window with an end,
    # never "a lock was already held (guardd holds ...): until unlocked"; then it ends on
    # every host.
    taken = fleet.daemons[leader].wait_event(
        "qos_locked",
        timeout=30,
        after=mark,
        where=lambda e: e["reason"].startswith("rollback green -> blue"),
    )
    assert taken["until"] is not None and "already held" not in taken["reason"], taken
    all_released(fleet)


def test_a_holds_lock_of_a_leader_killed_while_holding_ends_once_it_is_back(
    make_fleet: MakeFleet,
) -> None:
    """No rollback allowed (a spent budget): every node holds on a failing green, and the
    fleet's lock is the leader's hold's (no end). The leader is killed, green is fixed, an
    operator resumes on another node. The killed leader, started again, knows that lock as
    its own from before: its hold over, it ends it, and every gate opens."""
    # Green's errors leave the policy window soon: a resume then holds no more.
    fleet = make_fleet(policy__max_rollbacks=0, policy__window="8s")
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    follower = next(i for i in range(3) if i != leader)
    fleet.green.set_mode("http_503")
    for d in fleet.daemons:
        d.wait_event("hold", timeout=60, where=lambda e: "budget" in str(e.get("reason")))
    wait_until(lambda: gates_say_hold(fleet), 30, "every gate locked by the hold", poll=0.2)
    held = fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]
    assert (held["by"], held["node"], held["until"]) == ("guardd", f"n{leader}", None), held
    fleet.daemons[leader].kill9()
    fleet.green.set_mode("ok")
    wait_until(
        lambda: status_of(fleet.labs[follower])["upstreams"]["green"]["error_ratio"] == 0,
        60,
        "green's errors out of the policy window",
        poll=0.3,
    )
    out = guardctl("resume", socket=fleet.labs[follower].socket_path)
    assert out.returncode == 0, out
    fleet.daemons[leader] = fleet.labs[leader].daemon()
    all_released(fleet)
    assert fleet.all_serve("green")


def test_a_forced_switch_that_fails_to_verify_is_undone_for_the_whole_fleet(
    make_fleet: MakeFleet,
) -> None:
    """`switch green --force` while green fails: it fails at verify on the node that asked
    and is undone there; the fleet's desired color goes back to blue with it, so that no
    node keeps trying green (each try would put its users on green's errors)."""
    fleet = make_fleet(switch__timeout="2s")
    fleet.start()
    green_fails_and_the_fleet_rolls_back(fleet)
    out = guardctl(
        "switch", "green", "--force", "--reason", "try it", socket=fleet.labs[0].socket_path
    )
    said = out.stdout + out.stderr
    assert out.returncode == 1 and "was undone" in said, out
    assert "the fleet's desired color is blue again (generation 3)" in said, out
    desired = fleet.etcd.range(PREFIX + "/desired")[PREFIX + "/desired"]
    assert (desired["color"], desired["generation"]) == ("blue", 3), desired
    assert desired["reason"].startswith("undone: switch to green failed at verify"), desired
    every_node_at(fleet, 3)
    # Three retry periods and more (2 s, then 4 s, then 8 s): no node tries green again.
    only_blue_served_for(fleet, 16)


def test_a_release_guardd_did_not_write_ends_no_lock_and_opens_no_gate(
    make_fleet: MakeFleet,
) -> None:
    """`etcdctl put <prefix>/qos '{"locked": false}'` during the rollback's guard window:
    not a release guardd wrote (no `by`, no `released_at`), so no node ends its lock and
    no gate opens; the leader publishes its window again."""
    fleet = make_fleet(qos__window="10m")
    fleet.start()
    green_fails_and_the_fleet_rolls_back(fleet)
    wait_until(lambda: all(blocked_by_the_fleet(lab) for lab in fleet.labs), 60, "the lock")
    before = fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"]
    marks = [len(d.events()) for d in fleet.daemons]
    fleet.etcd.put(PREFIX + "/qos", '{"locked": false}')
    answers: list[int] = []
    end = time.monotonic() + 8
    while time.monotonic() < end:
        answers += [qos_status(lab, config=c)[0] for lab in fleet.labs for c in (False, True)]
    assert answers and 0 not in answers, answers
    wait_until(
        lambda: (
            fleet.etcd.range(PREFIX + "/qos")[PREFIX + "/qos"].get("reason") == before["reason"]
        ),
        60,
        "the leader's window published again",
        poll=0.3,
    )
    assert all(lab.lock_file.exists() for lab in fleet.labs)
    for d, mark in zip(fleet.daemons, marks, strict=True):
        released = [e for e in d.events()[mark:] if e["event"] == "qos_released"]
        assert not released, released


def test_the_fleets_decision_lost_while_every_node_was_down_is_written_back(
    make_fleet: MakeFleet,
) -> None:
    """Every guardd stopped, then the fleet's keys deleted: no node saw them go. Started
    again, the leader writes the decision back from what the nodes applied (their
    `fleet.json`), with an alert; the numbering goes on above it. The rollback budget
    the nodes last read comes back too: a new store never refills it."""
    fleet = make_fleet()
    fleet.start()
    green_fails_and_the_fleet_rolls_back(fleet)
    wait_until(
        lambda: all(fleet.fleet_status(i)["rollbacks"] == 1 for i in range(len(fleet.daemons))),
        30,
        "every node read the fleet's rollback",
        poll=0.3,
    )
    for d in fleet.daemons:
        assert d.stop() == 0
    assert fleet.etcd.delete(PREFIX + "/", prefix=True) > 0
    fleet.start()

    def written_back() -> bool:
        desired = fleet.etcd.range(PREFIX + "/desired").get(PREFIX + "/desired")
        return isinstance(desired, dict) and desired.get("color") == "blue"

    wait_until(written_back, 60, "desired written back", poll=0.3)
    desired = fleet.etcd.range(PREFIX + "/desired")[PREFIX + "/desired"]
    assert desired["generation"] == 1, desired
    leader = fleet.leader()
    assert leader is not None
    fleet.daemons[leader].wait_event(
        "alert", timeout=30, where=lambda e: "desired written again as generation 1" in e["reason"]
    )
    assert all(lab.nginx.served_color() == "blue" for lab in fleet.labs)
    wait_until(
        lambda: len(fleet.etcd.range(PREFIX + "/rollbacks").get(PREFIX + "/rollbacks") or []) == 1,
        30,
        "the fleet's rollback written back",
        poll=0.3,
    )
    fleet.daemons[fleet.leader() or 0].wait_event(
        "alert", timeout=30, where=lambda e: "budget that etcd's store lacks" in e["reason"]
    )
    assert all(fleet.fleet_status(i)["rollbacks"] == 1 for i in range(len(fleet.daemons)))


@pytest.mark.parametrize("value", ["garbage", '{"color": "purple", "generation": 50}'])
def test_a_decision_guardd_did_not_write_keeps_every_gate_locked(
    make_fleet: MakeFleet, value: str
) -> None:
    """`desired` overwritten by hand with something that is not a decision: which color
    users should meet cannot be told, so no gate says "deploys allowed", and `fleet status`
    warns; a `rollback` writes a new decision and the gates open."""
    fleet = make_fleet()
    fleet.start()
    # Blue, the rollback target, serves already: `rollback` is no no-op while the fleet's
    # decision cannot be read, it writes a new one.
    green_fails_and_the_fleet_rolls_back(fleet)
    all_released(fleet)
    fleet.etcd.put(PREFIX + "/desired", value)

    def all_locked() -> bool:
        for lab in fleet.labs:
            for config in (False, True):
                code, doc, _ = qos_status(lab, config=config)
                if code != 1 or "not a decision guardd wrote" not in str((doc or {}).get("reason")):
                    return False
        return True

    wait_until(all_locked, 30, "every gate locked by the unreadable decision", poll=0.3)
    out = guardctl("fleet", "status", socket=fleet.labs[0].socket_path)
    assert out.returncode == 1 and "not a decision guardd wrote" in out.stdout, out
    out = guardctl("rollback", "--reason", "a new decision", socket=fleet.labs[1].socket_path)
    assert out.returncode == 0, out
    all_released(fleet)


def test_a_hand_written_decision_for_a_failing_color_is_put_back_by_the_leader(
    make_fleet: MakeFleet,
) -> None:
    """`desired` written by hand for green while green fails: every node tries it, fails
    at verify and undoes it; the leader, whose probes see green fail, writes blue back, so
    no node tries green again."""
    fleet = make_fleet(switch__timeout="2s")
    fleet.start()
    green_fails_and_the_fleet_rolls_back(fleet)
    doc = {"color": "green", "generation": 99, "kind": "switch", "by": "mallory",
           "reason": "by hand", "at": time.time(), "node": "elsewhere"}  # fmt: skip
    fleet.etcd.put(PREFIX + "/desired", json.dumps(doc))

    def put_back() -> bool:
        now = fleet.etcd.range(PREFIX + "/desired")[PREFIX + "/desired"]
        return bool(now["color"] == "blue" and now["generation"] > 99)

    wait_until(put_back, 60, "blue written back by the leader", poll=0.3)
    desired = fleet.etcd.range(PREFIX + "/desired")[PREFIX + "/desired"]
    assert desired["reason"].startswith("undone: the fleet's desired green (generation 99)")
    every_node_at(fleet, desired["generation"])
    only_blue_served_for(fleet, 12)  # past the 2 s, 4 s and 8 s retries of generation 99


def test_a_node_restarted_after_the_fleet_released_its_window_does_not_lock_again(
    make_fleet: MakeFleet,
) -> None:
    """The leader, whose guard window is the fleet's lock, is killed; the fleet's lock is
    released while it is down. Restarted, it finds its window in state.json, taken before
    that release: it ends it, and locks nothing again."""
    fleet = make_fleet(qos__window="4s")
    fleet.start()
    green_fails_and_the_fleet_rolls_back(fleet)
    leader = fleet.leader()
    assert leader is not None
    wait_until(fleet.labs[leader].lock_file.exists, 30, "the leader's window")
    fleet.daemons[leader].kill9()

    def released() -> bool:
        held = fleet.etcd.range(PREFIX + "/qos").get(PREFIX + "/qos") or {}
        return held.get("locked") is False

    wait_until(released, 90, "the fleet's lock released while the leader is down", poll=0.3)
    assert fleet.labs[leader].lock_file.exists()  # its window, as it was killed
    back = fleet.labs[leader].daemon()
    back.wait_event(
        "qos_released",
        timeout=60,
        where=lambda e: "the fleet's QoS lock was released" in e["reason"],
    )
    fleet.rounds_pass(3)
    assert released(), fleet.etcd.range(PREFIX + "/qos")
    assert not any(lab.lock_file.exists() for lab in fleet.labs)
    assert all(allowed(lab) for lab in fleet.labs)
    fleet.daemons[leader] = back


def gates_say_hold(fleet: FleetLab) -> bool:
    """Every gate, through the socket and from the config, is locked by a hold."""
    for lab in fleet.labs:
        for config in (False, True):
            code, doc, _ = qos_status(lab, config=config)
            if code != 1 or doc is None or "guardd holds: " not in str(doc["reason"]):
                return False
    return True


def all_released(fleet: FleetLab) -> None:
    """Every host's lock file gone and every gate open, through the socket and the config."""
    try:
        wait_until(
            lambda: (
                not any(lab.lock_file.exists() for lab in fleet.labs)
                and all(allowed(lab, config=c) for lab in fleet.labs for c in (False, True))
            ),
            60,
            "every lock released",
            poll=0.3,
        )
    except AssertionError as e:
        held = {
            i: (
                lab.lock_file.read_text() if lab.lock_file.exists() else None,
                qos_status(lab)[2],
                [(x["event"], x["reason"]) for x in fleet.daemons[i].events()[-6:]],
            )
            for i, lab in enumerate(fleet.labs)
        }
        raise AssertionError(f"{e}; still held: {held}") from None


def fleet_says_holding(fleet: FleetLab) -> bool:
    """`fleet status` on every node exits 1, every row says `hold`, and the warnings name
    the other nodes as holding."""
    for i, lab in enumerate(fleet.labs):
        out = guardctl("fleet", "status", "--json", socket=lab.socket_path)
        doc = json.loads(out.stdout)
        others = {f"n{j}" for j in range(len(fleet.labs)) if j != i}
        named = {w.split()[2] for w in doc["warnings"] if w.endswith("says why)")}
        if out.returncode != 1 or named != others:
            return False
        if [row["state"] for row in doc["nodes"]] != ["hold"] * len(fleet.labs):
            return False
    return True


def test_a_holds_lock_ends_on_every_node_when_the_hold_does(make_fleet: MakeFleet) -> None:
    """Both colors down: every node holds, and its lock blocks deploys on every host (the
    leader's is the fleet's). Green back: the hold ends, and so does every lock."""
    # Green fails until its errors leave the policy window: a short one, a short wait.
    fleet = make_fleet(policy__window="8s")
    fleet.start()
    fleet.blue.set_mode("http_503")
    fleet.green.set_mode("http_503")
    for d in fleet.daemons:
        d.wait_event("hold", timeout=60)
    wait_until(lambda: gates_say_hold(fleet), 30, "every gate locked by the hold", poll=0.2)
    # Every node's `fleet status` says which nodes hold, not only each node's `status`.
    holding = functools.partial(fleet_says_holding, fleet)
    wait_until(holding, 30, "every fleet status naming every node that holds", poll=0.2)
    fleet.green.set_mode("ok")
    all_released(fleet)
    for lab in fleet.labs:
        assert lab.nginx.served_color() == "green"


def test_a_lock_lost_by_a_restore_is_noticed_though_the_revision_went_on(
    tmp_path: Path,
    make_fleet: MakeFleet,
) -> None:
    """etcd restored from a backup taken just before an operator's lock, and written to
    (other clients, the nodes' own records) past the revision the nodes knew before they
    read it again: no answer is below what they saw. The node whose lock the store lost
    notices all the same (its own acknowledged write is gone) and publishes it again; every
    node is locked again and a switch elsewhere is refused."""
    fleet = make_fleet()
    proxies = [fleet.through_proxy(i) for i in range(3)]
    fleet.start()
    fleet.etcd.backup(tmp_path / "backup")
    wait_until(
        lambda: fleet.settled() and all(fleet.fleet_status(i)["etcd_reachable"] for i in range(3)),
        60,
        "every node reaching etcd again after the backup",
        poll=0.2,
    )
    leader = fleet.leader()
    assert leader is not None
    taker, other = [i for i in range(3) if i != leader][:2]
    lock_on(fleet, taker, "freeze 9", "10m")
    high = fleet.etcd.revision()
    for proxy in proxies:  # no node reaches etcd while it is restored and written to
        proxy.stop()
    fleet.etcd.restore(tmp_path / "backup")
    while fleet.etcd.revision() <= high + 10:
        fleet.etcd.put("/elsewhere/filler", "x")
    for proxy in proxies:
        proxy.start()
    said = fleet.daemons[taker].wait_event(
        "alert", timeout=60, where=lambda e: "etcd's store went back" in e["reason"]
    )
    assert "it lost " + PREFIX + "/qos" in said["reason"], said
    wait_until(
        lambda: (
            (fleet.etcd.range(PREFIX + "/qos").get(PREFIX + "/qos") or {}).get("reason")
            == "freeze 9"
        ),
        60,
        "the lock published again",
        poll=0.2,
    )
    wait_until(
        lambda: lock_everywhere(fleet, "freeze 9"), 60, "the lock on every node again", poll=0.2
    )
    refused = guardctl("switch", "blue", socket=fleet.labs[other].socket_path)
    assert refused.returncode == 1 and "QoS lock" in refused.stdout + refused.stderr


def test_a_nodes_own_window_ending_under_the_fleets_lock_never_leaves_the_file_empty(
    make_fleet: MakeFleet,
) -> None:
    """A follower's own guard window ends while an operator's lock, taken on another node,
    holds the fleet: the follower's lock file goes from its window to the copy of the
    fleet's lock in one step, so a gate that reads the file never finds it missing."""
    fleet = make_fleet(qos__window="4s")
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    follower = next(i for i in range(3) if i != leader)
    lab, d = fleet.labs[follower], fleet.daemons[follower]
    out = guardctl("rollback", "--reason", "bad release", socket=lab.socket_path)
    assert out.returncode == 0, out
    assert fleet.all_serve("blue")
    d.wait_event("qos_locked")
    out = guardctl(
        "qos", "lock", "--for", "2m", "--reason", "freeze 12",
        socket=fleet.labs[leader].socket_path,
    )  # fmt: skip
    assert out.returncode == 0, out
    wait_until(
        lambda: (
            (fleet.etcd.range(PREFIX + "/qos").get(PREFIX + "/qos") or {}).get("reason")
            == "freeze 12"
        ),
        30,
        "the operator's lock as the fleet's",
        poll=0.1,
    )
    missing: list[float] = []
    done = threading.Event()

    def gate() -> None:  # a CI gate that tests the file, as often as it can
        while not done.is_set():
            if not lab.lock_file.exists():
                missing.append(time.monotonic())
            done.wait(0.005)

    watcher = threading.Thread(target=gate, daemon=True)
    watcher.start()
    try:
        ended = d.wait_event(
            "qos_released", timeout=60, where=lambda e: "guard window" in e["reason"]
        )
        fleet.rounds_pass()
    finally:
        done.set()
        watcher.join(timeout=10)
    assert missing == [], f"the lock file was missing {len(missing)} times"
    assert "the fleet's lock" in ended["reason"] and "holds" in ended["reason"], ended
    held = json.loads(lab.lock_file.read_text())
    assert held["reason"] == "freeze 12" and held["by"].startswith("fleet:"), held


def fleet_lock() -> Callable[[FleetLab], dict[str, Any]]:
    """The `qos` key of a fleet as etcd holds it ({} when there is none)."""
    return lambda fleet: fleet.etcd.range(PREFIX + "/qos").get(PREFIX + "/qos") or {}


def test_a_new_leaders_own_window_never_shortens_an_operators_lock(
    make_fleet: MakeFleet,
) -> None:
    """An operator's freeze, taken on one node, outlasts a follower's own guard window;
    the leader dies and that follower leads: the freeze stays the fleet's lock, on every
    node, and a shorter `qos lock` asked on the new leader is refused naming it."""
    # The window outlasts the change of leader; the freeze outlasts the test.
    fleet = make_fleet(qos__window="1m")
    fleet.start()
    held = fleet_lock()
    leader = fleet.leader()
    assert leader is not None
    follower, third = [i for i in range(3) if i != leader]
    out = guardctl("rollback", "--reason", "bad release", socket=fleet.labs[follower].socket_path)
    assert out.returncode == 0, out
    assert fleet.all_serve("blue")
    fleet.daemons[follower].wait_event("qos_locked")  # its own guard window
    out = guardctl(
        "qos", "lock", "--for", "2h", "--reason", "freeze 2h",
        socket=fleet.labs[third].socket_path,
    )  # fmt: skip
    assert out.returncode == 0, out
    wait_until(lambda: held(fleet).get("reason") == "freeze 2h", 30, "the freeze in etcd")
    freeze = held(fleet)
    # The third node paused does not campaign: the follower, whose window runs, leads next.
    out = guardctl("pause", "--reason", "maintenance", socket=fleet.labs[third].socket_path)
    assert out.returncode == 0, out
    fleet.daemons[leader].kill9()
    wait_until(lambda: fleet.leader() == follower, 60, "the follower leads", poll=0.1)
    fleet.daemons[follower].wait_event(
        "fleet_leader", timeout=30, where=lambda e: e["node"] == f"n{follower}"
    )
    fleet.rounds_pass(3)
    assert held(fleet) == freeze, held(fleet)
    for i in (follower, third):
        code, doc, said = qos_status(fleet.labs[i])
        assert code == 1 and doc is not None, said
        assert (doc["reason"], doc["until"]) == ("freeze 2h", freeze["until"]), doc
    # The new leader's own window is shorter than the freeze; a lock for less than the
    # freeze is refused there too, naming it.
    out = guardctl(
        "qos", "lock", "--for", "10s", "--reason", "short",
        socket=fleet.labs[follower].socket_path,
    )  # fmt: skip
    assert out.returncode == 1, out
    assert "the fleet's lock (freeze 2h" in out.stdout + out.stderr, out
    assert "holds longer than asked" in out.stdout + out.stderr, out
    assert held(fleet) == freeze
    # An operator's unlock on another node ends the freeze and the leader's own window
    # with it, as `qos unlock` does on a single guard: the window is not published over
    # the release.
    out = guardctl("qos", "unlock", socket=fleet.labs[third].socket_path)
    assert out.returncode == 0, out
    fleet.daemons[follower].wait_event(
        "qos_released", timeout=30, where=lambda e: e["by"] == "fleet:uid:0(root)"
    )
    fleet.rounds_pass(3)
    assert held(fleet)["locked"] is False, held(fleet)
    for i in (follower, third):
        assert allowed(fleet.labs[i]), qos_status(fleet.labs[i])


def test_a_node_busy_applying_a_switch_keeps_its_lease(make_fleet: MakeFleet) -> None:
    """A follower whose switch takes longer than `lease_ttl` (here: held with the new link
    renamed in, before the reload) is still a live node meanwhile: its record and lease
    stay, no node lists it lost; then it finishes, and the fleet serves blue."""
    fleet = make_fleet(switch__timeout="1m")
    fleet.start()
    leader = fleet.leader()
    assert leader is not None
    slow = next(i for i in range(3) if i != leader)
    lab = fleet.labs[slow]
    record = f"{PREFIX}/nodes/n{slow}"
    lease = fleet.etcd.lease_of(record)
    assert lease
    (lab.fault_dir / "after_renamed").write_text("")
    fleet.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_renamed.reached").exists, 60, "the follower mid-switch")
    # The other two write a record every third of the 2 s lease: six more rounds are
    # longer than the lease.
    fleet.rounds_pass(6)
    assert (lab.fault_dir / "after_renamed.reached").exists()
    assert fleet.etcd.lease_of(record) == lease, "the busy node's lease expired"
    rows = {r["node"]: r for r in fleet.fleet_status(leader)["nodes"]}
    assert rows[f"n{slow}"]["lost"] is False, rows
    (lab.fault_dir / "after_renamed").unlink()
    assert fleet.all_serve("blue")
    applied(fleet.daemons[slow], 1)
    assert fleet.etcd.lease_of(record) == lease


def same_end(lock: dict[str, Any], until: str) -> bool:
    """Whether `lock` ends when `until` says: exactly, as a window laid under a freeze takes
    the freeze's very `until` (through the node's monotonic clock it moved by the time
    between two clock reads, 2 ms once under load)."""
    return lock.get("until") == until


def test_a_hand_written_qos_value_never_lets_a_shorter_window_replace_a_freeze(
    make_fleet: MakeFleet,
) -> None:
    """A freeze, then an operator's rollback asked on another node (its own window is
    shorter), then `etcdctl put <prefix>/qos '{"locked": false}'`: no node publishes its
    window over the hand's value; the node that holds the fleet's lock publishes it again,
    with the freeze's end, and no gate opens once the shorter window has passed."""
    fleet = make_fleet(qos__window="6s")
    fleet.start()
    held = fleet_lock()
    a, c = 0, 2
    lock_on(fleet, a, "freeze", "10m")
    until = held(fleet)["until"]
    out = guardctl("rollback", "--reason", "bad release", socket=fleet.labs[c].socket_path)
    assert out.returncode == 0, out
    assert fleet.all_serve("blue")
    fleet.daemons[c].wait_event("qos_locked")  # the rollback's own window on that node
    wait_until(lambda: same_end(held(fleet), until), 30, "the fleet's lock until the freeze")
    marks = [len(d.events()) for d in fleet.daemons]
    fleet.etcd.put(PREFIX + "/qos", '{"locked": false}')
    wait_until(
        lambda: held(fleet).get("locked") is True and same_end(held(fleet), until),
        60,
        "the fleet's lock published again with the freeze's end",
        poll=0.2,
    )
    # The shorter window on the other node passes; the fleet's lock and every gate hold.
    fleet.daemons[c].wait_event(
        "qos_released", timeout=60, where=lambda e: "guard window passed" in e["reason"]
    )
    fleet.rounds_pass(3)
    assert same_end(held(fleet), until), held(fleet)
    for lab in fleet.labs:
        for config in (False, True):
            code, doc, said = qos_status(lab, config=config)
            assert code == 1 and doc is not None and same_end(doc, until), said
    alerts = [
        e["reason"] for d, m in zip(fleet.daemons, marks, strict=True) for e in d.events()[m:]
    ]
    assert any("was replaced by" in r for r in alerts), alerts


def test_a_lock_lost_while_its_owner_was_down_is_published_again_when_it_is_back(
    make_fleet: MakeFleet,
) -> None:
    """An operator's lock taken on a node; that node killed; the `qos` key deleted by hand
    meanwhile: every gate says UNKNOWN, never "allowed", and the owner, restarted with its
    lock in its state, publishes it again."""
    fleet = make_fleet()
    fleet.start()
    held = fleet_lock()
    owner = 2
    lock_on(fleet, owner, "freeze while down", "20m")
    until = held(fleet)["until"]
    fleet.daemons[owner].kill9()
    fleet.etcd.delete(PREFIX + "/qos")
    # The lock's owner is away: nobody can tell the lock, so UNKNOWN, never "allowed".
    wait_until(
        lambda: all(qos_status(lab)[0] == 3 for lab in fleet.labs[:2]),
        60,
        "UNKNOWN on the live nodes",
    )
    fleet.rounds_pass(3)
    assert held(fleet) == {}, "nobody but its owner publishes the lost lock"
    assert all(qos_status(lab)[0] == 3 for lab in fleet.labs[:2])
    fleet.labs[owner].daemon()
    wait_until(
        lambda: held(fleet).get("reason") == "freeze while down",
        60,
        "the lock published again by its owner",
        poll=0.2,
    )
    assert held(fleet)["until"] == until
    wait_until(
        lambda: all(qos_status(lab)[0] == 1 for lab in fleet.labs), 30, "locked on every node"
    )
