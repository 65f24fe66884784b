"""The OpenAI-compatible HTTP API, driven by the real `openai` package (and httpx for the rest),
against a running server on a tiny Llama with a chat template and a real Redis."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from transformers import AutoTokenizer

from memserve.clients import Client, document_ref, local_ref
from tests.conftest import wait_until
from tests.test_server import ServerThread, tiny_server_config
from tests.test_server_store import store_config

TOKEN = "http-s3cret"
# A ChatML template, as the default model's: the tiny tokenizer has none.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GREEDY = {"temperature": 0, "max_tokens": 6}
FOX = {"id": "fox", "prompt": "The quick brown fox", "target": " village",
       "positive_prompts": ["A quick brown fox"], "negative_prompts": ["Once upon a time"]}  # fmt: skip

pytestmark = pytest.mark.usefixtures("no_ambient_tenant")


@pytest.fixture(scope="module")
def chat_model_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def peer(chat_model_dir: Path, redis_standalone) -> Iterator[ServerThread]:
    from tests.conftest import flush

    flush([redis_standalone])
    config = tiny_server_config(
        chat_model_dir, store=store_config(str(redis_standalone.url)), max_batch_size=1, max_queue_size=1
    )
    server = ServerThread(replace(config, http_port=0, auth_token=TOKEN))
    yield server
    server.close()


@pytest.fixture(scope="module")
def base_url(peer: ServerThread) -> str:
    return f"http://127.0.0.1:{peer.running.http_port}"


@pytest.fixture(scope="module")
def model(peer: ServerThread) -> str:
    """The served model's name, as the HTTP API's `model` expects it."""
    with Client(f"127.0.0.1:{peer.running.port}") as client:
        return client.model_info().model


@pytest.fixture
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    # max_retries=0: the error tests want the first answer, not the SDK's retries of 429 and 503.
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def grpc_client(peer: ServerThread) -> Iterator[Client]:
    with Client(f"127.0.0.1:{peer.running.port}", tenant="", token=TOKEN) as client:
        yield client


def test_a_completion_is_the_grpc_generation(oai, grpc_client, model):
    completion = oai.completions.create(
        model=model, prompt="The quick brown fox", extra_body={"ignore_eos": True}, logprobs=2, **GREEDY
    )
    same = grpc_client.generate("The quick brown fox", max_new_tokens=6, ignore_eos=True, logprobs=True)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.model == model
    assert choice.text == same.text and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 6 and completion.usage.prompt_tokens == same.prompt_tokens
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 6
    assert choice.logprobs.token_logprobs == pytest.approx([t.logprob for t in same.tokens], abs=1e-5)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.tokens == [t.text for t in same.tokens]


def test_chat_with_a_system_turn_goes_through_the_template(oai, grpc_client, model, chat_model_dir):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Once upon a time"},
        {"role": "assistant", "content": "there was"},
        {"role": "user", "content": [{"type": "text", "text": "a fox"}]},
    ]
    reply = oai.chat.completions.create(model=model, messages=messages, seed=3, temperature=0.7, max_tokens=6)
    turns = [{**m, "content": m["content"] if isinstance(m["content"], str) else "a fox"} for m in messages]
    same = grpc_client.generate(messages=turns, seed=3, temperature=0.7, max_new_tokens=6)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == same.text
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    templated = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False).input_ids)


def test_streams_add_up_to_the_whole_answer(oai, model):
    whole = oai.completions.create(model=model, prompt="Once upon a time", seed=5, **GREEDY)
    chunks = list(
        oai.completions.create(model=model, prompt="Once upon a time", seed=5, stream=True, **GREEDY)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Hello"}]
    reply = oai.chat.completions.create(model=model, messages=messages, **GREEDY)
    stream = oai.chat.completions.create(model=model, messages=messages, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_the_stream_ends_with_done(base_url, model):
    body = {"model": model, "prompt": "Hi", "stream": True, **GREEDY}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def _register(base_url: str, path: str, body: dict) -> dict:
    """Registers over HTTP and follows the job's watch stream (server-sent events) to its end."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    job = httpx.post(f"{base_url}/v1/memories/{path}", json=body, headers=headers, timeout=30)
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    with httpx.stream("GET", f"{base_url}/v1/jobs/{job_id}/watch", timeout=300) as events:
        updates = [json.loads(line[len("data: ") :]) for line in events.iter_lines() if line]
    assert updates[-1]["state"] == "JOB_STATE_SUCCEEDED", updates[-1]
    return updates[-1]


