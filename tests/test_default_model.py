"""Behaviour on the real default model, SmolLM2-135M-Instruct (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from memserve import models
from memserve.api.convert import generation_request_from_pb
from memserve.engine.requests import FinishReason, GenerationRequest, StoppingParams
from memserve.engine.scheduler import EngineConfig
from memserve.models import DEFAULT_MODEL_NAME, GGUF_SHA256, ModelConfig, load_model
from memserve.v1 import generation_pb2 as pb
from tests.conftest import collect, run_all, submit, take_tokens

pytestmark = pytest.mark.default_model

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):",
    "Water boils at",
    "List three primary colors:",
    "My favourite recipe for a quick weeknight dinner is",
    "In 1492,",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to",
]


def _greedy(tokenizer, prompt: str, n: int = 24) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=tuple(tokenizer(prompt).input_ids), stopping=StoppingParams(max_new_tokens=n)
    )


def test_the_default_model_knows_the_capital_of_france(default_model, make_engine):
    engine = make_engine(default_model.model, default_model.tokenizer)
    outcome = run_all(engine, [_greedy(default_model.tokenizer, PROMPTS[0], 8)])[0]
    assert "Paris" in outcome.text
    assert default_model.fingerprint == GGUF_SHA256 and default_model.name == DEFAULT_MODEL_NAME


def test_greedy_output_is_the_same_alone_and_among_7_other_requests(default_model, make_engine):
    tokenizer = default_model.tokenizer
    engine = make_engine(default_model.model, tokenizer)
    requests = [_greedy(tokenizer, p) for p in PROMPTS]
    assert len({len(r.prompt_ids) for r in requests}) >= 6, "prompts should differ in length"
    alone = [run_all(engine, [r])[0] for r in requests]
    together = run_all(engine, requests)
    for a, t, prompt in zip(alone, together, PROMPTS, strict=True):
        assert t.token_ids == a.token_ids, prompt
        assert t.text == a.text


def test_requests_joining_a_running_batch_do_not_change_its_output(default_model, make_engine):
    tokenizer = default_model.tokenizer
    engine = make_engine(default_model.model, tokenizer)
    first = _greedy(tokenizer, PROMPTS[1], 40)
    expected = run_all(engine, [first])[0].token_ids
    running = submit(engine, first)
    started = take_tokens(running, 3)  # it is decoding: the others join between its steps
    joined = [submit(engine, _greedy(tokenizer, p, 8)) for p in PROMPTS[2:5]]
    assert collect(running, prior=started).token_ids == expected
    assert all(collect(q).finish is not None for q in joined)


def test_engine_matches_hugging_face_generate(default_model, make_engine):
    tokenizer, model = default_model.tokenizer, default_model.model
    engine = make_engine(model, tokenizer)
    ids = tokenizer(PROMPTS[3], return_tensors="pt")
    reference = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids.input_ids.shape[1] :]
    outcome = run_all(engine, [_greedy(tokenizer, PROMPTS[3], 16)])[0]
    assert outcome.token_ids == reference.tolist()


def test_later_starts_load_the_converted_folder_without_touching_the_gguf(default_model, monkeypatch):
    def no_gguf() -> None:
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(models, "_gguf_package_dir", no_gguf)
    again = load_model(ModelConfig(device="cpu", dtype="bf16"))
    assert again.model.dtype == torch.bfloat16 and again.fingerprint == default_model.fingerprint


def test_chat_sends_the_prompt_through_the_chat_template(default_model):
    request = pb.GenerateRequest(prompt="What is the capital of France?", chat=True)
    converted = generation_request_from_pb(request, default_model.tokenizer, EngineConfig(), 8192, None)
    text = default_model.tokenizer.decode(converted.prompt_ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text


def test_a_chat_reply_answers_the_question(default_model, make_engine):
    engine = make_engine(default_model.model, default_model.tokenizer)
    request = pb.GenerateRequest(prompt="What is the capital of France?", chat=True)
    converted = generation_request_from_pb(request, default_model.tokenizer, EngineConfig(), 8192, None)
    converted = GenerationRequest(converted.prompt_ids, stopping=StoppingParams(max_new_tokens=24))
    outcome = run_all(engine, [converted])[0]
    assert "Paris" in outcome.text
    assert outcome.finish.reason in (FinishReason.EOS, FinishReason.LENGTH)
