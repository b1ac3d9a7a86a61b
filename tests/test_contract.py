"""docs/contract.md against the code: each list of the surface there is read back and compared.

Every metric the daemon exposes is in §5's table with its type, labels and label values, and
every row of the table is exposed; every configuration key of the models is in §2's TOML with
its default; every journal event and notification group is in §4; every command and option
of `guardd` and `guardctl` is in §1; the exit codes, default paths and the unit's directives
are the ones the code uses. A change to the surface without its line in the contract fails here.
"""

from __future__ import annotations

import argparse
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from guardd import cli, ctl, paths
from guardd import config as c
from guardd.core.types import COLORS, Outcome, State
from guardd.journal import EVENTS
from guardd.metrics import GuardMetrics
from guardd.notify import DEFAULT_EVENTS, EVENT_GROUPS, expand_events
from guardd.reference import _SECTIONS

PROJECT = Path(__file__).resolve().parents[1]
CONTRACT = PROJECT / "docs/contract.md"
README = PROJECT / "README.md"
UNIT = PROJECT / "systemd/guardd@.service"
GUARDCTL_GLOBALS = {"--instance", "--config", "--socket"}
# Labels whose values the text under §5's table gives rather than the table's cell.
LABELS_EXPLAINED_BELOW = ("color", "state", "sink", "version", "rule")


def section(number: int) -> str:
    """The text of `## <number>.` up to the next `## ` heading."""
    text = CONTRACT.read_text()
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{CONTRACT} has no section {number}"
    return match[0]


def backticked(text: str) -> set[str]:
    """The `code` spans of a piece of Markdown, outside its fenced blocks."""
    prose = re.sub(r"^```.*?^```$", "", text, flags=re.MULTILINE | re.DOTALL)
    return set(re.findall(r"`([^`]+)`", prose))


# ---- §5 metrics --------------------------------------------------------------------------


