"""Probes: how guardd asks an upstream whether it is healthy."""

from guardd.probes.http import HttpProber, ProbeResult, ProbeSpec

__all__ = ["HttpProber", "ProbeResult", "ProbeSpec"]
