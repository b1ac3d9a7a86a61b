"""Which upstream addresses are which color: how a request in nginx's log is attributed.

nginx writes the address it proxied to in `$upstream_addr`, as `ip:port` (a name in a
`server` line is resolved when nginx loads its config) or `unix:/path`. A color's
addresses are, in order of preference (docs/contract.md §2 `[signals.NAME]`):

1. the signal's own `addresses` table;
2. the `server` lines of the color's nginx switch target file;
3. the `host:port` of the color's probe URLs.

Names are resolved here the way nginx resolves them, once, when the runtime is built. An
address claimed by both colors is dropped from both: such a request is unattributed,
never guessed.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from guardd import fsutil
from guardd.core.types import COLORS, Color, other

_SERVER = re.compile(r"(?:^|[;{}\s])server\s+([^\s;]+)")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# An upstream file is a few lines; one of many megabytes is no upstream file, and its
# servers are read from its beginning only.
MAX_UPSTREAM_FILE_BYTES = 1024 * 1024


def server_lines(text: str) -> list[str]:
    """The addresses of the `server` lines of an nginx upstream file, comments removed."""
    bare = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return _SERVER.findall(bare)


def read_upstream_file(path: Path) -> str:
    """The text of an nginx upstream file, its first `MAX_UPSTREAM_FILE_BYTES` at most.

    Only a regular file is read: a FIFO planted there would block the read for ever, and
    a device would give bytes without end. Raises `OSError` (`strerror` says why).
    """
    with fsutil.open_regular(path) as f:
        return f.read(MAX_UPSTREAM_FILE_BYTES).decode(errors="replace")


def url_address(url: str) -> str | None:
    """`host:port` of an http(s) URL (the scheme's port when none is given)."""
    parts = urlsplit(url)
    if parts.hostname is None:
        return None
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return None if port is None else _join(parts.hostname, port)


def resolve(address: str) -> list[str]:
    """The `ip:port` forms nginx would log for `address` (`name:port`, `ip`, `unix:...`).

    A name that does not resolve yields nothing: its requests stay unattributed.
    """
    if address.startswith("unix:"):
        return [address]
    host, port = _split(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [_join(str(ip), port)]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return sorted({_join(str(info[4][0]), port) for info in infos})


def color_addresses(
    *,
    given: Mapping[Color, Iterable[str]] | None,
    targets: Mapping[Color, Path] | None,
    probe_urls: Mapping[Color, Iterable[str]],
) -> tuple[dict[Color, frozenset[str]], list[str]]:
    """Each color's addresses, and the problems met (unreadable files, shared addresses)."""
    problems: list[str] = []
    raw: dict[Color, list[str]] = {}
    for color in COLORS:
        if given is not None and color in given:
            raw[color] = list(given[color])
            continue
        path = targets.get(color) if targets else None
        if path is not None:
            try:
                found = server_lines(read_upstream_file(path))
            except OSError as e:
                problems.append(f"cannot read {path}: {e.strerror}")
                found = []
            if found:
                raw[color] = found
                continue
        raw[color] = [a for url in probe_urls.get(color, ()) if (a := url_address(url))]
    resolved = {c: {ip for a in raw[c] for ip in resolve(a)} for c in COLORS}
    shared = resolved["blue"] & resolved["green"]
    if shared:
        problems.append(
            f"{', '.join(sorted(shared))} belong to both colors: their requests are unattributed"
        )
    return {c: frozenset(resolved[c] - shared) for c in COLORS}, problems


def crossed_targets(
    targets: Mapping[Color, Path], probe_urls: Mapping[Color, Iterable[str]]
) -> dict[Color, str]:
    """Each color whose nginx target file proxies to the other color, and why it is judged so.

    A file is crossed when its `server` lines reach an address the other color's probes
    go to, and none that its own color's probes go to: a switch to that color would move
    traffic to the other one, and guardd would report the wrong color as serving. Only
    such positive evidence counts. A file that cannot be read (its own problem) or has
    no `server` line, an address both colors' probes share, and servers that none of
    the probes reach (a health port beside the traffic port, a name that does not
    resolve) prove nothing and are not judged.

    Returns {color: reason}, empty when no file is crossed.
    """
    probed = {c: _resolved(url_address(u) for u in probe_urls.get(c, ())) for c in COLORS}
    shared = probed["blue"] & probed["green"]
    crossed: dict[Color, str] = {}
    for color in COLORS:
        path = targets.get(color)
        try:
            servers = _resolved(server_lines(read_upstream_file(path))) if path else set()
        except OSError:
            continue
        theirs = servers & (probed[other(color)] - shared)
        if theirs and not servers & (probed[color] - shared):
            crossed[color] = (
                f"{path} proxies to {', '.join(sorted(theirs))}, where upstreams."
                f"{other(color)} is probed, and to no address of upstreams.{color}: "
                f"a switch to {color} would serve {other(color)}"
            )
    return crossed


def _resolved(addresses: Iterable[str | None]) -> set[str]:
    return {ip for a in addresses if a for ip in resolve(a)}


def _split(address: str) -> tuple[str, int]:
    if address.startswith("["):  # [::1]:9009
        host, _, port = address[1:].partition("]:")
        return host, int(port) if port.isdigit() else 80
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or ":" in host:
        return address.strip("[]"), 80  # nginx's default port for a server without one
    return host, int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
