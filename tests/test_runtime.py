"""One path builds what a config asks for, at start and on reload (`Supervisor.build_runtime`).

A reload builds a whole new runtime from the new file; the parts whose config did not
change are the very objects already running (a prober keeps its connections, a switcher
its state), and `install` closes exactly the parts it replaced.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from guardd import config
from guardd.config import Settings
from guardd.exceptions import SwitchLockError
from guardd.fsutil import hold_switch_lock
from guardd.supervisor import Runtime, Supervisor
from guardd.systemd import SystemdNotifier

pytestmark = pytest.mark.anyio

BASE = """
instance = "lab"
[upstreams.blue]
url = "http://127.0.0.1:9009/healthz"
[upstreams.green]
url = "http://127.0.0.1:9010/healthz"
[probe]
timeout = "2s"
[switch]
kind = "command"
command = ["true"]
timeout = "5s"
verify_url = "http://127.0.0.1:9011/healthz"
[state]
dir = "@STATE@"
[control]
socket = "@STATE@/lab.sock"
[metrics]
listen = ""
"""


def settings(tmp_path: Path, text: str = BASE) -> Settings:
    path = tmp_path / "lab.toml"
    path.write_text(text.replace("@STATE@", str(tmp_path / "state")))
    return config.load(path)


def supervisor(tmp_path: Path) -> Supervisor:
    return Supervisor(settings(tmp_path), sd=SystemdNotifier({}))


def parts(r: Runtime) -> dict[str, object]:
    return {
        "blue": r.probers["blue"],
        "green": r.probers["green"],
        "verifier": r.verifier,
        "switcher": r.switcher,
    }


async def close(r: Runtime) -> None:
    for prober in r.probers.values():
        await prober.aclose()
    if r.verifier is not None:
        await r.verifier.aclose()


async def test_start_builds_every_part(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    r = sup.build_runtime(sup.settings)
    try:
        assert r.probers["blue"].urls == ["http://127.0.0.1:9009/healthz"]
        assert r.probers["green"].urls == ["http://127.0.0.1:9010/healthz"]
        assert r.verifier is not None and r.verifier.urls == ["http://127.0.0.1:9011/healthz"]
        assert r.guard.instance == "lab" and r.guard.switch_timeout == 5.0
        assert set(r.probe_identity) == {"blue", "green"}
        assert r.notifier is None  # no [[notify]]
        assert r.signals == {}
    finally:
        await close(r)


async def test_the_same_file_reuses_every_part(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    first = sup.build_runtime(sup.settings)
    again = sup.build_runtime(settings(tmp_path), first)
    try:
        assert all(parts(again)[k] is v for k, v in parts(first).items())
    finally:
        await close(first)


@pytest.mark.parametrize(
    ("edit", "rebuilt"),
    [
        (("9009/healthz", "9019/healthz"), {"blue"}),
        (("9010/healthz", "9020/healthz"), {"green"}),
        (('timeout = "2s"', 'timeout = "2500ms"'), {"blue", "green", "verifier"}),
        # verify_url is in [switch]: the switcher is rebuilt with its section.
        (("9011/healthz", "9021/healthz"), {"verifier", "switcher"}),
        (('timeout = "5s"', 'timeout = "6s"'), {"switcher"}),
        (('command = ["true"]', 'command = ["false"]'), {"switcher"}),
    ],
    ids=["blue url", "green url", "probe timeout", "verify_url", "switch timeout", "command"],
)
async def test_a_reload_rebuilds_only_what_changed(
    tmp_path: Path, edit: tuple[str, str], rebuilt: set[str]
) -> None:
    sup = supervisor(tmp_path)
    first = sup.build_runtime(sup.settings)
    new = sup.build_runtime(settings(tmp_path, BASE.replace(*edit)), first)
    try:
        changed = {k for k, v in parts(first).items() if parts(new)[k] is not v}
        assert changed == rebuilt
    finally:
        await close(first)
        for color in ("blue", "green"):
            if color in rebuilt:
                await new.probers[color].aclose()
        if "verifier" in rebuilt and new.verifier is not None:
            await new.verifier.aclose()


async def test_install_closes_exactly_the_parts_it_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = supervisor(tmp_path)
    first = sup.build_runtime(sup.settings)
    keep = await sup.install(first)
    assert keep == {"blue", "green"} and sup.runtime is first and sup.probers is first.probers
    closed: list[str] = []
    assert first.verifier is not None
    for name, part in (*first.probers.items(), ("verifier", first.verifier)):
        monkeypatch.setattr(part, "aclose", _recorder(closed, name, part.aclose))
    edited = BASE.replace("9009/healthz", "9019/healthz").replace("9011/", "9021/")
    new = sup.build_runtime(settings(tmp_path, edited), first)
    keep = await sup.install(new)
    try:
        assert keep == {"green"}  # blue's probe history starts afresh
        assert sorted(closed) == ["blue", "verifier"]
        assert sup.runtime is new and sup.settings is new.settings
        assert sup.probers["green"] is first.probers["green"]
    finally:
        await close(new)


def _recorder(
    log: list[str], name: str, close: Callable[[], Awaitable[None]]
) -> Callable[[], Awaitable[None]]:
    async def aclose() -> None:
        log.append(name)
        await close()

    return aclose


def _state_file(tmp_path: Path, name: str) -> Settings:
    """BASE switching with the state file `name` (made), for a guard of its own."""
    (tmp_path / name).write_text('{"activeColor": "blue"}')
    text = BASE.replace(
        'kind = "command"\ncommand = ["true"]', f'kind = "state-file"\npath = "{tmp_path / name}"'
    )
    return settings(tmp_path, text)


async def test_one_switch_target_is_built_for_one_guardd_at_a_time(tmp_path: Path) -> None:
    """A second guard of the same state file is refused, naming the key and the holder;
    a reload moving to another file lets go of the first once it is in force."""
    a, b = supervisor(tmp_path), supervisor(tmp_path)
    first = a.build_runtime(_state_file(tmp_path, "active.json"))
    await a.install(first)
    built: list[Runtime] = [first]
    try:
        with pytest.raises(SwitchLockError) as refused:
            b.build_runtime(_state_file(tmp_path, "active.json"))
        target = tmp_path / "active.json"
        assert str(refused.value) == (
            f"{tmp_path / 'lab.toml'}: switch.path: another guardd (pid {os.getpid()}) "
            f"switches {target}: {tmp_path / '.active.json.guardd.lock'} is locked; two "
            "guards of one target undo each other's switches: give each instance its own"
        )
        assert b.runtime is None and not b._switch_locks, "b holds nothing"
        # a moves to another file: built (its lock taken), then in force (the old let go).
        moved = a.build_runtime(_state_file(tmp_path, "other.json"), first)
        built.append(moved)
        with pytest.raises(SwitchLockError):
            b.build_runtime(_state_file(tmp_path, "active.json"))
        await a.install(moved)
        built.append(b.build_runtime(_state_file(tmp_path, "active.json")))
        with pytest.raises(SwitchLockError, match=r"switches .*other\.json"):
            b.build_runtime(_state_file(tmp_path, "other.json"))
        # A kind without a file (command) holds none.
        await a.install(a.build_runtime(settings(tmp_path), moved))
        assert not a._switch_locks
    finally:
        a._release_switch_locks(keep=None)
        b._release_switch_locks(keep=None)
        for r in built:
            await close(r)


async def test_a_lock_whose_file_went_is_taken_again_or_refuses_the_switch(
    tmp_path: Path,
) -> None:
    """The lock file removed, replaced, taken by another process or turned into a
    directory while guardd runs: `keep_switch_lock` takes it again when it can, and
    otherwise says why guardd may not switch, until it holds it again."""
    sup = supervisor(tmp_path)
    runtime = sup.build_runtime(_state_file(tmp_path, "active.json"))
    await sup.install(runtime)
    target = tmp_path / "active.json"
    lock = tmp_path / ".active.json.guardd.lock"
    try:
        assert sup.keep_switch_lock() is None
        for how in ("removed", "replaced"):
            if how == "removed":
                lock.unlink()
            else:
                (tmp_path / "stranger").write_text("")
                (tmp_path / "stranger").replace(lock)
            assert sup.keep_switch_lock() is None, how
            assert lock.read_text().strip() == str(os.getpid()), how
            ((_, held),) = sup._switch_locks.values()
            assert os.path.samestat(os.lstat(lock), os.fstat(held)), how

        # Another lock in its place (one of this process's own, as another process's
        # is: a flock is of its open file): refused until that one lets go.
        lock.unlink()
        _, theirs = hold_switch_lock(target)
        try:
            for _ in range(2):  # (asked again: still refused, the same words)
                assert sup.keep_switch_lock() == (
                    f"guardd does not switch {target} now: its lock cannot be held: another "
                    f"guardd (pid {os.getpid()}) switches {target}: {lock} is locked"
                )
        finally:
            os.close(theirs)
        assert sup.keep_switch_lock() is None, "free again: taken"
        assert lock.read_text().strip() == str(os.getpid())

        # A directory planted where it was: refused, nothing followed or written.
        lock.unlink()
        lock.mkdir()
        assert sup.keep_switch_lock() == (
            f"guardd does not switch {target} now: its lock cannot be held: {lock}: Is a directory"
        )
        lock.rmdir()
        assert sup.keep_switch_lock() is None
    finally:
        sup._release_switch_locks(keep=None)
        await close(runtime)
    assert not lock.exists()


def _nginx_at(tmp_path: Path, link: Path) -> Settings:
    """BASE switching nginx through `link`, anywhere, the targets made in `upstreams/`."""
    _nginx(tmp_path, "app_active.conf")  # (the targets)
    ups = tmp_path / "upstreams"
    text = BASE.replace(
        'kind = "command"\ncommand = ["true"]',
        f'kind = "nginx"\nactive_link = "{link}"\n'
        f'targets = {{ blue = "{ups}/app_blue.conf", green = "{ups}/app_green.conf" }}',
    )
    return settings(tmp_path, text)


def _relink(link: Path, to: Path) -> None:
    """Point `link` at `to` atomically, as a deploy tool does (a rename over it)."""
    new = link.with_name(f"{link.name}.new")
    new.symlink_to(to)
    new.replace(link)


async def test_a_link_made_an_alias_under_a_running_guard_is_not_switched(
    tmp_path: Path,
) -> None:
    """The link turned into an alias while guardd runs (and its lock file removed then):
    refused as at start, no lock taken beside the alias; once it is the link again, the
    lock is taken beside it, and a second guard of it is refused."""
    ups = tmp_path / "upstreams"
    s = _nginx(tmp_path, "app_active.conf")
    link, lock = ups / "app_active.conf", ups / ".app_active.conf.guardd.lock"
    link.symlink_to(ups / "app_green.conf")
    sup = supervisor(tmp_path)
    runtime = sup.build_runtime(s)
    await sup.install(runtime)
    try:
        (ups / "mid.conf").symlink_to(ups / "app_green.conf")
        _relink(link, ups / "mid.conf")
        lock.unlink()
        assert sup.keep_switch_lock() == (
            f"guardd does not switch {link} now: {link} points at {ups / 'mid.conf'}, itself "
            "a symlink and none of switch.targets: point it straight at one of them, or set "
            "switch.active_link to the link nginx includes"
        )
        assert not (ups / ".mid.conf.guardd.lock").exists(), "no lock beside the alias"
        _relink(link, ups / "app_green.conf")
        assert sup.keep_switch_lock() is None
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(SwitchLockError, match="is locked"):
            supervisor(tmp_path).build_runtime(s)
    finally:
        sup._release_switch_locks(keep=None)
        await close(runtime)


async def test_a_link_whose_folder_is_flipped_follows_its_lock(tmp_path: Path) -> None:
    """active_link spelled through a folder link that a deploy flips to another folder
    (`current` -> a release): the lock follows to the link now reached, refused while
    another guard holds that one's."""
    releases = [tmp_path / "rel1", tmp_path / "rel2"]
    for folder in releases:
        folder.mkdir()
        (folder / "app_active.conf").symlink_to(tmp_path / "upstreams" / "app_green.conf")
    current = tmp_path / "current"
    current.symlink_to(releases[0])
    sup = supervisor(tmp_path)
    # Started on the release's own spelling, then reloaded onto `current`'s: the same
    # link, so the same lock, held as it was.
    first = sup.build_runtime(_nginx_at(tmp_path, releases[0] / "app_active.conf"))
    await sup.install(first)
    runtime = sup.build_runtime(_nginx_at(tmp_path, current / "app_active.conf"), first)
    await sup.install(runtime)
    link, lock = current / "app_active.conf", current / ".app_active.conf.guardd.lock"
    try:
        assert (releases[0] / lock.name).read_text().strip() == str(os.getpid())
        _, theirs = hold_switch_lock(releases[1] / "app_active.conf")
        try:
            _relink(current, releases[1])
            for _ in range(2):
                assert sup.keep_switch_lock() == (
                    f"guardd does not switch {link} now: its lock cannot be held: another "
                    f"guardd (pid {os.getpid()}) switches {link}: {lock} is locked"
                )
        finally:
            os.close(theirs)
        assert sup.keep_switch_lock() is None
        ((_, held),) = sup._switch_locks.values()
        assert os.path.samestat((releases[1] / lock.name).stat(), os.fstat(held))
    finally:
        sup._release_switch_locks(keep=None)
        await close(runtime)


