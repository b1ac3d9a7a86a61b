"""A small client of etcd's v3 JSON gateway (the `/v3/...` HTTP API on the client port).

Only what the fleet needs: leases (grant, one keepalive round), range, put, delete,
transactions and a watch (`/v3/watch`, one JSON message a line on a streamed answer). Keys
and values are text; the gateway wants them base64. Members are tried in turn: a connection
error or a 5xx moves on to the next one, and `EtcdUnavailable` is raised when none answered.
Every request is bounded by `timeout` seconds; a watch's stream by `idle` seconds between
two messages, and each message by `_MAX_BODY` bytes. The header of every answer about keys
and of a watch's start (etcd's cluster_id and the store's revision) is handed to
`on_header`, so that the caller can tell a store that went back (restored from a backup, or
a new cluster) from one that moved on.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from guardd import untrusted_json

__all__ = ["KV", "Compacted", "EtcdClient", "EtcdUnavailable", "Header", "prefix_end"]

# An etcd answer larger than this is not one the fleet wrote: refuse to read it all.
_MAX_BODY = 4 * 1024 * 1024


class EtcdUnavailable(Exception):
    """No etcd member answered (or every one refused): the fleet cannot be consulted."""


class Compacted(EtcdUnavailable):
    """A watch asked for revisions etcd has compacted away: read afresh, then watch again."""


class LeaseGone(EtcdUnavailable):
    """etcd answered that the lease a write named does not exist (it expired: this process
    was away longer than its TTL): grant another, etcd itself answers."""


@dataclass(frozen=True, slots=True)
class KV:
    """One key as etcd keeps it."""

    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Header:
    """What an etcd answer says of the store it came from.

    `cluster_id`: etcd's cluster (0 when the answer named none); `revision`: the store's
    revision as that member knew it when it answered (0 when none was given).
    """

    cluster_id: int
    revision: int


def header_of(doc: dict[str, Any]) -> Header:
    """The header of an answer (a lease keepalive's and a watch's sit under `result`)."""
    raw = doc.get("header")
    if not isinstance(raw, dict):
        result = doc.get("result")
        raw = result.get("header") if isinstance(result, dict) else None
    if not isinstance(raw, dict):
        return Header(0, 0)
    return Header(int(raw.get("cluster_id", 0) or 0), int(raw.get("revision", 0) or 0))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode(errors="replace")


def prefix_end(prefix: str) -> str:
    """The range end that makes a range cover every key starting with `prefix`."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


