"""Bounded reads of an HTTP body for the signals that ask a server (prometheus, scrape).

guardd asks for an uncompressed body (a compressed one could expand past any bound inside
one chunk) and reads no more than a limit: a larger body is abandoned unread, and closing
the stream drops the connection.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx


class BodyRefused(Exception):
    """The body was not read: `why` is `compressed` (`coding` says how) or `too_large`
    (`declared` is the Content-Length when that alone was too large); `detail` says it."""

    def __init__(
        self, why: str, detail: str, *, coding: str | None = None, declared: int | None = None
    ) -> None:
        super().__init__(detail)
        self.why = why
        self.detail = detail
        self.coding = coding
        self.declared = declared


async def read_capped(
    response: httpx.Response, limit: int, on_size: Callable[[int], None] | None = None
) -> bytes:
    """The body of `response`, at most `limit` bytes (`on_size` hears the size held so far).

    Raises `BodyRefused("compressed", ...)` for a body with a Content-Encoding, and
    `BodyRefused("too_large", ...)` for one declared or found longer than `limit`.
    """
    coding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise BodyRefused(
            "compressed", f"a {coding} body (guardd asks for identity)", coding=coding
        )
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyRefused(
            "too_large", f"{declared} bytes is over the limit ({limit})", declared=int(declared)
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if on_size is not None:
            on_size(size)
        if size > limit:
            raise BodyRefused("too_large", f"over the limit ({limit}) and not read further")
        chunks.append(chunk)
    return b"".join(chunks)
