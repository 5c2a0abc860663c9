"""One process owns a SQLite database at a time (issue 8, fault 1).

A second server or runtime on the same file is refused before it reads or writes anything; the
owner's jobs go on undisturbed; an owner killed with SIGKILL is replaced without cleanup.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from actors import DEMO_HANDLERS, DatabaseLockedError, RuntimeConfig, open_runtime
from actors._owner import database_owner_lock, owner_lock_path
from transport import open_client
from transport._exit import ExitCode

from .conftest import wait_for_state
from .serving import free_port
from .test_cli import COMMAND, serve_process

DEPTH = 30  # sources per research job, 0.1 s each: 3 s of work


async def _wait_state(client: Any, job_id: str, states: set[str], seconds: float = 30) -> Any:
    with trio.fail_after(seconds):
        while (job := await client.get(job_id))["state"] not in states:  # noqa: ASYNC110
            await trio.sleep(0.1)  # polling within the request rate limit
    return job


async def test_second_server_is_refused_and_the_owner_keeps_its_jobs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve_process(data) as first:
        async with open_client(first.url, first.token("alice")) as client:
            jobs = [
                await client.create("research", {"query": f"q{i}", "depth": DEPTH, "delay": 0.1})
                for i in range(3)
            ]
            for job in jobs:
                await _wait_state(client, job["id"], {"running"})
            start = trio.current_time()
            with trio.fail_after(20):
                second = await trio.run_process(
                    [*COMMAND, "serve", "--port", str(free_port()), "--health-port", "0"],
                    env=first.env(),  # the same data directory, so the same default database
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            elapsed = trio.current_time() - start
            assert second.returncode == ExitCode.DATABASE_IN_USE
            lines = second.stderr.decode().strip().splitlines()
            assert len(lines) == 1, lines
            owner = f"process {first.process.pid} on {socket.gethostname()} since "
            assert lines[0].startswith("jobspine: error: database ") and owner in lines[0]
            since = lines[0].split(" since ")[1].split(";")[0]
            age = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(since)
            assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)
            assert elapsed < 5, elapsed
            # The owner's jobs were not taken over: each completes in its first attempt.
            for job in jobs:
                final = await _wait_state(client, job["id"], {"completed", "failed", "paused"})
                assert final["state"] == "completed", final
                assert final["attempt"] == 1 and final["recovery_attempts"] == 0
                assert final["result"]["sources"] == DEPTH
        log = (data / "serve.log").read_text()
        assert "UNIQUE constraint" not in log and "recovered job" not in log
        first.process.kill()  # SIGKILL: the lock goes with the process, the file stays
        await first.process.wait()
    lock = trio.Path(owner_lock_path(data / "jobspine.db"))
    assert orjson.loads(await lock.read_bytes())["pid"] == first.process.pid
    async with serve_process(data) as replacement:
        assert orjson.loads(await lock.read_bytes())["pid"] == replacement.process.pid
        async with open_client(replacement.url, replacement.token("alice")) as client:
            assert (await client.get(jobs[0]["id"]))["state"] == "completed"


def _files(db: Path) -> dict[str, bytes]:
    """The database and its SQLite companions, byte for byte."""
    return {p.name: p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file()}


async def test_every_spelling_of_an_owned_path_is_refused_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "jobs.db"
    link = tmp_path / "link.db"
    link.symlink_to(db)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    config = RuntimeConfig(stop_grace=0.2, sqlite_synchronous="NORMAL")
    async with open_runtime(db, handlers=DEMO_HANDLERS, config=config) as rt:
        job = await rt.create_job("research", "alice", {"query": "q", "depth": 1, "delay": 0})
        await wait_for_state(rt, job.id)
        await rt.get_stats()  # a barrier: every write so far is committed
        before = _files(db)
        for spelling in (link, Path("jobs.db"), Path("sub/../link.db"), db):
            with pytest.raises(DatabaseLockedError) as info:
                async with open_runtime(spelling, handlers=DEMO_HANDLERS, config=config):
                    pass
            assert info.value.pid == os.getpid() and info.value.code == "database_in_use"
            assert info.value.lock_path == str(db) + ".owner"
            assert f"process {os.getpid()} on {socket.gethostname()} since" in str(info.value)
        assert _files(db) == before
    # Closing the owner releases the database; the next one opens it through any spelling.
    async with open_runtime(link, handlers=DEMO_HANDLERS, config=config) as rt:
        assert (await rt.get_job(job.id)).id == job.id


async def test_a_hard_link_to_an_owned_database_is_refused(tmp_path: Path) -> None:
    """A hard link (or a bind mount) is the same file under another path and another
    ``.owner``: a second owner there would keep its own WAL beside the same database file."""
    db = tmp_path / "jobs.db"
    (tmp_path / "other").mkdir()
    config = RuntimeConfig(stop_grace=0.2, sqlite_synchronous="NORMAL")
    async with open_runtime(db, handlers=DEMO_HANDLERS, config=config) as rt:
        job = await rt.create_job("research", "alice", {"query": "q", "depth": 1, "delay": 0})
        await wait_for_state(rt, job.id)
        await rt.get_stats()
        link = tmp_path / "other" / "alias.db"
        os.link(db, link)
        before = _files(db)
        with pytest.raises(DatabaseLockedError, match="another path") as info:
            async with open_runtime(link, handlers=DEMO_HANDLERS, config=config):
                pass
        assert info.value.code == "database_in_use"
        assert _files(db) == before
        assert not (tmp_path / "other" / "alias.db-wal").exists()
    async with open_runtime(link, handlers=DEMO_HANDLERS, config=config) as rt:
        assert (await rt.get_job(job.id)).state.value == "completed"


def test_a_dead_owners_file_decides_nothing(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    lock = Path(owner_lock_path(db))
    lock.write_bytes(b'{"pid": 1, "host": "elsewhere", "since": "2000-01-01T00:00:00+00:00"}')
    with database_owner_lock(db) as held:
        assert held == str(lock)
        assert orjson.loads(lock.read_bytes())["pid"] == os.getpid()
    with database_owner_lock(db):  # released on exit
        pass


def test_an_owner_that_has_not_recorded_itself_yet(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    lock = Path(owner_lock_path(db))
    lock.write_bytes(b"")
    with lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another holder, between its lock and its write
        with (
            pytest.raises(DatabaseLockedError, match="starting up") as info,
            database_owner_lock(db),
        ):
            pass
        assert info.value.pid is None
    assert not db.exists()


def test_an_owner_in_another_process_is_named(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    holder = subprocess.Popen(
        [
            "python3",
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(Path(owner_lock_path(db)))!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            'os.write(fd, b\'{"pid": %d, "host": "h1", "since": "s1"}\' % os.getpid())\n'
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(DatabaseLockedError) as info, database_owner_lock(db):
            pass
        assert (info.value.pid, info.value.host, info.value.since) == (holder.pid, "h1", "s1")
    finally:
        holder.kill()
        holder.wait()
    with database_owner_lock(db):  # the kernel released the dead holder's lock
        pass
