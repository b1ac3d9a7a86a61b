"""state.json read back: only a document this guardd wrote is a state; anything else is
kept aside and guardd holds (docs/contract.md §4), never a first start."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardd.statefile import STATE_VERSION, StateFile, read_only


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"{}", "(it has no version)"),
        (b'{"qos": null}', "(it has no version)"),
        (b'{"version": 99, "state": "steady"}', "(its version is 99, not 1)"),
        (b'{"version": true, "state": "steady"}', "(its version is true, not 1)"),
        (b'{"version": "1", "state": "steady"}', '(its version is "1", not 1)'),
        (b'{"version": 1.0, "state": "steady"}', "(its version is 1.0, not 1)"),
        (b'{"version": 1}', "(it has no state)"),
        (b'{"version": 1, "state": 3}', "(it has no state)"),
        (b'{"version": 1, "state": "steady", "qos": "x"}', "(its qos is str, not dict)"),
        (b"[]", None),
    ],
)  # fmt: skip
def test_what_guardd_never_writes_is_no_state_document(raw: bytes, why: str | None) -> None:
    """`why`: what follows "not a state document"; None for one that is no JSON object."""
    said = "not a JSON object" if why is None else f"not a state document {why}"
    assert read_only(raw) == ({}, said)


def test_what_guardd_writes_is_read_back_and_a_stranger_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateFile(path)
    doc = {"guard": "lab", "state": "guard_window", "active": "blue", "qos": {"until": 1.0}}
    store.save(doc)
    assert read_only(path.read_bytes()) == ({"version": STATE_VERSION, **doc}, None)
    assert StateFile(path).load() == {"version": STATE_VERSION, **doc}

    path.write_bytes(b'{"version": 99}')
    stranger = StateFile(path)
    assert stranger.load() == {}
    aside = tmp_path / "state.json.unreadable"
    assert stranger.unreadable == (
        f"{path} was not a state document (its version is 99, not 1); kept as {aside}"
    )
    assert aside.read_bytes() == b'{"version": 99}' and not path.exists()
