"""What /proc says of a process the test started, read once and race-free."""

from __future__ import annotations

from pathlib import Path


def is_gone(pid: int) -> bool:
    """Whether *pid* has exited; a zombie awaiting its reaper counts as gone.

    A process can exit between the open and the read of its stat file: the open then
    succeeds and the read fails with ESRCH (`ProcessLookupError`), not ENOENT, so both
    mean gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


# A command prefix that starts the command with SIGINT at its default: a shell without
# job control starts its background jobs with SIGINT ignored, every child inherits that,
# and Python then installs no KeyboardInterrupt handler, so a test's Ctrl-C would go
# unheard when the suite itself runs as such a job (`make test &` in a script).
INTERRUPTIBLE = ("env", "--default-signal=INT")
