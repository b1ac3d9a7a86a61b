"""Switchers move traffic between the blue and green colors; this is what they share.

A switcher owns one switch target on disk (nginx's upstream symlink, an app's state
file, or the memory of an external command) and is the only code that changes it.
The concrete switchers live in submodules so that importing this one stays cheap.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeGuard, runtime_checkable

from guardd.commands import LAST_FAILURE
from guardd.core.types import COLORS, Color
from guardd.exceptions import CommandFailed, SwitchError

__all__ = [
    "COLORS",
    "COMMAND_STEPS",
    "NGINX_STEPS",
    "STATE_FILE_STEPS",
    "STEP_LINK_WRITTEN",
    "STEP_RAN",
    "STEP_RELOADED",
    "STEP_RENAMED",
    "STEP_TESTED",
    "STEP_WRITTEN",
    "Color",
    "StepHook",
    "Switcher",
    "is_color",
    "switch_error_for",
]

StepHook = Callable[[str], Awaitable[None]]
"""Awaited with a step's name right after the step, e.g. to plant a fault in tests."""

STEP_LINK_WRITTEN: Final = "link_written"
STEP_RENAMED: Final = "renamed"
STEP_TESTED: Final = "tested"
STEP_RELOADED: Final = "reloaded"
STEP_WRITTEN: Final = "written"
STEP_RAN: Final = "ran"

# The order in which each switcher passes its steps to the hook.
NGINX_STEPS: Final = (STEP_LINK_WRITTEN, STEP_RENAMED, STEP_TESTED, STEP_RELOADED)
STATE_FILE_STEPS: Final = (STEP_WRITTEN, STEP_RELOADED)
COMMAND_STEPS: Final = (STEP_RAN,)


def is_color(value: object) -> TypeGuard[Color]:
    """Tell whether *value* is one of the two colors."""
    return value in COLORS


def switch_error_for(
    exc: BaseException, what: str, timeout: float, step: str | None = None
) -> BaseException:
    """Return what a switcher raises for *exc*: a `SwitchError`, or a cancellation as is.

    *step* (``switch``, ``test`` or ``reload``), when given, is the step that was running;
    it is set on the `SwitchError`, unless a rejection already says ``test``.
    """
    error: BaseException
    if isinstance(exc, TimeoutError):
        # Retries of a failing command cut short by the deadline: why they failed, too.
        last = LAST_FAILURE.get()
        error = CommandFailed(
            f"{what} timed out after {timeout:g}s" + (f" ({last})" if last else "")
        )
    elif isinstance(exc, OSError):
        error = SwitchError(f"{what} failed: {exc}")
    else:
        error = exc
    if step is not None and isinstance(error, SwitchError) and error.step == "switch":
        error.step = step
    return error


@runtime_checkable
class Switcher(Protocol):
    """Moves traffic to a color and tells which color the target on disk names."""

    async def read_active(self) -> Color | None:
        """Return the color the switch target names now, or None if it names neither.

        Raises `GuarddError` or `OSError` when there is no target to read (it does not
        exist, or is no file of the kind the switcher writes): its message says which, so
        that a hold can say why rather than "names neither".
        """
        ...

    async def switch(self, to: Color) -> None:
        """Move traffic to *to*; on failure restore the previous target, raise `SwitchError`."""
        ...

    async def recover(self) -> None:
        """At start-up, finish or undo a switch a crash interrupted and clear its debris."""
        ...

    async def restore(self, previous: Color) -> None:
        """Undo a switch that committed but did not verify: put *previous* back in force.

        What was in place before the last switch is restored exactly when the switcher
        still holds it (nginx: the old link; state file: the old bytes); else the target
        is set to *previous*. The service is reloaded either way. Raises `SwitchError`
        whose `step` names the step that failed.
        """
        ...

    async def reapply(self) -> None:
        """Make the service run what the switch target names now (nginx: test + reload).

        Changes nothing on disk. Raises `SwitchError` whose `step` names the failed step.
        """
        ...
