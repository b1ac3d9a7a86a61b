"""A real systemd 252 booted under systemd-nspawn, for tests that need the real supervisor.

What it needs: root, and the host commands ``systemd-nspawn`` (systemd-container),
``debootstrap``, ``zstd`` and ``nsenter``; :func:`tests.harness.rootfs.ensure_host_tools`
installs missing ones with apt-get or fails saying why. The host's PID 1 need not be
systemd and there need not be a system bus: nspawn runs with ``--register=no --keep-unit``
from a launcher shell that first moves itself into private cgroups
``/sys/fs/cgroup/{systemd,unified}/guardtest-<nspawn pid>``, so nothing lands at the
host's cgroup roots.

Where it caches: the debootstrapped image is a tarball in
``${GUARDD_TEST_CACHE:-~/.cache/guardd-tests}/bookworm-<hash>.tar.zst`` (built once, about
a minute; see :mod:`tests.harness.rootfs`). Each :class:`Container` unpacks it into a fresh
temporary folder (about half a second), so a test can write units, drop-ins and configs
straight into :attr:`Container.root` before and after boot, then ``systemctl daemon-reload``.

How it is driven: commands run inside through ``nsenter -t <container init> -a``, because
``machinectl`` and ``systemd-run -M`` need a host systemd. ``--private-network`` (the
default) leaves only loopback inside, so everything is installed before boot.

How to debug a failed boot: the error carries the tail of the console log. Set
``GUARDD_KEEP_CONTAINER=1`` to keep the temporary folder; it holds ``console.log`` and the
``root`` tree, whose persistent journal reads with ``journalctl -D ROOT/var/log/journal``,
and which boots by hand with ``systemd-nspawn --register=no --keep-unit -D ROOT --boot``.

Teardown ends only what the container started: SIGTERM to nspawn (a clean poweroff),
SIGKILL if it hangs, SIGKILL by pid for anything left in its private cgroups, then those
cgroups, ``/run/systemd/nspawn/propagate/<name>`` and the temporary folder go.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.harness.rootfs import HarnessError, remove_tree, unpack_image
from tests.harness.wheelhouse import guardd_wheel

CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")
LOCKS_DIR = Path("/run/systemd/nspawn/locks")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A clean environment: the host's (a venv, pyenv shims, PIP_* settings) means nothing inside.
CONTAINER_ENV = {
    "PATH": CONTAINER_PATH,
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
GUARDD_VENV = "/opt/guardd"
GUARDD_COMMANDS = ("guardd", "guardctl")
STOP_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0
RESEND_INTERVAL = 1.0
POLL_INTERVAL = 0.1
CONSOLE_TAIL = 4000
KEEP_ENV = "GUARDD_KEEP_CONTAINER"

# Moves itself into private cgroups (named after its own pid, which nspawn inherits through
# exec) so the container's cgroups never land at the host's cgroup roots.
_LAUNCHER = """
for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
    if [ -d "$h" ]; then
        mkdir -p "$h/guardtest-$$" && echo $$ > "$h/guardtest-$$/cgroup.procs" || exit 97
    fi
done
exec systemd-nspawn "$@"
"""


class CommandFailed(subprocess.CalledProcessError):
    """A command inside the container exited non-zero; its output is part of the message."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n--- stdout ---\n{self.stdout or ''}"
            f"--- stderr ---\n{self.stderr or ''}"
        )


