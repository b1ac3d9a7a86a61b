"""The fleet coordinator's judgement of etcd's store (`guardd.fleet.coordinator`): a store
that went back (restored, or a new cluster) is told from a member that lags, and the next
generation is numbered above every one known. No etcd here: the answers are given."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from guardd import qoslock
from guardd.config import FleetConfig
from guardd.core.qos import QosWindow
from guardd.core.types import State
from guardd.exceptions import OperationRefused
from guardd.fleet._etcd import KV, EtcdUnavailable, Header, LeaseGone, header_of
from guardd.fleet.coordinator import Fleet
from guardd.qoskeeper import OwnedLock
from guardd.timestamps import parse_rfc3339


def fleet(tmp_path: Path) -> Fleet:
    config = FleetConfig(etcd=["http://127.0.0.1:9"], node="n0", lease_ttl=2.0)
    return Fleet(config, instance="lab", state_dir=tmp_path, switch_timeout=10.0)


def memory(f: Fleet) -> tuple[object, ...]:
    """What the node keeps from the store: our last qos write's revision, the qos and desired
    mod_revisions, the leader term, the lease, our record as last written."""
    return (f._qos_mine, f._qos_mod, f._desired_mod, f._leader_rev, f.lease, f._published)


def kv(key: str, value: str, mod: int) -> KV:
    return KV(key=key, value=value, create_revision=mod, mod_revision=mod, lease=0)


@pytest.mark.parametrize(
    ("doc", "header"),
    [
        ({"header": {"cluster_id": "1484163906896", "revision": "812"}}, (1484163906896, 812)),
        ({"result": {"header": {"cluster_id": "7", "revision": "3"}, "TTL": "0"}}, (7, 3)),
        ({"result": {"created": True}}, (0, 0)),
        ({}, (0, 0)),
    ],
)  # fmt: skip
def test_the_header_of_every_kind_of_answer(
    doc: dict[str, object], header: tuple[int, int]
) -> None:
    assert header_of(doc) == Header(*header)


@pytest.mark.parametrize(
    ("cluster", "revision", "why"),
    [
        (5, 40, "revision"),  # restored from an older backup: same cluster, lower revision
        (5, 1, "revision"),  # an empty store
        (6, 900, "cluster_id"),  # a new cluster that already went past our revision
    ],
)
def test_a_store_that_went_back_is_read_afresh_and_forgets_its_revisions(
    tmp_path: Path, cluster: int, revision: int, why: str
) -> None:
    async def main() -> None:
        f = fleet(tmp_path)
        f._take_read(Header(5, 500), [kv("/guardd/lab/desired", '{"generation": 4}', 450)])
        f._read(list(f._kvs.values()))
        f._qos_mine, f._qos_mod, f._leader_rev, f.lease = 480, 480, 300, 77
        f._header(Header(5, 510))  # moving on
        assert not f._stale(0) and f._high == 510
        f._header(Header(cluster, revision))
        assert f._stale(0) and why in (f._suspect or "")
        f._take_read(Header(cluster, revision), [])
        assert not f._stale(1) and f._epoch == 1 and f._went_back
        assert (f._revision, f._high, f._cluster) == (revision, revision, cluster)
        assert memory(f) == (0, None, 0, None, None, None)
        # The store lost desired; the decision known before still numbers the next one.
        f._read([])
        assert f.desired is None and f.known_generation() == 4

    anyio.run(main)


def test_a_lagging_member_is_not_a_store_that_went_back(tmp_path: Path) -> None:
    async def main() -> None:
        f = fleet(tmp_path)
        f._take_read(Header(5, 500), [])
        f._qos_mine, f.lease = 490, 77
        f._header(Header(5, 498))  # a watch on a member two revisions behind
        assert f._stale(0)
        f._take_read(Header(5, 502), [])  # the linearizable read is not behind
        assert not f._stale(0) and f._epoch == 0 and not f._went_back and f._suspect is None
        assert (f._qos_mine, f.lease, f._high) == (490, 77, 502)

    anyio.run(main)


def test_the_next_generation_is_above_every_one_known(tmp_path: Path) -> None:
    async def main() -> None:
        f = fleet(tmp_path)
        f.applied_generation(5)
        f.desired = {"color": "blue", "generation": 1}
        f.nodes = {"n1": {"generation": 7}, "n2": {"generation": "x"}, "n3": {"generation": True}}
        f.seen = {"n4": {"generation": "9"}, "n5": {}}
        assert f.known_generation() == 9
        f.seen = {}
        assert f.known_generation() == 7
        f.nodes = {}
        assert f.known_generation() == 5

    anyio.run(main)


def _lock_held(
    tmp_path: Path, locked_at: str, until: str, by: str
) -> tuple[Path, qoslock.LockInfo]:
    """A rollback's guard window in `tmp_path`'s lock file: the file and the lock."""
    lock_file = tmp_path / "qos.lock"
    info = qoslock.LockInfo(True, "rollback green -> blue", locked_at, until, by)
    qoslock.write_lock(lock_file, info)
    return lock_file, info


class _Txns:
    """An etcd client stand-in that takes every transaction: what was put, in order."""

    def __init__(self) -> None:
        self.put: list[dict[str, object]] = []

    async def txn(self, _compare: object, success: list[dict[str, Any]]) -> tuple[bool, int]:
        for op in success:
            value = op["request_put"]["value"]
            self.put.append(json.loads(base64.b64decode(value)))
        return True, 100 + len(self.put)


def test_a_followers_failed_window_becomes_the_fleets_lock_and_it_publishes_its_end(
    tmp_path: Path,
) -> None:
    """The leader's window passed and released the fleet's lock, but this follower's own
    window saw the SLOs fail (extended): the follower publishes it as the fleet's lock, then
    its extension, then its end, each named after the node."""

    async def main() -> None:
        f = fleet(tmp_path)
        lock_file, info = _lock_held(tmp_path, "2026-12-01T00:00:00Z", "2026-12-01T00:05:00Z",
                                     "fleet:n1")  # fmt: skip
        window = QosWindow(0.0, 10.0, 0.01, 0.99, 5)
        own = OwnedLock(info, window, None, manual=False, failed=True)
        guard = SimpleNamespace(own_lock=own, s=SimpleNamespace(lock_file=lock_file))
        f.guard = guard  # type: ignore[assignment]
        f.client = client = _Txns()  # type: ignore[assignment]
        released = {"locked": False, "reason": "n1's lock ended", "by": "n1", "node": "n1"}
        f._kvs = {"/guardd/lab/qos": kv("/guardd/lab/qos", json.dumps(released), 50)}
        f.qos, f.leader, f.nodes = released, "n1", {"n1": {}, "n0": {}}
        await f._publish_own_window()
        assert client.put == [{**info.to_json(), "node": "n0"}]
        # Now the fleet's lock is ours: its extension is published, then its end.
        mine = f._qos_mine
        f._kvs = {"/guardd/lab/qos": kv("/guardd/lab/qos", json.dumps(client.put[-1]), mine)}
        longer = dataclasses.replace(info, until="2026-12-01T00:10:00Z")
        qoslock.write_lock(lock_file, longer)
        own.info = longer
        await f._publish_own_window()
        assert client.put[-1] == {**longer.to_json(), "node": "n0"}
        mine = f._qos_mine
        f._kvs = {"/guardd/lab/qos": kv("/guardd/lab/qos", json.dumps(client.put[-1]), mine)}
        qoslock.remove_lock(lock_file)
        guard.own_lock = None
        await f._publish_own_window()
        end = client.put[-1]
        assert end["locked"] is False and end["by"] == "n0" and end["node"] == "n0", end
        # A window not judged yet, while the fleet's last release came before the decision
        # it follows: the leader's window is (or will be) the fleet's lock, not this one ...
        qoslock.write_lock(lock_file, info)
        guard.own_lock = OwnedLock(info, window, None, manual=False)
        desired = kv("/guardd/lab/desired", '{"color": "blue", "generation": 2}', mine + 6)
        f._kvs = {
            "/guardd/lab/qos": kv("/guardd/lab/qos", json.dumps(released), mine + 5),
            "/guardd/lab/desired": desired,
        }
        f.qos = released
        count = len(client.put)
        await f._publish_own_window()
        assert len(client.put) == count
        # ... but released since (the leader's window passed while this one ran, or an
        # operator unlocked before this late node applied it): this window is the fleet's.
        f._kvs["/guardd/lab/qos"] = kv("/guardd/lab/qos", json.dumps(released), mine + 7)
        await f._publish_own_window()
        assert client.put[-1] == {**info.to_json(), "node": "n0"}
        # ... but while the fleet holds a lock (the leader's window), the leader decides.
        held = {**info.to_json(), "by": "guardd", "node": "n1"}
        f._kvs["/guardd/lab/qos"] = kv("/guardd/lab/qos", json.dumps(held), f._qos_mine + 5)
        f.qos = held
        count = len(client.put)
        await f._publish_own_window()
        assert len(client.put) == count
        # An operator's lock taken here is no guard window: never published by this path.
        guard.own_lock = OwnedLock(info, None, None, manual=True)
        f._kvs["/guardd/lab/qos"] = kv("/guardd/lab/qos", json.dumps(released), f._qos_mine + 9)
        f.qos = released
        await f._publish_own_window()
        assert len(client.put) == count

    anyio.run(main)


@pytest.mark.parametrize(
    ("by", "released_at", "manual", "released"),
    [
        ("uid:0(root)", "2026-12-01T00:00:30.000Z", False, False),  # before the window
        ("uid:0(root)", "2026-12-01T00:02:00.000Z", False, True),  # after it: its end
        ("uid:0(root)", None, False, True),  # no time (an older guardd): it acts, as it did
        ("uid:0(root)", "garbage", False, True),
        ("uid:0(root)", "2026-12-01T00:00:30.000Z", True, True),  # an operator's lock
        ("n1", "2026-12-01T00:02:00.000Z", False, False),  # a node's automatic release
        ("n1", "2026-12-01T00:02:00.000Z", True, True),
    ],
)  # fmt: skip
def test_a_release_ends_a_guard_window_only_if_an_operator_wrote_it_after_the_window(
    tmp_path: Path, by: str, released_at: str | None, manual: bool, released: bool
) -> None:
    """A node cut off when the fleet's lock was released, that took a guard window since
    (its own rollback), reads that release late: the window stays, as the release was not
    about it. An operator's release written after the window was taken ends it; another
    node's automatic release (its own window passed) never does: this window is this
    node's verdict on its own rollback."""

    async def main() -> None:
        f = fleet(tmp_path)
        lock_file, info = _lock_held(tmp_path, "2026-12-01T00:01:00.000Z",
                                     "2026-12-01T00:06:00.000Z", "guardd")  # fmt: skip
        window = None if manual else QosWindow(0.0, 10.0, 0.01, 0.99, 5)
        calls: list[dict[str, Any]] = []

        def release_lock(**fields: Any) -> None:
            calls.append(fields)
            qoslock.remove_lock(lock_file)

        guard = SimpleNamespace(
            own_lock=OwnedLock(info, window, None, manual=manual),
            s=SimpleNamespace(lock_file=lock_file),
            lock=anyio.Lock(),
            release_lock=release_lock,
            save_state=lambda: None,
        )
        f.guard = guard  # type: ignore[assignment]
        doc: dict[str, Any] = {"locked": False, "reason": "done", "by": by, "node": "n1"}
        f.nodes = {"n0": {}, "n1": {}}
        if released_at is not None:
            doc["released_at"] = released_at
        f._qos_mod, f._qos_mine = 10, 0  # the node last read `qos` at revision 10
        f._kvs = {"/guardd/lab/qos": kv("/guardd/lab/qos", json.dumps(doc), 20)}
        f.qos = doc
        await f._adopt_qos()
        assert bool(calls) is released, calls
        assert qoslock.read_lock(lock_file).held is not released

    anyio.run(main)


