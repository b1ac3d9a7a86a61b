"""The journal's in-memory tail is bounded by the bytes of its lines, whatever their number."""

from __future__ import annotations

import gc
import json
import os
import tracemalloc
from pathlib import Path

import pytest

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


def _soak_like(j: Journal, count: int) -> None:
    """Events shaped like a fast guard's: small evidence dicts, a few hundred bytes a line."""
    for i in range(count):
        j.append(
            "config_reloaded",
            source="green",
            target="blue",
            reason=f"reload {i}",
            severity="P2",
            evidence={"failed": i % 7, "samples": 20, "ratio": 0.35, "window_s": 5.0},
            rollback_id=f"{i:032x}",
        )


def test_a_full_tail_costs_about_its_byte_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Held as dicts the same tail cost ~3x its line bytes; as lines it costs the bytes
    # plus a small per-line overhead (~1.15x with these ~300-byte lines).
    monkeypatch.setattr(os, "fsync", lambda _fd: None)  # what is measured is memory, not disk
    j = _journal(tmp_path)
    _soak_like(j, 200)  # warm up what the first appends allocate once
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _soak_like(j, 1500)  # ~850 of these lines fill the bound
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert j.recent_bytes > RECENT_BYTES - 1024  # filled to its bound
    assert grown <= 1.5 * RECENT_BYTES, f"a full tail costs {grown} bytes"


def test_the_tail_reads_as_the_events_it_was_given(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    assert not j.recent
    assert len(j.recent) == 0
    with pytest.raises(IndexError):
        j.recent[-1]
    appended = [j.append("config_reloaded", reason=f"r{i}", evidence={"n": i}) for i in range(50)]
    assert j.recent
    assert len(j.recent) == 50
    assert j.recent[-1] is appended[-1]  # the newest costs no decoding
    assert j.recent[-1] == appended[-1]
    assert j.recent[0] == appended[0]
    assert j.recent[-2] == appended[-2]
    assert j.recent[10:13] == appended[10:13]
    assert list(j.recent) == appended
    assert list(reversed(j.recent)) == appended[::-1]
    with pytest.raises(IndexError):
        j.recent[50]
    # After a restart the tail reads the same from the file.
    j.close()
    again = _journal(tmp_path)
    assert list(again.recent) == appended
    assert again.recent[-1] == appended[-1]
    assert list(reversed(again.recent)) == appended[::-1]


def test_a_search_from_the_newest_end_stops_where_it_finds(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.append("switch", source="blue", target="green", reason="by hand")
    for i in range(20):
        j.append("config_reloaded", reason=f"r{i}")
    it = reversed(j.recent)
    assert next(it)["reason"] == "r19"
    # Appending while a caller iterates neither breaks nor changes what it sees.
    j.append("config_reloaded", reason="late")
    found = next(e for e in it if e["event"] == "switch")
    assert found["reason"] == "by hand"


def test_a_line_that_is_no_event_is_skipped_by_every_reader(tmp_path: Path) -> None:
    """guardd's journal and guardctl's reading of the file (guardd down) skip alike what
    is no event: no object, an `event` that is no string, a `ts` that is no time, or a
    `from`, `to`, `by` or `reason` that is neither a string nor null."""
    path = tmp_path / "events.jsonl"
    good = {"event": "started", "ts": "2026-12-01T00:00:00.000Z", "guard": "lab"}
    foreign: list[object] = [
        {"ts": "bad", "event": 5},
        {"event": "stopped"},
        [1],
        "x",
        {"event": "hold", "ts": "2026-13-45T99:00:00Z"},  # no such time
        {"event": "alert", "ts": good["ts"], "from": 5, "to": [1]},
        {"event": "alert", "ts": good["ts"], "by": {"x": 1}},
        {"event": "alert", "ts": good["ts"], "reason": 7},
    ]
    path.write_text("".join(json.dumps(d) + "\n" for d in [good, *foreign]))
    journal = Journal(path, "lab", lambda: 0.0)
    journal.open()
    assert list(journal.recent) == [good] and journal.skipped_lines == len(foreign)
    journal.close()
