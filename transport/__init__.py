"""jobspine's websocket transport: server, client, command line."""

from ._app import PortUnavailableError, RunningServer, open_server
from ._auth import Principal, mint_token, verify_token
from ._local_workers import LocalWorkers
from ._protocol import CLOSE, OPS, PROTOCOL_VERSION, ProtocolError
from ._reconnect import ReconnectPolicy
from ._server import Server, ServerConfig
from ._worker_process import WorkerFatalError, WorkerProcess, WorkerRequestError
from ._workers import WORKER_OPS, WORKER_PATH, WorkerConnection
from .client import (
    Client,
    ClientError,
    ClientStats,
    ConnectionLostError,
    Reset,
    RoomCursor,
    RoomRefused,
    is_omitted,
    new_key,
    open_client,
)

__all__ = [
    "CLOSE",
    "OPS",
    "PROTOCOL_VERSION",
    "WORKER_OPS",
    "WORKER_PATH",
    "Client",
    "ClientError",
    "ClientStats",
    "ConnectionLostError",
    "LocalWorkers",
    "PortUnavailableError",
    "Principal",
    "ProtocolError",
    "ReconnectPolicy",
    "Reset",
    "RoomCursor",
    "RoomRefused",
    "RunningServer",
    "Server",
    "ServerConfig",
    "WorkerConnection",
    "WorkerFatalError",
    "WorkerProcess",
    "WorkerRequestError",
    "mint_token",
    "open_client",
    "open_server",
    "is_omitted",
    "new_key",
    "verify_token",
]
