"""Attacks on several nodes sharing one PostgreSQL database and one Redis (helper h7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from actors import InvalidInputError
from actors._fanout import FanoutConfig

from .test_cli import COMMAND

BAD_REDIS_URLS = [
    "redis://127.0.0.1:x/7",  # a port that is no number
    "redis://127.0.0.1:99999/7",  # past 65535
    "redis://127.0.0.1:6379/db7",  # a database that is no number: was database 0, silently
    "redis://127.0.0.1:6379?db=seven",
]


@pytest.mark.parametrize("url", BAD_REDIS_URLS)
def test_a_redis_url_the_client_cannot_open_is_refused_by_the_fanout_config(url: str) -> None:
    with pytest.raises(InvalidInputError, match="must be a redis://"):
        FanoutConfig(url)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/7", "redis://h", "redis://h:1/", "unix:///s"]
)
def test_redis_urls_the_client_opens_are_taken(url: str) -> None:
    assert FanoutConfig(url).redis == url


@pytest.mark.parametrize("url", BAD_REDIS_URLS[:3])
async def test_serve_refuses_a_redis_url_it_cannot_open_as_a_usage_error(
    tmp_path: Path, url: str
) -> None:
    """``serve --redis redis://127.0.0.1:x/7`` failed with a ValueError traceback from the
    Redis client (exit 1) once the store was open, instead of a usage error naming the flag."""
    refused = await trio.run_process(
        [*COMMAND, "serve", "--redis", url, "--port", "0", "--health-port", "0"],
        env={**os.environ, "JOBSPINE_DATA": str(tmp_path)},
        capture_stderr=True,
        check=False,
    )
    stderr = refused.stderr.decode()
    assert refused.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "redis" in stderr and url in stderr
