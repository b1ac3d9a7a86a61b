"""The pure core of guardd: window statistics, policy and the guard state machine.

Nothing here performs I/O or reads a clock: time arrives as an argument (monotonic
seconds), so every decision can be tested and replayed offline.
"""

from guardd.core.machine import Decision, GuardMachine, Hold, Rollback
from guardd.core.policy import Policy, PolicySpec, Verdict
from guardd.core.types import Color, Evidence, Outcome, Severity, State, other
from guardd.core.window import SlidingWindow, WindowStats

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
