"""Which recorded rounds a replayed guard probing slower than the history takes
(`guardd.replay._engine._Schedule`): those its own cadence would have made, falling back
onto its grid after confirming a failure, as the daemon's loops do (`next_round`)."""

from __future__ import annotations

import pytest

from guardd.replay._engine import _Schedule

RECORDED = 0.25  # the history's spacing (s)
T0 = 5000.123  # the first recorded round (the history's clock)


def taken(cadences: list[float], step: float, rounds: int) -> list[float]:
    """The offsets from T0 of the rounds taken of `rounds` recorded every `RECORDED`
    (each 3 ms after a point of the live grid, as rounds end), the config confirming at
    `cadences[i]` after its i-th round taken (the last value repeating)."""
    s, out = _Schedule(), []
    for i in range(rounds):
        at = T0 + i * RECORDED + 0.003
        if s.takes(at):
            out.append(round(at - T0 - 0.003, 6))
            s.fed(at, cadences[min(len(out) - 1, len(cadences) - 1)], step)
    return out


def test_a_slower_config_takes_the_rounds_on_its_own_cadence() -> None:
    assert taken([1.0], 1.0, 17) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_confirming_then_falling_back_onto_the_grid() -> None:
    # Steady at 1 s; after the round at 3 s and the next, confirming at 0.75 s; then 1 s
    # again: the rounds at 3.75 and 4.5 s are taken, then 5 s (the grid's next point), not
    # 5.5 s (a step after the last).
    cadences = [1.0] * 3 + [0.75] * 2 + [1.0]
    got = taken(cadences, 1.0, 33)
    assert got == pytest.approx([0.0, 1.0, 2.0, 3.0, 3.75, 4.5, 5.0, 6.0, 7.0, 8.0])
