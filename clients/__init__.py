"""Python clients (sync and asyncio) and the `memserve` command line."""

from memserve.clients.client import (
    AsyncClient,
    Chunk,
    Client,
    Completion,
    JobInfo,
    MemoryInfo,
    TokenInfo,
    TraceInfo,
)

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "JobInfo", "MemoryInfo", "TokenInfo", "TraceInfo"]
