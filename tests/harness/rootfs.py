"""A cached Debian bookworm root filesystem that boots a real systemd 252 under systemd-nspawn.

The image is built once with debootstrap and kept as a zstd tarball in
``${GUARDD_TEST_CACHE:-~/.cache/guardd-tests}/bookworm-<hash>.tar.zst``, outside the
repository. The hash covers the suite, the package list, the masked units and
``BUILD_VERSION``, so changing any of them builds a new image; bump ``BUILD_VERSION``
whenever the build steps below change. Builds take a file lock, so two pytest runs never
debootstrap the same image at once. The mirror is read from the host's apt sources.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
BUILD_VERSION = 2
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "procps",  # /bin/kill, which `ExecReload=/bin/kill -HUP $MAINPID` needs
    "nginx-light",
)
# Consoles nobody reads and periodic jobs that would only add noise to a test's journal.
MASKED_UNITS = (
    "console-getty.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)
# Tests start nginx with their own config; a default site on :80 would only get in the way.
DISABLED_UNITS = ("nginx.service",)
HOSTNAME = "guardtest"
HOST_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "zstd": "zstd",
    "nsenter": "util-linux",
    "chroot": "coreutils",
}
LOCK_TIMEOUT = 900.0
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
APT_SOURCES_LEGACY = Path("/etc/apt/sources.list")
TAR_OPTIONS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


class HarnessError(RuntimeError):
    """The systemd test harness cannot do its job on this machine; the message says why."""


def cache_dir() -> Path:
    """Return the folder that holds built images, creating it if needed."""
    base = os.environ.get("GUARDD_TEST_CACHE") or Path.home() / ".cache" / "guardd-tests"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def image_hash() -> str:
    """Return a short digest of everything that decides what the image contains."""
    recipe = {
        "suite": SUITE,
        "packages": sorted(PACKAGES),
        "masked": sorted(MASKED_UNITS),
        "disabled": sorted(DISABLED_UNITS),
        "hostname": HOSTNAME,
        "version": BUILD_VERSION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def ensure_host_tools() -> None:
    """Make sure the host can build and boot images, installing missing packages with apt."""
    if os.geteuid() != 0:
        raise HarnessError("systemd tests need root: debootstrap, chroot and systemd-nspawn do")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"harness: installing host packages {missing}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update"],
        # No recommends: libnss-mymachines would otherwise land in the host's nsswitch.conf.
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise HarnessError(
                f"`{' '.join(argv)}` failed ({done.returncode}); the systemd tests need "
                f"{missing}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
    still_missing = sorted(tool for tool in HOST_TOOLS if shutil.which(tool) is None)
    if still_missing:
        raise HarnessError(f"commands still missing after apt-get install: {still_missing}")


def debian_mirror() -> str:
    """Return the Debian mirror this host's apt already uses, so no host name is written down."""
    if APT_SOURCES.exists():
        for line in APT_SOURCES.read_text().splitlines():
            if line.startswith("URIs:") and len(line.split()) > 1:
                return line.split()[1]
    if APT_SOURCES_LEGACY.exists():
        for line in APT_SOURCES_LEGACY.read_text().splitlines():
            match = re.match(r"deb\s+(?:\[[^]]*]\s+)?(\S+)\s+\S+", line)
            if match:
                return match.group(1)
    raise HarnessError(f"no Debian mirror found in {APT_SOURCES} or {APT_SOURCES_LEGACY}")


def build_image(cache: Path | None = None) -> Path:
    """Return the cached image tarball, building it first if it is missing."""
    cache = cache or cache_dir()
    digest = image_hash()
    image = cache / f"{SUITE}-{digest}.tar.zst"
    if image.exists():
        return image
    with _locked(cache / f"{SUITE}-{digest}.lock"):
        if image.exists():  # another pytest run built it while we waited for the lock
            return image
        for stale in cache.glob(f".build-{digest}-*"):
            remove_tree(stale)
        staging = cache / f".build-{digest}-{os.getpid()}"
        try:
            started = time.monotonic()
            _debootstrap(staging / "root")
            _customize(staging / "root")
            _pack(staging / "root", staging / "image.tar.zst")
            (staging / "image.tar.zst").replace(image)
            print(
                f"harness: built {image} in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
            )
        finally:
            remove_tree(staging)
    return image


def unpack_image(image: Path, root: Path) -> None:
    """Unpack an image tarball into ``root``, keeping owners, modes, xattrs and ACLs."""
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["tar", "-I", "zstd", "-C", str(root), *TAR_OPTIONS, "-xpf", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise HarnessError(f"unpacking {image} failed: {done.stderr.strip()}")


def remove_tree(path: Path) -> None:
    """Delete a root filesystem tree without ever following a mount out of it."""
    if not path.exists():
        return
    # A failed debootstrap can leave /proc and /sys mounted inside the target; deleting
    # through a live /sys would remove real cgroups, so unmount first and never cross.
    for mount_point in sorted(_mounts_below(path), key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False, capture_output=True)
    if _mounts_below(path):
        raise HarnessError(f"refusing to delete {path}: something is still mounted below it")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
    if path.exists():
        raise HarnessError(f"could not delete {path}")


def _mounts_below(path: Path) -> list[Path]:
    """Return the mount points at or below ``path`` in this mount namespace."""
    top = path.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with spaces and the like octal-escaped.
        mount_point = Path(line.split()[4].encode().decode("unicode_escape"))
        if mount_point == top or top in mount_point.parents:
            found.append(mount_point)
    return found


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, failing loudly instead of waiting forever."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"another process held {path} for {LOCK_TIMEOUT:.0f} s"
                    ) from exc
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _debootstrap(root: Path) -> None:
    """Install a minimal bookworm with systemd as init into ``root``."""
    root.mkdir(parents=True)
    log = root.parent / "debootstrap.out"
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(root),
        debian_mirror(),
    ]
    print(f"harness: {' '.join(argv)}", file=sys.stderr)
    with log.open("w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        details = log.read_text()[-3000:]
        inner = root / "debootstrap" / "debootstrap.log"
        if inner.exists():
            details += "\n--- debootstrap.log ---\n" + inner.read_text()[-3000:]
        raise HarnessError(f"debootstrap failed ({done.returncode}):\n{details}")


def _customize(root: Path) -> None:
    """Slim the tree and make it boot quietly and quickly as a container."""
    for pattern in (
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*",
        "usr/share/doc/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
        "var/log/*.log",
        "var/cache/debconf/*-old",
        "var/lib/dpkg/*-old",
    ):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != "lock":
                path.unlink()
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")
    # A persistent journal survives the container, so a failed boot can be read afterwards
    # from the kept rootfs with `journalctl -D ROOT/var/log/journal`.
    (root / "var/log/journal").mkdir(exist_ok=True)
    system = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = system / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for unit in DISABLED_UNITS:
        for link in system.glob(f"*.wants/{unit}"):
            link.unlink()


def _pack(root: Path, image: Path) -> None:
    """Write ``root`` into a zstd-compressed tarball."""
    done = subprocess.run(
        ["tar", "-I", "zstd -T0 -3 -q", "-C", str(root), *TAR_OPTIONS, "-cf", str(image), "."],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise HarnessError(f"packing {root} failed: {done.stderr.strip()}")
