"""The memory and job commands of the CLI, and the client methods under them, on a real server and Redis."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from importlib import metadata

import pytest

import tests.kinds  # noqa: F401  (registers the test-bias kind in this process, where the server runs)
from memserve.clients.cli import build_parser, main
from memserve.clients.cli.options import given_options
from memserve.clients.client import (
    UPLOAD_CHUNK_BYTES,
    AsyncClient,
    Client,
    _byte_chunks,
    build_facts_request,
    parse_memory_version,
)
from memserve.kinds.adapter.config import AdapterConfig, FactualityOptions
from memserve.kinds.document.config import DocumentConfig, DocumentEvalOptions
from memserve.kinds.local.config import LocalConfig, LocalEvalOptions
from memserve.memory.options import describe
from tests.conftest import wait_until
from tests.test_server import ServerThread
from tests.test_server_store import publish_bias

PROMPT = "Once upon a time"
QUICK_JOB = {"steps": 5, "step_seconds": 0.05, "layer": 1}
LONG_JOB = {"steps": 200, "step_seconds": 0.05, "layer": 1}


@pytest.fixture(scope="module")
def peer(store_server: ServerThread) -> ServerThread:
    return store_server


@pytest.fixture
def address(peer: ServerThread) -> str:
    return f"127.0.0.1:{peer.running.port}"


@pytest.fixture(autouse=True)
def no_ambient_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSERVE_TENANT", raising=False)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs `memserve ARGV` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what earlier steps printed
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class Terminal(io.StringIO):
    """Standard input as a person at a terminal would give it."""

    def isatty(self) -> bool:
        return True


def generated_with(capsys: pytest.CaptureFixture[str], address: str, *memories: str) -> tuple[str, str]:
    """`memserve generate -v` with these memories: (the text, the verbose report)."""
    options = [option for memory in memories for option in ("--memory", memory)]
    code, out, err = run_cli(
        capsys, "generate", "--server", address, "--max-new-tokens", "8", "-v", *options, PROMPT
    )
    assert code == 0, err
    return out, err


def test_export_rm_import_round_trip_gives_the_same_generation(peer, address, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    publish_bias(peer.running, "round-trip", seed=3)
    plain, _ = generated_with(capsys, address)
    before, report = generated_with(capsys, address, "round-trip")
    assert before != plain
    assert "[memory round-trip test-bias v1]" in report

    code, out, _ = run_cli(capsys, "memories", "ls", "--server", address, "--prefix", "round")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "KIND", "VERSION", "SIZE", "CREATED", "BASE"]
    assert row.split()[:3] == ["round-trip", "test-bias", "1"]
    assert row.split()[-1] == peer.running.runtime.cache.fingerprint[:12]

    code, out, _ = run_cli(capsys, "memories", "show", "round-trip", "--server", address)
    assert code == 0 and "kind:" in out and "versions:" in out and '"layer": 1' in out

    code, out, _ = run_cli(capsys, "memories", "export", "round-trip", "--server", address)
    exported = tmp_path / "round-trip-v1.safetensors"
    assert code == 0 and exported.is_file()
    assert out.startswith(str(exported.name)) and f"{exported.stat().st_size} bytes" in out
    code, _, err = run_cli(capsys, "memories", "export", "round-trip", "--server", address)
    assert code == 1 and "--force" in err
    assert run_cli(capsys, "memories", "export", "round-trip@1", "--server", address, "--force")[0] == 0
    assert not list(tmp_path.glob("*.part"))

    code, out, _ = run_cli(capsys, "memories", "rm", "round-trip", "-y", "--server", address)
    assert code == 0 and "deleted 1 version of round-trip" in out
    code, _, err = run_cli(capsys, "memories", "show", "round-trip", "--server", address)
    assert code == 1 and "error: NOT_FOUND" in err
    code, _, err = run_cli(capsys, "generate", "--server", address, "--memory", "round-trip", PROMPT)
    assert code == 1 and "error: NOT_FOUND" in err

    code, out, _ = run_cli(capsys, "memories", "import", str(exported), "--server", address)
    assert code == 0 and out.startswith("imported round-trip version ")
    after, _ = generated_with(capsys, address, "round-trip")
    assert after == before


def test_an_import_can_rename_and_a_pinned_version_is_used(peer, address, capsys, tmp_path):
    publish_bias(peer.running, "pinned", seed=1)
    first, _ = generated_with(capsys, address, "pinned")
    with Client(address) as client:
        client.export_memory_to("pinned", tmp_path / "pinned.safetensors")
        assert client.get_memory("pinned").size_bytes > 0
    publish_bias(peer.running, "pinned", seed=2)
    second, report = generated_with(capsys, address, "pinned")
    assert second != first and "[memory pinned test-bias v2]" in report
    pinned, report = generated_with(capsys, address, "pinned@1")
    assert pinned == first and "[memory pinned test-bias v1]" in report

    code, out, _ = run_cli(
        capsys,
        "memories",
        "import",
        str(tmp_path / "pinned.safetensors"),
        "--name",
        "renamed",
        "--server",
        address,
    )
    assert code == 0 and out.startswith("imported renamed version 1 (test-bias")
    assert generated_with(capsys, address, "renamed")[0] == first


def test_json_outputs_parse(peer, address, capsys):
    publish_bias(peer.running, "json-a")
    publish_bias(peer.running, "json-b")
    publish_bias(peer.running, "json-b", seed=5)

    code, out, _ = run_cli(capsys, "memories", "ls", "--json", "--prefix", "json-", "--server", address)
    listed = json.loads(out)
    assert code == 0 and sorted((m["name"], m["version"]) for m in listed) == [("json-a", 1), ("json-b", 2)]
    assert all(m["kind"] == "test-bias" and m["created_at"].endswith("+00:00") for m in listed)

    code, out, _ = run_cli(capsys, "memories", "show", "json-b@1", "--json", "--server", address)
    shown = json.loads(out)
    assert code == 0 and shown["version"] == 1 and shown["versions"] == [1, 2]
    assert shown["hyperparameters"] == {"layer": 1} and shown["tenant"] == "default"
    code, out, _ = run_cli(capsys, "memories", "ls", "--json", "--kind", "no-such-kind", "--server", address)
    assert code == 0 and json.loads(out) == []


def test_rm_asks_at_a_terminal_and_needs_yes_elsewhere(peer, address, capsys, monkeypatch):
    publish_bias(peer.running, "doomed")
    publish_bias(peer.running, "doomed", seed=1)

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run_cli(capsys, "memories", "rm", "doomed", "--server", address)
    assert code == 1 and "not a terminal" in err and "-y" in err

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code, out, err = run_cli(capsys, "memories", "rm", "doomed", "--server", address)
    assert code == 1 and "delete doomed versions 1, 2?" in out and "nothing deleted" in err
    with Client(address) as client:
        assert client.get_memory("doomed").versions == [1, 2]

    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    code, out, _ = run_cli(capsys, "memories", "rm", "doomed@1", "--server", address)
    assert code == 0 and "deleted 1 version of doomed" in out
    code, out, _ = run_cli(capsys, "memories", "rm", "doomed", "-y", "--server", address)
    assert code == 0 and "deleted 1 version of doomed" in out


@pytest.mark.parametrize("text", ["name@", "name@x", "name@0", "name@-1", "@3", "name@1@2"])
def test_a_bad_version_is_a_usage_error(capsys, text):
    with pytest.raises(SystemExit) as exited:  # refused before any server is called
        main(["memories", "show", text, "--server", "127.0.0.1:1"])
    assert exited.value.code == 2 and "NAME@VERSION" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NAME"):
        parse_memory_version(text)


def test_parse_memory_version():
    assert parse_memory_version("a.b-c_1") == ("a.b-c_1", 0)
    assert parse_memory_version("bank@12") == ("bank", 12)


def test_a_job_is_watched_to_success_and_listed(peer, address, capsys):
    with Client(address) as client:
        job = client.submit_job("test-bias", "m", QUICK_JOB)
    assert job.state == "queued" and job.memory_name == "m" and job.kind == "test-bias"

    code, out, _ = run_cli(capsys, "jobs", "watch", job.id, "--server", address)
    lines = out.splitlines()
    assert code == 0 and lines[-1] == "succeeded: published m version 1"
    assert lines[-2].startswith("succeeded 5/5 loss 0.2")  # one line per update, the final one included

    code, out, _ = run_cli(capsys, "jobs", "ls", "--server", address)
    row = next(line.split() for line in out.splitlines() if line.startswith(job.id))
    assert out.split()[:6] == ["ID", "KIND", "MEMORY", "STATE", "PROGRESS", "CREATED"]
    assert row[1:5] == ["test-bias", "m", "succeeded", "5/5"]
    code, out, _ = run_cli(capsys, "jobs", "ls", "--state", "succeeded", "--json", "--server", address)
    assert job.id in [listed["id"] for listed in json.loads(out)]
    code, out, _ = run_cli(capsys, "jobs", "ls", "--state", "failed", "--server", address)
    assert job.id not in out

    code, out, _ = run_cli(capsys, "jobs", "show", job.id, "--json", "--server", address)
    shown = json.loads(out)
    assert shown["state"] == "succeeded" and shown["result_version"] == 1 and shown["step"] == 5
    code, out, _ = run_cli(capsys, "jobs", "show", job.id, "--server", address)
    assert "state:" in out and "succeeded" in out and "result version: 1" in out
    assert "[memory m test-bias v1]" in generated_with(capsys, address, "m")[1]
    code, out, _ = run_cli(capsys, "jobs", "cancel", job.id, "--server", address)
    assert code == 0 and out.strip() == f"job {job.id} already succeeded: nothing to cancel"


def test_watch_on_a_terminal_draws_a_bar(address, capsys, monkeypatch):
    with Client(address) as client:
        job = client.submit_job("test-bias", "bar", QUICK_JOB)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run_cli(capsys, "jobs", "watch", job.id, "--server", address)
    assert code == 0 and "5/5" in out and "|" in out and "\r" in out
    assert out.rstrip().endswith("succeeded: published bar version 1")


def test_a_cancelled_job_ends_cancelled_and_its_watch_fails(address, capsys):
    with Client(address) as client:
        job = client.submit_job("test-bias", "long", LONG_JOB)
        wait_until(lambda: client.get_job(job.id).state == "running", timeout=10)
        code, out, _ = run_cli(capsys, "jobs", "cancel", job.id, "--server", address)
        assert code == 0 and "cancellation requested" in out
        code, out, _ = run_cli(capsys, "jobs", "watch", job.id, "--server", address)
        assert code == 1 and out.splitlines()[-1] == "cancelled"
        assert client.get_job(job.id).finished_at is not None
    code, out, _ = run_cli(capsys, "jobs", "cancel", job.id, "--server", address)
    assert code == 0 and out.strip() == f"job {job.id}: cancelled"


def test_a_failed_job_reports_its_error(address, capsys):
    with Client(address) as client:
        job = client.submit_job("test-bias", "broken", {"steps": 3, "fail_at": 1})
    code, out, _ = run_cli(capsys, "jobs", "watch", job.id, "--server", address)
    assert code == 1 and out.splitlines()[-1].startswith("failed: ") and "failing at step 1" in out


def test_tenants_see_only_their_own_memories_and_jobs(peer, address, capsys, tmp_path, monkeypatch):
    publish_bias(peer.running, "shared-name")
    with Client(address) as default_client:
        exported = default_client.export_memory("shared-name")
        job = default_client.submit_job("test-bias", "tenant-job", {"steps": 1})
    (tmp_path / "private.safetensors").write_bytes(exported)

    code, out, _ = run_cli(
        capsys, "memories", "import", str(tmp_path / "private.safetensors"), "--name", "private",
        "--tenant", "a", "--server", address,
    )  # fmt: skip
    assert code == 0 and "imported private version 1" in out
    code, out, _ = run_cli(capsys, "memories", "ls", "--tenant", "b", "--server", address)
    assert code == 0 and "private" not in out
    code, out, _ = run_cli(capsys, "memories", "ls", "--tenant", "a", "--server", address)
    assert "private" in out and "shared-name" not in out
    code, _, err = run_cli(capsys, "memories", "show", "private", "--tenant", "b", "--server", address)
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = run_cli(capsys, "jobs", "show", job.id, "--tenant", "b", "--server", address)
    assert code == 1 and "NOT_FOUND" in err

    monkeypatch.setenv("MEMSERVE_TENANT", "a")  # the default of --tenant and of the clients
    code, out, _ = run_cli(capsys, "memories", "show", "private", "--json", "--server", address)
    assert json.loads(out)["tenant"] == "a"
    with Client(address) as client:
        assert client.tenant == "a"
        used = client.generate(PROMPT, max_new_tokens=2, memories=["private@1"]).memories
        assert used == [("private", "test-bias", 1)]
        assert [m.name for m in client.list_memories()] == ["private"]
    with Client(address, tenant="b") as client:
        assert client.list_memories() == [] and client.list_jobs() == []


def test_the_async_client_covers_the_same_calls(peer, address, tmp_path):
    publish_bias(peer.running, "async-source")

    async def scenario() -> None:
        async with AsyncClient(address, tenant="async") as client:
            with Client(address) as default_client:
                source = default_client.export_memory("async-source")
            put = await client.put_memory(source, name="async-mem")
            assert (put.name, put.version, put.tenant) == ("async-mem", 1, "async")
            assert (await client.get_memory("async-mem")).sha256 == put.sha256
            assert [m.name for m in await client.list_memories(prefix="async-")] == ["async-mem"]
            path = tmp_path / "async.safetensors"
            assert await client.export_memory_to("async-mem", path) == path.stat().st_size > 0
            assert (await client.import_memory(path)).version == 2
            chunks = [
                c async for c in client.generate_stream(PROMPT, max_new_tokens=2, memories=["async-mem@1"])
            ]
            assert chunks[0].memories == [("async-mem", "test-bias", 1)] and not chunks[-1].memories
            assert await client.delete_memory("async-mem") == 2

            job = await client.submit_job("test-bias", "async-job", {"steps": 2})
            states = [update.state async for update in client.watch_job(job.id)]
            assert states[-1] == "succeeded"
            assert (await client.get_job(job.id)).result_version == 1
            assert [j.id for j in await client.list_jobs(kind="test-bias")] == [job.id]
            assert (await client.cancel_job(job.id)).state == "succeeded"  # too late: stays succeeded

    asyncio.run(scenario())


def test_uploads_go_in_1_mib_chunks_and_only_the_first_names_the_memory():
    pieces = list(_byte_chunks(b"x" * (2 * UPLOAD_CHUNK_BYTES + 5), "name"))
    assert [len(p.data) for p in pieces] == [UPLOAD_CHUNK_BYTES, UPLOAD_CHUNK_BYTES, 5]
    assert [p.name for p in pieces] == ["name", "", ""]
    assert [p.name for p in _byte_chunks(b"", "name")] == ["name"]  # the server says what is missing


def test_put_memory_publishes_a_new_version_under_the_given_name(peer, address):
    publish_bias(peer.running, "original")
    with Client(address) as client:
        copy = client.put_memory(client.export_memory("original"), name="copy")
        assert (copy.name, copy.version, copy.versions) == ("copy", 1, [1])
        assert copy.sha256 == client.get_memory("original").sha256
        # The same file again (a retry) returns the version it made; other content is a new one.
        assert client.put_memory(client.export_memory("original"), name="copy").versions == [1]
        publish_bias(peer.running, "original", seed=1)
        assert client.put_memory(client.export_memory("original"), name="copy").versions == [1, 2]


def test_jobs_submit_waits_for_the_memory_and_checks_its_spec(peer, address, capsys, tmp_path):
    spec = json.dumps({**QUICK_JOB, "seed": 11})
    code, out, _ = run_cli(capsys, "jobs", "submit", "test-bias", "submitted", "--spec", spec, "--wait",
                           "--server", address)  # fmt: skip
    assert code == 0 and out.splitlines()[-1] == "succeeded: published submitted version 1"
    assert out.splitlines()[0].endswith("test-bias → submitted, queued")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"steps": 1, "layer": 1}))
    code, out, _ = run_cli(capsys, "jobs", "submit", "test-bias", "submitted", "--spec-file", str(spec_file),
                           "--server", address)  # fmt: skip
    assert code == 0 and "queued" in out
    code, _, err = run_cli(capsys, "jobs", "submit", "test-bias", "x", "--spec", "[1]", "--server", address)
    assert code == 1 and "JSON object" in err
    code, _, err = run_cli(capsys, "jobs", "submit", "test-bias", "x", "--spec", '{"bogus": 1}',
                           "--server", address)  # fmt: skip
    assert code == 1 and "INVALID_ARGUMENT" in err and "bogus" in err
    code, _, err = run_cli(capsys, "jobs", "submit", "adapter", "x", "--server", address)
    assert code == 1 and "INVALID_ARGUMENT" in err and "documents, templates" in err


def one_line_error(err: str) -> str:
    """The error line of a command that failed as expected: one line, no traceback."""
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("memserve: error: "), err
    return err.strip()


def test_an_expected_error_is_one_line_and_exit_code_1(address, capsys):
    code, out, err = run_cli(capsys, "memories", "show", "no-such-memory", "--server", address)
    assert code == 1 and out == ""
    assert one_line_error(err).startswith("memserve: error: NOT_FOUND: ") and "no-such-memory" in err
    code, _, err = run_cli(capsys, "generate", "--server", address, "--memory", "no-such-memory", PROMPT)
    assert code == 1 and "NOT_FOUND" in one_line_error(err)
    code, _, err = run_cli(capsys, "memories", "import", "/nonexistent/file.safetensors", "--server", address)
    assert code == 1 and "No such file" in one_line_error(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["memories", "ls"],
        ["info"],
        ["jobs", "ls", "--json"],
        ["generate", "hello"],
        ["eval", "docs", "bank", "--out", "unused"],
    ],
)
def test_no_server_is_one_line_that_says_how_to_start_one(capsys, argv):
    code, out, err = run_cli(capsys, *argv, "--server", "127.0.0.1:1")
    assert code == 1 and out == ""
    assert one_line_error(err) == (
        "memserve: error: no memserve server at 127.0.0.1:1; start one with `make serve` or pass --server"
    )


def test_no_server_names_the_address_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("MEMSERVE_SERVER", "127.0.0.1:1")
    code, _, err = run_cli(capsys, "jobs", "show", "0" * 18)
    assert code == 1 and "no memserve server at 127.0.0.1:1;" in one_line_error(err)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["memories", "show"],  # NAME is missing
        ["memories", "frobnicate"],
        ["jobs", "ls", "--state", "sleeping"],
        ["generate", "--max-new-tokens", "many", "hello"],
        ["docs", "add", "bank", "f.txt", "--memory-dim", "0"],  # out of the option's range
    ],
)
def test_a_usage_error_exits_2(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--server", "127.0.0.1:1"] if argv else [])
    assert exited.value.code == 2 and "usage: memserve" in capsys.readouterr().err


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"memserve {metadata.version('memserve')}\n"


def test_json_on_every_command_that_prints_data(peer, address, capsys):
    publish_bias(peer.running, "json-c")
    code, out, _ = run_cli(capsys, "info", "--json", "--server", address)
    info = json.loads(out)
    assert code == 0 and info["architecture"] == "LlamaForCausalLM" and "test-bias" in info["memory_kinds"]
    generate = ["generate", "--json", "--max-new-tokens", "3", "--memory", "json-c", "--server", address]
    code, out, _ = run_cli(capsys, *generate, PROMPT)
    completion = json.loads(out)
    assert code == 0 and completion["generated_tokens"] == len(completion["tokens"]) == 3
    assert completion["memories"] == [{"name": "json-c", "kind": "test-bias", "version": 1}]
    code, out, _ = run_cli(capsys, *generate, "--stream", PROMPT)
    chunks = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and chunks[0]["seed"] is not None and chunks[-1]["finish_reason"] == "length"
    assert "".join(c["text"] for c in chunks) == completion["text"]

    with Client(address) as client:
        job = client.submit_job("test-bias", "json-job", QUICK_JOB)
    code, out, _ = run_cli(capsys, "jobs", "watch", job.id, "--json", "--server", address)
    updates = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and updates[-1]["state"] == "succeeded" and updates[-1]["result_version"] == 1
    code, out, _ = run_cli(capsys, "jobs", "cancel", job.id, "--json", "--server", address)
    assert code == 0 and json.loads(out)["state"] == "succeeded"
    code, out, _ = run_cli(capsys, "memories", "rm", "json-job", "-y", "--json", "--server", address)
    assert code == 0 and json.loads(out) == {"name": "json-job", "version": 0, "deleted": 1}


def test_info_is_aligned_name_value_lines(address, capsys):
    code, out, _ = run_cli(capsys, "info", "--server", address)
    lines = {label: value.strip() for label, value in (line.split(":", 1) for line in out.splitlines())}
    assert code == 0 and lines["architecture"] == "LlamaForCausalLM"
    assert lines["max new tokens limit"] == "2000"
    assert "document" in lines["memory kinds"].split(", ")  # a list, joined
    starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in out.splitlines()}
    assert len(starts) == 1  # every value starts in the same column


def test_the_command_line_imports_no_torch():
    code = (
        "import sys\n"
        "from memserve.clients.cli import build_parser, main\n"
        "build_parser().parse_args(['eval', 'factuality', '--claims', 'c.jsonl', '--out', 'o'])\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "required", "options"),
    [
        (["docs", "add"], ["bank", "f.txt"], DocumentConfig),
        (["facts", "add"], ["set"], LocalConfig),
        (["adapters", "add"], ["name"], AdapterConfig),
        (["eval", "docs"], ["bank", "--out", "o"], DocumentEvalOptions),
        (["eval", "facts"], ["set", "--out", "o"], LocalEvalOptions),
        (["eval", "factuality"], ["--claims", "c.jsonl", "--out", "o"], FactualityOptions),
    ],
)
def test_each_option_has_a_flag_whose_help_is_its_line_with_its_default(
    capsys, monkeypatch, argv, required, options
):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: the help text as written
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    lines = capsys.readouterr().out.splitlines()
    for info in describe(options):
        flag = "--" + info.name.replace("_", "-")
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
        entry = " ".join(lines[at : at + 2])  # a long flag has its help on the next line
        assert info.describe() in entry and "Default: " in entry, entry
    parsed = vars(build_parser().parse_args([*argv, *required]))
    assert all(parsed[info.name] is None for info in describe(options))  # no default of the CLI's own


def test_flags_not_given_are_none_and_list_flags_take_several_values():
    args = build_parser().parse_args(
        [
            "facts",
            "add",
            "s",
            "--alphas",
            "0.5",
            "1,2",
            "--alphas",
            "4",
            "1",
            "--layers",
            "0..2",
            "--sites",
            "mlp_down",
        ]
    )
    given = given_options(args, LocalConfig)
    assert given == {"layers": [0, 1, 2], "sites": ["mlp_down"], "alphas": [0.5, 1.0, 2.0, 4.0]}
    request = build_facts_request("s", [{"prompt": "p", "target": " t"}], given)
    assert [field.name for field, _ in request.config.ListFields()] == ["layers", "sites", "alphas"]
    args = build_parser().parse_args(["eval", "factuality", "--claims", "c", "--out", "o", "--shots", "0..2"])
    assert given_options(args, FactualityOptions) == {"shots": [0, 1, 2]}  # no seed: the server's default
    args = build_parser().parse_args(["eval", "factuality", "--claims", "c", "--out", "o", "--shots", "0,3"])
    assert args.shots == [0, 3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["facts", "add", "s", "--sites", "attn_out,mlp_up"], "'mlp_up' is not one of attn_out, mlp_down"),
        (["facts", "add", "s", "--alphas", "nan"], "'nan' is not a finite number"),
        (["eval", "factuality", "--claims", "c", "--out", "o", "--shots", "9"], "shots takes values from 0"),
        (["docs", "add", "b", "f", "--key-module", "cnn"], "invalid choice: 'cnn'"),
        (["adapters", "add", "a", "--epochs", "1.5"], "invalid int value: '1.5'"),
    ],
)
def test_a_generated_flag_refuses_a_bad_value_as_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err
