"""The `memserve` command line. It calls the client (or, for `serve`, starts the server)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from memserve.clients.client import (
    DEFAULT_SERVER,
    JOB_STATES,
    MAX_VERSION,
    Client,
    Completion,
    JobInfo,
    TokenInfo,
    adapter_ref,
    default_server,
    docrep_ref,
    document_ref,
    local_ref,
    mix_ref,
    parse_memory_version,
)
from memserve.jsonl import json_objects
from memserve.names import NAME_PATTERN, check_name
from memserve.v1 import memory_ref_pb2


def _computing_process(args: argparse.Namespace) -> None:
    """Before torch is imported: one OpenMP team, owned by the engine or a training job."""
    from memserve.engine.threads import THREADS_ENV, one_team_per_process

    if args.threads:
        os.environ[THREADS_ENV] = str(args.threads)
    one_team_per_process()


def _serve(args: argparse.Namespace) -> int:
    _computing_process(args)
    # A token file or a Kubernetes Secret made with --from-file usually ends with a newline.
    token = os.environ.get("MEMSERVE_TOKEN", "").strip() or None
    # Imported here: the client commands must not pay for loading torch.
    from memserve.api.app import ServerConfig, serve
    from memserve.engine.scheduler import EngineConfig
    from memserve.memory.runtime import StoreConfig
    from memserve.models import ModelConfig

    config = ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port == 0 else args.metrics_port,
        metrics_max_memory_labels=args.metrics_max_memories,
        auth_token=token,
        store=StoreConfig(
            redis_url=args.redis_url,
            data_dir=args.data_dir,
            cache_bytes=args.cache_mb << 20,
            workers=args.workers,
            plugins=tuple(args.plugin),
        ),
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir),
        engine=EngineConfig(
            max_batch_size=args.max_batch_size,
            max_queue_size=args.max_queue_size,
            default_max_new_tokens=args.default_max_new_tokens,
            max_new_tokens_limit=args.max_new_tokens_limit,
            max_context_tokens=args.max_context_tokens,
            max_prefill_tokens=args.max_prefill_tokens,
        ),
    )
    asyncio.run(serve(config))
    return 0


def _worker(args: argparse.Namespace) -> int:
    _computing_process(args)
    from memserve.models import ModelConfig
    from memserve.training.worker import WorkerConfig, run_worker

    if not args.redis_url:
        raise ValueError(
            "a standalone worker needs --redis-url (or $MEMSERVE_REDIS_URL); "
            "a server on the embedded Redis runs its own worker"
        )
    run_worker(
        args.redis_url,
        ModelConfig(model=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir),
        WorkerConfig(
            heartbeat_interval=args.heartbeat_interval,
            claim_idle=args.claim_idle,
            max_attempts=args.max_attempts,
        ),
        plugins=tuple(args.plugin),
        metrics_port=None if args.metrics_port == 0 else args.metrics_port,
        metrics_host=args.metrics_host,
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    # A prompt piped in ends with the newline of its last line, which is not part of it.
    prompt = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "chat": args.chat,
        "memories": args.memories,  # --memory, --doc, --docrep, --mix and --facts, in the order given
        "memory_trace": args.trace,
    }
    tokens: list[TokenInfo] = []
    with _client(args) as client:
        if args.stream:
            seed = None
            used: Sequence[tuple[str, str, int]] = []
            for chunk in client.generate_stream(prompt, **options):
                print(chunk.text, end="", flush=True)
                tokens += chunk.tokens
                if seed is None:  # the first chunk carries the seed and the memories used
                    seed, used = chunk.seed, chunk.memories
                finish = chunk
            print()
            summary = (finish.finish_reason, finish.prompt_tokens, finish.generated_tokens, seed)
        else:
            completion: Completion = client.generate(prompt, **options)
            print(completion.text)
            tokens = completion.tokens
            used = completion.memories
            summary = (
                completion.finish_reason,
                completion.prompt_tokens,
                completion.generated_tokens,
                completion.seed,
            )
    if args.trace:
        _print_trace(tokens)
    if args.verbose:
        for name, kind, version in used:
            print(f"[memory {name} {kind} v{version}]", file=sys.stderr)
        reason, prompt_tokens, generated, seed = summary
        print(
            f"[{reason}; {prompt_tokens} prompt + {generated} generated tokens; seed {seed}]", file=sys.stderr
        )
    return 0


def _print_trace(tokens: Sequence[TokenInfo]) -> None:
    """Which memory acted on the position that produced each token, and how strongly (stderr)."""
    print("[trace: token, then each memory that acted on it: name, layer, entry, value]", file=sys.stderr)
    for index, token in enumerate(tokens):
        acted = "; ".join(f"{t.memory} L{t.layer} {t.entry} {t.value:.3f}" for t in token.trace) or "-"
        print(f"{index:>4} {token.text!r:<16} {acted}", file=sys.stderr)


def _info(args: argparse.Namespace) -> int:
    with Client(args.server) as client:
        info = client.model_info()
    for name, value in info.to_dict().items():
        print(f"{name}: {', '.join(value) if isinstance(value, list) else value}")
    return 0


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, tenant=args.tenant)


# --- memories ---


def _memories_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        memories = client.list_memories(kind=args.kind, prefix=args.prefix)
    if args.json:
        for memory in memories:
            print(json.dumps(memory.to_dict()))
        return 0
    if not memories:
        print("no memories", file=sys.stderr)
        return 0
    _print_table(
        ("NAME", "KIND", "VERSION", "SIZE", "CREATED", "BASE"),
        (
            (m.name, m.kind, str(m.version), _size(m.size_bytes), _when(m.created_at), m.base_model[:12])
            for m in memories
        ),
    )
    return 0


def _memories_show(args: argparse.Namespace) -> int:
    name, version = args.memory
    with _client(args) as client:
        memory = client.get_memory(name, version)
    if args.json:
        print(json.dumps(memory.to_dict(), indent=2))
        return 0
    _print_fields(
        [
            ("name", memory.name),
            ("kind", memory.kind),
            ("version", memory.version),
            ("versions", ", ".join(map(str, memory.versions))),
            ("tenant", memory.tenant),
            ("base model", memory.base_model),
            ("sha256", memory.sha256),
            ("size", f"{_size(memory.size_bytes)} ({memory.size_bytes} bytes)"),
            ("created", _when(memory.created_at)),
            ("source job", memory.source_job or "-"),
        ],
        [
            ("hyperparameters", memory.hyperparameters),
            ("metrics", memory.metrics),
            ("details", memory.details),
        ],
    )
    return 0


def _memories_rm(args: argparse.Namespace) -> int:
    name, version = args.memory
    what = f"version {version} of {name}" if version else f"{name} (every version)"
    with _client(args) as client:
        if not args.yes:
            if not sys.stdin.isatty():
                raise ValueError(
                    f"not deleting {what}: standard input is not a terminal, so nobody can confirm; "
                    "pass -y to delete without asking"
                )
            # Asking about a memory that does not exist would be pointless: NOT_FOUND comes first.
            versions = client.get_memory(name, version).versions
            listed = f"version {version}" if version else f"versions {', '.join(map(str, versions))}"
            answer = input(f"delete {name} {listed}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=sys.stderr)
                return 1
        deleted = client.delete_memory(name, version)
    print(f"deleted {deleted} version{'' if deleted == 1 else 's'} of {name}")
    return 0


def _memories_export(args: argparse.Namespace) -> int:
    name, version = args.memory
    with _client(args) as client:
        # Resolved first: a missing memory fails before any file is touched, and the export is
        # pinned to the version the default file name says even if a new one lands meanwhile.
        version = client.get_memory(name, version).version
        path: Path = args.output or Path(f"{name}-v{version}.safetensors")
        if path.exists() and not args.force:
            raise ValueError(f"{path} already exists: pass --force to overwrite it, or -o another file")
        size = client.export_memory_to(name, path, version)
    print(f"{path} ({_size(size)}, {size} bytes)")
    return 0


def _memories_import(args: argparse.Namespace) -> int:
    with _client(args) as client:
        memory = client.import_memory(args.file, name=args.name or "")
    print(f"imported {memory.name} version {memory.version} ({memory.kind}, {_size(memory.size_bytes)})")
    return 0


# --- documents ---

HEADING = "# "
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
DOCUMENT_COUNTS = frozenset({"words", "train_windows", "holdout_windows"})
# `docs add` option → DocumentTrainingConfig field.
DOCUMENT_OPTIONS = (
    "memory_dim", "key_dim", "key_module", "key_depth", "key_activation", "layer", "negatives", "loss",
    "tau", "alpha", "epochs", "learning_rate", "batch_size", "window_words", "window_stride",
    "max_windows", "max_length", "holdout_windows", "seed",
)  # fmt: skip


def _docs_add(args: argparse.Namespace) -> int:
    check_name(args.bank, "bank name")
    documents = _read_documents(args.files, args.id, args.title)
    config = {name: getattr(args, name) for name in DOCUMENT_OPTIONS if getattr(args, name) is not None}
    with _client(args) as client:
        job = client.register_documents(args.bank, documents, config)
    count = len(documents)
    print(f"job {job.id}: {count} document{'' if count == 1 else 's'} → {job.memory_name}, {job.state}")
    if not args.wait:
        return 0
    args.id = job.id
    return _jobs_watch(args)


def _read_documents(files: Sequence[str], ids: Sequence[str], titles: Sequence[str]) -> list[dict[str, str]]:
    """One document per file ('-' = standard input): its id (--id, else the file name without
    its extension), its title (a first line "# TITLE", else --title, else the id) and its text."""
    if ids and len(ids) != len(files):
        raise ValueError(f"give one --id per file, in order: {len(ids)} --id for {len(files)} files")
    if titles and len(titles) != len(files):
        raise ValueError(f"give one --title per file, in order: {len(titles)} --title for {len(files)} files")
    if files.count("-") > 1:
        raise ValueError("'-' (standard input) can be given only once")
    if "-" in files and not ids:
        raise ValueError("a document read from standard input ('-') needs its id: pass --id for each file")
    documents: list[dict[str, str]] = []
    seen: set[str] = set()
    for index, file in enumerate(files):
        where = "standard input" if file == "-" else file
        doc_id = ids[index] if ids else Path(file).stem
        hint = "" if ids else f" (taken from the file name {file!r}: pass --id to choose another)"
        try:
            check_name(doc_id, "document id")
        except ValueError as exc:
            raise ValueError(f"{exc}{hint}") from None
        if doc_id in seen:
            raise ValueError(f"document id {doc_id!r} is given twice{hint}")
        seen.add(doc_id)
        text = _read_text(file)
        title = titles[index] if titles else doc_id
        first, _, rest = text.partition("\n")
        if first.startswith(HEADING):  # the heading names the document; it is not part of its text
            title, text = first[len(HEADING) :].strip() or title, rest
        if not text.split():
            raise ValueError(f"{where} has no text")
        documents.append({"id": doc_id, "title": title, "text": text})
    return documents


def _read_text(file: str) -> str:
    try:
        if file == "-":
            return sys.stdin.read()
        return Path(file).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        where = "standard input" if file == "-" else file
        raise ValueError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _docs_ls(args: argparse.Namespace) -> int:
    name, version = args.bank
    with _client(args) as client:
        bank = client.get_memory(name, version)
    if bank.kind != "document":
        raise ValueError(f"{name} is a {bank.kind} memory, not a document bank")
    # Counts come back as floats (details travel as a protobuf Struct): shown as the integers they are.
    documents = [
        {key: int(value) if key in DOCUMENT_COUNTS else value for key, value in document.items()}
        for document in bank.details.get("documents", [])
    ]
    if args.json:
        for document in documents:
            print(json.dumps(document))
        return 0
    if not documents:
        print(f"{name} version {bank.version} has no documents", file=sys.stderr)
        return 0
    _print_table(
        ("ID", "TITLE", "WORDS", "DOCREP"),
        (
            (
                d["id"],
                d.get("title") or "-",
                str(d.get("words", 0)),
                ",".join(f"{v:.4g}" for v in d.get("docrep", [])),
            )
            for d in documents
        ),
    )
    return 0


# --- jobs ---


def _jobs_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.list_jobs(state=args.state or "", kind=args.kind)
    if args.json:
        for job in jobs:
            print(json.dumps(job.to_dict()))
        return 0
    if not jobs:
        print("no jobs", file=sys.stderr)
        return 0
    _print_table(
        ("ID", "KIND", "MEMORY", "STATE", "PROGRESS", "CREATED"),
        ((j.id, j.kind, j.memory_name, j.state, _progress(j), _when(j.created_at)) for j in jobs),
    )
    return 0


def _jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.id)
    if args.json:
        print(json.dumps(job.to_dict(), indent=2))
        return 0
    _print_fields(
        [
            ("id", job.id),
            ("kind", job.kind),
            ("memory", job.memory_name),
            ("state", job.state),
            ("progress", _progress(job)),
            ("loss", "-" if job.loss is None else f"{job.loss:.6g}"),
            ("eta", _duration(job.eta_seconds)),
            ("message", job.message or "-"),
            ("error", job.error or "-"),
            ("result version", job.result_version or "-"),
            ("created", _when(job.created_at)),
            ("started", _when(job.started_at)),
            ("finished", _when(job.finished_at)),
            ("worker", job.worker or "-"),
        ]
    )
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.id)
    if job.state == "cancelled":
        print(f"job {job.id}: cancelled")
    elif job.final:
        print(f"job {job.id} already {job.state}: nothing to cancel")
    else:  # a running job stops at its worker's next progress report
        print(
            f"job {job.id}: cancellation requested (still {job.state}); "
            f"`memserve jobs watch {job.id}` follows it"
        )
    return 0


def _jobs_submit(args: argparse.Namespace) -> int:
    text = args.spec_file.read_text() if args.spec_file else args.spec
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the spec is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError("the spec must be a JSON object, like '{\"epochs\": 3}'")
    with _client(args) as client:
        job = client.submit_job(args.kind, args.memory_name, spec)
    print(f"job {job.id}: {job.kind} → {job.memory_name}, {job.state}")
    if not args.wait:
        return 0
    args.id = job.id
    return _jobs_watch(args)


def _jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as client, contextlib.closing(client.watch_job(args.id)) as updates:
        last = _follow_with_bar(updates) if sys.stdout.isatty() else _follow_with_lines(updates)
    if last is None or not last.final:
        state = last.state if last else "unknown"
        print(f"the watch ended before job {args.id} finished (last state: {state}); watch it again")
        return 1
    if last.state == "succeeded":
        print(f"succeeded: published {last.memory_name} version {last.result_version}")
        return 0
    print(f"failed: {last.error}" if last.state == "failed" else last.state)
    return 1


def _follow_with_bar(updates: Iterable[JobInfo]) -> JobInfo | None:
    from tqdm import tqdm  # only a watch on a terminal needs it

    last: JobInfo | None = None
    bar_format = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
    with tqdm(total=None, unit="step", file=sys.stdout, dynamic_ncols=True, bar_format=bar_format) as bar:
        for job in updates:
            last = job
            bar.total = job.total or None
            bar.n = job.step
            bar.set_description_str(job.state, refresh=False)
            bar.set_postfix_str(_progress_details(job), refresh=False)
            bar.refresh()  # updates arrive when the job changes: show each one now
    return last


def _follow_with_lines(updates: Iterable[JobInfo]) -> JobInfo | None:
    last: JobInfo | None = None
    for job in updates:
        last = job
        print(f"{job.state} {_progress(job)} {_progress_details(job)}".rstrip(), flush=True)
    return last


def _progress(job: JobInfo) -> str:
    return f"{job.step}/{job.total}" if job.total else "-"


def _progress_details(job: JobInfo) -> str:
    parts: list[str] = []
    if job.step:
        if job.loss is not None:
            parts.append(f"loss {job.loss:.4g}")
        parts.append(f"eta {_duration(job.eta_seconds)}")
    if job.message:
        parts.append(job.message)
    return ", ".join(parts)


# --- output helpers ---


def _print_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _print_fields(fields: Sequence[tuple[str, Any]], documents: Sequence[tuple[str, Any]] = ()) -> None:
    width = max(len(label) for label, _ in fields) + 1
    for label, value in fields:
        print(f"{label + ':':<{width}} {value}")
    for label, document in documents:
        body = json.dumps(document, indent=2, sort_keys=True)
        print(f"{label}:\n" + "\n".join(f"  {line}" for line in body.splitlines()))


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    _model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port; 0 = off")
    serve.add_argument(
        "--metrics-max-memories", type=_non_negative, default=20,
        help="memories (banks, sets, adapters) with a metrics label of their own; later ones share `other`",
    )  # fmt: skip
    _redis_option(serve, "default: an embedded Redis, persisted under --data-dir")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the embedded Redis keeps memories and jobs "
        "(default: $MEMSERVE_DATA_DIR or the user data dir)",
    )
    serve.add_argument(
        "--cache-mb", type=_non_negative, default=1024, help="loaded memories kept ready (MiB)"
    )
    serve.add_argument(
        "--workers",
        type=_non_negative,
        default=None,
        help="trainer workers inside the server (default: 1 with the embedded Redis, 0 with --redis-url)",
    )
    _plugin_option(serve)
    _threads_option(serve)
    serve.add_argument("--max-batch-size", type=int, default=16)
    serve.add_argument("--max-queue-size", type=int, default=64)
    serve.add_argument("--default-max-new-tokens", type=int, default=128)
    serve.add_argument("--max-new-tokens-limit", type=int, default=2048)
    serve.add_argument(
        "--max-context-tokens",
        type=int,
        default=8192,
        help="prompt + output tokens of one request (capped by the model's window)",
    )
    serve.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=4096,
        help="padded prompt tokens prefilled in one forward (a longer prompt goes alone)",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(run=_serve)

    worker = commands.add_parser("worker", help="run a trainer worker against a Redis")
    _model_options(worker)
    _redis_option(worker, "required")
    worker.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds between heartbeats")
    worker.add_argument(
        "--claim-idle", type=float, default=15.0, help="take over a job whose worker is silent this long (s)"
    )
    worker.add_argument(
        "--max-attempts", type=int, default=3, help="fail a job whose workers died this often"
    )
    worker.add_argument("--metrics-port", type=int, default=9465, help="Prometheus /metrics port; 0 = off")
    worker.add_argument(
        "--metrics-host", default="127.0.0.1", help="address the metrics port listens on (0.0.0.0: all)"
    )
    _plugin_option(worker)
    _threads_option(worker)
    worker.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    worker.set_defaults(run=_worker)

    generate = commands.add_parser("generate", help="generate text with a running server")
    generate.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    _server_option(generate)
    _tenant_option(generate)
    generate.add_argument(
        "--memory",
        dest="memories",
        action="append",
        default=[],
        type=_memory_argument,
        metavar="NAME[@VERSION]",
        help="a stored memory to use, by name, optionally pinned to a version (repeatable)",
    )
    generate.add_argument(
        "--doc",
        dest="memories",
        action="append",
        type=_doc_argument,
        metavar="BANK[@VERSION]/DOC",
        help="a document of a document bank, by id: --doc news/storm, or --doc news@2/storm "
        "for version 2 of the bank (repeatable)",
    )
    generate.add_argument(
        "--docrep",
        dest="memories",
        action="append",
        type=_docrep_argument,
        metavar="BANK[@VERSION]=X,Y,...",
        help="an explicit DocRep of a bank, as many values as its key_dim (`memserve docs ls BANK` "
        "shows its documents'): --docrep news=0.5,-0.2 or --docrep news@2=0.5,-0.2 (repeatable)",
    )
    generate.add_argument(
        "--mix",
        dest="memories",
        action="append",
        type=_mix_argument,
        metavar="BANK[@VERSION]/DOC=W,...",
        help="a weighted mix of documents of one bank, weights >= 0 (normalised): "
        "--mix news/storm=0.7,news/flood=0.3; pin a version with BANK@VERSION "
        "(news@2/storm=0.7,news/flood=0.3) (repeatable)",
    )
    generate.add_argument(
        "--facts",
        dest="memories",
        action="append",
        type=_facts_argument,
        metavar="SET[@VERSION]",
        help="a local memory set (facts registered with `memserve facts add`) (repeatable)",
    )
    generate.add_argument(
        "--adapter",
        dest="memories",
        action="append",
        type=_adapter_argument,
        metavar="NAME[@VERSION]",
        help="an adapter memory (trained with `memserve adapters add`) (repeatable)",
    )
    generate.add_argument(
        "--trace",
        action="store_true",
        help="print, per generated token, which memory entries acted on it and how strongly (stderr)",
    )
    generate.add_argument("--max-new-tokens", type=int, default=None, help="default: the server's (128)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=_non_negative, default=0, help="0 = no limit")
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--repetition-penalty", type=float, default=None)
    generate.add_argument("--seed", type=_non_negative, default=None)
    generate.add_argument("--stop", action="append", default=[], help="a stop sequence (repeatable)")
    generate.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the model's chat template",
    )
    generate.add_argument("--stream", action="store_true", help="print tokens as they come")
    generate.add_argument(
        "-v", "--verbose", action="store_true", help="print the memories used, finish reason and token counts"
    )
    generate.set_defaults(run=_generate)

    info = commands.add_parser("info", help="describe the served model and the server's limits")
    _server_option(info)
    info.set_defaults(run=_info)

    _memories_parser(commands)
    _docs_parser(commands)
    _facts_parser(commands)
    _adapters_parser(commands)
    _jobs_parser(commands)
    _eval_parser(commands)
    return parser


def _eval_docs(args: argparse.Namespace) -> int:
    # Imported here: evaluating loads the model in this process.
    from tqdm import tqdm

    from memserve.memory.evaluation import evaluate_offline
    from memserve.memory.registry import get_kind, load_plugins

    load_plugins()

    name, version = args.bank
    artifact = _load_artifact(args, name, version)
    if artifact.meta.kind != "document":
        raise ValueError(f"{name!r} is a {artifact.meta.kind} memory, not a document bank")
    loaded = _eval_model(args, artifact)

    with tqdm(total=len(artifact.meta.details["documents"]), desc="documents", unit="doc") as bar:

        def progress(done: int, total: int, doc_id: str) -> None:
            bar.set_postfix_str(doc_id)
            bar.update(done - bar.n)

        evaluate_offline(get_kind("document"), loaded, artifact, {"grid": args.grid}, args.out, progress)
    metrics = json.loads((args.out / "metrics.json").read_text())
    worst = max(m["ppl_own"] / m["ppl_other"] for m in metrics["documents"].values())
    print(
        f"wrote {args.out / 'report.md'}, metrics.json and plots; "
        f"worst own/other perplexity ratio {worst:.3f}"
    )
    return 0


def _load_artifact(args: argparse.Namespace, name: str, version: int) -> Any:
    """A memory from an export file (--file), a Redis (--redis-url) or the embedded store."""
    from memserve.memory_store.artifact import import_bytes
    from memserve.memory_store.redis_server import RedisServer, default_data_dir
    from memserve.memory_store.redis_store import RedisStore

    if args.file:
        return import_bytes(args.file.read_bytes())
    embedded = None
    url = args.redis_url
    if not url:  # the embedded store: free only while no server holds it
        embedded = RedisServer((args.data_dir or default_data_dir()) / "redis", lock=True).start()
        url = embedded.url
    try:
        return RedisStore.from_url(url).load(name, version, tenant=args.tenant or "default")
    finally:
        if embedded is not None:
            embedded.stop()


def _eval_model(args: argparse.Namespace, artifact: Any) -> Any:
    from memserve.models import ModelConfig, load_model

    loaded = load_model(
        ModelConfig(model=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    )
    if loaded.fingerprint != artifact.meta.base_model:
        raise ValueError(
            f"{artifact.meta.name!r} was trained for another base model; pass --model with that model"
        )
    return loaded


def _eval_facts(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from memserve.memory.evaluation import evaluate_offline  # loads torch: only here
    from memserve.memory.registry import get_kind, load_plugins

    load_plugins()

    name, version = args.set
    artifact = _load_artifact(args, name, version)
    if artifact.meta.kind != "local":
        raise ValueError(f"{name!r} is a {artifact.meta.kind} memory, not a local memory set")
    loaded = _eval_model(args, artifact)
    with tqdm(total=4, desc="evaluating", unit="pass") as bar:

        def progress(done: int, total: int, what: str) -> None:
            bar.set_postfix_str(what)
            bar.update(done - bar.n)

        evaluate_offline(get_kind("local"), loaded, artifact, {}, args.out, progress)
    metrics = json.loads((args.out / "metrics.json").read_text())
    shown = ("edit_success", "generalization", "locality", "locality_first_token")
    print(f"wrote {args.out / 'report.md'} and metrics.json; " + ", ".join(
        f"{key} {metrics[key]:.3f}" if metrics[key] is not None else f"{key} n/a" for key in shown
    ))  # fmt: skip
    return 0


def _eval_factuality(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from memserve.kinds.adapter.eval import read_claims
    from memserve.memory.evaluation import evaluate_offline
    from memserve.memory.registry import get_kind, load_plugins

    load_plugins()
    read_claims(args.claims)  # a bad file is refused before the model loads
    artifact = None
    if args.adapter or args.file:
        name, version = args.adapter or ("", 0)
        artifact = _load_artifact(args, name, version)
        if artifact.meta.kind != "adapter":
            raise ValueError(f"{artifact.meta.name!r} is a {artifact.meta.kind} memory, not an adapter")
        loaded = _eval_model(args, artifact)
    else:
        from memserve.models import ModelConfig, load_model

        loaded = load_model(
            ModelConfig(model=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
        )
    rows = [json.loads(line) for line in args.claims.read_text().splitlines() if line.strip()]
    options = {"claims": rows, "shots": list(args.shots), "seed": args.seed, "source": str(args.claims)}
    with tqdm(total=len(args.shots), desc="shots", unit="k") as bar:

        def progress(done: int, total: int, what: str) -> None:
            bar.update(done - bar.n)

        evaluate_offline(get_kind("adapter"), loaded, artifact, options, args.out, progress)
    results = json.loads((args.out / "metrics.json").read_text())["shots"]
    summary = ", ".join(
        f"{k} shots {r['accuracy']:.3f}/{r['micro_f1']:.3f}/{r['macro_f1']:.3f}" for k, r in results.items()
    )
    print(f"wrote {args.out / 'report.md'} and metrics.json; accuracy/micro-F1/macro-F1: {summary}")
    return 0


def _eval_parser(commands: Any) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a memory (report, metrics and plots)")
    kinds = evaluate.add_subparsers(dest="eval_command", required=True)
    docs = kinds.add_parser(
        "docs",
        help="perplexity with own/other/random/no DocRep and without the bank; selection statistics; plots",
        description="Evaluates a document bank in this process (loads the model; reads the bank from "
        "Redis, the embedded store, or an export file).",
    )
    docs.add_argument(
        "bank", metavar="BANK[@VERSION]", type=_memory_argument, help="the bank (ignored with --file)"
    )
    docs.add_argument("--out", type=Path, required=True, help="folder for report.md, metrics.json and PNGs")
    docs.add_argument("--file", type=Path, default=None, help="read the bank from an export file instead")
    _redis_option(docs, "default: the embedded store under --data-dir, when no server holds it")
    docs.add_argument("--data-dir", type=Path, default=None, help="the embedded store's folder")
    docs.add_argument("--grid", type=int, default=7, help="points per axis of the 2-D DocRep landscape")
    _tenant_option(docs)
    _model_options(docs)
    docs.set_defaults(run=_eval_docs)

    facts = kinds.add_parser(
        "facts",
        help="edit success, generalisation and locality of a local memory set, on its held-out prompts",
        description="Evaluates a local memory set in this process, through the serving engine (loads the "
        "model; reads the set from Redis, the embedded store, or an export file).",
    )
    facts.add_argument(
        "set", metavar="SET[@VERSION]", type=_memory_argument, help="the set (ignored with --file)"
    )
    facts.add_argument("--out", type=Path, required=True, help="folder for report.md and metrics.json")
    facts.add_argument("--file", type=Path, default=None, help="read the set from an export file instead")
    _redis_option(facts, "default: the embedded store under --data-dir, when no server holds it")
    facts.add_argument("--data-dir", type=Path, default=None, help="the embedded store's folder")
    _tenant_option(facts)
    _model_options(facts)
    facts.set_defaults(run=_eval_facts)

    factuality = kinds.add_parser(
        "factuality",
        help="few-shot claim verification (supports / refutes / not enough info), with or without an adapter",
        description="The FEVER study's few-shot factuality evaluation, in this process through the serving "
        "engine: accuracy, micro-F1 and macro-F1 for each number of shots (server/factuality.py gives the "
        "prompt, the shots and the answer-parsing rule).",
    )
    factuality.add_argument(
        "--claims", type=Path, required=True, help="JSONL of {id, document, claim, label, split}"
    )
    factuality.add_argument(
        "--adapter", type=_memory_argument, default=None, metavar="NAME[@VERSION]",
        help="attach this adapter to every prompt (default: the base model)",
    )  # fmt: skip
    factuality.add_argument(
        "--shots", type=_shots_argument, default=[0, 1, 2, 3], metavar="K|A..B|A,B",
        help="numbers of solved examples before each claim, 0 to 5 (default 0..3)",
    )  # fmt: skip
    factuality.add_argument("--out", type=Path, required=True, help="folder for report.md and metrics.json")
    factuality.add_argument("--file", type=Path, default=None, help="read the adapter from an export file")
    factuality.add_argument("--seed", type=_non_negative, default=0, help="orders the shots")
    _redis_option(factuality, "default: the embedded store under --data-dir, when no server holds it")
    factuality.add_argument("--data-dir", type=Path, default=None, help="the embedded store's folder")
    _tenant_option(factuality)
    _model_options(factuality)
    factuality.set_defaults(run=_eval_factuality)


def _shots_argument(text: str) -> list[int]:
    """K, A..B or A,B,... for --shots."""
    try:
        if ".." in text:
            low, _, high = text.partition("..")
            shots = list(range(int(low), int(high) + 1))
        else:
            shots = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write K, A..B or A,B,..., like 0..3") from None
    if not shots or any(not 0 <= k <= 5 for k in shots):
        raise argparse.ArgumentTypeError(f"{text!r}: shots are 0 to 5")
    return list(dict.fromkeys(shots))


def _memories_parser(commands: Any) -> None:
    memories = commands.add_parser(
        "memories", help="list, inspect, delete, export and import stored memories"
    )
    actions = memories.add_subparsers(dest="memories_command", required=True)

    ls = _store_command(actions, "ls", "list memories (their current versions)")
    ls.add_argument("--kind", default="", help="only memories of this kind")
    ls.add_argument("--prefix", default="", help="only names starting with this")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(run=_memories_ls)

    show = _store_command(actions, "show", "describe one memory version")
    _memory_positional(show, "the current version unless pinned")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(run=_memories_show)

    rm = _store_command(actions, "rm", "delete a memory (every version, or the pinned one)")
    _memory_positional(rm, "every version unless pinned")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rm.set_defaults(run=_memories_rm)

    export = _store_command(actions, "export", "save a memory version as a self-describing file")
    _memory_positional(export, "the current version unless pinned")
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="the file (default: NAME-vVERSION.safetensors here)",
    )
    export.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    export.set_defaults(run=_memories_export)

    upload = _store_command(actions, "import", "upload an exported file as a new version")
    upload.add_argument(
        "file", type=Path, metavar="FILE", help="a file written by `memserve memories export`"
    )
    upload.add_argument("--name", default=None, help="the memory to publish it as (default: the file's)")
    upload.set_defaults(run=_memories_import)


def _docs_parser(commands: Any) -> None:
    docs = commands.add_parser("docs", help="register and list the documents of document banks")
    actions = docs.add_subparsers(dest="docs_command", required=True)

    add = _store_command(
        actions,
        "add",
        "train a new version of a document bank with these documents added (an id it has already "
        "replaces that document's text)",
    )
    add.add_argument("bank", metavar="BANK", help="the document bank (created if new)")
    add.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="a UTF-8 text file per document; '-' reads one from standard input (then --id is needed). "
        "A first line '# TITLE' is the document's title and is not part of its text",
    )
    add.add_argument(
        "--id",
        action="append",
        default=[],
        metavar="ID",
        help="the documents' ids, one per file in order (default: each file's name without its extension); "
        "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
    )
    add.add_argument(
        "--title",
        action="append",
        default=[],
        metavar="TITLE",
        help="the documents' titles, one per file in order, for files without a '# TITLE' line "
        "(default: the id)",
    )
    add.add_argument("--wait", action="store_true", help="then follow the job, as `jobs watch` does")
    training = add.add_argument_group("training options (default: the server's)")
    training.add_argument("--epochs", type=int, default=None)
    training.add_argument(
        "--layer", type=int, default=None, help="the model layer the bank acts on (negative: from the end)"
    )
    training.add_argument("--memory-dim", type=int, default=None, help="entries of the bank")
    training.add_argument("--key-dim", type=int, default=None, help="values of a DocRep")
    training.add_argument("--key-module", choices=["linear", "mlp"], default=None)
    training.add_argument("--key-depth", type=int, default=None, help="hidden layers of the mlp key module")
    training.add_argument("--key-activation", choices=["tanh", "relu", "sigmoid"], default=None)
    training.add_argument(
        "--negatives", choices=["other", "random", "zero", "perturb"], default=None,
        help="the DocReps the loss pushes away from each document's text",
    )  # fmt: skip
    training.add_argument("--loss", choices=["abs", "capped_sq"], default=None)
    training.add_argument("--tau", type=float, default=None, help="the loss's target for negatives")
    training.add_argument("--alpha", type=float, default=None, help="the weight of the negatives' term")
    training.add_argument("--learning-rate", type=float, default=None)
    training.add_argument("--batch-size", type=int, default=None)
    training.add_argument("--window-words", type=int, default=None, help="words of a training window")
    training.add_argument("--window-stride", type=int, default=None, help="words between windows")
    training.add_argument("--max-windows", type=int, default=None, help="training windows per document")
    training.add_argument("--max-length", type=int, default=None, help="tokens of a window, at most")
    training.add_argument(
        "--holdout-windows", type=int, default=None, help="windows per document kept out of training"
    )
    training.add_argument("--seed", type=_non_negative, default=None)
    add.set_defaults(run=_docs_add)

    ls = _store_command(actions, "ls", "list the documents of a document bank")
    ls.add_argument(
        "bank",
        type=_memory_argument,
        metavar="BANK[@VERSION]",
        help="the document bank (its current version unless pinned)",
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(run=_docs_ls)


FACT_OPTIONS = ("layers", "sites", "alphas", "hardness", "distance", "combination", "seed", "holdout",
                "generated_prompts", "extra_keys", "candidates")  # fmt: skip


def _facts_add(args: argparse.Namespace) -> int:
    check_name(args.set, "memory set name")
    facts = _read_facts(args)
    config = {name: getattr(args, name) for name in FACT_OPTIONS if getattr(args, name) not in (None, [])}
    with _client(args) as client:
        job = client.register_facts(args.set, facts, config)
    count = len(facts)
    print(f"job {job.id}: {count} fact{'' if count == 1 else 's'} → {job.memory_name}, {job.state}")
    if not args.wait:
        return 0
    args.id = job.id
    return _jobs_watch(args)


def _read_facts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The fact of --prompt/--target (with --positive, --negative, --id), and those of --file."""
    facts: list[dict[str, Any]] = []
    if args.prompt or args.target:
        if not (args.prompt and args.target):
            raise ValueError("give both --prompt and --target (or a --file of facts)")
        fact: dict[str, Any] = {
            "prompt": args.prompt,
            "target": args.target,
            "positive_prompts": args.positive,
            "negative_prompts": args.negative,
        }
        if args.fact_id:
            fact["id"] = args.fact_id
        facts.append(fact)
    elif args.positive or args.negative or args.fact_id:
        raise ValueError("--positive, --negative and --id describe the fact of --prompt and --target")
    if args.file:
        facts += [fact for _, fact in _json_objects(args.file)]
    if not facts:
        raise ValueError("no fact given: pass --prompt and --target, or --file FACTS.jsonl")
    return facts