class EtcdClient:
    """etcd through its v3 JSON gateway, over httpx (one connection pool per client)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        username: str | None = None,
        password_file: Path | None = None,
    ) -> None:
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        verify: ssl.SSLContext | bool = True
        if ca_file is not None or cert_file is not None:
            verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if cert_file is not None and key_file is not None:
                verify.load_cert_chain(str(cert_file), str(key_file))
        self._client = httpx.AsyncClient(timeout=timeout, verify=verify)
        self._username = username
        self._password_file = password_file
        self._token: str | None = None
        self._current = 0  # the member that answered last: tried first
        #: Called with the header of every answer about keys (range, txn, put, delete) and
        #: of a watch's `created` message.
        self.on_header: Callable[[Header], None] | None = None

    def _saw(self, doc: dict[str, Any]) -> Header:
        header = header_of(doc)
        if self.on_header is not None:
            self.on_header(header)
        return header

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    def _members(self) -> list[tuple[int, str]]:
        """Every member as (index, base URL), the one that answered last first."""
        n = len(self.endpoints)
        return [
            ((self._current + i) % n, self.endpoints[(self._current + i) % n]) for i in range(n)
        ]

    async def _headers(self, base: str) -> dict[str, str]:
        """The headers of a request to `base`, authenticated first when credentials are set."""
        await self._authenticate(base)
        return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self, base: str) -> None:
        if self._username is None or self._password_file is None or self._token is not None:
            return
        # Read at each authentication, never kept in a log line or an error.
        password = self._password_file.read_text().strip()
        r = await self._client.post(
            f"{base}/v3/auth/authenticate", json={"name": self._username, "password": password}
        )
        if r.status_code != 200:
            raise EtcdUnavailable(f"etcd refused the credentials of {self._username}")
        self._token = str(r.json().get("token", ""))

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `/v3/<path>` on the first member that answers; its JSON answer.

        Raises `EtcdUnavailable` naming every member's failure when none answered.
        """
        problems = []
        for index, base in self._members():
            try:
                headers = await self._headers(base)
                r = await self._client.post(f"{base}/v3/{path}", json=body, headers=headers)
            except (httpx.HTTPError, OSError) as e:
                problems.append(f"{base}: {type(e).__name__}")
                continue
            if r.status_code >= 500 or len(r.content) > _MAX_BODY:
                problems.append(f"{base}: HTTP {r.status_code}")
                continue
            if r.status_code == 404 and b"lease not found" in r.content:
                # An answer, not a member away: etcd no longer has the lease a write named.
                self._current = index
                raise LeaseGone(f"{base}: etcd no longer has the lease (it expired)")
            if r.status_code == 401:
                self._token = None
                problems.append(f"{base}: HTTP 401")
                continue
            doc = r.json()
            if r.status_code != 200 or not isinstance(doc, dict):
                problems.append(f"{base}: HTTP {r.status_code} {str(doc)[:100]}")
                continue
            self._current = index
            if path.startswith("kv/"):
                # A lease's answer comes from the raft leader's own store, which may not have
                # applied what another member already answered: only the keys' answers count.
                self._saw(doc)
            return doc
        raise EtcdUnavailable("no etcd member answered: " + "; ".join(problems))

    async def grant(self, ttl: float) -> int:
        """A new lease of `ttl` seconds (rounded up to a whole second); its id."""
        doc = await self.call("lease/grant", {"TTL": max(1, round(ttl + 0.49))})
        return int(doc["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew `lease` once; its remaining TTL in seconds (0: it has expired)."""
        doc = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(doc.get("result", {}).get("TTL", 0))

    async def range(self, key: str, *, prefix: bool = False) -> tuple[int, list[KV]]:
        """The store's revision and the key (or every key under `key` when `prefix`)."""
        header, kvs = await self.read(key, prefix=prefix)
        return header.revision, kvs

    async def read(self, key: str, *, prefix: bool = False) -> tuple[Header, list[KV]]:
        """The answer's header and the key (or every key under `key` when `prefix`).

        A linearizable read: its revision is never below one a write already answered.
        """
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        doc = await self.call("kv/range", body)
        return header_of(doc), [
            KV(
                key=_unb64(kv.get("key")),
                value=_unb64(kv.get("value")),
                create_revision=int(kv.get("create_revision", 0)),
                mod_revision=int(kv.get("mod_revision", 0)),
                lease=int(kv.get("lease", 0)),
            )
            for kv in doc.get("kvs", [])
        ]

    async def watch(
        self, key: str, *, start_revision: int, idle: float, prefix: bool = True
    ) -> AsyncIterator[tuple[int, list[tuple[bool, KV]]]]:
        """Follow `key` (every key under it when `prefix`) from `start_revision` on.

        Yields (the revision the message reports, [(deleted, kv), ...]) for each message
        etcd streams, the first (`created`) with no change. Ends quietly when no message
        came for `idle` seconds, so the caller resumes from its last revision on a fresh
        connection; raises `Compacted` when `start_revision` is gone, `EtcdUnavailable`
        when no member accepted the watch or the stream broke or was cancelled.
        """
        request: dict[str, Any] = {"key": _b64(key), "start_revision": str(start_revision)}
        if prefix:
            request["range_end"] = _b64(prefix_end(key))
        timeout = httpx.Timeout(self.timeout, read=idle)
        problems = []
        for index, base in self._members():
            try:
                headers = await self._headers(base)
                async with self._client.stream(
                    "POST",
                    f"{base}/v3/watch",
                    json={"create_request": request},
                    headers=headers,
                    timeout=timeout,
                ) as r:
                    if r.status_code != 200:
                        problems.append(f"{base}: HTTP {r.status_code}")
                        continue
                    self._current = index
                    async for doc in _messages(r):
                        message = _watch_message(doc)
                        if (doc.get("result") or {}).get("created"):
                            self._saw(doc)  # the store's revision as the watch begins
                        yield message
            except httpx.ReadTimeout:
                return  # idle: the caller reconnects from its last revision
            except (httpx.HTTPError, OSError) as e:
                problems.append(f"{base}: {type(e).__name__}")
                continue
            raise EtcdUnavailable(f"the watch on {base} ended")
        raise EtcdUnavailable("no etcd member accepted the watch: " + "; ".join(problems))

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Write `key`; the store's revision after it."""
        doc = await self.call(
            "kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease)}
        )
        return int(doc.get("header", {}).get("revision", 0))

    async def delete(self, key: str, *, prefix: bool = False) -> None:
        """Delete `key` (or every key under it when `prefix`)."""
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        await self.call("kv/deleterange", body)

    async def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]]
    ) -> tuple[bool, int]:
        """Run `success` if every `compare` holds; (whether it ran, the store's revision)."""
        doc = await self.call("kv/txn", {"compare": compare, "success": success})
        return bool(doc.get("succeeded", False)), int(doc.get("header", {}).get("revision", 0))


