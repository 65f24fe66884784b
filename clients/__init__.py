"""Python clients (blocking and asyncio) of a memserve server, and the `memserve` command line.

    from memserve.clients import Client, NotFound, document_ref
    with Client() as client:
        print(client.generate("The capital of France is", max_new_tokens=8).text)

See `memserve.clients.client` for a tour.
"""

from memserve.clients.client import AsyncClient, Client
from memserve.clients.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MemserveError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from memserve.clients.refs import (
    MemorySpec,
    adapter_ref,
    docrep_ref,
    document_ref,
    local_ref,
    memory_ref,
    mix_ref,
    parse_memory_version,
)
from memserve.clients.types import (
    Chunk,
    Completion,
    EvaluationEvent,
    EvaluationProgress,
    JobInfo,
    MemoryInfo,
    ModelInfo,
    ReportFile,
    TokenInfo,
    TopLogprob,
    TraceInfo,
    UsedMemory,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Chunk",
    "Client",
    "Completion",
    "DataLoss",
    "DeadlineExceeded",
    "EvaluationEvent",
    "EvaluationProgress",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "JobInfo",
    "MemoryInfo",
    "MemorySpec",
    "MemserveError",
    "ModelInfo",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ReportFile",
    "ResourceExhausted",
    "TokenInfo",
    "TopLogprob",
    "TraceInfo",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UsedMemory",
    "adapter_ref",
    "docrep_ref",
    "document_ref",
    "local_ref",
    "memory_ref",
    "mix_ref",
    "parse_memory_version",
]
