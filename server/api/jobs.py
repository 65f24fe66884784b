"""JobService: follow, list, cancel and submit the training jobs that produce memories."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from memserve.api.auth import Auth
from memserve.api.context import tenant_of
from memserve.api.convert import (
    JOB_STATES_FROM_PB,
    checking_client_json,
    job_to_pb,
    struct_to_dict,
)
from memserve.api.quotas import check_stored_bytes
from memserve.errors import InvalidArgument, NotFound
from memserve.memory.registry import get_kind
from memserve.memory.runtime import StoreRuntime
from memserve.memory_store.jobs import Job
from memserve.names import check_name
from memserve.v1 import jobs_pb2, jobs_pb2_grpc


async def queue_job(
    runtime: StoreRuntime,
    auth: Auth | None,
    context: Any,
    kind_name: str,
    memory_name: str,
    spec: dict[str, Any],
) -> jobs_pb2.Job:
    """Checks a job (its spec, against the served model too) and the tenant's quotas, and queues it."""
    check_name(memory_name)
    kind = get_kind(kind_name)  # INVALID_ARGUMENT for a kind this server does not know
    with checking_client_json("spec"):
        spec = kind.validate_spec(spec)
    kind.check_for_model(spec, runtime.cache.target.num_layers)
    tenant = tenant_of(context)
    quota = auth.quota(tenant) if auth is not None else None
    if quota is not None and quota.stored_bytes:
        stored = await runtime.run(runtime.store.stored_bytes, tenant)
        check_stored_bytes(stored, 0, quota, tenant)
    job = await runtime.run(
        runtime.queue.submit,
        kind_name,
        memory_name,
        spec,
        tenant=tenant,
        max_active=quota.active_jobs if quota is not None else 0,
    )
    return job_to_pb(job)


class JobService(jobs_pb2_grpc.JobServiceServicer):
    # A watch re-reads the job at least this often, in case an event was lost.
    WATCH_POLL_SECONDS = 2.0

    def __init__(self, runtime: StoreRuntime, auth: Auth | None = None) -> None:
        self.runtime = runtime
        self.auth = auth

    async def _job(self, job_id: str, context: Any) -> Job:
        job = await self.runtime.run(self.runtime.queue.get, job_id)
        if job.tenant != tenant_of(context):  # another tenant's job does not exist for this caller
            raise NotFound(f"job {job_id!r} does not exist (or has expired)")
        return job

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Any) -> Any:
        return job_to_pb(await self._job(request.job_id, context))

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: Any) -> AsyncIterator[Any]:
        last: jobs_pb2.Job | None = None
        with self.runtime.watchers.watching(request.job_id) as changed:
            while True:
                changed.clear()
                job = await self._job(request.job_id, context)
                message = job_to_pb(job)
                if message != last:
                    yield message
                    last = message
                if job.state.final:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.WATCH_POLL_SECONDS)

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Any) -> Any:
        await self._job(request.job_id, context)
        return job_to_pb(await self.runtime.run(self.runtime.queue.cancel, request.job_id))

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: Any) -> Any:
        if request.state and request.state not in JOB_STATES_FROM_PB:
            raise InvalidArgument(f"state {request.state} is not a job state this server knows")
        jobs, token = await self.runtime.run(
            self.runtime.queue.list,
            state=JOB_STATES_FROM_PB.get(request.state),
            kind=request.kind,
            tenant=tenant_of(context),
            page_size=min(request.page_size or 50, 1000),
            page_token=request.page_token,
        )
        return jobs_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=token)

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: Any) -> Any:
        check_name(request.memory_name)
        get_kind(request.kind)
        with checking_client_json("spec"):
            spec = struct_to_dict(request.spec, "spec")
        return await queue_job(self.runtime, self.auth, context, request.kind, request.memory_name, spec)
