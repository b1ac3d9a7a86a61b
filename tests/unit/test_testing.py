"""The public test helpers keep the contracts of the parts they stand in for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardd.core.types import Outcome
from guardd.exceptions import CommandFailed, ConfigError, SwitchError, SwitchRejected
from guardd.probes.http import ProbeSpec
from guardd.switchers import COMMAND_STEPS, NGINX_STEPS, STATE_FILE_STEPS, Switcher
from guardd.testing import (
    FedSignal,
    ManualClock,
    MemorySwitcher,
    MockProber,
    SimulatedCrash,
    SwitchStep,
    SwitchTarget,
    build_guard,
)

pytestmark = pytest.mark.anyio


# ---- ManualClock -----------------------------------------------------------------------


def test_the_clock_moves_only_when_told() -> None:
    clock = ManualClock(monotonic=5.0, wall=1_000.0)
    assert (clock.monotonic(), clock.wall()) == (5.0, 1_000.0)
    clock.advance(2.5)
    assert (clock.monotonic(), clock.wall()) == (7.5, 1_002.5)
    clock.step_wall(-3600.0)  # an NTP step back: the monotonic clock does not follow
    assert (clock.monotonic(), clock.wall()) == (7.5, -2_597.5)
    with pytest.raises(ValueError, match="never goes back"):
        clock.advance(-0.1)
    assert clock.monotonic() == 7.5


# ---- MemorySwitcher --------------------------------------------------------------------


def named_after(switcher: MemorySwitcher, op: str) -> list[tuple[str, str | None]]:
    return [(s.step, s.named) for s in switcher.steps_taken if s.op == op]


async def test_the_memory_switcher_is_a_switcher_that_passes_nginx_steps() -> None:
    heard: list[str] = []

    async def hook(step: str) -> None:
        heard.append(step)

    sw = MemorySwitcher("green", on_step=hook)
    assert isinstance(sw, Switcher)
    await sw.switch("blue")
    assert sw.steps_taken == [
        SwitchStep("switch", "link_written", "green"),
        SwitchStep("switch", "renamed", "blue"),
        SwitchStep("switch", "tested", "blue"),
        SwitchStep("switch", "reloaded", "blue"),
    ]
    assert heard == list(NGINX_STEPS)
    assert sw.target == SwitchTarget("blue", "blue")
    assert await sw.read_active() == "blue"


@pytest.mark.parametrize(
    ("step", "kind", "failed_as", "undo"),
    [
        ("link_written", SwitchError, "switch", []),
        ("renamed", SwitchError, "switch", []),
        ("tested", SwitchRejected, "test", [("renamed", "green")]),
        ("reloaded", CommandFailed, "reload", [("renamed", "green"), ("reloaded", "green")]),
    ],
)
async def test_a_failed_step_is_undone_and_named_as_the_journal_names_it(
    step: str, kind: type[SwitchError], failed_as: str, undo: list[tuple[str, str]]
) -> None:
    sw = MemorySwitcher("green")
    sw.fail(step)
    with pytest.raises(kind) as caught:
        await sw.switch("blue")
    assert caught.value.step == failed_as
    assert named_after(sw, "undo") == undo
    assert sw.target == SwitchTarget("green", "green")
    assert await sw.read_active() == "green"
    await sw.switch("blue")  # told to fail once: the next switch goes through
    assert sw.target == SwitchTarget("blue", "blue")


async def test_a_planted_error_is_raised_as_a_real_switcher_raises_it() -> None:
    sw = MemorySwitcher("green")
    sw.fail("reloaded", error=TimeoutError())
    with pytest.raises(CommandFailed, match="timed out") as caught:
        await sw.switch("blue")
    assert caught.value.step == "reload"
    sw.fail("renamed", error=PermissionError(13, "Permission denied"))
    with pytest.raises(SwitchError, match="Permission denied") as other:
        await sw.switch("blue")
    assert other.value.step == "switch"


async def test_an_undo_that_fails_leaves_a_note_and_the_switch_in_flight() -> None:
    sw = MemorySwitcher("green")
    sw.fail("reloaded")
    sw.fail("reloaded", op="undo")
    with pytest.raises(CommandFailed) as caught:
        await sw.switch("blue")
    assert "the undo failed" in " ".join(caught.value.__notes__)
    # The target is back; its reload is still owed, and the record stays to say so.
    assert sw.target == SwitchTarget("green", "green", True, "green", "blue")
    assert await sw.read_active() == "green"
    sw.steps_taken.clear()
    await sw.recover()
    assert named_after(sw, "recover") == [("tested", "green"), ("reloaded", "green")]
    assert sw.target == SwitchTarget("green", "green")


async def test_restore_and_reapply_pass_the_same_steps_and_can_fail() -> None:
    sw = MemorySwitcher("green")
    await sw.switch("blue")
    await sw.restore("green")
    assert named_after(sw, "restore") == [
        ("link_written", "blue"),
        ("renamed", "green"),
        ("tested", "green"),
        ("reloaded", "green"),
    ]
    await sw.reapply()
    assert named_after(sw, "reapply") == [("tested", "green"), ("reloaded", "green")]
    assert sw.reapplied == 1
    sw.fail("reloaded", op="reapply")
    with pytest.raises(CommandFailed) as caught:
        await sw.reapply()
    assert caught.value.step == "reload"
    sw.rejected.add("green")
    with pytest.raises(SwitchRejected):
        await sw.reapply()
    assert sw.reapplied == 1
    sw.rejected.clear()
    sw.fail("tested", op="restore")
    await sw.switch("blue")  # only a restore fails at the test
    with pytest.raises(SwitchRejected):
        await sw.restore("green")
    assert sw.target == SwitchTarget("blue", "blue")


@pytest.mark.parametrize("step", NGINX_STEPS)
async def test_nginx_kind_recovery_leaves_the_service_running_what_is_named(step: str) -> None:
    sw = MemorySwitcher("green")
    sw.crash_after(step)
    with pytest.raises(SimulatedCrash):
        await sw.switch("blue")
    assert sw.target.switching
    assert await sw.read_active() == "green"  # the record names the committed color
    after = sw.restarted()
    assert after.steps_taken == []
    await after.recover()
    t = after.target
    assert not t.switching
    assert t.running == t.named == ("green" if step == "link_written" else "blue")


async def test_nginx_kind_recovery_puts_back_a_target_that_is_now_rejected() -> None:
    sw = MemorySwitcher("green")
    sw.crash_after("renamed")
    with pytest.raises(SimulatedCrash):
        await sw.switch("blue")
    after = sw.restarted()
    after.rejected.add("blue")
    await after.recover()
    assert after.target == SwitchTarget("green", "green")
    assert named_after(after, "recover") == [
        ("renamed", "green"),
        ("tested", "green"),
        ("reloaded", "green"),
    ]
    after.rejected.add("green")  # neither is accepted now: refused, record cleared
    with pytest.raises(SwitchRejected):
        await after.recover()
    assert not after.target.switching


async def test_state_file_and_command_kinds_recover_as_theirs_do() -> None:
    sf = MemorySwitcher("green", steps=STATE_FILE_STEPS)
    sf.crash_after("written")
    with pytest.raises(SimulatedCrash):
        await sf.switch("blue")
    assert sf.target == SwitchTarget("blue", "green", True, "green", "blue")
    sf = sf.restarted()
    await sf.recover()  # reloads: the app runs what the file says
    assert named_after(sf, "recover") == [("reloaded", "blue")]
    assert sf.target == SwitchTarget("blue", "blue")

    cmd = MemorySwitcher("green", steps=COMMAND_STEPS)
    cmd.crash_after("ran")
    with pytest.raises(SimulatedCrash):
        await cmd.switch("blue")
    cmd = cmd.restarted()
    await cmd.recover()  # runs the interrupted switch again
    assert named_after(cmd, "recover") == [("ran", "blue")]
    assert cmd.target == SwitchTarget("blue", "blue")


def test_a_switcher_refuses_steps_it_does_not_have() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        MemorySwitcher(steps=("tested", "reloaded"))
    with pytest.raises(ValueError, match="not one of this switcher's steps"):
        MemorySwitcher(steps=STATE_FILE_STEPS).fail("tested")


async def test_a_switcher_kept_in_a_file_reads_an_external_switch(tmp_path: Path) -> None:
    path = tmp_path / "target"
    path.write_text("green")
    sw = MemorySwitcher(path=path)
    assert await sw.read_active() == "green"
    await sw.switch("blue")
    assert json.loads(path.read_text())["named"] == "blue"
    path.write_text("green\n")  # someone switched by hand
    assert await sw.read_active() == "green"
    for garbled in ("purple", "{not json", '["blue"]', ""):
        path.write_text(garbled)
        assert await sw.read_active() is None, garbled


# ---- MockProber ------------------------------------------------------------------------


async def test_the_mock_prober_judges_answers_with_the_real_prober() -> None:
    prober = MockProber(["http://green.test/health"])
    try:
        assert (await prober.probe()).outcome is Outcome.OK
        prober.answer(503, "db down")
        down = await prober.probe()
        assert (down.outcome, down.status, down.error) == (
            Outcome.HTTP_5XX,
            503,
            "HTTP 503 db down",
        )
        prober.answer(404)
        assert (await prober.probe()).outcome is Outcome.HTTP_OTHER
        prober.refuse()
        refused = await prober.probe()
        assert refused.outcome is Outcome.CONNECT_ERROR
        assert refused.error == "connection refused (green.test:80)"
        prober.time_out()
        late = await prober.probe()
        assert (late.outcome, late.error) == (Outcome.TIMEOUT, "no answer within 2s")
        assert len(prober.requests) == 5
        assert prober.requests[0].headers["Connection"] == "close"
    finally:
        await prober.aclose()


async def test_the_mock_prober_applies_expect_json_and_the_quorum() -> None:
    spec = ProbeSpec(expect_json={"status": "UP"})
    prober = MockProber(
        ["http://a.test/", "http://b.test/", "http://c.test/"], spec, quorum="majority"
    )
    try:
        prober.answer(json={"status": "UP"})
        assert (await prober.probe()).ok

        def one_down(request: httpx.Request) -> httpx.Response:
            status = "DOWN" if request.url.host == "a.test" else "UP"
            return httpx.Response(200, json={"status": status})

        prober.handle_with(one_down)
        assert (await prober.probe()).ok  # 2 of 3 is a majority
        prober.answer(json={"status": "DOWN"})
        failed = await prober.probe()
        assert failed.outcome is Outcome.BODY_MISMATCH
        assert failed.error is not None and failed.error.startswith("0/3 passed (quorum majority)")
    finally:
        await prober.aclose()


# ---- FedSignal -------------------------------------------------------------------------


def test_a_fed_signal_says_nothing_until_fed_and_then_the_newest_reading() -> None:
    signal = FedSignal("edge", kind="access_log", window_s=30.0)
    assert signal.reading("green", 100.0) is None
    signal.feed("green", samples=40, stats={"error_ratio": 0.25, "p95_ms": 80.0}, now=110.0)
    first = signal.feed("green", samples=10, stats={"error_ratio": 0.0}, now=100.0)
    assert signal.reading("green", 99.0) is None  # fed for a later moment only
    assert signal.reading("green", 105.0) == first
    newest = signal.reading("green", 200.0)
    assert newest is not None
    assert (newest.samples, newest.stats, newest.last_at, newest.window_s) == (
        40,
        {"error_ratio": 0.25, "p95_ms": 80.0},
        110.0,
        30.0,
    )
    assert signal.reading("blue", 200.0) is None
    signal.clear("green")
    assert signal.reading("green", 200.0) is None


def test_a_fed_signal_refuses_statistics_its_kind_does_not_yield() -> None:
    with pytest.raises(ValueError, match=r"a probe signal yields no \['p99_ms'\]"):
        FedSignal(kind="probe").feed("blue", samples=3, stats={"p99_ms": 1.0}, now=0.0)
    with pytest.raises(ValueError, match="samples must be >= 0"):
        FedSignal().feed("blue", samples=-1, stats={}, now=0.0)
    # A kind guardd does not know: any statistic goes.
    FedSignal(kind="elsewhere").feed("blue", samples=1, stats={"anything": 1.0}, now=0.0)


# ---- imports ---------------------------------------------------------------------------


def test_the_daemon_never_imports_the_helpers_and_they_never_import_pytest() -> None:
    code = (
        "import sys\n"
        "import guardd.cli, guardd.ctl, guardd.supervisor, guardd.guard\n"
        "assert 'guardd.testing' not in sys.modules, 'the daemon imports guardd.testing'\n"
        "import guardd.testing\n"
        "assert 'pytest' not in sys.modules, 'guardd.testing imports pytest'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# ---- a guard from a config file --------------------------------------------------------

README = Path(__file__).parents[2] / "README.md"


def quickstart_config() -> str:
    """The config file the README's quickstart writes."""
    found = re.search(
        r"cat >/etc/guardd/threader.toml <<'EOF'\n(.*?)\nEOF\n", README.read_text(), re.DOTALL
    )
    assert found is not None, "the quickstart writes /etc/guardd/threader.toml"
    return found[1]


