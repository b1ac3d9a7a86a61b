"""Folders the tests share with other users."""

from __future__ import annotations

import shutil
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
