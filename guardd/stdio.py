"""What guardd's commands do when their output cannot reach its reader.

Every command that answers on stdout runs under `answering`: a reader that left
(`guardctl history | head`), a stdout that was closed before the command started
(`guardctl status >&-`) or that cannot take the bytes (a full disk, `> /dev/full`)
ends the command with exit 1, one line on stderr (none when the reader just left) and
never a traceback. Never 0: a CI gate that did not get the answer must not read "allowed".
"""

from __future__ import annotations

import errno
import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

#: The exit status of a command whose output did not reach its reader: the reader left
#: before it had written everything (`guardctl history | head`, `guardd replay --json |
#: head -1`), or stdout was closed or full.
READER_LEFT: Final = 1

# What a write to stdout itself fails with; any other OSError that reaches the top is a
# defect to show, not an output problem to hide.
_OUTPUT_ERRNOS: Final = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF, errno.EINVAL}
)


def reader_left() -> int:
    """Say nothing more, and let the interpreter's final flush of stdout go to /dev/null
    instead of raising `BrokenPipeError` again; returns `READER_LEFT`.

    Call it from `except BrokenPipeError:` around everything a command writes on stdout.
    """
    _silence_stdout()
    return READER_LEFT


def _silence_stdout() -> None:
    if sys.stdout is None:
        return
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        sys.stdout = Path(os.devnull).open("w")  # noqa: SIM115 - lives as long as the process
        return
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


def answering(prog: str, command: Callable[[], int]) -> int:
    """Run `command` (it writes its answer on stdout and returns the exit status); turn
    what can go wrong with stdout into `READER_LEFT`, as the module docstring says.

    `prog` names the command in the stderr line: `guardctl: cannot write the output: No
    space left on device`.
    """
    if sys.stdout is None or _closed(sys.stdout):
        print(f"{prog}: cannot write the output: stdout is closed", file=sys.stderr)
        return READER_LEFT
    try:
        code = command()
        sys.stdout.flush()
    except BrokenPipeError:
        return reader_left()
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS or e.filename is not None:
            raise
        print(f"{prog}: cannot write the output: {os.strerror(e.errno)}", file=sys.stderr)
        _silence_stdout()  # the interpreter's final flush would fail the same way
        return READER_LEFT
    return code


def _closed(stream: TextIO) -> bool:
    """Whether `stream`'s descriptor is closed (the shell's `>&-`: Python then still has a
    stdout object, over a descriptor that is not open)."""
    try:
        os.fstat(stream.fileno())
    except (OSError, ValueError):
        return True
    return False


def wait_unless_reader_left(stream: TextIO, seconds: float) -> None:
    """Sleep `seconds`, but raise `BrokenPipeError` as soon as the reader of `stream` (a
    pipe or socket) has gone: a watch that only writes on a change would otherwise
    outlive `| head -1` until the next change, maybe forever."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        fd = -1
    if fd < 0:
        time.sleep(seconds)
        return
    poller = select.poll()
    # No events asked for: poll still reports POLLERR/POLLHUP, which a pipe's write end
    # gets once its reader closed it; a file or terminal that stays open never does.
    poller.register(fd, 0)
    if poller.poll(seconds * 1000):
        raise BrokenPipeError(errno.EPIPE, "the reader of the output has gone")
