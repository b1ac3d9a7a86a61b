"""The single source of guardd's version."""

__version__ = "0.1.0"
