"""Default locations of config, state, socket and lock, shared by guardd and guardctl.

Only the standard library is imported here: guardctl must start fast.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path("/etc/guardd")


def _first_dir(variable: str, fallback: Path) -> Path:
    # systemd passes several directories colon-separated when a unit declares more than one.
    value = os.environ.get(variable, "")
    return Path(value.split(":")[0]) if value else fallback


def runtime_dir() -> Path:
    """`$RUNTIME_DIRECTORY` under systemd, else `/run/guardd`."""
    return _first_dir("RUNTIME_DIRECTORY", Path("/run/guardd"))


def state_dir(instance: str) -> Path:
    """`$STATE_DIRECTORY` under systemd, else `/var/lib/guardd/<instance>`."""
    return _first_dir("STATE_DIRECTORY", Path("/var/lib/guardd") / instance)


def control_socket(instance: str) -> Path:
    """The control socket of an instance."""
    return runtime_dir() / f"{instance}.sock"


def qos_lock_file(instance: str) -> Path:
    """The QoS lock file of an instance."""
    return runtime_dir() / f"{instance}.qos.lock"


def config_file(instance: str | None) -> Path:
    """`$GUARDD_CONFIG`, else `/etc/guardd/<instance>.toml`."""
    if env := os.environ.get("GUARDD_CONFIG"):
        return Path(env)
    return CONFIG_DIR / f"{instance or 'default'}.toml"
