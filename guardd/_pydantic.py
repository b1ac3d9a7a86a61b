"""pydantic as guardd runs it: without plugins.

pydantic looks for plugins (the `pydantic` entry-point group) when it builds its first
validator, and hands each one every validation. guardd's config is validated by guardd
alone: a package installed beside it (an observability SDK registers such a plugin) must
not see a config, with its webhook URLs and tokens, nor change how it is read. Looking
costs too: pydantic imports `importlib.metadata` for it (with `email`, `zipfile`, `csv`
and the compression modules): 1.0 MiB of an idle daemon's resident memory (42.5 against
43.5 MiB with plain-HTTP probes, median of 3 runs of `python -m bench.idle_rss`).
`PYDANTIC_DISABLE_PLUGINS` skips the scan but not that import.

So pydantic's plugin lookup (`pydantic.plugin._loader.get_plugins`, pydantic 2.x) is
answered with none before any model is built. `tests/test_config.py` checks
that a fresh interpreter loading a config never imports `importlib.metadata` and that an
installed plugin never sees a config, so a
pydantic that looks elsewhere shows up there, not as a silent cost.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable
from typing import Any

_LOADER = "pydantic.plugin._loader"


def _none() -> Iterable[Any]:
    return ()


def without_plugins() -> None:
    """Make pydantic's plugin lookup find none, unless pydantic already looked.

    Call it before the first model class is defined. Once pydantic has loaded its own
    loader (another user of pydantic in the same process looked first), it is left as
    it is: its answer is already in use.
    """
    if _LOADER in sys.modules:
        return
    loader = types.ModuleType(_LOADER, "guardd: pydantic runs without plugins")
    loader.get_plugins = _none  # type: ignore[attr-defined]
    sys.modules[_LOADER] = loader
