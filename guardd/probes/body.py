"""What a probe makes of an answer's body: bounded decoding, strict JSON matching, a summary.

Pure functions over bytes, independent of the HTTP client, so that whatever an upstream
sends becomes a verdict or a short text, never an exception and never unbounded memory.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from typing import Any, Final

from guardd.secrets import REDACTED, is_secret_name, redact

# gzip and deflate are the codings guardd decodes itself, in bounded steps; it asks for
# `identity`, so anything else is an upstream (or proxy) ignoring the request.
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
_ZLIB_WBITS: Final = zlib.MAX_WBITS
_RAW_WBITS: Final = -zlib.MAX_WBITS
SUMMARY_CHARS: Final = 160
_MAX_PAIRS: Final = 8
_MAX_DEPTH: Final = 4


def raw_limit(limit: int) -> int:
    """How many encoded bytes may be read to decode at most `limit` bytes.

    Compression can expand incompressible data a little (stored blocks, headers); a
    longer encoded body cannot decode to `limit` bytes or less.
    """
    return limit + limit // 8 + 1024


class BodyDecoder:
    """Decodes a `Content-Encoding` in bounded steps, keeping at most `limit + 1` bytes.

    `feed` raw chunks, then `finish`. Afterwards `body` holds the decoded bytes (cut at
    `limit + 1`), `too_big` says the decoded body exceeded `limit`, and `error` says why
    the body could not be decoded (an unknown coding, a corrupt or truncated stream).
    Nothing here raises on what an upstream sends.
    """

    def __init__(self, content_encoding: str | None, limit: int) -> None:
        self.limit = limit
        self.body = bytearray()
        self.too_big = False
        self.error: str | None = None
        self._raw = 0
        codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        # Codings are listed in the order they were applied; undo them in reverse.
        self._stages: list[_Inflate] = []
        for coding in reversed(codings):
            if coding in ("gzip", "x-gzip"):
                self._stages.append(_Inflate("gzip", _GZIP_WBITS))
            elif coding == "deflate":
                self._stages.append(_Inflate("deflate", _ZLIB_WBITS))
            else:
                self.error = (
                    f"body is Content-Encoding: {_printable(coding)[:40]}, "
                    "which guardd does not decode (it asks for identity)"
                )
                return

    @property
    def done(self) -> bool:
        """Whether reading more can change nothing (too big, or undecodable)."""
        return self.too_big or self.error is not None

    def feed(self, chunk: bytes) -> None:
        """Decode one raw chunk, within the bound."""
        if self.done or not chunk:
            return
        self._raw += len(chunk)
        if self._raw > raw_limit(self.limit):
            self.too_big = True
            return
        data = chunk
        budget = self.limit + 1 - len(self.body)
        for stage in self._stages:
            data, error = stage.decompress(data, budget)
            if error is not None:
                self.error = error
                return
            if stage.unconsumed:
                # The stage stopped at the budget: the decoded body is longer than allowed.
                self.too_big = True
                return
        self.body += data[:budget]
        if len(self.body) > self.limit:
            self.too_big = True

    def finish(self) -> None:
        """The body ended: a compressed stream must have ended too."""
        if self.done:
            return
        for stage in self._stages:
            if not stage.eof:
                self.error = f"{stage.name} body ends early (truncated)"
                return


class _Inflate:
    """One zlib stage whose output is bounded by the caller's remaining budget."""

    def __init__(self, name: str, wbits: int) -> None:
        self.name = name
        self._wbits = wbits
        self._d = zlib.decompressobj(wbits)
        self._started = False

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unconsumed(self) -> bool:
        return bool(self._d.unconsumed_tail)

    def decompress(self, data: bytes, budget: int) -> tuple[bytes, str | None]:
        try:
            out = self._d.decompress(data, budget)
        except zlib.error as e:
            if self.name == "deflate" and not self._started and self._wbits == _ZLIB_WBITS:
                # Some servers send raw deflate without the zlib wrapper; browsers and
                # httpx accept both, so guardd does too.
                self._wbits = _RAW_WBITS
                self._d = zlib.decompressobj(_RAW_WBITS)
                return self.decompress(data, budget)
            return b"", f"body is labelled Content-Encoding: {self.name} but does not decode ({e})"
        self._started = True
        # Output stopped at the budget: the caller sees more than `limit` and stops, so
        # the unconsumed input is never expanded.
        return out, None


# ---- expect_json --------------------------------------------------------------------


def json_mismatch(expected: Mapping[str, Any], actual: object, path: str = "") -> str | None:
    """Why `actual` does not match `expected`, or None when it does.

    A subset match of objects; everything else must be equal *and* of the same JSON type:
    `true` is not `1`, `"1"` is not `1` (integers and floats are both numbers).
    """
    if not isinstance(actual, dict):
        return f"{path or 'body'} is {_type_name(actual)}, expected an object"
    for key, want in expected.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in actual:
            return f"{where} is missing"
        why = _value_mismatch(want, actual[key], where)
        if why is not None:
            return why
    return None


def _value_mismatch(want: object, got: object, where: str) -> str | None:
    if isinstance(want, Mapping):
        return json_mismatch(want, got, where)
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{where} is {_shown(where, got)}, expected {_shown(where, want)}"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            why = _value_mismatch(w, g, f"{where}[{i}]")
            if why is not None:
                return why
        return None
    if _type_name(want) != _type_name(got) or want != got:
        return f"{where} is {_shown(where, got)}, expected {_shown(where, want)}"
    return None


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _shown(key: str, v: object) -> str:
    if is_secret_name(key.rsplit(".", 1)[-1]):
        return REDACTED
    if isinstance(v, dict | list):
        return _type_name(v)
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = str(v)
    return _clip(text, 40)