def unique_name(prefix: str = "guardtest") -> str:
    """Return a machine name no other test or pytest run on this host uses at the same time."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def analyze_verify(paths: list[Path]) -> str:
    """Run ``systemd-analyze verify`` on the host and return everything it printed.

    It exits 0 on typos and bad values, so callers assert that the output is empty.
    """
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(path) for path in paths)],
        capture_output=True,
        text=True,
        check=False,
        env={**CONTAINER_ENV, "SYSTEMD_LOG_COLOR": "0"},
        timeout=60,
    )
    return done.stdout + done.stderr


class Container:
    """A throwaway copy of the image, booted as a real systemd under systemd-nspawn.

    Use it as a context manager: entering unpacks the image, leaving shuts down and deletes.
    """

    root: Path

    def __init__(
        self,
        image: Path,
        name: str,
        *,
        binds_ro: Mapping[Path, str] | None = None,
        private_network: bool = True,
    ) -> None:
        self.image = image
        self.name = name
        self.binds_ro = dict(binds_ro or {})
        self.private_network = private_network
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.root = self.workdir / "root"
        self.console_log = self.workdir / "console.log"
        self.nspawn_pid: int | None = None
        self.leader: int | None = None
        self.exit_status: int | None = None
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self._image_lock: Path | None = None

    def __enter__(self) -> Self:
        try:
            unpack_image(self.image, self.root)
            # Every container gets its own identity, as distinct hosts would.
            (self.root / "etc/machine-id").write_text(f"{uuid.uuid4().hex}\n")
            # nspawn locks the tree by inode and leaves the file behind when it is killed.
            tree = self.root.stat()
            self._image_lock = LOCKS_DIR / f"inode-{tree.st_dev}:{tree.st_ino}"
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def install_guardd(self, wheelhouse: Path) -> None:
        """Install guardd into a venv at /opt/guardd from local wheels, before boot."""
        if self._nspawn is not None:
            raise HarnessError("install_guardd() runs before boot(): the container has no network")
        # Building the venv takes seconds; every container of a session gets the same one.
        installed = wheelhouse / f".opt-guardd-{_wheels_digest(wheelhouse)}.tar"
        if installed.exists():
            _tar("-C", str(self.root), "-xpf", str(installed))
        else:
            self._install_from_wheels(wheelhouse)
            partial = installed.with_name(f"{installed.name}.{os.getpid()}")
            _tar("-C", str(self.root), "-cf", str(partial), GUARDD_VENV.lstrip("/"))
            partial.replace(installed)
        for command in GUARDD_COMMANDS:
            link = self.root / "usr/bin" / command
            link.unlink(missing_ok=True)
            link.symlink_to(f"{GUARDD_VENV}/bin/{command}")

    def boot(self, timeout: float = 60) -> None:
        """Start systemd and return once it reports `running` (or `degraded`, listing failures)."""
        if self._nspawn is not None:
            raise HarnessError(f"{self.name} was already booted")
        deadline = time.monotonic() + timeout
        self._launch()
        self.leader = self._find_leader(deadline)
        state = self._wait_until_started(deadline)
        if state == "degraded":
            failed = self.systemctl("--failed", "--no-legend", check=False).stdout
            print(f"harness: {self.name} booted degraded; failed units:\n{failed}", file=sys.stderr)

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,  # noqa: A002 -- the name subprocess.run uses
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container, in all of its namespaces."""
        if self.leader is None:
            raise HarnessError(f"{self.name} is not running: call boot() first")
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *argv],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=CONTAINER_ENV,
        )
        if check and done.returncode != 0:
            raise CommandFailed(done.returncode, list(argv), done.stdout, done.stderr)
        return done

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``systemctl`` inside the container."""
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def journal(self, unit: str) -> str:
        """Return the unit's journal with microsecond timestamps."""
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "short-precise").stdout

    def show(self, unit: str, prop: str) -> str:
        """Return one property of a unit, as ``systemctl show -P`` prints it."""
        return self.systemctl("show", "-P", prop, unit).stdout.rstrip("\n")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` until it holds, raising a TimeoutError that names ``what``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self._nspawn is not None and self._nspawn.poll() is not None:
                raise HarnessError(f"{self.name} exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {what} within {timeout:g} s")
            time.sleep(POLL_INTERVAL)

    def shutdown(self) -> None:
        """Power the container off cleanly, kill it if it hangs, and remove its cgroups."""
        if self._nspawn is not None and self.exit_status is None:
            if not self._power_off(self._nspawn):
                print(
                    f"harness: {self.name} did not power off in {STOP_TIMEOUT:g} s; killing",
                    file=sys.stderr,
                )
                self._nspawn.kill()
                self._nspawn.wait(KILL_TIMEOUT)
            self.exit_status = self._nspawn.returncode
            self.leader = None
        if self.nspawn_pid is not None:
            self._remove_cgroups(self.nspawn_pid)
        remove_tree(PROPAGATE_DIR / self.name)
        if self._image_lock is not None and self.exit_status is not None:
            self._image_lock.unlink(missing_ok=True)
        if self._console is not None:
            self._console.close()
            self._console = None

    @staticmethod
    def _power_off(nspawn: subprocess.Popen[bytes]) -> bool:
        """Ask nspawn for an orderly poweroff of the container; tell whether it exited in time."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while nspawn.poll() is None:
            if time.monotonic() > deadline:
                return False
            # nspawn turns SIGTERM into SIGRTMIN+3 for the container's systemd, which drops it
            # until it has installed its handlers early in boot: ask again until it listens.
            nspawn.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                nspawn.wait(RESEND_INTERVAL)
        return True

    def close(self) -> None:
        """Shut down and delete the temporary rootfs, unless GUARDD_KEEP_CONTAINER=1."""
        try:
            self.shutdown()
        finally:
            if os.environ.get(KEEP_ENV) == "1":
                print(f"harness: kept {self.name} in {self.workdir}", file=sys.stderr)
            else:
                remove_tree(self.workdir)

    def console_tail(self) -> str:
        """Return the end of what the container printed on its console."""
        try:
            return self.console_log.read_bytes()[-CONSOLE_TAIL:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _launch(self) -> None:
        """Start systemd-nspawn in its own session and private cgroups."""
        argv = [
            "--quiet",
            # No host systemd or system bus here: nspawn must neither register nor create a scope.
            "--register=no",
            "--keep-unit",
            "--link-journal=no",
            "--console=read-only",
            f"--machine={self.name}",
            f"--directory={self.root}",
            *(f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()),
            *(["--private-network"] if self.private_network else []),
            "--boot",
        ]
        self._console = self.console_log.open("wb")
        self._nspawn = subprocess.Popen(
            ["bash", "-c", _LAUNCHER, "guardtest-launcher", *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"PATH": CONTAINER_PATH, "LANG": "C.UTF-8"},
        )
        self.nspawn_pid = self._nspawn.pid

    def _find_leader(self, deadline: float) -> int:
        """Return the host pid of the container's systemd: nspawn's child in a new pid namespace."""
        assert self._nspawn is not None
        own_pid_ns = Path("/proc/self/ns/pid").readlink()
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                break
            try:
                for pid in children.read_text().split():
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    if comm == "systemd" and Path(f"/proc/{pid}/ns/pid").readlink() != own_pid_ns:
                        return int(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass  # a child that came and went between listing and reading
            time.sleep(POLL_INTERVAL)
        raise HarnessError(self._boot_failure("no systemd appeared under systemd-nspawn"))

    def _wait_until_started(self, deadline: float) -> str:
        """Wait for systemd to finish starting up and return its final state."""
        state = ""
        while (remaining := deadline - time.monotonic()) > 0 and not self._nspawn_exited():
            try:
                done = self.run(
                    "systemctl", "is-system-running", "--wait", check=False, timeout=remaining
                )
            except subprocess.TimeoutExpired:
                break
            state = done.stdout.strip()
            if state in {"running", "degraded"}:
                return state
            # Until PID 1 has its private socket up, systemctl cannot even connect.
            time.sleep(POLL_INTERVAL)
        jobs = self.systemctl("list-jobs", "--no-legend", check=False).stdout
        raise HarnessError(
            self._boot_failure(f"systemd did not finish starting (state {state!r}); jobs:\n{jobs}")
        )

    def _nspawn_exited(self) -> bool:
        """Tell whether systemd-nspawn has exited."""
        return self._nspawn is None or self._nspawn.poll() is not None

    def _boot_failure(self, what: str) -> str:
        """Describe a failed boot with the console tail, for the exception message."""
        return (
            f"{self.name}: {what}\n--- console ({self.console_log}) ---\n{self.console_tail()}\n"
            f"(set {KEEP_ENV}=1 to keep {self.workdir} for inspection)"
        )

    def _install_from_wheels(self, wheelhouse: Path) -> None:
        """Create the venv with the rootfs's own Python and pip-install guardd offline."""
        wheel = guardd_wheel(wheelhouse)
        inside = "/var/tmp/guardd-wheels"
        staging = self.root / inside.lstrip("/")
        shutil.copytree(wheelhouse, staging)
        try:
            self._chroot("/usr/bin/python3", "-m", "venv", GUARDD_VENV)
            self._chroot(
                f"{GUARDD_VENV}/bin/python",
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-index",
                "--find-links",
                inside,
                f"{inside}/{wheel.name}",
            )
        finally:
            shutil.rmtree(staging)

    def _chroot(self, *argv: str) -> None:
        """Run a command chrooted into the not yet booted rootfs."""
        done = subprocess.run(
            ["chroot", str(self.root), *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            env={**CONTAINER_ENV, "PIP_CONFIG_FILE": "/dev/null", "PIP_NO_INPUT": "1"},
        )
        if done.returncode != 0:
            raise CommandFailed(done.returncode, ["chroot", *argv], done.stdout, done.stderr)

    @staticmethod
    def _remove_cgroups(nspawn_pid: int) -> None:
        """Empty and remove the private cgroups the launcher made for this nspawn."""
        for hierarchy in CGROUP_HIERARCHIES:
            top = hierarchy / f"guardtest-{nspawn_pid}"
            if not top.is_dir():
                continue
            groups = _deepest_first(top)
            # Whatever is still in here was started by our nspawn and outlived it.
            deadline = time.monotonic() + KILL_TIMEOUT
            while leftovers := _pids_in(groups):
                for pid in leftovers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if time.monotonic() > deadline:
                    raise HarnessError(f"processes {leftovers} would not leave {top}")
                time.sleep(POLL_INTERVAL)
            for group in groups:
                with contextlib.suppress(FileNotFoundError):
                    group.rmdir()


def remove_stale_cgroups() -> None:
    """Remove empty private cgroups left behind by runs whose nspawn is gone (say, SIGKILLed)."""
    for hierarchy in CGROUP_HIERARCHIES:
        for top in hierarchy.glob("guardtest-*"):
            pid = top.name.removeprefix("guardtest-")
            # A live pid may be a launcher between its mkdir and its move into the group.
            if not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            for group in _deepest_first(top):
                # The kernel refuses to remove a cgroup that still has processes: nothing is lost.
                with contextlib.suppress(OSError):
                    group.rmdir()


def _deepest_first(top: Path) -> list[Path]:
    """Return a cgroup and all its descendants, children before parents."""
    return sorted(
        (Path(parent) for parent, _, _ in os.walk(top)),
        key=lambda group: len(group.parts),
        reverse=True,
    )


def _pids_in(groups: list[Path]) -> list[int]:
    """Return the pids in the given cgroups."""
    pids: list[int] = []
    for group in groups:
        with contextlib.suppress(FileNotFoundError):
            pids.extend(int(pid) for pid in (group / "cgroup.procs").read_text().split())
    return pids


def _wheels_digest(wheelhouse: Path) -> str:
    """Return a digest of the wheels in ``wheelhouse``, naming what a cached venv was built from."""
    digest = hashlib.sha256()
    for wheel in sorted(wheelhouse.glob("*.whl")):
        digest.update(wheel.name.encode())
        digest.update(hashlib.sha256(wheel.read_bytes()).digest())
    return digest.hexdigest()[:12]


def _tar(*args: str) -> None:
    """Run tar with owners kept numeric, raising with its complaint when it fails."""
    done = subprocess.run(
        ["tar", "--numeric-owner", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise HarnessError(f"tar {' '.join(args)} failed: {done.stderr.strip()}")
