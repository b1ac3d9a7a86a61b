"""JSON nested deeper than the parser goes, wherever guardd reads JSON it did not just
write: read as the malformed document it is, never a `RecursionError` traceback."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from guardd import qoslock, untrusted_json
from guardd.fleet import coordinator, lockread
from guardd.journal import Journal
from guardd.replay._sources import parse_range
from guardd.statefile import StateFile
from tests.replay.history import DAY0, Timeline, config, replay_json

DEEP = b"[" * 100_000


def test_loads_says_a_deep_document_is_no_json() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        untrusted_json.loads(DEEP)
    assert untrusted_json.loads(b'{"a": [1]}') == {"a": [1]}


def test_every_reader_of_outside_json_takes_a_deep_document_as_malformed(tmp_path: Path) -> None:
    journal = tmp_path / "events.jsonl"
    good = {"event": "started", "ts": "2026-12-01T00:00:00.000Z", "guard": "lab"}
    journal.write_bytes(json.dumps(good).encode() + b"\n" + DEEP + b"\n")
    reader = Journal(journal, "lab", lambda: DAY0)
    assert reader.read() == [good] and reader.skipped_lines == 1
    # A lock file of it is held (fail closed), as any lock file that is not guardd's.
    assert qoslock.parse_lock(DEEP).held
    state = tmp_path / "state.json"
    state.write_bytes(DEEP)
    store = StateFile(state)
    assert store.load() == {} and store.unreadable is not None  # (guardd holds on it)
    assert coordinator._json(DEEP.decode(), "default") == "default"
    kv = {"key": base64.b64encode(b"/p/qos").decode(), "value": base64.b64encode(DEEP).decode()}
    assert lockread._values([kv], "/p/") == {"qos": None}
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_range(DEEP)


def test_a_deep_line_in_the_journal_is_a_skipped_line_of_a_replay(tmp_path: Path) -> None:
    tl = Timeline(tmp_path / "state")
    tl.start(active="green")
    tl.rounds(50)
    tl.close()
    with (tmp_path / "state" / "events.jsonl").open("ab") as f:
        f.write(DEEP + b"\n")
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    assert doc["journal_skipped"] == 1 and doc["journal_problem"] is None, doc["journal_skipped"]