def test_every_release_the_fleet_writes_carries_its_time(tmp_path: Path) -> None:
    """An operator's unlock, a leader's expiry: `released_at`, RFC 3339, now; a lock none."""

    async def main() -> None:
        f = fleet(tmp_path)
        f.client = client = _Txns()  # type: ignore[assignment]
        f._kvs, f.reachable = {}, True
        await f.set_qos(qoslock.LockInfo(True, "freeze", by="uid:0(root)"))
        assert "released_at" not in client.put[-1]
        before = time.time()
        await f.set_qos(qoslock.LockInfo(False, by="uid:0(root)"))
        at = client.put[-1]["released_at"]
        assert isinstance(at, str) and at.endswith("Z")
        assert before - 0.01 <= parse_rfc3339(at) <= time.time() + 0.01
        held = {"locked": True, "reason": "freeze", "until": "2000-01-01T00:00:00Z", "node": "n1"}
        f._kvs = {"/guardd/lab/qos": kv("/guardd/lab/qos", json.dumps(held), 200)}
        f._qos_mine = 0
        await f._expire_qos()
        assert client.put[-1]["locked"] is False and "released_at" in client.put[-1]

    anyio.run(main)


class _SlowRead:
    """An etcd client stand-in whose read answers when the test says, as of a revision
    the test gives; its watch waits for ever."""

    def __init__(self, answer: tuple[Header, list[KV]]) -> None:
        self.answer = answer
        self.sent, self.go, self.watching = anyio.Event(), anyio.Event(), anyio.Event()

    async def read(self, _key: str, **_kw: object) -> tuple[Header, list[KV]]:
        self.sent.set()
        await self.go.wait()
        return self.answer

    async def watch(self, *_args: object, **_kw: object) -> Any:
        self.watching.set()
        await anyio.sleep_forever()
        yield  # pragma: no cover


