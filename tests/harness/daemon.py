"""A real `guardd run` process for end-to-end tests, and the lab it guards.

`Lab` starts two real upstreams and a private nginx, writes a config pointing at
them, and runs guardd against it with a real `NOTIFY_SOCKET`; tests then wait on
journal lines, files and sd_notify messages — never on fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from tests.harness.jsondoc import json_object
from tests.harness.nginx import Nginx
from tests.harness.notify_socket import NotifySocket
from tests.harness.upstream import Upstream

GUARDD = [sys.executable, "-m", "guardd.cli"]
GUARDCTL = Path(sys.executable).with_name("guardctl")
NOBODY = 65534


def nobody_prefix(as_nobody: bool = True) -> list[str]:
    """The words that run the command after them as `nobody` (uid and gid NOBODY, no
    supplementary groups); none when `as_nobody` is false."""
    return (
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if as_nobody else []
    )


def guardctl(
    *argv: str,
    socket: Path | None = None,
    as_nobody: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run the real guardctl, optionally as an unprivileged uid."""
    prefix = nobody_prefix(as_nobody)
    sock = ["--socket", str(socket)] if socket is not None else []
    return subprocess.run(
        [*prefix, str(GUARDCTL), *sock, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


class Daemon:
    """One `guardd run` process with its stderr captured to a file."""

    def __init__(
        self,
        config: Path,
        state_dir: Path,
        *,
        env: dict[str, str] | None = None,
        notify: NotifySocket | None = None,
        extra_args: list[str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.config = config
        self.prefix = prefix or []
        self.state_dir = state_dir
        self.journal_path = state_dir / "events.jsonl"
        self.state_path = state_dir / "state.json"
        self.log_path = config.with_suffix(f".{int(time.monotonic() * 1000)}.log")
        self.notify = notify
        self.env = {**os.environ, **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None)
        if notify is not None:
            self.env["NOTIFY_SOCKET"] = str(notify.path)
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        """Start the process (do not wait for READY)."""
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*self.prefix, *GUARDD, "run", "--config", str(self.config), *self.extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=Path(__file__).resolve().parents[2],
        )
        return self

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0, after: int = 0) -> float:
        """Wait for READY=1 on the notify socket; returns its arrival time."""
        assert self.notify is not None, "wait_ready needs a NotifySocket"
        try:
            _, at, _ = self.notify.wait_for("READY=1", timeout, after=after)
        except AssertionError:
            raise AssertionError(f"no READY=1; daemon log:\n{self.log()}") from None
        return at

    def log(self) -> str:
        """What the daemon printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """The journal's well-formed lines."""
        if not self.journal_path.exists():
            return []
        out = []
        for line in self.journal_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def raw_journal(self) -> str:
        """The journal file as bytes on disk, decoded."""
        return self.journal_path.read_text() if self.journal_path.exists() else ""

    def wait_event(
        self,
        name: str,
        timeout: float = 30.0,
        after: int = 0,
        where: Callable[[dict[str, Any]], bool] = lambda _e: True,
    ) -> dict[str, Any]:
        """The first journal event `name` at index >= `after` matching `where`."""

        def find() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"guardd exited with {self.proc.returncode} while waiting "
                    f"for {name}; log:\n{self.log()[-4000:]}"
                )
            for e in self.events()[after:]:
                if e.get("event") == name and where(e):
                    return e
            return None

        try:
            # wait_until returns Any: whatever truthy value `find` gave, here a dict.
            return wait_until(find, timeout, f"journal event {name}")  # type: ignore[no-any-return]
        except AssertionError as e:
            raise AssertionError(
                f"{e}\nevents: {[x['event'] for x in self.events()]}\n"
                f"log tail:\n{self.log()[-3000:]}"
            ) from None

    def state(self) -> dict[str, Any]:
        """state.json as it is on disk."""
        return json_object(self.state_path.read_text())

    def signal(self, signum: int) -> None:
        """Send a signal."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"guardd did not stop on SIGTERM; log:\n{self.log()}") from None
        finally:
            self._log.close()
        return code

    def kill9(self) -> None:
        """kill -9, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()


def log_lines(d: Daemon) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (its stderr is not a terminal, so every line is JSON)."""
    out = []
    for line in d.log().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


class Lab:
    """Blue and green upstreams behind a private nginx, and a config guarding them."""

    def __init__(
        self,
        tmp: Path,
        *,
        active: str = "green",
        run_dir: Path | None = None,
        access_log: str | None = None,
        upstreams: tuple[Upstream, Upstream] | None = None,
        **overrides: Any,
    ) -> None:
        self.tmp = tmp
        # Shared upstreams (several labs in front of the same colors) are their owner's to stop.
        self.owns_upstreams = upstreams is None
        self.blue, self.green = upstreams or (Upstream("blue").start(), Upstream("green").start())
        self.nginx = Nginx(
            tmp / "nginx",
            {"blue": self.blue, "green": self.green},
            active=active,
            access_log=access_log,
        ).start()
        self.state_dir = tmp / "state"
        self.run_dir = run_dir or tmp / "run"
        self.run_dir.mkdir(exist_ok=True)
        self.fault_dir = tmp / "faults"
        self.fault_dir.mkdir(exist_ok=True)
        self.config_path = tmp / "lab.toml"
        self.overrides = overrides
        self.write_config()
        self.daemons: list[Daemon] = []
        self.notify: NotifySocket | None = None

    @property
    def lock_file(self) -> Path:
        """The QoS lock path."""
        return self.run_dir / "lab.qos.lock"

    @property
    def socket_path(self) -> Path:
        """The control socket path."""
        return self.run_dir / "lab.sock"

    def config_text(self) -> str:
        """The TOML for this lab, with overrides of the form section__key=value."""
        sections: dict[str, dict[str, Any]] = {
            "probe": {
                "interval": "200ms",
                "fast_interval": "100ms",
                "timeout": "1s",
                "expect_json": {"status": "UP"},
            },
            "policy": {
                "rollback_to": "blue",
                "consecutive_failures": 3,
                "window": "30s",
                "min_samples": 5,
                "p1_sustain": "2s",
                "budget_window": "1h",
            },
            "switch": {
                "kind": "nginx",
                "active_link": str(self.nginx.active_link),
                "test_command": self.nginx.test_command,
                "reload_command": self.nginx.reload_command,
                "timeout": "10s",
                "verify_url": self.nginx.front_url,
                "verify_successes": 3,
            },
            "qos": {"lock_file": str(self.lock_file), "window": "2s"},
            "retry": {"attempts": 3, "base_delay": "50ms", "max_delay": "200ms"},
            "control": {"socket": str(self.socket_path), "mode": "0666"},
            "state": {"dir": str(self.state_dir)},
            "metrics": {"listen": ""},
        }
        top: dict[str, Any] = {"instance": "lab"}
        for key, value in self.overrides.items():
            section, _, name = key.partition("__")
            if name:
                sections.setdefault(section, {})[name] = value
            else:
                top[section] = value
        lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
        lines += [
            "",
            "[upstreams.blue]",
            f"url = {_toml(self.blue.url)}",
            "[upstreams.green]",
            f"url = {_toml(self.green.url)}",
        ]
        targets = {c: str(p) for c, p in self.nginx.targets.items()}
        for name, body in sections.items():
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in body.items() if v is not None]
            if name == "switch":
                lines.append("[switch.targets]")
                lines += [f"{c} = {_toml(p)}" for c, p in targets.items()]
        return "\n".join(lines) + "\n"

    def write_config(self, **more: Any) -> None:
        """(Re)write the config, optionally with more overrides."""
        self.overrides.update(more)
        self.config_path.write_text(self.config_text())

    def daemon(
        self,
        *,
        notify: bool = True,
        env: dict[str, str] | None = None,
        as_nobody: bool = False,
        prefix: list[str] | None = None,
    ) -> Daemon:
        """Start guardd on this lab and wait for READY.

        `as_nobody` runs it as uid `nobody` (the lab's folders must then be reachable and
        its state, run and upstream folders writable by that uid; see `open_to_nobody`).
        `prefix` goes before the command (after `as_nobody`'s), as an argv.
        """
        if notify and self.notify is None:
            self.notify = NotifySocket(self.tmp / "notify.sock")
        after = len(self.notify.messages) if self.notify else 0
        d = Daemon(
            self.config_path,
            self.state_dir,
            notify=self.notify if notify else None,
            env={"GUARDD_FAULT_DIR": str(self.fault_dir), **(env or {})},
            prefix=[*nobody_prefix(as_nobody), *(prefix or [])],
        ).start()
        self.daemons.append(d)
        if notify:
            d.wait_ready(after=after)
        return d

    def open_to_nobody(self) -> None:
        """Let a guardd run as `nobody` work here: the folders it writes become nobody's.

        The lab's own folder must lie in a folder any uid may enter (pytest's are 0700).
        """
        self.state_dir.mkdir(exist_ok=True)
        for folder in (self.tmp, self.state_dir, self.run_dir, self.fault_dir):
            os.chown(folder, NOBODY, NOBODY)
            folder.chmod(0o755)
        # A switch writes the new link beside the old one.
        os.chown(self.nginx.active_link.parent, NOBODY, NOBODY)

    def close(self) -> None:
        """Stop everything this lab started."""
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            # Also for a daemon that died on its own: its log file is ours to close.
            if d.proc is not None:
                d._log.close()
        self.nginx.stop()
        if self.owns_upstreams:
            self.blue.stop()
            self.green.stop()
        if self.notify is not None:
            self.notify.close()


class MakeLab(Protocol):
    """The `make_lab` fixture: a `Lab` in the test's tmp dir, torn down after the test.

    Takes `Lab`'s keywords: `active`, `run_dir`, `access_log`, and config keys as
    `section__key=value`.
    """

    def __call__(self, **overrides: Any) -> Lab: ...


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


@contextmanager
def lab(tmp: Path, **overrides: Any) -> Iterator[Lab]:
    """A Lab that is always cleaned up."""
    the_lab = Lab(tmp, **overrides)
    try:
        yield the_lab
    finally:
        the_lab.close()
