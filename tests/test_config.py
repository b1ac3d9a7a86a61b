"""Config: table tests of invalid files with their exact messages, env overrides, durations.

Files whose text holds `@TMP@` need this host's files: the test lays out a tmp folder
(`host_layout`) and substitutes its path, in the file and in the expected message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardd import config, durations
from guardd.core.types import Outcome
from guardd.core.window import MAX_SAMPLES, SlidingWindow
from guardd.exceptions import ConfigError
from tests.harness.daemon import nobody_prefix
from tests.harness.paths import shared_tmp_dir

TESTDATA = Path(__file__).parent / "testdata"
EXAMPLE = Path(__file__).parents[1] / "config" / "example.toml"
INVALID = sorted(TESTDATA.glob("invalid-*.toml"))


PLACEHOLDER = "@TMP@"
# A valid nginx switch section over `host_layout`.
NGINX_SWITCH = """
[switch]
kind = "nginx"
active_link = "@TMP@/upstreams/threader_active.conf"
test_command = ["@TMP@/bin/check", "-t"]
reload_command = ["@TMP@/bin/check", "-s", "reload"]
[switch.targets]
blue = "@TMP@/upstreams/threader_blue.conf"
green = "@TMP@/upstreams/threader_green.conf"
"""
UPSTREAMS = """
[upstreams.blue]
url = "http://127.0.0.1:9009/healthz"
[upstreams.green]
url = "http://127.0.0.1:9010/healthz"
"""


def check_config(
    path: Path, cwd: Path, env: dict[str, str] | None = None, *args: str, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    prefix = nobody_prefix(as_nobody)
    return subprocess.run(
        [*prefix, sys.executable, "-m", "guardd.cli", "check-config", *args, str(path)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **(env or {})},
        check=False,
        timeout=120,  # a config that hangs the check fails the test, never the suite
    )


def host_layout(root: Path) -> Path:
    """What the host checks look at: commands, nginx targets and links, a state-file folder."""
    (root / "bin").mkdir()
    check = root / "bin" / "check"
    check.write_text("#!/bin/sh\nexit 0\n")
    check.chmod(0o755)
    (root / "bin" / "README").write_text("not a program\n")
    ups = root / "upstreams"
    ups.mkdir()
    # Each color's file proxies to where its probes go (UPSTREAMS): 9009 blue, 9010 green.
    for name, port in (
        ("threader_blue.conf", 9009),
        ("threader_green.conf", 9010),
        ("other.conf", 9009),
        ("plain.conf", 9009),
    ):
        (ups / name).write_text(f"upstream threader_app {{ server 127.0.0.1:{port}; }}\n")
    os.mkfifo(ups / "fifo.conf")  # a read of it would wait for a writer for ever
    (ups / "threader_active.conf").symlink_to(ups / "threader_green.conf")
    (root / "upstreams-link").symlink_to(ups)  # the same folder by another name
    (ups / "stray_active.conf").symlink_to(ups / "other.conf")
    # In the active link's place: a folder (whose `..` is a second link), a file with two names.
    (ups / "dir_active.conf").mkdir()
    os.link(ups / "other.conf", ups / "hard_active.conf")
    # An alias of the active link: swapping it changes nothing nginx reads.
    (ups / "alias_active.conf").symlink_to(ups / "threader_active.conf")
    (root / "deploy").mkdir()
    # Targets with a second name (`ln -P`): a switch replaces one name, the other stays.
    (ups / "linked_active.conf").symlink_to(ups / "threader_green.conf")
    os.link(
        ups / "linked_active.conf", root / "deploy" / "linked_active.conf", follow_symlinks=False
    )
    (root / "deploy" / "linked-state.json").write_text('{"activeColor": "blue"}')
    os.link(root / "deploy" / "linked-state.json", root / "linked-state.json")
    (root / "deploy" / "state-link.json").symlink_to(root / "deploy" / "linked-state.json")
    return root


def placed(text: str, root: Path) -> str:
    return text.replace(PLACEHOLDER, str(root))


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A tmp folder that other users can enter (pytest's own is private to root)."""
    with shared_tmp_dir("guardd-config-") as path:
        yield path


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_config_is_rejected_with_its_exact_message(path: Path, tmp_path: Path) -> None:
    expected = path.with_suffix(".err").read_text()
    cwd = TESTDATA
    if PLACEHOLDER in path.read_text():
        cwd = host_layout(tmp_path)
        (cwd / path.name).write_text(placed(path.read_text(), cwd))
        expected = placed(expected, cwd)
    result = check_config(Path(path.name), cwd=cwd)
    assert result.returncode == 2
    assert result.stderr == expected
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


WARNED = sorted(TESTDATA.glob("warn-*.toml"))