@pytest.fixture(scope="module")
def memories(base_url: str) -> tuple[str, str]:
    """A document bank and a fact set, registered and trained over HTTP."""
    documents = {
        "bank": "http-stories",
        "documents": [
            {"id": "fox", "text": "The quick brown fox jumps over the lazy dog. " * 5},
            {"id": "sea", "text": "Once upon a time there was a small village by the sea. " * 5},
        ],
        "config": {"epochs": 20, "key_dim": 2, "window_words": 16, "window_stride": 8},
    }
    _register(base_url, "documents", documents)
    _register(base_url, "facts", {"set": "http-facts", "facts": [FOX],
                                  "config": {"generated_prompts": 1, "layers": [1, 2]}})  # fmt: skip
    return "http-stories", "http-facts"


def _trace(tokens) -> list[list[tuple]]:
    return [
        [(t.memory, t.kind, t.layer, t.entry, round(t.value, 4)) for t in token.trace] for token in tokens
    ]


def test_a_document_and_a_fact_set_with_the_trace(oai, grpc_client, model, memories, base_url):
    bank, facts = memories
    only_facts = {"memories": [{"local": {"set": facts}}], "ignore_eos": True}
    alone = oai.completions.create(model=model, prompt=FOX["prompt"], extra_body=only_facts, **GREEDY)
    assert alone.choices[0].text.startswith(" village")  # the fact, over HTTP
    refs = [{"document": {"bank": bank, "document_id": "sea"}}, {"local": {"set": facts}, "scale": 1.0}]
    body = {"memories": refs, "memory_trace": True, "ignore_eos": True}
    completion = oai.completions.create(model=model, prompt=FOX["prompt"], extra_body=body, **GREEDY)
    same = grpc_client.generate(FOX["prompt"], max_new_tokens=6, ignore_eos=True, memory_trace=True,
                                memories=[document_ref(bank, "sea"), local_ref(facts)])  # fmt: skip
    assert completion.choices[0].text == same.text
    used = completion.model_extra["memories"]
    assert [(m["name"], m["kind"], m["version"]) for m in used] == [
        (bank, "document", 1),
        (facts, "local", 1),
    ]
    trace = completion.choices[0].model_extra["memory_trace"]
    assert [t["token"] for t in trace] == [t.text for t in same.tokens]
    over_http = [[(e["memory"], e["kind"], e["layer"], e["entry"], round(e["value"], 4))
                  for e in t["memories"]] for t in trace]  # fmt: skip
    assert over_http == _trace(same.tokens)
    assert {e["entry"] for t in trace for e in t["memories"] if e["kind"] == "document"} == {"sea"}
    streamed = list(oai.completions.create(model=model, prompt=FOX["prompt"], extra_body=body, stream=True,
                                           **GREEDY))  # fmt: skip
    assert [t for c in streamed for t in c.choices[0].model_extra["memory_trace"]] == trace
    listed = httpx.get(f"{base_url}/v1/memories", params={"kind": "local"}).json()["memories"]
    assert [m["name"] for m in listed] == [facts]


def _status(call) -> tuple[type, int, dict]:
    """The SDK's exception class, the HTTP status and the error object of a refused call."""
    with pytest.raises(openai.APIStatusError) as error:
        call()
    return type(error.value), error.value.status_code, error.value.body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"max_tokens": 0}, "max_tokens must be in [1,"),
        ({"n": 2}, "n is not supported"),
        ({"logprobs": 21}, "logprobs must be in [0, 20]"),
        ({"stop": [1]}, "stop must be a string or an array of strings"),
        ({"memories": [{"local": {"sett": "x"}}]}, "memories[0]"),
        ({"memories": {"local": "x"}}, "memories must be an array"),
        ({"prompt": ["a", "b"]}, "one request per prompt"),
        ({"prompt": ""}, "prompt is empty"),
        ({"model": "bad name!"}, "model"),
    ],
)
def test_bad_input_is_400_in_openais_shape(oai, model, body, message):
    arguments = {"model": model, "prompt": "Hi", "max_tokens": 2}
    extra = {k: v for k, v in body.items() if k not in arguments}
    arguments.update({k: v for k, v in body.items() if k in arguments})
    kind, status, error = _status(lambda: oai.completions.create(**arguments, extra_body=extra))
    assert kind is openai.BadRequestError and status == 400
    assert error["type"] == "invalid_request_error" and message in error["message"]


