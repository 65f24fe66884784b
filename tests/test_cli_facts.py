"""Local memory sets from the CLI and the clients (`facts add`, `facts ls`, `generate --facts
--trace`, `register_facts`), on a real server and Redis training real sets (tiny Llama)."""

from __future__ import annotations

import asyncio
import io
import json
import sys

import grpc
import pytest

from memserve.clients.client import AsyncClient, Client, build_facts_request, local_ref
from tests.test_cli_store import run_cli

FOX = {"id": "fox", "prompt": "The quick brown fox", "target": " village",
       "positive_prompts": ["A quick brown fox"], "negative_prompts": ["Once upon a time"]}  # fmt: skip
FAST = {"generated_prompts": 1, "layers": [1, 2]}


pytestmark = pytest.mark.usefixtures("no_ambient_tenant")


@pytest.fixture(scope="module")
def address(store_address: str) -> str:
    return store_address


@pytest.fixture(scope="module")
def animals(address: str) -> str:
    """A set with the fact fox, registered through the client."""
    with Client(address) as client:
        job = client.register_facts("animals", [FOX], config=FAST)
        assert (job.kind, job.memory_name, job.state) == ("local", "animals", "queued")
        final = list(client.watch_job(job.id))[-1]
    assert final.state == "succeeded", final.error
    return "animals"


def test_register_facts_then_generate_with_the_set_and_its_trace(animals, address):
    with Client(address) as client:
        info = client.get_memory("animals")
        assert info.kind == "local" and [f["id"] for f in info.details["facts"]] == ["fox"]
        with_set = client.generate(FOX["prompt"], max_new_tokens=2, memories=[local_ref("animals")],
                                   memory_trace=True, ignore_eos=True)  # fmt: skip
        plain = client.generate(FOX["prompt"], max_new_tokens=2, ignore_eos=True)
        by_name = client.generate(FOX["prompt"], max_new_tokens=2, memories=["animals"], ignore_eos=True)
    assert with_set.text.startswith(" village") and not plain.text.startswith(" village")
    assert by_name.text == with_set.text and with_set.memories == [("animals", "local", 1)]
    fired = with_set.tokens[0].trace
    assert fired and all(t.memory == "animals" and t.kind == "local" for t in fired)
    assert any(t.entry.startswith("fox#0") and 0.5 <= t.value <= 1.0 for t in fired)
    assert not plain.tokens[0].trace


def test_facts_add_waits_ls_lists_and_generate_traces(address, capsys, tmp_path, monkeypatch):
    code, out, err = run_cli(
        capsys, "facts", "add", "cli-facts", "--prompt", FOX["prompt"], "--target", FOX["target"],
        "--positive", "A quick brown fox", "--negative", "Once upon a time", "--id", "fox",
        "--generated-prompts", "1", "--layers", "1", "2", "--wait", "--server", address,
    )  # fmt: skip
    lines = out.splitlines()
    assert code == 0, err
    assert lines[0].startswith("job ") and lines[0].endswith("1 fact → cli-facts, queued")
    assert lines[-1] == "succeeded: published cli-facts version 1"
    assert not any("loss" in line for line in lines)  # the search has no loss: none is shown
    # Many facts from a JSON-lines file (here standard input) make version 2, over the first.
    sea = {"id": "sea", "prompt": "Once upon a time there was a small", "target": " dog"}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(sea) + "\n\n"))
    code, out, err = run_cli(capsys, "facts", "add", "cli-facts", "--file", "-", "--generated-prompts", "0",
                             "--wait", "--server", address)  # fmt: skip
    assert code == 0 and out.splitlines()[-1] == "succeeded: published cli-facts version 2", err

    code, out, _ = run_cli(capsys, "facts", "ls", "cli-facts", "--server", address)
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:3] == ["ID", "PROMPT", "TARGET"]
    assert [row.split()[0] for row in rows] == ["fox", "sea"]
    code, out, _ = run_cli(capsys, "facts", "ls", "cli-facts@1", "--json", "--server", address)
    (fox,) = json.loads(out)
    assert fox["target"] == " village" and fox["entries"] and "heldout_positives" in fox

    code, out, err = run_cli(capsys, "generate", FOX["prompt"], "--facts", "cli-facts", "--trace",
                             "--max-new-tokens", "2", "--server", address)  # fmt: skip
    assert code == 0 and out.startswith(" village"), err
    assert "[trace:" in err and "cli-facts L" in err and "fox#0" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "The sky is"], "both --prompt and --target"),
        (["--positive", "x"], "describe the fact of --prompt"),
        ([], "no fact given"),
    ],
)
def test_facts_add_refuses_bad_input_before_calling_the_server(capsys, argv, message):
    code, _, err = run_cli(capsys, "facts", "add", "s", *argv, "--server", "127.0.0.1:1")
    assert code == 1 and message in err


def test_a_facts_file_with_a_bad_line_names_the_line(capsys, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FOX) + "\n{not json\n")
    code, _, err = run_cli(capsys, "facts", "add", "s", "--file", str(facts), "--server", "127.0.0.1:1")
    assert code == 1 and "line 2 is not JSON" in err


def test_build_facts_request_checks_its_arguments():
    request = build_facts_request("s", [FOX], {"alphas": [1.0, 2.0], "distance": "mixed", "holdout": None})
    assert list(request.config.alphas) == [1.0, 2.0] and request.config.distance == "mixed"
    assert not request.config.HasField("holdout")
    with pytest.raises(ValueError, match="unknown fields: colour"):
        build_facts_request("s", [{**FOX, "colour": "red"}])
    with pytest.raises(ValueError, match="a list of prompts"):
        build_facts_request("s", [{**FOX, "positive_prompts": "one string"}])
    with pytest.raises(ValueError, match="no target"):
        build_facts_request("s", [{"prompt": "x"}])
    with pytest.raises(ValueError, match="unknown local training options: epochs"):
        build_facts_request("s", [FOX], {"epochs": 3})


def test_the_server_refuses_bad_facts_and_the_async_client_registers(address):
    with Client(address) as client, pytest.raises(grpc.RpcError) as error:
        client.register_facts("s", [{"prompt": "x", "target": " y", "id": "bad id"}])
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "id" in error.value.details()

    async def register() -> str:
        async with AsyncClient(address) as client:
            job = await client.register_facts("async-facts", [FOX], config={**FAST, "extra_keys": 0})
            return [j async for j in client.watch_job(job.id)][-1].state

    assert asyncio.run(register()) == "succeeded"


def test_eval_facts_runs_on_the_server_and_writes_the_report(animals, address, capsys, tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", "facts", animals, "--out", str(out), "--continuation-tokens", "4"]
    code, printed, err = run_cli(capsys, *argv, "--server", address)
    assert code == 0, err
    assert printed.startswith(f"wrote {out / 'report.md'} and metrics.json; edit_success 1.000")
    assert "generalization" in printed and "locality_neighbours" in printed and "unrelated_text" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["edit_success"] == 1.0 and metrics["base_edit_success"] == 0.0
    assert [fact["id"] for fact in metrics["per_fact"]] == ["fox"]
    assert "| fox |" in (out / "report.md").read_text()

    argv = ["eval", "facts", f"{animals}@1", "--out", str(out), "--json"]
    code, printed, _ = run_cli(capsys, *argv, "--server", address)
    summary = json.loads(printed)
    assert code == 0 and sorted(summary["files"]) == ["metrics.json", "report.md"]
    assert summary["summary"]["edit_success"] == 1.0 and set(summary["summary"]) >= {"locality_unrelated"}