@pytest.mark.parametrize("path", WARNED, ids=[p.stem for p in WARNED])
def test_a_host_state_guardd_holds_on_is_a_warning(path: Path, tmp_path: Path) -> None:
    """An active link that names no target now (missing, not a symlink, pointing elsewhere)
    is a state guardd runs with, holding: refused at the unit's ExecStartPre, there would be
    no guard to lock deploys. `check-config` warns, exits 0; the daemon starts and holds."""
    root = host_layout(tmp_path)
    (root / path.name).write_text(placed(path.read_text(), root))
    result = check_config(Path(path.name), cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == placed(path.with_suffix(".err").read_text(), root)
    assert ": ok: instance=" in result.stdout


HOST_ONLY = [
    p
    for p in [*INVALID, *WARNED]
    if p.stem.startswith(("invalid-host-", "warn-host-")) and "all-at-once" not in p.stem
]


@pytest.mark.parametrize("path", HOST_ONLY, ids=[p.stem for p in HOST_ONLY])
def test_offline_skips_the_host_checks(path: Path, tmp_path: Path) -> None:
    root = host_layout(tmp_path)
    (root / path.name).write_text(placed(path.read_text(), root))
    result = check_config(Path(path.name), root, None, "--offline")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert ": ok: instance=" in result.stdout


def test_offline_still_reports_what_the_file_alone_gets_wrong(tmp_path: Path) -> None:
    root = host_layout(tmp_path)
    source = TESTDATA / "invalid-host-all-at-once.toml"
    (root / "c.toml").write_text(placed(source.read_text(), root))
    result = check_config(Path("c.toml"), root, None, "--offline")
    assert result.returncode == 2
    assert result.stderr == (
        "c.toml: upstreams: missing green\n"
        "c.toml: policy.rollback_too: unknown key; did you mean rollback_to?\n"
    )


def test_offline_says_what_a_notify_table_alone_gets_wrong_as_online() -> None:
    """Names used twice (given, or the kind-index one) and events that name nothing are the
    file's own problems: `--offline`, a CI's check, says them as the unit's start does."""
    path = TESTDATA / "invalid-notify-names-events.toml"
    result = check_config(Path(path.name), TESTDATA, None, "--offline")
    assert result.returncode == 2
    assert result.stderr == path.with_suffix(".err").read_text()


@pytest.mark.parametrize("where", ["file", "env"])
def test_no_automatic_rollback_at_all_is_a_warning(tmp_path: Path, where: str) -> None:
    text = UPSTREAMS + '[switch]\nkind = "state-file"\npath = "/tmp/s.json"\n'
    env = None
    if where == "file":
        text += "[policy]\nmax_rollbacks = 0\n"
    else:
        env = {"GUARDD_POLICY__MAX_ROLLBACKS": "0"}
    (tmp_path / "m.toml").write_text(text)
    result = check_config(Path("m.toml"), tmp_path, env, "--offline")
    assert result.returncode == 0, result.stderr
    origin = "m.toml" if where == "file" else "env GUARDD_POLICY__MAX_ROLLBACKS"
    assert result.stderr == (
        f"{origin}: policy.max_rollbacks: warning: 0 allows no automatic rollback: every "
        "failure of the active color is a hold that waits for an operator\n"
    )
    (tmp_path / "m.toml").write_text(text.replace("max_rollbacks = 0", "max_rollbacks = 1"))
    if where == "file":
        assert check_config(Path("m.toml"), tmp_path, None, "--offline").stderr == ""


def test_offline_still_checks_notify_event_names(tmp_path: Path) -> None:
    text = (
        UPSTREAMS
        + '[switch]\nkind = "state-file"\npath = "/tmp/s.json"\n'
        + '[[notify]]\nkind = "webhook"\nurl_env = "UNSET_IN_CI"\nevents = ["rollbak"]\n'
    )
    (tmp_path / "n.toml").write_text(text)
    result = check_config(Path("n.toml"), tmp_path, None, "--offline")
    assert result.returncode == 2
    assert result.stderr.startswith("n.toml: notify[0].events: unknown event 'rollbak'; ")
    assert "UNSET_IN_CI" not in result.stderr  # the environment is the host's: not checked
    (tmp_path / "n.toml").write_text(text.replace('"rollbak"', '"rollback"'))
    assert check_config(Path("n.toml"), tmp_path, None, "--offline").returncode == 0
    result = check_config(Path("n.toml"), tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "n.toml: notify[0].url_env: environment variable UNSET_IN_CI is not set\n"
    )


@pytest.mark.parametrize(
    "switch",
    [
        NGINX_SWITCH,
        '[switch]\nkind = "command"\ncommand = ["@TMP@/bin/check", "{color}"]',
        (
            '[switch]\nkind = "state-file"\npath = "@TMP@/deploy/s.json"\n'
            'reload_command = ["sh", "-c", "true"]'
        ),
    ],
)
def test_a_host_that_has_everything_passes(switch: str, tmp_path: Path) -> None:
    root = host_layout(tmp_path)
    (root / "ok.toml").write_text(placed(UPSTREAMS + switch, root))
    result = check_config(Path("ok.toml"), root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_an_active_link_the_user_cannot_replace_is_reported(shared_tmp: Path) -> None:
    root = host_layout(shared_tmp)
    (root / "ok.toml").write_text(placed(UPSTREAMS + NGINX_SWITCH, root))
    (root / "ok.toml").chmod(0o644)
    result = check_config(Path("ok.toml"), root, as_nobody=True)
    assert result.returncode == 2
    assert result.stderr == (
        f"ok.toml: switch.active_link: cannot write in {root}/upstreams "
        "(a switch writes the new link beside the old one)\n"
    )
    assert check_config(Path("ok.toml"), root).returncode == 0  # root may write there


def test_a_state_file_folder_the_user_cannot_write_is_reported(shared_tmp: Path) -> None:
    root = host_layout(shared_tmp)
    switch = '[switch]\nkind = "state-file"\npath = "@TMP@/deploy/s.json"\n'
    (root / "s.toml").write_text(placed(UPSTREAMS + switch, root))
    result = check_config(Path("s.toml"), root, as_nobody=True)
    assert result.returncode == 2
    assert result.stderr == (
        f"s.toml: switch.path: cannot write in {root}/deploy (it is replaced there)\n"
    )


def test_a_command_is_looked_up_on_the_path_guardd_runs_with(tmp_path: Path) -> None:
    root = host_layout(tmp_path)
    switch = '[switch]\nkind = "command"\ncommand = ["check", "{color}"]\n'
    (root / "c.toml").write_text(UPSTREAMS + switch)
    missing = check_config(Path("c.toml"), root, {"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2
    assert missing.stderr == 'c.toml: switch.command: "check" is not on PATH\n'
    found = check_config(Path("c.toml"), root, {"PATH": f"{root}/bin:/usr/bin:/bin"})
    assert found.returncode == 0, found.stderr


def test_durations_written_as_bare_numbers_of_100_or_more_are_warned_about(
    tmp_path: Path,
) -> None:
    text = (
        UPSTREAMS
        + "[probe]\ninterval = 1000\nfast_interval = 99\n"
        + "[policy]\nwindow = 7200\nbudget_window = 14400\n"
        + '[switch]\nkind = "state-file"\npath = "/tmp/s.json"\ntimeout = "100s"\n'
        + "[retry]\nmax_delay = 150.5\n"
        + '[qos]\nwindow = "2h"\n'  # min_samples probes at a 1000 s interval must fit
        + '[fleet]\netcd = ["http://127.0.0.1:2379"]\nnode = "n1"\nlease_ttl = 100000\n'
        + '[[notify]]\nkind = "webhook"\nurl = "http://127.0.0.1:1/h"\ntimeout = 100\n'
        # A signal's stale_after, every and timeout too; its window is long by nature.
        + '[signals.traffic]\nkind = "access_log"\nsource = "file:/var/log/nginx/a.log"\n'
        + 'addresses = {blue = ["127.0.0.1:9009"], green = ["127.0.0.1:9010"]}\n'
        + "stale_after = 3000\nwindow = 3000\n"
        + '[signals.app]\nkind = "prometheus"\nurl = "http://127.0.0.1:9090"\n'
        + "query = 'up{color=\"{color}\"}'\nevery = 15\ntimeout = 500\n"
    )
    (tmp_path / "w.toml").write_text(text)
    result = check_config(Path("w.toml"), tmp_path, {"GUARDD_PROBE__TIMEOUT": "250"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        'w.toml: probe.interval: warning: 1000 = 16m40s; did you mean "1000ms"?\n'
        'env GUARDD_PROBE__TIMEOUT: probe.timeout: warning: 250 = 4m10s; did you mean "250ms"?\n'
        'w.toml: retry.max_delay: warning: 150.5 = 2m30.5s; did you mean "150.5ms"?\n'
        'w.toml: fleet.lease_ttl: warning: 100000 = 27h46m40s; did you mean "100000ms"?\n'
        'w.toml: notify[0].timeout: warning: 100 = 1m40s; did you mean "100ms"?\n'
        'w.toml: signals.traffic.stale_after: warning: 3000 = 50m; did you mean "3000ms"?\n'
        'w.toml: signals.app.timeout: warning: 500 = 8m20s; did you mean "500ms"?\n'
    )
    assert "ok: instance=w" in result.stdout


def test_a_long_fleet_lease_and_unused_tls_files_are_warned_about(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    text = (
        UPSTREAMS
        + '[switch]\nkind = "state-file"\npath = "/tmp/s.json"\n'
        + '[fleet]\netcd = ["http://127.0.0.1:2379"]\nnode = "n1"\nlease_ttl = "2m"\n'
        + f'ca_file = "{ca}"\n'
    )
    (tmp_path / "w.toml").write_text(text)
    result = check_config(Path("w.toml"), tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "w.toml: fleet.lease_ttl: warning: a leader that dies keeps the lead for up to 2m "
        "(a few seconds is usual: 5s)\n"
        "w.toml: fleet.ca_file: warning: not used: no fleet.etcd URL is https://\n"
    )
    # Over https the file is used, and a lease of a minute or less is not remarked on.
    (tmp_path / "w.toml").write_text(text.replace("http://", "https://").replace('"2m"', '"1m"'))
    result = check_config(Path("w.toml"), tmp_path, {})
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_variable_that_nearly_names_a_setting_is_warned_about(tmp_path: Path) -> None:
    """One underscore where two belong, or a misspelt section: ignored, and said so. guardd's
    own variables and other tools' `GUARDD_` ones are not settings, and not remarked on."""
    (tmp_path / "w.toml").write_text(UPSTREAMS + '[switch]\nkind = "state-file"\npath = "/s"\n')
    env = {
        "GUARDD_FLEET_NODE": "lb-q",
        "GUARDD_POLCY__CONSECUTIVE_FAILURES": "5",
        "GUARDD_STATE_ROOT": str(tmp_path),
        "GUARDD_DEB_WORKDIR": "/tmp/deb",
    }
    result = check_config(Path("w.toml"), tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "env GUARDD_FLEET_NODE: fleet.node: warning: names no setting and is ignored; "
        "did you mean GUARDD_FLEET__NODE?\n"
        "env GUARDD_POLCY__CONSECUTIVE_FAILURES: policy.consecutive_failures: warning: names "
        "no setting and is ignored; did you mean GUARDD_POLICY__CONSECUTIVE_FAILURES?\n"
    )


def test_warnings_are_shown_beside_the_errors(tmp_path: Path) -> None:
    # One run tells everything: a person fixing the typo learns of the 16-minute timeout too.
    text = (
        UPSTREAMS
        + '[switch]\nkind = "state-file"\npath = "/tmp/s.json"\n'
        + '[probe]\ntimeout = 1000\n[policy]\nrollback_too = "blue"\n'
    )
    (tmp_path / "w.toml").write_text(text)
    result = check_config(Path("w.toml"), tmp_path, None, "--offline")
    assert result.returncode == 2
    assert result.stderr == (
        "w.toml: policy.rollback_too: unknown key; did you mean rollback_to?\n"
        'w.toml: probe.timeout: warning: 1000 = 16m40s; did you mean "1000ms"?\n'
    )


def test_every_invalid_file_has_a_message() -> None:
    assert len(INVALID) >= 15
    assert all(p.with_suffix(".err").read_text().strip() for p in INVALID)


def test_example_config_is_valid() -> None:
    result = check_config(EXAMPLE, EXAMPLE.parent, None, "--offline")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "ok: instance=threader" in result.stdout


def test_example_configs_commented_sections_are_valid_uncommented(tmp_path: Path) -> None:
    """The example's commented sections at its end (from `[[notify]]` for a Slack bot on:
    their `# key = ...` and `# [table]` lines, not the `# # ...` asides) are a valid config
    once uncommented, with the keys they name."""
    text = EXAMPLE.read_text()
    at = text.index("# More of [[notify]]")
    shown = text[:at].splitlines()
    for line in text[at:].splitlines():
        body = line[2:] if line.startswith("# ") and not line.startswith("# # ") else ""
        shown.append(body if re.match(r"^(\[|[a-z_]+ = )", body) else line)
    full = tmp_path / "threader.toml"
    full.write_text("\n".join(shown) + "\n")
    result = check_config(full, tmp_path, None, "--offline")
    assert result.returncode == 0, result.stderr
    assert "notify=1 fleet=lb-a@3etcd" in result.stdout, result.stdout
    doc = tomllib.loads(full.read_text())
    assert {"notify", "signals", "rules", "fleet"} <= set(doc), sorted(doc)
    assert set(doc["signals"]) == {"traffic", "app_errors", "own_metrics", "panics"}


def test_example_config_names_what_this_host_lacks() -> None:
    result = check_config(EXAMPLE, cwd=EXAMPLE.parent)
    assert result.returncode == 2
    ups = "/etc/nginx/upstreams"
    assert result.stderr == (
        f"{EXAMPLE}: switch.targets.blue: {ups}/threader_blue.conf: no such file\n"
        f"{EXAMPLE}: switch.targets.green: {ups}/threader_green.conf: no such file\n"
        f"{EXAMPLE}: switch.active_link: directory {ups} does not exist\n"
    )


def test_missing_file_is_a_clean_error(tmp_path: Path) -> None:
    result = check_config(tmp_path / "nope.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr
        == f"{tmp_path / 'nope.toml'}: (file): cannot read: No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("3s", 3.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        ("2s500ms", 2.5),
        ("1m 30s", 90.0),
        (" 5 ms ", 0.005),
        ("1.5m", 90.0),
        ("90", 90.0),
        (2, 2.0),
        (0.5, 0.5),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert durations.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad",
    # A space inside a number is a typo, never read past: "5 00ms" is not 500ms.
    [
        "5 minutes",
        "1d",
        "",
        "-1s",
        True,
        None,
        "1m30",
        "30s1",
        "m",
        "1m-30s",
        "1.m",
        "5 00ms",
        "1 5s",
        "1. 5s",
        "9 0",
    ],
)
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        durations.parse_duration(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(1000, "16m40s"), (100, "1m40s"), (3600, "1h"), (3723, "1h2m3s"), (0.25, "250ms"), (60, "1m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert durations.format_duration(seconds) == text
    assert durations.parse_duration(text) == seconds


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDD_POLICY__CONSECUTIVE_FAILURES", "5")
    monkeypatch.setenv("GUARDD_PROBE__INTERVAL", "250ms")
    monkeypatch.setenv("GUARDD_POLICY__DRY_RUN", "true")
    settings = config.load(EXAMPLE)
    assert settings.config.policy.consecutive_failures == 5
    assert settings.config.probe.interval == 0.25
    assert settings.config.policy.dry_run is True
    assert settings.config.policy.window == 60.0  # untouched keys stay from the file


def test_counts_of_probes_stop_at_what_a_window_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A count of probes beyond a window's capacity is refused, from the file
    (`testdata/invalid-probe-counts-huge`, `invalid-min-samples-beyond-window`) or from a
    variable; the capacity itself is accepted and reachable."""
    monkeypatch.setenv("GUARDD_POLICY__CONSECUTIVE_FAILURES", str(10**18))
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [
        "env GUARDD_POLICY__CONSECUTIVE_FAILURES: policy.consecutive_failures: must be <= 16384"
    ]
    for key in ("CONSECUTIVE_FAILURES", "PROMOTE_SUCCESSES", "MIN_SAMPLES"):
        monkeypatch.setenv(f"GUARDD_POLICY__{key}", str(MAX_SAMPLES))
    monkeypatch.setenv("GUARDD_PROBE__INTERVAL", "10ms")
    monkeypatch.setenv("GUARDD_PROBE__FAST_INTERVAL", "10ms")
    monkeypatch.setenv("GUARDD_POLICY__WINDOW", "3m")
    monkeypatch.setenv("GUARDD_QOS__WINDOW", "3m")
    policy = config.load(EXAMPLE).config.policy
    assert policy.min_samples == policy.consecutive_failures == MAX_SAMPLES
    window = SlidingWindow(policy.window)
    for i in range(MAX_SAMPLES + 10):
        window.add(i * 0.01, Outcome.HTTP_5XX, 0.001)
    assert window.stats(MAX_SAMPLES * 0.01).samples == policy.min_samples


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("16384.0", "must be an integer"),
        ("5.0", "must be an integer"),
        ("1e3", "must be an integer"),
        ("007", "must be an integer"),  # (TOML refuses leading zeros)
        ("true", "must be an integer"),
        ("inf", "must be an integer"),
        ("\u0663", "must be an integer"),  # an Arabic-Indic 3: int() would take it
        ("", "must be an integer"),
        ("1\nmax_rollbacks = 2", "must be an integer"),
        (str(10**30), "must be a 64-bit integer, as TOML's are"),
        ("9" * 5000, "must be a 64-bit integer, as TOML's are"),  # past int()'s own limit
        ("-" + "9" * 20, "must be a 64-bit integer, as TOML's are"),
    ],
)
def test_a_count_from_the_environment_is_held_to_what_the_file_may_say(
    monkeypatch: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    """A count in a variable is an integer as TOML writes it: not a float's text, nothing
    beyond TOML's 64-bit integers; each refused as `file: key: reason`."""
    monkeypatch.setenv("GUARDD_POLICY__MAX_ROLLBACKS", value)
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [
        f"env GUARDD_POLICY__MAX_ROLLBACKS: policy.max_rollbacks: {reason}"
    ]


@pytest.mark.parametrize(
    ("value", "count"),
    [(" 7 ", 7), ("+7", 7), ("0", 0), ("1_000", 1000), ("0x1F", 31), (str(2**63 - 1), 2**63 - 1)],
)
def test_a_count_from_the_environment_is_read_as_toml_reads_it(
    monkeypatch: pytest.MonkeyPatch, value: str, count: int
) -> None:
    monkeypatch.setenv("GUARDD_POLICY__MAX_ROLLBACKS", value)
    assert config.load(EXAMPLE).config.policy.max_rollbacks == count


def test_a_count_beyond_tomls_integers_is_refused_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "guardd.toml"
    path.write_text(
        re.sub(r"(?m)^max_rollbacks = 3 ", f"max_rollbacks = {2**64} ", EXAMPLE.read_text())
    )
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: policy.max_rollbacks: must be a 64-bit integer, as TOML's are"
    ]


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (
            "GUARDD_POLICY__P0_ERROR_RATIO",
            "1e400",
            "policy.p0_error_ratio: must be a finite number",
        ),
        ("GUARDD_POLICY__P0_ERROR_RATIO", "nan", "policy.p0_error_ratio: must be a finite number"),
        ("GUARDD_POLICY__P0_ERROR_RATIO", "true", "policy.p0_error_ratio: must be a number"),
        ("GUARDD_FLEET__ETCD", "[]", "fleet.etcd: must hold at least 1 item"),
        ("GUARDD_FLEET__NODE", "", "fleet.node: must not be empty"),
        (
            "GUARDD_PROBE__INTERVAL",
            "\u0663s",  # an Arabic-Indic 3: no duration, as no count
            'probe.interval: must be a duration such as "250ms", "3s", "1m30s" or seconds',
        ),
    ],
)
def test_odd_values_are_refused_in_guardds_words(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, reason: str
) -> None:
    """Never pydantic's own wording ("input should be a finite number", "list should have
    at least 1 item after validation"), and no boolean read as a number."""
    monkeypatch.setenv(name, value)
    if name.startswith("GUARDD_FLEET__"):
        monkeypatch.setenv(
            "GUARDD_FLEET__ETCD" if name.endswith("NODE") else "GUARDD_FLEET__NODE",
            '["http://127.0.0.1:2379"]' if name.endswith("NODE") else "lb-a",
        )
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [f"env {name}: {reason}"]


@pytest.mark.parametrize(
    ("value", "problems"),
    [
        (
            '{"status":"UP"',
            [
                (
                    "probe.expect_json: cannot be read: invalid JSON: Expecting ',' delimiter: "
                    "line 1 column 15 (char 14)"
                )
            ],
        ),
        (
            "[200,",
            [
                (
                    "probe.expect_status: cannot be read: invalid JSON: Expecting value: line 1 "
                    "column 6 (char 5)"
                )
            ],
        ),
        ("[200, 999]", ["probe.expect_status[1]: must be <= 599"]),
        ("3xx", ["probe.expect_status: must be one of '2xx', or a list"]),
    ],
)
def test_a_table_or_list_from_the_environment_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, value: str, problems: list[str]
) -> None:
    """Broken JSON is said as such (not `must be a table`), and a key that is a word or a
    list gets one line, not the two that contradict each other."""
    name = "GUARDD_PROBE__EXPECT_JSON" if value.startswith("{") else "GUARDD_PROBE__EXPECT_STATUS"
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [f"env {name}: {p}" for p in problems]


def test_a_boolean_in_the_file_is_no_number(tmp_path: Path) -> None:
    """`p0_error_ratio = true` was read as 1.0: a P0 rule that fires only at 100 %."""
    path = tmp_path / "guardd.toml"
    path.write_text(
        re.sub(r"(?m)^p0_error_ratio = \S+", "p0_error_ratio = true", EXAMPLE.read_text())
    )
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: policy.p0_error_ratio: must be a number, not true"
    ]


def test_bad_env_override_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("guardd_probe__expect_json", "[1]")  # named as it was set
    monkeypatch.setenv("GUARDD_POLICY__CONSECUTIVE_FAILURES", "0")
    monkeypatch.setenv("GUARDD_POLICY__NOPE", "1")
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [
        "env guardd_probe__expect_json: probe.expect_json: must be a table",
        "env GUARDD_POLICY__CONSECUTIVE_FAILURES: policy.consecutive_failures: must be >= 1",
        "env GUARDD_POLICY__NOPE: policy.nope: unknown key",
    ]


def test_a_notify_url_that_is_not_http_is_refused_offline_too(tmp_path: Path) -> None:
    """`check-config --offline` accepted `url = "ftp://..."` that the full check refused:
    the scheme needs no host to be judged (and the message never shows the URL)."""
    path = TESTDATA / "invalid-notify-url.toml"
    result = check_config(Path(path.name), TESTDATA, None, "--offline")
    assert result.returncode == 2
    assert result.stderr == path.with_suffix(".err").read_text()
    assert "WEBHOOKSECRET" not in result.stderr


def test_a_problem_inside_a_table_set_by_a_variable_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A variable that sets a table (JSON) or a whole section: a problem of a key inside it
    is that variable's, never blamed on the file."""
    monkeypatch.setenv("GUARDD_PROBE__HEADERS", '{"X-Api-Key": "Bearer x\\n"}')
    monkeypatch.setenv("GUARDD_QOS", '{"window": "soon"}')
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert sorted(str(p) for p in info.value.problems) == [
        (
            "env GUARDD_PROBE__HEADERS: probe.headers.X-Api-Key: the value must not contain "
            "CR, LF or other control characters"
        ),
        'env GUARDD_QOS: qos.window: must be a duration such as "250ms", "3s", "1m30s" or seconds',
    ]


def test_a_config_that_is_no_regular_file_or_too_large_is_refused_unread(tmp_path: Path) -> None:
    """A FIFO without a writer hung check-config (and replay, and every start); /dev/zero
    filled the memory; a file of gigabytes was read whole. Each is one line, exit 2, at
    once (the subprocess' timeout would fail a hang)."""
    fifo = tmp_path / "guard.toml"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (config.MAX_CONFIG_BYTES + 1))
    cases = {
        fifo: "cannot read: not a regular file (a FIFO)",
        Path("/dev/zero"): "cannot read: not a regular file (a character device)",
        tmp_path: "cannot read: not a regular file (a directory)",
        big: "larger than 1024 KiB",
    }
    for path, why in cases.items():
        result = check_config(path, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (2, f"{path}: (file): {why}\n"), result


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_a_number_that_is_not_finite_is_refused_wherever_it_is_set(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """TOML and JSON read `nan` and `inf` as numbers; a threshold of NaN compares false with
    everything (a rule that silently never fires): refused in the environment as in a file
    (`testdata/invalid-not-finite`)."""
    monkeypatch.setenv("GUARDD_POLICY__P1_ERROR_RATIO", value)
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [
        "env GUARDD_POLICY__P1_ERROR_RATIO: policy.p1_error_ratio: must be a finite number"
    ]


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("GUARDD_FLEET__ETCD", "http://127.0.0.1:2379", "fleet.etcd"),  # a list, not JSON
        ("GUARDD_PROBE__HEADERS", "Authorization: x", "probe.headers"),  # a table
        ("GUARDD_UPSTREAMS", "blue", "upstreams"),  # a whole section
        ("guardd_fleet__etcd", '["http://a:2379"', "fleet.etcd"),  # broken JSON, any case
    ],
)
def test_a_list_or_table_in_the_environment_that_is_not_json_is_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, key: str
) -> None:
    """What pydantic-settings cannot decode is `env NAME: key: reason`, never a traceback;
    a plain string set beside it for a string key is not blamed."""
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("GUARDD_FLEET__NODE", "lb-a")
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    said = (
        f"env {variable}: {key}: cannot be read: a list or a table set in the environment is "
        'written as JSON (["http://a:2379", "http://b:2379"], {"key": "value"})'
    )
    assert [str(p) for p in info.value.problems] == [said]


@pytest.mark.parametrize(
    ("variable", "said"),
    [
        # A list's item by its index: pydantic-settings makes a table of the list.
        ("GUARDD_NOTIFY__0__URL", ("notify: must be a list (the environment sets a list "
         "whole, as JSON: GUARDD_NOTIFY='[...]')")),
        # A key under a plain value: the value becomes a table.
        ("GUARDD_UPSTREAMS__BLUE__URL__X", "upstreams.blue.url: must be a string"),
        ("guardd_probe__timeout__ms", ('probe.timeout: must be a duration such as "250ms", '
         '"3s", "1m30s" or seconds')),
    ],
)  # fmt: skip
def test_a_variable_under_a_key_that_holds_no_table_is_blamed_not_the_file(
    monkeypatch: pytest.MonkeyPatch, variable: str, said: str
) -> None:
    monkeypatch.setenv(variable, "http://127.0.0.1:9/x")
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [f"env {variable}: {said}"]


LOAD_AND_LIST = """
import sys
from pathlib import Path
from guardd import config
c = config.load(Path(sys.argv[1])).config
print(c.policy.consecutive_failures, c.probe.interval, "pydantic_settings" in sys.modules,
      "dotenv" in sys.modules, type(c).__name__, isinstance(c, config.GuardConfig),
      "importlib.metadata" in sys.modules)
"""


def load_in_child(path: Path, env: dict[str, str]) -> list[str]:
    """What a fresh interpreter that loads `path` under `env` (besides the `GUARDD_*`-free
    part of ours) prints: consecutive_failures, interval, whether pydantic-settings and
    dotenv were imported, the config's class name, whether it is a GuardConfig, and
    whether pydantic looked for plugins (`importlib.metadata` imported)."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("GUARDD_")}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_LIST, str(path)],
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": str(Path(__file__).parents[1]), **env},
        timeout=60,
        check=True,
    )
    return done.stdout.split()


def test_a_config_set_by_its_file_alone_never_imports_pydantic_settings() -> None:
    # GUARDD_CONFIG and GUARDD_STATE_ROOT name no setting: they change nothing here.
    env = {"GUARDD_CONFIG": str(EXAMPLE), "GUARDD_STATE_ROOT": "/nonexistent"}
    assert load_in_child(EXAMPLE, env) == [
        "3", "1.0", "False", "False", "GuardConfig", "True", "False"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name", ["GUARDD_POLICY__CONSECUTIVE_FAILURES", "guardd_policy__consecutive_failures"]
)
def test_a_setting_in_the_environment_is_read_through_pydantic_settings(name: str) -> None:
    # Upper or lower case, as pydantic-settings reads them; a whole table as JSON too.
    env = {name: "5", "GUARDD_PROBE": '{"interval": "2s", "fast_interval": "1s"}'}
    out = load_in_child(EXAMPLE, env)
    assert out == ["5", "2.0", "True", "True", "GuardConfig", "True", "False"]


def test_a_top_level_key_in_another_case_reads_as_it_always_has(tmp_path: Path) -> None:
    # pydantic-settings matches the file's top-level keys without regard to case.
    path = tmp_path / "cased.toml"
    path.write_text(EXAMPLE.read_text().replace("\n[policy]\n", "\n[Policy]\n"))
    assert "[Policy]" in path.read_text()
    out = load_in_child(path, {"GUARDD_CONFIG": str(path)})
    assert out == ["3", "1.0", "True", "True", "GuardConfig", "True", "False"]


def test_defaults_follow_systemd_directories(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    text = EXAMPLE.read_text().replace('listen = "127.0.0.1:9105"', 'listen = ""')
    path = tmp_path / "threader.toml"
    path.write_text(text)
    s = config.load(path)
    assert s.state_dir == tmp_path / "state"
    assert s.control_socket == tmp_path / "run" / "threader.sock"
    assert s.lock_file == tmp_path / "run" / "threader.qos.lock"


def test_instance_defaults_to_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "checkout.toml"
    path.write_text(EXAMPLE.read_text().replace('instance = "threader"', ""))
    assert config.load(path).instance == "checkout"
    assert config.load(path, instance="other").instance == "other"


def test_secret_url_never_printed(tmp_path: Path) -> None:
    token = "T0SECRET/B0SECRET/abcdefghijklmnop"  # noqa: S105 - a fake, to prove it is hidden
    path = tmp_path / "n.toml"
    path.write_text(
        EXAMPLE.read_text()
        + '\n[[notify]]\nkind = "slack"\n'
        + f'url = "https://hooks.example.invalid/{token}"\nurl_env = "X"\n'
    )
    result = check_config(path, cwd=tmp_path)
    assert result.returncode == 2
    assert token not in result.stderr + result.stdout


HEADER_FILES = sorted(TESTDATA.glob("invalid-header-*.toml"))


@pytest.mark.parametrize("path", HEADER_FILES, ids=[p.stem for p in HEADER_FILES])
def test_a_refused_header_is_never_quoted(path: Path) -> None:
    # Every secret in these files is spelt SEKRET-...: not one may come back, whole or cut.
    assert len(HEADER_FILES) >= 3
    result = check_config(Path(path.name), cwd=TESTDATA)
    assert result.returncode == 2
    assert result.stderr.count("\n") >= 1
    assert "SEKRET" not in result.stderr + result.stdout
    assert "4f1c" not in result.stderr + result.stdout


def test_a_rule_across_keys_says_which_of_them_a_variable_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`qos.window` is the file's, `probe.interval` a variable's: the line names the file
    for the key it holds and the variable for the other half, where the fix may be."""
    path = tmp_path / "threader.toml"
    path.write_text(EXAMPLE.read_text().replace('window = "5m"', 'window = "20s"', 1))
    monkeypatch.setenv("GUARDD_PROBE__INTERVAL", "1000")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    lines = [str(p) for p in info.value.problems]
    assert any(
        line.startswith(f"{path}: ")
        and line.endswith("(probe.interval is set by env GUARDD_PROBE__INTERVAL)")
        for line in lines
    ), lines
    monkeypatch.delenv("GUARDD_PROBE__INTERVAL")
    path.write_text(EXAMPLE.read_text().replace('interval = "1s"', 'interval = "1000s"', 1))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert not [str(p) for p in info.value.problems if "set by env" in str(p)]


def test_a_header_in_the_environment_is_checked_as_in_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GUARDD_PROBE__HEADERS", '{"Authorization": "Bearer SEKRET-env-4f1c\\n"}')
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [
        (
            "env GUARDD_PROBE__HEADERS: probe.headers.Authorization: "
            "the value must not contain CR, LF or other control characters"
        ),
    ]


def test_headers_http_can_carry_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    headers = {
        "Authorization": "Bearer abc.def-ghi_jkl~mno+/=",
        "X-Words": "several words\twith a tab",
        "X-Empty": "",
        "!#$%&'*+-.^_`|~09azAZ": "every token character",
    }
    table = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in headers.items())
    text = EXAMPLE.read_text()
    assert "\nheaders = {}" in text
    path.write_text(text.replace("\nheaders = {}", f"\nheaders = {{ {table} }}"))
    assert config.load(path).config.probe.headers == headers


