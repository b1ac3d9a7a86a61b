"""A package's names taken from its modules on first use (a module `__getattr__`,
PEP 562), so that importing the package loads none of them.

`guardd.core` and `guardd.signals` use it: guardctl reads the colors through
`guardd.core.types` without the decision core, and a config loads only the signal
adapters it names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def from_modules(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each name of `names` is looked up in the
    module it maps to (imported then); any other name raises `AttributeError`."""

    def attribute(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return attribute
