"""Signals at the edge: adapters that turn a source of evidence into per-color `Reading`s.

The rules (`guardd.core.signals`) read a `Reading` per signal and color and never ask where
it came from; each module here reads one kind of source.
"""

from guardd.signals.access_log import AccessLogSignal, AccessLogSpec

__all__ = ["AccessLogSignal", "AccessLogSpec"]
