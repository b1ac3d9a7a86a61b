"""The journal's in-memory tail is bounded by the bytes of its lines, whatever their number."""

from __future__ import annotations

import json
from pathlib import Path

from guardd.journal import RECENT_BYTES, Journal


def _line_bytes(event: dict[str, object]) -> int:
    return len(json.dumps(event, separators=(",", ":"), default=str)) + 1


def _journal(tmp_path: Path) -> Journal:
    j = Journal(tmp_path / "events.jsonl", "web", lambda: 1_700_000_000.0)
    j.open()
    return j


def test_big_events_keep_the_tail_within_its_bytes(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    evidence = {"samples": ["x" * 100] * 40}  # ~4 KiB a line
    for i in range(400):
        j.append("config_reloaded", reason=f"reload {i}", evidence=evidence)
    kept = list(j.recent)
    assert sum(_line_bytes(e) for e in kept) <= RECENT_BYTES
    assert j.recent_bytes == sum(_line_bytes(e) for e in kept)
    assert kept[-1]["reason"] == "reload 399"
    # The tail is the newest events, in order, with none missing between them.
    reasons = [e["reason"] for e in kept]
    first = 400 - len(reasons)
    assert reasons == [f"reload {i}" for i in range(first, 400)]
    assert first > 0


def test_small_events_are_kept_by_bytes_not_by_a_count(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    for i in range(5000):
        j.append("config_reloaded", reason=f"r{i:05d}")
    # Every line is the same size: the tail holds exactly as many as fit in the bytes.
    size = _line_bytes(j.recent[-1])
    assert len(j.recent) == RECENT_BYTES // size
    assert j.recent_bytes == len(j.recent) * size


def test_reopening_loads_only_the_newest_bytes(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    evidence = {"blob": "y" * 3000}
    for i in range(300):
        j.append("config_reloaded", reason=f"reload {i}", evidence=evidence)
    j.close()
    again = _journal(tmp_path)
    assert again.recent[-1]["reason"] == "reload 299"
    assert again.recent_bytes <= RECENT_BYTES
    assert len(again.read()) == 300  # the file itself keeps everything


def test_one_event_larger_than_the_bound_is_still_the_newest(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.append("config_reloaded", reason="small")
    j.append("config_reloaded", reason="huge", evidence={"blob": "z" * (RECENT_BYTES + 10)})
    assert [e["reason"] for e in j.recent] == ["huge"]
    j.append("config_reloaded", reason="after")
    assert [e["reason"] for e in j.recent] == ["after"]
