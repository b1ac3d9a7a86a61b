"""Security faults: shell metacharacters, unprivileged callers, leaked secrets, planted symlinks.

What docs/contract.md §1/§3/§7 promise is checked against a running daemon: commands are argv
lists and never meet a shell, a caller who is not an admin changes nothing however the
request is crafted, secrets never reach a file or a log line, and guardd never writes
through a symlink planted where its own files belong.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guardd.control import protocol
from tests.faults.util import FaultLab, MakeFaultLab, guardctl_json, status
from tests.harness.daemon import GUARDD, guardctl, log_lines, nobody_prefix, wait_until
from tests.harness.paths import shared_tmp_dir
from tests.harness.receiver import closed_port

pytestmark = pytest.mark.nginx
TESTDATA = Path(__file__).parents[1] / "testdata"

# Written by the switch command itself; the daemon must pass every argument literally.
RECORDER = """\
import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(sys.argv[2:]) + "\\n")
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged uid can reach (pytest's tmp dirs are 0700)."""
    with shared_tmp_dir("guardd-faults-") as path:
        yield path


# ---- no shell, ever -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["invalid-shell-instance", "invalid-color-name"])
def test_shell_metacharacters_in_names_are_rejected_by_validation(name: str) -> None:
    result = subprocess.run(
        [*GUARDD, "check-config", f"{name}.toml"],
        cwd=TESTDATA,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (TESTDATA / f"{name}.err").read_text().strip()


def test_switch_command_with_shell_metacharacters_is_passed_literally(
    make_lab: MakeFaultLab, tmp_path: Path
) -> None:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    calls = tmp_path / "calls.jsonl"
    canary = tmp_path / "pwned"
    hostile_args = [
        "{color}",
        "{instance}",
        f"x; touch {canary}",
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"| touch {canary}",
        f"&& touch {canary}",
        "*",
        "~",
        "$HOME",
        "'quoted'",
        '"double"',
        "a\nb",
    ]
    lab: FaultLab = make_lab(
        switch__kind="command",
        switch__verify_url=None,
        switch__command=[sys.executable, str(recorder), str(calls), *hostile_args],
    )
    # A command leaves nothing guardd can read back: seed its record of the active color.
    lab.state_dir.mkdir()
    (lab.state_dir / "command-switch.json").write_text(
        json.dumps({"activeColor": "green", "pending": None})
    )
    d = lab.daemon()
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    argv = [json.loads(line) for line in calls.read_text().splitlines()]
    expected = ["blue", "lab", *hostile_args[2:]]
    assert argv == [expected], "every argument arrived as written, one argv entry each"
    assert not canary.exists(), "a shell ran"
    assert d.stop() == 0


# ---- the control socket ----------------------------------------------------------------


def test_handcrafted_mutations_from_an_unprivileged_uid_change_nothing(
    make_lab: MakeFaultLab, shared_dir: Path
) -> None:
    # tests/e2e/test_guardctl.py checks guardctl's exit code 4; this one skips guardctl and
    # writes raw requests, the way a hostile local client would.
    lab: FaultLab = make_lab(run_dir=shared_dir)
    d = lab.daemon()
    count = len(d.events())
    requests: list[dict[str, Any]] = [
        {"cmd": "rollback", "args": {"reason": "x"}},
        {"cmd": "switch", "args": {"color": "blue", "force": True}},
        {"cmd": "pause"},
        {"cmd": "resume"},
        {"cmd": "promote"},
        {"cmd": "qos_lock", "args": {"for_s": 60}},
        {"cmd": "qos_unlock"},
    ]
    script = (
        "import json, socket, sys\n"
        "for line in sys.stdin:\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "    s.sendall(line.encode()); print(s.makefile().readline().strip()); s.close()\n"
    )
    lines = "".join(json.dumps({"v": protocol.VERSION, **r}) + "\n" for r in requests)
    lines += json.dumps({"v": protocol.VERSION, "cmd": "status"}) + "\n"
    result = subprocess.run(
        [
            *nobody_prefix(),
            sys.executable,
            "-I",
            "-c",
            script,
            str(lab.socket_path),
        ],
        input=lines,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    replies = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["error"]["code"] for r in replies[:-1]] == ["not_permitted"] * len(requests)
    assert replies[-1]["ok"] is True, "reading is allowed"
    assert "uid:65534" in replies[0]["error"]["message"]
    assert len(d.events()) == count, "nothing was journaled"
    assert lab.nginx.served_color() == "green" and not lab.lock_file.exists()
    assert status(lab)["paused"] is False
    assert d.stop() == 0


# ---- secrets ---------------------------------------------------------------------------


def test_secrets_never_reach_logs_files_or_answers(make_lab: MakeFaultLab) -> None:
    # Fake secrets, made up here so the test can hunt for them everywhere afterwards.
    hook_token = "T0KEN-hook-7d1f0c9a2b"  # noqa: S105
    header_token = "s3cr3t-bearer-5e8a1b"  # noqa: S105
    api_key = "k3y-api-0f9e8d7c6b"
    hook = f"http://127.0.0.1:{closed_port()}/hooks/{hook_token}"
    lab: FaultLab = make_lab(
        metrics__listen="127.0.0.1:0",
        probe__headers={"Authorization": f"Bearer {header_token}", "X-Api-Key": api_key},
        extra_toml='\n[[notify]]\nkind = "webhook"\nurl_env = "GUARDD_TEST_HOOK"\n'
        'events = ["rollback", "qos_released", "alert"]\n',
    )
    d = lab.daemon(env={"GUARDD_TEST_HOOK": hook})
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    # Let the failing deliveries be retried and logged.
    wait_until(
        lambda: any(
            line.get("event", "").startswith("notif") and line.get("level") in ("warning", "error")
            for line in log_lines(d)
        ),
        30,
        "a failed delivery in the log",
    )
    surfaces = {
        "log": d.log(),
        "status": json.dumps(guardctl_json(lab, "status")),
        "history": json.dumps(guardctl_json(lab, "history")),
        "check-config": subprocess.run(
            [*GUARDD, "check-config", str(lab.config_path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env={"GUARDD_TEST_HOOK": hook, "PATH": "/usr/bin"},
        ).stdout,
    }
    assert d.stop() == 0
    for path in [*lab.state_dir.rglob("*"), lab.run_dir / "lab.qos.lock"]:
        if path.is_file():
            surfaces[str(path)] = path.read_text(errors="replace")
    for where, text in surfaces.items():
        for secret in (hook_token, header_token, api_key):
            assert secret not in text, f"{secret!r} leaked into {where}"


# ---- planted symlinks ------------------------------------------------------------------


def test_symlink_planted_at_the_lock_path_is_never_followed(
    make_lab: MakeFaultLab, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lab: FaultLab = make_lab()
    lab.lock_file.symlink_to(victim)
    d = lab.daemon()
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20), "the rollback still ran"
    wait_until(
        lambda: any(
            line.get("event") == "storage_write_failed" and line["kind"] == "lock"
            for line in log_lines(d)
        ),
        10,
        "the refused lock write",
    )
    assert victim.read_text() == "precious\n", "the symlink was followed"
    assert lab.lock_file.is_symlink()
    # Something is at the lock path, so deploys stay blocked: fail safe, not open.
    qos = guardctl("qos", "status", "--json", "--config", str(lab.config_path))
    assert qos.returncode == 1 and json.loads(qos.stdout)["locked"] is True
    assert status(lab)["storage"]["ok"] is False
    assert d.stop() == 0
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["events.jsonl", "state.json"])
def test_symlink_planted_at_a_state_file_is_refused_at_start(
    make_lab: MakeFaultLab, tmp_path: Path, name: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lab: FaultLab = make_lab()
    lab.state_dir.mkdir()
    (lab.state_dir / name).symlink_to(victim)
    d = lab.daemon(notify=False)
    assert d.proc is not None
    d.proc.wait(30)
    assert d.stop() == 1, "a fatal runtime error, not a silent follow"
    failed = [line for line in log_lines(d) if line.get("event") == "startup_failed"]
    assert failed and "symlink" in failed[0]["error"], d.log()[-2000:]
    assert victim.read_text() == "precious\n"
    assert (lab.state_dir / name).is_symlink()
    assert lab.nginx.served_color() == "green", "nothing was switched on the way down"


def test_symlink_planted_at_the_temp_file_is_replaced_not_followed(
    make_lab: MakeFaultLab, tmp_path: Path
) -> None:
    # atomic_write's temp name is fixed; a link planted there must not redirect the write.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lab: FaultLab = make_lab()
    lab.state_dir.mkdir()
    (lab.state_dir / ".state.json.guardd-tmp").symlink_to(victim)
    (lab.run_dir / ".lab.qos.lock.guardd-tmp").symlink_to(victim)
    d = lab.daemon()
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked")
    wait_until(lambda: d.state().get("active") == "blue", 10, "state.json written")
    assert json.loads(lab.lock_file.read_text())["by"] == "guardd"
    assert victim.read_text() == "precious\n"
    assert not lab.lock_file.is_symlink() and not (lab.state_dir / "state.json").is_symlink()
    assert d.stop() == 0
