"""The `adapter` kind: a residual MLP after one block, trained on documents and/or question templates.

Importing it registers the kind and costs little: `module` (serving) is imported when a memory
of the kind is loaded, `train` when a job runs; `config` has no torch in it, for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memserve.kinds.adapter.config import AdapterConfig, check_spec
from memserve.memory.kind import LoadTarget, MemoryKind, TrainContext, Trained
from memserve.memory.options import check_layer
from memserve.memory.registry import register_kind

if TYPE_CHECKING:
    from memserve.kinds.adapter.module import LoadedAdapter
    from memserve.memory.evaluation import EvalContext
    from memserve.memory_store.artifact import Artifact

__all__ = ["AdapterConfig", "AdapterKind"]


class AdapterKind(MemoryKind):
    name = "adapter"

    def validate_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return check_spec(spec)

    def check_for_model(self, spec: dict[str, Any], num_layers: int) -> None:
        check_layer((spec.get("config") or {}).get("layer"), num_layers, "config.layer", from_end=True)

    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        from memserve.kinds.adapter.train import train_adapter

        return train_adapter(spec, context)

    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedAdapter:
        from memserve.kinds.adapter.module import LoadedAdapter

        return LoadedAdapter(artifact, target)

    def evaluate(self, options: dict[str, Any], context: EvalContext) -> None:
        from memserve.kinds.adapter.eval import run

        run(options, context)


register_kind(AdapterKind())
