"""Typed Python clients for a memserve server: `Client` (blocking) and `AsyncClient` (asyncio).

    from memserve.clients import Client, NotFound, document_ref, mix_ref
    with Client() as client:                       # localhost:50051 or $MEMSERVE_SERVER
        print(client.generate("The capital of France is", max_new_tokens=8).text)
        for chunk in client.generate_stream("Once upon a time", temperature=0.8, seed=1):
            print(chunk.text, end="", flush=True)
        print(client.generate("Once upon a time", memories=["story@2"]).memories)
        for memory in client.list_memories(kind="adapter"):
            print(memory.name, memory.version)
        job = client.register_documents("stories", [("fox", "The quick brown fox ..."),
                                                    {"id": "sea", "title": "The sea", "text": "..."}],
                                        config={"epochs": 30})
        for update in client.watch_job(job.id):
            print(update.state, update.step, update.total)
        client.generate("The", memories=[document_ref("stories", "fox"),
                                         mix_ref("stories", {"fox": 0.7, "sea": 0.3}, scale=0.5)])
        try:
            client.get_memory("no-such-memory")
        except NotFound as error:
            print(error.message)

Both clients have the same methods, with the same typed arguments (`AsyncClient`'s are awaited,
its streams async generators): they are made from one table of calls (`calls.Calls`). Every result
is a dataclass of `types`; every failed call raises a `MemserveError` named after its gRPC status
(`errors`), which is still a `grpc.RpcError` with `code()` and `details()`.

Every call carries the tenant (`tenant=` or $MEMSERVE_TENANT) as `memserve-tenant` metadata, and
the token (`token=` or $MEMSERVE_TOKEN) as a bearer token.
"""

from __future__ import annotations

from memserve.clients.calls import Calls
from memserve.clients.refs import (
    MAX_VERSION,
    adapter_ref,
    docrep_ref,
    document_ref,
    local_ref,
    memory_ref,
    mix_ref,
    parse_memory_version,
)
from memserve.clients.requests import (
    ADAPTER_CONFIG_FIELDS,
    DOCUMENT_CONFIG_FIELDS,
    LOCAL_CONFIG_FIELDS,
    build_adapter_request,
    build_documents_request,
    build_facts_request,
    build_request,
)
from memserve.clients.transfer import UPLOAD_CHUNK_BYTES, _byte_chunks
from memserve.clients.transport import DEFAULT_SERVER, Asyncio, Blocking, default_server
from memserve.clients.types import JOB_STATES, Chunk, Completion, JobInfo, MemoryInfo, TokenInfo, TraceInfo

# What this module has always offered (the command line and older code import it from here);
# `memserve.clients` exports the whole API.
__all__ = [
    "ADAPTER_CONFIG_FIELDS",
    "DEFAULT_SERVER",
    "DOCUMENT_CONFIG_FIELDS",
    "JOB_STATES",
    "LOCAL_CONFIG_FIELDS",
    "MAX_VERSION",
    "UPLOAD_CHUNK_BYTES",
    "AsyncClient",
    "Chunk",
    "Client",
    "Completion",
    "JobInfo",
    "MemoryInfo",
    "TokenInfo",
    "TraceInfo",
    "_byte_chunks",
    "adapter_ref",
    "build_adapter_request",
    "build_documents_request",
    "build_facts_request",
    "build_request",
    "default_server",
    "docrep_ref",
    "document_ref",
    "local_ref",
    "memory_ref",
    "mix_ref",
    "parse_memory_version",
]


class Client(Calls, Blocking):
    """Blocking client of a memserve server at `address` (default $MEMSERVE_SERVER or localhost:50051).

    `timeout` (seconds, None = none) bounds each call. `tenant` (default $MEMSERVE_TENANT, else the
    server's default tenant) scopes every call. `token` (default $MEMSERVE_TOKEN) is sent as a
    bearer token, which a server started with a token (it reads $MEMSERVE_TOKEN too) wants for the
    calls that change memories and jobs. `tls=True` or a `ca` (PEM file; default $MEMSERVE_CA)
    connects over TLS, checking the server against that CA (else the system's roots);
    `client_cert` and `client_key` (default $MEMSERVE_CLIENT_CERT/$MEMSERVE_CLIENT_KEY) answer a
    server that wants mutual TLS. Use it as a context manager, or call `close()`.
    """

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(Calls, Asyncio):
    """asyncio client: the methods of `Client`, awaited (streams are async generators).

    Arguments as for `Client`. Use it as an async context manager, or await `close()`.
    """

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
