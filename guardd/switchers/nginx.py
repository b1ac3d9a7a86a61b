"""Switch nginx between colors by swapping the symlink its config includes.

nginx includes one file, the *active link*, a symlink to the upstream file of one
color. A switch points the link at the other color's file, has nginx test the result
and reloads it. The steps, in order, each followed by the step hook:

1. ``link_written``: the undo record (``.<link>.guardd-old``, a copy of the current
   link) and the new link (``.<link>.guardd-new``) are written beside the active link.
2. ``renamed``: the new link is renamed over the active link, atomically.
3. ``tested``: ``test_command`` runs (the hook hears of it whatever the verdict).
   ``nginx -t`` only ever reads the config that includes the *active* link, so
   renaming first is what lets it test the new target without a second, hand-made
   config that could drift from the real one. If nginx rejects it, the old link is
   put back before anything is reloaded: nginx never loads a rejected target, and
   the window in which the link names one is closed by ``recover()`` after a crash,
   because the undo record says a switch was in flight.
4. ``reloaded``: ``reload_command`` runs; then the undo record is removed, which
   commits the switch. Until then `read_active()` reports the record's color.

On any failure (rejection, a reload that keeps failing, the switch running past
``timeout`` with the hooks included, cancellation) the old link is put back and, if
a reload was attempted, nginx is reloaded onto it, before the error is raised; the
undo gets its own ``timeout``. The undo record stays until that reload succeeds.

A switch that committed but did not verify through the front door is taken back with
``restore()``: the link it replaced is put back (the same steps, so tested and reloaded).
``reapply()`` tests the active link and reloads nginx onto it, for when nginx may be
serving something other than what the link names.

After a ``kill -9`` at any point, ``recover()`` reads the debris: a pending new link
was never in force and is removed; an undo record means a switch was in flight, so
the active link is tested and the switch finished (reload) if nginx accepts it, or
undone (old link back, test, reload) if not. Either way the link ends on a target
nginx accepts and nginx runs it.
"""

from __future__ import annotations

import contextlib
import errno
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from guardd.commands import CommandResult, RetryPolicy, run_command
from guardd.exceptions import (
    CommandFailed,
    StorageError,
    SwitchError,
    SwitchRefused,
    SwitchRejected,
)
from guardd.fsutil import fsync_dir, kind_of, not_regular
from guardd.switchers import (
    STEP_LINK_WRITTEN,
    STEP_RELOADED,
    STEP_RENAMED,
    STEP_TESTED,
    Color,
    StepHook,
    switch_error_for,
)
from guardd.switchers._undo import undo_failed_switch

