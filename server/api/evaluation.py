"""EvaluationService: a memory's evaluation on the server's own model and engine, streamed back."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from memserve.api.context import tenant_of
from memserve.api.convert import struct_to_dict
from memserve.engine.scheduler import Engine
from memserve.engine.threads import run_in_compute_thread
from memserve.errors import Cancelled, FailedPrecondition, InvalidArgument, ResourceExhausted
from memserve.memory.evaluation import EvalContext, report_files, scratch_folder
from memserve.memory.kind import LoadTarget, MemoryKind
from memserve.memory.registry import get_kind
from memserve.memory.runtime import StoreRuntime
from memserve.memory_store.artifact import Artifact
from memserve.models import LoadedModel
from memserve.names import check_name
from memserve.packed import packed_weights
from memserve.v1 import evaluation_pb2 as pb
from memserve.v1 import evaluation_pb2_grpc

T = TypeVar("T")

Update = pb.EvaluationProgress | BaseException | None
"""What the evaluation thread hands the stream: progress, its error, or None when done."""


class EvaluationService(evaluation_pb2_grpc.EvaluationServiceServicer):
    def __init__(self, engine: Engine, loaded: LoadedModel, runtime: StoreRuntime | None) -> None:
        self.engine = engine
        self.loaded = loaded
        self.runtime = runtime
        # The evaluation's own memories: on the engine's hooks, heard by no metrics observer.
        self.target = LoadTarget.for_model(loaded, engine.hooks)
        self._busy = asyncio.Lock()

    async def Evaluate(self, request: pb.EvaluateRequest, context: Any) -> AsyncIterator[pb.EvaluateResponse]:
        if self._busy.locked():
            raise ResourceExhausted("this server is running an evaluation: try again when it ends")
        async with self._busy:
            kind = get_kind(request.kind)
            artifact = await self._artifact(request, kind, tenant_of(context))
            options = struct_to_dict(request.options, "options") if request.HasField("options") else {}
            with scratch_folder() as folder:
                out = Path(folder)
                async for update in self._run(kind, artifact, options, out):
                    yield pb.EvaluateResponse(progress=update)
                for name, content in report_files(out).items():
                    yield pb.EvaluateResponse(file=pb.ReportFile(name=name, content=content))

    async def _artifact(self, request: pb.EvaluateRequest, kind: MemoryKind, tenant: str) -> Artifact | None:
        if not request.memory_name:
            return None
        if self.runtime is None:
            raise FailedPrecondition(
                "this server runs without a memory store: it has no memories to evaluate"
            )
        name = check_name(request.memory_name, "memory_name")
        store = self.runtime.store
        loop = asyncio.get_running_loop()
        artifact = await loop.run_in_executor(
            self.runtime.executor, lambda: store.load(name, request.version, tenant=tenant)
        )
        if artifact.meta.kind != kind.name:
            raise InvalidArgument(f"{name!r} is a {artifact.meta.kind} memory, not a {kind.name} memory")
        artifact.meta.check_base_model(self.loaded.fingerprint)
        return artifact

    async def _run(
        self, kind: MemoryKind, artifact: Artifact | None, options: dict[str, Any], out: Path
    ) -> AsyncIterator[pb.EvaluationProgress]:
        """Runs the evaluation in a compute thread; yields its progress, raises its error. Leaving
        early (the client cancelled) stops it at its next progress report, and waits for it."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()
        stop = threading.Event()

        def put(update: Update) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
                loop.call_soon_threadsafe(updates.put_nowait, update)

        def progress(step: int, total: int, message: str) -> None:
            if stop.is_set():
                raise Cancelled("the evaluation was cancelled")
            put(pb.EvaluationProgress(step=step, total=total, message=message))

        def work() -> None:
            evaluation = EvalContext(self.loaded, self.engine, self.target, artifact, out, progress)
            try:
                run_in_compute_thread(
                    lambda: _served(kind.evaluate, options, evaluation), name="memserve-eval"
                )
            except BaseException as exc:  # handed to the stream, raised there
                put(exc)
            else:
                put(None)

        thread = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while (update := await updates.get()) is not None:
                if isinstance(update, BaseException):
                    raise update
                yield update
        finally:
            stop.set()
            await asyncio.shield(thread)  # the report's folder outlives the evaluation


def _served(evaluate: Callable[..., T], *args: Any) -> T:
    """Evaluates on the weights the engine serves (packed where the model is)."""
    with packed_weights():
        return evaluate(*args)
