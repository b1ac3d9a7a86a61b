"""Folders the tests share with other users, and the Debian binaries they run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def shared_tmp_dir(prefix: str) -> Iterator[Path]:
    """A fresh folder that any uid (e.g. `nobody`) may enter but not write, removed after.

    pytest's own tmp folders are 0700, so a process run as another user cannot reach them.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


#: Where Debian puts daemons' binaries, besides PATH.
SYSTEM_DIRS = "/usr/sbin:/usr/local/sbin:/usr/bin:/usr/local/bin"


def debian_binary(binary: str, package: str, *, install: bool = True) -> str:
    """The path of `binary` (on PATH, else in the system dirs); if missing and `install`,
    apt-get Debian's `package` first (root only).

    Raises RuntimeError saying what is missing and why it was not installed.
    """
    found = shutil.which(binary) or shutil.which(binary, path=SYSTEM_DIRS)
    if found:
        return found
    if not install:
        raise RuntimeError(f"{binary} is not installed (Debian package {package})")
    if os.geteuid() != 0:
        raise RuntimeError(f"{binary} is not installed and we are not root to apt-get {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
        check=True,
        env=env,
        timeout=600,
    )
    found = shutil.which(binary) or shutil.which(binary, path=SYSTEM_DIRS)
    if not found:
        raise RuntimeError(f"installed {package} but no {binary} binary is on PATH")
    return found
