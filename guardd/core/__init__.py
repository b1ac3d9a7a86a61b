"""The pure core of guardd: window statistics, policy and the guard state machine.

Nothing here performs I/O or reads a clock: time arrives as an argument (monotonic
seconds), so every decision can be tested and replayed offline.

Each name is loaded from its module on first use: `guardctl` reads the vocabulary
(`guardd.core.types`) through the control protocol, and loading the machine, the
policy and the rules with it took a fifth of its start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardd._lazy import from_modules

if TYPE_CHECKING:
    from guardd.core.machine import Decision, GuardMachine, Hold, Rollback
    from guardd.core.policy import Policy, PolicySpec, Verdict
    from guardd.core.types import Color, Evidence, Outcome, Severity, State, other
    from guardd.core.window import SlidingWindow, WindowStats

_LAZY = {
    "Decision": "guardd.core.machine",
    "GuardMachine": "guardd.core.machine",
    "Hold": "guardd.core.machine",
    "Rollback": "guardd.core.machine",
    "Policy": "guardd.core.policy",
    "PolicySpec": "guardd.core.policy",
    "Verdict": "guardd.core.policy",
    "Color": "guardd.core.types",
    "Evidence": "guardd.core.types",
    "Outcome": "guardd.core.types",
    "Severity": "guardd.core.types",
    "State": "guardd.core.types",
    "other": "guardd.core.types",
    "SlidingWindow": "guardd.core.window",
    "WindowStats": "guardd.core.window",
}


__getattr__ = from_modules(__name__, _LAZY)


__all__ = [
    "Color",
    "Decision",
    "Evidence",
    "GuardMachine",
    "Hold",
    "Outcome",
    "Policy",
    "PolicySpec",
    "Rollback",
    "Severity",
    "SlidingWindow",
    "State",
    "Verdict",
    "WindowStats",
    "other",
]
