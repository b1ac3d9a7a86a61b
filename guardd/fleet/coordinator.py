"""One decision for a fleet of guardd nodes, coordinated through etcd.

Keys under the fleet's prefix P (values are JSON)::

    P/leader          the leader's node name, under the leader's lease
    P/desired         {"color", "generation", "kind", "by", "reason", "at"}: what every node serves
    P/rollbacks       [wall time, ...]: the fleet's automatic rollbacks (its rollback budget)
    P/rearmed         {"at", "by", "node", "reason"}: an operator's last `resume`, on any
                      node: the budget counts only rollbacks after it, and holds end
    P/qos             the fleet's QoS lock, as `guardctl qos status --json` shows it
    P/nodes/<node>    {"serving", "generation", "wants_rollback", "window", "window_until",
                      "at"}, under the node's lease (`window`: "failing" while its own guard
                      window is not met; `window_until`: when that window is judged)
    P/clash/<node>    a second guardd's record under a name another process holds, under its
                      lease: every node sees it
    P/seen/<node>     {"serving", "generation", "at"}: the node's last record, without a lease,
                      so that a node whose lease expired is shown as lost, not dropped

A node becomes leader by creating P/leader when it is absent (a txn comparing its
create_revision with 0). The leader writes P/desired only in a txn that also compares
P/leader's create_revision with the one it created: a deposed leader's write fails (the
fencing token), and comparing P/desired's mod_revision makes each generation follow
exactly one other. Every node follows the prefix with etcd's watch (one range read, then
the changes streamed from the next revision; a broken stream resumes from the last
revision seen, a compacted one starts over with a fresh read; a full read every
`SAFETY_READ_S` besides), applies a newer generation through the guard's own switcher,
and publishes what it serves under its own lease (when it changes, and every third of
the lease). The guard asks `decide_rollback` before it rolls back on its own.

etcd's store can go back: restored from an older backup, or replaced by a new cluster. An
answer whose revision is below one already seen (or whose cluster_id changed) makes the
node read the prefix afresh at once; a linearizable read below a revision a write already
answered proves it (a lagging member's watch alone does not). Then every memory keyed on
revisions is dropped (the watch's resume point, our last writes' mod_revisions, the leader
term, the lease), the node journals one `alert`, and it acts only on what the new store
holds: a lock this node owned and published is published again if the store lost it, and
the leader rewrites `desired` when live nodes applied a higher generation than the store
remembers. Generations are numbered above every one the node knows of (desired's, its own,
every node's record), so a decision after a restore is never one the nodes already applied.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from guardd import fsutil, qoslock, untrusted_json
from guardd.config import FleetConfig
from guardd.core.types import COLORS, GUARDD, Color, Severity
from guardd.exceptions import GuarddError, OperationRefused, StorageError, UnsafePath, why
from guardd.fleet import lockread
from guardd.fleet._etcd import (
    KV,
    Compacted,
    EtcdClient,
    EtcdUnavailable,
    Header,
    LeaseGone,
    compare,
    delete_op,
    put_op,
)
from guardd.timestamps import parse_rfc3339, rfc3339, until_wall

if TYPE_CHECKING:
    from guardd.guard import Guard

__all__ = ["SAFETY_READ_S", "Fleet"]

#: How often a node reads every fleet key besides following the watch (s): a safety net.
SAFETY_READ_S = 30.0
#: A watch's stream with no message for this long is reopened from the last revision (s).
WATCH_IDLE_S = 10.0
#: How long this node's own record, acknowledged by etcd, may be missing from its watch
#: before the watch counts as stuck and the prefix is read afresh (s). The record is under
#: the watched prefix: on a live stream it arrives within milliseconds. A stream that went
#: silent (its member frozen, or its connection served no more) would otherwise show a
#: stale fleet until `WATCH_IDLE_S`.
WATCH_LAG_S = 2.0
#: The longest wait before a broken watch is reopened (s); it starts at a tenth of a second.
WATCH_BACKOFF_MAX_S = 2.0
#: The longest wait between two tries of a generation this node failed to apply (s): the
#: first waits `switch.timeout`, each next one twice as long, so that a node whose nginx
#: rejects the target does not fill its journal with a failed rollback every few seconds.
RETRY_MAX_S = 300.0
#: At shutdown, the longest wait for this node's last record to be written (s).
FAREWELL_S = 2.0


class Fleet:
    """This node's side of the fleet: election, the desired color, its own record."""

    #: The fleet's rollbacks (wall times) this node knew before the store went back, or
    #: before it restarted (`fleet.json`): for the leader to write back what the store lost,
    #: and counted meanwhile (the budget survives a restore, a new cluster, a restart).
    _rollbacks_before: list[float]
    #: The rollbacks `fleet.json` holds, as last written.
    _stored: list[float]
    #: Another process publishing under this node's name (its record under a lease not
    #: ours): (since, its lease), and whether it was journaled. One that outlives
    #: `lease_ttl` is no earlier run of ours (whose lease expires by then) but a clash.
    _clash: tuple[float, int] | None
    #: Our record's write the watch has not shown yet: (its revision, when acknowledged).
    _unwatched: tuple[int, float] | None
    _clash_told: bool
    #: Why a rollback this node decided was not written (etcd unreachable, no
    #: local_fallback): journaled when it is first set, once an outage.
    _unacted: str | None
    #: Why the last rollback this node decided was not taken here (`decide_rollback` said
    #: None): the leader decides, etcd is unreachable, the quorum is not met.
    held_back: str | None
    #: The fleet's keys guardd never deletes: one gone is a store that lost it.
    _durable: frozenset[str]
    #: Whether a whole read was ever taken (a view to compare the next one with).
    _fresh_once: bool
    #: The fleet's lock as last known when it was a release, before the store lost it.
    _release_before: dict[str, Any] | None
    _suspect: str | None
    #: Why the `qos` key's value is not a lock guardd wrote (`lockread.lock_problem`).
    _qos_bad: str | None
    #: The fleet's last `resume` as this node knew it, before the store lost it.
    _rearmed_before: dict[str, Any] | None
    #: Why the `rollbacks` key's value is not the list guardd writes (a warning), else None.
    _rollbacks_bad: str | None
    _qos_before: dict[str, Any] | None
    _desired_before: dict[str, Any] | None

    def __init__(
        self, config: FleetConfig, *, instance: str, state_dir: Path, switch_timeout: float
    ) -> None:
        self.c = config
        self.node = config.node or socket.gethostname()
        self.prefix = config.prefix or f"/guardd/{instance}"
        self.switch_timeout = switch_timeout
        self.client = EtcdClient(
            config.etcd,
            timeout=max(0.5, config.lease_ttl / 3),
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
            username=config.username,
            password_file=config.password_file,
        )
        self.guard: Guard | None = None
        self.lease: int | None = None
        self.leader: str | None = None
        self._leader_rev: int | None = None  # P/leader's create_revision, while we hold it
        self.desired: dict[str, Any] | None = None
        self._desired_mod = 0
        self.nodes: dict[str, dict[str, Any]] = {}
        self.rollbacks: list[float] = []
        # The fleet's last `resume` (P/rearmed), and whether this node read it yet and which
        # one it acted on.
        self.rearmed: dict[str, Any] | None = None
        self._rearm: tuple[bool, float | None] = (False, None)  # (read yet, `at` acted on)
        self.qos: dict[str, Any] | None = None
        self.reachable: bool | None = None  # None: not asked yet
        self.problem: str | None = None
        self.unreachable_since: float | None = None
        self._wants_at: float | None = None
        self._diverged: dict[str, float] = {}
        self._alerted: set[str] = set()
        # generation -> (when its last try failed, how many tries failed): the next try
        # waits switch.timeout, doubled at each failure up to RETRY_MAX_S.
        self._failed: dict[int, tuple[float, int]] = {}
        self._answered: set[str] = set()
        # The prefix as last read and followed: key -> KV, at revision `_revision`.
        # `_fresh`: whether `_kvs` is a whole read (not yet: wait for one).
        self._kvs: dict[str, KV] = {}
        self._revision, self._fresh = 0, False
        self._changed = anyio.Event()  # set (and replaced) at every change seen
        self._watching = anyio.CancelScope()  # the watch's stream, to reopen it at once
        self._published: dict[str, Any] | None = None  # our record as last written
        self.seen: dict[str, dict[str, Any]] = {}  # P/seen/<node>: last records
        self._lost: dict[str, float] = {}  # node -> when its lease was first seen gone
        self._last_leader: str | None = None
        # The fleet's QoS lock: its mod_revision as last acted on, our own last write's.
        self._qos_mod: int | None = None
        self._qos_mine = 0
        self._qos_wrote: dict[str, Any] | None = None  # the lock doc our last write put there
        self._local_lock: dict[str, Any] | None = None  # the leader's lock file, last look
        # The store itself: its cluster_id, the highest revision any answer reported, and
        # why a fresh read must tell whether it went back (None: no sign of it).
        self._cluster: int | None = None
        self._high, self._suspect = 0, None
        # Since the store went back (until this node writes a new generation): the fleet's
        # lock and desired as this node knew them before, to put back what the store lost.
        self._went_back, self._qos_before, self._desired_before = False, None, None
        # Mirrors of a lock the new store lacks stay until then: its owner publishes it again.
        self._qos_settle_until = 0.0
        self._durable = frozenset(self.key(k) for k in ("desired", "rollbacks", "qos", "rearmed"))
        self._fresh_once, self._qos_bad, self._rollbacks_bad = False, None, None
        self._release_before = self._rearmed_before = None
        # `_epoch`: how many times the store went back (a round's view is of one epoch).
        # `_own`: our acknowledged writes of keys without a lease, which no node deletes:
        # key -> the revision etcd answered. A linearizable read that shows one older, or
        # not at all, comes from a store that lost it (restored from a backup taken before
        # it), even when other writes since carried its revision past the one we knew.
        self._epoch, self._own, self._stored = 0, dict[str, int](), list[float]()
        self._clash, self._clash_told, self._unacted, self.held_back = None, False, None, None
        self._renewed = self._published_at = 0.0
        # `_keep_lease` found the lease expired: the next round grants another.
        # `_unwatched`: our record's write the watch has not shown yet (`_check_watch`).
        self._lease_expired, self._unwatched = False, None
        self.client.on_header = self._header
        self._store = state_dir / "fleet.json"
        self.applied, self._rollbacks_before = self._load_store()

    # ---- what the guard asks ------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this node held the leader key at the last read."""
        return self._leader_rev is not None and self.leader == self.node

    def key(self, *parts: str) -> str:
        """The fleet key `P/<parts>`."""
        return "/".join([self.prefix, *parts])

    async def decide_rollback(
        self, target: Color, reason: str = "", severity: str | None = None
    ) -> int | None:
        """May this node roll back to `target` now? The generation to apply it as, else None.

        Only the leader writes a rollback (with its `severity`, which every node journals),
        fenced by its leader key; a follower's wish is published for `quorum = "majority"`.
        With etcd unreachable: 0 (decide alone) when `local_fallback`, else None. Never raises.
        """
        self._wants_at = time.monotonic()
        if self._published is not None and not self._published.get("wants_rollback"):
            self._changed_now()  # publish the wish at once, not at the next lease third
        self.held_back = None
        if not self.reachable:
            if self.c.local_fallback:
                return 0
            self._cannot_act(target, reason)
            self.held_back = "etcd is unreachable and fleet.local_fallback is false"
            return None
        if not self.is_leader:
            self.held_back = f"the fleet's leader ({self.leader or 'UNKNOWN'}) decides"
            return None
        d = self.desired
        if (
            d is not None
            and d.get("color") == target
            and int(d.get("generation", 0)) > self.applied
        ):
            return int(d["generation"])  # already decided; not applied here yet
        if self.c.quorum == "majority":
            live = [n for n in self.nodes.values() if n.get("wants_rollback")]
            wanting = len(live) + (0 if self.nodes.get(self.node, {}).get("wants_rollback") else 1)
            if wanting * 2 <= max(len(self.nodes), 1):
                self.held_back = (
                    f"quorum majority: {wanting} of {max(len(self.nodes), 1)} live nodes see it"
                )
                return None
        try:
            generation = await self._write_desired(
                target,
                "rollback",
                self.node,
                reason or f"roll back to {target}",
                fenced=True,
                severity=severity,
            )
        except EtcdUnavailable:
            if self.c.local_fallback:
                return 0
            self.held_back = "etcd did not take the decision"
            return None
        if generation is None:
            self.held_back = "etcd refused the decision: this node's leadership or desired changed"
        return generation

    def _cannot_act(self, target: Color, reason: str) -> None:
        """This node wants a rollback and cannot write it (etcd unreachable, no
        `local_fallback`): journal it once an outage, and warn until etcd is back."""
        guard = self.guard
        if guard is None:
            return
        first, self._unacted = (
            self._unacted is None,
            (
                f"fleet: this node sees {guard.active} failing and does not roll back to "
                f"{target}: etcd is unreachable and fleet.local_fallback is false ({reason})"
            ),
        )
        if first:
            guard.record("alert", reason=self._unacted, source=guard.active, target=target)

    async def propose(
        self, target: Color, kind: str, by: str, reason: str, *, gated: bool = False
    ) -> int:
        """An operator's rollback, switch or promote for the whole fleet; its generation.

        A switch or promote is two-phase: every live node tests `target` first (see
        `prepare`). `gated` (a switch or promote that passed the QoS gate, which read the
        fleet's lock as this node last read it: `qos_doc`): the decision is written only if
        `qos` has not changed since (a lock taken on another node while the nodes test the
        target refuses the move, as it would have refused it a moment earlier). Raises
        `OperationRefused` naming the nodes that refused or did not answer, the lock, or
        when etcd cannot be reached.
        """
        with self._operator_write(f"the fleet cannot {kind}"):
            qos_mod = None
            if gated:
                current = self._kvs.get(self.key("qos"))
                qos_mod = current.mod_revision if current is not None else 0
            if kind != "rollback":
                await self._prepare(target)
            generation = await self._write_desired(
                target, kind, by, reason, fenced=False, qos_mod=qos_mod
            )
            if generation is None and qos_mod is not None:
                # Which comparison failed: the lock, read from the store itself (the watch
                # may not have brought it yet).
                _, kvs = await self.client.read(self.key("qos"))
                now = _json(kvs[0].value, {}) if kvs else {}
                now = now if isinstance(now, dict) else {}
                if (kvs[0].mod_revision if kvs else 0) != qos_mod:
                    raise OperationRefused(
                        f"the fleet's QoS lock changed while the nodes tested {target}"
                        + (f": locked ({now.get('reason')})" if now.get("locked") else "")
                        + f"; nothing was switched: look, then {kind} again"
                    )
        if generation is None:
            raise OperationRefused(f"the fleet's desired color changed meanwhile; {kind} again")
        return generation

    async def undo(self, generation: int, back_to: Color, by: str, why: str) -> int | None:
        """The move this node proposed as `generation` failed here and was undone (it
        serves `back_to` again): write `back_to` as the fleet's desired color, a newer
        generation, so that no node keeps trying a color that did not verify (each try
        would put its users on it). Only while `desired` is still that generation (read
        from the store, compared in the write); its generation, else None. Never raises
        but `OperationRefused` when etcd cannot be reached.
        """
        with self._operator_write("the fleet's desired color cannot be put back"):
            _, kvs = await self.client.read(self.key("desired"))
            current = _json(kvs[0].value, {}) if kvs else {}
            if not kvs or not isinstance(current, dict):
                return None
            if _int(current.get("generation")) != generation:
                return None  # another decision came since: it stands
            back = self.known_generation() + 1
            doc = {
                "color": back_to,
                "generation": back,
                "kind": "switch",
                "by": by,
                "reason": f"undone: {why}",
                "severity": None,
                "at": time.time(),
                "node": self.node,
            }
            ok, _ = await self.client.txn(
                [compare(self.key("desired"), "MOD", kvs[0].mod_revision)],
                [put_op(self.key("desired"), doc)],
            )
        if not ok:
            return None
        self.desired, self._desired_mod = doc, 0
        return back

    def applied_generation(self, generation: int) -> None:
        """Remember that this node serves `generation`'s color (kept across restarts)."""
        if generation > self.applied:
            self.applied = generation
            self._save_store()

    def _save_store(self) -> None:
        """`fleet.json`: the generation this node applied, and the fleet's rollbacks its
        budget counts (those after its last `resume`), as this node last knew them: a
        restarted node writes back what a new or restored store lacks. Written atomically;
        a failure is a warning of the state dir's, never the fleet's."""
        kept = self._to_keep()
        doc = {"applied": self.applied, "rollbacks": kept}
        with contextlib.suppress(GuarddError):
            fsutil.atomic_write(self._store, json.dumps(doc).encode(), mode=0o640)
            self._stored = kept

    def _to_keep(self) -> list[float]:
        """The rollbacks `fleet.json` keeps: those the budget counts since the fleet's last
        `resume`, the newest 100."""
        since = self.rearmed_at
        return [t for t in self.budget_rollbacks if t >= since][-100:]

    def warnings(self) -> list[str]:
        """What `status` shows as WARNING for the fleet."""
        found = []
        if self.reachable is False:
            what = "decides alone" if self.c.local_fallback else "makes no automatic switch"
            found.append(
                f"fleet: etcd is unreachable ({self.problem}); this node keeps serving "
                f"what it last applied and {what}"
            )
        if self._unacted is not None and self.reachable is False:
            found.append(self._unacted)
        if self._clash is not None and self._clash_told:
            found.append(self._clash_text())
        elif self.reachable:
            found += [
                f"fleet: a second guardd runs as node {name} (serving {doc.get('serving')}): "
                "give each node its own fleet.node"
                for name, doc in sorted(self.twins().items())
            ]
        found += [self._alert_text(n) for n in self.diverged()]
        found += [
            f"fleet: node {name} holds: it makes no automatic switch (`guardctl status` "
            "on it says why)"
            for name in self.holding()
            if name != self.node  # this node's own hold is its `status`'s
        ]
        if self.reachable and (few := self.undersized()) is not None:
            found.append(f"fleet: {few}")
        behind = self.unconverged() if self.reachable else None
        if behind is not None and "not a decision guardd wrote" in behind:
            found.append(f"fleet: {behind} ({self.key('desired')})")
        if self._rollbacks_bad is not None and self.reachable:
            found.append(self._rollbacks_bad)
        return found

    def _clash_text(self) -> str:
        other = self._clash[1] if self._clash is not None else 0
        return (
            f"fleet: another guardd publishes as node {self.node} (etcd lease {other:x}): "
            "this node does not publish its record nor answer for that name; give each "
            "node its own fleet.node"
        )

    def _alert_text(self, name: str) -> str:
        want = (self.desired or {}).get("color")
        if name in self._lost:
            last = self.seen.get(name, {})
            return (
                f"fleet: node {name} is lost (its lease expired; last seen serving "
                f"{last.get('serving')}, generation {last.get('generation')}) for longer "
                "than switch.timeout"
            )
        return (
            f"fleet: node {name} serves {self.nodes.get(name, {}).get('serving')}, not the "
            f"desired {want}, for longer than switch.timeout"
        )

    def status_word(self) -> str | None:
        """The STATUS= word: `fleet=etcd-unreachable`, `fleet=diverged`, or None."""
        if self.reachable is False:
            return "fleet=etcd-unreachable"
        if self._clash is not None and self._clash_told:
            return "fleet=name-clash"
        if self.diverged():
            return "fleet=diverged"
        return None

    def diverged(self) -> list[str]:
        """Nodes serving something other than the desired color, or lost (their lease
        expired), for longer than switch.timeout."""
        now = time.monotonic()
        late = {n for n, t in self._diverged.items() if now - t > self.switch_timeout}
        late |= {n for n, t in self._lost.items() if now - t > self.switch_timeout}
        return sorted(late)

    def holding(self) -> list[str]:
        """The live nodes whose record says they hold (state `hold`), when etcd answers."""
        return lockread.holders(self.nodes) if self.reachable else []

    def summary(self) -> dict[str, Any]:
        """`status --json`'s `fleet`: this node, the leader, the desired color and
        generation, the generation applied here, whether etcd answers (`guardctl fleet
        status` has every node). While etcd does not answer (or has not yet), the fleet's
        leader, color and generation are unknown: null, and `last_read` has them as last
        read."""
        desired = self.desired or {}
        fleet = {
            "leader": self.leader,
            "desired": desired.get("color"),
            "generation": desired.get("generation"),
        }
        known = self.reachable is True
        return {
            "node": self.node,
            **(fleet if known else dict.fromkeys(fleet)),
            "applied": self.applied,
            "etcd_reachable": self.reachable,
            "last_read": None if known else fleet,
        }

    def undersized(self) -> str | None:
        """Why this fleet is not known to be the configured one: fewer nodes seen under the
        prefix, live or lost, this one included, than `fleet.size` (`lockread.undersized`);
        else None."""
        members = set(self.seen) | set(self.nodes) | {self.node}
        return lockread.undersized(members, self.c.size, self.prefix)

    def lost_nodes(self) -> list[str]:
        """The nodes with a last record (`seen/`) but no live one: their lease expired."""
        return sorted(set(self.seen) - set(self.nodes) - {self.node})

    def unconverged(self) -> str | None:
        """Why the fleet has not converged on its desired color, else None: the live nodes
        serving another color, and the lost ones last seen serving another (a node
        forgotten with `etcdctl del P/seen/<node>` is not waited for). With etcd not read
        (unreachable, or not yet) the nodes cannot be told: that is a reason too (fail
        closed). A guard window whose SLOs held goes on while this is not None."""
        if not self.reachable:
            return "the fleet's nodes cannot be told: etcd is not reachable"
        lost = {name: self.seen[name] for name in self.lost_nodes()}
        return lockread.unconverged(self.desired, self.nodes, lost, self.twins())

    def lock_must_stay(self) -> str | None:
        """Why a guard window whose SLOs held on this node must go on, else None: the fleet
        has not converged (`unconverged`); and on the leader, whose window is the fleet's
        lock, another live node's own guard window still runs (its record says `"window":
        "open"` or `"failing"`): the fleet's lock ends only after every node's window, so a
        node that applied the rollback late, or saw the SLOs fail, gets its whole window.
        Followers wait for no one's window (the leader waits for theirs), so no two windows
        wait for each other."""
        behind = self.unconverged()
        if behind is not None or not self.is_leader:
            return behind
        running = self._running_windows()
        if not running:
            return None
        return "; ".join(
            f"the guard window of node {name} "
            + ("is not met" if doc["window"] == "failing" else "still runs")
            for name, doc in running.items()
        )

    def lock_stay_ends(self) -> float | None:
        """When what `lock_must_stay` waits for ends, in wall seconds since the epoch, if
        that is known: only other nodes' guard windows, each of whose records says when it
        is judged (`"window_until"`). None otherwise (an unconverged fleet, a record
        without its end: the keeper then extends by a whole `qos.window`).

        The leader's window would otherwise go on a whole `qos.window` for followers'
        windows that end a moment after it (they began when each node applied the
        rollback, a fleet round or two later).
        """
        if self.unconverged() is not None or not self.is_leader:
            return None
        ends = []
        for doc in self._running_windows().values():
            until = doc.get("window_until")
            try:
                ends.append(parse_rfc3339(until) if isinstance(until, str) else None)
            except ValueError:
                return None
        if not ends or None in ends:
            return None
        return max(e for e in ends if e is not None)

    def _running_windows(self) -> dict[str, dict[str, Any]]:
        """The other live nodes whose own guard window runs (`"window"`: open or failing)."""
        return {
            name: doc
            for name, doc in sorted(self.nodes.items())
            if name != self.node and doc.get("window") in ("open", "failing")
        }

    def twins(self) -> dict[str, dict[str, Any]]:
        """The records of a second guardd running under a node's name (`clash/<node>`)."""
        return _under(list(self._kvs.values()), self.key("clash") + "/")

    def status_doc(self) -> dict[str, Any]:
        """`guardctl fleet status --json`: the nodes, the leader, the desired color.

        A node whose lease expired stays listed from its last record (`P/seen/<node>`),
        with `"lost": true` and `"lease": "expired"`.
        """
        now, mono = time.time(), time.monotonic()
        alerts = self.diverged()
        rows = []
        for name in sorted(set(self.nodes) | set(self._lost)):
            lost = name not in self.nodes
            doc = self.seen.get(name, {}) if lost else self.nodes[name]
            since = self._lost.get(name) if lost else None
            rows.append(
                {
                    "node": name,
                    "serving": doc.get("serving"),
                    "generation": doc.get("generation"),
                    # The age of the node's record: its last renewal, or for a lost node
                    # the last change it published (`seen/`); `lost_for_s`: since this
                    # node found its lease gone.
                    "lease_age_s": round(max(0.0, now - float(doc.get("at", now))), 3),
                    "lost_for_s": None if since is None else round(max(0.0, mono - since), 3),
                    "lease": "expired" if lost else "live",
                    # The node's guard state as its record says (None: lost, or a record
                    # from before states were published).
                    "state": None if lost else doc.get("state"),
                    "lost": lost,
                    "leader": name == self.leader,
                    "alert": name in alerts,
                }
            )
        return {
            "node": self.node,
            "prefix": self.prefix,
            "etcd_reachable": self.reachable,
            "problem": self.problem,
            "leader": self.leader,
            "desired": self.desired,
            "rollbacks": len(self.budget_rollbacks),
            "nodes": rows,
            "alerts": alerts,
            "twins": sorted(self.twins()),
            "warnings": self.warnings(),
        }

    def qos_doc(self) -> dict[str, Any]:
        """The fleet's QoS lock as `qos status --json` shows it, `"source": "fleet"`.

        A lock held in this node's own lock file (one not yet published, or a `touch`)
        blocks too: then it is that one, `"source": "local"`. With etcd unreachable the
        fleet's lock is unknown: `"locked": null, "unknown": true` (never "unlocked").
        """
        if (why := self.qos_unknown_why()) is not None:
            # Also before the first read from etcd: an empty local lock file says nothing
            # about the fleet's lock (fail closed); nor does a fleet smaller than configured.
            return qoslock.unknown_json(why, source="fleet")
        local = (
            qoslock.read_lock(self.guard.s.lock_file)
            if self.guard is not None
            else qoslock.LockInfo(held=False)
        )
        if self.qos is None and not local.held:
            # No `qos` key, or not one guardd wrote: not "unlocked" (a mistyped prefix, a
            # store that lost it, a hand's edit).
            return qoslock.unknown_json(
                f"the fleet's QoS lock in etcd ({self.key('qos')}) is {self._qos_bad}; "
                "the fleet's QoS lock is unknown"
                if self._qos_bad is not None
                else f"{lockread.missing_lock(self.key('qos'))}; the fleet's QoS lock is unknown",
                source="fleet",
            )
        fleet = dict(self.qos) if self.qos is not None else {"locked": False}
        lock = qoslock.LockInfo(held=False).to_json() | fleet | {"source": "fleet"}
        if not fleet.get("locked") and local.held:
            lock = local.to_json() | {"source": "local"}
        # A rollback written and not yet applied everywhere (or a node that cannot apply
        # it): some users still meet the other color; and a node that holds, whose hold's
        # lock is in its own lock file: no deploy on any host, and the reason says so.
        return lockread.gate(
            lock, self.unconverged(), lockread.holding(self.nodes, besides=self.node)
        )

    def qos_unknown_why(self) -> str | None:
        """Why the fleet's QoS lock cannot be told here (etcd not read yet, or unreachable,
        or fewer nodes seen than `fleet.size`: `undersized`); None when it can."""
        if self.reachable:
            few = self.undersized()
            return None if few is None else f"{few}; the fleet's QoS lock is unknown"
        if self.reachable is None:
            return "etcd has not been read yet: the fleet's QoS lock is unknown"
        return f"etcd is unreachable ({self.problem}): the fleet's QoS lock is unknown"

    def require_etcd(self, consequence: str) -> None:
        """Raise `OperationRefused` ("etcd is unreachable (...); <consequence>") unless the
        last round reached etcd."""
        if not self.reachable:
            raise OperationRefused(f"etcd is unreachable ({self.problem}); {consequence}")

    @contextlib.contextmanager
    def _operator_write(self, consequence: str) -> Iterator[None]:
        """Around an operator's write to etcd: refused ("etcd is unreachable (...);
        <consequence>") before it when the last round did not reach etcd, and when etcd
        fails it (`EtcdUnavailable` becomes `OperationRefused`)."""
        self.require_etcd(consequence)
        try:
            yield
        except EtcdUnavailable as e:
            raise OperationRefused(f"etcd is unreachable ({e}); {consequence}") from None

    @property
    def budget_rollbacks(self) -> list[float]:
        """The fleet's automatic rollbacks (wall times) its budget counts: etcd's, and the
        ones this node knew that the store lost and the leader has not written back yet."""
        if not self._rollbacks_before:
            return self.rollbacks
        return sorted({*self.rollbacks, *self._rollbacks_before})

    @property
    def rearmed_at(self) -> float:
        """The wall time of the fleet's last `resume` (0 when none): the fleet's rollback
        budget counts only the rollbacks after it."""
        return float(self.rearmed["at"]) if self.rearmed is not None else 0.0

    async def rearm(self, by: str, reason: str) -> None:
        """An operator's `resume` on this node, for the whole fleet: the fleet's rollback
        budget is refilled and every node's hold ends (journaled there as `resumed` by
        `fleet:<by>`). Raises `OperationRefused` when etcd cannot be reached."""
        at = time.time()
        doc: dict[str, Any] = {"at": at, "by": by, "node": self.node, "reason": reason}
        with self._operator_write(
            "resumed on this node only: the fleet's rollback budget and the other nodes' holds "
            "were not resumed"
        ):
            await self.client.put(self.key("rearmed"), json.dumps(doc))
        self.rearmed, self._rearm = doc, (True, at)

    async def _adopt_rearm(self) -> None:
        """Another node's `resume` is the fleet's: end this node's hold and refill its own
        count of the budget (journaled `resumed` by `fleet:<who>`); a pause stays, as it is
        this node's operator's."""
        at = self.rearmed_at if self.rearmed is not None else None
        (read, seen), self._rearm = self._rearm, (True, at)
        guard, doc = self.guard, self.rearmed
        if at is None or at == seen or guard is None or doc is None:
            return  # nothing new
        if not read and not self._resumed_while_away(at):
            return  # the first read at start is the fleet as it was
        if doc.get("node") == self.node:
            return
        async with guard.lock:
            guard.fleet_resumed(
                by=_fleet_by(doc.get("by")),
                reason=f"the fleet was resumed on {doc.get('node')}"
                + (f" ({doc['reason']})" if doc.get("reason") else ""),
            )

    def _resumed_while_away(self, at: float) -> bool:
        """Whether the fleet's last `resume` (wall time `at`), found at this process's first
        read, came after this node's guard began the hold it restored from before its
        restart (its hold's lock, taken then): a resume this node missed while it was down,
        which ends that hold as it ended the others'."""
        own = self.guard.own_lock if self.guard is not None else None
        if own is None or not own.hold or not own.info.locked_at:
            return False
        try:
            return at > parse_rfc3339(own.info.locked_at)
        except ValueError:
            return False

    async def set_qos(self, info: qoslock.LockInfo) -> None:
        """Write `info` as the fleet's QoS lock (an operator's `qos lock`/`unlock` on any node).

        Written by this node directly, not through the leader: the operator's command is
        answered once the fleet has it, also between two leaders, and a lock is no traffic
        decision that a deposed leader could get wrong. The transaction compares `qos`'s
        mod_revision with the one last read, so a change made meanwhile elsewhere is never
        overwritten unseen. Raises `OperationRefused` when etcd cannot be reached or the
        lock changed meanwhile.
        """
        doc = _stamped(self._as_fleets(info.to_json()))
        current = self._kvs.get(self.key("qos"))
        with self._operator_write("the fleet's QoS lock cannot be changed"):
            ok, revision = await self.client.txn(
                [compare(self.key("qos"), "MOD", current.mod_revision if current else 0)],
                [put_op(self.key("qos"), doc)],
            )
        if not ok:
            raise OperationRefused("the fleet's QoS lock changed meanwhile; look and try again")
        self._wrote_qos(doc, revision)

    def _release(self, reason: str) -> dict[str, Any]:
        """A release of the fleet's lock written by this node, as the `qos` key holds it."""
        return _stamped(
            self._as_fleets(qoslock.LockInfo(held=False, reason=reason, by=self.node).to_json())
        )

    def _as_fleets(self, lock: dict[str, Any]) -> dict[str, Any]:
        """A lock document (`LockInfo.to_json`) as the fleet's `qos` key holds it: with the
        node it was written on, which every other node journals (`fleet_node`)."""
        return {**lock, "node": self.node}

    @property
    def expiry_grace(self) -> float:
        """How long past its `until` the fleet's lock still holds (s): twice `lease_ttl`
        plus a probe interval. A guard window is judged at its owner's first tick after
        `until` and an extension published in the owner's next round; a lock read as ended
        in between would open every host's gate for that moment, then close it again."""
        interval = self.guard.s.probe_interval if self.guard is not None else 0.0
        return 2 * self.c.lease_ttl + interval

    def _wrote_qos(self, doc: dict[str, Any], revision: int) -> None:
        """Our write of `doc` as the fleet's lock passed, at `revision`."""
        self.qos, self._qos_mine, self._qos_mod, self._qos_wrote = doc, revision, revision, doc
        self._own[self.key("qos")] = revision

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the fleet, keep the lease, elect, converge; until cancelled (then
        `farewell` closes the connections)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow)
            tg.start_soon(self._keep_lease)
            await self._loop()

    async def _keep_lease(self) -> None:
        """Renew the lease whenever the loop has not for a third of its TTL: the loop may be
        busy applying a switch (`_converge`: `nginx -t`, reload, verify, up to
        `switch.timeout` and its undo), and meanwhile this node's lease, and with it its
        record and its leadership, must not expire. A lease found expired is the loop's to
        replace (`_round`); etcd out of reach is the loop's to tell.

        Not while the loop's last round failed (`reachable` False): etcd may still renew a
        lease for a node it refuses everything else (auth enabled and this node without
        credentials, a permission taken away), and that node's record, and its leadership,
        would then live on, stale, while it can neither read nor decide. Let go, the lease
        expires: the other nodes see it lost, and another leads."""
        third = self.c.lease_ttl / 3
        while True:
            await anyio.sleep(third / 2)
            lease = self.lease
            if (
                lease is None
                or self.reachable is False
                or self._lease_expired
                or time.monotonic() - self._renewed <= third
            ):
                continue
            try:
                ttl = await self.client.keepalive(lease)
            except (EtcdUnavailable, ValueError, KeyError, TypeError):
                continue
            if self.lease != lease:
                continue  # replaced meanwhile: that answer was about the old one
            if ttl > 0:
                self._renewed = time.monotonic()
            else:
                self._lease_expired = True
                self._changed_now()

    async def farewell(self) -> None:
        """At shutdown, once the guard's last switch is over (a rollback in flight finishes
        before guardd stops): write this node's record once more, so that the fleet sees
        the color it serves as it stops, not the one before that switch; at most
        `FAREWELL_S`, never an error. Then close the connections."""
        with anyio.CancelScope(shield=True):
            with (
                anyio.move_on_after(FAREWELL_S),
                contextlib.suppress(EtcdUnavailable, ValueError, KeyError, TypeError),
            ):
                if self.reachable and not self._clash_told:
                    self._published = None  # written whatever was written last
                    await self._publish_self()
            await self.client.aclose()

    async def _loop(self) -> None:
        while True:
            changed = self._changed
            try:
                await self._round()
            except LeaseGone:
                # Our lease expired (this process was away longer than its TTL): with it went
                # our leadership and records. etcd answered: grant another in the next round.
                self.lease, self._leader_rev, self._published = None, None, None
                self._changed_now()
            except EtcdUnavailable as e:
                self._unreachable(str(e))
            except (ValueError, KeyError, TypeError) as e:
                # An answer not shaped as etcd's: as good as no answer (fail closed).
                self._unreachable(f"unexpected answer from etcd: {type(e).__name__}: {e}")
            await self._converge()
            # Until something changes in the fleet (or here), or the lease needs renewing.
            with anyio.move_on_after(self.c.lease_ttl / 3):
                await changed.wait()

    def _changed_now(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def _follow(self) -> None:
        """Keep `_kvs` as etcd has it: a read, then the watch; reconnect with backoff."""
        backoff = 0.1
        last_read = -SAFETY_READ_S
        while True:
            try:
                if not self._fresh or time.monotonic() - last_read > SAFETY_READ_S:
                    # What the store had answered before the read was sent: an answer
                    # that comes back meanwhile (our own write, on another connection) may
                    # be newer than what the read saw, on a store that never went back.
                    floor, own = self._high, dict(self._own)
                    header, kvs = await self.client.read(self.prefix + "/", prefix=True)
                    self._take_read(header, kvs, floor=floor, own=own)
                    last_read = time.monotonic()
                # Reopened at the safety read, or at once when `_kick` cancels it.
                with anyio.move_on_after(SAFETY_READ_S) as self._watching:
                    await self._stream()
                backoff = 0.1
            except Compacted:
                self._fresh = False  # what was missed is gone: read it all again
            except (EtcdUnavailable, ValueError, KeyError, TypeError):
                # Back, etcd may be another store (restored while we were away): read it
                # whole before judging anything, not only from where the watch stopped.
                self._fresh = False
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_MAX_S)

    def _take_read(
        self,
        header: Header,
        kvs: list[KV],
        *,
        floor: int | None = None,
        own: dict[str, int] | None = None,
    ) -> None:
        """A whole read of the prefix: the view from now on, from the store it came from.

        `floor` and `own`: the highest revision etcd had answered, and this node's writes
        it had acknowledged, when the read was sent (by default, now). A linearizable read
        is never below those; one below them is a store that went back.
        """
        floor = self._high if floor is None else floor
        own = self._own if own is None else own
        moved = self._cluster is not None and header.cluster_id not in (0, self._cluster)
        by_key = {kv.key: kv for kv in kvs}
        lost = next(
            (
                (key, revision)
                for key, revision in own.items()
                if key not in by_key or by_key[key].mod_revision < revision
            ),
            None,
        )
        if lost is None and self._fresh_once:
            # A key guardd never deletes, in the last view and not in this one.
            gone = sorted(k for k in self._durable if k in self._kvs and k not in by_key)
            lost = (gone[0], 0) if gone else None
        if moved or header.revision < floor or lost is not None:
            self._store_went_back(header, moved=moved, lost=lost)
        elif not self._fresh_once and self.key("qos") not in by_key:
            self._own_lock_lost_while_away()
        elif not self._fresh_once:
            self._own_lock_from_before(by_key[self.key("qos")])
        self._suspect = None
        if self._cluster is None and header.cluster_id:
            self._cluster = header.cluster_id
        self._high = max(self._high, header.revision)
        self._kvs, self._revision = by_key, header.revision
        self._fresh = self._fresh_once = True
        self._changed_now()

    def _own_lock_lost_while_away(self) -> None:
        """The first read since this process started finds no `qos` key, and this node's
        guard holds a lock of its own (restored from state.json: an operator's lock taken
        here, its guard window): the store lost the fleet's lock while the node was away
        (deleted, restored), and the lock's owner publishes it again (`_republish_qos`), as
        it does for a loss it sees while running."""
        guard = self.guard
        if guard is None or guard.own_lock is None:
            return
        local = qoslock.read_lock(guard.s.lock_file)
        if local.held and guard.own_lock.info == local:
            self._qos_before = self._as_fleets(local.to_json())

    def _own_lock_from_before(self, kv: KV) -> None:
        """The first read since this process started finds, as the fleet's lock, one this
        node's guard took in an earlier run (`"by": "guardd"`, `"node"`: this node; a hold's
        lock, a guard window): it is this node's, as if this run had written it, so the node
        publishes its extension or its end as for any of its own (`_mirror_qos_up`,
        `_publish_own_window`). No other node ends a lock it did not write, and a hold's
        lock has no `until`: unclaimed, it would block every deploy after a `resume` until
        an operator's `qos unlock`."""
        doc = _json(kv.value, {})
        if (
            isinstance(doc, dict)
            and doc.get("locked") is True
            and doc.get("by") == "guardd"
            and doc.get("node") == self.node
        ):
            self._qos_mine, self._qos_wrote = kv.mod_revision, doc

    def _header(self, header: Header) -> None:
        """Every etcd answer's header: one below the store's known revision, or from
        another cluster, may be a store that went back; a fresh read tells (see `_take_read`).

        A lagging member's answer (a watch on it) may be behind too: only the read decides.
        """
        if self._suspect is not None:
            return  # a fresh read is already on its way
        if self._cluster is not None and header.cluster_id not in (0, self._cluster):
            why = f"etcd's cluster_id changed from {self._cluster} to {header.cluster_id}"
        elif 0 < header.revision < self._high:
            why = f"etcd answered revision {header.revision}, below {self._high}"
        else:
            self._high = max(self._high, header.revision)
            return
        self._suspect, self._fresh = why, False
        self._kick()  # the watch may wait for revisions the store does not have yet
        self._changed_now()

    def _store_went_back(
        self, header: Header, *, moved: bool, lost: tuple[str, int] | None = None
    ) -> None:
        """The store went back (restored, or a new cluster): forget every revision, say so.

        `lost`: a key this node wrote, at the revision etcd acknowledged, that the store no
        longer holds as written."""
        old = self._high
        self._own.clear()
        self._epoch += 1
        self._went_back = True
        self._rollbacks_before = sorted({*self._rollbacks_before, *self.rollbacks})[-100:]
        if self.rearmed is not None and self.rearmed_at >= _at(self._rearmed_before):
            self._rearmed_before = self.rearmed
        if (self.qos or {}).get("locked"):
            self._qos_before = self.qos
        elif self.qos is not None:
            # Released: the leader writes the release back if no lock's owner publishes
            # its lock meanwhile (`_restore_qos_release`).
            self._release_before = self.qos
        if self.desired is not None and _int(self.desired.get("generation")) >= _int(
            (self._desired_before or {}).get("generation")
        ):
            self._desired_before = self.desired
        self._cluster = header.cluster_id or self._cluster
        self._high = header.revision
        # Revisions of the old store mean nothing in this one: compared in a transaction
        # they could even match another key's.
        self._qos_mine, self._qos_mod, self._desired_mod = 0, None, 0
        self._leader_rev = None
        # Our lease and records went with the old store: a new lease, records written again.
        self.lease, self._published = None, None
        self._qos_settle_until = time.monotonic() + self.c.lease_ttl
        guard = self.guard
        if guard is not None:
            guard.record(
                "alert",
                by=self.node,
                revision=header.revision,
                previous_revision=old,
                reason=_went_back_why(header.revision, old, moved=moved, lost=lost)
                + "; this node read it afresh and acts on what it holds now",
            )

    def _stale(self, epoch: int) -> bool:
        """Whether the view a round started from is gone: it waits for a fresh read, or the
        store went back meanwhile (an await may have seen it: see `_header`)."""
        return not self._fresh or self._epoch != epoch

    def _check_watch(self) -> None:
        """Read the prefix afresh and reopen the watch (on the member that answers now)
        when our own acknowledged record has not come through the watch in `WATCH_LAG_S`:
        the stream is stuck, and the view it keeps is stale. Logged as
        `fleet_watch_stuck`."""
        if self._unwatched is None:
            return
        revision, since = self._unwatched
        if self._revision >= revision or not self._fresh:
            self._unwatched = None  # shown (or a fresh read is on its way anyway)
            return
        if time.monotonic() - since < WATCH_LAG_S:
            return
        self._unwatched = None
        if self.guard is not None:
            self.guard.log.warning(
                "fleet_watch_stuck", revision=revision, watched=self._revision, waited_s=WATCH_LAG_S
            )
        self._fresh = False
        self._kick()
        self._changed_now()

    def _kick(self) -> None:
        """Reopen the watch now (its connection may be dead after etcd was away)."""
        self._watching.cancel()

    async def _stream(self) -> None:
        async for revision, changes in self.client.watch(
            self.prefix + "/", start_revision=self._revision + 1, idle=WATCH_IDLE_S
        ):
            if not self._fresh:
                return  # the store may have gone back (see `_header`): read it afresh
            for deleted, kv in changes:
                if deleted and kv.key in self._durable:
                    # guardd never deletes these: the store lost them (or a hand removed
                    # them). What this node knew stays its "before" (the leader puts the
                    # budget and the decision back, a lock's owner its lock), read afresh.
                    self._store_went_back(
                        Header(self._cluster or 0, revision), moved=False, lost=(kv.key, 0)
                    )
                    self._fresh = False
                    return
                if deleted:
                    self._kvs.pop(kv.key, None)
                else:
                    self._kvs[kv.key] = kv
            if changes:
                # Only a message with events moves the resume point: the `created` one
                # reports the store's revision before the missed events are streamed.
                self._revision = max(self._revision, revision)
                self._changed_now()

    def _unreachable(self, problem: str) -> None:
        guard = self.guard
        if self.reachable is not False and guard is not None:
            guard.record("alert", reason=f"fleet: etcd is unreachable: {problem}", by=self.node)
        if self.reachable is not False:
            self.unreachable_since = time.monotonic()
        self.reachable, self.problem = False, problem
        self._leader_rev = None
        self._diverged.clear()
        self._lost.clear()

    async def _round(self) -> None:
        epoch = self._epoch
        now = time.monotonic()
        # After a failed round the lease is renewed only once etcd took a write of ours
        # again (see `_keep_lease`): our record, written first (it raises while refused).
        proven = self.reachable is not False
        if not proven and self.lease is not None and not self._lease_expired:
            await self._publish_self(force=True)
            proven = True
        if self.lease is None:
            self.lease, self._renewed = await self.client.grant(self.c.lease_ttl), now
            self._published, self._lease_expired = None, False
        elif proven and (self._lease_expired or now - self._renewed > self.c.lease_ttl / 3):
            if self._lease_expired or await self.client.keepalive(self.lease) <= 0:
                # The lease expired (etcd or this process was away too long): so did
                # leadership, and our record with it.
                self.lease, self._leader_rev = await self.client.grant(self.c.lease_ttl), None
                self._published, self._lease_expired = None, False
            self._renewed = now
        await self._publish_self()
        self._check_watch()
        if self._stale(epoch):
            return  # the first read (or one after the store went back) is not in yet
        kvs = list(self._kvs.values())
        self._read(kvs)
        await self._answer_prepares(kvs)
        if self._stale(epoch):
            return
        if self.reachable is False:
            if self.guard is not None:
                self.guard.record("alert", reason="fleet: etcd is reachable again", by=self.node)
            self._kick()  # the watch may hang on a dead connection: reopen it now
        self.reachable, self.problem, self.unreachable_since = True, None, None
        self._unacted = None
        # Each step acts on the view read from the store as it is: none after a sign that
        # the store went back, until it is read afresh.
        leading: tuple[Callable[[], Awaitable[None]], ...] = ()
        paused = self.guard is not None and self.guard.paused is not None
        if self.leader is None:
            if not paused:
                await self._campaign()
        elif self.is_leader and paused:
            await self._resign()
        elif self.is_leader:
            leading = (
                self._restore_desired,
                self._restore_rollbacks,
                self._restore_rearmed,
                self._mirror_qos_up,
                self._expire_qos,
                self._keep_qos_key,
            )
        for step in (
            # A release read in this round acts first: the leader's `_mirror_qos_up` would
            # otherwise publish its own window over an operator's unlock taken on another
            # node before this node ended that window.
            self._adopt_qos,
            *leading,
            self._republish_qos,
            self._publish_own_window,
            self._mirror_qos_down,
            self._adopt_rearm,
        ):
            if self._stale(epoch):
                return
            await step()
        if not self._stale(epoch):
            self._watch_divergence()

    def _read(self, kvs: list[Any]) -> None:
        by_key = {kv.key: kv for kv in kvs}
        leader = by_key.get(self.key("leader"))
        self.leader = leader.value if leader is not None else None
        if self.leader is not None:
            self._last_leader = self.leader
        if leader is None or leader.value != self.node or leader.lease != self.lease:
            self._leader_rev = None
        elif self._leader_rev is None:
            self._leader_rev = leader.create_revision  # ours, e.g. written before a restart
        desired = by_key.get(self.key("desired"))
        value = _json(desired.value) if desired is not None else None
        # Present but garbled: `{}`, a decision that cannot be read (never "none yet").
        self.desired = None if desired is None else value if isinstance(value, dict) else {}
        self._desired_mod = desired.mod_revision if desired is not None else 0
        rollbacks = by_key.get(self.key("rollbacks"))
        got = _json(rollbacks.value, None) if rollbacks is not None else []
        if isinstance(got, list) and all(
            isinstance(t, int | float) and not isinstance(t, bool) for t in got
        ):
            self.rollbacks, self._rollbacks_bad = [float(t) for t in got], None
        else:
            # Not the list of times guardd writes (a hand's edit, damage): the budget as
            # this node last knew it stays, never an empty one (that would refill it).
            self._rollbacks_bad = (
                f"fleet: {self.key('rollbacks')} in etcd is not the list of rollback times "
                f"guardd writes: the budget counts the {len(self.rollbacks)} rollback(s) "
                "this node last knew"
            )
        rearmed = by_key.get(self.key("rearmed"))
        doc = _json(rearmed.value, None) if rearmed is not None else None
        at = doc.get("at") if isinstance(doc, dict) else None
        valid = isinstance(at, int | float) and not isinstance(at, bool)
        self.rearmed = doc if isinstance(doc, dict) and valid else None
        if (
            self._rollbacks_before
            and not self._went_back
            and set(self._rollbacks_before) <= set(self.rollbacks)
        ):
            # Kept from before a restart: a store that holds them all is the one they
            # came from, and needs nothing written back.
            self._rollbacks_before = []
        if self._to_keep() != self._stored:
            self._save_store()
        qos = by_key.get(self.key("qos"))
        if (qos.mod_revision if qos is not None else 0) >= self._qos_mine:
            # A view older than our own last write (the watch has not brought it yet) would
            # bring back the lock we just replaced: ours stays until etcd's catches up.
            doc = _json(qos.value) if qos is not None else None
            # One guardd did not write (garbled, or `{"locked": false}` by hand) is no lock
            # and no release: unknown (`qos_doc`), acted on by no node.
            bad = None if qos is None else lockread.lock_problem(doc)
            known = self.qos
            if bad is not None and self._qos_bad is None and known and known.get("locked"):
                # Written over a lock guardd wrote: as if the store had lost that lock, its
                # owner publishes it again (`_republish_qos`); no other node writes over it.
                self._qos_before = known
                if self.guard is not None:
                    self.guard.record(
                        "alert",
                        by=self.node,
                        reason=f"fleet: the fleet's QoS lock in etcd ({self.key('qos')}) was "
                        f"replaced by {bad}; the lock it held ({known.get('reason')}) is "
                        "published again by the node that holds it, and deploys stay blocked "
                        "meanwhile",
                    )
            self._qos_bad = bad
            self.qos = None if bad is not None else doc
        self.nodes = _under(kvs, self.key("nodes") + "/")
        self.seen = _under(kvs, self.key("seen") + "/")

    async def _publish_self(self, *, force: bool = False) -> None:
        """Write our record under the lease when it changed or a third of the lease went by,
        and its copy without a lease (`seen/`) when what we serve changed."""
        guard = self.guard
        if self.lease is None:
            return  # never a record without a lease (the store went back: a new one comes)
        wants = self._wants_at is not None and time.monotonic() - self._wants_at < self.c.lease_ttl
        own = guard.own_lock if guard is not None else None
        doc: dict[str, Any] = {
            "serving": guard.active if guard is not None else None,
            "generation": self.applied,
            "wants_rollback": wants,
            # This node's own guard window judged and not met (its SLOs failed here).
            "window": None
            if own is None or own.window is None
            else ("failing" if own.failed else "open"),
            # When it is judged: the leader's window waits for it, and no longer.
            "window_until": None if own is None or own.window is None else own.info.until,
            # `hold` here (no safe switch, or the front door unknown): every node's `fleet
            # status` warns of it, not only this node's `status`.
            "state": guard.state.value if guard is not None else None,
        }
        now = time.monotonic()
        # `force`: written even unchanged (a write etcd takes is what a round after a failed
        # one waits for); what we serve is compared with the last record all the same, so
        # `seen/` is rewritten only when that changed.
        if not force and doc == self._published and now - self._published_at < self.c.lease_ttl / 3:
            return
        record = doc | {"at": time.time()}
        key = self.key("nodes", self.node)
        # Only over our own record, none, or one without a lease (guardd writes none such:
        # a hand's `etcdctl put` would otherwise silence this node until deleted); never
        # over another process's of this name, which is under its lease.
        for check in (
            compare(key, "LEASE", self.lease),
            compare(key, "CREATE", 0),
            compare(key, "LEASE", 0),
        ):
            ok, revision = await self.client.txn([check], [put_op(key, record, lease=self.lease)])
            if ok:
                if self._unwatched is None:
                    self._unwatched = (revision, time.monotonic())
                break
        was = self._clash_told
        self._note_clash(now, clashing=not ok)
        if ok and was:
            await self.client.delete(self.key("clash", self.node))
        if not ok:
            if self._clash_told:
                # Seen by every node: the fleet has not converged while this twin serves
                # another color, and `fleet status` lists it.
                await self.client.put(
                    self.key("clash", self.node), json.dumps(record), lease=self.lease
                )
            return
        last = self._published or {}
        if (last.get("serving"), last.get("generation")) != (doc["serving"], doc["generation"]):
            seen = {k: record[k] for k in ("serving", "generation", "at")}
            revision = await self.client.put(self.key("seen", self.node), json.dumps(seen))
            self._own[self.key("seen", self.node)] = revision
        self._published, self._published_at = doc, now

    def _note_clash(self, now: float, *, clashing: bool) -> None:
        """Whether our record could not be written: `nodes/<our name>` is held under a
        lease not ours. An earlier run of this node (restarted, its lease not yet expired)
        lets go within `lease_ttl`; a record that outlives that is another guardd with the
        same `fleet.node`: journaled once (an `alert`), a WARNING, `fleet=name-clash`."""
        if not clashing:
            if self._clash is not None and self._clash_told and self.guard is not None:
                self.guard.record(
                    "alert", reason=f"fleet: node name {self.node} is this node's alone again"
                )
            self._clash, self._clash_told = None, False
            return
        held = self._kvs.get(self.key("nodes", self.node))
        if self._clash is None:
            self._clash, self._clash_told = (now, held.lease if held is not None else 0), False
        if not self._clash_told and now - self._clash[0] > 1.5 * self.c.lease_ttl:
            self._clash_told = True
            if self.guard is not None:
                self.guard.record("alert", reason=self._clash_text())

    async def _campaign(self) -> None:
        if self.lease is None:
            return  # a leader key without a lease would never expire
        ok, revision = await self.client.txn(
            [compare(self.key("leader"), "CREATE", 0)],
            [put_op(self.key("leader"), self.node, lease=self.lease or 0)],
        )
        if ok:
            previous = self._last_leader
            self.leader, self._leader_rev, self._last_leader = self.node, revision, self.node
            self._local_lock = None  # look at our lock file afresh, as the fleet's
            if self.guard is not None:
                # The leader key's create_revision is the term: it fences every write.
                self.guard.record(
                    "fleet_leader",
                    node=self.node,
                    previous=previous,
                    revision=revision,
                    by=self.node,
                    reason=f"{self.node} leads the fleet {self.prefix}"
                    + (f" after {previous}" if previous and previous != self.node else ""),
                )

    async def _resign(self) -> None:
        """A paused node does not lead: its pause stops its own automatic rollbacks, and
        would stop the whole fleet's if it kept deciding them. It deletes the leader key
        it holds (fenced on its term), so that another node takes it."""
        if self._leader_rev is None:
            return
        ok, _ = await self.client.txn(
            [compare(self.key("leader"), "CREATE", self._leader_rev)],
            [delete_op(self.key("leader"))],
        )
        if ok:
            self.leader, self._leader_rev = None, None
            if self.guard is not None:
                self.guard.record(
                    "fleet_leader",
                    node=None,
                    previous=self.node,
                    by=self.node,
                    reason=f"{self.node} is paused: it hands over the lead of the fleet "
                    f"{self.prefix}, whose automatic rollbacks another node decides",
                )

    async def _write_desired(
        self,
        target: Color,
        kind: str,
        by: str,
        reason: str,
        *,
        fenced: bool,
        severity: str | None = None,
        qos_mod: int | None = None,
    ) -> int | None:
        """Write `desired` (and, for a fenced rollback, the budget); its generation, or None
        when a comparison failed: `desired` changed since read, the leader key is no
        longer ours (`fenced`), or `qos` changed since `qos_mod` (when given)."""
        generation = self.known_generation() + 1
        doc = {
            "color": target,
            "generation": generation,
            "kind": kind,
            "by": by,
            "reason": reason,
            "severity": severity,
            "at": time.time(),
            "node": self.node,
        }
        checks = [compare(self.key("desired"), "MOD", self._desired_mod)]
        if qos_mod is not None:
            checks.append(compare(self.key("qos"), "MOD", qos_mod))
        if fenced:
            if self._leader_rev is None:
                return None
            checks.append(compare(self.key("leader"), "CREATE", self._leader_rev))
        ops = [put_op(self.key("desired"), doc)]
        if kind == "rollback" and fenced:
            # The budget counts automatic rollbacks (the leader's, fenced), as a single
            # guard's does; an operator's `guardctl rollback` spends none of it. Ones the
            # store lost and this node knew go back with it.
            ops.append(put_op(self.key("rollbacks"), [*self.budget_rollbacks[-99:], time.time()]))
        ok, _ = await self.client.txn(checks, ops)
        if not ok:
            return None
        self.desired, self._desired_mod = doc, 0
        self._went_back, self._desired_before = False, None  # a new decision supersedes
        return generation

    def known_generation(self) -> int:
        """The highest generation this node knows of: desired's (and, after the store went
        back, the one before), its own applied one, every node's record (`nodes/`, `seen/`).

        A new decision is numbered above it: after a restore to an older store, `desired`
        may be below what nodes already applied, and they ignore a generation not above theirs.
        """
        known = [_int((self.desired or {}).get("generation")), self.applied]
        known.append(_int((self._desired_before or {}).get("generation")))
        known += [_int(doc.get("generation")) for doc in self.nodes.values()]
        known += [_int(doc.get("generation")) for doc in self.seen.values()]
        return max(known)

    async def _prepare(self, target: Color) -> None:
        """Phase one of a switch or promote: every live node tests `target`."""
        ask = f"{time.time_ns()}-{self.node}"
        live = sorted(self.nodes)
        await self.client.put(
            self.key("prepare", ask), json.dumps({"target": target}), lease=self.lease or 0
        )
        if self.node in live and self.guard is not None:
            # This node answers for itself here, not in its round: the operator's command
            # asking holds the guard's lock until this returns, and a round waiting on that
            # lock would answer only after the wait for the answers ran out.
            self._answered.add(ask)
            await self._answer(ask, target)
        answers: dict[str, dict[str, Any]] = {}
        ready = self.key("ready", ask) + "/"
        try:
            with anyio.move_on_after(2 * self.switch_timeout):
                while set(answers) < set(live):
                    changed = self._changed
                    answers = {
                        k[len(ready) :]: _json(kv.value, {})
                        for k, kv in list(self._kvs.items())
                        if k.startswith(ready)
                    }
                    if set(answers) < set(live):
                        # The watch brings the answers; a read now and then in case it broke.
                        with anyio.move_on_after(1.0) as idle:
                            await changed.wait()
                        if idle.cancelled_caught:
                            _rev, kvs = await self.client.range(ready, prefix=True)
                            self._kvs.update({kv.key: kv for kv in kvs})
        finally:
            with contextlib.suppress(EtcdUnavailable):
                await self.client.delete(self.key("prepare", ask))
                await self.client.delete(ready, prefix=True)
        refused = [
            f"{n}: {answers[n].get('why') or 'refused'}" if n in answers else f"{n}: no answer"
            for n in live
            if not answers.get(n, {}).get("ok")
        ]
        if refused:
            raise OperationRefused(
                f"the fleet refuses {target}: not every node is ready: " + "; ".join(refused)
            )

    async def _answer_prepares(self, kvs: list[Any]) -> None:
        """Phase one on this node: test each asked target, answer under our lease.

        A switcher with `test_target` (nginx: `test_command` against the new link, never
        reloaded) is asked; one without has nothing to test before the switch.
        """
        asked = self.key("prepare") + "/"
        guard = self.guard
        for kv in kvs:
            if not kv.key.startswith(asked) or guard is None:
                continue
            ask = kv.key[len(asked) :]
            if ask in self._answered or self.lease is None or self._clash is not None:
                continue  # (a name another process holds: it answers for the name)
            self._answered.add(ask)
            await self._answer(ask, (_json(kv.value, {}) or {}).get("target"))

    async def _answer(self, ask: str, target: object) -> None:
        """Test `target` here and put this node's answer to the prepare `ask`."""
        guard = self.guard
        assert guard is not None  # noqa: S101 - asked only with a guard
        answer: dict[str, Any] = {"ok": True, "why": None}
        test = getattr(guard.switcher, "test_target", None)
        if target not in COLORS:
            answer = {"ok": False, "why": f"unknown color {target!r}"}
        elif refused := guard.may_switch():
            # nginx's test swaps the link for a moment: a change of the target, which a
            # node that does not hold the target's lock must not make.
            answer = {"ok": False, "why": refused[:300]}
        elif test is not None:
            try:
                await test(target)
            except (GuarddError, OSError, TimeoutError) as e:
                answer = {"ok": False, "why": why(e)[:300]}
        await self.client.put(
            self.key("ready", ask, self.node), json.dumps(answer), lease=self.lease or 0
        )

    def is_mirror(self, local: qoslock.LockInfo) -> bool:
        """Whether the lock in this node's file is a copy of the fleet's lock (written by
        `_mirror_qos_down`), not one this node's guard took: a guard window after a
        rollback the node applied is its own, whoever decided the rollback (its `by` is
        then `fleet:<who>` too)."""
        guard = self.guard
        own = guard.own_lock if guard is not None else None
        return (local.by or "").startswith("fleet:") and (own is None or own.info != local)

    async def _mirror_qos_up(self) -> None:
        """The leader's own lock (its guard window after a rollback, the leader's decision
        or one it applied: an operator's fleet-wide rollback, a rollback decided by a
        leader that died before publishing it) is the fleet's: publish it when the lock
        file changed. An unlock is published only over a lock this node wrote, never over
        an operator's lock taken on another node."""
        guard = self.guard
        if guard is None or self._qos_bad is not None:
            return  # a value guardd did not write: its owner's (`_republish_qos`) or an operator's
        local = qoslock.read_lock(guard.s.lock_file)
        doc = local.to_json()
        if local.held and self.is_mirror(local):
            return  # a mirror of the fleet's lock is not news
        before, self._local_lock = self._local_lock, doc
        if doc == before or (before is None and not doc.get("locked")):
            return  # unchanged since the last look (or nothing held as we became leader)
        doc = self._as_fleets(doc)
        if _same_lock(doc, self.qos or {"locked": False}):
            return
        current = self._kvs.get(self.key("qos"))
        mod = current.mod_revision if current is not None else 0
        if not doc.get("locked") and mod not in (0, self._qos_mine):
            return
        held = _json(current.value, {}) if current is not None else {}
        if (
            doc.get("locked")
            and mod not in (0, self._qos_mine)
            and isinstance(held, dict)
            and held.get("locked")
            and until_wall(doc.get("until")) < until_wall(held.get("until"))
        ):
            # A lock never shortens another: an operator's freeze taken on another node (or
            # a window a former leader published) that outlasts this node's window stays
            # the fleet's lock, and this node's file keeps the window (a copy of the
            # fleet's lock follows it: `copy_to_keep`). Looked at again next round: an
            # extended window that outlasts it is published then.
            self._local_lock = before
            return
        if not doc.get("locked"):
            # Said by whom: every other node journals the release as `fleet:<by>`.
            doc = {
                **doc,
                "by": self.node,
                "reason": doc.get("reason") or f"{self.node}'s lock ended",
            }
        doc = _stamped(doc)
        ok, revision = await self.client.txn(
            [compare(self.key("qos"), "MOD", mod)], [put_op(self.key("qos"), doc)]
        )
        if ok:
            self._wrote_qos(doc, revision)

    def _failed_window(self, local: qoslock.LockInfo) -> bool:
        """Whether `local` is this node's own guard window, judged and not met (extended)."""
        own = self.guard.own_lock if self.guard is not None else None
        return self._own_window(local) and own is not None and own.failed

    def _own_window(self, local: qoslock.LockInfo) -> bool:
        """Whether `local` is this node's own guard window (the lock its guard took after a
        rollback it applied), not an operator's lock nor a copy of the fleet's."""
        own = self.guard.own_lock if self.guard is not None else None
        return own is not None and own.window is not None and own.info == local

    def _released_since_decided(self) -> bool:
        """Whether the fleet's lock was released after the fleet's last decision was
        written (by etcd's revisions: `qos` modified after `desired`): no lock is then to
        come for that decision from the leader, whose window passed or was unlocked."""
        qos, desired = self._kvs.get(self.key("qos")), self._kvs.get(self.key("desired"))
        return qos is not None and desired is not None and qos.mod_revision > desired.mod_revision

    async def _publish_own_window(self) -> None:
        """A follower's own guard window is the fleet's lock when the fleet holds none and
        either the window saw its SLOs fail (the leader's passed on its own probes) or the
        fleet's lock was released since the decision the window follows (the leader's
        window passed while this one ran, or an operator unlocked before this node could
        apply the rollback: a late node); the leader's own window is the fleet's lock
        otherwise. Once it is, this node publishes its extensions and its end, as the
        leader does its own. Written over `qos`'s mod_revision as read."""
        guard = self.guard
        if guard is None or self.is_leader or self._qos_bad is not None:
            return
        current = self._kvs.get(self.key("qos"))
        mod = current.mod_revision if current is not None else 0
        local = qoslock.read_lock(guard.s.lock_file)
        ours = mod != 0 and mod == self._qos_mine and self.qos == self._qos_wrote
        if ours and (self._qos_wrote or {}).get("locked"):
            if local.held and not self.is_mirror(local):
                doc = self._as_fleets(local.to_json())  # extended (or replaced here)
            else:
                doc = self._as_fleets(
                    qoslock.LockInfo(
                        held=False, reason=f"{self.node}'s lock ended", by=self.node
                    ).to_json()
                )
        elif (
            self._own_window(local)
            and not (self.qos or {}).get("locked")
            and (self._failed_window(local) or self._released_since_decided())
        ):
            doc = self._as_fleets(local.to_json())
        else:
            return
        if self._qos_wrote is not None and _same_lock(doc, self._qos_wrote):
            return
        doc = _stamped(doc)
        ok, revision = await self.client.txn(
            [compare(self.key("qos"), "MOD", mod)], [put_op(self.key("qos"), doc)]
        )
        if ok:
            self._wrote_qos(doc, revision)

    async def _expire_qos(self) -> None:
        """The leader ends the fleet's lock once its `until` has passed (an operator's
        `qos lock --for`, whichever node it was taken on).

        Judged on the lock the store holds (the `qos` key as read from it, never a copy kept
        from before, nor our own newer write it has not shown yet), and written over
        exactly that key's mod_revision.
        """
        current = self._kvs.get(self.key("qos"))
        if current is None or current.mod_revision < self._qos_mine or self._qos_bad is not None:
            return  # (a lock guardd did not write is not ended by guardd either)
        held = _json(current.value, {})
        guard = self.guard
        if held == self._qos_wrote and guard is not None and guard.own_lock is not None:
            return  # our own lock: our keeper ends or extends it, and we publish that
        if isinstance(held, dict) and held.get("locked") and _ended(held, self.expiry_grace):
            doc = self._release("expired")
            ok, revision = await self.client.txn(
                [compare(self.key("qos"), "MOD", current.mod_revision)],
                [put_op(self.key("qos"), doc)],
            )
            if ok:
                self._wrote_qos(doc, revision)

    async def _keep_qos_key(self) -> None:
        """The leader keeps the `qos` key in etcd, so that its absence means something: a
        gate reads a missing key as UNKNOWN (a mistyped prefix, a store that lost it).

        A fleet without one that this node never saw lose one (a new fleet) gets a release
        by this node: "no QoS lock taken in this fleet yet". After the store lost it
        (`_store_went_back`), the release this node knew last is written back once a lock's
        owner has had `lease_ttl` to publish its lock again (`_republish_qos`, which
        replaces a release); a lost lock no node publishes again stays UNKNOWN until an
        operator's `qos lock` or `qos unlock`. Written only where no key is (compare
        CREATE 0), never over another's.
        """
        if self.key("qos") in self._kvs or self.guard is None or self._leader_rev is None:
            return
        if self._went_back:
            before = self._release_before
            if before is None or time.monotonic() < self._qos_settle_until:
                return
            doc = dict(before)  # as written then: its `released_at` still says when
            said = (
                "fleet: the fleet's QoS lock, lost as etcd's store went back, written back "
                f"by {self.node} as it was last: released"
            )
        else:
            doc, said = self._release("no QoS lock taken in this fleet yet"), None
        ok, revision = await self.client.txn(
            [compare(self.key("qos"), "CREATE", 0)], [put_op(self.key("qos"), doc)]
        )
        self._release_before = None  # one try: the store's word counts after it
        if ok:
            self._wrote_qos(doc, revision)
            if said is not None:
                self.guard.record("alert", by=self.node, reason=said)

    def qos_missing(self) -> bool:
        """Whether etcd was read and holds no `qos` key, or one guardd did not write (the
        fleet's lock is then UNKNOWN: an operator's `qos unlock` writes a release)."""
        return (
            bool(self.reachable)
            and self._fresh_once
            and (self.key("qos") not in self._kvs or self._qos_bad is not None)
        )

    async def _republish_qos(self) -> None:
        """After the store went back (or a value guardd did not write replaced the lock):
        publish again the fleet's lock this node owned (held in its own lock file, not a
        mirror) when the store holds no lock.

        A store that holds a lock keeps it (the fleet stays locked either way); a lock whose
        owner does not publish it again is gone, as the store says (see `_mirror_qos_down`).
        """
        before, guard = self._qos_before, self.guard
        if before is None or guard is None:
            return
        info = qoslock.read_lock(guard.s.lock_file)
        local = info.to_json()
        current = self._kvs.get(self.key("qos"))
        held = _json(current.value, {}) if current is not None else {}
        if (
            not local.get("locked")
            or self.is_mirror(info)  # a copy: the lock of another node
            or local != {k: before.get(k) for k in local}  # not the fleet's lock, or not ours
            or (isinstance(held, dict) and held.get("locked"))  # the store holds a lock
        ):
            self._qos_before = None
            return
        ok, revision = await self.client.txn(
            [compare(self.key("qos"), "MOD", current.mod_revision if current else 0)],
            [put_op(self.key("qos"), self._as_fleets(local))],
        )
        self._qos_before = None  # one try: the store's word counts after it
        if ok:
            self._wrote_qos(self._as_fleets(local), revision)
            guard.record(
                "alert",
                by=self.node,
                reason="fleet: the fleet's QoS lock, lost from etcd (a store restored from a "
                "backup, or a hand replaced or deleted the key), published again by "
                f"{self.node}, which holds it"
                + (f" ({local['reason']})" if local.get("reason") else ""),
            )

    async def _restore_desired(self) -> None:
        """After the store went back, the leader rewrites `desired` when a live node applied
        a higher generation than the store's: the fleet's decision survives the restore.

        The decision is the one this node knew before (same generation), else the color the
        node with the highest generation serves. Nodes at that generation do nothing; one
        below it converges to it. Fenced by the leader key, over desired's mod_revision.
        Also with no `desired` at all while nodes applied a generation (the store lost it
        while every node was down: no node saw it go), so the numbering and the color stay.
        """
        guard = self.guard
        if guard is None or self._leader_rev is None:
            return
        if not self._went_back and self.desired is not None:
            return
        have = _int((self.desired or {}).get("generation"))
        best, color, source = self.applied, guard.active, self.node
        for name, doc in sorted(self.nodes.items()):
            if _int(doc.get("generation")) > best and doc.get("serving") in COLORS:
                best, color, source = _int(doc.get("generation")), doc.get("serving"), name
        if best <= have or color not in COLORS:
            return
        before = self._desired_before or {}
        if _int(before.get("generation")) == best and before.get("color") in COLORS:
            doc = dict(before)
        else:
            doc = {
                "color": color,
                "generation": best,
                "kind": "switch",
                "by": source,
                "reason": f"the fleet's generation {best}, as {source} applied it",
                "severity": None,
                "at": time.time(),
            }
        ok, _ = await self.client.txn(
            [
                compare(self.key("desired"), "MOD", self._desired_mod),
                compare(self.key("leader"), "CREATE", self._leader_rev),
            ],
            [put_op(self.key("desired"), doc)],
        )
        if not ok:
            return
        self.desired, self._desired_mod = doc, 0
        guard.record(
            "alert",
            by=self.node,
            generation=best,
            reason=f"fleet: etcd's desired generation {have} is below generation {best} "
            f"that {source} applied: desired written again as generation {best} "
            f"({doc['color']}), the fleet's decision before etcd's store went back",
        )

    async def _restore_rollbacks(self) -> None:
        """After the store went back, the leader writes back the fleet's rollbacks the store
        lost (as this node knew them before), so that its budget is not refilled by a
        restore. Fenced by the leader key, over the `rollbacks` key's mod_revision."""
        guard = self.guard
        if not self._rollbacks_before or guard is None or self._leader_rev is None:
            return
        lost = set(self._rollbacks_before) - set(self.rollbacks)
        if not lost:
            return
        merged = sorted({*self.rollbacks, *self._rollbacks_before})[-100:]
        if not await self._leader_put("rollbacks", merged):
            return
        self.rollbacks, self._rollbacks_before = merged, []
        guard.record(
            "alert",
            by=self.node,
            reason=f"fleet: {len(lost)} rollback(s) of the fleet's budget that etcd's store "
            "lacks written back, as this node knew them before the store went back or before "
            "it restarted (fleet.json)",
        )

    async def _leader_put(self, name: str, value: object) -> bool:
        """Write `P/<name>` as the leader: over the key's mod_revision as last read (0:
        absent), fenced by the leader key's create_revision. Whether etcd took it."""
        key, term = self.key(name), self._leader_rev
        if term is None:
            return False  # not the leader (any more)
        current = self._kvs.get(key)
        ok, _ = await self.client.txn(
            [
                compare(key, "MOD", current.mod_revision if current is not None else 0),
                compare(self.key("leader"), "CREATE", term),
            ],
            [put_op(key, value)],
        )
        return ok

    async def _restore_rearmed(self) -> None:
        """After the store went back, the leader writes back the fleet's last `resume`
        (`rearmed`) when the store lost it or holds an older one: the budget counts only
        rollbacks after it, and a lost resume would count old ones again (a hold where a
        rollback was due). Fenced by the leader key, over the key's mod_revision."""
        before, guard = self._rearmed_before, self.guard
        if before is None or guard is None or self._leader_rev is None:
            return
        if self.rearmed is not None and self.rearmed_at >= _at(before):
            self._rearmed_before = None
            return
        if not await self._leader_put("rearmed", before):
            return
        self.rearmed, self._rearmed_before = before, None
        guard.record(
            "alert",
            by=self.node,
            reason="fleet: the fleet's last resume (rearmed), lost as etcd's store went back, "
            f"written back by {self.node}: the rollback budget counts from it still",
        )

    async def _adopt_qos(self) -> None:
        """The fleet's lock released by another node: release ours too (own or mirrored),
        journaled as `qos_released` by `fleet:<who>`."""
        current = self._kvs.get(self.key("qos"))
        mod = current.mod_revision if current is not None else 0
        if mod < self._qos_mine:
            return  # a view older than our own write: nothing new from another node
        previous, self._qos_mod = self._qos_mod, mod
        guard = self.guard
        # Only a new release acts: a lock this node took after the fleet's last release
        # (a rollback's guard window) is not released by that old release. At the first
        # read (`previous` None), only this node's own window, taken before a release
        # written while the node was away (restarted mid-window): the fleet judged its
        # rollback meanwhile, and a window kept from before would lock it again.
        first = previous is None
        if mod == self._qos_mine or (not first and mod == previous):
            return
        if guard is None or self.qos is None:
            return
        local = qoslock.read_lock(guard.s.lock_file)
        if self.qos.get("locked") or not local.held:
            return
        if first:
            stamped = isinstance(self.qos.get("released_at"), str)
            if not self._own_window(local) or not stamped or _released_before(self.qos, local):
                return
        elif self._own_window(local):
            by = self.qos.get("by")
            if by in self.nodes or by in self.seen:
                # A node's automatic release (its window passed, a lock expired) is not this
                # node's verdict on its own rollback: its window stays and becomes the
                # fleet's lock (`_publish_own_window`). An operator's unlock ends it.
                return
            if _released_before(self.qos, local):
                # Written before this window was taken (read late: the node was cut off, or
                # the watch brought it late): that release was not about this lock.
                return
        async with guard.lock:
            on = self.qos.get("node")
            guard.release_lock(
                by=_fleet_by(self.qos.get("by")),
                reason="the fleet's QoS lock was released"
                + (f" on {on}" if isinstance(on, str) and on != self.qos.get("by") else "")
                + (f" ({self.qos['reason']})" if self.qos.get("reason") else ""),
            )
            guard.save_state()
        self._local_lock = qoslock.read_lock(guard.s.lock_file).to_json()

    async def _mirror_qos_down(self) -> None:
        """Keep the fleet's lock in the local lock file, so a CI gate on this host sees it.

        A lock of this node's own stays, unless it was the fleet's lock (published by this
        node) and another node has since replaced it: then the file mirrors the fleet's
        current lock (and the old lock's end is no longer this node's to journal). After
        the store went back, a mirror of a lock the store lacks stays for `lease_ttl` (its
        owner publishes it again), then follows the store.
        """
        guard = self.guard
        if guard is None:
            return
        if self.qos is None and not (
            self._went_back and time.monotonic() >= self._qos_settle_until
        ):
            return
        qos = self.qos or {"locked": False}
        local = qoslock.read_lock(guard.s.lock_file)
        mirrored = self.is_mirror(local)
        on = {"fleet_node": qos["node"]} if isinstance(qos.get("node"), str) else {}
        if qos.get("locked") and qos == self._qos_wrote:
            # Ours: this node's keeper keeps its file (an operator's lock is written to etcd
            # first, then taken here); ended here, the leader's release of it follows. Never
            # a copy of it.
            return
        if qos.get("locked") and not _ended(qos, self.expiry_grace):
            info = self._copy_of(qos)
            # Any change of the fleet's lock (a lock replaced: its reason, until, owner)
            # reaches the copy; a lock of this node's own is left as it is, unless it was
            # the fleet's and another node replaced it, or it is this node's hold's (which
            # only stands for "locked" while the guard holds: the fleet's lock says it too,
            # and the hold takes its lock again when the fleet's ends).
            own = guard.own_lock
            held_for_hold = own is not None and own.hold and own.info == local
            if local == info or (
                local.held and not mirrored and not held_for_hold and not self._replaced(local)
            ):
                return
            try:
                qoslock.write_lock(guard.s.lock_file, info)
            except (OSError, StorageError, UnsafePath) as e:
                guard.storage_failed("lock", f"cannot write {guard.s.lock_file}: {why(e)}")
                return  # the next round tries again
            guard.storage_ok("lock")
            # This host's gate changed: its journal says so, as for a lock taken here.
            extended = mirrored and (local.reason, local.by) == (info.reason, info.by)
            guard.record(
                "qos_extended" if extended else "qos_locked",
                reason=f"the fleet's QoS lock: {info.reason}",
                by=info.by,
                until=info.until,
                **on,
            )
        elif local.held and mirrored and time.monotonic() >= self._qos_settle_until:
            try:
                removed = qoslock.remove_lock(guard.s.lock_file)
            except (OSError, UnsafePath) as e:
                guard.storage_failed("lock", f"cannot remove {guard.s.lock_file}: {why(e)}")
                return
            guard.storage_ok("lock")
            if not removed:
                return
            if not self.qos:
                why_gone = "the fleet's QoS lock is gone from etcd's store"
            elif qos.get("locked"):
                why_gone = f"the fleet's QoS lock ended (until {qos.get('until')})"
            else:
                why_gone = "the fleet's QoS lock was released" + (
                    f" ({qos['reason']})" if qos.get("reason") else ""
                )
            guard.record(
                "qos_released",
                reason=why_gone,
                by=_fleet_by(qos.get("by") or self.leader),
                **on,
            )

    def _copy_of(self, qos: dict[str, Any]) -> qoslock.LockInfo:
        """The fleet's lock `qos` as this node's lock file holds a copy of it."""
        until, at = qos.get("until"), qos.get("locked_at")
        by, node = str(qos.get("by") or self.leader), qos.get("node")
        if by == GUARDD and isinstance(node, str):
            by = node  # a guard window: the node whose guard took it
        return qoslock.LockInfo(
            held=True,
            reason=str(qos.get("reason") or "the fleet's QoS lock"),
            locked_at=at if isinstance(at, str) else None,
            until=until if isinstance(until, str) else None,
            by=_fleet_by(by),
        )

    def copy_to_keep(self) -> qoslock.LockInfo | None:
        """The copy of the fleet's lock to put in the lock file when this node's own lock
        ends (see `Guard.lock_to_keep`): while the fleet's lock, as last read, is held, has
        not ended and is not the one this node wrote. None otherwise (etcd unreachable: the
        next rounds decide)."""
        qos = self.qos
        if not self.reachable or not qos or not qos.get("locked") or _ended(qos, self.expiry_grace):
            return None
        if self._qos_wrote is not None and qos == self._qos_wrote:
            return None  # ours: its end is the fleet's, published in the next round
        return self._copy_of(qos)

    def _replaced(self, local: qoslock.LockInfo) -> bool:
        """Whether `local` (this node's own lock) is the lock this node last wrote as the
        fleet's, and a later write by another node replaced it in the store."""
        current = self._kvs.get(self.key("qos"))
        return (
            self._qos_wrote is not None
            and self._as_fleets(local.to_json()) == self._qos_wrote
            and current is not None
            and current.mod_revision > self._qos_mine
        )

    def _watch_divergence(self) -> None:
        now = time.monotonic()
        want = (self.desired or {}).get("color")
        for name, doc in self.nodes.items():
            if want in COLORS and doc.get("serving") != want:
                self._diverged.setdefault(name, now)
            else:
                self._diverged.pop(name, None)
        for name in list(self._diverged):
            if name not in self.nodes:
                del self._diverged[name]
        # A node with a last record but no live one: its lease expired (it is frozen, cut
        # off or gone). Listed as lost, and an alert after switch.timeout, until it is back.
        lost = set(self.lost_nodes())
        for name in lost:
            self._lost.setdefault(name, now)
        for name in set(self._lost) - lost:
            del self._lost[name]
        guard = self.guard
        # An alert that ends is journaled too: the operator reads when the episode ended.
        for name in sorted(self._alerted - set(self._diverged) - set(self._lost)):
            self._alerted.discard(name)
            if guard is not None:
                back = (
                    f"serves the desired {want} again"
                    if name in self.nodes
                    else "is no longer in the fleet (its last record was removed)"
                )
                guard.record("alert", reason=f"fleet: node {name} {back}", node=name)
        for name in self.diverged():
            if name not in self._alerted and guard is not None:
                self._alerted.add(name)
                guard.record("alert", reason=self._alert_text(name), node=name)

    async def _converge(self) -> None:
        """Apply a newer desired generation through the guard's own switcher."""
        guard, d = self.guard, self.desired
        if guard is None or d is None or self.reachable is False:
            return
        generation, color = _int(d.get("generation")), d.get("color")
        if generation <= self.applied or color not in COLORS:
            return
        failed = self._failed.get(generation)
        if failed is not None:
            wait = min(
                self.switch_timeout * 2 ** (failed[1] - 1), max(RETRY_MAX_S, self.switch_timeout)
            )
            if time.monotonic() - failed[0] < wait:
                return
        revert: Color | None = None
        async with guard.lock:
            if (
                generation <= self.applied
                or _int((self.desired or {}).get("generation")) != generation
            ):
                # Decided again while the lock was waited for (an operator's move, undone
                # and written back meanwhile): that generation is not the fleet's any more.
                return
            if guard.active == color:
                self.applied_generation(generation)
                return
            kind = str(d.get("kind") or "switch")
            with contextlib.suppress(OperationRefused):  # journaled as an alert already
                await guard.move_traffic(
                    color,
                    kind=kind if kind in ("rollback", "switch", "promote") else "switch",
                    by=_fleet_by(d.get("by")),
                    reason=str(d.get("reason") or f"the fleet's generation {generation}"),
                    severity=_severity(d.get("severity")),
                    generation=generation,
                    fleet_node=d["node"] if isinstance(d.get("node"), str) else None,
                )
            if guard.active == color:
                self.applied_generation(generation)
                if kind == "rollback":
                    # The fleet's rollback is this node's last decision too: its status says
                    # so, not the last one its own machine took before it.
                    guard.last_decision = {
                        "ts": rfc3339(time.time()),
                        "action": "rollback",
                        "severity": _severity(d.get("severity")),
                        "reason": f"the fleet's rollback, generation {generation}, decided on "
                        f"{d.get('node') or 'another node'}: {d.get('reason') or color}",
                        "evidence": None,
                        "not_taken": None,
                    }
            else:
                tries = self._failed.get(generation, (0.0, 0))[1] + 1
                self._failed[generation] = (time.monotonic(), tries)
                back = guard.active
                failing = guard.machine.healthy(color, guard.clock.monotonic()) is False
                if self.is_leader and back is not None and failing:
                    revert = back
        if revert is not None:
            # A decision no node should try again: its color fails here too (a hand's edit
            # of `desired`, a move asked with --force). Each try would put users on it; the
            # leader puts the fleet back on what it serves (outside the guard's lock: etcd).
            with contextlib.suppress(OperationRefused, EtcdUnavailable):
                undone = await self.undo(
                    generation,
                    revert,
                    self.node,
                    f"the fleet's desired {color} (generation {generation}) did not apply on "
                    f"{self.node}, and {color} fails its probes here",
                )
                if undone is not None:
                    self.applied_generation(undone)
                    guard.record(
                        "alert",
                        by=self.node,
                        generation=undone,
                        reason=f"fleet: the desired color {color} (generation {generation}) "
                        f"did not apply here and fails its probes: written back to {revert} "
                        f"as generation {undone}",
                    )
        with contextlib.suppress(EtcdUnavailable):
            await self._publish_self()

    def _load_store(self) -> tuple[int, list[float]]:
        """`fleet.json` as `_save_store` writes it: (applied generation, rollbacks); what
        cannot be read is 0 and none, as for a node that never ran."""
        try:
            doc = untrusted_json.loads(self._store.read_text())
        except (OSError, ValueError):
            return 0, []
        if not isinstance(doc, dict):
            return 0, []
        applied = doc.get("applied", 0)
        times = doc.get("rollbacks", [])
        ok = isinstance(times, list) and all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
            for t in times
        )
        return (
            applied if isinstance(applied, int) and not isinstance(applied, bool) else 0,
            sorted(float(t) for t in times)[-100:] if ok else [],
        )


