"""`memserve serve` (the gRPC server) and `memserve worker` (a trainer worker): the commands that
load the model in this process. torch is imported only when one of them runs."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

from memserve.clients.cli.arguments import non_negative, non_negative_float
from memserve.clients.cli.common import add_flags, flag
from memserve.clients.cli.logs import LOG_FORMATS

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
TOKEN_ENV = "MEMSERVE_TOKEN"
"""The bearer token a server wants for the calls that change memories and jobs; the clients
send the same variable."""

MODEL_FLAGS = (
    flag("--model", help="'default' (SmolLM2-135M-Instruct, offline), a Hugging Face id or a local path"),
    flag(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto = fp32 on CPU, bf16 on CUDA; fp16 is CUDA only",
    ),
    flag("--device", help="auto | cpu | cuda | cuda:N"),
    flag(
        "--weights",
        choices=["auto", "packed", "dense"],
        help="packed: decode from the GGUF's 4/8-bit codes, bit-for-bit the fp32 weights (fp32 CPU; "
        "auto packs where exact); the worker always trains on dense weights",
    ),
    flag(
        "--cache-dir",
        type=Path,
        help="where the converted default model lives (default: user cache dir or $MEMSERVE_CACHE_DIR)",
    ),
)
MODEL_DEFAULTS = {"model": "default", "dtype": "auto", "device": "auto", "weights": "auto", "cache_dir": None}
COMPUTE_FLAGS = (
    flag(
        "--plugin",
        action="append",
        default=[],
        help="a module that registers extra memory kinds (repeatable; also $MEMSERVE_PLUGINS)",
    ),
    flag(
        "--threads",
        type=non_negative,
        default=0,
        help=(
            "CPU threads of the computing thread (default: $MEMSERVE_THREADS, $OMP_NUM_THREADS or "
            "every usable CPU)"
        ),
    ),
    flag("--log-level", default="INFO", choices=LOG_LEVELS),
    flag(
        "--log-format",
        default=os.environ.get("MEMSERVE_LOG_FORMAT") or "text",
        choices=LOG_FORMATS,
        help="text, or one JSON object per line (default: $MEMSERVE_LOG_FORMAT or text)",
    ),
)
SERVE_FLAGS = (
    flag("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)"),
    flag("--port", type=int, default=50051, help="the gRPC port"),
    flag(
        "--http-port",
        type=int,
        default=8000,
        help="the HTTP port: OpenAI's completions and chat API, with memories; 0 = off",
    ),
    flag(
        "--tls-cert",
        type=Path,
        default=os.environ.get("MEMSERVE_TLS_CERT") or None,
        help="PEM certificate: serve gRPC and HTTP over TLS (default: $MEMSERVE_TLS_CERT)",
    ),
    flag(
        "--tls-key",
        type=Path,
        default=os.environ.get("MEMSERVE_TLS_KEY") or None,
        help="PEM private key of --tls-cert (default: $MEMSERVE_TLS_KEY)",
    ),
    flag(
        "--tls-client-ca",
        type=Path,
        default=os.environ.get("MEMSERVE_TLS_CLIENT_CA") or None,
        help="PEM CA: require client certificates it signed, mutual TLS (default: $MEMSERVE_TLS_CLIENT_CA)",
    ),
    flag(
        "--tokens-file",
        type=Path,
        default=os.environ.get("MEMSERVE_TOKENS_FILE") or None,
        help="tokens bound to tenants and scopes (JSON), re-read on change (default: $MEMSERVE_TOKENS_FILE)",
    ),
    flag(
        "--auth-reads",
        action="store_true",
        default=os.environ.get("MEMSERVE_AUTH_READS", "").lower() in ("1", "true", "yes", "on"),
        help="require a token for generating and reading too (default: $MEMSERVE_AUTH_READS)",
    ),
    flag(
        "--quota-stored-mb",
        type=non_negative,
        default=0,
        help="each tenant's memories may store this many MiB; 0 = no limit (the tokens file: per tenant)",
    ),
    flag(
        "--quota-active-jobs",
        type=non_negative,
        default=0,
        help="each tenant's jobs queued or running at once; 0 = no limit",
    ),
    flag(
        "--quota-requests-per-second",
        type=non_negative_float,
        default=0.0,
        help="each tenant's calls per second, on this server; 0 = no limit",
    ),
    flag("--metrics-port", type=int, default=9464, help="Prometheus /metrics port; 0 = off"),
    flag(
        "--metrics-max-memories",
        type=non_negative,
        default=20,
        help="memories (banks, sets, adapters) with a metrics label of their own; later ones share `other`",
    ),
    flag(
        "--redis-url",
        default=os.environ.get("MEMSERVE_REDIS_URL"),
        help=(
            "the memory store: redis://host:6379/0, rediss://, unix:///path or "
            "redis+cluster://host:port (default: $MEMSERVE_REDIS_URL; else an embedded Redis, "
            "persisted under --data-dir)"
        ),
    ),
    flag(
        "--data-dir",
        type=Path,
        default=None,
        help=(
            "where the embedded Redis keeps memories and jobs (default: $MEMSERVE_DATA_DIR or the "
            "user data dir)"
        ),
    ),
    flag("--cache-mb", type=non_negative, default=1024, help="loaded memories kept ready (MiB)"),
    flag(
        "--workers",
        type=non_negative,
        default=None,
        help="trainer workers inside the server (default: 1 with the embedded Redis, 0 with --redis-url)",
    ),
    flag("--max-batch-size", type=int, default=16),
    flag("--max-queue-size", type=int, default=64),
    flag("--default-max-new-tokens", type=int, default=128),
    flag("--max-new-tokens-limit", type=int, default=2048),
    flag(
        "--max-context-tokens",
        type=int,
        default=8192,
        help="prompt + output tokens of one request (capped by the model's window)",
    ),
    flag(
        "--max-prefill-tokens",
        type=int,
        default=4096,
        help="padded prompt tokens prefilled in one forward (a longer prompt goes alone)",
    ),
)
WORKER_FLAGS = (
    flag(
        "--redis-url",
        default=os.environ.get("MEMSERVE_REDIS_URL"),
        help="the Redis of the jobs and memories, as for `serve` (required; default: $MEMSERVE_REDIS_URL)",
    ),
    flag("--heartbeat-interval", type=float, default=2.0, help="seconds between heartbeats"),
    flag(
        "--claim-idle", type=float, default=15.0, help="take over a job whose worker is silent this long (s)"
    ),
    flag("--max-attempts", type=int, default=3, help="fail a job whose workers died this often"),
    flag(
        "--drain-seconds",
        type=float,
        default=300.0,
        help="on SIGTERM, finish the job in hand for this long, then hand it back to the queue",
    ),
    flag("--metrics-port", type=int, default=9465, help="Prometheus /metrics port; 0 = off"),
    flag("--metrics-host", default="127.0.0.1", help="address the metrics port listens on (0.0.0.0: all)"),
)


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the gRPC server", description="Runs the gRPC server.")
    add_model_flags(serve)
    add_flags(serve, SERVE_FLAGS + COMPUTE_FLAGS)
    serve.set_defaults(run=run_serve)
    help = "run a trainer worker against a Redis"
    worker = commands.add_parser("worker", help=help, description=help)
    add_model_flags(worker)
    add_flags(worker, WORKER_FLAGS + COMPUTE_FLAGS)
    worker.set_defaults(run=run_worker)


def add_model_flags(parser: argparse.ArgumentParser | Any, defaults: bool = True) -> None:
    """The model flags; without `defaults` they stay None when not given."""
    for names, options in MODEL_FLAGS:
        default = MODEL_DEFAULTS[names[0][2:].replace("-", "_")] if defaults else None
        parser.add_argument(*names, default=default, **options)


def model_config(args: argparse.Namespace) -> Any:
    from memserve.models import ModelConfig

    given = {name: getattr(args, name) for name in MODEL_DEFAULTS}
    return ModelConfig(**{name: given[name] or default for name, default in MODEL_DEFAULTS.items()})


def computing_process(args: argparse.Namespace) -> None:
    """Before torch is imported: one OpenMP team, owned by the engine or a training job."""
    from memserve.engine.threads import THREADS_ENV, one_team_per_process

    if args.threads:
        os.environ[THREADS_ENV] = str(args.threads)
    one_team_per_process()


def run_serve(args: argparse.Namespace) -> int:
    computing_process(args)
    from memserve.api.app import serve

    asyncio.run(serve(server_config(args)))
    return 0


def server_config(args: argparse.Namespace) -> Any:
    from memserve.api.app import ServerConfig
    from memserve.api.quotas import Quota
    from memserve.engine.scheduler import EngineConfig
    from memserve.memory.runtime import StoreConfig

    store = StoreConfig(
        redis_url=args.redis_url,
        data_dir=args.data_dir,
        cache_bytes=args.cache_mb << 20,
        workers=args.workers,
        plugins=tuple(args.plugin),
    )
    engine = EngineConfig(
        max_batch_size=args.max_batch_size,
        max_queue_size=args.max_queue_size,
        default_max_new_tokens=args.default_max_new_tokens,
        max_new_tokens_limit=args.max_new_tokens_limit,
        max_context_tokens=args.max_context_tokens,
        max_prefill_tokens=args.max_prefill_tokens,
    )
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if args.auth_reads and token is None and args.tokens_file is None:
        raise ValueError(f"--auth-reads needs tokens: set ${TOKEN_ENV} or pass --tokens-file")
    return ServerConfig(
        tls=tls_config(args),
        host=args.host,
        port=args.port,
        http_port=args.http_port or None,
        metrics_port=args.metrics_port or None,
        metrics_max_memory_labels=args.metrics_max_memories,
        # A token file or a Kubernetes Secret made with --from-file usually ends with a newline.
        auth_token=token,
        tokens_file=args.tokens_file,
        auth_reads=args.auth_reads,
        quota=Quota(
            stored_bytes=args.quota_stored_mb << 20,
            active_jobs=args.quota_active_jobs,
            requests_per_second=args.quota_requests_per_second,
        ),
        store=store,
        model=model_config(args),
        engine=engine,
    )


def tls_config(args: argparse.Namespace) -> Any:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    from memserve.api.tls import TlsConfig

    return TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)


def run_worker(args: argparse.Namespace) -> int:
    if not args.redis_url:
        raise ValueError(
            "a standalone worker needs --redis-url (or $MEMSERVE_REDIS_URL); "
            "a server on the embedded Redis runs its own worker"
        )
    computing_process(args)
    from memserve.training.worker import WorkerConfig, run_worker

    config = WorkerConfig(
        heartbeat_interval=args.heartbeat_interval,
        claim_idle=args.claim_idle,
        max_attempts=args.max_attempts,
        drain_seconds=args.drain_seconds,
    )
    # A worker only trains, and trains on the dense weights: packing would cost it a build.
    run_worker(
        args.redis_url,
        dataclasses.replace(model_config(args), weights="dense"),
        config,
        plugins=tuple(args.plugin),
        metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host,
    )
    return 0
