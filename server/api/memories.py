"""MemoryService: register memories of the built-in kinds; put, get, list, delete and export them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from google.protobuf.json_format import MessageToDict

from memserve.api.context import tenant_of
from memserve.api.convert import (
    job_to_pb,
    memory_info_to_pb,
)
from memserve.errors import InvalidArgument, ResourceExhausted
from memserve.memory.registry import get_kind
from memserve.memory.runtime import StoreRuntime
from memserve.memory_store.artifact import export_bytes, import_bytes
from memserve.names import check_name
from memserve.v1 import memory_pb2, memory_pb2_grpc

EXPORT_CHUNK_BYTES = 1 << 20


def _as_dict(message: Any) -> dict[str, Any]:
    """A request as the JSON-able spec a kind validates (proto field names, ints as ints)."""
    return MessageToDict(message, preserving_proto_field_name=True)


MAX_CONCURRENT_UPLOADS = 2


class MemoryService(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, runtime: StoreRuntime) -> None:
        self.runtime = runtime
        # An upload is held in memory while it is checked: a few at a time.
        self._uploads = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)

    async def _submit(self, context: Any, kind_name: str, memory_name: str, spec: dict[str, Any]) -> Any:
        check_name(memory_name)
        kind = get_kind(kind_name)  # INVALID_ARGUMENT for a kind this server does not know
        spec = kind.validate_spec(spec)
        job = await self.runtime.run(
            self.runtime.queue.submit, kind_name, memory_name, spec, tenant=tenant_of(context)
        )
        return job_to_pb(job)

    async def RegisterDocuments(self, request: memory_pb2.RegisterDocumentsRequest, context: Any) -> Any:
        return await self._submit(context, "document", request.bank, _as_dict(request))

    async def RegisterFacts(self, request: memory_pb2.RegisterFactsRequest, context: Any) -> Any:
        return await self._submit(context, "local", request.set, _as_dict(request))

    async def RegisterAdapter(self, request: memory_pb2.RegisterAdapterRequest, context: Any) -> Any:
        return await self._submit(context, "adapter", request.name, _as_dict(request))

    async def PutMemory(self, request_iterator: AsyncIterator[memory_pb2.MemoryChunk], context: Any) -> Any:
        """Imports an export file as a new version (of the name in the first chunk, else the file's)."""
        tenant = tenant_of(context)
        name = ""
        data = bytearray()
        if self._uploads.locked():
            raise ResourceExhausted(f"{MAX_CONCURRENT_UPLOADS} uploads are already running: retry shortly")
        async with self._uploads:
            async for chunk in request_iterator:
                name = name or chunk.name
                data += chunk.data
                if len(data) > self.runtime.config.max_upload_bytes:
                    raise ResourceExhausted(
                        f"the upload is larger than the {self.runtime.config.max_upload_bytes} bytes allowed"
                    )
            if not data:
                raise InvalidArgument("PutMemory received no data: send the export file in chunks")
            artifact = await self.runtime.run(import_bytes, bytes(data))
            del data
        get_kind(artifact.meta.kind)  # a kind this server can serve
        meta = replace(artifact.meta, name=check_name(name or artifact.meta.name), tenant=tenant, version=0)
        published = await self.runtime.run(self.runtime.store.publish, meta, artifact.tensors)
        return memory_info_to_pb(published, await self.runtime.run(self._versions, published.name, tenant))

    def _versions(self, name: str, tenant: str) -> list[int]:
        return self.runtime.store.versions(name, tenant=tenant)

    async def GetMemory(self, request: memory_pb2.GetMemoryRequest, context: Any) -> Any:
        tenant = tenant_of(context)
        check_name(request.name)
        meta = await self.runtime.run(self.runtime.store.meta, request.name, request.version, tenant=tenant)
        return memory_info_to_pb(meta, await self.runtime.run(self._versions, request.name, tenant))

    async def ListMemories(self, request: memory_pb2.ListMemoriesRequest, context: Any) -> Any:
        page = await self.runtime.run(
            self.runtime.store.list,
            tenant=tenant_of(context),
            kind=request.kind,
            name_prefix=request.name_prefix,
            page_size=min(request.page_size or 100, 1000),
            page_token=request.page_token,
        )
        return memory_pb2.ListMemoriesResponse(
            memories=[memory_info_to_pb(meta) for meta in page.memories], next_page_token=page.next_token
        )

    async def DeleteMemory(self, request: memory_pb2.DeleteMemoryRequest, context: Any) -> Any:
        check_name(request.name)
        deleted = await self.runtime.run(
            self.runtime.store.delete, request.name, request.version, tenant=tenant_of(context)
        )
        return memory_pb2.DeleteMemoryResponse(deleted_versions=deleted)

    async def ExportMemory(self, request: memory_pb2.ExportMemoryRequest, context: Any) -> AsyncIterator[Any]:
        check_name(request.name)
        store = self.runtime.store
        artifact = await self.runtime.run(
            store.load, request.name, request.version, tenant=tenant_of(context)
        )
        data = await self.runtime.run(export_bytes, artifact)
        for offset in range(0, len(data), EXPORT_CHUNK_BYTES):
            name = artifact.meta.name if offset == 0 else ""
            yield memory_pb2.MemoryChunk(name=name, data=data[offset : offset + EXPORT_CHUNK_BYTES])
