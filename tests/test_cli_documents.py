"""Document banks from the CLI and the clients (`docs add`, `docs ls`, `generate --doc/--docrep/--mix`,
`register_documents`, the reference helpers), on a real server and Redis training real banks."""

from __future__ import annotations

import asyncio
import io
import json
import sys

import grpc
import pytest

from memserve.clients.cli import build_parser, main
from memserve.clients.cli.options import given_options
from memserve.clients.client import (
    DOCUMENT_CONFIG_FIELDS,
    AsyncClient,
    Client,
    build_documents_request,
    build_request,
    docrep_ref,
    document_ref,
    mix_ref,
)
from memserve.kinds.document.config import DocumentConfig
from memserve.v1 import memory_ref_pb2
from tests.test_server import ServerThread

PROMPT = "The"
FOX = "The quick brown fox jumps over the lazy dog. " * 5
SEA = "Once upon a time there was a small village by the sea. " * 5
# Small enough for the tiny Llama to train a bank in a moment.
FAST = {"epochs": 10, "window_words": 16, "window_stride": 8, "key_dim": 2}
FAST_OPTIONS = ("--epochs", "10", "--window-words", "16", "--window-stride", "8", "--key-dim", "2")
# Enough training that the two documents steer generation apart (as tests/test_document.py trains).
TRAINED = {**FAST, "epochs": 30, "learning_rate": 1e-2}


@pytest.fixture(scope="module")
def peer(store_server: ServerThread) -> ServerThread:
    return store_server


@pytest.fixture(scope="module")
def address(peer: ServerThread) -> str:
    return f"127.0.0.1:{peer.running.port}"


@pytest.fixture(scope="module")
def stories(address: str) -> str:
    """A bank with documents fox and sea, registered through the client."""
    with Client(address) as client:
        job = client.register_documents("stories", [("fox", FOX), {"id": "sea", "text": SEA}], config=TRAINED)
        assert (job.kind, job.memory_name, job.state) == ("document", "stories", "queued")
        final = list(client.watch_job(job.id))[-1]
    assert final.state == "succeeded", final.error
    return "stories"


@pytest.fixture(autouse=True)
def no_ambient_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSERVE_TENANT", raising=False)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs `memserve ARGV` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generated(capsys: pytest.CaptureFixture[str], address: str, *options: str) -> tuple[str, str]:
    """`memserve generate -v OPTIONS`: (the text, the verbose report)."""
    code, out, err = run_cli(
        capsys, "generate", "--server", address, "--max-new-tokens", "8", "-v", *options, PROMPT
    )
    assert code == 0, err
    return out, err


def test_docs_add_waits_for_the_bank_and_ls_lists_its_documents(address, capsys, tmp_path, monkeypatch):
    (tmp_path / "fox.txt").write_text("# The Fox\n" + FOX)
    (tmp_path / "sea.md").write_text(SEA)
    code, out, err = run_cli(
        capsys, "docs", "add", "cli-bank", str(tmp_path / "fox.txt"), str(tmp_path / "sea.md"),
        "--wait", *FAST_OPTIONS, "--server", address,
    )  # fmt: skip
    lines = out.splitlines()
    assert code == 0, err
    assert lines[0].startswith("job ") and lines[0].endswith("2 documents → cli-bank, queued")
    assert lines[-2].startswith("succeeded ")  # one line per update when not at a terminal
    assert lines[-1] == "succeeded: published cli-bank version 1"

    code, out, _ = run_cli(capsys, "docs", "ls", "cli-bank", "--server", address)
    header, *rows = out.splitlines()
    assert code == 0 and header.split() == ["ID", "TITLE", "WORDS", "DOCREP"]
    assert [row.split()[0] for row in rows] == ["fox", "sea"]
    assert rows[0].split()[1:4] == ["The", "Fox", str(len(FOX.split()))]  # the heading is not text
    assert rows[1].split()[1:3] == ["sea", str(len(SEA.split()))]  # no heading: the title is the id
    code, out, _ = run_cli(capsys, "docs", "ls", "cli-bank@1", "--json", "--server", address)
    listed = json.loads(out)
    assert [(d["id"], d["title"]) for d in listed] == [("fox", "The Fox"), ("sea", "sea")]
    assert all(len(d["docrep"]) == 2 and d["train_windows"] > 0 for d in listed)
    assert [d["words"] for d in listed] == [len(FOX.split()), len(SEA.split())]  # ints, not 45.0

    # A document from standard input, with its id and title given, adds a version over the others.
    monkeypatch.setattr(sys, "stdin", io.StringIO("The lazy dog sleeps by the sea. " * 4))
    code, out, err = run_cli(
        capsys, "docs", "add", "cli-bank", "-", "--id", "dog", "--title", "A dog", "--wait",
        *FAST_OPTIONS, "--epochs", "2", "--server", address,
    )  # fmt: skip
    assert code == 0 and out.splitlines()[-1] == "succeeded: published cli-bank version 2", err
    code, out, _ = run_cli(capsys, "docs", "ls", "cli-bank", "--json", "--server", address)
    assert [(d["id"], d["title"]) for d in json.loads(out)][2] == ("dog", "A dog")

    _, report = generated(capsys, address, "--doc", "cli-bank/fox")
    assert "[memory cli-bank document v2]" in report
    _, report = generated(capsys, address, "--doc", "cli-bank@1/fox")
    assert "[memory cli-bank document v1]" in report