@pytest.mark.parametrize("meanwhile", [True, False])
def test_a_write_answered_while_a_read_is_on_its_way_is_no_store_that_went_back(
    tmp_path: Path, meanwhile: bool
) -> None:
    """The read is evaluated at revision 505; our own write of `seen/n0`, on another
    connection, is answered at 510 before the read's answer comes back. A healthy store:
    no alert. The same read sent after that write was answered is a store that went back."""

    async def main() -> None:
        f = fleet(tmp_path)
        seen = "/guardd/lab/seen/n0"
        f._take_read(Header(5, 500), [kv(seen, "{}", 450)])
        f._own[seen] = 450
        if not meanwhile:
            f._header(Header(5, 510))
            f._own[seen] = 510
        f.client = client = _SlowRead((Header(5, 505), [kv(seen, "{}", 450)]))  # type: ignore[assignment]
        async with anyio.create_task_group() as tg:
            tg.start_soon(f._follow)
            with anyio.fail_after(10):
                await client.sent.wait()
            if meanwhile:
                f._header(Header(5, 510))  # our write's answer (`_saw`), then its revision
                f._own[seen] = 510
            client.go.set()
            with anyio.fail_after(10):
                await client.watching.wait()
            tg.cancel_scope.cancel()
        assert f._went_back is not meanwhile
        assert f._high == (510 if meanwhile else 505)

    anyio.run(main)


