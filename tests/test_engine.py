"""The engine on tiny random models: batching, invariance, sampling, stopping, limits."""

from __future__ import annotations

import time

import pytest
import torch

from memserve.engine.requests import FinishReason, GenerationRequest, StoppingParams
from memserve.engine.sampling import SamplingParams
from memserve.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemoryHookError,
    ResourceExhausted,
)
from memserve.memory.hooks import MemoryContext, Site
from memserve.memory.kind import RowMemory
from tests.conftest import build_tiny_model, collect, run_all, submit, take_tokens, wait_until

CORPUS_LINE = "Once upon a time there was a small village by the sea. "

PROMPTS = [
    "The quick brown fox",
    "Once",
    "Memories are selected by document keys and fire only",
    "0123456789 !?",
    "Once upon a time there was a small village by the sea. The quick brown fox jumps",
    "lazy dog.",
    "äöü é ñ 東京",
    "There was a village",
]


def greedy(tokenizer, prompt: str, n: int = 12, **stopping) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=tuple(tokenizer(prompt).input_ids),
        stopping=StoppingParams(max_new_tokens=n, ignore_eos=True, **stopping),
    )


def test_greedy_output_is_the_same_alone_and_in_a_batch_of_8(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)
    requests = [greedy(tiny_tokenizer, p) for p in PROMPTS]
    alone = [run_all(engine, [r])[0] for r in requests]
    together = run_all(engine, requests)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 12 for o in alone)


def test_greedy_output_matches_hugging_face_generate(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)
    for prompt in PROMPTS[:3]:
        ids = torch.tensor([tiny_tokenizer(prompt).input_ids])
        reference = tiny_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
        assert run_all(engine, [greedy(tiny_tokenizer, prompt, 10)])[0].token_ids == reference


def test_request_joining_mid_decode_does_not_change_running_rows(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)
    long_request = greedy(tiny_tokenizer, PROMPTS[2], 40)
    alone_long = run_all(engine, [long_request])[0]
    alone_short = [run_all(engine, [greedy(tiny_tokenizer, p, 5)])[0] for p in PROMPTS[:4]]

    first = submit(engine, long_request)
    started = take_tokens(first, 3)  # it is decoding: the others join between its steps
    later = [submit(engine, greedy(tiny_tokenizer, p, 5)) for p in PROMPTS[:4]]
    assert collect(first, prior=started).token_ids == alone_long.token_ids
    assert [collect(q).token_ids for q in later] == [o.token_ids for o in alone_short]


def test_the_same_seed_gives_the_same_sample_whatever_the_batch(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)

    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=tuple(tiny_tokenizer(PROMPTS[0]).input_ids),
            sampling=SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed),
            stopping=StoppingParams(max_new_tokens=16, ignore_eos=True),
        )

    alone = run_all(engine, [sampled(7)])[0].token_ids
    batch = run_all(engine, [sampled(7), sampled(8), greedy(tiny_tokenizer, PROMPTS[1]), sampled(7)])
    assert batch[0].token_ids == alone == batch[3].token_ids
    assert batch[1].token_ids != alone


def test_repetition_penalty_changes_greedy_output(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)
    plain = greedy(tiny_tokenizer, PROMPTS[0], 30)
    penalised = GenerationRequest(plain.prompt_ids, SamplingParams(repetition_penalty=5.0), plain.stopping)
    outputs = run_all(engine, [plain, penalised])
    assert outputs[0].token_ids != outputs[1].token_ids
    # A strong penalty makes repeats of already-seen tokens rarer.
    assert len(set(outputs[1].token_ids)) >= len(set(outputs[0].token_ids))


