"""The Debian package, as an operator meets it.

Built from this tree by ``packaging/deb/build.sh``, installed without a network into a fresh
Debian 12 booted under a real systemd, driven through the shell blocks of
the README's quickstart blocks exactly as written (a real rollback behind the container's own
nginx), upgraded in place, and purged: afterwards the rootfs holds no file the package or
guardd made, outside the exceptions ``packaging/README.md`` lists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness.jsondoc import json_object
from tests.harness.nspawn import Container, unique_name
from tests.harness.rootfs import HarnessError
from tests.systemd.conftest import systemd_image  # noqa: F401 -- the session's cached image

pytestmark = pytest.mark.systemd

PROJECT = Path(__file__).resolve().parents[2]
BUILD = PROJECT / "packaging/deb/build.sh"
README = PROJECT / "README.md"
MARKER = "<!-- docs-test: quickstart -->"
VERSION = re.search(
    r'^__version__ = "(.+)"$', (PROJECT / "guardd/_version.py").read_text(), re.MULTILINE
)[1]  # type: ignore[index]  # _version.py always sets it; if not, collection fails here
INSTANCE = "threader"
UNIT = f"guardd@{INSTANCE}.service"
ACTIVE_LINK = "/etc/nginx/upstreams/threader_active.conf"
EVENTS = f"/var/lib/guardd/{INSTANCE}/events.jsonl"
# The quickstart's blocks, in order.
INSTALL, UPSTREAMS, NGINX, GUARD, CHECK, BREAK, REMOVE = range(7)

# What the quickstart's operator wrote (or removed) and keeps after the purge.
OPERATOR_FILES = {
    "etc/guardd",
    "etc/guardd/threader.toml",
    "etc/nginx/conf.d/threader.conf",
    "etc/nginx/upstreams",
    "etc/nginx/upstreams/threader_active.conf",
    "etc/nginx/upstreams/threader_blue.conf",
    "etc/nginx/upstreams/threader_green.conf",
    "srv/threader",
    "srv/threader/blue",
    "srv/threader/blue/healthz",
    "srv/threader/green",
    "srv/threader/green/healthz",
}
OPERATOR_REMOVED = {"etc/nginx/sites-enabled/default"}
# Trees whose contents change for reasons of their own (packaging/README.md, "Purge"):
# file systems that are not the rootfs, the package manager's ledgers and logs, and the
# temporary folders nginx makes when it first starts.
NOT_COMPARED = (
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "var/tmp",
    "var/log",
    "var/lib/dpkg",
    "var/lib/apt",
    "var/cache/apt",
    "var/cache/debconf",
    "var/lib/nginx",
)


@pytest.fixture(scope="session")
def guardd_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the .deb from this checkout, as `make deb` does, into a temporary folder."""
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run(
        [str(BUILD), str(out)],
        env={**os.environ, "GUARDD_DEB_WORKDIR": str(out / "work")},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise HarnessError(f"{BUILD} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    shutil.rmtree(out / "work")
    debs = sorted(out.glob("guardd_*.deb"))
    assert [d.name for d in debs] == [f"guardd_{VERSION}_{_arch()}.deb"]
    return debs[0]


def test_deb_installs_offline_guards_and_purges_clean(
    systemd_image: Path,  # noqa: F811 -- the fixture imported above
    guardd_deb: Path,
) -> None:
    """The quickstart's operator installs, configures, sees a real rollback, and purges."""
    blocks = quickstart_blocks()
    with Container(systemd_image, unique_name("guarddeb")) as c:
        shutil.copy(guardd_deb, c.root / "root")
        c.boot()
        before = rootfs_paths(c.root)

        # ---- install: offline, a venv on Debian's python3, nothing started or enabled --------
        assert f"guardd {VERSION}" in step(c, blocks[INSTALL])
        assert (c.root / "opt/guardd/bin/python3").readlink() == Path("/usr/bin/python3")
        prefixes = c.run(
            "/opt/guardd/bin/python", "-c", "import sys; print(sys.prefix, sys.base_prefix)"
        )
        assert prefixes.stdout.split() == ["/opt/guardd", "/usr"]
        assert (c.root / "usr/bin/guardctl").readlink() == Path("/opt/guardd/bin/guardctl")
        assert (
            c.run("guardd", "check-config", "--offline", "/etc/guardd/example.toml").returncode == 0
        )
        conffiles = c.run("dpkg-query", "-W", "-f=${Conffiles}", "guardd").stdout
        assert "/etc/guardd/example.toml" in conffiles
        assert (c.root / "usr/share/man/man1/guardctl.1.gz").exists()
        log_format = c.root / "usr/share/doc/guardd/examples/nginx/guardd-log-format.conf"
        assert "log_format guardd escape=json" in log_format.read_text()
        assert c.run("getent", "passwd", "guardd").stdout.startswith("guardd:")
        assert c.systemctl("is-enabled", "guardd.target").stdout.strip() == "enabled"
        assert not list((c.root / "etc/systemd/system").glob("*.wants/guardd@*"))
        loaded = c.systemctl("list-units", "--all", "--plain", "--no-legend", "guardd@*")
        assert loaded.stdout.strip() == ""

        # ---- the quickstart: stand-in upstreams, nginx, the guard, a status check -------------
        step(c, blocks[UPSTREAMS])
        # As on most hosts, nginx already runs with Debian's default site, so step 3 is a
        # reload, which nginx applies after `systemctl` has returned.
        c.systemctl("start", "nginx.service")
        assert "Welcome to nginx" in front_door_text(c)
        assert '"color": "green"' in step(c, blocks[NGINX])
        step(c, blocks[GUARD])
        step(c, blocks[CHECK])  # `guardctl status` exits 0, or the block fails
        status = guardctl_status(c)
        assert (status["state"], status["active"], status["qos"]["locked"]) == (
            "steady",
            "green",
            False,
        )
        main_pid = c.systemctl("show", "-P", "MainPID", UNIT).stdout.strip()
        assert c.run("ps", "-o", "user=", "-p", main_pid).stdout.strip() == "guardd"

        # ---- an upgrade in place restarts the running guard on the new code ------------------
        c.run("dpkg", "-i", f"/root/{guardd_deb.name}", timeout=120)
        assert c.systemctl("is-active", UNIT).stdout.strip() == "active"
        assert c.systemctl("show", "-P", "MainPID", UNIT).stdout.strip() != main_pid
        assert c.run("guardctl", "--instance", INSTANCE, "status").returncode == 0

        # ---- green fails: a real rollback through the container's nginx ----------------------
        shown = step(c, blocks[BREAK])
        assert "threader_blue.conf" in shown
        assert '"color": "blue"' in shown
        assert front_door(c)["color"] == "blue"
        assert c.run("readlink", ACTIVE_LINK).stdout.strip().endswith("threader_blue.conf")
        events = [json.loads(line) for line in c.run("cat", EVENTS).stdout.splitlines()]
        completed = [e for e in events if e["event"] == "rollback_completed"]
        assert [(e["from"], e["to"]) for e in completed] == [("green", "blue")]
        assert "rollback_completed" in c.journal(UNIT)
        status = guardctl_status(c)
        assert (status["active"], status["qos"]["locked"]) == ("blue", True)
        assert status["upstreams"]["green"]["healthy"] is False
        assert status["state"] == "guard_window"
        uid = c.run("id", "-u", "guardd").stdout.strip()
        gid = c.run("id", "-g", "guardd").stdout.strip()

        # ---- purge: the guard stopped, its state, user and links gone ------------------------
        step(c, blocks[REMOVE])
        assert c.systemctl("show", "-P", "LoadState", UNIT).stdout.strip() == "not-found"
        assert c.systemctl("show", "-P", "ActiveState", UNIT).stdout.strip() == "inactive"
        # prerm stopped it, and it exited cleanly (0) on SIGTERM.
        assert f"{UNIT}: Deactivated successfully" in c.journal(UNIT).rsplit("Stopping", 1)[1]
        assert c.run("test", "-e", "/run/guardd", check=False).returncode == 1
        assert c.run("getent", "passwd", "guardd", check=False).returncode == 2
        assert c.run("getent", "group", "guardd", check=False).returncode == 2
        # The operator's config went back to root's group; the one file guardd made outside its
        # own folders, the link a switch wrote, keeps guardd's number (packaging/README.md).
        assert c.run("stat", "-c", "%G %a", "/etc/guardd/threader.toml").stdout.split() == [
            "root",
            "640",
        ]
        owned = c.run(
            "find", "/", "-xdev", "(", "-uid", uid, "-o", "-gid", gid, ")", "-print"
        ).stdout.split()
        assert set(owned) <= {ACTIVE_LINK}
        after = rootfs_paths(c.root)
        assert after - before == OPERATOR_FILES
        assert before - after == OPERATOR_REMOVED


def test_lintian_reports_no_unexplained_tag(guardd_deb: Path) -> None:
    """lintian, pedantic and with info tags, finds nothing that the overrides do not explain."""
    if shutil.which("lintian") is None:
        _apt_install("lintian")
    done = subprocess.run(
        ["lintian", "--pedantic", "--display-info", "--display-experimental", str(guardd_deb)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EWIPXM]: ", line)]
    assert tags == [], done.stdout + done.stderr
    # The overrides are used: each one still silences a tag lintian finds.
    shown = subprocess.run(
        ["lintian", "--pedantic", "--display-info", "--show-overrides", str(guardd_deb)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    ).stdout
    assert "dir-or-file-in-opt" in shown


# ---- helpers ------------------------------------------------------------------------------


def quickstart_blocks() -> list[str]:
    """Return the README's ```sh blocks marked for this test, in order."""
    pattern = re.escape(MARKER) + r"\n```sh\n(.*?)^```$"
    blocks = re.findall(pattern, README.read_text(), re.DOTALL | re.MULTILINE)
    assert len(blocks) == REMOVE + 1, f"{README} should have {REMOVE + 1} marked sh blocks"
    return blocks


def step(c: Container, block: str) -> str:
    """Run one quickstart block inside the container, as root in /root; return its output."""
    done = c.run("bash", "-euo", "pipefail", "-c", f"cd /root\n{block}", timeout=180)
    return done.stdout + done.stderr


def guardctl_status(c: Container) -> dict[str, Any]:
    """`guardctl status --json` of the quickstart's guard (any exit code)."""
    done = c.run("guardctl", "--instance", INSTANCE, "status", "--json", check=False)
    return json_object(done.stdout)


def front_door(c: Container) -> dict[str, Any]:
    """GET nginx's port 80 inside the container over a fresh connection; the JSON body."""
    return json_object(front_door_text(c, "/healthz"))


def front_door_text(c: Container, path: str = "/") -> str:
    """GET `path` from nginx's port 80 inside the container over a fresh connection."""
    script = (
        "import sys, urllib.request\n"
        "url = 'http://127.0.0.1' + sys.argv[1]\n"
        "print(urllib.request.urlopen(url, timeout=5).read().decode())"
    )
    return c.run("python3", "-c", script, path).stdout


def rootfs_paths(root: Path) -> set[str]:
    """Every path of the container's root file system, relative, but for NOT_COMPARED."""
    paths: set[str] = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if (rel / d).as_posix() not in NOT_COMPARED]
        paths.update((rel / name).as_posix() for name in (*dirs, *files))
    return paths


def _arch() -> str:
    """The host's Debian architecture."""
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _apt_install(package: str) -> None:
    """Install a host package the test drives, as the systemd harness does for its tools."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise HarnessError(f"`{' '.join(argv)}` failed:\n{done.stdout}{done.stderr}")