def exposed_metrics() -> dict[str, tuple[str, dict[str, set[str]]]]:
    """Each guardd metric as scraped: name -> (type, label -> values seen), `guard` aside."""
    metrics = GuardMetrics("threader", "1.2.3")
    metrics.declare_sinks(["ops-slack"])
    metrics.set_rules(("consecutive_failures", c, "ok") for c in COLORS)  # bound at a tick

    class Traffic:  # an access-log signal with traffic on both colors
        lines: Mapping[str, int] = {"ok": 3}
        requests: Mapping[tuple[str, str], int] = {("blue", "2xx"): 3}

        def error_ratio(self, color: str) -> float | None:
            return 0.0 if color in COLORS else None

    metrics.watch_traffic(lambda: [Traffic()])
    exposed: dict[str, tuple[str, dict[str, set[str]]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        if name.endswith("_created") or not name.startswith("guardd_"):
            continue
        labels: dict[str, set[str]] = {}
        for sample in family.samples:
            assert sample.labels["guard"] == "threader", sample
            for key, value in sample.labels.items():
                if key not in ("guard", "le"):
                    labels.setdefault(key, set()).add(value)
        exposed[name] = (family.type, labels)
    return exposed


def documented_metrics() -> dict[str, tuple[str, dict[str, set[str] | None]]]:
    """§5's table: name -> (type, label -> the values it lists, or None if it lists none)."""
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (.*?) \| .* \|$", section(5), re.MULTILINE)
    documented: dict[str, tuple[str, dict[str, set[str] | None]]] = {}
    for name, kind, cell in rows:
        labels: dict[str, set[str] | None] = {}
        bare = re.sub(r"\*\(1st build\)\*", "", cell)
        for label, values in re.findall(r"(\w+)(?: \(([^)]*)\))?", re.sub(r"—", "", bare)):
            labels[label] = backticked(values) if values else None
        documented[name] = (kind, labels)
    return documented


def test_every_metric_exposed_is_in_the_table_and_every_row_is_exposed() -> None:
    exposed = exposed_metrics()
    documented = documented_metrics()
    assert sorted(documented) == sorted(exposed)
    for name, (kind, labels) in exposed.items():
        doc_kind, doc_labels = documented[name]
        assert doc_kind == kind, name
        assert sorted(doc_labels) == sorted(labels), name
        for label, values in doc_labels.items():
            if label in LABELS_EXPLAINED_BELOW:
                assert values is None, f"{name}{{{label}}}: explained below the table"
                if label == "color":
                    assert labels[label] == set(COLORS)
                if label == "state":
                    assert labels[label] == {s.value for s in State}
            else:
                assert values == labels[label], f"{name}{{{label}}}: list its values"
    below = re.search(
        r"^\| `guardd_build_info`.*?\n\n(.*?)\n\n", section(5), re.MULTILINE | re.DOTALL
    )
    assert below
    for label in LABELS_EXPLAINED_BELOW:
        assert f"`{label}`" in below[1]
    assert "`color` is `blue` or `green`" in below[1]


def test_the_other_series_are_the_ones_the_contract_names() -> None:
    metrics = GuardMetrics("threader", "1.2.3")
    others = {
        f.name
        for f in text_string_to_metric_families(metrics.render().decode())
        if not f.name.startswith("guardd_")
    }
    assert others
    assert all(n.startswith("process_") or n == "python_info" for n in others), others
    assert {"process_*", "python_info", "_created"} <= backticked(section(5))


def test_states_and_outcomes_are_the_ones_of_the_core() -> None:
    states = re.search(r"^States: (.*)$", section(5), re.MULTILINE)
    assert states
    assert backticked(states[1]) == {s.value for s in State}
    probe_outcomes = documented_metrics()["guardd_probe_total"][1]["outcome"]
    assert probe_outcomes == {o.value for o in Outcome}


# ---- §2 configuration --------------------------------------------------------------------


def toml_block() -> str:
    """The TOML example of §2."""
    match = re.search(r"```toml\n(.*?)^```", section(2), re.MULTILINE | re.DOTALL)
    assert match
    return match[1]


_HEADER = re.compile(r"^(?:#\s*)?\[\[?([\w.]+)\]\]?")
_KEY = re.compile(r"^(?P<commented>#\s*)?(?P<key>\w+)\s*=")


def documented_keys() -> list[tuple[str, str, str, bool]]:
    """Each key line of §2's TOML: (table, key, line, commented out)."""
    table = ""
    keys = []
    for line in toml_block().splitlines():
        if header := _HEADER.match(line):
            table = header[1]
            if "." in table and table.split(".")[0] == "switch":
                # A sub-table is the key of its parent: [switch.targets] is switch.targets.
                keys.append(("switch", table.split(".")[1], line, False))
            continue
        if (key := _KEY.match(line)) and table != "switch.targets":
            keys.append((table, key["key"], line, key["commented"] is not None))
    return keys


def model_of(table: str) -> type[BaseModel]:
    """The model that validates a table of the configuration."""
    if table.startswith("upstreams."):
        return c.UpstreamConfig
    if table.startswith("signals."):
        return c.AccessLogSignalConfig
    models = {header.strip("[]"): model for header, model in _SECTIONS}
    return models[table]


def test_every_key_of_the_models_is_in_section_2_and_no_other() -> None:
    documented: dict[str, set[str]] = {}
    for table, key, _line, _commented in documented_keys():
        group = table.split(".")[0] if table.startswith(("upstreams.", "signals.")) else table
        documented.setdefault(group, set()).add(key)
    expected: dict[str, set[str]] = {}
    for header, model in _SECTIONS:
        group = (
            header.strip("[]").split(".")[0]
            if header.startswith(("[upstreams", "[signals"))
            else header.strip("[]")
        )
        # Every kind of signal is a [signals.NAME] table: their keys together.
        expected.setdefault(group, set()).update(
            f.alias or k for k, f in model.model_fields.items()
        )
    expected[""] = {
        name for name, f in c.GuardConfig.model_fields.items() if _is_scalar(f.annotation)
    }
    assert documented == expected
    headers = {m[1].split(".")[0] for m in map(_HEADER.match, toml_block().splitlines()) if m}
    assert headers == set(c.GuardConfig.model_fields) - expected[""]


def _is_scalar(annotation: Any) -> bool:
    args = typing.get_args(annotation) or (annotation,)
    return not any(
        isinstance(a, type) and issubclass(a, BaseModel) for a in args
    ) and typing.get_origin(annotation) not in (dict, list)


def _validate(field: FieldInfo, value: object) -> object:
    annotation: Any = field.annotation
    if field.metadata:
        annotation = typing.Annotated[(annotation, *field.metadata)]
    return TypeAdapter(annotation).validate_python(value)


def test_the_values_section_2_shows_are_the_defaults() -> None:
    checked = 0
    for table, key, line, commented in documented_keys():
        comment = line.partition("#")[2] if not commented else ""
        if commented or not table or "example" in comment or line.lstrip().startswith("["):
            continue
        field = model_of(table).model_fields[key]
        shown = tomllib.loads(line)[key]
        assert _validate(field, shown) == field.get_default(call_default_factory=True), line
        checked += 1
    assert checked >= 30


def test_the_toml_of_section_2_is_a_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "threader.toml"
    path.write_text(toml_block())
    settings = c.load(path)
    assert settings.instance == "threader"


def test_default_paths_outside_systemd_are_the_documented_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "GUARDD_CONFIG"):
        monkeypatch.delenv(variable, raising=False)
    shown = backticked(section(2))
    for path in (
        paths.state_dir("<instance>"),
        paths.control_socket("<instance>"),
        paths.qos_lock_file("<instance>"),
    ):
        assert str(path) in shown
    guardctl = backticked(section(1))
    assert str(paths.config_file("<instance>")) in guardctl
    assert str(paths.control_socket("<instance>")) in guardctl
    assert str(paths.qos_lock_file("<instance>")) in guardctl


# ---- §4 journal ----------------------------------------------------------------------------


def test_journal_events_and_notification_groups_are_the_code_s() -> None:
    text = section(4)
    names = re.search(r"Event names: (.*?)\.\n", text, re.DOTALL)
    assert names
    assert backticked(names[1]) == EVENTS
    groups = re.search(r"Groups that .*? may name.*?: (.*?)\.\n", text, re.DOTALL)
    assert groups
    documented = {
        group: backticked(members)
        for group, members in re.findall(r"`(\w+)` \(([^)]*)\)", groups[1])
    }
    assert documented == EVENT_GROUPS
    default = re.search(r"without `events` receives (.*?) \*", section(2), re.DOTALL)
    assert default
    assert expand_events(sorted(backticked(default[1]))) == DEFAULT_EVENTS


# ---- §1 commands -------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def parsed_commands(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> dict[tuple[str, ...], set[str]]:
    """Every command of a parser, as its words, with its options."""
    found: dict[tuple[str, ...], set[str]] = {}
    subs = _subcommands(parser)
    for name, sub in subs.items():
        found.update(parsed_commands(sub, (*words, name)))
    if not subs:
        found[words] = _options(parser)
    return found


def documented_commands(program: str) -> dict[tuple[str, ...], set[str]]:
    """The commands of §1's table for `program`: words, and the options the row shows."""
    found: dict[tuple[str, ...], set[str]] = {}
    for row in re.findall(r"^\| (.*?) \|", section(1), re.MULTILINE):
        for usage in backticked(row):
            if not usage.startswith(f"{program} "):
                continue
            tokens = usage.split()[1:]
            words = tuple(t for t in tokens if re.fullmatch(r"[a-z][a-z-]*", t))
            options = {m for t in tokens for m in re.findall(r"--[a-z-]+", t)}
            found.setdefault(words, set()).update(options)
    return found


def test_every_guardctl_command_and_option_is_in_section_1() -> None:
    parsed = parsed_commands(ctl.build_parser())
    documented = documented_commands("guardctl")
    assert sorted(documented) == sorted(parsed)
    for words, options in parsed.items():
        assert documented[words] == options - GUARDCTL_GLOBALS, words
    globals_line = re.search(r"^Global options: (.*?)\n\n", section(1), re.MULTILINE | re.DOTALL)
    assert globals_line
    shown = {m for span in backticked(globals_line[1]) for m in re.findall(r"--[a-z-]+", span)}
    assert shown == _options(ctl.build_parser())


def test_every_guardd_command_and_option_is_in_section_1() -> None:
    parser = cli._parser()
    parsed = parsed_commands(parser)
    parsed[()] = _options(parser)
    documented = documented_commands("guardd")
    assert documented == parsed


def test_exit_codes_are_the_ones_guardctl_returns() -> None:
    text = " ".join(section(1).split())
    for code, words in (
        (ctl.OK, "OK"),
        (ctl.WARNING, "WARNING"),
        (ctl.CRITICAL, "CRITICAL"),
        (ctl.UNKNOWN, "UNKNOWN"),
        (ctl.NO_LOCK, "no lock"),
        (ctl.LOCK_HELD, "lock held"),
        (ctl.DONE, "done"),
        (ctl.REFUSED, "refused"),
        (ctl.UNREACHABLE, "daemon unreachable"),
        (ctl.NOT_PERMITTED, "not permitted"),
    ):
        assert f"{code} {words}" in text


# ---- §6 systemd --------------------------------------------------------------------------


def test_the_unit_s_directives_are_the_documented_ones() -> None:
    directives = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if re.match(r"^\w+=", line)
    )
    shown = backticked(section(6))
    for key in (
        "Type",
        "WatchdogSec",
        "Restart",
        "RuntimeDirectory",
        "StateDirectory",
        "ExecStart",
        "ExecStartPre",
    ):
        value = directives[key].removeprefix("/usr/bin/")
        assert f"{key}={value}" in shown, key