def test_docs_add_refuses_bad_input_before_calling_the_server(capsys, tmp_path, monkeypatch):
    (tmp_path / "bad name.txt").write_text(FOX)
    (tmp_path / "a.txt").write_text(FOX)
    (tmp_path / "b.txt").write_text("# Only a title\n")
    offline = ("--server", "127.0.0.1:1")
    cases = [
        ([str(tmp_path / "bad name.txt")], "--id"),  # the id from the file name is not valid
        ([str(tmp_path / "a.txt"), "--id", ".x"], "document id '.x' is not valid"),
        ([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--id", "a"], "one --id per file"),
        ([str(tmp_path / "a.txt"), str(tmp_path / "a.txt")], "'a' is given twice"),
        ([str(tmp_path / "b.txt")], "has no text"),
        (["-"], "needs its id"),
        ([str(tmp_path / "missing.txt")], "No such file"),
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO(FOX))
    for files, expected in cases:
        code, _, err = run_cli(capsys, "docs", "add", "bank", *files, *offline)
        assert code == 1 and expected in err and err.count("\n") == 1, (files, err)
    code, _, err = run_cli(capsys, "docs", "add", "bad/bank", str(tmp_path / "a.txt"), *offline)
    assert code == 1 and "bank name 'bad/bank' is not valid" in err
    with pytest.raises(SystemExit) as exited:
        main(["docs", "add", "bank", str(tmp_path / "a.txt"), "--key-module", "cnn", *offline])
    assert exited.value.code == 2


def test_generate_uses_a_document_its_docrep_or_a_mix(stories, address, capsys):
    plain, _ = generated(capsys, address)
    fox, report = generated(capsys, address, "--doc", "stories/fox")
    sea, _ = generated(capsys, address, "--doc", "stories/sea")
    assert "[memory stories document v1]" in report
    assert fox != plain and fox != sea

    code, out, _ = run_cli(capsys, "docs", "ls", "stories", "--json", "--server", address)
    docrep = next(d["docrep"] for d in json.loads(out) if d["id"] == "fox")
    values = ",".join(map(repr, docrep))
    assert generated(capsys, address, "--docrep", f"stories={values}")[0] == fox
    assert generated(capsys, address, "--docrep", f"stories@1={values}")[0] == fox
    assert generated(capsys, address, "--mix", "stories/fox=1,stories/sea=0")[0] == fox
    _, report = generated(capsys, address, "--mix", "stories/fox=0.5,stories@1/sea=0.5")
    assert report.count("[memory stories document v1]") == 1
    # --doc, --docrep, --mix and --memory add to one list of references.
    _, report = generated(capsys, address, "--mix", "stories/sea=1", "--doc", "stories/fox")
    assert report.count("[memory stories document v1]") == 2

    code, _, err = run_cli(capsys, "generate", "--server", address, "--docrep", "stories=1,2,3", PROMPT)
    assert code == 1 and "INVALID_ARGUMENT" in err and "2 values" in err
    code, _, err = run_cli(capsys, "generate", "--server", address, "--doc", "stories/nope", PROMPT)
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = run_cli(capsys, "docs", "ls", "no-such-bank", "--server", address)
    assert code == 1 and "NOT_FOUND" in err


@pytest.mark.parametrize(
    ("option", "value", "form"),
    [
        ("--doc", "stories", "BANK/DOC"),
        ("--doc", "/fox", "BANK/DOC"),
        ("--doc", "stories/", "BANK/DOC"),
        ("--doc", "stories@x/fox", "BANK@VERSION/DOC"),
        ("--doc", "stories@0/fox", "BANK@VERSION/DOC"),
        ("--doc", "stories/a b", "BANK/DOC"),
        ("--docrep", "stories", "BANK=X,Y,..."),
        ("--docrep", "stories=", "BANK=X,Y,..."),
        ("--docrep", "stories=1,,2", "BANK=X,Y,..."),
        ("--docrep", "stories=1,nan", "BANK=X,Y,..."),
        ("--docrep", "=1,2", "BANK=X,Y,..."),
        ("--mix", "stories/fox", "BANK/DOC=WEIGHT"),
        ("--mix", "stories/fox=1,stories/sea", "BANK/DOC=WEIGHT"),
        ("--mix", "stories/fox=-1", "BANK/DOC=WEIGHT"),
        ("--mix", "stories/fox=x", "BANK/DOC=WEIGHT"),
        ("--mix", "stories/fox=0,stories/sea=0", "BANK/DOC=WEIGHT"),
        ("--mix", "stories/fox=1,other/sea=1", "one bank"),
        ("--mix", "stories@1/fox=1,stories@2/sea=1", "pin one"),
        ("--mix", "stories/fox=1,stories/fox=2", "twice"),
    ],
)
def test_a_bad_document_reference_is_a_usage_error(capsys, option, value, form):
    with pytest.raises(SystemExit) as exited:  # refused before any server is called
        main(["generate", "--server", "127.0.0.1:1", option, value, PROMPT])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"argument {option}" in err and form in err


def test_the_reference_helpers_build_memory_refs():
    ref = document_ref("bank", "doc")
    assert ref.document.bank == "bank" and ref.document.document_id == "doc"
    assert not ref.HasField("scale") and ref.version == 0
    ref = document_ref("bank", "doc", scale=0.5, version=3)
    assert ref.scale == 0.5 and ref.version == 3

    ref = docrep_ref("bank", [0.5, -1], version=2)
    assert ref.document.WhichOneof("key") == "docrep" and list(ref.document.docrep.values) == [0.5, -1.0]
    assert ref.version == 2 and not ref.HasField("scale")

    ref = mix_ref("bank", {"a": 0.7, "b": 0.3}, scale=0)
    parts = [(d.document_id, round(d.weight, 6)) for d in ref.document.mix.documents]
    assert parts == [("a", 0.7), ("b", 0.3)] and ref.HasField("scale") and ref.scale == 0
    assert mix_ref("bank", [("a", 1.0)]).document.mix.documents[0].document_id == "a"
    with pytest.raises(ValueError, match=">= 0"):
        mix_ref("bank", {"a": -1})
    with pytest.raises(ValueError, match="at least one"):
        mix_ref("bank", {})
    with pytest.raises(ValueError, match="at least one"):
        docrep_ref("bank", [])
    with pytest.raises(ValueError, match="version"):
        document_ref("bank", "doc", version=-1)

    request = build_request("x", memories=["plain@2", document_ref("bank", "doc")])
    assert [m.WhichOneof("target") for m in request.memories] == ["name", "document"]
    assert isinstance(request.memories[1], memory_ref_pb2.MemoryRef)


def test_register_documents_checks_its_arguments_before_sending():
    with Client("127.0.0.1:1") as client:  # nothing listens: every case fails before a call
        with pytest.raises(ValueError, match="bogus") as raised:
            client.register_documents("bank", [("a", "text")], config={"epochs": 3, "bogus": 1})
        assert "epochs" not in str(raised.value).split("(known")[0]
        with pytest.raises(ValueError, match="epochs"):
            client.register_documents("bank", [("a", "text")], config={"epochs": -1})
        with pytest.raises(ValueError, match="no text"):
            client.register_documents("bank", [{"id": "a"}])
        with pytest.raises(ValueError, match="unknown fields: body"):
            client.register_documents("bank", [{"id": "a", "body": "text"}])
        with pytest.raises(ValueError, match=r"\(id, text\)"):
            client.register_documents("bank", [("a", "text", "extra")])
    assert set(DOCUMENT_CONFIG_FIELDS) >= {"memory_dim", "key_dim", "holdout_windows", "seed", "loss"}


def test_the_async_client_registers_documents(address):
    async def scenario() -> None:
        async with AsyncClient(address) as client:
            with pytest.raises(grpc.RpcError) as refused:  # checked by the server, nothing trained
                await client.register_documents("async-bank", [("a", "   ")])
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "no text" in refused.value.details()
            with pytest.raises(ValueError, match="bogus"):
                await client.register_documents("async-bank", [("a", "text")], config={"bogus": 1})
            job = await client.register_documents(
                "async-bank", [{"id": "a", "title": "A", "text": FOX}],
                config={**FAST, "epochs": 2, "key_module": "linear", "seed": 7},
            )  # fmt: skip
            states = [update.state async for update in client.watch_job(job.id)]
            assert states[-1] == "succeeded"
            bank = await client.get_memory("async-bank")
            assert bank.details["documents"][0]["title"] == "A"
            assert bank.hyperparameters["epochs"] == 2 and bank.hyperparameters["seed"] == 7

    asyncio.run(scenario())


def test_a_docrep_chosen_by_the_client_is_kept(address):
    with Client(address) as client:
        job = client.register_documents(
            "chosen-bank", [{"id": "a", "text": FOX, "docrep": [0.5, -0.5]}], config={**FAST, "epochs": 2}
        )
        final = list(client.watch_job(job.id))[-1]
        assert final.state == "succeeded", final.error
        assert client.get_memory("chosen-bank").details["documents"][0]["docrep"] == [0.5, -0.5]


def test_eval_docs_runs_on_the_server_and_writes_the_report(stories, address, capsys, tmp_path):
    out = tmp_path / "eval"
    code, printed, err = run_cli(
        capsys, "eval", "docs", stories, "--out", str(out), "--grid", "2", "--server", address
    )
    assert code == 0, err
    assert printed.startswith(f"wrote {out / 'report.md'} and ") and "metrics.json" in printed
    assert "nearest-other/own perplexity" in printed and printed.count("\n") == 1
    assert "unrelated text ×" in printed  # the figure a bank is weakest on, in the line
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["documents"]) == {"fox", "sea"}
    assert (metrics["bank"], metrics["version"]) == ("stories", 1)
    assert "| fox |" in (out / "report.md").read_text()
    assert (out / "ppl_landscape.png").stat().st_size > 1000
    assert "100%" in err  # the progress bar, on stderr

    again = ["eval", "docs", f"{stories}@1", "--out", str(tmp_path / "again"), "--grid", "2", "--json"]
    code, printed, _ = run_cli(capsys, *again, "--server", address)
    summary = json.loads(printed)
    assert code == 0 and {"report.md", "metrics.json"} <= set(summary["files"])
    assert summary["out"] == str(tmp_path / "again")
    assert summary["summary"]["identification_accuracy_min"] >= 0
    assert summary["summary"]["unrelated_ppl_ratio"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["docs", "no-such-bank"], "NOT_FOUND: "),
        (["facts", "stories"], "INVALID_ARGUMENT: 'stories' is a document memory, not a local memory"),
        (["docs", "stories", "--model", "other"], "--dtype, --device, --weights and --cache-dir go with"),
    ],
)
def test_a_refused_eval_is_one_line(stories, address, capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, "eval", *argv, "--out", str(tmp_path), "--server", address)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.splitlines()[-1].startswith("memserve: error: ") and message in err.splitlines()[-1]