def compare(key: str, target: str, value: int | str, result: str = "EQUAL") -> dict[str, Any]:
    """One txn comparison: `target` is CREATE, MOD, VERSION, LEASE or VALUE."""
    field = {
        "CREATE": "create_revision",
        "MOD": "mod_revision",
        "VERSION": "version",
        "LEASE": "lease",
        "VALUE": "value",
    }[target]
    return {
        "key": _b64(key),
        "target": target,
        "result": result,
        field: _b64(str(value)) if target == "VALUE" else str(value),
    }


def put_op(key: str, value: Any, *, lease: int = 0) -> dict[str, Any]:
    """A txn put; `value` is written as JSON unless it is text."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return {"request_put": {"key": _b64(key), "value": _b64(text), "lease": str(lease)}}


def delete_op(key: str) -> dict[str, Any]:
    """A txn delete of one key."""
    return {"request_delete_range": {"key": _b64(key)}}


async def _messages(r: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a streamed watch, one a line, none over `_MAX_BODY` bytes."""
    buffer = b""
    async for chunk in r.aiter_bytes():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                doc = untrusted_json.loads(line)
                if not isinstance(doc, dict):
                    raise EtcdUnavailable("the watch sent something other than a JSON object")
                yield doc
        if len(buffer) > _MAX_BODY:
            raise EtcdUnavailable("the watch sent a message larger than the fleet writes")
    if buffer.strip():
        doc = untrusted_json.loads(buffer)
        if isinstance(doc, dict):
            yield doc


def _watch_message(doc: dict[str, Any]) -> tuple[int, list[tuple[bool, KV]]]:
    if "error" in doc:
        raise EtcdUnavailable(f"the watch failed: {str(doc['error'])[:200]}")
    result = doc.get("result") or {}
    if result.get("compact_revision") not in (None, "0", 0):
        raise Compacted(f"etcd compacted the revisions up to {result['compact_revision']}")
    if result.get("canceled"):
        raise EtcdUnavailable(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
    revision = int(result.get("header", {}).get("revision", 0))
    changes = []
    for event in result.get("events") or []:
        kv = event.get("kv") or {}
        changes.append(
            (
                event.get("type") == "DELETE",
                KV(
                    key=_unb64(kv.get("key")),
                    value=_unb64(kv.get("value")),
                    create_revision=int(kv.get("create_revision", 0)),
                    mod_revision=int(kv.get("mod_revision", 0)),
                    lease=int(kv.get("lease", 0)),
                ),
            )
        )
    return revision, changes
