"""Switch by running an operator's command, e.g. an Ansible playbook, with the color.

The command is an argv list; ``{color}`` and ``{instance}`` are replaced inside each
argument, and the result is executed without a shell, so a value such as
``a; rm -rf /`` is one literal argument. The one step passed to the hook is ``ran``.

A command leaves nothing guardd can read back, so this switcher keeps its own record:
``state_path`` holds, as JSON, the color of the last successful switch
(``activeColor``) and, while a switch runs, the color it is going to (``pending``).
`read_active()` reports that record, which is only as true as the command's success
was; it is None until the first switch. `recover()` re-runs a switch a crash
interrupted, since deploy tools are built to be re-run; on failure a switch runs the
command again for the previous color to undo, as far as the command can.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

from guardd.commands import RetryPolicy, run_command
from guardd.exceptions import CommandFailed, StorageError, SwitchError, UnsafePath
from guardd.fsutil import atomic_write, read_bytes, remove_debris
from guardd.switchers import STEP_RAN, Color, StepHook, is_color
from guardd.switchers._undo import undo_failed_switch

__all__ = ["CommandSwitcher", "substitute"]

log = structlog.get_logger(__name__)

_PLACEHOLDER = re.compile(r"\{(color|instance)\}")


def substitute(command: Sequence[str], *, color: Color, instance: str) -> list[str]:
    """Return *command* with ``{color}`` and ``{instance}`` replaced in each argument.

    One pass per argument, so a value that itself contains ``{color}`` stays literal;
    other braces (JSON, Jinja) are left alone.
    """
    values = {"color": color, "instance": instance}
    return [_PLACEHOLDER.sub(lambda m: values[m[1]], arg) for arg in command]


class CommandSwitcher:
    """Moves traffic by running a command; remembers the outcome in a small JSON file."""

    def __init__(
        self,
        *,
        command: Sequence[str],
        instance: str,
        timeout: float,
        retry: RetryPolicy | None,
        state_path: Path,
        on_step: StepHook | None = None,
    ) -> None:
        self.command = list(command)
        self.instance = instance
        self.timeout = timeout
        self.retry = retry
        self.state_path = state_path
        self.on_step = on_step
        self._lock = anyio.Lock()

    def argv_for(self, color: Color) -> list[str]:
        """Return the argv that switches to *color*."""
        return substitute(self.command, color=color, instance=self.instance)

    async def read_active(self) -> Color | None:
        """Return the color of the last successful switch; None if its record names none.

        Raises `StorageError` when no switch was ever recorded (the record does not
        exist): guardd cannot tell which color the command last chose.
        """
        if not self.state_path.exists() and not self.state_path.is_symlink():
            raise StorageError(
                f"{self.state_path}: does not exist: no switch recorded yet "
                "(`guardctl switch COLOR --force` records the color served)"
            )
        value = self._load().get("activeColor")
        return value if is_color(value) else None

    async def switch(self, to: Color) -> None:
        """Run the command for *to*; on failure run it for the previous color and raise."""
        async with self._lock:
            await self._switch(to)

    async def restore(self, previous: Color) -> None:
        """Run the command for *previous*: the command's own way back."""
        async with self._lock:
            await self._switch(previous)

    async def reapply(self) -> None:
        """Run the command again for the color of the last successful switch, once (a
        repair from the decision path is not retried: `NginxSwitcher.reapply`)."""
        async with self._lock:
            current = self._load().get("activeColor")
            if not is_color(current):
                raise SwitchError("no switch has been recorded yet; nothing to re-apply")
            await self._switch(current, retry=False)

    async def recover(self) -> None:
        """Re-run a switch a crash interrupted; clear a crashed write's temp file."""
        async with self._lock:
            remove_debris(self.state_path)
            pending = self._load().get("pending")
            if is_color(pending):
                log.info("command_switch_resumed", to=pending)
                await self._switch(pending)

    async def _switch(self, to: Color, *, retry: bool = True) -> None:
        """Do `switch` with the lock held (the command retried unless `retry` is false)."""
        previous = self._load().get("activeColor")
        before: Color | None = previous if is_color(previous) else None
        self._save(before, pending=to)
        try:
            with anyio.fail_after(self.timeout):
                await self._run(to, retry=retry)
                await self._step(STEP_RAN)
        except BaseException as exc:
            error = await undo_failed_switch(
                exc, lambda: self._undo(before, to), f"switch to {to}", self.timeout
            )
            if error is exc:
                raise
            raise error from exc
        self._save(to, pending=None)
        log.info("command_switched", to=to)

    async def _undo(self, before: Color | None, failed: Color) -> str | None:
        """Run the command for *before*, if known; return what went wrong."""
        problem = None
        if before is not None and before != failed:
            try:
                await self._run(before)
            except CommandFailed as exc:
                problem = f"undoing with the command for {before} failed too: {exc}"
        try:
            self._save(before, pending=None)
        except SwitchError as exc:
            problem = f"{problem}; {exc}" if problem else str(exc)
        if problem:
            log.error("command_undo_incomplete", problem=problem)
        return problem

    async def _run(self, color: Color, *, retry: bool = True) -> None:
        """Run the command for *color* under the retry policy (once if not `retry`)."""
        await run_command(
            self.argv_for(color),
            timeout=self.timeout,
            retry=self.retry if retry else None,
            what=f"switch command for {color}",
        )

    async def _step(self, name: str) -> None:
        """Tell the step hook, if any, that step *name* is done."""
        if self.on_step is not None:
            await self.on_step(name)

    def _load(self) -> dict[str, Any]:
        """Read the record; a missing or garbled one reads as empty."""
        try:
            document = json.loads(read_bytes(self.state_path))
        except (FileNotFoundError, ValueError):
            return {}
        return document if isinstance(document, dict) else {}

    def _save(self, active: Color | None, *, pending: Color | None) -> None:
        """Write the record atomically, as a `SwitchError` if it cannot be written."""
        data = json.dumps({"activeColor": active, "pending": pending}) + "\n"
        try:
            atomic_write(self.state_path, data.encode(), mode=0o600)
        except (StorageError, UnsafePath) as exc:
            raise SwitchError(f"cannot record the switch: {exc}") from exc