def _refused_at_start(tmp_path: Path, s: Settings) -> str:
    """What a start with `s` is refused with (`SwitchLockError`); no lock is held after."""
    sup = supervisor(tmp_path)
    with pytest.raises(SwitchLockError) as refused:
        sup.build_runtime(s)
    assert not sup._switch_locks
    return str(refused.value)


@pytest.mark.parametrize("planted", ["directory", "symlink"])
async def test_a_lock_that_cannot_be_taken_refuses_the_target(tmp_path: Path, planted: str) -> None:
    """Something planted where the lock goes: guardd cannot tell whether another guard
    switches the file, and does not build a switcher of it (it never guards unlocked)."""
    lock = tmp_path / ".active.json.guardd.lock"
    if planted == "directory":
        lock.mkdir()
    else:
        (tmp_path / "victim").write_text("precious")
        lock.symlink_to(tmp_path / "victim")
    said = _refused_at_start(tmp_path, _state_file(tmp_path, "active.json"))
    why = (
        f"{lock}: Is a directory"
        if planted == "directory"
        else f"{lock}: is a symlink; refusing to follow it"
    )
    assert said == (
        f"{tmp_path / 'lab.toml'}: switch.path: cannot take the lock beside it: {why}; guardd "
        "switches it only while it holds that lock"
    )
    if planted == "symlink":
        assert (tmp_path / "victim").read_text() == "precious"


