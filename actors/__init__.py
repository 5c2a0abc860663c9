"""jobspine's actor runtime: supervised, durable, resumable jobs on Trio."""

from typing import TYPE_CHECKING, Any

from ._backend import (
    Backend,
    ClaimRequest,
    ClaimResult,
    JobQuery,
    MemoryBackend,
    Pruned,
    QueueStats,
)
from ._broadcaster import (
    Broadcaster,
    BroadcasterConfig,
    Cursor,
    JoinResult,
    Outbox,
    encode_batch,
    parse_room,
)
from ._demo import DEMO_HANDLERS, analysis_handler, research_handler, trade_handler
from ._errors import (
    CheckpointTooLargeError,
    IdempotencyConflictError,
    IllegalTransitionError,
    InvalidInputError,
    InvalidParentError,
    JobspineError,
    JobStopped,
    NotSerializableError,
    PermanentError,
    ResultTooLargeError,
    RuntimeClosedError,
    RuntimeCrashedError,
    StaleAttemptError,
    StaleWriteError,
    StoreError,
    StoreUnavailableError,
    TooManyJobsError,
    UnknownJobError,
    UnknownKindError,
)
from ._events import AUDIT_TYPES, EventHub, EventStream, EventStreamLagged, EventType, JobEvent
from ._fanout import Fanout, FanoutConfig, FanoutStats, RedisHealth
from ._job import (
    CURRENT_SCHEMA_VERSION,
    Job,
    JobError,
    migrate_job_record,
    validate_job_record,
)
from ._nodes import (
    LeasePolicy,
    NodeActor,
    NodeFencedError,
    NodeIdInUseError,
    NodeInfo,
    NodeLease,
    NodeReplacedError,
    node_of,
)
from ._options import KindOptions, RetryPolicy, kind_options
from ._owner import DatabaseLockedError
from ._placement import InProcessPlacement, Placement
from ._policy import RecoveryDecision, RecoveryPolicy, StallDetector
from ._recovery import CheckpointDetails, CheckpointValidation, RecoveryOptions
from ._remote import RemoteAttempt, RemotePlacement, RemoteWorker, WorkerLink
from ._repository import Repository
from ._retention import PruneReport, RetentionPolicy, RetentionRule, parse_duration
from ._routing import RemoteControlError
from ._runtime import Runtime, RuntimeConfig, open_runtime
from ._scheduling import (
    Candidate,
    ClaimLimits,
    ClaimPlanner,
    RetryDecision,
    ServedOrder,
    ServedTurns,
    decide_retry,
)
from ._sequencer import Sequencer, SequencerStats
from ._sqlite import SqliteBackend
from ._states import TERMINAL_STATES, TRANSITIONS, JobState, check_transition
from ._store import StoreActor, StoreClient, StoreConfig, StoreHealth
from ._supervisor import Supervisor, SupervisorConfig, SupervisorStatus
from ._worker import (
    ContextBacking,
    ContextStore,
    Handler,
    HandlerFailure,
    InputCheck,
    JobContext,
    validates,
)

if TYPE_CHECKING:
    from ._postgres import PostgresBackend


def __getattr__(name: str) -> Any:
    # PostgresBackend is loaded on first use: psycopg takes longer to import than the rest of
    # jobspine, and most processes (clients, SQLite servers) never need it.
    if name == "PostgresBackend":
        from ._postgres import PostgresBackend

        return PostgresBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RemoteControlError",
    "LeasePolicy",
    "NodeActor",
    "NodeFencedError",
    "NodeIdInUseError",
    "NodeInfo",
    "NodeLease",
    "NodeReplacedError",
    "node_of",
    "Fanout",
    "FanoutConfig",
    "FanoutStats",
    "RedisHealth",
    "Sequencer",
    "SequencerStats",
    "ServedOrder",
    "ServedTurns",
    "AUDIT_TYPES",
    "CURRENT_SCHEMA_VERSION",
    "DEMO_HANDLERS",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Backend",
    "Broadcaster",
    "Candidate",
    "ClaimLimits",
    "ClaimPlanner",
    "ClaimRequest",
    "ClaimResult",
    "IdempotencyConflictError",
    "InvalidParentError",
    "KindOptions",
    "PermanentError",
    "QueueStats",
    "RetryDecision",
    "RetryPolicy",
    "decide_retry",
    "kind_options",
    "BroadcasterConfig",
    "Cursor",
    "DatabaseLockedError",
    "JoinResult",
    "Outbox",
    "encode_batch",
    "CheckpointDetails",
    "CheckpointTooLargeError",
    "CheckpointValidation",
    "ContextBacking",
    "ContextStore",
    "EventHub",
    "EventStream",
    "EventStreamLagged",
    "EventType",
    "Handler",
    "HandlerFailure",
    "InProcessPlacement",
    "InputCheck",
    "IllegalTransitionError",
    "InvalidInputError",
    "Job",
    "JobContext",
    "JobError",
    "JobEvent",
    "JobQuery",
    "JobState",
    "JobStopped",
    "JobspineError",
    "MemoryBackend",
    "NotSerializableError",
    "Placement",
    "RecoveryDecision",
    "RemoteAttempt",
    "RemotePlacement",
    "RemoteWorker",
    "ResultTooLargeError",
    "RecoveryOptions",
    "RecoveryPolicy",
    "PostgresBackend",
    "PruneReport",
    "Pruned",
    "Repository",
    "RetentionPolicy",
    "RetentionRule",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeConfig",
    "RuntimeCrashedError",
    "SqliteBackend",
    "StaleAttemptError",
    "StaleWriteError",
    "StallDetector",
    "StoreActor",
    "StoreClient",
    "StoreConfig",
    "StoreError",
    "StoreHealth",
    "StoreUnavailableError",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorStatus",
    "TooManyJobsError",
    "UnknownJobError",
    "UnknownKindError",
    "WorkerLink",
    "analysis_handler",
    "check_transition",
    "migrate_job_record",
    "open_runtime",
    "parse_duration",
    "parse_room",
    "research_handler",
    "trade_handler",
    "validate_job_record",
    "validates",
]
