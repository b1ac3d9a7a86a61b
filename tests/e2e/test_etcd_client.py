"""guardd's etcd client against a real etcd member (Debian's `etcd-server`)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from guardd.fleet._etcd import EtcdClient, LeaseGone, compare, put_op
from tests.harness.etcd import EtcdCluster


def test_a_write_under_an_expired_lease_is_an_answer_not_an_etcd_out_of_reach(
    tmp_path: Path,
) -> None:
    """etcd answers a write under a lease it no longer has (this process was away longer
    than the TTL) with 404 "requested lease not found": `LeaseGone` (grant another), not
    "no etcd member answered"; a keepalive of it says TTL 0."""
    with EtcdCluster(tmp_path, size=1) as etcd:

        async def main() -> None:
            client = EtcdClient(etcd.client_urls, timeout=5.0)
            try:
                lease = await client.grant(5.0)
                key = "/guardd/lab/nodes/n0"
                ok, _ = await client.txn(
                    [compare(key, "CREATE", 0)], [put_op(key, {}, lease=lease)]
                )
                assert ok
                etcd._post("lease/revoke", {"ID": str(lease)})  # gone, as if expired
                assert await client.keepalive(lease) == 0
                with pytest.raises(LeaseGone, match="no longer has the lease"):
                    await client.txn([compare(key, "CREATE", 0)], [put_op(key, {}, lease=lease)])
            finally:
                await client.aclose()

        anyio.run(main)


def test_the_etcd_harness_leaves_only_its_logs_behind(tmp_path: Path) -> None:
    """Each member preallocates 64 MB of WAL: the harness deletes its data dirs as the
    `with` ends (the logs stay for a failure's report), or a run of the fleet tests leaves
    gigabytes on the disk."""
    with EtcdCluster(tmp_path, size=2) as etcd:
        etcd.put("/guardd/lab/probe", "{}")
        wal = sum(f.stat().st_size for f in tmp_path.glob("e*/member/wal/*"))
        assert wal >= 2 * 60_000_000, wal  # what is at stake: the preallocated segments
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0.log", "e1.log"]
    assert all(p.stat().st_size > 0 for p in tmp_path.iterdir())