def test_the_readme_s_rules_and_signals_examples_are_valid(tmp_path: Path) -> None:
    """The TOML of the README's "Rules" and "Signals" sections loads as it is written."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    base = (
        '[upstreams.blue]\nurl = "http://127.0.0.1:9009/healthz"\n'
        '[upstreams.green]\nurl = "http://127.0.0.1:9010/healthz"\n'
        '[switch]\nkind = "state-file"\npath = "/tmp/deploy-state.json"\n'
    )
    checked = 0
    for title in ("Rules", "Signals"):
        section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```toml\n(.*?)```", section, re.DOTALL):
            text = textwrap.dedent(block)
            if "[signals." not in text:  # rules over a signal the section declared earlier
                text = (
                    '[signals.traffic]\nkind = "access_log"\nsource = "file:/var/log/x.log"\n'
                    + text
                )
            path = tmp_path / f"{title}-{checked}.toml"
            path.write_text(base + text)
            config.load(path)
            checked += 1
    assert checked >= 2


def test_the_summary_of_a_fleet_node_names_it_and_its_etcd_members(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        UPSTREAMS
        + '[switch]\nkind = "state-file"\npath = "/tmp/guardd-state.json"\n'
        + '[fleet]\netcd = ["http://10.0.0.21:2379", "http://10.0.0.22:2379"]\nnode = "lb-b"\n'
    )
    result = check_config(path, tmp_path, None, "--offline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(" notify=0 fleet=lb-b@2etcd"), result.stdout


SPY_PLUGIN = """
import os

