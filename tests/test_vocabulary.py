"""guardd's shared words (colors, states, probe and notification outcomes, journal events)
are defined once, in guardd/core/types.py; every other module takes them from there.

A second copy drifts: a color, state or event added in one place and not the other is
a metric label that raises, or a notification that can never be chosen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from guardd import config, journal, metrics, switchers
from guardd.control import protocol
from guardd.core import types
from guardd.notify import _delivery

GUARDD = Path(__file__).resolve().parents[1] / "guardd"
DEFINITIONS = GUARDD / "core" / "types.py"

# Each word list, as a set: a literal collection of strings that holds all of one list
# (a tuple, list, set or `Literal[...]`) is a copy of it.
LISTS = {
    "the two colors": set(types.COLORS),
    "probe outcomes": {o.value for o in types.Outcome},
    "guard states": {s.value for s in types.State},
    "notification outcomes": set(types.NOTIFICATION_OUTCOMES),
    "journal events": set(types.JOURNAL_EVENTS),
}


def _literals(tree: ast.AST) -> list[tuple[int, set[str]]]:
    found = []
    for node in ast.walk(tree):
        items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else None
        if items and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in items):
            found.append((node.lineno, {e.value for e in items}))  # type: ignore[attr-defined]
    return found


@pytest.mark.parametrize("what", sorted(LISTS))
def test_no_module_spells_out_the_vocabulary_again(what: str) -> None:
    words = LISTS[what]
    found = [
        f"{path.relative_to(GUARDD.parent)}:{line}"
        for path in sorted(GUARDD.rglob("*.py"))
        if path != DEFINITIONS
        for line, strings in _literals(ast.parse(path.read_text()))
        # A list of just these words (a sub-group, such as the events a demo narrates,
        # or a choice with more options, such as rollback_to's "previous", is not a copy).
        if strings == words
    ]
    assert found == []


def test_the_check_finds_a_copy() -> None:
    copies = ast.parse(
        'C = ("blue", "green")\n'
        'L = Literal["green", "blue"]\n'
        'S = {"sent", "retried", "dropped"}\n'
        'R = Literal["blue", "green", "previous"]\n'
    )
    found = sorted((line, sorted(strings)) for line, strings in _literals(copies))
    assert found == [
        (1, ["blue", "green"]),
        (2, ["blue", "green"]),
        (3, ["dropped", "retried", "sent"]),
        (4, ["blue", "green", "previous"]),
    ]


def test_every_copy_is_the_definition() -> None:
    assert vars(config)["COLORS"] is types.COLORS
    assert vars(config)["Color"] is types.Color
    assert switchers.COLORS is types.COLORS
    assert switchers.Color is types.Color
    assert vars(protocol)["COLORS"] is types.COLORS
    assert journal.EVENTS is types.JOURNAL_EVENTS
    assert vars(_delivery)["JOURNAL_EVENTS"] is types.JOURNAL_EVENTS
    assert metrics.COLORS == types.COLORS
    assert metrics.NOTIFICATION_OUTCOMES is types.NOTIFICATION_OUTCOMES


def test_metric_labels_cover_the_vocabulary() -> None:
    assert tuple(o.value for o in types.Outcome) == metrics.PROBE_OUTCOMES
    assert tuple(s.value for s in types.State) == metrics.STATES
