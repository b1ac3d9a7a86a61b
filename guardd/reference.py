"""The configuration reference, generated from the pydantic models into the README.

`python -m guardd.reference --write README.md` refreshes the block between the markers;
a test fails when the README's copy goes stale.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from guardd import config as c
from guardd import durations

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("[upstreams.blue] / [upstreams.green]", c.UpstreamConfig),
    ("[probe]", c.ProbeConfig),
    ("[policy]", c.PolicyConfig),
    ("[switch]", c.SwitchConfig),
    ("[qos]", c.QosConfig),
    ("[[notify]]", c.NotifyConfig),
    ("[retry]", c.RetryConfig),
    ("[metrics]", c.MetricsConfig),
    ("[control]", c.ControlConfig),
    ("[state]", c.StateConfig),
    ("[fleet]", c.FleetConfig),
    ("[[rules]]", c.RuleConfig),
    ("[signals.NAME]", c.AccessLogSignalConfig),
    ("[signals.NAME]", c.PrometheusSignalConfig),
    ("[signals.NAME]", c.ScrapeSignalConfig),
    ("[signals.NAME]", c.LogMatchSignalConfig),
]


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        meta = args[1:]
        if any(getattr(m, "func", None) is durations.parse_duration for m in meta):
            return "duration"
        if any(getattr(m, "func", None) is c.parse_flag for m in meta):
            return "bool"
        return _type(args[0])
    if origin is typing.Literal:
        return " or ".join(f'`"{a}"`' for a in args)
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in kept)
    if origin is list:
        return f"list of {_type(args[0])}s"
    if origin is dict:
        key = "blue/green" if typing.get_origin(args[0]) is typing.Literal else "name"
        return f"table ({key} = {_type(args[1])})" if args[1] is not Any else "table"
    names = {
        int: "integer",
        float: "number",
        str: "string",
        bool: "bool",
        Path: "path",
        SecretStr: "string (secret)",
    }
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _kind(field: FieldInfo) -> str:
    if field.metadata:
        return _type(typing.Annotated[(field.annotation, *field.metadata)])
    return _type(field.annotation)


def _default(field: FieldInfo, kind: str) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "—"
    if kind == "duration" and isinstance(value, int | float):
        for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
            if value >= size and value % size == 0:
                return f'`"{int(value // size)}{unit}"`'
        return f'`"{int(value * 1000)}ms"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, BaseModel):
        return "(table)"
    return f"`{value!r}`"


def config_reference() -> str:
    """The Markdown reference of every configuration key."""
    lines = [START, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    instance = c.GuardConfig.model_fields["instance"]
    lines.append(f"| `instance` | string | the file's stem | {instance.description} |")
    for section, model in _SECTIONS:
        lines.append(f"| **{section}** | | | {model.__doc__ or ''} |")
        for key, field in model.model_fields.items():
            kind = _kind(field)
            name = field.alias or key  # `for`, a Python keyword, is the field `for_`
            meaning = " ".join((field.description or "").split())  # one table row
            lines.append(f"| `{name}` | {kind} | {_default(field, kind)} | {meaning} |")
    lines += [
        "",
        (
            'A duration is a string with units (`"250ms"`, `"3s"`, `"5m"`, `"1h"`, '
            '`"1m30s"`) or a bare number of seconds.'
        ),
        (
            "Every key can be overridden by `GUARDD_<SECTION>__<KEY>`; unknown keys are errors, "
            "in the file and in a variable of a known section (a variable whose section is "
            "misspelt is ignored with a warning: it may be another tool's)."
        ),
        "",
        END,
    ]
    return "\n".join(lines)


def refresh(text: str) -> str:
    """`text` with the block between the markers replaced by a fresh reference."""
    start, end = text.index(START), text.index(END) + len(END)
    return text[:start] + config_reference() + text[end:]


def main(argv: list[str] | None = None) -> int:
    """Print the reference, or `--write FILE` to refresh it in place."""
    parser = argparse.ArgumentParser(prog="python -m guardd.reference")
    parser.add_argument("--write", type=Path, help="refresh the block in this Markdown file")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(refresh(args.write.read_text()))
    else:
        print(config_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
