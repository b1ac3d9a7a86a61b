"""Careful file I/O: atomic replacement, and opens that refuse planted symlinks.

guardd often runs as root and writes into directories other tools can write to (the
app's deploy-state file, `/run`), so every path it writes is opened with `O_NOFOLLOW`
and must be a regular file, and every replacement goes through a temp file beside the
target: a reader, or guardd after a `kill -9` or a power cut, sees either the old
content or the new one, never a mix.

One writer per path at a time: the temp name is fixed (see `temp_path_for`) so that
the debris of a crash is found and cleared by the next write or by `remove_debris`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import stat
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO, Final

from guardd.exceptions import AlreadyRunning, StorageError, UnsafePath

__all__ = [
    "atomic_write",
    "fsync_dir",
    "hold_instance_lock",
    "not_regular",
    "open_nofollow",
    "open_regular",
    "read_bytes",
    "remove_debris",
    "temp_path_for",
]

_DEFAULT_MODE = 0o644
_TEMP_SUFFIX = ".guardd-tmp"


def temp_path_for(path: Path) -> Path:
    """Return the fixed temp path `atomic_write` uses for *path*: a hidden sibling."""
    return path.with_name(f".{path.name}{_TEMP_SUFFIX}")


def open_nofollow(path: Path, flags: int, mode: int = _DEFAULT_MODE) -> int:
    """Open *path* without following a symlink and return the fd of a regular file.

    Raises `UnsafePath` if *path* is a symlink or not a regular file; other `OSError`s
    (`FileNotFoundError` included) propagate so callers can tell "missing" apart.
    """
    # O_NONBLOCK keeps an open of a planted FIFO from hanging; it is cleared below
    # and changes nothing for regular files.
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path}: is a symlink; refusing to follow it") from exc
        raise
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise UnsafePath(f"{path}: is not a regular file")
    return fd


def _holder(read: Callable[[], bytes]) -> str:
    """Who holds a lock, from the pid its holder wrote (`read`): `another guardd (pid N)`
    only when pid N runs guardd now. The pid is a hint: a holder that could not write its
    own (a full disk) leaves the last one there, and the lock may be anyone's (`flock`)."""
    try:
        text = read()[:32].decode("ascii", "replace").strip()
    except (OSError, UnsafePath):
        text = ""
    if not text.isdigit():
        return "another process (a guardd?)"
    if _runs_guardd(int(text)):
        return f"another guardd (pid {text})"
    return f"another process (the pid its file names, {text}, runs no guardd)"


def _runs_guardd(pid: int) -> bool:
    """Whether process `pid` runs guardd: this one (the lock taken through another open,
    as a reload onto the same target does), or one whose program is guardd: the command
    itself (`/usr/bin/guardd`), or what a Python interpreter runs (`python -m guardd.cli`,
    `python /usr/bin/guardd`). Not a program that merely names guardd's files (`tail -f
    guardd.log`, `journalctl -u guardd@x`)."""
    if pid == os.getpid():
        return True
    try:
        with Path(f"/proc/{pid}/cmdline").open("rb") as f:
            argv = f.read(64 * 1024).decode(errors="replace").split("\0")
    except OSError:
        return False  # no such process (any more), or not ours to look at
    return _program(argv) in _DAEMONS


#: The programs that are the daemon: its command, `python -m guardd` and `-m guardd.cli`
#: (not `guardd.ctl`, which is guardctl).
_DAEMONS: Final = frozenset({"guardd", "guardd.cli"})
# Python's options that take a value, given apart (`-X dev`) or attached (`-Xdev`).
_VALUED: Final = frozenset("WX")


def _program(argv: list[str]) -> str:
    """The program a command line runs: its command's name, or, for a Python interpreter,
    the module of `-m`, `-c` for a command string, else its script's name (Python reads
    its options up to the first of these; what follows is the program's own)."""
    program = Path(argv[0]).name
    if not program.startswith("python"):
        return program
    args = iter(argv[1:])
    for arg in args:
        if not arg.startswith("-") or arg in ("-", "--"):
            return Path(next(args, "") if arg == "--" else arg).name
        for i, flag in enumerate(arg[1:], 1):
            if flag in "mc" or flag in _VALUED:
                value = arg[i + 1 :] or next(args, "")
                if flag == "m":
                    return value
                if flag == "c":
                    return "-c"
                break  # -W/-X's value
    return ""


