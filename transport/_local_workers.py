"""``jobspine serve --worker-processes N``: N local ``jobspine worker`` processes, supervised.

Each process is restarted when it exits while the server runs, after a backoff that grows
with consecutive short-lived runs (:class:`ReconnectPolicy`: a process that stayed up for
``healthy_after`` seconds starts over from the shortest delay). :meth:`LocalWorkers.stop`
sends SIGTERM (each worker hands its jobs back within their grace period) and kills what is
still running after ``stop_timeout``.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Sequence
from functools import partial

import trio

from ._reconnect import ReconnectPolicy

__all__ = ["PARENT_PIPE_ENV", "LocalWorkers"]

#: Set for the workers this module starts: each stops when its stdin (a pipe from the server)
#: ends, so that none outlives a server that was killed.
PARENT_PIPE_ENV = "JOBSPINE_WORKER_STDIN_IS_PARENT"

log = logging.getLogger("jobspine.local_workers")


class LocalWorkers:
    """``count`` worker processes running ``args`` (the ``jobspine worker`` arguments after
    the command) with ``env`` (which carries the worker token)."""

    def __init__(
        self,
        count: int,
        args: Sequence[str],
        env: dict[str, str],
        *,
        stop_timeout: float = 10.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.count = count
        self.command = [sys.executable, "-m", "transport._cli", "worker", *args]
        self.env = {**env, PARENT_PIPE_ENV: "1"}
        self.stop_timeout = stop_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self.processes: dict[int, trio.Process] = {}
        #: Restarts after a process exited on its own (tests: a crash was noticed).
        self.restarts = 0
        self._stopping = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the processes running until :meth:`stop`."""
        async with trio.open_nursery() as nursery:
            for index in range(self.count):
                nursery.start_soon(self._keep_running, index)
            task_status.started()

    async def _keep_running(self, index: int) -> None:
        policy = ReconnectPolicy(self._min_backoff, self._max_backoff, healthy_after=30.0)
        while not self._stopping.is_set():
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        self.command,
                        env=self.env,
                        check=False,
                        stdin=subprocess.PIPE,
                    )
                )
                self.processes[index] = process
                policy.connected(trio.current_time())
                await process.wait()
                del self.processes[index]
            if self._stopping.is_set():
                return
            self.restarts += 1
            delay = policy.next_delay(trio.current_time())
            log.warning(
                "worker process %d (pid %d) exited with %s; restarting in %.1f s",
                index,
                process.pid,
                process.returncode,
                delay,
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def stop(self) -> None:
        """SIGTERM every process, wait up to ``stop_timeout``, then kill the rest."""
        self._stopping.set()
        for process in list(self.processes.values()):
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.stop_timeout):
            for process in list(self.processes.values()):
                await process.wait()
        for process in list(self.processes.values()):
            process.kill()
