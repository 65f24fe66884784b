"""MemoryService: register memories of the built-in kinds; put, get, list, delete and export them."""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import torch
from google.protobuf.json_format import MessageToDict

from memserve.api.auth import Auth
from memserve.api.context import tenant_of
from memserve.api.convert import memory_info_to_pb
from memserve.api.jobs import queue_job
from memserve.api.quotas import check_stored_bytes
from memserve.errors import DataLoss, InvalidArgument, MemserveError, ResourceExhausted
from memserve.memory.registry import get_kind
from memserve.memory.runtime import StoreRuntime
from memserve.memory_store.artifact import Artifact, MemoryMeta, import_bytes
from memserve.names import NAME_PATTERN, check_name
from memserve.v1 import memory_pb2, memory_pb2_grpc

EXPORT_CHUNK_BYTES = 256 << 10


def _as_dict(message: Any) -> dict[str, Any]:
    """A request as the JSON-able spec a kind validates (proto field names, ints as ints)."""
    return MessageToDict(message, preserving_proto_field_name=True)


@contextlib.contextmanager
def _slot(held: Counter[str], tenant: str, total: int, per_tenant: int, what: str) -> Iterator[None]:
    """One of the `what` the server (`total`) and the tenant (`per_tenant`) may run at once;
    RESOURCE_EXHAUSTED when none is free. `held` counts them by tenant (one event loop: no lock)."""
    if sum(held.values()) >= total:
        raise ResourceExhausted(f"{total} {what} are already running: retry shortly")
    if held[tenant] >= per_tenant:
        raise ResourceExhausted(
            f"tenant {tenant!r} already has {per_tenant} {what} running: finish them, or retry shortly"
        )
    held[tenant] += 1
    try:
        yield
    finally:
        held[tenant] -= 1
        if not held[tenant]:
            del held[tenant]


class MemoryService(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, runtime: StoreRuntime, auth: Auth | None = None) -> None:
        self.runtime = runtime
        self.auth = auth
        # An upload is held in memory while it is checked: a few at a time.
        self._uploads: Counter[str] = Counter()  # running PutMemory calls by tenant
        self._exports: Counter[str] = Counter()  # open ExportMemory streams by tenant

    async def _submit(self, context: Any, kind_name: str, memory_name: str, spec: dict[str, Any]) -> Any:
        return await queue_job(self.runtime, self.auth, context, kind_name, memory_name, spec)

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
        with self._upload_slot(tenant):
            async for chunk in request_iterator:
                name = name or chunk.name
                data += chunk.data
                if len(data) > self.runtime.config.max_upload_bytes:
                    raise ResourceExhausted(
                        f"the upload is larger than the {self.runtime.config.max_upload_bytes} bytes allowed"
                    )
            if not data:
                raise InvalidArgument("PutMemory received no data: send the export file in chunks")
            # The same file sent again (a retry after a lost answer) returns the version it made.
            upload_key = "put:" + hashlib.sha256(data).hexdigest()[:32]
            try:
                artifact = await self.runtime.run(import_bytes, bytes(data))
            except DataLoss as exc:  # the client's file, not the store's data: its mistake
                raise InvalidArgument(f"the upload is not a valid export file: {exc}") from None
            del data
            await self.runtime.run(self._check_upload, artifact)
        meta = replace(artifact.meta, name=check_name(name or artifact.meta.name), tenant=tenant, version=0)
        await self._check_room(tenant, meta, upload_key)
        published = await self.runtime.run(
            self.runtime.store.publish, meta, artifact.tensors, job_id=upload_key
        )
        return memory_info_to_pb(published, await self.runtime.run(self._versions, published.name, tenant))

    async def _check_room(self, tenant: str, meta: MemoryMeta, upload_key: str) -> None:
        """The tenant's stored-bytes quota, unless this upload is a retry of one already stored."""
        quota = self.auth.quota(tenant) if self.auth is not None else None
        if quota is None or not quota.stored_bytes:
            return
        store = self.runtime.store
        if await self.runtime.run(store.published_by_job, meta.name, upload_key, tenant=tenant) is None:
            stored = await self.runtime.run(store.stored_bytes, tenant)
            check_stored_bytes(stored, meta.size_bytes, quota, tenant)

    def _check_upload(self, artifact: Artifact) -> None:
        """What serving the memory would find wrong, found before it is stored: a kind this
        server lacks, another base model, NaN or infinite values, and whatever the kind's own
        loader refuses (missing hyperparameters, tensors of the wrong names or shapes)."""
        meta = artifact.meta
        kind = get_kind(meta.kind)
        meta.check_base_model(self.runtime.cache.fingerprint)
        for name, tensor in artifact.tensors.items():
            if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                raise InvalidArgument(f"tensor {name!r} of the upload holds NaN or infinite values")
        target = replace(self.runtime.cache.target, device=torch.device("cpu"), observe=None)
        try:
            kind.load(artifact, target)
        except MemserveError:
            raise
        except Exception as exc:  # the loader's own refusal: the upload does not fit the kind
            raise InvalidArgument(
                f"the upload is not a {meta.kind} memory this server can load: {exc!r}"
            ) from None

    def _versions(self, name: str, tenant: str) -> list[int]:
        return self.runtime.store.versions(name, tenant=tenant)

    async def GetMemory(self, request: memory_pb2.GetMemoryRequest, context: Any) -> Any:
        tenant = tenant_of(context)
        check_name(request.name)
        meta = await self.runtime.run(self.runtime.store.meta, request.name, request.version, tenant=tenant)
        return memory_info_to_pb(meta, await self.runtime.run(self._versions, request.name, tenant))

    async def ListMemories(self, request: memory_pb2.ListMemoriesRequest, context: Any) -> Any:
        if request.name_prefix and not NAME_PATTERN.fullmatch(request.name_prefix):
            raise InvalidArgument(f"name_prefix {request.name_prefix!r} cannot begin any memory's name")
        if request.page_token:
            check_name(request.page_token, "page_token")
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
        """Streams the export file from Redis a chunk at a time: the next chunk is read only once
        gRPC's flow control took the last, so a client that stops reading holds one chunk."""
        check_name(request.name)
        tenant = tenant_of(context)
        with self._export_slot(tenant):
            meta, chunks = await self.runtime.run(
                self.runtime.store.export_chunks,
                request.name,
                request.version,
                tenant=tenant,
                chunk_bytes=EXPORT_CHUNK_BYTES,
            )
            name = meta.name
            while (data := await self.runtime.run(next, chunks, None)) is not None:
                yield memory_pb2.MemoryChunk(name=name, data=data)
                name = ""

    def _export_slot(self, tenant: str) -> contextlib.AbstractContextManager[None]:
        config = self.runtime.config
        return _slot(self._exports, tenant, config.max_exports, config.max_exports_per_tenant, "exports")

    def _upload_slot(self, tenant: str) -> contextlib.AbstractContextManager[None]:
        """An upload is held in memory while it is checked: a few at a time, fewer per tenant."""
        config = self.runtime.config
        return _slot(self._uploads, tenant, config.max_uploads, config.max_uploads_per_tenant, "uploads")