def _fleet_by(by: object) -> str:
    """`by` as another node journals it: `fleet:<by>` (once: a window a node took after
    the fleet's rollback is `fleet:<who>` already)."""
    text = str(by) if by else "unknown"
    return text if text.startswith("fleet:") else f"fleet:{text}"


def _stamped(doc: dict[str, Any]) -> dict[str, Any]:
    """A release (`"locked": false`) with `released_at`, the wall time it is written (RFC
    3339): a node that reads it late tells a release of its lock from an older one."""
    return doc if doc.get("locked") else {**doc, "released_at": rfc3339(time.time())}


def _same_lock(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two `qos` documents say the same, whenever a release was written."""
    return {k: v for k, v in a.items() if k != "released_at"} == {
        k: v for k, v in b.items() if k != "released_at"
    }


def _released_before(release: dict[str, Any], local: qoslock.LockInfo) -> bool:
    """Whether the fleet's `release` was written before `local` (a lock taken on this node)
    was taken, by the wall clocks of the two nodes. Unknown (no time on either) is False:
    the release acts, as before releases carried a time."""
    at, taken = release.get("released_at"), local.locked_at
    if not isinstance(at, str) or taken is None:
        return False
    try:
        return parse_rfc3339(at) < parse_rfc3339(taken)
    except ValueError:
        return False


def _ended(lock: dict[str, Any], grace: float = 0.0) -> bool:
    """Whether a lock's `until` has passed by more than `grace` seconds: the leader ends it
    soon; no node copies it meanwhile (the node whose lock it was has journaled its end
    already)."""
    until = lock.get("until")
    try:
        return isinstance(until, str) and parse_rfc3339(until) + grace < time.time()
    except ValueError:
        return False


def _json(text: str, default: Any = None) -> Any:
    try:
        return untrusted_json.loads(text)
    except ValueError:
        return default


def _went_back_why(revision: int, old: int, *, moved: bool, lost: tuple[str, int] | None) -> str:
    """The `alert`'s words for a store that went back, strongest proof first.

    A lower revision or another cluster_id is a restore (or a new cluster), whatever key
    the read also misses: which key a node finds missing first depends only on what it
    had written, so it must not change the words (a deletion by hand never moves the
    revision back). Only with the revision gone on is a lost key the proof: one guardd
    never deletes (`lost[1] == 0`), or this node's own write, at the revision etcd gave it.
    """
    if moved or revision < old or lost is None:
        new_cluster = " (its cluster_id changed: a new cluster)" if moved else ""
        return (
            f"fleet: etcd's store went back from revision {old} to {revision}: restored from "
            f"a backup?{new_cluster}"
        )
    if lost[1] == 0:
        return (
            f"fleet: {lost[0]} is gone from etcd at revision {revision}, and guardd never "
            "deletes it: a store restored from a backup, or deleted by hand?"
        )
    return (
        f"fleet: etcd's store went back: it lost {lost[0]}, written at revision {lost[1]} "
        f"(it is at revision {revision} now): restored from a backup?"
    )


def _at(doc: dict[str, Any] | None) -> float:
    """A `rearmed` document's wall time (0 when there is none or it has none)."""
    at = (doc or {}).get("at")
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else 0.0


def _int(value: object) -> int:
    """A generation as a record gives it; 0 when it is none (never raises)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return 0


def _under(kvs: list[Any], prefix: str) -> dict[str, dict[str, Any]]:
    """The JSON objects of the keys under `prefix`, by the rest of their key."""
    return {
        kv.key[len(prefix) :]: doc
        for kv in kvs
        if kv.key.startswith(prefix) and isinstance(doc := _json(kv.value), dict)
    }


def _severity(value: object) -> Severity | None:
    """The decision's severity as the leader wrote it; None when it wrote none it knows."""
    return value if value in ("P0", "P1", "P2") else None