def _write_pid(fd: int) -> None:
    # Only a hint for the holder's message: a disk too full to take it changes nothing.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def hold_instance_lock(directory: Path) -> int:
    """Take the exclusive `flock` on `directory` itself and write this process's pid into
    `<directory>/guardd.pid`; the directory's fd, to keep open for as long as the process
    guards.

    The directory, not a file in it, carries the lock: taking it creates nothing, so a full
    disk never keeps guardd from starting (the pid file is then left as it was). The kernel
    lets go of the lock when the process ends, however it ends (`kill -9` too), so nothing
    stale ever keeps the next guardd out. Raises `AlreadyRunning` (naming the holder's pid
    when its file says it) when another process holds it, `OSError` when the directory
    cannot be opened.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    pid_file = directory / "guardd.pid"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        who = _holder(lambda: read_bytes(pid_file))
        raise AlreadyRunning(
            f"{who} runs with this state directory: {directory} is locked"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError, UnsafePath):
        pid_fd = open_nofollow(pid_file, os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            _write_pid(pid_fd)
        finally:
            os.close(pid_fd)
    return fd


def link_end(target: Path, ends: Collection[Path] = ()) -> Path:
    """The last symlink of the chain `target` begins: `target` itself unless it is a
    symlink to another symlink (an alias of nginx's active link), followed to the last one
    before one of `ends` (the colors' targets) or a file that is no symlink. At most 8
    links are followed; one that cannot be read ends the chain."""
    # Asked at every decision tick (`Supervisor.keep_switch_lock`): strings and the `os`
    # calls, and the ends looked at only once a hop is a symlink (0.6 of the cost of the
    # same with pathlib, as measured).
    path = os.fspath(target)
    ends_st: list[os.stat_result] | None = None
    for _ in range(8):
        try:
            # (An absolute link replaces the folder. Strings: see above.)
            hop = os.path.join(os.path.dirname(path), os.readlink(path))  # noqa: PTH115, PTH118, PTH120
            st = os.lstat(hop)
        except OSError:
            break
        if not stat.S_ISLNK(st.st_mode):
            break
        if ends_st is None:
            ends_st = []
            for end in ends:
                with contextlib.suppress(OSError):
                    ends_st.append(os.lstat(end))
        if any(os.path.samestat(st, e) for e in ends_st):
            break
        path = hop
    return target if path == os.fspath(target) else Path(path)


@functools.lru_cache(maxsize=16)  # (asked at every decision tick, of one or two paths)
def lock_beside(link: Path) -> Path:
    """The lock file of `link`, the end of a switch target's chain: `.<name>.guardd.lock`
    beside it (an nginx include of `*.conf` never reads it)."""
    return link.with_name(f".{link.name}.guardd.lock")


def switch_lock_path(target: Path, ends: Collection[Path] = ()) -> Path:
    """The lock of a switch target: `lock_beside(link_end(target, ends))`, so that every
    alias of one link shares its lock."""
    return lock_beside(link_end(target, ends))


def hold_switch_lock(target: Path, ends: Collection[Path] = ()) -> tuple[Path, int]:
    """Take the exclusive `flock` on `switch_lock_path(target, ends)` (created if need be)
    and write this process's pid into it; the lock's path and fd, the fd to keep open for
    as long as the process may switch `target` (an nginx active link, a state file).

    Two guardd switching one target would each undo the other's switches and read the
    other's undo records as their own. The kernel lets go of the lock when the process
    ends, however it ends. Raises `AlreadyRunning` (naming the holder's pid when the file
    says it) when another process holds it; `OSError` or `UnsafePath` when the file cannot
    be opened or created (a directory, a symlink or a hard link planted there, a read-only
    folder).
    """
    path = switch_lock_path(target, ends)
    for _ in range(3):
        fd = _lock_file(path, target)
        # Locked, but maybe a file its holder removed as it let go (`release_switch_lock`)
        # between this open and this lock: then the lock is of no file; take the new one.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.lstat(path), os.fstat(fd)):
                break
        os.close(fd)
    else:
        raise AlreadyRunning(f"another guardd switches {target}: {path} keeps being replaced")
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o640)  # (a file left with another mode)
    _write_pid(fd)
    return path, fd


def release_switch_lock(path: Path, fd: int) -> None:
    """Let go of a lock `hold_switch_lock` took, removing its file first (while still
    held, and only if it is still the file locked): a clean stop leaves nothing beside
    the target. A process killed leaves the file, and the next start takes it."""
    with contextlib.suppress(OSError):
        if os.path.samestat(os.lstat(path), os.fstat(fd)):
            path.unlink()
    os.close(fd)


def _lock_file(path: Path, target: Path) -> int:
    """Open (or create) the lock file `path` of `target` and lock it; its fd."""
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        links = os.fstat(fd).st_nlink
    except BaseException:
        os.close(fd)
        raise
    if links > 1:
        # A hard link planted there: writing the pid would overwrite another file.
        os.close(fd)
        raise UnsafePath(f"{path}: has {links} hard links; refusing to write it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(lambda: os.pread(fd, 32, 0))
        os.close(fd)
        raise AlreadyRunning(f"{who} switches {target}: {path} is locked") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


_READ_CHUNK = 64 * 1024


def read_bytes(path: Path) -> bytes:
    """Read a regular file without following a symlink at *path*.

    Raises `FileNotFoundError` if it is missing, `UnsafePath` if it is a symlink or not
    a regular file, `StorageError` for any other I/O error.
    """
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except (FileNotFoundError, UnsafePath):
        raise
    except OSError as exc:
        raise StorageError(f"{path}: cannot open: {exc.strerror}") from exc
    # os.read on the fd, not a file object: a switcher reads its state file every round,
    # and a buffered file costs six system calls more (fstat, ioctl, lseek) than the read.
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
    except OSError as exc:
        raise StorageError(f"{path}: cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return b"".join(chunks)


#: What a path that is not a regular file is, by its `stat.S_IFMT`, for messages.
_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFLNK: "a symlink",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def kind_of(mode: int) -> str:
    """What a file of this `st_mode` is, for messages: `a FIFO`, `a symlink`."""
    return _KINDS.get(stat.S_IFMT(mode), "of an unknown kind")


def not_regular(mode: int) -> str | None:
    """Why a file of this `st_mode` is no file to read (`not a regular file (a FIFO)`), or
    None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({kind_of(mode)})"


def open_regular(path: Path) -> BinaryIO:
    """Open `path` to read, following a symlink, only if it is a regular file.

    A FIFO would block the open, and a FIFO or a device (`/dev/zero` behind a symlink)
    would give bytes without end: the open never waits (`O_NONBLOCK`, which changes
    nothing for a regular file) and anything else is refused. Raises `OSError`; its
    `strerror` says why (`not a regular file (a FIFO)`).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        why = not_regular(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if why is not None:
        os.close(fd)
        raise OSError(errno.EINVAL, why, str(path))
    return os.fdopen(fd, "rb")


def fsync_dir(directory: Path) -> None:
    """Flush *directory*'s entries to disk, so a rename or unlink in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_debris(path: Path) -> bool:
    """Remove the temp file a crashed `atomic_write` of *path* left; True if there was one.

    The entry is unlinked, never followed, so a symlink planted there goes without harm.
    """
    try:
        temp_path_for(path).unlink()
    except FileNotFoundError:
        return False
    return True


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace *path* with *data* atomically: temp file beside it, fsync, rename, fsync dir.

    *mode* defaults to the replaced file's mode (0o644 for a new file); owner and group
    are kept too when we may. Raises `UnsafePath` if *path* is a symlink or not a regular
    file, `StorageError` if the write fails; *path* is then untouched.
    """
    try:
        current: os.stat_result | None = path.lstat()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise StorageError(f"{path}: cannot stat: {exc.strerror}") from exc
    if current is not None and not stat.S_ISREG(current.st_mode):
        kind = "a symlink" if stat.S_ISLNK(current.st_mode) else "not a regular file"
        raise UnsafePath(f"{path}: is {kind}; refusing to replace it")

    if mode is None:
        mode = stat.S_IMODE(current.st_mode) if current is not None else _DEFAULT_MODE
    temp = temp_path_for(path)
    fd = _create_exclusive(temp)
    try:
        try:
            if current is not None:
                # Keep what the file's other readers rely on (e.g. the app's group).
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, current.st_uid, current.st_gid)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        temp.replace(path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise StorageError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _create_exclusive(temp: Path) -> int:
    """Create *temp* exclusively; clear one leftover (crash debris or a planted link) first."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(2):
        try:
            # O_CREAT|O_EXCL fails on any existing entry, a symlink included, so
            # nothing planted at the temp path is ever followed.
            return os.open(temp, flags, 0o600)
        except FileExistsError:
            if attempt:
                break
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        except OSError as exc:
            raise StorageError(f"{temp}: cannot create: {exc.strerror}") from exc
    raise UnsafePath(f"{temp}: keeps reappearing; another writer is racing guardd")
