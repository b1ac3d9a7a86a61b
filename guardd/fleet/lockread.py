"""The fleet's QoS lock read straight from etcd, for `guardctl qos status --config`.

Standard library only (urllib), like the rest of guardctl's read path: it runs in deploy
scripts and CI gates and must answer fast. One `kv/range` of `<prefix>/qos` on the first
member that answers, each bounded by `timeout` seconds; `FleetLockUnknown` when none did
or the `[fleet]` table cannot say where etcd is or its TLS files cannot be loaded (fail
closed: never "unlocked").
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from guardd import untrusted_json
from guardd.core.types import COLORS

__all__ = [
    "FleetLockUnknown",
    "fleet_prefix",
    "gate",
    "holders",
    "holding",
    "lock_problem",
    "missing_lock",
    "read_fleet_lock",
    "unconverged",
    "undersized",
]

# The fleet's lock is a small JSON object: an answer larger than this is not one it wrote.
_MAX_BODY = 1024 * 1024


class FleetLockUnknown(Exception):
    """Whether the fleet's lock is held cannot be told; the message says why."""


def unconverged(
    desired: Mapping[str, Any] | None,
    live: Mapping[str, Mapping[str, Any]],
    lost: Mapping[str, Mapping[str, Any]],
    twins: Mapping[str, Mapping[str, Any]] | None = None,
) -> str | None:
    """Why the fleet has not converged on its desired color, else None.

    `desired`: the `desired` key's document; `live`: the `nodes/<node>` records by node;
    `lost`: the `seen/<node>` records of nodes without a live one (their lease expired);
    `twins`: the `clash/<node>` records of a second guardd running under a node's name.
    A live node (or twin) serving another color, or a lost one last seen serving another,
    is behind.
    While one is, a rollback's guard window goes on and no gate says "deploys allowed":
    some users still meet the color the fleet moved away from.
    """
    if desired is None:
        return None  # no decision yet: a new fleet serves what it serves
    want = desired.get("color")
    generation = desired.get("generation")
    if want not in COLORS or not isinstance(generation, int) or isinstance(generation, bool):
        # Not a decision guardd wrote (a hand's edit, damage): which color users should
        # meet cannot be told, so the fleet is not known to have converged.
        return (
            "the fleet's desired color in etcd is not a decision guardd wrote (no color blue "
            "or green with a generation): `guardctl rollback` (or `switch --force`) writes a "
            "new one"
        )
    behind = [
        f"node {name} serves {doc.get('serving')}"
        for name, doc in sorted(live.items())
        if doc.get("serving") != want
    ]
    behind += [
        f"node {name} (lost) last served {doc.get('serving')}"
        for name, doc in sorted(lost.items())
        if doc.get("serving") != want
    ]
    behind += [
        f"a second guardd named {name} serves {doc.get('serving')}"
        for name, doc in sorted((twins or {}).items())
        if doc.get("serving") != want
    ]
    if not behind:
        return None
    return f"the fleet has not converged on {want}: " + "; ".join(behind)


def undersized(members: Collection[str], size: int, prefix: str) -> str | None:
    """Why the fleet under `prefix` is not known to be the configured one, else None.

    `members`: the nodes seen there (`nodes/<node>` and `seen/<node>` records, and the
    asking node itself when it is one); `size`: `fleet.size`. Fewer than `size` is what a
    mistyped `fleet.prefix` or an `etcd` of another fleet looks like (an empty prefix,
    and a node there that would make a fleet of its own whose lock no one else takes),
    or a fleet whose other nodes have not started yet: either way its lock is UNKNOWN.
    """
    if len(members) >= size:
        return None
    names = ", ".join(sorted(members)) or "none"
    return (
        f"only {len(members)} of the fleet's {size} nodes (fleet.size) seen under {prefix} "
        f"({names}): a mistyped fleet.prefix or fleet.etcd, or the other nodes not started "
        "yet (fleet.size = 1 for a fleet of one node)"
    )