# ---- what --help and the README say of the same surface -------------------------------


def _flat(text: str) -> str:
    return " ".join(text.split())


def _help(parser: argparse.ArgumentParser, *words: str) -> str:
    for word in words:
        parser = _subcommands(parser)[word]
    return _flat(parser.format_help())


def test_the_promotion_gate_is_described_whole() -> None:
    """N passing probes in a row and a clean window, in --help, the README and §1."""
    for text in (
        _help(ctl.build_parser(), "promote"),
        _flat(README.read_text()),
        _flat(section(1)),
    ):
        gate = text[text.index("promotion gate") :][:400]
        assert "promote_successes" in gate
        assert "p1_error_ratio" in gate
        assert "lock" in gate


def test_the_error_ratio_is_every_failed_probe_not_only_5xx() -> None:
    status_help = _help(ctl.build_parser(), "status")
    assert "5xx ratio" not in status_help
    assert "every failed probe counts" in status_help
    readme = _flat(README.read_text())
    assert "`ERR%` counts every failed probe" in readme
    assert "not only 5xx" in readme[readme.index("`ERR%` counts") :][:200]
    assert "5xx ratio" not in _flat(section(1)) + _flat(section(5))


def test_help_and_readme_say_where_files_live_outside_systemd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "GUARDD_CONFIG"):
        monkeypatch.delenv(variable, raising=False)
    run_help = _help(cli._parser(), "run")
    readme = README.read_text()
    for path in (
        paths.state_dir("<instance>"),
        paths.control_socket("<instance>"),
        paths.qos_lock_file("<instance>"),
    ):
        assert str(path) in run_help
        assert f"`{path}`" in readme
    guardctl_help = _flat(ctl.build_parser().format_help())
    assert str(paths.control_socket("INSTANCE")) in guardctl_help
    assert str(paths.qos_lock_file("INSTANCE")) in guardctl_help
