"""guardctl's own read of the fleet's QoS lock (`guardd.fleet.lockread`): fail closed."""

from __future__ import annotations

import pytest

from guardd.fleet.lockread import FleetLockUnknown, read_fleet_lock


@pytest.mark.parametrize(
    "etcd",
    [
        ["file:///etc/passwd"],
        ["ftp://127.0.0.1:2379"],
        ["127.0.0.1:2379"],
        ["http://127.0.0.1:9", "file:///etc/passwd"],
    ],
)
def test_an_etcd_address_that_is_not_http_is_unknown_before_any_request(etcd: list[str]) -> None:
    # The [fleet] table is read raw by guardctl: a scheme urllib would open as a file
    # (or anything but http/https) is never asked, and the lock is UNKNOWN, not unlocked.
    with pytest.raises(FleetLockUnknown, match="not an http"):
        read_fleet_lock({"etcd": etcd}, "lab", timeout=1.0)


@pytest.mark.parametrize("etcd", [None, [], "http://127.0.0.1:2379", [2379]])
def test_an_etcd_list_that_is_not_one_is_unknown(etcd: object) -> None:
    with pytest.raises(FleetLockUnknown, match="not a list of URLs"):
        read_fleet_lock({"etcd": etcd}, "lab", timeout=1.0)
