"""What guardd's commands do when the reader of their output goes away."""

from __future__ import annotations

import os
import sys
from typing import Final

#: The exit status of a command whose reader left before it had written everything
#: (`guardctl history | head`, `guardd replay --json | head -1`).
READER_LEFT: Final = 1


def reader_left() -> int:
    """Say nothing more, and let the interpreter's final flush of stdout go to /dev/null
    instead of raising `BrokenPipeError` again; returns `READER_LEFT`.

    Call it from `except BrokenPipeError:` around everything a command writes on stdout.
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return READER_LEFT