def holders(live: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The nodes of `live` (the `nodes/<node>` records by node) whose record says they hold
    (`state` `hold`), sorted."""
    return sorted(n for n, doc in live.items() if doc.get("state") == "hold")


def holding(live: Mapping[str, Mapping[str, Any]], *, besides: str | None = None) -> str | None:
    """Why deploys wait for nodes that hold (`holders`), else None. One that holds makes no
    automatic switch until an operator resumes, and keeps its hold's lock in its own lock
    file: every node's gate says so, not only that node's own (`besides`: the asking node,
    whose own lock says it)."""
    names = [n for n in holders(live) if n != besides]
    if not names:
        return None
    who = f"node {names[0]} holds" if len(names) == 1 else f"nodes {', '.join(names)} hold"
    return (
        f"{who}: no automatic switch there until an operator resumes (`guardctl status` "
        "there says why)"
    )


def gate(lock: dict[str, Any], *why: str | None) -> dict[str, Any]:
    """`lock` (a `qos status --json` answer) as a gate must read it while something other
    than the lock itself keeps deploys out (`why`: the fleet has not converged, from
    `unconverged`; a node holds, from `holding`; None: not that): locked, and the reason
    says so first, also over a lock that holds anyway (whose end would not open the gate).
    """
    behind = "; ".join(w for w in why if w is not None) or None
    if behind is None:
        return lock
    if not lock.get("locked"):
        return {"locked": True, "reason": behind, "until": None, "locked_at": None,
                "by": None, "source": lock.get("source", "fleet")}  # fmt: skip
    return {**lock, "reason": f"{behind} (and the QoS lock holds: {lock.get('reason')})"}


def fleet_prefix(fleet: Mapping[str, Any], instance: str) -> str:
    """Where the fleet's keys live: `prefix`, else `/guardd/<instance>`."""
    prefix = fleet.get("prefix")
    return prefix.rstrip("/") if isinstance(prefix, str) and prefix else f"/guardd/{instance}"


def _post(
    url: str,
    body: dict[str, Any],
    context: ssl.SSLContext | None,
    timeout: float,
    headers: dict[str, str],
) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - the configured etcd URLs (http or https)
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    # http(s) only: read_fleet_lock refuses any other scheme before a request is made.
    with urllib.request.urlopen(request, timeout=timeout, context=context) as r:  # noqa: S310  # nosec B310
        doc = untrusted_json.loads(r.read(_MAX_BODY + 1)[:_MAX_BODY])
    if not isinstance(doc, dict):
        raise TypeError("not a JSON object")
    return doc


def read_fleet_lock(fleet: Mapping[str, Any], instance: str, *, timeout: float) -> dict[str, Any]:
    """The fleet's lock in the `qos status --json` shape, with `"source": "fleet"`.

    `fleet`: the config's raw `[fleet]` table. Raises `FleetLockUnknown`.
    """
    endpoints = fleet.get("etcd")
    if (
        not isinstance(endpoints, list)
        or not endpoints
        or not all(isinstance(e, str) for e in endpoints)
    ):
        raise FleetLockUnknown("[fleet] etcd is not a list of URLs")
    # The table is read raw (guardctl does not validate the config): a `file:` or other
    # scheme would have urllib open something that is not etcd.
    odd = [e for e in endpoints if not e.startswith(("http://", "https://"))]
    if odd:
        raise FleetLockUnknown(f"[fleet] etcd: not an http(s) URL: {_shown(odd[0])!r}")

    def path(key: str) -> Path | None:
        value = fleet.get(key)
        return Path(value) if isinstance(value, str) and value else None

    context = None
    if any(e.startswith("https://") for e in endpoints):
        ca, cert, key = path("ca_file"), path("cert_file"), path("key_file")
        try:
            context = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert is not None and key is not None:
                context.load_cert_chain(str(cert), str(key))
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            # Without its TLS files etcd cannot be asked: UNKNOWN, not a traceback.
            named = ", ".join(
                f"{k} {v}"
                for k, v in (("ca_file", ca), ("cert_file", cert), ("key_file", key))
                if v is not None
            )
            raise FleetLockUnknown(
                f"[fleet] TLS files cannot be used ({named or 'the system CAs'}): "
                f"{getattr(e, 'strerror', None) or e}"
            ) from None
    prefix = fleet_prefix(fleet, instance) + "/"
    # The whole prefix (a few small keys): the lock, and whether the fleet converged.
    body = {
        "key": base64.b64encode(prefix.encode()).decode(),
        "range_end": base64.b64encode(prefix[:-1].encode() + b"0").decode(),  # "/" + 1
    }
    problems = []
    for endpoint in endpoints:
        base = endpoint.rstrip("/")
        try:
            headers = {}
            username, password_file = fleet.get("username"), path("password_file")
            if isinstance(username, str) and password_file is not None:
                password = password_file.read_text().strip()  # never printed
                token = _post(
                    f"{base}/v3/auth/authenticate",
                    {"name": username, "password": password},
                    context,
                    timeout,
                    {},
                ).get("token")
                headers["Authorization"] = str(token or "")
            doc = _post(f"{base}/v3/kv/range", body, context, timeout, headers)
        except (
            OSError,
            ValueError,
            TypeError,
            urllib.error.URLError,
            # Something that is not an HTTP server at the URL (a bad status line, a cut body).
            http.client.HTTPException,
        ) as e:
            problems.append(f"{_shown(base)}: {_why(e)}")
            continue
        if not isinstance(doc.get("header"), dict) or not isinstance(doc.get("kvs", []), list):
            # Every etcd answer has a header (cluster, revision): anything else is not etcd.
            problems.append(f"{_shown(base)}: not an answer of etcd's")
            continue
        return _answer(_values(doc.get("kvs") or [], prefix), fleet, prefix)
    raise FleetLockUnknown("no etcd member answered: " + "; ".join(problems))


def _size(fleet: Mapping[str, Any]) -> int:
    """`fleet.size` from the raw table (2 when not set, as the config's default).
    Raises `FleetLockUnknown` when it is not a whole number of at least 1: the fleet
    cannot then be told to be the configured one."""
    size = fleet.get("size", 2)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise FleetLockUnknown("[fleet] size is not a whole number of at least 1")
    return size


def _answer(keys: Mapping[str, Any], fleet: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The gate's answer from the keys under `prefix` (ending in "/"), cut off and parsed
    (`_values`). Raises `FleetLockUnknown`."""
    if "qos" not in keys:
        # A fleet's leader keeps the key: none is a mistyped prefix, a fleet not started
        # yet, or a store that lost it; never "unlocked".
        raise FleetLockUnknown(missing_lock(prefix + "qos"))
    lock = keys["qos"]
    if (problem := lock_problem(lock)) is not None:
        raise FleetLockUnknown(f"{prefix}qos in etcd: {problem}")
    live = _under(keys, "nodes/")
    lost = {k: v for k, v in _under(keys, "seen/").items() if k not in live}
    if (few := undersized(live.keys() | lost.keys(), _size(fleet), prefix[:-1])) is not None:
        raise FleetLockUnknown(f"{few}; the fleet's QoS lock is unknown")
    desired = keys.get("desired")
    behind = unconverged(
        # Present but not an object (garbled): a decision that cannot be read.
        (desired if isinstance(desired, dict) else {}) if "desired" in keys else None,
        live,
        lost,
        _under(keys, "clash/"),
    )
    return gate({"locked_at": None, "by": None, **lock, "source": "fleet"}, behind, holding(live))


def _why(e: BaseException) -> str:
    """What went wrong with one member, in words an operator can act on: the HTTP status
    (an auth failure is 401 or 400), or the socket's error (connection refused), never a
    body or a URL (either may hold a secret)."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTPError: HTTP {e.code}"
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, OSError) and reason.strerror:
        return f"{type(e).__name__}: {reason.strerror}"
    return type(e).__name__


def _shown(url: str) -> str:
    """`url` as guardctl may print it: scheme, host and port only. guardctl reads the
    `[fleet]` table unvalidated, and a URL with credentials in it (`user:pw@`, `?token=`),
    which `check-config` refuses, must not reach a CI log through an error message."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(an etcd URL that cannot be read)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}"


def missing_lock(qos_key: str) -> str:
    """Why there is no `qos` key: what a gate says, UNKNOWN (never "no lock")."""
    return (
        f"the fleet's QoS lock is not in etcd ({qos_key}): a mistyped fleet.prefix, a fleet "
        "whose leader has not written it yet, or a store that lost it"
    )


def lock_problem(doc: object) -> str | None:
    """Why `doc` (the `qos` key's value, parsed) is not a lock or a release guardd wrote,
    else None. guardd's always name who wrote them (`by`), and a release says when it was
    written (`released_at`): anything less (`{"locked": false}` put by hand) is read as
    UNKNOWN, never as a release that would end every node's lock."""
    if not isinstance(doc, dict) or not isinstance(doc.get("locked"), bool):
        return "not a lock guardd wrote"
    if not isinstance(doc.get("by"), str) or not doc["by"]:
        return "a lock or a release that names no one (no `by`): not one guardd wrote"
    if not doc["locked"] and not isinstance(doc.get("released_at"), str):
        return "a release without the time it was written (no `released_at`): not one guardd wrote"
    return None


def _values(kvs: list[Any], prefix: str) -> dict[str, Any]:
    """The keys under `prefix` (the prefix cut off), their values parsed as JSON (None
    when a value is not JSON)."""
    out: dict[str, Any] = {}
    for kv in kvs:
        if not isinstance(kv, dict):
            continue
        try:
            key = base64.b64decode(kv.get("key", "")).decode()
        except ValueError:
            continue
        try:
            value = untrusted_json.loads(base64.b64decode(kv.get("value", "")))
        except ValueError:
            value = None
        out[key.removeprefix(prefix)] = value
    return out


def _under(keys: Mapping[str, Any], part: str) -> dict[str, dict[str, Any]]:
    """The records under `part` (`nodes/`, `seen/`) by node; any that is no object is left
    out."""
    return {
        k[len(part) :]: v for k, v in keys.items() if k.startswith(part) and isinstance(v, dict)
    }