def _facts_ls(args: argparse.Namespace) -> int:
    name, version = args.set
    with _client(args) as client:
        memory = client.get_memory(name, version)
    if memory.kind != "local":
        raise ValueError(f"{name} is a {memory.kind} memory, not a local memory set")
    facts = memory.details.get("facts", [])
    if args.json:
        for fact in facts:
            print(json.dumps(fact))
        return 0
    if not facts:
        print(f"{name} version {memory.version} has no facts", file=sys.stderr)
        return 0
    _print_table(
        ("ID", "PROMPT", "TARGET", "ENTRIES", "TRAIN +/-", "HELD-OUT +/-"),
        (
            (
                f["id"],
                f["prompt"] if len(f["prompt"]) <= 48 else f["prompt"][:47] + "…",
                repr(f["target"]),
                str(len(f.get("entries", []))),
                f"{len(f.get('train_positives', []))}/{len(f.get('train_negatives', []))}",
                f"{len(f.get('heldout_positives', []))}/{len(f.get('heldout_negatives', []))}",
            )
            for f in facts
        ),
    )
    return 0


ADAPTER_OPTIONS = ("layer", "hidden_size", "epochs", "learning_rate", "weight_decay", "warmup_ratio",
                   "max_grad_norm", "batch_size", "max_length", "seed")  # fmt: skip