def parse_json(body: bytes) -> tuple[object, str | None]:
    """The JSON document of `body`, or None and why it is not JSON."""
    try:
        return json.loads(bytes(body)), None
    except RecursionError:
        return None, "body is not JSON (nested too deeply)"
    except (UnicodeDecodeError, ValueError):
        return None, "body is not JSON"


# ---- the summary of a failing answer ------------------------------------------------

_STATUS_KEYS: Final = ("status", "state", "health", "healthy", "up", "ok")
_DETAIL_KEYS: Final = ("error", "errors", "message", "reason", "detail", "description", "output")
_GROUP_KEYS: Final = ("components", "checks", "details", "dependencies", "services", "results")
_HEALTHY: Final = frozenset({"up", "ok", "pass", "passing", "healthy", "green", "true"})
_SECRET_IN_TEXT: Final = re.compile(
    r"(?i)\b([\w-]*(?:token|secret|password|passwd|authorization|api[-_]?key|cookie)[\w-]*)"
    r"(\"?\s*[:=]\s*\"?)(bearer\s+)?[^\s\",;&]+"
)
_URL_USERINFO: Final = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_BEARER: Final = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_TAG: Final = re.compile(r"<[^>]*>")
_TITLE: Final = re.compile(r"(?is)<title[^>]*>(.*?)</title>")


def summarize(body: bytes) -> str | None:
    """A short, secret-free account of a body, e.g. `status=DOWN db=DOWN`; None if empty.

    JSON objects give their status-like fields and the status of each named component
    (Spring Boot's `components`, the IETF health draft's `checks`); fields whose names
    look like credentials show `***`. Other text gives its first words (an HTML page its
    title). At most `SUMMARY_CHARS` characters.
    """
    if not body.strip():
        return None
    doc, error = parse_json(body)
    if error is None:
        text = " ".join(_pairs(doc)) if isinstance(doc, dict) else _compact(doc)
    else:
        text = _text_summary(body)
    text = _scrub(text)
    return _clip(text, SUMMARY_CHARS) or None


def _pairs(doc: Mapping[str, Any]) -> list[str]:
    pairs: list[str] = []
    keys = list(doc)
    ordered = [k for k in _STATUS_KEYS if k in doc]
    ordered += [k for k in _DETAIL_KEYS if k in doc]
    ordered += [k for k in keys if k not in ordered and _is_scalar(doc[k])]
    for key in ordered:
        value = doc[key]
        if _is_scalar(value) or (key in _DETAIL_KEYS and isinstance(value, list | dict)):
            pairs.append(_pair(str(key), value))
        if len(pairs) >= _MAX_PAIRS:
            return pairs
    for key in keys:
        if str(key).lower() in _GROUP_KEYS and isinstance(doc[key], dict):
            pairs += _components(doc[key], 1)
    return pairs[: _MAX_PAIRS * 2]


def _components(group: Mapping[str, Any], depth: int) -> list[str]:
    """`name=STATUS` of each component; failing ones first."""
    failing: list[str] = []
    passing: list[str] = []
    for name, child in group.items():
        status = _component_status(child)
        if status is None:
            if isinstance(child, dict) and depth < _MAX_DEPTH:
                nested = child.get("components") or child.get("checks")
                if isinstance(nested, dict):
                    failing += _components(nested, depth + 1)
            continue
        pair = _pair(str(name), status)
        (passing if str(status).lower() in _HEALTHY else failing).append(pair)
    return failing + passing


def _component_status(child: object) -> object | None:
    if isinstance(child, list) and child and isinstance(child[0], dict):
        child = child[0]  # the IETF draft: a list of measurements per check
    if isinstance(child, dict):
        for key in _STATUS_KEYS:
            value: object = child.get(key)
            if key in child and _is_scalar(value):
                return value
    return None


def _is_scalar(v: object) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _pair(key: str, value: object) -> str:
    key = _printable(key)[:40]
    if is_secret_name(key):
        return f"{key}={REDACTED}"
    if isinstance(value, str):
        text = _printable(value)
        shown = text if text and not re.search(r"[\s\"=]", text) else json.dumps(text)
    else:
        shown = _compact(value)
    return f"{key}={_clip(shown, 60)}"


def _compact(v: object) -> str:
    try:
        text = json.dumps(_scrub_doc(v, 0), separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = type(v).__name__
    return _printable(text)


def _scrub_doc(v: object, depth: int) -> object:
    """A copy of a JSON value with credential-named fields masked, cut at a depth."""
    if depth > _MAX_DEPTH:
        return "…"
    if isinstance(v, dict):
        return {
            k: REDACTED if is_secret_name(str(k)) else _scrub_doc(x, depth + 1)
            for k, x in list(v.items())[:_MAX_PAIRS]
        }
    if isinstance(v, list):
        return [_scrub_doc(x, depth + 1) for x in v[:_MAX_PAIRS]]
    return v


def _text_summary(body: bytes) -> str:
    text = bytes(body[:4096]).decode("utf-8", "replace")
    if "<" in text:
        title = _TITLE.search(text)
        text = title.group(1) if title else _TAG.sub(" ", text)
    return " ".join(_printable(text).split())


def _scrub(text: str) -> str:
    """Mask what looks like a credential anywhere in free text, and every known secret."""
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _BEARER.sub(rf"\1 {REDACTED}", text)
    text = _SECRET_IN_TEXT.sub(rf"\1\2{REDACTED}", text)
    return redact(text)


def _printable(text: str) -> str:
    # Terminal escapes and newlines from an upstream must not reach a log line or a table.
    return "".join(c if c.isprintable() else " " for c in text)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
