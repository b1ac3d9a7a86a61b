"""When a probe loop's next round is due: a fixed cadence, on a grid shared by the loops.

Pure: times are monotonic seconds passed in. The daemon's loops (each color's, the front
door's) start their cadence at one epoch. Rounds on the same grid fall due at the same
instant, so that one timer wake-up of the process serves all of them: on a host running a
guard per service, a wake-up of a cold process costs several times the probe it serves.
"""

from __future__ import annotations

import math

__all__ = ["last_point_by", "next_round"]


def next_round(
    due: float, started: float, now: float, interval: float, grid: tuple[float, float]
) -> float:
    """When the round after this one is due (monotonic s).

    `due` is when this round was due, `started` when it began and `now` when it ended;
    `interval` is the loop's cadence from here on (s, > 0). `grid` is `(epoch, step)`: the
    shared cadence of the daemon's loops, rounds due at `epoch + k * step`.

    - No drift: the next round is due `interval` after this one was due, not after it
      ended.
    - At the shared step, on the grid: the last point within a step after `due`, or the
      first one after `now` if that one passed during the round. A loop that ran faster
      for a while (confirming a failure) so falls back in step with the others.
    - A round that overran its slot is not followed by a second one stacked behind it:
      the next starts `interval` after this one started, or at once if that has passed.
    """
    epoch, step = grid
    if interval == step and now <= started + interval:
        k = _index(due + step, grid)
        if epoch + step * k < now:
            k = _index(now, grid) + 1
        return epoch + step * k
    nxt = due + interval
    if nxt < now:
        nxt = started + interval * math.ceil((now - started) / interval)
    return min(nxt, started + interval)


def last_point_by(t: float, grid: tuple[float, float]) -> float:
    """The last point of `grid` (`(epoch, step)`, as `next_round`'s) not after `t` (s).

    For a timer that may fire early but not late (the watchdog's ping): due then, it
    shares the probe round's wake-up.
    """
    epoch, step = grid
    return epoch + step * _index(t, grid)


def _index(t: float, grid: tuple[float, float]) -> int:
    """The index k of the last point `epoch + k * step` of `grid` not after `t`."""
    epoch, step = grid
    # (The margin, a millionth of a step, absorbs float error: `t` on a point, or a point
    # plus a step, is that point or the next one, never the one before it.)
    return math.floor((t - epoch) / step + 1e-6)
