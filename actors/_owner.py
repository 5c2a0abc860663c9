"""Single ownership of a SQLite database: an OS file lock held for the runtime's life.

The lock is ``flock(LOCK_EX)`` on the sibling file ``<database>.owner`` (the database path with
symlinks and ``..`` resolved, so every spelling of one file shares one lock). The kernel
releases it when the holder closes it or dies in any way, SIGKILL included, so a dead owner
never needs manual cleanup: the file's existence decides nothing, only the lock does. The file
also records the holder (pid, host, start time) for the message a refused process prints.

A second ``flock`` on the database file itself covers the spellings ``realpath`` cannot join: a
hard link or a bind mount names the same inode under another path (and another ``.owner``
file), and two owners there would each keep their own WAL beside one database file. The
descriptor stays open until the block ends, after the database is closed: closing a
descriptor of the file drops the process's POSIX locks on it, which SQLite's are.

``flock`` locks belong to an open file description, so a second runtime in the *same* process
is refused too. Locks on network filesystems are only as good as the filesystem's.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import orjson

from ._errors import JobspineError, StoreError

__all__ = ["DatabaseLockedError", "database_owner_lock", "owner_lock_path"]


class DatabaseLockedError(JobspineError):
    """Another live process (or runtime) owns the database; nothing was read or written.

    ``pid``, ``host`` and ``since`` (ISO 8601, UTC) describe the owner as it recorded itself;
    they are None if the owner has not recorded itself yet (it is starting)."""

    code = "database_in_use"

    def __init__(
        self,
        database: str,
        lock_path: str,
        pid: int | None,
        host: str | None,
        since: str | None,
        *,
        other_path: bool = False,
    ) -> None:
        if other_path:
            owner = "another process that opened it by another path (a hard link or a mount)"
        elif pid is None:
            owner = "another process that is starting up"
        else:
            owner = f"process {pid} on {host or 'an unknown host'} since {since or 'unknown'}"
        super().__init__(
            f"database {database} is in use by {owner}; one process owns a database at a time"
            f" (lock {lock_path})"
        )
        self.database = database
        self.lock_path = lock_path
        self.pid = pid
        self.host = host
        self.since = since


def owner_lock_path(database: str | os.PathLike[str]) -> str:
    """The lock file of ``database``: its resolved path plus ``.owner``."""
    return os.path.realpath(database) + ".owner"


def _read_owner(fd: int) -> tuple[int | None, str | None, str | None]:
    try:
        raw = os.pread(fd, 4096, 0)
        info = orjson.loads(raw)
        pid = info["pid"]
        host = info["host"]
        since = info["since"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None, None, None  # the owner took the lock and has not written itself yet
    if not (isinstance(pid, int) and isinstance(host, str) and isinstance(since, str)):
        return None, None, None
    return pid, host, since


@contextmanager
def _inode_lock(path: str, lock_path: str) -> Iterator[None]:
    """Hold ``flock`` on the database file itself (created empty if missing: SQLite reads an
    empty file as an empty database), so that every path to its inode shares one lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"database {path}: cannot open: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(f"database {path}: cannot lock: {exc.strerror}") from None
            raise DatabaseLockedError(path, lock_path, None, None, None, other_path=True) from None
        yield
    finally:
        os.close(fd)


@contextmanager
def database_owner_lock(database: str | os.PathLike[str]) -> Iterator[str]:
    """Hold the owner lock of ``database`` (yields the lock file's path) for the block.

    Raises :class:`DatabaseLockedError` at once if another holder has it, and
    :class:`StoreError` if the lock file cannot be created (missing directory, permissions).
    Take it before the database is opened, so a refused process changes nothing."""
    path = os.fspath(database)
    lock_path = owner_lock_path(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise StoreError(f"database {path}: not a file")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(
            f"database {path}: cannot open its owner lock {lock_path}: {exc.strerror}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(
                    f"database {path}: cannot lock {lock_path}: {exc.strerror}"
                ) from None
            raise DatabaseLockedError(path, lock_path, *_read_owner(fd)) from None
        with _inode_lock(path, lock_path):
            since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            info = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
            yield lock_path
    finally:
        # Closing the descriptor releases the lock. The file stays: unlinking it would let a
        # process that opened the old inode and one that creates a new file both "own" it.
        os.close(fd)
