"""A blue/green lab inside a booted container, guarded by the shipped ``guardd@lab.service``.

What it lays out (files before boot with :meth:`Lab.prepare`, units after with :meth:`Lab.start`):

- two upstreams, ``lab-upstream@blue.service`` (127.0.0.1:9009) and ``lab-upstream@green.service``
  (127.0.0.1:9010): a tiny ``python3 http.server`` script at ``/srv/lab/upstream.py`` that answers
  every path with ``{"status": "UP", "color": ...}`` and turns to 503 ``DOWN`` while the file
  ``/srv/lab/<color>.fail`` exists. It sends READY=1 once it listens, so ``systemctl start`` of
  it returns when it can answer.
- the container's real ``nginx.service`` (Debian's unit and Debian's stock ``nginx.conf``, with its
  ``www-data`` workers and logs under ``/var/log/nginx``), whose default site is replaced by
  ``/etc/nginx/conf.d/lab.conf``: port 80 proxies to ``upstream lab_backend``, defined by
  ``/etc/nginx/upstreams/lab_active.conf``, a symlink to ``lab_blue.conf`` or ``lab_green.conf``.
- ``/etc/guardd/lab.toml``: guards both colors with fast probes, rolls back to blue by swapping that
  symlink with the default ``nginx -t`` / ``nginx -s reload``, and verifies through the front door.
  State, control socket and QoS lock are left to the systemd defaults.
- the shipped unit files from ``systemd/`` installed unmodified, the sysusers/tmpfiles
  snippets applied the way a package's postinst applies them, and ``guardd.target`` and
  ``guardd@lab`` enabled the way the README tells an operator to.

Everything is read and written inside the container's namespaces (``nsenter`` via the
:class:`~tests.harness.nspawn.Container`), except plain files under :attr:`Container.root`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.harness.nspawn import Container

PROJECT = Path(__file__).resolve().parents[2]
SHIPPED = PROJECT / "systemd"
UNIT_FILES = ("guardd@.service", "guardd.target")
INSTANCE = "lab"
UNIT = f"guardd@{INSTANCE}.service"
# A second instance, only to show that guardd.target reaches every instance.
SECOND_INSTANCE = "lab2"
SECOND_UNIT = f"guardd@{SECOND_INSTANCE}.service"
PORTS = {"blue": 9009, "green": 9010}
LAB_DIR = "/srv/lab"
UPSTREAMS_DIR = "/etc/nginx/upstreams"
ACTIVE_LINK = f"{UPSTREAMS_DIR}/lab_active.conf"
CONFIG = f"/etc/guardd/{INSTANCE}.toml"
STATE_DIR = f"/var/lib/guardd/{INSTANCE}"
EVENTS = f"{STATE_DIR}/events.jsonl"
LOCK_FILE = f"/run/guardd/{INSTANCE}.qos.lock"
FAULT_DIR = "/run/guardd-faults"
DROPIN_DIR = f"/etc/systemd/system/{UNIT}.d"
FRONT_DOOR = "http://127.0.0.1/healthz"

UPSTREAM_SCRIPT = """\
# A lab upstream: every path answers {"status": "UP", "color": ...}, or 503 DOWN while
# /srv/lab/<color>.fail exists.
import json
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COLOR = sys.argv[1]
PORT = {"blue": 9009, "green": 9010}[COLOR]
FAIL = f"/srv/lab/{COLOR}.fail"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        failing = os.path.exists(FAIL)
        body = json.dumps({"status": "DOWN" if failing else "UP", "color": COLOR}).encode()
        self.send_response(503 if failing else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
address = os.environ.get("NOTIFY_SOCKET", "")
if address:
    address = "\\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)
server.serve_forever()
"""

UPSTREAM_UNIT = f"""\
[Unit]
Description=guardd lab upstream %i

[Service]
Type=notify
ExecStart=/usr/bin/python3 {LAB_DIR}/upstream.py %i
"""

NGINX_SITE = f"""\
# The lab's front door: whatever color {ACTIVE_LINK} names.
include {ACTIVE_LINK};

server {{
    listen 80 default_server;
    location / {{
        proxy_pass http://lab_backend;
    }}
}}
"""

NGINX_UPSTREAM = """\
upstream lab_backend {{
    server 127.0.0.1:{port};
}}
"""

GUARD_CONFIG = f"""\
# The lab guard: fast probes so a rollback happens in a second or two.
instance = "{INSTANCE}"

[upstreams.blue]
url = "http://127.0.0.1:{PORTS["blue"]}/healthz"

[upstreams.green]
url = "http://127.0.0.1:{PORTS["green"]}/healthz"

[probe]
interval = "500ms"
fast_interval = "200ms"
timeout = "1s"
expect_json = {{ status = "UP" }}

[policy]
rollback_to = "blue"
consecutive_failures = 3

[switch]
kind = "nginx"
timeout = "20s"
active_link = "{ACTIVE_LINK}"
verify_url = "{FRONT_DOOR}"
verify_successes = 3

[switch.targets]
blue = "{UPSTREAMS_DIR}/lab_blue.conf"
green = "{UPSTREAMS_DIR}/lab_green.conf"

[retry]
attempts = 2
base_delay = "200ms"
max_delay = "1s"

[metrics]
listen = "127.0.0.1:9105"
"""


def second_config() -> str:
    """The second instance: same upstreams, its own (unused by nginx) link, no metrics port."""
    return (
        GUARD_CONFIG.replace(f'instance = "{INSTANCE}"', f'instance = "{SECOND_INSTANCE}"')
        .replace("lab_active.conf", "lab2_active.conf")
        .replace(f'verify_url = "{FRONT_DOOR}"\n', "")
        .replace('listen = "127.0.0.1:9105"', 'listen = ""')
    )


class Lab:
    """The blue/green lab of one container; see the module docstring."""

    def __init__(self, container: Container) -> None:
        self.c = container

    # ---- lay-out -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Write the lab's files and the shipped units into the rootfs, before boot."""
        root = self.c.root
        lab = root / LAB_DIR.lstrip("/")
        lab.mkdir(parents=True, exist_ok=True)
        (lab / "upstream.py").write_text(UPSTREAM_SCRIPT)
        units = root / "etc/systemd/system"
        (units / "lab-upstream@.service").write_text(UPSTREAM_UNIT)
        for name in UNIT_FILES:
            (units / name).write_bytes((SHIPPED / name).read_bytes())
        for kind in ("sysusers.d", "tmpfiles.d"):
            snippet = SHIPPED / kind / "guardd.conf"
            if snippet.exists():
                target = root / "usr/lib" / kind / "guardd.conf"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(snippet.read_bytes())

        nginx = root / "etc/nginx"
        (nginx / "sites-enabled/default").unlink(missing_ok=True)
        (nginx / "conf.d/lab.conf").write_text(NGINX_SITE)
        upstreams = nginx / "upstreams"
        upstreams.mkdir(exist_ok=True)
        for color, port in PORTS.items():
            (upstreams / f"lab_{color}.conf").write_text(NGINX_UPSTREAM.format(port=port))
        self._link_on_disk("green")
        (upstreams / "lab2_active.conf").symlink_to(f"{UPSTREAMS_DIR}/lab_green.conf")

        guardd_etc = root / "etc/guardd"
        guardd_etc.mkdir(exist_ok=True)
        self.write_config(GUARD_CONFIG)
        (guardd_etc / f"{SECOND_INSTANCE}.toml").write_text(second_config())

    def start(self) -> None:
        """After boot: do what a package and an operator do, then stop the guard for a test.

        sysusers/tmpfiles are applied as a postinst applies them; the upstreams and nginx
        start; ``guardd.target`` and ``guardd@lab`` are enabled and the target started. The
        active target keeps ``guardd@lab`` loaded while it is stopped, so ``systemctl show``
        reports the last run's Result and exit status instead of an unloaded unit's defaults.
        """
        if (self.c.root / "usr/lib/sysusers.d/guardd.conf").exists():
            self.c.run("systemd-sysusers", "/usr/lib/sysusers.d/guardd.conf")
        if (self.c.root / "usr/lib/tmpfiles.d/guardd.conf").exists():
            self.c.run("systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/guardd.conf")
        self.c.systemctl("daemon-reload")
        self.c.systemctl("start", "lab-upstream@blue.service", "lab-upstream@green.service")
        self.c.systemctl("start", "nginx.service")
        self.c.systemctl("enable", "guardd.target", UNIT)
        self.c.systemctl("start", "guardd.target")
        self.reset()

    def write_config(self, text: str) -> None:
        """Replace /etc/guardd/lab.toml."""
        (self.c.root / CONFIG.lstrip("/")).write_text(text)

    def add_dropin(self, name: str, text: str) -> None:
        """Add a test drop-in to guardd@lab.service (call daemon-reload afterwards)."""
        folder = self.c.root / DROPIN_DIR.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)

    def remove_dropins(self) -> None:
        """Remove every test drop-in of guardd@lab.service and reload systemd."""
        self.c.run("rm", "-rf", DROPIN_DIR)
        self.c.systemctl("daemon-reload")

    def reset(self) -> None:
        """Stop the guards and put the lab back as prepared: green active and healthy, no state.

        ``reset-failed`` also clears the start-limit counter, which counts manual starts too.
        """
        self.c.systemctl("stop", UNIT, SECOND_UNIT)
        self.c.systemctl("reset-failed", UNIT, SECOND_UNIT, check=False)
        self.remove_dropins()
        self.write_config(GUARD_CONFIG)
        for color in PORTS:
            self.heal(color)
        self.c.run(
            "rm", "-rf", STATE_DIR, f"/var/lib/guardd/{SECOND_INSTANCE}", "/run/guardd", FAULT_DIR
        )
        if self.c.systemctl("is-active", "nginx.service", check=False).returncode != 0:
            self.c.systemctl("start", "nginx.service")
        self.set_active("green")

    # ---- the upstreams and nginx -------------------------------------------------------

    def fail(self, color: str) -> None:
        """Make one color answer 503."""
        (self.c.root / LAB_DIR.lstrip("/") / f"{color}.fail").touch()

    def heal(self, color: str) -> None:
        """Make one color answer 200 again."""
        (self.c.root / LAB_DIR.lstrip("/") / f"{color}.fail").unlink(missing_ok=True)

    def _link_on_disk(self, color: str) -> None:
        link = self.c.root / ACTIVE_LINK.lstrip("/")
        link.unlink(missing_ok=True)
        link.symlink_to(f"{UPSTREAMS_DIR}/lab_{color}.conf")

    def set_active(self, color: str) -> None:
        """Point the active link at a color by hand and reload nginx, as an operator would."""
        self.c.run("ln", "-sfn", f"{UPSTREAMS_DIR}/lab_{color}.conf", ACTIVE_LINK)
        self.c.systemctl("reload", "nginx.service")
        self.c.wait_for(
            lambda: self.front_door().get("color") == color, 30, f"nginx to serve {color}"
        )

    def active_link(self) -> str:
        """What the active link names, as ``readlink`` prints it."""
        return self.c.run("readlink", ACTIVE_LINK).stdout.strip()

    def front_door(self, path: str = "/healthz") -> dict[str, Any]:
        """GET nginx's front door over a fresh connection; the upstream's JSON and the status."""
        script = (
            "import json, urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1{path}', timeout=5)\n"
            "    code, body = r.status, r.read()\n"
            "except urllib.error.HTTPError as e:\n"
            "    code, body = e.code, e.read()\n"
            "except OSError as e:\n"
            "    code, body = 0, json.dumps({'error': str(e)}).encode()\n"
            "try:\n"
            "    doc = json.loads(body)\n"
            "except ValueError:\n"
            "    doc = {'body': body.decode(errors='replace')}\n"
            "doc['http_status'] = code\n"
            "print(json.dumps(doc))\n"
        )
        answer: dict[str, Any] = json.loads(self.c.run("python3", "-c", script).stdout)
        return answer

    # ---- the guard ---------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """The guard's journal, events.jsonl, parsed (empty when it does not exist yet)."""
        done = self.c.run("cat", EVENTS, check=False)
        out = []
        for line in done.stdout.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written right now
        return out

    def event_names(self) -> list[str]:
        """The ``event`` field of every journal line, in order."""
        return [str(e.get("event")) for e in self.events()]

    def wait_event(self, name: str, *, after: int = 0, timeout: float = 60) -> dict[str, Any]:
        """Wait until the journal holds an event ``name`` past its first ``after`` lines."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.events()[after:] if e.get("event") == name]
            return bool(found)

        self.c.wait_for(seen, timeout, f"{name!r} in {EVENTS}")
        return found[0]

    def show(self, *props: str) -> dict[str, str]:
        """Several properties of guardd@lab.service at once."""
        out = self.c.systemctl("show", UNIT, "-p", ",".join(props)).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {p: values.get(p, "") for p in props}

    def journal_cursor(self) -> str:
        """A cursor at the end of the container's journal, to read what comes after it."""
        out = self.c.run("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout
        return out.strip().rsplit("-- cursor: ", 1)[-1]

    def journal(self, after: str) -> list[dict[str, Any]]:
        """guardd@lab's system journal entries after ``after``, as journalctl's JSON objects."""
        out = self.c.run(
            "journalctl", "-u", UNIT, "-o", "json", "--no-pager", f"--after-cursor={after}"
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_journal(self, text: str, *, after: str, timeout: float = 60) -> dict[str, Any]:
        """Wait for a journal entry of guardd@lab whose MESSAGE contains ``text``; return it."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.journal(after) if text in message(e)]
            return bool(found)

        self.c.wait_for(seen, timeout, f"{text!r} in the journal of {UNIT}")
        return found[0]

    def main_pid(self, unit: str = UNIT) -> int:
        """The unit's MainPID (0 when it has none)."""
        return int(self.c.show(unit, "MainPID"))

    def proc_status(self, pid: int) -> dict[str, str]:
        """/proc/PID/status of a process in the container, as a dict."""
        out = self.c.run("cat", f"/proc/{pid}/status").stdout
        return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}

    def mounts_seen_by(self, pid: int) -> dict[str, str]:
        """Mount point -> mount options, as the process ``pid`` sees them (its namespace)."""
        out = self.c.run("nsenter", "-t", str(pid), "-m", "cat", "/proc/self/mountinfo").stdout
        mounts: dict[str, str] = {}
        for line in out.splitlines():
            fields = line.split()
            mounts[fields[4]] = fields[5]  # the last mount at a point is the one in effect
        return mounts

    def timed_systemctl(self, *args: str) -> float:
        """Run ``systemctl ARGS`` in the container; return how long the call took, in seconds."""
        started = time.monotonic()
        self.c.systemctl(*args)
        return time.monotonic() - started


def message(entry: dict[str, Any]) -> str:
    """The MESSAGE of a journal entry (journalctl prints a list of bytes for binary ones)."""
    value = entry.get("MESSAGE", "")
    return bytes(value).decode(errors="replace") if isinstance(value, list) else str(value)


def realtime(entry: dict[str, Any]) -> float:
    """When a journal entry was logged, in seconds since the epoch."""
    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6