def test_a_start_that_cannot_write_beside_the_link_names_the_link(tmp_path: Path) -> None:
    """A file the start could not write in the switch target's folder is that key's
    problem; any other is state.dir's."""
    ups = tmp_path / "upstreams"
    text = BASE.replace(
        'kind = "command"\ncommand = ["true"]',
        f'kind = "nginx"\nactive_link = "{ups}/app_active.conf"\n'
        f'targets = {{ blue = "{ups}/app_blue.conf", green = "{ups}/app_green.conf" }}',
    )
    sup = Supervisor(settings(tmp_path, text), sd=SystemdNotifier({}))
    beside = OSError(errno.EROFS, "Read-only file system", str(ups / ".app_active.conf.guardd-new"))
    assert sup._startup_error(beside) == (
        f"{tmp_path / 'lab.toml'}: switch.active_link: cannot write {beside.filename}: "
        "Read-only file system; run guardd as the guardd user (as guardd@.service does), or "
        "set switch.active_link to a path this user may write"
    )
    state = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "state" / "x"))
    assert sup._startup_error(state).startswith(f"{tmp_path / 'lab.toml'}: state.dir: ")


def _nginx(tmp_path: Path, link: str) -> Settings:
    """BASE switching nginx through `link` (a name in `upstreams/`), the targets made."""
    ups = tmp_path / "upstreams"
    ups.mkdir(exist_ok=True)
    for color in ("blue", "green"):
        (ups / f"app_{color}.conf").write_text("")
    text = BASE.replace(
        'kind = "command"\ncommand = ["true"]',
        f'kind = "nginx"\nactive_link = "{ups / link}"\n'
        f'targets = {{ blue = "{ups}/app_blue.conf", green = "{ups}/app_green.conf" }}',
    )
    return settings(tmp_path, text)