class _LeaseGoneOnce:
    """An etcd client stand-in: the lease it is asked to renew is alive, but a write under
    it finds it gone (this process was away longer than its TTL); grants count."""

    def __init__(self) -> None:
        self.granted = 0

    async def grant(self, _ttl: float) -> int:
        self.granted += 1
        return 1000 + self.granted

    async def keepalive(self, _lease: int) -> int:
        return 5

    async def txn(self, *_args: object) -> tuple[bool, int]:
        raise LeaseGone("http://127.0.0.1:9: etcd no longer has the lease (it expired)")


def test_a_lease_gone_is_granted_anew_and_is_no_etcd_out_of_reach(tmp_path: Path) -> None:
    async def main() -> None:
        f = fleet(tmp_path)
        f.client = client = _LeaseGoneOnce()  # type: ignore[assignment]
        f.lease, f._renewed, f.reachable = 77, time.monotonic(), True
        alerts: list[dict[str, Any]] = []
        f.guard = SimpleNamespace(  # type: ignore[assignment]
            record=lambda event, **fields: alerts.append({"event": event, **fields}),
            active="green",
            own_lock=None,
            paused=None,
            state=State.STEADY,
        )
        with anyio.move_on_after(0.5):
            await f._loop()
        assert f.reachable is True and f.problem is None, f.problem
        assert not [a for a in alerts if "unreachable" in str(a.get("reason"))], alerts
        assert client.granted >= 1  # a new lease, in the next round
        assert f.lease != 77

    anyio.run(main)


