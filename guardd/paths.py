"""Default locations of config, state, socket and lock, shared by guardd and guardctl.

Only the standard library is imported here: guardctl must start fast.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

CONFIG_DIR = Path("/etc/guardd")
STATE_ROOT = Path("/var/lib/guardd")
# The packaged, commented example of every key; not an instance.
EXAMPLE_CONFIG = "example"
# Instance names as guardd accepts them (config.py checks the same rule).
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _first_dir(variable: str, fallback: Path) -> Path:
    # systemd passes several directories colon-separated when a unit declares more than one.
    value = os.environ.get(variable, "")
    return Path(value.split(":")[0]) if value else fallback


def config_dir() -> Path:
    """`$CONFIGURATION_DIRECTORY` (set by systemd), else `/etc/guardd`."""
    return _first_dir("CONFIGURATION_DIRECTORY", CONFIG_DIR)


def runtime_dir() -> Path:
    """`$RUNTIME_DIRECTORY` under systemd, else `/run/guardd`."""
    return _first_dir("RUNTIME_DIRECTORY", Path("/run/guardd"))


def state_root() -> Path:
    """`$GUARDD_STATE_ROOT`, else `/var/lib/guardd`: the parent of every instance's state."""
    return _first_dir("GUARDD_STATE_ROOT", STATE_ROOT)


def state_dir(instance: str) -> Path:
    """`$STATE_DIRECTORY` under systemd, else `<state root>/<instance>`."""
    return _first_dir("STATE_DIRECTORY", state_root() / instance)


def control_socket(instance: str) -> Path:
    """The control socket of an instance."""
    return runtime_dir() / f"{instance}.sock"


def qos_lock_file(instance: str) -> Path:
    """The QoS lock file of an instance."""
    return runtime_dir() / f"{instance}.qos.lock"


def config_file(instance: str | None) -> Path:
    """`$GUARDD_CONFIG`, else `<config dir>/<instance>.toml`."""
    if env := os.environ.get("GUARDD_CONFIG"):
        return Path(env)
    return config_dir() / f"{instance or 'default'}.toml"


def is_socket(path: Path) -> bool:
    """Whether a Unix socket is at `path` (false when it cannot be looked at)."""
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def has_state(directory: Path) -> bool:
    """Whether `directory` is an instance's state: it holds state.json or events.jsonl.

    A directory that exists but cannot be searched (guardd's state is 0750) counts too:
    only guardd makes directories there.
    """
    try:
        if not stat.S_ISDIR(directory.stat().st_mode):
            return False
    except OSError:
        return False
    for name in ("state.json", "events.jsonl"):
        try:
            (directory / name).lstat()
        except FileNotFoundError:
            continue
        except OSError:
            return True
        return True
    return False


def _names(directory: Path, suffix: str) -> set[str]:
    try:
        entries = [entry.name for entry in directory.iterdir()]
    except OSError:
        return set()
    return {e.removesuffix(suffix) for e in entries if e.endswith(suffix)}


def instances() -> list[str]:
    """The instances on this host, sorted: every name with a config, a socket or a state.

    Looked for as `<config dir>/<name>.toml` (except the packaged example), a socket
    `<runtime dir>/<name>.sock`, and `<state root>/<name>/` holding state.json or
    events.jsonl. A place that cannot be listed contributes nothing.
    """
    found = {
        name
        for name in _names(config_dir(), ".toml")
        if name != EXAMPLE_CONFIG and (config_dir() / f"{name}.toml").is_file()
    }
    found |= {n for n in _names(runtime_dir(), ".sock") if is_socket(runtime_dir() / f"{n}.sock")}
    found |= {n for n in _names(state_root(), "") if has_state(state_root() / n)}
    return sorted(n for n in found if _INSTANCE_NAME.fullmatch(n))