async def test_the_readme_example_runs_on_the_quickstart_config(tmp_path: Path) -> None:
    text = README.read_text()
    block = re.search(r"<!-- docs-test: testing -->\n```python\n(.*?)\n```\n", text, re.DOTALL)
    assert block is not None, "the README's guardd.testing example"
    config = tmp_path / "threader.toml"
    config.write_text(quickstart_config())
    code = block[1].replace('Path("/etc/guardd/threader.toml")', f"Path({str(config)!r})")
    assert code != block[1]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    (example,) = [v for k, v in namespace.items() if k.startswith("test_")]
    await example(tmp_path / "rig")


async def test_a_guard_built_from_a_config_file_runs_its_policy_and_probes(tmp_path: Path) -> None:
    config = tmp_path / "threader.toml"
    config.write_text(
        quickstart_config().replace("[policy]\n", "[policy]\nconsecutive_failures = 2\n")
    )
    async with build_guard(tmp_path / "rig", config=config) as rig:
        s = rig.guard.s
        assert (s.instance, s.policy.rollback_to, s.policy.consecutive_failures) == (
            "threader",
            "blue",
            2,
        )
        assert s.lock_file == tmp_path / "rig" / "run" / "threader.qos.lock"
        assert rig.switcher.steps == NGINX_STEPS
        assert rig.probers["green"].urls == ["http://127.0.0.1:9010/healthz"]
        assert rig.front_door is not None
        assert rig.front_door.urls == ["http://127.0.0.1/healthz"]
        # The file's expect_json judges the answers: a 200 that says DOWN is a failure.
        rig.probers["blue"].answer(json={"status": "UP"})
        rig.probers["green"].answer(json={"status": "UP"})
        await rig.probe_rounds(10)
        rig.probers["green"].answer(json={"status": "DOWN"})
        await rig.probe_rounds(2)
        (started,) = rig.events("rollback_started")
        assert started["evidence"]["rule"] == "consecutive_failures"
        assert "expect_json" in started["evidence"]["last_error"]
        assert rig.guard.active == "blue"
        # The front door answered as what runs: verified on blue's answers.
        assert rig.front_door.requests[-1].url.host == "127.0.0.1"


async def test_a_state_file_config_gets_a_switcher_with_its_steps(tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text(
        '[upstreams.blue]\nurl = "http://127.0.0.1:9009/"\n'
        '[upstreams.green]\nurl = "http://127.0.0.1:9010/"\n'
        '[switch]\nkind = "state-file"\npath = "/srv/app/state.json"\n'
    )
    rig = build_guard(tmp_path / "rig", config=config)
    try:
        assert rig.switcher.steps == ("written",)  # no reload command: the app reads the file
        assert rig.front_door is None
    finally:
        await rig.aclose()


def test_a_config_file_and_settings_are_one_or_the_other(tmp_path: Path) -> None:
    config = tmp_path / "threader.toml"
    config.write_text(quickstart_config())
    with pytest.raises(ValueError, match="one or the other"):
        build_guard(tmp_path / "rig", config=config, interval=2.0)
    config.write_text("[probe]\ninterval = 'soon'\n")
    with pytest.raises(ConfigError):
        build_guard(tmp_path / "rig", config=config)
