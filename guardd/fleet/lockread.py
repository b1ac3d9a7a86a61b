"""The fleet's QoS lock read straight from etcd, for `guardctl qos status --config`.

Standard library only (urllib), like the rest of guardctl's read path: it runs in deploy
scripts and CI gates and must answer fast. One `kv/range` of `<prefix>/qos` on the first
member that answers, each bounded by `timeout` seconds; `FleetLockUnknown` when none did
or the `[fleet]` table cannot say where etcd is (fail closed: never "unlocked").
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FleetLockUnknown", "fleet_prefix", "read_fleet_lock"]

# The fleet's lock is a small JSON object: an answer larger than this is not one it wrote.
_MAX_BODY = 1024 * 1024


class FleetLockUnknown(Exception):
    """Whether the fleet's lock is held cannot be told; the message says why."""


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
        doc = json.loads(r.read(_MAX_BODY + 1)[:_MAX_BODY])
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
        raise FleetLockUnknown(f"[fleet] etcd: not an http(s) URL: {odd[0]!r}")

    def path(key: str) -> Path | None:
        value = fleet.get(key)
        return Path(value) if isinstance(value, str) and value else None

    context = None
    if any(e.startswith("https://") for e in endpoints):
        ca, cert, key = path("ca_file"), path("cert_file"), path("key_file")
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    qos_key = fleet_prefix(fleet, instance) + "/qos"
    body = {"key": base64.b64encode(qos_key.encode()).decode()}
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
        except (OSError, ValueError, TypeError, urllib.error.URLError) as e:
            problems.append(f"{base}: {type(e).__name__}")
            continue
        kvs = doc.get("kvs") or []
        if not kvs:
            return {
                "locked": False,
                "reason": None,
                "until": None,
                "locked_at": None,
                "by": None,
                "source": "fleet",
            }
        try:
            lock = json.loads(base64.b64decode(kvs[0].get("value", "")))
        except ValueError:
            lock = None
        if not isinstance(lock, dict) or not isinstance(lock.get("locked"), bool):
            raise FleetLockUnknown(f"{qos_key} in etcd is not a lock guardd wrote")
        return {**lock, "source": "fleet"}
    raise FleetLockUnknown("no etcd member answered: " + "; ".join(problems))