async def test_an_alias_of_the_active_link_is_refused_at_start(tmp_path: Path) -> None:
    """A start makes no host checks, but guardd never switches an alias of the link nginx
    includes: its swaps would change nothing nginx reads."""
    ups = tmp_path / "upstreams"
    s = _nginx(tmp_path, "alias.conf")
    (ups / "app_active.conf").symlink_to(ups / "app_blue.conf")
    (ups / "alias.conf").symlink_to(ups / "app_active.conf")
    assert _refused_at_start(tmp_path, s) == (
        f"{tmp_path / 'lab.toml'}: switch.active_link: {ups / 'alias.conf'} points at "
        f"{ups / 'app_active.conf'}, itself a symlink and none of switch.targets: point it "
        "straight at one of them, or set switch.active_link to the link nginx includes"
    )
    sup = supervisor(tmp_path)
    # The link itself, pointing at a target that is a symlink (a deploy tree): switched.
    (ups / "app_blue.conf").unlink()
    (ups / "app_blue.conf").symlink_to(ups / "app_green.conf")
    (ups / "app_active.conf").unlink()
    (ups / "app_active.conf").symlink_to(ups / "app_blue.conf")
    r = sup.build_runtime(_nginx(tmp_path, "app_active.conf"))
    try:
        assert list(sup._switch_locks) == [ups / "app_active.conf"]
    finally:
        sup._release_switch_locks(keep=None)
        await close(r)


