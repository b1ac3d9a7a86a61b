"""Config: table tests of invalid files with their exact messages, env overrides, durations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guardd import config
from guardd.exceptions import ConfigError

TESTDATA = Path(__file__).parent / "testdata"
EXAMPLE = Path(__file__).parents[1] / "config" / "example.toml"
INVALID = sorted(TESTDATA.glob("invalid-*.toml"))


def check_config(
    path: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardd.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_config_is_rejected_with_its_exact_message(path: Path) -> None:
    expected = path.with_suffix(".err").read_text()
    result = check_config(Path(path.name), cwd=TESTDATA)
    assert result.returncode == 2
    assert result.stderr == expected
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_every_invalid_file_has_a_message() -> None:
    assert len(INVALID) >= 15
    assert all(p.with_suffix(".err").read_text().strip() for p in INVALID)


def test_example_config_is_valid() -> None:
    result = check_config(EXAMPLE, cwd=EXAMPLE.parent)
    assert result.returncode == 0, result.stderr
    assert "ok: instance=threader" in result.stdout


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
        (2, 2.0),
        (0.5, 0.5),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "1d", "", "-1s", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        config.parse_duration(bad)


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDD_POLICY__CONSECUTIVE_FAILURES", "5")
    monkeypatch.setenv("GUARDD_PROBE__INTERVAL", "250ms")
    monkeypatch.setenv("GUARDD_POLICY__DRY_RUN", "true")
    settings = config.load(EXAMPLE)
    assert settings.config.policy.consecutive_failures == 5
    assert settings.config.probe.interval == 0.25
    assert settings.config.policy.dry_run is True
    assert settings.config.policy.window == 60.0  # untouched keys stay from the file


def test_bad_env_override_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDD_POLICY__CONSECUTIVE_FAILURES", "0")
    monkeypatch.setenv("GUARDD_POLICY__NOPE", "1")
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE)
    assert [str(p) for p in info.value.problems] == [
        "env GUARDD_POLICY__CONSECUTIVE_FAILURES: policy.consecutive_failures: must be >= 1",
        "env GUARDD_POLICY__NOPE: policy.nope: unknown key",
    ]


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
