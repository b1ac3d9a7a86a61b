"""Three guardd nodes, each with a private nginx in front of the same blue and green
upstreams, coordinated through a real 3-member etcd cluster (for tests and the bench)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness.daemon import Daemon, Lab, guardctl, wait_until
from tests.harness.etcd import EtcdCluster, TcpProxy
from tests.harness.upstream import Upstream

PREFIX = "/guardd/lab"


class FleetLab:
    """Three labs (nginx + guardd) sharing one blue and one green, and an etcd cluster."""

    def __init__(self, tmp: Path, *, nodes: int = 3, **overrides: Any) -> None:
        self.tmp = tmp
        self.etcd = EtcdCluster(tmp / "etcd").start()
        self.blue = Upstream("blue").start()
        self.green = Upstream("green").start()
        self.proxies: dict[int, TcpProxy] = {}
        self.labs: list[Lab] = []
        self.daemons: list[Daemon] = []
        self.overrides = overrides
        for i in range(nodes):
            (tmp / f"n{i}").mkdir()
            self.labs.append(
                Lab(
                    tmp / f"n{i}",
                    upstreams=(self.blue, self.green),
                    fleet__etcd=self.etcd.client_urls,
                    fleet__node=f"n{i}",
                    fleet__lease_ttl="2s",
                    **overrides,
                )
            )

    def through_proxy(self, i: int) -> TcpProxy:
        """Make node `i` reach etcd only through a proxy it can be cut off by."""
        proxy = self.proxies[i] = TcpProxy(self.etcd.client_urls[0]).start()
        self.labs[i].write_config(fleet__etcd=[proxy.url])
        return proxy

    def start(self) -> None:
        """Start every node's guardd and wait until the fleet has them all and a leader."""
        self.daemons = [lab.daemon() for lab in self.labs]
        wait_until(self.settled, 60, "every node in the fleet, and a leader", poll=0.1)

    def settled(self) -> bool:
        keys = self.etcd.range(PREFIX + "/", prefix=True)
        nodes = [k for k in keys if k.startswith(PREFIX + "/nodes/")]
        return len(nodes) == len(self.labs) and PREFIX + "/leader" in keys

    def fleet_status(self, i: int) -> dict[str, Any]:
        out = guardctl("fleet", "status", "--json", socket=self.labs[i].socket_path)
        doc = json.loads(out.stdout)
        assert isinstance(doc, dict), out
        return doc

    def leader(self) -> int | None:
        """The leading node's index; None between leaders."""
        name = self.etcd.range(PREFIX + "/leader").get(PREFIX + "/leader")
        return None if name is None else int(str(name).removeprefix("n"))

    def rounds_pass(self, rounds: int = 2) -> None:
        """Wait until every node has had `rounds` more rounds: each renews its record every
        third of the lease, so that is `rounds` writes per node to etcd."""
        start = self.etcd.revision()
        want = start + rounds * len(self.labs)
        wait_until(lambda: self.etcd.revision() >= want, 30, f"{rounds} more rounds", poll=0.2)

    def all_serve(self, color: str) -> bool:
        return all(lab.nginx.wait_serving_only(color, hold=0.3, timeout=30) for lab in self.labs)

    def close(self) -> None:
        for lab in self.labs:
            lab.close()
        for proxy in self.proxies.values():
            proxy.stop()
        self.blue.stop()
        self.green.stop()
        self.etcd.close()
