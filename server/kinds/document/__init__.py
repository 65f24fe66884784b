"""The `document` kind: a bank of memory entries at one layer, selected per document by its DocRep.

Importing it registers the kind and costs little: `module` (serving) is imported when a memory
of the kind is loaded, `train` when a job runs; `config` has no torch in it, for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memserve.errors import InvalidArgument
from memserve.kinds.document.config import DocumentConfig, check_spec
from memserve.memory.kind import LoadTarget, MemoryKind, TrainContext, Trained
from memserve.memory.options import check_layer
from memserve.memory.registry import register_kind

if TYPE_CHECKING:
    from memserve.kinds.document.module import LoadedDocumentBank
    from memserve.memory.evaluation import EvalContext
    from memserve.memory_store.artifact import Artifact

__all__ = ["DocumentConfig", "DocumentKind"]


class DocumentKind(MemoryKind):
    name = "document"
    needs_key = True

    def validate_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return check_spec(spec)

    def check_for_model(self, spec: dict[str, Any], num_layers: int) -> None:
        from transformers.activations import ACT2FN

        config = spec.get("config") or {}
        check_layer(config.get("layer"), num_layers, "config.layer", from_end=True)
        activation = config.get("token_activation")
        if activation and activation not in ACT2FN:
            raise InvalidArgument(
                f"config.token_activation {activation!r} is not one of {sorted(ACT2FN)} "
                "(empty: the model's own)"
            )

    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        from memserve.kinds.document.train import train_bank

        return train_bank(spec, context)

    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedDocumentBank:
        from memserve.kinds.document.module import LoadedDocumentBank

        return LoadedDocumentBank(artifact, target)

    def evaluate(self, options: dict[str, Any], context: EvalContext) -> None:
        from memserve.kinds.document.eval import run

        run(options, context)


register_kind(DocumentKind())
