"""The outbox on a real filesystem: atomic files, order, restarts, torn and foreign files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from guardd.exceptions import StorageError
from guardd.notify.outbox import Message, Outbox


def fresh(directory: Path) -> Outbox:
    outbox = Outbox(directory)
    assert outbox.load() == ([], [])
    return outbox


def add(outbox: Outbox, sink: str, event_id: str) -> Message:
    message = outbox.new_message(sink, event_id, {"event": "hold", "id": event_id, "n": [1, 2]})
    assert outbox.save([message]) == []
    outbox.sync()
    return message


def test_saved_messages_load_back_in_order(tmp_path: Path) -> None:
    outbox = fresh(tmp_path / "outbox")
    saved = [add(outbox, sink, f"ev-{i}") for i, sink in enumerate(["a", "b", "a", "c"])]
    loaded, problems = Outbox(tmp_path / "outbox").load()
    assert problems == []
    assert loaded == saved
    assert [m.seq for m in loaded] == sorted(m.seq for m in loaded)


def test_removed_messages_stay_removed(tmp_path: Path) -> None:
    outbox = fresh(tmp_path / "outbox")
    first, second, third = (add(outbox, "a", f"ev-{i}") for i in range(3))
    outbox.remove([first, third])
    outbox.remove([first])  # already gone: no error
    loaded, _ = Outbox(tmp_path / "outbox").load()
    assert loaded == [second]


def test_sequence_numbers_continue_after_a_restart(tmp_path: Path) -> None:
    outbox = fresh(tmp_path / "outbox")
    old = add(outbox, "a", "ev-old")
    again = Outbox(tmp_path / "outbox")
    again.load()
    new = add(again, "a", "ev-new")
    assert new.seq > old.seq
    loaded, _ = Outbox(tmp_path / "outbox").load()
    assert [m.event_id for m in loaded] == ["ev-old", "ev-new"]


def test_files_are_private_and_hold_no_temporary_debris(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    add(fresh(directory), "a", "ev-1")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    [only] = directory.iterdir()
    assert only.name == "000000000001.json"
    assert stat.S_IMODE(only.stat().st_mode) == 0o600
    doc = json.loads(only.read_bytes())
    assert doc == {
        "v": 1,
        "sink": "a",
        "id": "ev-1",
        "event": {"event": "hold", "id": "ev-1", "n": [1, 2]},
    }


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"v": 1, "sink": "a", "id": "ev', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'["a", "list"]', "not an outbox message"),
        (b'{"v": 99, "sink": "a", "id": "x", "event": {}}', "not an outbox message"),
        (b'{"v": 1, "sink": "a", "id": 7, "event": {}}', "sink, id or event missing"),
        (b'{"v": 1, "sink": "a", "id": "x", "event": "hold"}', "sink, id or event missing"),
        (b" " * (1024 * 1024 + 1), "larger than any message"),
    ],
)
def test_corrupt_files_are_reported_once_and_set_aside(
    tmp_path: Path, content: bytes, why: str
) -> None:
    directory = tmp_path / "outbox"
    outbox = fresh(directory)
    good = add(outbox, "a", "ev-good")
    (directory / "000000000007.json").write_bytes(content)
    loaded, problems = Outbox(directory).load()
    assert loaded == [good]
    [problem] = problems
    assert problem.startswith("000000000007.json: ")
    assert why in problem
    assert (directory / "000000000007.json.corrupt").exists()
    # Set aside, it is not reported again; its number is not reused.
    again = Outbox(directory)
    assert again.load() == ([good], [])
    assert add(again, "a", "ev-next").seq == 8


def test_foreign_files_are_left_alone_and_temporary_files_cleaned(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    outbox = fresh(directory)
    good = add(outbox, "a", "ev-1")
    (directory / "notes.txt").write_text("an operator's note")
    (directory / "subdir").mkdir()
    (directory / ".000000000009.json.tmp").write_text('{"half": ')  # a write cut short
    assert Outbox(directory).load() == ([good], [])
    assert sorted(p.name for p in directory.iterdir()) == [
        "000000000001.json",
        "notes.txt",
        "subdir",
    ]


def test_a_failed_write_is_reported_per_message(tmp_path: Path) -> None:
    outbox = fresh(tmp_path / "outbox")
    (tmp_path / "outbox").rmdir()  # gone from under it
    message = outbox.new_message("a", "ev-1", {"event": "hold"})
    [(failed, why)] = outbox.save([message])
    assert failed is message
    assert why == "No such file or directory"
    with pytest.raises(StorageError, match="cannot sync the outbox directory"):
        outbox.sync()


def test_nothing_is_written_to_a_directory_that_was_not_read(tmp_path: Path) -> None:
    # Without reading the directory first, a sequence number could overwrite a message.
    directory = tmp_path / "outbox"
    old = add(fresh(directory), "a", "ev-old")
    blind = Outbox(directory)
    message = blind.new_message("a", "ev-new", {"event": "hold"})
    assert message.seq == old.seq
    [(failed, why)] = blind.save([message])
    assert failed is message
    assert why == "the outbox directory could not be read at start"
    assert Outbox(directory).load() == ([old], [])


def test_remove_reports_a_storage_error(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    outbox = fresh(directory)
    message = add(outbox, "a", "ev-1")
    # A directory where the message file should be cannot be unlinked like a file.
    (directory / "000000000001.json").unlink()
    (directory / "000000000001.json").mkdir()
    with pytest.raises(StorageError, match="cannot remove an outbox message"):
        outbox.remove([message])


def test_a_symlink_at_the_temporary_name_is_not_followed(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    outbox = fresh(directory)
    target = tmp_path / "victim"
    target.write_text("untouched")
    message = outbox.new_message("a", "ev-1", {"event": "hold"})
    (directory / f".{message.seq:012d}.json.tmp").symlink_to(target)
    assert outbox.save([message]) == []
    assert target.read_text() == "untouched"
    assert Outbox(directory).load()[0] == [message]


def test_a_thread_is_kept_beside_the_messages_and_never_loaded_as_one(tmp_path: Path) -> None:
    outbox = fresh(tmp_path / "outbox")
    message = add(outbox, "slack", "ev-1")
    assert outbox.load_thread("slack") is None
    outbox.save_thread("slack", {"channel": "C1", "ts": "1.000001"})
    outbox.save_thread("slack", {"channel": "C1", "ts": "2.000002"})
    path = tmp_path / "outbox" / "thread-slack.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Outbox(tmp_path / "outbox")
    assert again.load() == ([message], [])
    assert again.load_thread("slack") == {"channel": "C1", "ts": "2.000002"}
    assert not list((tmp_path / "outbox").glob(".*.tmp"))
    again.save_thread("slack", None)
    assert not path.exists()
    assert again.load_thread("slack") is None
    again.save_thread("slack", None)  # forgetting twice is no error


def test_a_thread_that_cannot_be_written_is_a_storage_error(tmp_path: Path) -> None:
    outbox = fresh(tmp_path / "outbox")
    # A directory where the file would go: the rename cannot replace it.
    (tmp_path / "outbox" / "thread-slack.json").mkdir()
    with pytest.raises(StorageError, match="cannot write the thread of sink slack"):
        outbox.save_thread("slack", {"channel": "C1", "ts": "1.000001"})
    assert not list((tmp_path / "outbox").glob(".*.tmp"))
