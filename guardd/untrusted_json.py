"""JSON read from outside the process (files, sockets, etcd, HTTP answers): one way in.

`json.loads` raises `RecursionError`, not `ValueError`, for a document nested deeper than
its parser goes (a line of `[[[[...`): no `except ValueError` catches it, and one such line
in a journal, a lock file or an etcd value was a traceback.
"""

from __future__ import annotations

import json
from typing import Any


def loads(data: str | bytes | bytearray) -> Any:
    """`json.loads(data)`; raises `ValueError` (a `json.JSONDecodeError`, or one saying it
    is nested too deeply) for anything that is not a JSON document."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
