"""A command run the way a shell user or a CI step runs it, output redirected or piped."""

from __future__ import annotations

import subprocess


def redirected(redirect: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`argv` run by bash with `pipefail`, its stdout redirected or piped as `redirect` says
    (`>/dev/full`, `>&-`, `| head -1`); a pipeline's status is then the command's when the
    reader succeeded."""
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", f'"$@" {redirect}', "sh", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
