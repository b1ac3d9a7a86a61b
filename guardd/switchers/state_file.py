"""Switch by rewriting the app's JSON state file, then optionally reloading the app.

The file is a JSON object whose ``activeColor`` key names the live color; guardd
changes that key only, keeps every other key and their order, and replaces the file
atomically (`guardd.fsutil.atomic_write`). Steps, each followed by the step hook:
``written``, then ``reloaded`` when a reload command is configured.

With a reload command, a marker (``.<name>.guardd-switching``) exists while the
switch is in flight; `recover()` seeing it after a crash reloads, so the app runs
what the file says, whichever side of the rename the crash fell on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from guardd.commands import RetryPolicy, run_command
from guardd.exceptions import (
    CommandFailed,
    StorageError,
    SwitchError,
    SwitchRejected,
    UnsafePath,
)
from guardd.fsutil import atomic_write, fsync_dir, read_bytes, remove_debris
from guardd.switchers import (
    STEP_RELOADED,
    STEP_WRITTEN,
    Color,
    StepHook,
    is_color,
    switch_error_for,
)
from guardd.switchers._undo import undo_failed_switch

__all__ = ["StateFileSwitcher"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Progress:
    """How far a switch got, so an undo does exactly what is needed."""

    written: bool = False
    reload_attempted: bool = False


class StateFileSwitcher:
    """Moves traffic by setting ``activeColor`` in a JSON file the app reads."""

    def __init__(
        self,
        *,
        path: Path,
        reload_command: Sequence[str] | None,
        timeout: float,
        retry: RetryPolicy | None,
        on_step: StepHook | None = None,
        key: str = "activeColor",
    ) -> None:
        self.path = path
        self.reload_command = list(reload_command) if reload_command else None
        self.timeout = timeout
        self.retry = retry
        self.on_step = on_step
        self.key = key
        self.marker = path.with_name(f".{path.name}.guardd-switching")
        self._lock = anyio.Lock()
        # The file's bytes before and after the last committed switch: what `restore()`
        # puts back when that switch does not verify.
        self._replaced: tuple[bytes | None, bytes] | None = None

    async def read_active(self) -> Color | None:
        """Return the color the file names; None if it is unreadable JSON or names another.

        Raises `StorageError` if the file does not exist (`<path>: does not exist`), and
        `UnsafePath` if the path is a symlink: guardd could not switch it either. The file
        is replaced atomically, so this never waits for a switch.
        """
        try:
            document = _parse(read_bytes(self.path))
        except FileNotFoundError:
            raise StorageError(f"{self.path}: does not exist") from None
        except ValueError:
            return None
        value = document.get(self.key)
        return value if is_color(value) else None

    async def switch(self, to: Color) -> None:
        """Write *to* into the file, reload if configured; put the old file back on failure."""
        async with self._lock:
            original, new = self._render(to)
            await self._apply(original, new, to)

    async def restore(self, previous: Color) -> None:
        """Put back the bytes the last switch replaced (else set *previous*); reload."""
        async with self._lock:
            current, new = self._render(previous)
            replaced = self._replaced
            if replaced is not None and replaced[1] == current and replaced[0] is not None:
                new = replaced[0]  # the file exactly as it was, every other key included
            await self._apply(current, new, previous)
            self._replaced = None

    async def reapply(self) -> None:
        """Run the reload command once, so the app reads the file again; no-op without one
        (a repair from the decision path is not retried: `NginxSwitcher.reapply`)."""
        async with self._lock:
            try:
                with anyio.fail_after(self.timeout):
                    await self._reload(retry=False)
            except BaseException as exc:
                error = switch_error_for(exc, "reloading the app", self.timeout, "reload")
                if error is exc:
                    raise
                raise error from exc

    async def _apply(self, original: bytes | None, new: bytes, to: Color) -> None:
        """Do `switch` with the lock held: write *new* over *original*, reload."""
        if self.reload_command:
            self._write(self.marker, to.encode())
        progress = _Progress()
        try:
            with anyio.fail_after(self.timeout):
                self._write(self.path, new)
                progress.written = True
                await self._step(STEP_WRITTEN)
                if self.reload_command:
                    progress.reload_attempted = True
                    await self._reload()
                    await self._step(STEP_RELOADED)
        except BaseException as exc:
            step = "reload" if progress.reload_attempted else "switch"
            error = await undo_failed_switch(
                exc, lambda: self._undo(original, progress), f"switch to {to}", self.timeout, step
            )
            if error is exc:
                raise
            raise error from exc
        self._clear_marker()
        self._replaced = (original, new)
        log.info("state_file_switched", to=to, path=str(self.path))

    async def recover(self) -> None:
        """Clear a crashed write's temp files; reload if a switch was in flight."""
        async with self._lock:
            remove_debris(self.path)
            remove_debris(self.marker)
            if not self.marker.is_file():
                return
            if self.reload_command:
                await self._reload()
            self._clear_marker()
            log.info("state_file_recovered", path=str(self.path))

    def _render(self, to: Color) -> tuple[bytes | None, bytes]:
        """Return the file's current bytes (None if missing) and its bytes with *to* set."""
        try:
            original: bytes | None = read_bytes(self.path)
        except FileNotFoundError:
            original = None
        except (UnsafePath, StorageError) as exc:
            raise SwitchRejected(str(exc)) from exc
        try:
            document = _parse(original) if original is not None else {}
        except ValueError as exc:
            # Rewriting a file we cannot read would destroy the app's other keys.
            raise SwitchRejected(f"{self.path}: {exc}; refusing to overwrite it") from exc
        document[self.key] = to
        # Keep the file's look: one line stays one line, an indented file stays indented.
        indent = 2 if original is None or b"\n" in original.strip() else None
        return original, (json.dumps(document, indent=indent, ensure_ascii=False) + "\n").encode()

    async def _undo(self, original: bytes | None, progress: _Progress) -> str | None:
        """Put the original file back, reload if one was tried; return what went wrong."""
        problem = None
        try:
            if progress.written:
                if original is None:
                    self.path.unlink(missing_ok=True)
                    fsync_dir(self.path.parent)
                else:
                    atomic_write(self.path, original)
        except (OSError, StorageError, UnsafePath) as exc:
            problem = f"restoring {self.path} failed: {exc}"
        else:
            if progress.reload_attempted:
                try:
                    await self._reload()
                except CommandFailed as exc:
                    # The marker stays, so recover() reloads again at the next start.
                    problem = f"{self.path} is restored but reloading failed: {exc}"
        if problem:
            log.error("state_file_undo_incomplete", problem=problem)
            return problem
        self._clear_marker()
        return None

    async def _reload(self, *, retry: bool = True) -> None:
        """Run the reload command, retrying failures under the retry policy (unless `retry`
        is false)."""
        if self.reload_command:
            await run_command(
                self.reload_command,
                timeout=self.timeout,
                retry=self.retry if retry else None,
                what="app reload",
            )

    async def _step(self, name: str) -> None:
        """Tell the step hook, if any, that step *name* is done."""
        if self.on_step is not None:
            await self.on_step(name)

    def _write(self, path: Path, data: bytes) -> None:
        """Write *path* atomically, as a `SwitchError` if it cannot be written."""
        try:
            atomic_write(path, data)
        except UnsafePath as exc:
            raise SwitchRejected(str(exc)) from exc
        except StorageError as exc:
            raise SwitchError(str(exc)) from exc

    def _clear_marker(self) -> None:
        """Remove the in-flight marker, if there is one."""
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()
            fsync_dir(self.path.parent)


def _parse(data: bytes) -> dict[str, Any]:
    """Parse a JSON object; raise `ValueError` for anything else."""
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 -- the file's content, not a type
    return document