__all__ = ["NginxSwitcher"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Progress:
    """How far a switch got, so an undo does exactly what is needed."""

    renamed: bool = False
    testing: bool = False
    reload_attempted: bool = False


class NginxSwitcher:
    """Moves traffic by pointing nginx's included upstream symlink at a color's file."""

    def __init__(
        self,
        *,
        active_link: Path,
        targets: Mapping[Color, Path],
        test_command: Sequence[str],
        reload_command: Sequence[str],
        timeout: float,
        retry: RetryPolicy | None,
        on_step: StepHook | None = None,
    ) -> None:
        self.active_link = active_link
        # Links hold absolute paths: a relative one would be read from the link's
        # directory, not from guardd's working directory.
        self.targets: dict[Color, Path] = {c: p.absolute() for c, p in targets.items()}
        self.test_command = list(test_command)
        self.reload_command = list(reload_command)
        self.timeout = timeout
        self.retry = retry
        self.on_step = on_step
        self.pending_link = active_link.with_name(f".{active_link.name}.guardd-new")
        self.undo_link = active_link.with_name(f".{active_link.name}.guardd-old")
        self._lock = anyio.Lock()
        # The link content the last committed switch replaced, and the color it went to:
        # what `restore()` puts back when that switch does not verify.
        self._replaced: tuple[Path, Color] | None = None

    async def read_active(self) -> Color | None:
        """Return the color whose target file the active link resolves to, else None.

        While a switch is in flight (or a crash left its undo record), the record's
        color is the committed truth and is returned instead. Never waits for a switch.
        Raises `StorageError` when there is no link to read: the active link does not
        exist, or is not a symlink (`<path>: not a symlink (a regular file)`).
        """
        color = self._color_on_disk()
        if color is None:
            try:
                mode = self.active_link.lstat().st_mode
            except FileNotFoundError:
                raise StorageError(f"{self.active_link}: does not exist") from None
            except OSError as exc:
                raise StorageError(f"{self.active_link}: cannot be read: {exc.strerror}") from None
            if not stat.S_ISLNK(mode):
                raise StorageError(f"{self.active_link}: not a symlink ({kind_of(mode)})")
        return color

    async def switch(self, to: Color) -> None:
        """Point the active link at *to*'s file, test, reload; undo and raise on failure."""
        async with self._lock:
            if self._has_debris():
                # A crash nobody recovered from: settle it before building on it.
                await self._recover()
            _check_target(self.targets[to], to)
            await self._move(self.targets[to], to)

    async def restore(self, previous: Color) -> None:
        """Put back the link the last switch replaced (else *previous*'s file); test, reload."""
        async with self._lock:
            if self._has_debris():
                await self._recover()
            content = self.targets[previous]
            replaced = self._replaced
            if replaced is not None and replaced[1] == self._color_on_disk():
                content = replaced[0]  # the link exactly as it was, however it was written
            await self._move(content, previous)
            self._replaced = None

    async def reapply(self) -> None:
        """Test the active link and reload nginx onto it, once; the link is not touched.

        Not retried: a repair guardd tries of its own accord, from the decision path, and
        a rollback that the active color's failure calls for waits behind it. One that
        fails is journaled, and guardd holds if the mismatch stays.
        """
        async with self._lock:
            step = "reload"  # a rejection says "test" by itself
            try:
                if self._has_debris():
                    await self._recover()  # tests, and reloads what it settles on
                step = "test"
                with anyio.fail_after(self.timeout):
                    result = await self._test(retry=False)
                    _raise_if_rejected(result, f"nginx rejects the active link {self.active_link}")
                    step = "reload"
                    await self._reload(retry=False)
            except BaseException as exc:
                error = switch_error_for(exc, "re-applying the active link", self.timeout, step)
                if error is exc:
                    raise
                raise error from exc
            log.info("nginx_reapplied", active=self._color_on_disk())

    async def test_target(self, to: Color) -> None:
        """Have `test_command` judge *to*'s file as the active link, without a reload.

        The new link is renamed into place, tested and the old one put back (the undo
        record covers a crash in between); nginx keeps running what it ran. Raises
        `SwitchRejected` when nginx rejects it, `SwitchError` when the test cannot run.
        """
        async with self._lock:
            if self._has_debris():
                await self._recover()
            _check_target(self.targets[to], to)
            if self._color_on_disk() == to:
                _raise_if_rejected(await self._test(), f"nginx rejects {self.targets[to]}")
                return
            self._write_links(self.targets[to])
            progress = _Progress()
            try:
                with anyio.fail_after(self.timeout):
                    self.pending_link.replace(self.active_link)
                    progress.renamed = True
                    result = await self._test()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._undo(progress)
            _raise_if_rejected(result, f"nginx rejected {self.targets[to]} for {to}")

    async def _move(self, target: Path, to: Color) -> None:
        """Do `switch` to the link content *target* with the lock held."""
        previous = self._write_links(target)
        progress = _Progress()
        try:
            with anyio.fail_after(self.timeout):
                await self._step(STEP_LINK_WRITTEN)
                self.pending_link.replace(self.active_link)
                progress.renamed = True
                fsync_dir(self.active_link.parent)
                await self._step(STEP_RENAMED)
                progress.testing = True
                result = await self._test()
                await self._step(STEP_TESTED)
                _raise_if_rejected(result, f"nginx rejected {target} for {to}")
                progress.reload_attempted = True
                await self._reload()
                await self._step(STEP_RELOADED)
        except BaseException as exc:
            step = (
                "reload" if progress.reload_attempted else "test" if progress.testing else "switch"
            )
            error = await undo_failed_switch(
                exc, lambda: self._undo(progress), f"switch to {to}", self.timeout, step
            )
            if error is exc:
                raise
            raise error from exc
        # Removing the undo record is what commits the switch.
        _remove(self.undo_link)
        fsync_dir(self.active_link.parent)
        self._replaced = (previous, to)
        log.info("nginx_switched", to=to, target=str(target))

    async def recover(self) -> None:
        """Finish or undo a switch a crash interrupted; leave the link on an accepted target.

        Raises `SwitchRejected` if nginx rejects the active link and no undo record
        names anything better (guardd does not overrule a hand-made change), and
        `CommandFailed` if the test or the reload cannot run.
        """
        async with self._lock:
            await self._recover()

    async def _recover(self) -> None:
        """Do `recover` with the lock held."""
        # A pending link was never renamed into force: it is only debris.
        _remove(self.pending_link)
        in_flight = self.undo_link.is_symlink()
        result = await self._test()
        if in_flight and not result.ok:
            rejected = _readlink(self.active_link)
            if _readlink(self.undo_link) != rejected:
                log.warning("nginx_recover_undo", rejected=rejected)
                self._restore_from_undo()
                result = await self._test()
            if not result.ok:
                # Neither the new link nor the old is accepted: the record has done its job.
                _remove(self.undo_link)
        _raise_if_rejected(result, f"nginx rejects the active link {self.active_link}")
        if in_flight:
            # nginx may run the old target or the new one; a reload makes it run what
            # the link names, and is harmless if it already did. The record goes only
            # after it, so a crash in between is settled again next time.
            await self._reload()
            _remove(self.undo_link)
            fsync_dir(self.active_link.parent)
            log.info("nginx_recovered", active=self._color_on_disk())

    async def _undo(self, progress: _Progress) -> str | None:
        """Put the previous link back, reload if one was tried; return what went wrong."""
        problem = None
        try:
            _remove(self.pending_link)
            if progress.renamed:
                self._restore_from_undo()
        except OSError as exc:
            problem = (
                f"restoring the previous link failed: {exc}; "
                "guardd finishes it at its next switch or start"
            )
        else:
            if progress.reload_attempted:
                try:
                    await self._reload()
                except CommandFailed as exc:
                    # The undo record stays, so the next switch or recover() reloads again.
                    problem = f"the previous link is back but reloading it failed: {exc}"
        if problem:
            log.error("nginx_undo_incomplete", problem=problem)
            return problem
        _remove(self.undo_link)
        fsync_dir(self.active_link.parent)
        log.info("nginx_switch_undone", active=self._color_on_disk())
        return None

    async def _test(self, *, retry: bool = True) -> CommandResult:
        """Run the test command; its "no" is deterministic, so only timeouts are retried
        (under the retry policy, unless `retry` is false)."""
        return await run_command(
            self.test_command,
            timeout=self.timeout,
            retry=self.retry if retry else None,
            what="nginx config test",
            check=False,
        )

    async def _reload(self, *, retry: bool = True) -> None:
        """Run the reload command, retrying failures under the retry policy (unless `retry`
        is false)."""
        await run_command(
            self.reload_command,
            timeout=self.timeout,
            retry=self.retry if retry else None,
            what="nginx reload",
        )

    async def _step(self, name: str) -> None:
        """Tell the step hook, if any, that step *name* is done."""
        if self.on_step is not None:
            await self.on_step(name)

    def _has_debris(self) -> bool:
        """Tell whether a switch left its links behind."""
        return self.undo_link.is_symlink() or self.pending_link.is_symlink()

    def _write_links(self, target: Path) -> Path:
        """Write the undo record (a copy of the active link), then the pending new link.

        Returns the active link's content before the switch.
        """
        # Refused before anything is written (`SwitchRefused`, step `switch`): no link to
        # keep as the undo record, and nothing nginx -t could have rejected.
        by_hand = (
            f"put a symlink to one of switch.targets there (ln -sfn TARGET {self.active_link}) "
            "and reload nginx: guardd adopts it"
        )
        try:
            previous = self.active_link.readlink()
        except FileNotFoundError:
            raise SwitchRefused(f"{self.active_link} does not exist; {by_hand}") from None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                kind = kind_of(self.active_link.lstat().st_mode)
                raise SwitchRefused(
                    f"{self.active_link} is not a symlink ({kind}); guardd only swaps "
                    f"symlinks: {by_hand}"
                ) from None
            raise SwitchError(f"{self.active_link}: {exc.strerror}") from exc
        try:
            # The record first: a pending link without a record would not be undone.
            _place_link(previous, self.undo_link)
            _place_link(target, self.pending_link)
            fsync_dir(self.active_link.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                _remove(self.pending_link)
                _remove(self.undo_link)
            raise SwitchError(
                f"cannot write links beside {self.active_link}: {exc.strerror}"
            ) from exc
        return previous

    def _restore_from_undo(self) -> None:
        """Put the undo record's content back as the active link, keeping the record."""
        # Copy rather than rename the record: until nginx has been reloaded onto the
        # restored link, the record is what tells recover() a reload is owed.
        _place_link(self.undo_link.readlink(), self.pending_link)
        self.pending_link.replace(self.active_link)
        fsync_dir(self.active_link.parent)

    def _color_on_disk(self) -> Color | None:
        """Map the undo record, else the active link, to a color by resolved path."""
        # The record can vanish between the check and the resolve (a switch
        # committing): then it names no color, and the active link is the answer.
        # This runs on every decision tick: the link's text is compared first (guardd writes
        # absolute targets), and paths are resolved only for a link made some other way.
        for link in (self.undo_link, self.active_link):
            try:
                text = str(link.readlink())
            except OSError:
                continue  # no such link (or not a link): the next one is the answer
            for color, target in self.targets.items():
                if text == str(target):
                    return color
            resolved = link.resolve()
            for color, target in self.targets.items():
                if target.resolve() == resolved:
                    return color
        return None


def _place_link(content: Path, at: Path) -> None:
    """Create a symlink holding *content* at *at*, replacing whatever entry is there."""
    _remove(at)
    at.symlink_to(content)


def _remove(path: Path) -> None:
    """Unlink *path* (never following it) if it exists."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _readlink(path: Path) -> Path | None:
    """Return a symlink's content, or None if *path* is missing or not a symlink."""
    try:
        return path.readlink()
    except OSError:
        return None


def _check_target(path: Path, color: Color) -> None:
    """Raise `SwitchRejected` when *path* is no regular file: nginx's test would read a
    FIFO there until `switch.timeout` ran out, and say nothing of why. Nothing is touched."""
    try:
        why = not_regular(path.stat().st_mode)
    except OSError as e:
        why = e.strerror or str(e)
    if why is not None:
        raise SwitchRejected(f"{color}'s target {path}: {why}")


def _raise_if_rejected(result: CommandResult, what: str) -> None:
    """Raise `SwitchRejected` with the test's first lines if it did not pass."""
    if not result.ok:
        said = result.stderr_head() or result.stdout.strip()[:500] or f"exit {result.returncode}"
        raise SwitchRejected(f"{what}: {said}")
