"""The probe loops' cadence (`guardd.core.cadence.next_round`): no drift, no stacked rounds,
and every loop back on the shared grid after a faster spell."""

from __future__ import annotations

import itertools

import pytest

from guardd.core.cadence import last_point_by, next_round

EPOCH = 1234.5678  # an arbitrary monotonic start: nothing may assume 0
STEP = 1.0
GRID = (EPOCH, STEP)


def rounds(
    n: int,
    cadence: list[float],
    *,
    late: float = 0.0003,
    takes: float = 0.002,
    grid: tuple[float, float] = GRID,
) -> list[float]:
    """When each of `n` rounds of one loop is due, from the epoch: round i runs at
    `cadence[i]` (the last value repeating), starts `late` after it is due, lasts `takes`."""
    due, out = grid[0], []
    for i in range(n):
        out.append(due)
        started = due + late
        due = next_round(due, started, started + takes, cadence[min(i, len(cadence) - 1)], grid)
    return out


def on_grid(t: float, grid: tuple[float, float] = GRID) -> bool:
    k = (t - grid[0]) / grid[1]
    return abs(k - round(k)) < 1e-9


def test_a_steady_loop_does_not_drift_over_a_day() -> None:
    due = rounds(86_400, [STEP])
    assert due[-1] == pytest.approx(EPOCH + 86_399 * STEP, abs=1e-6)
    assert all(on_grid(t) for t in due)
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert min(gaps) == pytest.approx(STEP) and max(gaps) == pytest.approx(STEP)


@pytest.mark.parametrize("step", [0.05, 0.1, 0.2, 0.25, 0.3, 1.0, 2.5, 7.0])
def test_float_error_never_repeats_or_skips_a_point(step: float) -> None:
    grid = (EPOCH, step)
    due = rounds(20_000, [step], late=0.0, takes=0.0, grid=grid)
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert min(gaps) == pytest.approx(step) and max(gaps) == pytest.approx(step)


def test_a_round_that_starts_late_keeps_the_slot() -> None:
    # Woken 40 ms late (a busy host): the next round is still due on the next point.
    due = rounds(5, [STEP], late=0.040)
    assert [t - EPOCH for t in due] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])


def test_confirming_runs_faster_from_the_failing_round_then_falls_back_in_step() -> None:
    # Steady, a failure at round 3: four rounds at 0.3 s (not a divisor of the step), then
    # the step again.
    cadence = [STEP] * 3 + [0.3] * 4 + [STEP]
    due = rounds(12, cadence)
    rel = [round(t - EPOCH, 6) for t in due]
    assert rel[:4] == [0.0, 1.0, 2.0, 3.0]
    # The confirming rounds: 0.3 s after the round before was due, not after it ended.
    assert rel[4:8] == pytest.approx([3.3, 3.6, 3.9, 4.2])
    # Back on the grid: the last point within a step of 4.2, then every step.
    assert rel[8:] == pytest.approx([5.0, 6.0, 7.0, 8.0])
    assert all(on_grid(t) for t in due[8:])


@pytest.mark.parametrize("offset", [0.0, 0.001, 0.299, 0.5, 0.7, 0.999])
def test_falling_back_never_waits_more_than_a_step_nor_repeats_a_round(offset: float) -> None:
    due = EPOCH + 3 * STEP + offset  # a confirming round, anywhere between two points
    nxt = next_round(due, due, due + 0.0005, STEP, GRID)
    assert due < nxt <= due + STEP
    assert on_grid(nxt)


def test_a_point_passed_during_the_round_is_not_waited_for_again() -> None:
    # The last confirming round was due just before a point and ended after it: the next
    # round is due at the point after, not at once, and the loop is on the grid again.
    due = EPOCH + 3.999
    nxt = next_round(due, due, due + 0.002, STEP, GRID)
    assert nxt == pytest.approx(EPOCH + 5 * STEP)
    assert next_round(nxt, nxt, nxt + 0.002, STEP, GRID) == pytest.approx(EPOCH + 6 * STEP)


def test_a_round_that_overran_its_slots_is_not_followed_by_a_stacked_one() -> None:
    due = EPOCH + 10 * STEP
    # A probe that took 2.5 steps (its timeout above the interval): the next starts at
    # once, not once per slot it missed.
    nxt = next_round(due, due, due + 2.5 * STEP, STEP, GRID)
    assert nxt <= due + 2.5 * STEP
    # One that took 1.5 steps: the next at once too (a step after it started has passed).
    assert next_round(due, due, due + 1.5 * STEP, STEP, GRID) <= due + 1.5 * STEP
    # One that started late and overran the next point: the point after it.
    late_start = due + 0.6
    nxt = next_round(due, late_start, late_start + 0.5, STEP, GRID)
    assert nxt == pytest.approx(due + 2 * STEP)
    # Off the grid (confirming at 0.3 s), one that overran: 0.3 s after it started.
    nxt = next_round(due, late_start, late_start + 0.2, 0.3, GRID)
    assert nxt == pytest.approx(late_start + 0.3)


def test_loops_on_one_grid_fall_due_together() -> None:
    # The colors and the front door (one confirming for a while) share their rounds.
    blue = rounds(30, [STEP])
    green = rounds(30, [STEP] * 5 + [0.2] * 7 + [STEP])
    front = rounds(30, [STEP], late=0.004, takes=0.007)
    assert set(blue) <= set(front)
    assert set(green[-10:]) <= set(blue)


@pytest.mark.parametrize("offset", [0.0, 1e-9, 0.3, 0.999999])
def test_the_last_point_by_a_time_is_never_after_it(offset: float) -> None:
    t = EPOCH + 7 * STEP + offset
    at = last_point_by(t, GRID)
    assert on_grid(at)
    assert at == pytest.approx(EPOCH + 7 * STEP)


def test_a_time_on_a_point_is_that_point_despite_float_error() -> None:
    for k in range(1, 2000):
        t = EPOCH + k * 0.1
        assert last_point_by(t, (EPOCH, 0.1)) == pytest.approx(t)