class Spy:
    def new_schema_validator(self, schema, schema_type, schema_type_path, schema_kind, config,
                             plugin_settings):
        with open(os.environ["SPY_SEEN"], "a") as f:
            f.write(f"{schema_type_path.name}\\n")
        return None, None, None

plugin = Spy()
"""


def test_a_pydantic_plugin_installed_beside_guardd_never_sees_a_config(tmp_path: Path) -> None:
    # A distribution registering a `pydantic` entry point, as an observability SDK does;
    # a model of its own shows that pydantic would call it in this interpreter.
    site = tmp_path / "site"
    dist = site / "spy_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: spy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pydantic]\nspy = spy_plugin:plugin\n")
    (site / "spy_plugin.py").write_text(SPY_PLUGIN)
    seen = tmp_path / "seen"
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(site)])}
    own_model = "import pydantic\nclass Own(pydantic.BaseModel):\n    x: int = 0\n"
    for code in (own_model, LOAD_AND_LIST):
        subprocess.run(
            [sys.executable, "-c", code, str(EXAMPLE)],
            env={**os.environ, **env, "SPY_SEEN": str(seen)},
            capture_output=True,
            timeout=60,
            check=True,
        )
        if code == own_model:
            # Without guardd, pydantic hands the plugin every model it builds.
            assert seen.read_text().split() == ["Own"]
            seen.unlink()
    assert not seen.exists(), seen.read_text()


@pytest.mark.parametrize(
    "spelt",
    [
        "http://127.0.0.1:9009/healthz",
        "HTTP://127.0.0.1:9009/healthz",
        "http://127.0.0.1:9009/healthz/",
    ],
)
def test_one_url_spelt_two_ways_is_still_one_url(spelt: str, tmp_path: Path) -> None:
    """The scheme's case, a trailing slash: the same URL for both colors, or for the front
    door and a color, is refused however it is spelt."""
    switch = '[switch]\nkind = "state-file"\npath = "/tmp/s.json"\n'
    blue = '[upstreams.blue]\nurl = "http://127.0.0.1:9009/healthz"\n'
    (tmp_path / "both.toml").write_text(f'{blue}[upstreams.green]\nurl = "{spelt}"\n{switch}')
    done = check_config(Path("both.toml"), tmp_path, None, "--offline")
    assert done.returncode == 2 and "upstreams.blue probes too" in done.stderr, done.stderr
    green = '[upstreams.green]\nurl = "http://127.0.0.1:9010/healthz"\n'
    (tmp_path / "door.toml").write_text(f'{blue}{green}{switch}verify_url = "{spelt}"\n')
    done = check_config(Path("door.toml"), tmp_path, None, "--offline")
    assert done.returncode == 2, done
    assert "switch.verify_url: is a URL of upstreams.blue" in done.stderr, done.stderr