def _adapters_add(args: argparse.Namespace) -> int:
    check_name(args.name, "adapter name")
    documents = _read_documents(args.files, args.id, args.title) if args.files else []
    templates = _read_templates(args.templates) if args.templates else []
    if not documents and not templates:
        raise ValueError("give document files, --templates FILE, or both")
    config = {name: getattr(args, name) for name in ADAPTER_OPTIONS if getattr(args, name) is not None}
    with _client(args) as client:
        job = client.register_adapter(args.name, documents, templates, config)
    data = f"{len(documents)} documents, {len(templates)} templates"
    print(f"job {job.id}: {data} → {job.memory_name}, {job.state}")
    if not args.wait:
        return 0
    args.id = job.id
    return _jobs_watch(args)


def _read_templates(file: str) -> list[dict[str, str]]:
    """Question/answer templates, one JSON object {question, answer} per line."""
    templates: list[dict[str, str]] = []
    for where, template in _json_objects(file):
        if not all(isinstance(template.get(k), str) for k in ("question", "answer")):
            raise ValueError(f"{where} must be a JSON object with string question and answer")
        templates.append({"question": template["question"], "answer": template["answer"]})
    if not templates:
        raise ValueError(f"{'standard input' if file == '-' else file} has no templates")
    return templates


def _json_objects(file: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each non-blank line of a JSON-lines file ('-' = standard input)."""
    return json_objects(_read_text(file), "standard input" if file == "-" else file)


def _adapters_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        adapters = client.list_memories(kind="adapter")
    if args.json:
        for memory in adapters:
            print(json.dumps({"name": memory.name, "version": memory.version, **memory.hyperparameters,
                              **{f"metric_{k}": v for k, v in memory.metrics.items()}}))  # fmt: skip
        return 0
    if not adapters:
        print("no adapters (train one with `memserve adapters add NAME FILE...`)", file=sys.stderr)
        return 0
    _print_table(
        ("NAME", "VERSION", "LAYER", "HIDDEN", "DATA", "LOSS BASE → FINAL", "GATE"),
        (
            (
                m.name,
                str(m.version),
                str(int(m.hyperparameters.get("layer", -1))),
                str(int(m.hyperparameters.get("hidden_size", 0))),
                str(m.details.get("data", "")),
                f"{_metric(m, 'base_loss', '.3f')} → {_metric(m, 'final_loss', '.3f')}",
                _metric(m, "gate", ".4f"),
            )
            for m in adapters
        ),
    )
    return 0


def _metric(memory: Any, name: str, form: str) -> str:
    value = memory.metrics.get(name)
    return "-" if not isinstance(value, int | float) else format(value, form)


def _adapters_parser(commands: Any) -> None:
    adapters = commands.add_parser("adapters", help="train and list adapter memories")
    actions = adapters.add_subparsers(dest="adapters_command", required=True)
    add = _store_command(
        actions,
        "add",
        "train a new version of an adapter (afresh) on documents, question/answer templates, or both",
    )
    add.add_argument("name", metavar="NAME", help="the adapter (created if new)")
    add.add_argument(
        "files", nargs="*", metavar="FILE",
        help="documents, one per file (a first line '# TITLE' names it; '-' = standard input)",
    )  # fmt: skip
    add.add_argument("--id", action="append", default=[], help="a document's id, one per FILE in order")
    add.add_argument("--title", action="append", default=[], help="a document's title, one per FILE")
    add.add_argument(
        "--templates", default=None, metavar="FILE.jsonl",
        help="question/answer templates, one JSON object {question, answer} per line",
    )  # fmt: skip
    add.add_argument("--wait", action="store_true", help="then follow the job, as `jobs watch` does")
    training = add.add_argument_group("training options (default: the server's)")
    training.add_argument(
        "--layer", type=int, default=None, help="the block it follows (default ~75%% depth)"
    )
    training.add_argument("--hidden-size", type=int, default=None, help="its hidden width (128)")
    training.add_argument("--epochs", type=int, default=None, help="passes over the data (25)")
    training.add_argument("--learning-rate", type=float, default=None, help="AdamW's peak rate (1e-3)")
    training.add_argument("--weight-decay", type=float, default=None, help="AdamW's weight decay (0.05)")
    training.add_argument("--warmup-ratio", type=float, default=None, help="share of steps warming up (0.1)")
    training.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (10; 0 = off)")
    training.add_argument("--batch-size", type=int, default=None, help="examples per step (4)")
    training.add_argument("--max-length", type=int, default=None, help="tokens per example (256)")
    training.add_argument("--seed", type=_non_negative, default=None)
    add.set_defaults(run=_adapters_add)

    ls = _store_command(actions, "ls", "list adapters (current versions) with their training figures")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(run=_adapters_ls)


def _facts_parser(commands: Any) -> None:
    facts = commands.add_parser("facts", help="register and list the facts of local memory sets")
    actions = facts.add_subparsers(dest="facts_command", required=True)
    add = _store_command(
        actions,
        "add",
        "train a new version of a local memory set with these facts added (an id it has already "
        "replaces that fact)",
    )
    add.add_argument("set", metavar="SET", help="the local memory set (created if new)")
    add.add_argument("--prompt", default="", help="the prompt the fact completes")
    add.add_argument("--target", default="", help="what the prompt should continue with, e.g. ' Kathmandu'")
    add.add_argument(
        "--positive", action="append", default=[], metavar="PROMPT",
        help="a prompt that must also continue with the target: a paraphrase (repeatable)",
    )  # fmt: skip
    add.add_argument(
        "--negative", action="append", default=[], metavar="PROMPT",
        help="a prompt whose continuation must not change: a neighbour (repeatable)",
    )  # fmt: skip
    add.add_argument("--id", dest="fact_id", default="", help="the fact's id (default: made from its prompt)")
    add.add_argument(
        "--file",
        default=None,
        metavar="FACTS.jsonl",
        help="many facts, one JSON object per line: "
        "{prompt, target, id?, positive_prompts?, negative_prompts?} ('-' = standard input)",
    )
    add.add_argument("--wait", action="store_true", help="then follow the job, as `jobs watch` does")
    training = add.add_argument_group("training options (default: the server's)")
    training.add_argument(
        "--layers", type=int, nargs="+", default=None, help="layers to search (default: all)"
    )
    training.add_argument("--sites", nargs="+", choices=["attn_out", "mlp_down"], default=None)
    training.add_argument("--alphas", type=float, nargs="+", default=None, help="edit step sizes to search")
    training.add_argument("--hardness", type=float, default=None, help="the trigger's hardness h (default 3)")
    training.add_argument("--distance", choices=["projection", "mixed"], default=None)
    training.add_argument("--combination", choices=["top1", "sum"], default=None)
    training.add_argument(
        "--holdout", type=float, default=None, help="share of each fact's prompts kept for evaluation (0.5)"
    )
    training.add_argument(
        "--generated-prompts", type=int, default=None, help="paraphrases and neighbours made"
    )
    training.add_argument(
        "--extra-keys", type=int, default=None, help="more keys per token for missed positives"
    )
    training.add_argument("--candidates", type=int, default=None, help="cells checked for real per token")
    training.add_argument("--seed", type=_non_negative, default=None)
    add.set_defaults(run=_facts_add)

    ls = _store_command(actions, "ls", "list the facts of a local memory set")
    ls.add_argument(
        "set", type=_memory_argument, metavar="SET[@VERSION]", help="the set (current version unless pinned)"
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per line, with the prompts")
    ls.set_defaults(run=_facts_ls)


def _jobs_parser(commands: Any) -> None:
    jobs = commands.add_parser("jobs", help="follow and control training jobs")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)

    ls = _store_command(actions, "ls", "list jobs, newest first")
    ls.add_argument("--state", choices=JOB_STATES, default=None, help="only jobs in this state")
    ls.add_argument("--kind", default="", help="only jobs of this memory kind")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(run=_jobs_ls)

    show = _store_command(actions, "show", "describe one job")
    show.add_argument("id", metavar="ID", help="the job id")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(run=_jobs_show)

    cancel = _store_command(actions, "cancel", "ask a queued or running job to stop")
    cancel.add_argument("id", metavar="ID", help="the job id")
    cancel.set_defaults(run=_jobs_cancel)

    watch = _store_command(
        actions, "watch", "follow a job's progress until it ends (exit 0 only if it succeeds)"
    )
    watch.add_argument("id", metavar="ID", help="the job id")
    watch.set_defaults(run=_jobs_watch)

    submit = _store_command(
        actions, "submit", "train a memory of any registered kind (plugin kinds) from a JSON spec"
    )
    submit.add_argument("kind", metavar="KIND", help="a memory kind the server knows (`memserve info`)")
    submit.add_argument("memory_name", metavar="NAME", help="the memory the job publishes a version of")
    given = submit.add_mutually_exclusive_group()
    given.add_argument("--spec", default="{}", help="the kind's training spec, a JSON object")
    given.add_argument("--spec-file", type=Path, default=None, help="read the spec from this JSON file")
    submit.add_argument("--wait", action="store_true", help="then follow it, as `jobs watch` does")
    submit.set_defaults(run=_jobs_submit)


def _store_command(actions: Any, name: str, help: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help, description=help)
    _server_option(parser)
    _tenant_option(parser)
    return parser


def _memory_positional(parser: argparse.ArgumentParser, versions: str) -> None:
    parser.add_argument(
        "memory", type=_memory_argument, metavar="NAME[@VERSION]", help=f"the memory ({versions})"
    )


def _memory_argument(text: str) -> tuple[str, int]:
    """NAME or NAME@VERSION, as argparse sees it: a bad version is a usage error."""
    try:
        return parse_memory_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _doc_argument(text: str) -> memory_ref_pb2.MemoryRef:
    """BANK[@VERSION]/DOC for --doc."""
    form = "write BANK/DOC or BANK@VERSION/DOC, like news/storm"
    bank, version, doc_id = _bank_and_document(text, text, form)
    return document_ref(bank, doc_id, version=version)


def _facts_argument(text: str) -> memory_ref_pb2.MemoryRef:
    """SET[@VERSION] for --facts."""
    name, version = _memory_argument(text)
    return local_ref(name, version=version)


def _adapter_argument(text: str) -> memory_ref_pb2.MemoryRef:
    """NAME[@VERSION] for --adapter."""
    name, version = _memory_argument(text)
    return adapter_ref(name, version=version)


def _docrep_argument(text: str) -> memory_ref_pb2.MemoryRef:
    """BANK[@VERSION]=X,Y,... for --docrep."""
    form = "write BANK=X,Y,... or BANK@VERSION=X,Y,..., like news=0.5,-0.2"
    head, equals, values = text.partition("=")
    if not equals:
        raise _usage(text, "has no '=' after the bank", form)
    bank, version = _bank(head, text, form)
    return docrep_ref(bank, [_finite(v, text, "value", form) for v in values.split(",")], version=version)


def _mix_argument(text: str) -> memory_ref_pb2.MemoryRef:
    """BANK[@VERSION]/A=W,BANK/B=W,... for --mix: documents of one bank; pins, if any, agree."""
    form = "write BANK/DOC=WEIGHT,BANK/DOC=WEIGHT,..., like news/storm=0.7,news/flood=0.3"
    banks: set[str] = set()
    versions: set[int] = set()
    weights: dict[str, float] = {}
    for part in text.split(","):
        head, equals, weight = part.partition("=")
        if not equals:
            problem = "has no '=WEIGHT'" if part == text else f"has {part!r} without '=WEIGHT'"
            raise _usage(text, problem, form)
        bank, version, doc_id = _bank_and_document(head, text, form)
        banks.add(bank)
        versions.update([version] if version else [])
        if doc_id in weights:
            raise _usage(text, f"names document {doc_id!r} twice", form)
        weights[doc_id] = _finite(weight, text, "weight", form)
        if weights[doc_id] < 0:
            raise _usage(text, f"gives {doc_id!r} a negative weight; weights are >= 0", form)
    if len(banks) > 1:
        raise _usage(
            text, f"mixes documents of banks {', '.join(sorted(banks))}; one --mix is of one bank", form
        )
    if len(versions) > 1:
        raise _usage(text, f"pins different versions of {bank}; pin one", form)
    if not sum(weights.values()) > 0:
        raise _usage(text, "has weights that sum to 0; give one a positive weight", form)
    return mix_ref(bank, weights, version=versions.pop() if versions else None)


def _bank_and_document(text: str, whole: str, form: str) -> tuple[str, int, str]:
    """BANK[@VERSION]/DOC, part of the argument `whole`."""
    head, slash, doc_id = text.partition("/")
    if not slash:
        raise _usage(whole, "has no '/' between the bank and the document", form)
    bank, version = _bank(head, whole, form)
    if not NAME_PATTERN.fullmatch(doc_id):
        raise _usage(whole, f"has an invalid document id {doc_id!r} ({NAME_RULE})", form)
    return bank, version, doc_id


def _bank(text: str, whole: str, form: str) -> tuple[str, int]:
    """BANK or BANK@VERSION, part of the argument `whole`."""
    bank, at, version = text.partition("@")
    if not bank:
        raise _usage(whole, "names no bank", form)
    if at and not (version.isdigit() and 1 <= int(version) <= MAX_VERSION):
        raise _usage(whole, f"has no valid version after '@' ({version!r}: a positive integer)", form)
    if not NAME_PATTERN.fullmatch(bank):
        raise _usage(whole, f"has an invalid bank name {bank!r} ({NAME_RULE})", form)
    return bank, int(version) if at else 0


def _finite(text: str, whole: str, what: str, form: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _usage(whole, f"has {what} {text!r}, not a finite number", form)
    return value


def _usage(text: str, problem: str, form: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text!r} {problem}: {form}")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_non_negative,
        default=0,
        help="CPU threads of the computing thread (default: $MEMSERVE_THREADS, $OMP_NUM_THREADS "
        "or every usable CPU)",
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct, offline), a Hugging Face id or a local path",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto = fp32 on CPU, bf16 on CUDA; fp16 is CUDA only",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the converted default model lives (default: user cache dir or $MEMSERVE_CACHE_DIR)",
    )


def _redis_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("MEMSERVE_REDIS_URL"),
        help="the memory store: redis://host:6379/0, rediss://, unix:///path or redis+cluster://host:port "
        f"(default: $MEMSERVE_REDIS_URL; {default})",
    )


def _plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        help="a module that registers extra memory kinds (repeatable; also $MEMSERVE_PLUGINS)",
    )


def _server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=None, help=f"server address (default: $MEMSERVE_SERVER or {DEFAULT_SERVER})"
    )


def _tenant_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tenant",
        default=os.environ.get("MEMSERVE_TENANT"),
        help="the tenant whose memories and jobs to use (default: $MEMSERVE_TENANT or the server's default)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args))
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        print(f"error: {code.name}: {details}", file=sys.stderr)
        if code is grpc.StatusCode.UNAVAILABLE and "failed to connect" in (details or "").lower():
            server = getattr(args, "server", None) or default_server()
            print(f"is a server running at {server}? start one with `memserve serve`", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # a value refused, a busy port, a model not found
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
