"""What every switcher does when a switch fails part-way: undo it, then say why."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from guardd.switchers import switch_error_for


async def undo_failed_switch(
    exc: BaseException,
    undo: Callable[[], Awaitable[str | None]],
    what: str,
    limit: float,
    step: str | None = None,
) -> BaseException:
    """Run *undo* for a switch that failed with *exc*; return what the switcher raises.

    The undo is shielded from cancellation, so a cancelled switch still puts the old
    target back, and gets at most *limit* seconds. The error returned is
    `switch_error_for(exc, what, limit, step)`, with a note saying what went wrong in the
    undo (its returned problem, or that it ran past *limit*). It is *exc* itself for a
    cancellation: the caller then re-raises it as is.
    """
    problem: str | None = (
        f"the undo ran past {limit:g}s; guardd finishes it at its next switch or start"
    )
    with anyio.CancelScope(shield=True), anyio.move_on_after(limit):
        problem = await undo()
    error = switch_error_for(exc, what, limit, step)
    if problem:
        error.add_note(problem)
    return error