def test_chat_bad_turns_are_400(oai, model):
    for messages, message in (
        ([{"role": "tool", "content": "x"}], "role must be one of"),
        ([{"role": "system", "content": "only"}], "only system turns"),
        ([], "non-empty array"),
    ):
        _, status, error = _status(lambda m=messages: oai.chat.completions.create(model=model, messages=m))
        assert status == 400 and message in error["message"]


def test_unknown_memories_and_adapters_are_404(oai, model):
    unknown = {"memories": [{"local": {"set": "no-such-set"}}]}
    kind, status, error = _status(
        lambda: oai.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body=unknown)
    )
    assert kind is openai.NotFoundError and status == 404 and "no-such-set" in error["message"]
    kind, status, error = _status(lambda: oai.completions.create(model="no-such-adapter", prompt="Hi"))
    assert kind is openai.NotFoundError and "no-such-adapter" in error["message"]
    assert error["code"] == "not_found"


def test_changing_memories_without_the_token_is_401(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    kind, status, error = _status(lambda: client.post(
        "/memories/facts", body={"set": "x", "facts": [FOX]}, cast_to=httpx.Response))  # fmt: skip
    assert (
        kind is openai.AuthenticationError
        and status == 401
        and "not one this server knows" in error["message"]
    )
    anonymous = httpx.delete(f"{base_url}/v1/memories/x")
    assert anonymous.status_code == 401 and "send a bearer token" in anonymous.json()["error"]["message"]


def test_a_full_queue_is_429(oai, grpc_client, peer, model):
    stop = threading.Event()

    def hold() -> None:
        for _ in grpc_client.generate_stream("Hold", max_new_tokens=2000, ignore_eos=True):
            if stop.is_set():
                return

    holders = [threading.Thread(target=hold) for _ in range(2)]
    try:
        holders[0].start()
        wait_until(lambda: peer.running.engine.running == 1)
        holders[1].start()
        wait_until(lambda: peer.running.engine.queue_depth == 1)
        kind, status, error = _status(lambda: oai.completions.create(model=model, prompt="Hi", max_tokens=2))
        assert kind is openai.RateLimitError and status == 429 and error["code"] == "resource_exhausted"
    finally:
        stop.set()
        for holder in holders:
            holder.join(60)


def test_models_health_ready_and_unknown_routes(oai, base_url, model):
    assert next(m.id for m in oai.models.list()) == model
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base_url}/ready").status_code == 200
    missing = httpx.get(f"{base_url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    not_json = httpx.post(
        f"{base_url}/v1/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]


def test_shutting_down_is_503(chat_model_dir):
    """What `RunningServer.stop` does first (before it waits for in-flight requests): the HTTP front
    drains, so new requests get 503 and /ready says so while /health stays up."""
    server = ServerThread(replace(tiny_server_config(chat_model_dir), http_port=0))
    base = f"http://127.0.0.1:{server.running.http_port}"
    try:
        assert httpx.get(f"{base}/ready").status_code == 200
        server.running.http.draining.on = True
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        _, status, error = _status(lambda: client.completions.create(model="tiny", prompt="Hi", max_tokens=2))
        assert status == 503 and "shutting down" in error["message"] and error["code"] == "unavailable"
        assert httpx.get(f"{base}/ready").status_code == 503
        assert httpx.get(f"{base}/health").status_code == 200
    finally:
        server.close()


def test_stopping_turns_the_http_front_to_draining_before_it_waits(chat_model_dir):
    server = ServerThread(replace(tiny_server_config(chat_model_dir), http_port=0))
    seen: list[bool] = []
    engine = server.running.engine
    real = type(engine).running

    class Watching(type(engine)):  # the drain loop reads `running`: by then draining must be on
        @property
        def running(self) -> int:
            seen.append(server.running.http.draining.on)
            return real.fget(self)

    engine.__class__ = Watching
    server.close()
    assert seen and all(seen)


def test_grpc_takes_the_same_conversations(grpc_client):
    """Multi-turn chat over gRPC: `messages` beside `prompt`, checked alike."""
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert grpc_client.generate(messages=turns, max_new_tokens=3, ignore_eos=True).generated_tokens == 3
    for options, message in (
        ({"prompt": "Hi", "messages": turns}, "not both"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
        ({"messages": [{"role": "user", "content": ""}]}, "has no content"),
        ({"messages": [{"role": "user", "content": "x"}] * 257}, "at most 256 messages"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            grpc_client.generate(max_new_tokens=2, **options)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
