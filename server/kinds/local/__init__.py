"""The `local` kind: facts as bounded entries that fire only near the activations they were made for.

Importing it registers the kind and costs little: `module` (serving) is imported when a memory
of the kind is loaded, `train` when a job runs; `config` has no torch in it, for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memserve.kinds.local.config import LocalConfig, check_spec
from memserve.memory.kind import LoadTarget, MemoryKind, TrainContext, Trained
from memserve.memory.options import check_layer
from memserve.memory.registry import register_kind

if TYPE_CHECKING:
    from memserve.kinds.local.module import LoadedLocalSet
    from memserve.memory.evaluation import EvalContext
    from memserve.memory_store.artifact import Artifact

__all__ = ["LocalConfig", "LocalKind"]


class LocalKind(MemoryKind):
    name = "local"

    def validate_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return check_spec(spec)

    def check_for_model(self, spec: dict[str, Any], num_layers: int) -> None:
        config = spec.get("config") or {}
        for layer in config.get("layers") or ():
            check_layer(layer, num_layers, "config.layers", from_end=False)
        if config.get("subject_layer", -1) != -1:  # -1: the default depth
            check_layer(config["subject_layer"], num_layers, "config.subject_layer", from_end=False)

    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        from memserve.kinds.local.train import train_set

        return train_set(spec, context)

    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedLocalSet:
        from memserve.kinds.local.module import LoadedLocalSet

        return LoadedLocalSet(artifact, target)

    def evaluate(self, options: dict[str, Any], context: EvalContext) -> None:
        from memserve.kinds.local.eval import run

        run(options, context)


register_kind(LocalKind())