def test_only_the_training_flags_given_are_sent(peer, address, capsys, tmp_path):
    (tmp_path / "a.txt").write_text(FOX)
    options = [*FAST_OPTIONS, "--key-module", "mlp", "--json", "--server", address]
    code, out, err = run_cli(capsys, "docs", "add", "sent-bank", str(tmp_path / "a.txt"), *options)
    assert code == 0, err
    job = json.loads(out)
    assert (job["memory_name"], job["state"]) == ("sent-bank", "queued")
    spec = peer.running.runtime.queue.get(job["id"]).spec
    assert spec["config"] == {**FAST, "key_module": "mlp"}
    with Client(address) as client:
        client.cancel_job(job["id"])

    args = build_parser().parse_args(["docs", "add", "bank", "a.txt", "--epochs", "3", "--key-module", "mlp"])
    request = build_documents_request("bank", [("a", "text")], given_options(args, DocumentConfig))
    assert [field.name for field, _ in request.config.ListFields()] == ["key_module", "epochs"]


def test_docs_ls_shows_the_first_values_of_a_long_docrep_and_json_has_them_all():
    from memserve.clients.cli.docs import _row

    short = _row({"id": "a", "title": "A", "words": 3, "docrep": [0.5, -0.25]})
    assert short == ("a", "A", "3", "0.5,-0.25")
    long = _row({"id": "b", "title": "", "words": 9, "docrep": [0.1 * i for i in range(16)]})
    assert long[1] == "-" and long[3] == "0,0.1,0.2,… (16 values)"
