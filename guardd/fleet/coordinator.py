"""One decision for a fleet of guardd nodes, coordinated through etcd.

Keys under the fleet's prefix P (values are JSON)::

    P/leader          the leader's node name, under the leader's lease
    P/desired         {"color", "generation", "kind", "by", "reason", "at"}: what every node serves
    P/rollbacks       [wall time, ...]: the fleet's rollbacks (its rollback budget)
    P/qos             the fleet's QoS lock, as `guardctl qos status --json` shows it
    P/nodes/<node>    {"serving", "generation", "wants_rollback", "at"}, under the node's lease

A node becomes leader by creating P/leader when it is absent (a txn comparing its
create_revision with 0). The leader writes P/desired only in a txn that also compares
P/leader's create_revision with the one it created: a deposed leader's write fails (the
fencing token), and comparing P/desired's mod_revision makes each generation follow
exactly one other. Every node polls the prefix (a bounded range read every
`POLL_S`), applies a newer generation through the guard's own switcher, and publishes
what it serves under its own lease. The guard asks `decide_rollback` before it rolls
back on its own.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from guardd import qoslock
from guardd.config import FleetConfig
from guardd.core.types import COLORS, Color
from guardd.exceptions import GuarddError, OperationRefused, why
from guardd.fleet._etcd import EtcdClient, EtcdUnavailable, compare, put_op

if TYPE_CHECKING:
    from guardd.guard import Guard

__all__ = ["POLL_S", "Fleet"]

#: How often a node reads the fleet's keys (s).
POLL_S = 0.1


class Fleet:
    """This node's side of the fleet: election, the desired color, its own record."""

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
        self._renewed = 0.0
        self.leader: str | None = None
        self._leader_rev: int | None = None  # P/leader's create_revision, while we hold it
        self.desired: dict[str, Any] | None = None
        self._desired_mod = 0
        self.nodes: dict[str, dict[str, Any]] = {}
        self.rollbacks: list[float] = []
        self.qos: dict[str, Any] | None = None
        self.reachable: bool | None = None  # None: not asked yet
        self.problem: str | None = None
        self.unreachable_since: float | None = None
        self._wants_at: float | None = None
        self._diverged: dict[str, float] = {}
        self._alerted: set[str] = set()
        self._failed: dict[int, float] = {}
        self._answered: set[str] = set()
        self._store = state_dir / "fleet.json"
        self.applied = self._load_applied()

    # ---- what the guard asks ------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this node held the leader key at the last read."""
        return self._leader_rev is not None and self.leader == self.node

    def key(self, *parts: str) -> str:
        """The fleet key `P/<parts>`."""
        return "/".join([self.prefix, *parts])

    async def decide_rollback(self, target: Color, reason: str = "") -> int | None:
        """May this node roll back to `target` now? The generation to apply it as, else None.

        Only the leader writes a rollback, fenced by its leader key; a follower's wish is
        published for `quorum = "majority"`. With etcd unreachable: 0 (decide alone) when
        `local_fallback`, else None. Never raises.
        """
        self._wants_at = time.monotonic()
        if not self.reachable:
            return 0 if self.c.local_fallback else None
        if not self.is_leader:
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
                return None
        try:
            return await self._write_desired(
                target, "rollback", self.node, reason or f"roll back to {target}", fenced=True
            )
        except EtcdUnavailable:
            return 0 if self.c.local_fallback else None

    async def propose(self, target: Color, kind: str, by: str, reason: str) -> int:
        """An operator's rollback, switch or promote for the whole fleet; its generation.

        A switch or promote is two-phase: every live node tests `target` first (see
        `prepare`). Raises `OperationRefused` naming the nodes that refused or did not
        answer, or when etcd cannot be reached.
        """
        if not self.reachable:
            raise OperationRefused(f"etcd is unreachable ({self.problem}); the fleet cannot {kind}")
        try:
            if kind != "rollback":
                await self._prepare(target)
            generation = await self._write_desired(target, kind, by, reason, fenced=False)
        except EtcdUnavailable as e:
            raise OperationRefused(f"etcd is unreachable ({e}); the fleet cannot {kind}") from None
        if generation is None:
            raise OperationRefused(f"the fleet's desired color changed meanwhile; {kind} again")
        return generation

    def applied_generation(self, generation: int) -> None:
        """Remember that this node serves `generation`'s color (kept across restarts)."""
        if generation > self.applied:
            self.applied = generation
            with contextlib.suppress(OSError):
                self._store.write_text(json.dumps({"applied": generation}))

    def warnings(self) -> list[str]:
        """What `status` shows as WARNING for the fleet."""
        found = []
        if self.reachable is False:
            what = "decides alone" if self.c.local_fallback else "makes no automatic switch"
            found.append(
                f"fleet: etcd is unreachable ({self.problem}); this node keeps serving "
                f"what it last applied and {what}"
            )
        found += [
            f"fleet: node {n} serves {self.nodes.get(n, {}).get('serving')}, not the desired "
            f"{(self.desired or {}).get('color')}, for longer than switch.timeout"
            for n in self.diverged()
        ]
        return found

    def status_word(self) -> str | None:
        """The STATUS= word: `fleet=etcd-unreachable`, `fleet=diverged`, or None."""
        if self.reachable is False:
            return "fleet=etcd-unreachable"
        if self.diverged():
            return "fleet=diverged"
        return None

    def diverged(self) -> list[str]:
        """Nodes serving something other than the desired color longer than switch.timeout."""
        now = time.monotonic()
        return sorted(n for n, t in self._diverged.items() if now - t > self.switch_timeout)

    def status_doc(self) -> dict[str, Any]:
        """`guardctl fleet status --json`: the nodes, the leader, the desired color."""
        now = time.time()
        return {
            "node": self.node,
            "prefix": self.prefix,
            "etcd_reachable": self.reachable,
            "problem": self.problem,
            "leader": self.leader,
            "desired": self.desired,
            "rollbacks": len(self.rollbacks),
            "nodes": [
                {
                    "node": name,
                    "serving": doc.get("serving"),
                    "generation": doc.get("generation"),
                    "lease_age_s": round(max(0.0, now - float(doc.get("at", now))), 3),
                    "leader": name == self.leader,
                    "alert": name in self.diverged(),
                }
                for name, doc in sorted(self.nodes.items())
            ],
            "alerts": self.diverged(),
        }

    def qos_doc(self) -> dict[str, Any] | None:
        """The fleet's QoS lock as last read (None: unknown, etcd unreachable)."""
        if not self.reachable:
            return None
        if self.qos is None:
            return qoslock.LockInfo(held=False).to_json() | {"source": "fleet"}
        return dict(self.qos) | {"source": "fleet"}

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Read the fleet, keep the lease, elect, converge; until cancelled."""
        try:
            while True:
                try:
                    await self._round()
                except EtcdUnavailable as e:
                    self._unreachable(str(e))
                except (ValueError, KeyError, TypeError) as e:
                    # An answer not shaped as etcd's: as good as no answer (fail closed).
                    self._unreachable(f"unexpected answer from etcd: {type(e).__name__}: {e}")
                await self._converge()
                await anyio.sleep(POLL_S)
        finally:
            with anyio.CancelScope(shield=True):
                await self.client.aclose()

    def _unreachable(self, problem: str) -> None:
        guard = self.guard
        if self.reachable is not False and guard is not None:
            guard.record("alert", reason=f"fleet: etcd is unreachable: {problem}", by=self.node)
        if self.reachable is not False:
            self.unreachable_since = time.monotonic()
        self.reachable, self.problem = False, problem
        self._leader_rev = None
        self._diverged.clear()

    async def _round(self) -> None:
        now = time.monotonic()
        if self.lease is None:
            self.lease, self._renewed = await self.client.grant(self.c.lease_ttl), now
        elif now - self._renewed > self.c.lease_ttl / 3:
            if await self.client.keepalive(self.lease) <= 0:
                # The lease expired (etcd was away too long): so did leadership.
                self.lease, self._leader_rev = await self.client.grant(self.c.lease_ttl), None
            self._renewed = now
        await self._publish_self()
        _rev, kvs = await self.client.range(self.prefix + "/", prefix=True)
        self._read(kvs)
        await self._answer_prepares(kvs)
        if self.reachable is False and self.guard is not None:
            self.guard.record("alert", reason="fleet: etcd is reachable again", by=self.node)
        self.reachable, self.problem, self.unreachable_since = True, None, None
        if self.leader is None:
            await self._campaign()
        elif self.is_leader:
            await self._mirror_qos_up()
        await self._mirror_qos_down()
        self._watch_divergence()

    def _read(self, kvs: list[Any]) -> None:
        by_key = {kv.key: kv for kv in kvs}
        leader = by_key.get(self.key("leader"))
        self.leader = leader.value if leader is not None else None
        if leader is None or leader.value != self.node or leader.lease != self.lease:
            self._leader_rev = None
        elif self._leader_rev is None:
            self._leader_rev = leader.create_revision  # ours, e.g. written before a restart
        desired = by_key.get(self.key("desired"))
        self.desired = _json(desired.value) if desired is not None else None
        self._desired_mod = desired.mod_revision if desired is not None else 0
        rollbacks = by_key.get(self.key("rollbacks"))
        got = _json(rollbacks.value, []) if rollbacks is not None else []
        self.rollbacks = [float(t) for t in got] if isinstance(got, list) else []
        qos = by_key.get(self.key("qos"))
        self.qos = _json(qos.value) if qos is not None else None
        nodes_at = self.key("nodes") + "/"
        self.nodes = {
            kv.key[len(nodes_at) :]: doc
            for kv in kvs
            if kv.key.startswith(nodes_at) and isinstance(doc := _json(kv.value), dict)
        }

    async def _publish_self(self) -> None:
        guard = self.guard
        wants = self._wants_at is not None and time.monotonic() - self._wants_at < self.c.lease_ttl
        doc = {
            "serving": guard.active if guard is not None else None,
            "generation": self.applied,
            "wants_rollback": wants,
            "at": time.time(),
        }
        await self.client.put(self.key("nodes", self.node), json.dumps(doc), lease=self.lease or 0)

    async def _campaign(self) -> None:
        ok, revision = await self.client.txn(
            [compare(self.key("leader"), "CREATE", 0)],
            [put_op(self.key("leader"), self.node, lease=self.lease or 0)],
        )
        if ok:
            self.leader, self._leader_rev = self.node, revision
            if self.guard is not None:
                self.guard.log.info("fleet_leader", node=self.node, prefix=self.prefix)

    async def _write_desired(
        self, target: Color, kind: str, by: str, reason: str, *, fenced: bool
    ) -> int | None:
        generation = int((self.desired or {}).get("generation", 0)) + 1
        doc = {
            "color": target,
            "generation": generation,
            "kind": kind,
            "by": by,
            "reason": reason,
            "at": time.time(),
        }
        checks = [compare(self.key("desired"), "MOD", self._desired_mod)]
        if fenced:
            if self._leader_rev is None:
                return None
            checks.append(compare(self.key("leader"), "CREATE", self._leader_rev))
        ops = [put_op(self.key("desired"), doc)]
        if kind == "rollback":
            ops.append(put_op(self.key("rollbacks"), [*self.rollbacks[-99:], time.time()]))
        ok, _ = await self.client.txn(checks, ops)
        if not ok:
            if not fenced:
                raise OperationRefused("the fleet's desired color changed meanwhile; try again")
            return None
        self.desired, self._desired_mod = doc, 0
        return generation

    async def _prepare(self, target: Color) -> None:
        """Phase one of a switch or promote: every live node tests `target`."""
        ask = f"{time.time_ns()}-{self.node}"
        live = sorted(self.nodes)
        await self.client.put(
            self.key("prepare", ask), json.dumps({"target": target}), lease=self.lease or 0
        )
        answers: dict[str, dict[str, Any]] = {}
        try:
            with anyio.move_on_after(2 * self.switch_timeout):
                while set(answers) < set(live):
                    _rev, kvs = await self.client.range(self.key("ready", ask) + "/", prefix=True)
                    answers = {kv.key.rsplit("/", 1)[1]: _json(kv.value, {}) for kv in kvs}
                    await anyio.sleep(POLL_S)
        finally:
            with contextlib.suppress(EtcdUnavailable):
                await self.client.delete(self.key("prepare", ask))
                await self.client.delete(self.key("ready", ask) + "/", prefix=True)
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
            if ask in self._answered:
                continue
            self._answered.add(ask)
            target = (_json(kv.value, {}) or {}).get("target")
            answer: dict[str, Any] = {"ok": True, "why": None}
            test = getattr(guard.switcher, "test_target", None)
            if target not in COLORS:
                answer = {"ok": False, "why": f"unknown color {target!r}"}
            elif test is not None:
                try:
                    await test(target)
                except (GuarddError, OSError, TimeoutError) as e:
                    answer = {"ok": False, "why": why(e)[:300]}
            await self.client.put(
                self.key("ready", ask, self.node), json.dumps(answer), lease=self.lease or 0
            )

    async def _mirror_qos_up(self) -> None:
        """The leader's lock file is the fleet's lock: publish it when it changed."""
        guard = self.guard
        if guard is None:
            return
        doc = qoslock.read_lock(guard.s.lock_file).to_json()
        if doc.get("locked") and str(doc.get("by", "")).startswith("fleet:"):
            return  # a mirror of the fleet's lock is not news
        if (self.qos or {"locked": False}) != doc:
            await self.client.put(self.key("qos"), json.dumps(doc))
            self.qos = doc

    async def _mirror_qos_down(self) -> None:
        """Keep the fleet's lock in the local lock file, so a CI gate on this host sees it."""
        guard = self.guard
        if guard is None or self.qos is None:
            return
        local = qoslock.read_lock(guard.s.lock_file)
        if self.qos.get("locked") and not local.held:
            until, at = self.qos.get("until"), self.qos.get("locked_at")
            info = qoslock.LockInfo(
                held=True,
                reason=str(self.qos.get("reason") or "the fleet's QoS lock"),
                locked_at=at if isinstance(at, str) else None,
                until=until if isinstance(until, str) else None,
                by=f"fleet:{self.qos.get('by') or self.leader}",
            )
            with contextlib.suppress(OSError):
                qoslock.write_lock(guard.s.lock_file, info)
        elif not self.qos.get("locked") and local.held and (local.by or "").startswith("fleet:"):
            with contextlib.suppress(OSError):
                qoslock.remove_lock(guard.s.lock_file)

    def _watch_divergence(self) -> None:
        now = time.monotonic()
        want = (self.desired or {}).get("color")
        for name, doc in self.nodes.items():
            if want in COLORS and doc.get("serving") != want:
                self._diverged.setdefault(name, now)
            else:
                self._diverged.pop(name, None)
                self._alerted.discard(name)
        for name in list(self._diverged):
            if name not in self.nodes:
                del self._diverged[name]
        guard = self.guard
        for name in self.diverged():
            if name not in self._alerted and guard is not None:
                self._alerted.add(name)
                guard.record(
                    "alert",
                    reason=f"fleet: node {name} serves {self.nodes[name].get('serving')}, not "
                    f"the desired {want}, for longer than switch.timeout",
                    node=name,
                )

    async def _converge(self) -> None:
        """Apply a newer desired generation through the guard's own switcher."""
        guard, d = self.guard, self.desired
        if guard is None or d is None or self.reachable is False:
            return
        generation, color = int(d.get("generation", 0)), d.get("color")
        if generation <= self.applied or color not in COLORS:
            return
        failed_at = self._failed.get(generation)
        if failed_at is not None and time.monotonic() - failed_at < self.switch_timeout:
            return
        async with guard.lock:
            if guard.active == color:
                self.applied_generation(generation)
                return
            kind = str(d.get("kind") or "switch")
            with contextlib.suppress(OperationRefused):  # journaled as an alert already
                await guard.move_traffic(
                    color,
                    kind=kind if kind in ("rollback", "switch", "promote") else "switch",
                    by=f"fleet:{d.get('by')}",
                    reason=str(d.get("reason") or f"the fleet's generation {generation}"),
                    generation=generation,
                )
            if guard.active == color:
                self.applied_generation(generation)
            else:
                self._failed[generation] = time.monotonic()
        with contextlib.suppress(EtcdUnavailable):
            await self._publish_self()

    def _load_applied(self) -> int:
        try:
            doc = json.loads(self._store.read_text())
        except (OSError, ValueError):
            return 0
        return int(doc.get("applied", 0)) if isinstance(doc, dict) else 0


def _json(text: str, default: Any = None) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default
