"""Adapters from the CLI and the clients (`adapters add`, `adapters ls`, `generate --adapter
--trace`, `register_adapter`, `eval factuality`), on a real server and Redis training real
adapters (tiny Llama)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import pytest

from memserve.clients.client import AsyncClient, Client, adapter_ref, build_adapter_request
from tests.test_cli_store import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "factuality"
FAST = {"epochs": 3, "hidden_size": 8, "max_length": 64, "learning_rate": 1e-2}
TEMPLATES = [
    ("What jumps over the lazy dog?", "The quick brown fox."),
    ("Where is the village?", "By the sea."),
]


pytestmark = pytest.mark.usefixtures("no_ambient_tenant")


@pytest.fixture(scope="module")
def address(store_address: str) -> str:
    return store_address


def test_register_an_adapter_then_generate_with_it_and_its_trace(address):
    with Client(address) as client:
        job = client.register_adapter("qa", templates=TEMPLATES, config={**FAST, "epochs": 20})
        assert (job.kind, job.memory_name, job.state) == ("adapter", "qa", "queued")
        final = list(client.watch_job(job.id))[-1]
        assert final.state == "succeeded", final.error
        info = client.get_memory("qa")
        assert info.kind == "adapter" and info.details["data"] == "templates"
        assert info.metrics["final_loss"] < info.metrics["base_loss"] and info.metrics["gate"] != 0
        prompt = "What jumps over the lazy dog?"
        with_it = client.generate(prompt, max_new_tokens=4, memories=[adapter_ref("qa")], memory_trace=True,
                                  ignore_eos=True, logprobs=True)  # fmt: skip
        plain = client.generate(prompt, max_new_tokens=4, ignore_eos=True, logprobs=True)
        off = client.generate(prompt, max_new_tokens=4, memories=[adapter_ref("qa", scale=0.0)],
                              ignore_eos=True, logprobs=True)  # fmt: skip
        by_name = client.generate(prompt, max_new_tokens=4, memories=["qa"], ignore_eos=True)
    assert with_it.memories == [("qa", "adapter", 1)] and by_name.text == with_it.text
    # Attached, the first token's logprob moves; at scale 0 it is the base model's exactly.
    assert with_it.tokens[0].logprob != plain.tokens[0].logprob
    assert off.tokens[0].logprob == plain.tokens[0].logprob and off.text == plain.text
    (record,) = with_it.tokens[0].trace
    assert (record.memory, record.kind, record.entry) == ("qa", "adapter", "") and record.value != 0
    assert not plain.tokens[0].trace


def test_adapters_add_with_documents_and_templates_waits_lists_and_generates(address, capsys, tmp_path):
    documents = sorted((FIXTURE / "documents").glob("*.md"))[:2]
    templates = tmp_path / "templates.jsonl"
    shutil.copy(FIXTURE / "templates.jsonl", templates)
    code, out, err = run_cli(
        capsys, "adapters", "add", "fever-doctemp", *map(str, documents), "--templates", str(templates),
        "--epochs", "1", "--hidden-size", "8", "--max-length", "64", "--wait", "--server", address,
    )  # fmt: skip
    lines = out.splitlines()
    assert code == 0, err
    assert lines[0].endswith("2 documents, 48 templates → fever-doctemp, queued")
    assert lines[-1] == "succeeded: published fever-doctemp version 1"
    code, out, _ = run_cli(capsys, "adapters", "ls", "--server", address)
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:4] == ["NAME", "VERSION", "LAYER", "HIDDEN"]
    row = next(r for r in rows if r.startswith("fever-doctemp "))
    assert "documents+templates" in row and " 8 " in row
    code, out, _ = run_cli(capsys, "adapters", "ls", "--json", "--server", address)
    listed = {adapter["name"]: adapter for adapter in json.loads(out)}
    assert listed["fever-doctemp"]["hidden_size"] == 8 and "metric_final_loss" in listed["fever-doctemp"]
    code, out, err = run_cli(capsys, "generate", "Velmora Island is", "--adapter", "fever-doctemp", "--trace",
                             "--max-new-tokens", "2", "--server", address)  # fmt: skip
    assert code == 0 and "[trace:" in err and "fever-doctemp" in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "document files, --templates FILE, or both"),
        (["--templates", "/nonexistent.jsonl"], "nonexistent"),
    ],
)
def test_adapters_add_refuses_bad_input_before_calling_the_server(capsys, argv, message):
    code, _, err = run_cli(capsys, "adapters", "add", "a", *argv, "--server", "127.0.0.1:1")
    assert code == 1 and message in err


def test_a_templates_file_with_a_bad_line_names_the_line(capsys, tmp_path):
    templates = tmp_path / "t.jsonl"
    templates.write_text('{"question": "Q", "answer": "A"}\n{"question": 1}\n')
    code, _, err = run_cli(
        capsys, "adapters", "add", "a", "--templates", str(templates), "--server", "127.0.0.1:1"
    )
    assert code == 1 and "line 2 must be a JSON object with string question" in err


def test_build_adapter_request_checks_its_arguments():
    request = build_adapter_request(
        "a", [("d", "Some text.")], [{"question": "Q", "answer": "A"}], {"epochs": 2}
    )
    assert (
        request.documents[0].id == "d" and request.templates[0].answer == "A" and request.config.epochs == 2
    )
    with pytest.raises(ValueError, match="documents, templates, or both"):
        build_adapter_request("a")
    with pytest.raises(ValueError, match="needs a question and an answer"):
        build_adapter_request("a", templates=[{"question": "Q", "answer": ""}])
    with pytest.raises(ValueError, match="unknown adapter training options: alphas"):
        build_adapter_request("a", templates=TEMPLATES, config={"alphas": [1.0]})


def test_the_server_refuses_bad_adapters_and_the_async_client_registers(address):
    with Client(address) as client, pytest.raises(grpc.RpcError) as error:
        client.register_adapter("a", templates=TEMPLATES, config={"epochs": 0})
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # A layer the served model lacks is refused before the job is queued.
    with Client(address) as client, pytest.raises(grpc.RpcError) as error:
        client.register_adapter("far", templates=TEMPLATES, config={"layer": 99})
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "not a block of this model" in str(
        error.value
    )

    async def register() -> str:
        async with AsyncClient(address) as client:
            job = await client.register_adapter("async-adapter", templates=TEMPLATES, config=FAST)
            return [j async for j in client.watch_job(job.id)][-1].state

    assert asyncio.run(register()) == "succeeded"


def test_eval_factuality_writes_the_report_for_the_base_model_and_an_adapter(
    address, capsys, tmp_path, tiny_llama_dir
):
    with Client(address) as client:
        job = client.register_adapter("eval-adapter", templates=TEMPLATES, config=FAST)
        assert list(client.watch_job(job.id))[-1].state == "succeeded"
    export = tmp_path / "adapter.safetensors"
    code, _, err = run_cli(
        capsys, "memories", "export", "eval-adapter", "-o", str(export), "--server", address
    )
    assert code == 0, err
    claims = FIXTURE / "claims.jsonl"
    runs = [
        ([], tmp_path / "base"),  # on the server, the base model alone
        (["--adapter", "eval-adapter"], tmp_path / "served"),  # on the server, with the adapter
        (["--file", str(export), "--model", str(tiny_llama_dir)], tmp_path / "adapter"),  # offline
    ]
    for extra, out in runs:
        argv = ["eval", "factuality", "--claims", str(claims), "--shots", "0,2", "--out", str(out)]
        code, printed, err = run_cli(capsys, *argv, "--server", address, *extra)
        assert code == 0, err
        assert "accuracy/micro-F1/macro-F1: 0 shots " in printed and ", 2 shots " in printed
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics["shots"]) == {"0", "2"} and metrics["test_claims"] == 48
        assert metrics["claims_file"] == str(claims)
        for result in metrics["shots"].values():
            assert {"accuracy", "micro_f1", "macro_f1", "invalid_rate", "confusion"} <= set(result)
            assert 0 <= result["by_likelihood"]["accuracy"] <= 1  # never invalid: one of the three labels
        answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        assert len(answers) == 2 * 48 and {"output", "predicted", "label", "likely"} <= set(answers[0])
        assert {a["likely"] for a in answers} <= {"supports", "refutes", "not enough info"}
        assert "| shots | accuracy | micro-F1 | macro-F1 |" in (out / "report.md").read_text()
    assert json.loads((tmp_path / "base" / "metrics.json").read_text())["adapter"] is None
    for name in ("served", "adapter"):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["adapter"] == "eval-adapter@1"
    # The same adapter on the same model: the server and the offline run agree.
    served, offline = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("served", "adapter"))
    assert served["shots"] == offline["shots"]
    with pytest.raises(SystemExit):  # a usage error, from argparse
        run_cli(capsys, "eval", "factuality", "--claims", str(claims), "--shots", "9", "--out", str(tmp_path))
    assert "shots takes values from 0 to 5" in capsys.readouterr().err


def test_a_bad_claims_file_is_refused_in_one_line(address, capsys, tmp_path):
    claims = tmp_path / "claims.jsonl"
    claims.write_text('{"id": "1", "document": "d", "claim": "c", "label": "maybe", "split": "test"}\n')
    where = ["--out", str(tmp_path / "o"), "--server", address]
    code, _, err = run_cli(capsys, "eval", "factuality", "--claims", str(claims), *where)
    assert code == 1 and err.startswith("memserve: error: INVALID_ARGUMENT: ") and err.count("\n") == 1
    code, _, err = run_cli(capsys, "eval", "factuality", "--claims", str(tmp_path / "missing.jsonl"), *where)
    assert code == 1 and "No such file" in err and err.count("\n") == 1