@pytest.mark.parametrize("kind", ["nginx", "state-file"])
async def test_a_target_with_a_second_name_is_refused_at_start(tmp_path: Path, kind: str) -> None:
    """A hard link to the active link or the state file (`ln -P`), in another folder: a
    guard of either name would take a lock of its own, and its switches (a rename over its
    name) leave the other name as it was. Refused at every start, host checks or not."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    if kind == "nginx":
        s = _nginx(tmp_path, "app_active.conf")
        target = tmp_path / "upstreams" / "app_active.conf"
        target.symlink_to(target.with_name("app_blue.conf"))
        key = "switch.active_link"
    else:
        s = _state_file(tmp_path, "active.json")
        target, key = tmp_path / "active.json", "switch.path"
    os.link(target, other / target.name, follow_symlinks=False)
    assert _refused_at_start(tmp_path, s) == (
        f"{tmp_path / 'lab.toml'}: {key}: {target} has 2 hard links; a switch replaces this "
        "name only, and the others keep the old target: remove the other names"
    )
    (other / target.name).unlink()
    sup = supervisor(tmp_path)
    r = sup.build_runtime(s)
    try:
        assert list(sup._switch_locks) == [target]
    finally:
        sup._release_switch_locks(keep=None)
        await close(r)


@pytest.mark.parametrize("targets", [False, True], ids=["plain", "with-a-targets-table"])
async def test_a_state_file_reached_through_a_link_is_refused_at_start(
    tmp_path: Path, targets: bool
) -> None:
    """Refused with the state file's words, a `[switch.targets]` table (which means
    nothing to `kind = "state-file"`) or not."""
    _state_file(tmp_path, "real.json")
    (tmp_path / "linked.json").symlink_to(tmp_path / "real.json")
    text = (tmp_path / "lab.toml").read_text().replace("real.json", "linked.json")
    if targets:
        text += f'[switch.targets]\nblue = "{tmp_path / "real.json"}"\ngreen = "{tmp_path}/x"\n'
    assert _refused_at_start(tmp_path, settings(tmp_path, text)) == (
        f"{tmp_path / 'lab.toml'}: switch.path: {tmp_path / 'linked.json'} is a symlink; "
        "guardd replaces the state file itself, never through a link: set switch.path to the file"
    )
