"""JSON read by tests, typed: what should be an object is checked to be one."""

from __future__ import annotations

import json
from typing import Any


def json_object(text: str | bytes) -> dict[str, Any]:
    """`text` parsed as JSON; AssertionError, quoting the text, unless it is an object."""
    doc = json.loads(text)
    assert isinstance(doc, dict), f"not a JSON object: {text[:200]!r}"
    return doc
