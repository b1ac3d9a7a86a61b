"""`bench.ab`'s config edits: one side's `section.key = value`, or a clear refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ab import _apply, _settings


def test_settings_are_put_at_the_head_of_their_table(tmp_path: Path) -> None:
    config = tmp_path / "guardd.toml"
    config.write_text('instance = "x"\n\n[probe]\ninterval = 1.0\n\n[state]\ndir = "/s"\n')
    _apply(config, _settings(['state.keep_observations="0"', "probe.timeout = 0.5"]))
    text = config.read_text()
    assert '[state]\nkeep_observations = "0"\ndir = "/s"\n' in text
    assert "[probe]\ntimeout = 0.5\ninterval = 1.0\n" in text


@pytest.mark.parametrize("pair", ["state", "keep_observations=0", "=1"])
def test_a_setting_not_written_section_key_value_is_refused(pair: str) -> None:
    with pytest.raises(SystemExit, match=r"not section\.key=value"):
        _settings([pair])


def test_a_table_the_config_lacks_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "guardd.toml"
    config.write_text('instance = "x"\n')
    with pytest.raises(SystemExit, match=r"no \[fleet\]"):
        _apply(config, {"fleet.size": "3"})
