"""Handlers whose import never ends in a worker process of ``serve --worker-processes`` (a
device or a network share that never answers), and is instant in the server."""

from __future__ import annotations

import os
import time

from transport._local_workers import PARENT_PIPE_ENV

from .worker_handlers import steps

if os.environ.get(PARENT_PIPE_ENV):
    time.sleep(3600)

HANDLERS = {"steps": steps}
