"""guardctl's command line: the one-command parser answers exactly as the whole one.

`ctl._parse` parses a line with the parser of the command it names (a deploy script's
`qos status` need not build sixteen subparsers). These tests hold it to the whole
parser's answer on every command, with the global options in every place and form
argparse accepts, and on lines either parser refuses.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

import pytest

from guardd import ctl

# What each command needs besides the global options to be a line argparse accepts.
NEEDS: dict[tuple[str, ...], list[str]] = {
    ("switch",): ["green"],
    ("wait",): ["steady", "--timeout", "5m"],
}
# A few of each command's own options, to show they parse alike too.
OWN: dict[tuple[str, ...], list[str]] = {
    ("status",): ["--json", "--watch", "--interval", "250ms"],
    ("history",): ["--limit", "3"],
    ("incident",): ["INC-20261205-1", "--markdown"],
    ("switch",): ["--force", "--reason", "blue", "--wait", "1m30s"],
    ("promote",): ["--reason", "qos", "--wait", "90"],
    ("qos", "lock"): ["--for", "2h", "--reason", "status"],
    ("qos", "unlock"): ["--reason", "-"],
    ("qos", "status"): ["--json"],
    ("fleet", "status"): ["--json"],
}
# Global options as written before, between and after the command words.
GLOBALS: list[list[str]] = [
    [],
    ["--instance", "threader"],
    ["--config", "/etc/guardd/threader.toml"],
    ["--config=/etc/guardd/threader.toml", "--socket", "/run/x.sock"],
    ["--inst", "status"],  # an abbreviation, and a value that is a command's name
    ["--socket=/run/qos", "--instance=qos"],
]


def command_paths(
    parser: argparse.ArgumentParser, above: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command path of the whole parser, read from the parser itself."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield above
        return
    for name, sub in subs[0].choices.items():
        yield from command_paths(sub, (*above, name))


PATHS = sorted(command_paths(ctl.build_parser()))


def lines(path: tuple[str, ...]) -> Iterator[list[str]]:
    tail = NEEDS.get(path, []) + OWN.get(path, [])
    for before, after in itertools.product(GLOBALS, GLOBALS[:3]):
        yield [*before, *path, *tail, *after]
        if len(path) == 2:
            yield [*before, path[0], *after, path[1], *tail]


def whole(argv: list[str]) -> argparse.Namespace:
    return ctl.build_parser().parse_args(argv)


def test_every_command_is_covered() -> None:
    named = {(c.name,) for c in ctl._COMMANDS} | {("qos", c.name) for c in ctl._QOS_COMMANDS}
    assert set(PATHS) == named | {("fleet", "status")}


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_the_one_command_parser_reads_every_line_as_the_whole_one(path: tuple[str, ...]) -> None:
    for argv in lines(path):
        assert vars(ctl._parse(argv)) == vars(whole(argv)), argv


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_a_line_naming_one_command_builds_only_its_parser(
    path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[str, ...]] = []
    real = ctl.build_parser

    def spy(
        path: tuple[str, ...] = (),
        parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
    ) -> argparse.ArgumentParser:
        built.append(tuple(path))
        return real(path, parser_class)

    monkeypatch.setattr(ctl, "build_parser", spy)
    ctl._parse(["--config", "/etc/guardd/x.toml", *path, *NEEDS.get(path, [])])
    assert built == [path]
    assert list(command_paths(real(path))) == [path]


REFUSED = [
    ["switch", "purple"],
    ["switch"],
    ["wait", "steady"],
    ["wait", "steady", "--timeout", "soon"],
    ["qos", "lock", "--for", "-5m"],
    ["qos", "status", "--bogus"],
    ["qos", "bogus"],
    ["qos"],
    ["fleet"],
    ["history", "--limit", "0"],
    ["status", "extra"],
    ["--config"],
    ["stauts"],
    [],
    ["--instance", "x", "--bogus", "status"],
]


def exits_alike(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str, str]:
    """`_parse` and the whole parser exit on `argv` with one code and one text: both."""
    with pytest.raises(SystemExit) as fast:
        ctl._parse(argv)
    fast_said = capsys.readouterr()
    with pytest.raises(SystemExit) as slow:
        whole(argv)
    assert fast.value.code == slow.value.code
    assert fast_said == capsys.readouterr()
    return fast.value.code, fast_said.out, fast_said.err


@pytest.mark.parametrize("argv", REFUSED, ids=lambda a: " ".join(a) or "(none)")
def test_a_refused_line_gets_the_whole_parsers_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = exits_alike(argv, capsys)
    assert code == 2
    assert "error:" in err


HELP = [
    ["--help"],
    ["-h", "qos", "status"],
    ["--he", "status"],
    ["--config", "/x", "--help", "switch", "blue"],
    ["qos", "--help"],
    ["qos", "status", "--help"],
    ["fleet", "status", "-h"],
    ["switch", "-h"],
    ["--version"],
    ["--vers", "status"],
]


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_help_and_version_are_the_whole_parsers(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = exits_alike(argv, capsys)
    assert code == 0
    assert out.strip()


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        (["qos", "status"], ("qos", "status")),
        (["--config", "/x", "qos", "--instance", "t", "status", "--json"], ("qos", "status")),
        (["--instance=status", "history", "--limit", "2"], ("history",)),
        (["--inst", "qos", "status"], ("status",)),
        (["fleet", "status"], ("fleet", "status")),
        # Unsure: only the whole parser may answer these.
        (["--help", "status"], None),
        (["qos", "-h", "status"], None),
        (["--bogus", "status"], None),
        (["--=x", "status"], None),
        (["-in", "x", "status"], None),
        (["stauts"], None),
        (["qos"], None),
        (["qos", "bogus"], None),
        (["--config"], None),
        ([], None),
    ],
)
def test_command_path(argv: list[str], path: tuple[str, ...] | None) -> None:
    assert ctl._command_path(argv) == path
