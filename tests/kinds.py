"""A small memory kind for testing the store, the jobs and the plugin registry.

``test-bias`` adds a fixed vector to the residual stream at one layer. Its
trainer draws the vector from a seed and takes `steps` steps of `step_seconds`
each, reporting progress at every step, so tests can watch, cancel and kill a
job part-way; its evaluation compares a prompt's greedy tokens with and without it,
after `steps` progress reports. `rows` pads the artifact to a chosen size (benchmarks). Load it
with ``--plugin tests.kinds`` or ``MEMSERVE_PLUGINS=tests.kinds``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from memserve.engine.offline import generate_all
from memserve.errors import InvalidArgument
from memserve.memory.evaluation import EvalContext
from memserve.memory.hooks import MemoryContext, Site
from memserve.memory.kind import (
    LoadedMemory,
    LoadTarget,
    MemoryKind,
    MemoryRefSpec,
    RowMemory,
    TrainContext,
    Trained,
)
from memserve.memory.registry import register_kind
from memserve.memory_store.artifact import Artifact


@dataclass(frozen=True)
class BoundBias(RowMemory):
    name: str
    delta: torch.Tensor
    layer: int
    scale: float

    def add_ops(self, context: MemoryContext, rows: torch.Tensor) -> None:
        def op(hidden: torch.Tensor) -> torch.Tensor:
            shift = torch.zeros_like(hidden)
            shift[rows] = self.delta * self.scale
            return hidden + shift

        context.add(self.layer, Site.RESIDUAL, self, op)


class LoadedBias(LoadedMemory):
    def __init__(
        self, name: str, version: int, delta: torch.Tensor, padding: torch.Tensor, layer: int
    ) -> None:
        self.name = name
        self.version = version
        self.delta = delta
        self.padding = padding  # kept on the device like real weights, to size the artifact
        self.layer = layer

    @property
    def nbytes(self) -> int:
        return self.delta.nbytes + self.padding.nbytes

    def bind(self, ref: MemoryRefSpec) -> BoundBias:
        return BoundBias(self.name, self.delta, self.layer, ref.scale)


class BiasKind(MemoryKind):
    name = "test-bias"

    def validate_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        unknown = set(spec) - {"layer", "value", "seed", "steps", "step_seconds", "rows", "fail_at"}
        if unknown:
            raise InvalidArgument(f"unknown test-bias options: {sorted(unknown)}")
        return {
            "layer": int(spec.get("layer", 0)),
            "value": float(spec.get("value", 1.0)),
            "seed": int(spec.get("seed", 0)),
            "steps": int(spec.get("steps", 1)),
            "step_seconds": float(spec.get("step_seconds", 0.0)),
            "rows": int(spec.get("rows", 0)),
            "fail_at": int(spec.get("fail_at", -1)),
        }

    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        spec = self.validate_spec(spec)
        hidden = context.model.model.config.hidden_size
        for step in range(spec["steps"]):
            if step == spec["fail_at"]:
                raise RuntimeError(f"failing at step {step}, as asked")
            time.sleep(spec["step_seconds"])
            context.report(step + 1, spec["steps"], loss=1.0 / (step + 1), message="drawing")
        generator = torch.Generator().manual_seed(spec["seed"])
        delta = torch.randn(hidden, generator=generator) * spec["value"]
        return Trained(
            tensors={"delta": delta, "padding": torch.zeros(spec["rows"], hidden)},
            hyperparameters={"layer": spec["layer"], "value": spec["value"], "seed": spec["seed"]},
            metrics={"final_loss": 1.0 / max(spec["steps"], 1)},
        )

    def evaluate(self, options: dict[str, Any], context: EvalContext) -> None:
        """Greedy tokens of a prompt with and without the bias, after `steps` progress reports."""
        unknown = set(options) - {"prompt", "steps", "step_seconds"}
        if unknown:
            raise InvalidArgument(f"unknown test-bias evaluation options: {sorted(unknown)}")
        steps = int(options.get("steps", 1))
        for step in range(steps):
            time.sleep(float(options.get("step_seconds", 0.0)))
            context.progress(step + 1, steps, f"step {step + 1}")
        if context.artifact is None:
            raise InvalidArgument("a test-bias evaluation needs a memory")
        bias = self.load(context.artifact, context.target).bind(
            MemoryRefSpec(context.artifact.meta.name, self.name)
        )
        prompt = context.model.tokenizer(str(options.get("prompt", "The quick brown fox"))).input_ids
        with_bias, without = (
            generate_all(context.engine, [prompt], memories, 4)[0] for memories in ((bias,), ())
        )
        metrics = {"memory": context.artifact.meta.name, "with": with_bias, "without": without}
        (context.out / "metrics.json").write_text(json.dumps(metrics))
        (context.out / "report.md").write_text(f"# {metrics['memory']}\n\nchanged: {with_bias != without}\n")

    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedBias:
        layer = int(artifact.meta.hyperparameters["layer"])
        if not 0 <= layer < target.num_layers:
            raise InvalidArgument(
                f"test-bias layer {layer} is outside the model's {target.num_layers} layers"
            )
        tensors = {k: v.to(target.device, target.dtype) for k, v in artifact.tensors.items()}
        return LoadedBias(
            artifact.meta.name, artifact.meta.version, tensors["delta"], tensors["padding"], layer
        )


register_kind(BiasKind())
