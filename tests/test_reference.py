"""The README's configuration reference is generated from the models and kept in step."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from guardd import config
from guardd.notify import DEFAULT_EVENTS, expand_events
from guardd.reference import END, START, config_reference

README = Path(__file__).parents[1] / "README.md"


def test_readme_reference_is_current() -> None:
    text = README.read_text()
    current = text[text.index(START) : text.index(END) + len(END)]
    assert current == config_reference(), (
        "the README's configuration reference is stale: run "
        "`uv run python -m guardd.reference --write README.md`"
    )


def test_every_key_is_documented() -> None:
    reference = config_reference()
    models: list[type[BaseModel]] = [
        config.UpstreamConfig,
        config.ProbeConfig,
        config.PolicyConfig,
        config.SwitchConfig,
        config.QosConfig,
        config.NotifyConfig,
        config.RetryConfig,
        config.MetricsConfig,
        config.ControlConfig,
        config.StateConfig,
    ]
    for model in models:
        for key, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{key} has no description"
            assert f"| `{key}` |" in reference


def test_the_default_events_of_a_sink_are_the_ones_documented() -> None:
    """The key's description (the README's reference, the example config) names the events
    a sink gets when it names none: the same as the code sends."""
    description = config.NotifyConfig.model_fields["events"].description or ""
    match = re.search(r"\(default:\s*([^)]*)\)", description)
    assert match is not None, description
    named = [n.strip() for n in match.group(1).split(",")]
    assert expand_events(named) == DEFAULT_EVENTS
    example = (Path(__file__).parents[1] / "config" / "example.toml").read_text()
    assert "default: rollback, hold,\n#" in example and "qos_extended, qos_released" in example
