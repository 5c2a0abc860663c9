"""A port outside 0..65535 (or no integer) is refused as the server is configured, naming
it, before anything is bound or opened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors import InvalidInputError
from transport import ServerConfig
from transport._app import open_server


def _refused(make: Any, name: str, value: Any) -> str:
    with pytest.raises(InvalidInputError) as refused:
        make(**{name: value})
    message = str(refused.value)
    assert message.startswith(name), message
    assert repr(value) in message, message
    return message


@pytest.mark.parametrize("port", [70000, 65536, -1, 8765.0, "8765", True])
def test_a_server_config_refuses_a_port_outside_0_to_65535(port: Any) -> None:
    """``ServerConfig(port=70000)`` was taken, and failed only once serving bound it."""
    message = _refused(lambda **kw: ServerConfig(secret="s", **kw), "port", port)
    assert "0..65535" in message


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_a_server_config_takes_every_port(port: int) -> None:
    assert ServerConfig(secret="s", port=port).port == port


@pytest.mark.parametrize("port", [70000, -1, 8766.0])
async def test_open_server_refuses_a_health_port_before_it_binds_or_opens(
    tmp_path: Path, port: Any
) -> None:
    """A health_port of 70000 bound the websocket port first, then failed as
    PortUnavailableError; now InvalidInputError naming it, and nothing opened."""
    with pytest.raises(InvalidInputError, match=r"^health_port must be an integer in 0\.\.65535"):
        async with open_server(tmp_path / "db", ServerConfig(secret="s", port=0), health_port=port):
            pytest.fail("served with a bad health port")
    assert not (tmp_path / "db").exists()
