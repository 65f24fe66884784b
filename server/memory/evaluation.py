"""What a kind's evaluation may use, in a server (the Evaluate RPC) or offline (`eval --file`).

An evaluation measures what one memory does on the base model and writes its report
(report.md, metrics.json, plots) into a folder. In a server it runs on the server's own
model and engine: its generations join the running batch like any request, and the
report's files travel back in the RPC's stream. Offline, `evaluate_offline` gives it a
model and an engine of its own.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memserve.errors import InvalidArgument

if TYPE_CHECKING:
    from memserve.engine.scheduler import Engine
    from memserve.memory.kind import LoadTarget, MemoryKind
    from memserve.memory_store.artifact import Artifact
    from memserve.models import LoadedModel

Progress = Callable[[int, int, str], None]
"""(step, total, message); raises Cancelled when the caller has gone away."""

# A report travels in one gRPC stream, a file a message: each file stays well under the
# server's message limit.
MAX_REPORT_FILE_BYTES = 8 << 20


@dataclass(frozen=True)
class EvalContext:
    """An evaluation's model, engine and output, and how it reports progress."""

    model: LoadedModel
    engine: Engine
    """Running; an evaluation that generates submits its requests to it."""
    target: LoadTarget
    """Where the memories the evaluation loads run: the engine's hooks, no metrics observer
    (an evaluation's traffic is not the service's)."""
    artifact: Artifact | None
    out: Path
    progress: Progress


def report_files(out: Path) -> dict[str, bytes]:
    """The report's files (plain names, sorted), each within the size a message may carry."""
    files: dict[str, bytes] = {}
    for path in sorted(out.iterdir()):
        if path.is_file():
            data = path.read_bytes()
            if len(data) > MAX_REPORT_FILE_BYTES:
                raise InvalidArgument(f"the report's {path.name} is {len(data)} bytes, over the limit")
            files[path.name] = data
    return files


@contextmanager
def offline_context(
    loaded: LoadedModel, artifact: Artifact | None, out: Path, progress: Progress | None = None
) -> Iterator[EvalContext]:
    """An evaluation context in this process, with an engine of its own (stopped on leaving)."""
    from memserve.engine.scheduler import Engine, EngineConfig
    from memserve.memory.kind import LoadTarget

    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=16, max_queue_size=64))
    engine.start()
    try:
        out.mkdir(parents=True, exist_ok=True)
        target = LoadTarget.for_model(loaded, engine.hooks)
        yield EvalContext(loaded, engine, target, artifact, out, progress or _quiet)
    finally:
        engine.stop()


def evaluate_offline(
    kind: MemoryKind,
    loaded: LoadedModel,
    artifact: Artifact | None,
    options: dict[str, Any],
    out: Path,
    progress: Progress | None = None,
) -> None:
    """Runs `kind`'s evaluation in this process, writing its report into `out`."""
    with offline_context(loaded, artifact, out, progress) as context:
        kind.evaluate(options, context)


def _quiet(step: int, total: int, message: str) -> None:
    pass


def scratch_folder() -> tempfile.TemporaryDirectory[str]:
    """A folder for a report that travels back to a client (removed when closed)."""
    return tempfile.TemporaryDirectory(prefix="memserve-eval-")


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate (95 % by default): honest near 0 and 1, where the
    normal approximation is not. (nan, nan) without trials."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