def test_max_new_tokens_and_stop_sequences_end_generation(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)
    full = run_all(engine, [greedy(tiny_tokenizer, PROMPTS[0], 20)])[0]
    assert full.finish.reason is FinishReason.LENGTH and full.finish.generated_tokens == 20
    stop = full.text[4:6]
    assert stop, "the tiny model produced too little text for this test"
    stopped = run_all(engine, [greedy(tiny_tokenizer, PROMPTS[0], 20, stop_sequences=(stop,))])[0]
    assert stopped.finish.reason is FinishReason.STOP_SEQUENCE
    assert stopped.text == full.text[: full.text.index(stop)]
    kept = run_all(
        engine, [greedy(tiny_tokenizer, PROMPTS[0], 20, stop_sequences=(stop,), include_stop_sequence=True)]
    )[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_eos_ends_generation_unless_ignored(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)
    # Make the tiny model always choose token 0 (its eos) by biasing the head.
    head = tiny_model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[0] = 1e4
    handle = head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        request = greedy(tiny_tokenizer, PROMPTS[0], 5)
        ignoring = run_all(engine, [request])[0]
        stopping = run_all(engine, [GenerationRequest(request.prompt_ids, stopping=StoppingParams(5))])[0]
    finally:
        handle.remove()
    assert ignoring.finish.reason is FinishReason.LENGTH and ignoring.token_ids == [0] * 5
    assert stopping.finish.reason is FinishReason.EOS and stopping.token_ids == [0]
    assert stopping.text == ""


def test_logprobs_are_the_models_own(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)
    request = greedy(tiny_tokenizer, PROMPTS[0], 1)
    request = GenerationRequest(request.prompt_ids, stopping=request.stopping, logprobs=True, top_logprobs=3)
    outcome = run_all(engine, [request])[0]
    logits = tiny_model(torch.tensor([request.prompt_ids])).logits[0, -1].float()
    expected = logits.log_softmax(-1)[outcome.token_ids[0]]
    assert outcome.logprobs[0] == pytest.approx(float(expected), abs=1e-4)


def test_a_full_queue_answers_resource_exhausted(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer, max_batch_size=1, max_queue_size=2)
    long = greedy(tiny_tokenizer, PROMPTS[0], 200)
    queues = [submit(engine, long)]
    wait_until(lambda: engine.running == 1)  # the first one runs: the next two wait in the queue
    queues += [submit(engine, long), submit(engine, long)]
    with pytest.raises(ResourceExhausted, match="queue is full"):
        submit(engine, long)
    assert all(collect(q).finish is not None for q in queues)


def test_cancelling_a_request_frees_its_slot(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer, max_batch_size=1)
    events = []
    handle = engine.submit(greedy(tiny_tokenizer, PROMPTS[0], 2000), events.append)
    wait_until(lambda: len(events) >= 3)
    handle.cancel()
    # With one slot, this request only runs once the cancelled one has left.
    outcome = run_all(engine, [greedy(tiny_tokenizer, PROMPTS[1], 3)])[0]
    assert outcome.finish is not None
    # Uncancelled, it would have run to the 512-token context.
    assert len(events) < 500 and not any(getattr(e, "reason", None) for e in events)


def test_a_request_past_its_deadline_fails_and_leaves(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer)
    request = greedy(tiny_tokenizer, PROMPTS[0], 100_000)
    request = GenerationRequest(
        request.prompt_ids, stopping=StoppingParams(2000, ignore_eos=True), deadline=time.monotonic() + 0.2
    )
    outcome = collect(submit(engine, request))
    assert isinstance(outcome.error, DeadlineExceeded)
    wait_until(lambda: engine.running == 0)


def test_a_prompt_longer_than_the_context_is_refused(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer, max_context_tokens=32)
    with pytest.raises(InvalidArgument, match="shorten the prompt"):
        submit(engine, GenerationRequest(prompt_ids=tuple(range(1, 40))))


class _Memory(RowMemory):
    """A test memory: adds nothing, or raises on its `fail_on`-th forward (1 = the prefill)."""

    def __init__(
        self, name: str, fail_on: int | None = None, fail_in_add_ops: bool = False, layer: int = 1
    ) -> None:
        self.name = name
        self.layer = layer
        self.fail_on = fail_on
        self.fail_in_add_ops = fail_in_add_ops
        self.forwards = 0

    def add_ops(self, context: MemoryContext, rows: torch.Tensor) -> None:
        if self.fail_in_add_ops:
            raise KeyError("no such entry")
        self.forwards += 1
        fail = self.forwards == self.fail_on

        def op(hidden: torch.Tensor) -> torch.Tensor:
            if fail:
                raise RuntimeError("boom")
            return hidden

        context.add(self.layer, Site.RESIDUAL, self, op)


def _with_memory(request: GenerationRequest, memory: _Memory) -> GenerationRequest:
    return GenerationRequest(request.prompt_ids, stopping=request.stopping, memories=(memory,))


@pytest.mark.parametrize(
    "failure",
    [
        {"fail_on": 1},  # during the prefill
        {"fail_on": 4},  # during a decode step, after the rows joined the batch
        {"fail_in_add_ops": True},
        {"layer": 999},  # a site that does not exist
    ],
    ids=["prefill", "decode", "add_ops", "no_such_layer"],
)
def test_a_failing_memory_fails_its_request_and_no_other(tiny_model, tiny_tokenizer, make_engine, failure):
    engine = make_engine(tiny_model, tiny_tokenizer)
    memory = _Memory("broken", **failure)
    healthy = [greedy(tiny_tokenizer, p) for p in PROMPTS[:3]]
    expected = run_all(engine, healthy)
    # A working memory with the same name must not be blamed: failures are matched by identity.
    namesake = _with_memory(healthy[2], _Memory("broken"))
    outcomes = run_all(engine, [healthy[0], _with_memory(healthy[0], memory), healthy[1], namesake])
    assert isinstance(outcomes[1].error, MemoryHookError)
    assert "'broken' failed" in str(outcomes[1].error)
    assert [o.token_ids for o in (outcomes[0], *outcomes[2:])] == [o.token_ids for o in expected]


def test_a_request_whose_sampling_overflows_does_not_hurt_its_neighbours(
    tiny_model, tiny_tokenizer, make_engine
):
    engine = make_engine(tiny_model, tiny_tokenizer)
    healthy = [greedy(tiny_tokenizer, p) for p in PROMPTS[:2]]
    expected = run_all(engine, healthy)
    extreme = [
        GenerationRequest(
            healthy[0].prompt_ids, SamplingParams(temperature=1e-40, seed=1), healthy[0].stopping
        ),
        GenerationRequest(
            healthy[0].prompt_ids,
            SamplingParams(temperature=1.0, repetition_penalty=1e-40, seed=1),
            healthy[0].stopping,
        ),
    ]
    outcomes = run_all(engine, [healthy[0], *extreme, healthy[1]])
    assert [outcomes[0].token_ids, outcomes[3].token_ids] == [o.token_ids for o in expected]
    # A vanishing temperature is greedy; an extreme penalty still samples a token each step.
    assert outcomes[1].token_ids == expected[0].token_ids
    assert outcomes[2].error is None and len(outcomes[2].token_ids) == 12


def test_a_stop_sequence_on_the_last_allowed_token_is_the_finish_reason(
    tiny_model, tiny_tokenizer, make_engine
):
    engine = make_engine(tiny_model, tiny_tokenizer)
    full = run_all(engine, [greedy(tiny_tokenizer, PROMPTS[0], 6)])[0]
    # The shortest ending of the text that appears nowhere earlier: it completes on the 6th token.
    k = next(k for k in range(1, len(full.text) + 1) if full.text.find(full.text[-k:]) == len(full.text) - k)
    stop = full.text[-k:]
    stopped = run_all(engine, [greedy(tiny_tokenizer, PROMPTS[0], 6, stop_sequences=(stop,))])[0]
    assert stopped.finish.reason is FinishReason.STOP_SEQUENCE and len(stopped.token_ids) == 6
    assert stopped.text == full.text[:-k]


def test_requests_cancelled_while_waiting_give_their_queue_place_back(
    tiny_model, tiny_tokenizer, make_engine
):
    engine = make_engine(tiny_model, tiny_tokenizer, max_batch_size=1, max_queue_size=1)
    long = greedy(tiny_tokenizer, PROMPTS[0], 2000)  # runs to the 512-token context: about a second
    running = submit(engine, long)
    wait_until(lambda: engine.running == 1)
    waiting = engine.submit(long, lambda event: None)
    with pytest.raises(ResourceExhausted):
        submit(engine, long)
    waiting.cancel()
    assert collect(submit(engine, greedy(tiny_tokenizer, PROMPTS[1], 2))).finish is not None
    assert collect(running).finish is not None


def test_prefill_takes_at_most_the_token_budget_of_waiting_prompts(tiny_model, tiny_tokenizer, make_engine):
    engine = make_engine(tiny_model, tiny_tokenizer, max_prefill_tokens=100)
    prompt = greedy(tiny_tokenizer, CORPUS_LINE * 3, 4)  # 42 tokens: two fit in 100, three do not
    widths: list[int] = []
    original = engine._prefill
    engine._prefill = lambda rows: (widths.append(len(rows)), original(rows))[1]
    outcomes = run_all(engine, [prompt] * 5)
    assert all(o.finish is not None for o in outcomes)
    assert max(widths) <= 100 // len(prompt.prompt_ids) and sum(widths) == 5


def test_an_architecture_without_hook_sites_serves_without_memories(tiny_tokenizer, make_engine):
    model = build_tiny_model("llama", len(tiny_tokenizer))
    model.config.model_type = "an-unknown-architecture"
    engine = make_engine(model, tiny_tokenizer)
    request = greedy(tiny_tokenizer, PROMPTS[0], 4)
    assert run_all(engine, [request])[0].finish.generated_tokens == 4
    with pytest.raises(FailedPrecondition, match="no memory hook sites: send the request without memories"):
        submit(engine, _with_memory(request, _Memory("facts")))