class _OnlyKeepalives:
    """An etcd client stand-in that renews leases but refuses every other call, as etcd
    does for a node without credentials once auth is enabled."""

    def __init__(self) -> None:
        self.keepalives = 0

    async def keepalive(self, _lease: int) -> int:
        self.keepalives += 1
        return 5

    async def txn(self, *_args: object) -> tuple[bool, int]:
        raise EtcdUnavailable("http://127.0.0.1:9: HTTP 400 (etcdserver: user name is empty)")

    async def grant(self, _ttl: float) -> int:
        raise EtcdUnavailable("http://127.0.0.1:9: HTTP 400 (etcdserver: user name is empty)")


def test_a_node_etcd_refuses_lets_its_lease_expire(tmp_path: Path) -> None:
    """Its record and its leadership must not outlive what it can do: once its rounds fail,
    neither the loop nor the renewing task keeps its lease alive."""

    async def main() -> None:
        f = fleet(tmp_path)
        f.client = client = _OnlyKeepalives()  # type: ignore[assignment]
        f.lease, f._renewed, f.reachable = 77, 0.0, True  # due for renewal at once
        f.guard = SimpleNamespace(  # type: ignore[assignment]
            record=lambda *_a, **_k: None, active="green", own_lock=None, paused=None,
            state=State.STEADY,
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(f._loop)
            tg.start_soon(f._keep_lease)
            with anyio.fail_after(10):
                # A plain attribute the loop sets, no event to wait on.
                while f.reachable is not False:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            renewed = client.keepalives
            # Three thirds of the lease (lease_ttl = 2s here): no renewal while refused.
            await anyio.sleep(2.0)
            tg.cancel_scope.cancel()
        assert renewed <= 1, renewed  # the first round's, before it knew
        assert client.keepalives == renewed, (renewed, client.keepalives)
        assert "user name is empty" in str(f.problem)

    anyio.run(main)


def test_the_leaders_window_waits_for_other_windows_until_their_known_end(
    tmp_path: Path,
) -> None:
    """`lock_stay_ends`: the latest end the other nodes' running windows publish, when the
    fleet converged and this node leads; None whenever an end is not known (an unconverged
    fleet, a record without one or with a garbled one, a follower), so that the keeper
    then extends by a whole window."""

    async def main() -> None:
        f = fleet(tmp_path)
        f.reachable = True
        f.desired = {"color": "blue", "generation": 3}
        f.leader, f._leader_rev = "n0", 5
        a, b = "2026-12-01T10:00:05.000Z", "2026-12-01T10:00:07.500Z"
        f.nodes = {
            "n0": {"serving": "blue", "window": "open", "window_until": "2026-12-01T10:09:00Z"},
            "n1": {"serving": "blue", "window": "open", "window_until": a},
            "n2": {"serving": "blue", "window": "failing", "window_until": b},
            "n3": {"serving": "blue", "window": None, "window_until": None},
        }
        assert f.lock_must_stay() == (
            "the guard window of node n1 still runs; the guard window of node n2 is not met"
        )
        assert f.lock_stay_ends() == parse_rfc3339(b)  # the latest; never our own
        for garbled in (None, "soon", 5):
            f.nodes["n2"]["window_until"] = garbled
            assert f.lock_stay_ends() is None, garbled
        f.nodes["n2"]["window_until"] = b
        f.nodes["n3"]["serving"] = "green"  # unconverged: no end is known
        assert f.lock_must_stay() is not None
        assert f.lock_stay_ends() is None
        f.nodes["n3"]["serving"] = "blue"
        f.leader = "n1"  # a follower waits for no one's window
        assert f.lock_must_stay() is None
        assert f.lock_stay_ends() is None
        f.leader = "n0"
        f.nodes = {"n0": {"serving": "blue"}, "n1": {"serving": "blue", "window": None}}
        assert f.lock_must_stay() is None
        assert f.lock_stay_ends() is None

    anyio.run(main)


def test_a_resume_etcd_cannot_take_says_what_was_not_resumed(tmp_path: Path) -> None:
    """With etcd out of reach a resume is this node's only: the refusal says the fleet's
    budget and the other nodes' holds were not resumed (never that the budget is spent,
    which this node cannot tell)."""

    async def main() -> None:
        f = fleet(tmp_path)
        f.reachable, f.problem = False, "ConnectError"
        with pytest.raises(OperationRefused) as refused:
            await f.rearm("uid:0(root)", "ack")
        said = str(refused.value)
        assert "resumed on this node only" in said and "were not resumed" in said, said
        assert "spent" not in said, said

    anyio.run(main)


@pytest.mark.parametrize("value", ['{"x": 1}', '["soon"]', "not json", "[true]"])
def test_a_budget_guardd_did_not_write_keeps_the_one_known(tmp_path: Path, value: str) -> None:
    """A `rollbacks` value that is not the list of times guardd writes (a hand's edit) is no
    empty budget (that would allow rollbacks the fleet has spent): the times last known stay,
    and a warning names the key."""

    async def main() -> None:
        f = fleet(tmp_path)
        f.reachable = True
        key = f.key("rollbacks")
        f._read([kv(key, "[1796160000.5, 1796160100.0]", 5)])
        assert f.rollbacks == [1796160000.5, 1796160100.0]
        assert not [w for w in f.warnings() if "rollbacks" in w]
        f._read([kv(key, value, 6)])
        assert f.rollbacks == [1796160000.5, 1796160100.0]
        (said,) = [w for w in f.warnings() if "rollbacks" in w]
        assert "not the list of rollback times guardd writes" in said and "2 rollback(s)" in said
        f._read([kv(key, "[1796160000.5, 1796160100.0, 1796160200.0]", 7)])
        assert len(f.rollbacks) == 3 and not [w for w in f.warnings() if "rollbacks" in w]

    anyio.run(main)


@pytest.mark.parametrize(
    ("revision", "cluster", "own", "says"),
    [
        # Wiped: the read misses desired (guardd never deletes it) and is below the known
        # revision. Which key a node misses first must not change the words.
        (7, 5, {}, "store went back from revision 510 to 7: restored from a backup?"),
        (7, 5, {"/guardd/lab/seen/n0": 505}, "store went back from revision 510 to 7"),
        (900, 6, {}, "from revision 510 to 900: restored from a backup? (its cluster_id"),
        # The revision went on: the missing key is the proof, and the words name it.
        (520, 5, {}, "/guardd/lab/desired is gone from etcd at revision 520, and guardd never"),
        (520, 5, {"/guardd/lab/seen/n0": 505}, "it lost /guardd/lab/seen/n0, written at revision"),
    ],
)  # fmt: skip
def test_the_alert_for_a_store_that_went_back_names_its_strongest_proof(
    tmp_path: Path, revision: int, cluster: int, own: dict[str, int], says: str
) -> None:
    async def main() -> None:
        f = fleet(tmp_path)
        alerts: list[dict[str, Any]] = []
        f.guard = SimpleNamespace(  # type: ignore[assignment]
            record=lambda event, **fields: alerts.append({"event": event, **fields}),
            own_lock=None,
        )
        f._take_read(Header(5, 500), [kv("/guardd/lab/desired", '{"generation": 4}', 450)])
        f._read(list(f._kvs.values()))
        f._header(Header(5, 510))
        f._own = dict(own)
        f._take_read(Header(cluster, revision), [])
        assert [a["event"] for a in alerts] == ["alert"]
        assert says in alerts[0]["reason"], alerts[0]["reason"]
        assert (alerts[0]["previous_revision"], alerts[0]["revision"]) == (510, revision)

    anyio.run(main)


def test_a_restarted_node_counts_the_fleets_rollbacks_a_new_store_lacks(tmp_path: Path) -> None:
    """The budget this node last read (the rollbacks after the fleet's last resume) is kept
    in fleet.json: a restart onto a store that lacks them (a new cluster, a restore) still
    counts them until the leader writes them back; a store holding them needs nothing."""

    async def main() -> None:
        f = fleet(tmp_path)
        f.applied_generation(3)
        key, rearmed = f.key("rollbacks"), f.key("rearmed")
        f._read(
            [
                kv(key, "[1796160000.0, 1796160100.0, 1796160200.0]", 5),
                kv(rearmed, '{"at": 1796160050.0, "by": "uid:0(root)", "node": "n1"}', 6),
            ]
        )
        kept = json.loads((tmp_path / "fleet.json").read_text())
        # The one before the resume counts no more: it is not kept.
        assert kept == {"applied": 3, "rollbacks": [1796160100.0, 1796160200.0]}
        assert oct((tmp_path / "fleet.json").stat().st_mode & 0o777) == "0o640"

        again = fleet(tmp_path)
        assert again.applied == 3
        assert again.budget_rollbacks == [1796160100.0, 1796160200.0]
        again._read([])  # a new, empty store
        assert again.budget_rollbacks == [1796160100.0, 1796160200.0]
        assert again.status_doc()["rollbacks"] == 2
        # A store that holds them is the one they came from: nothing to write back.
        again._read([kv(key, "[1796160000.0, 1796160100.0, 1796160200.0]", 9)])
        assert again._rollbacks_before == []
        assert again.budget_rollbacks == [1796160000.0, 1796160100.0, 1796160200.0]

    anyio.run(main)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"applied": 4, "rollbacks": "many"}',
        '{"applied": 4, "rollbacks": [true]}',
        '{"applied": 4, "rollbacks": [1796160000.0, NaN]}',
        '{"applied": 4, "rollbacks": [1796160000.0, "soon"]}',
    ],
)
def test_a_fleet_json_that_cannot_be_read_gives_no_budget_and_loses_no_generation(
    tmp_path: Path, text: str
) -> None:
    (tmp_path / "fleet.json").write_text(text)

    async def main() -> None:
        f = fleet(tmp_path)
        assert f.budget_rollbacks == []
        assert f.applied == (4 if text.startswith("{") else 0)

    anyio.run(main)


def test_every_nodes_gate_is_locked_while_another_node_holds(tmp_path: Path) -> None:
    """The fleet's lock released, this node steady, another node holding (its own hold's
    lock is in its own lock file): this node's `qos status` is locked too, saying which
    node holds; this node's own hold is said by its own lock, not twice."""

    async def main() -> None:
        f = fleet(tmp_path)
        f.reachable = True
        release = '{"locked": false, "by": "fleet:n1", "released_at": "2026-12-02T00:00:00Z"}'
        f._read([kv(f.key("qos"), release, 5)])
        f.nodes = {"n0": {"serving": "blue", "state": "steady"}}
        f.c = f.c.model_copy(update={"size": 1})
        assert f.qos_doc()["locked"] is False
        f.nodes["n1"] = {"serving": "blue", "state": "hold"}
        f.c = f.c.model_copy(update={"size": 2})
        doc = f.qos_doc()
        assert doc["locked"] is True
        assert doc["reason"].startswith("node n1 holds: no automatic switch there"), doc
        f.nodes = {"n0": {"serving": "blue", "state": "hold"}, "n1": {"serving": "blue"}}
        assert f.qos_doc()["locked"] is False  # (its own hold's lock file says it)

    anyio.run(main)
