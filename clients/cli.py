"""The `memserve` command line. It calls the client (or, for `serve`, starts the server)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from memserve.clients.client import DEFAULT_SERVER, Client, default_server


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the client commands must not pay for loading torch.
    from memserve.app import ServerConfig, serve
    from memserve.engine import EngineConfig
    from memserve.models import ModelConfig
    from memserve.store_runtime import StoreConfig

    config = ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port == 0 else args.metrics_port,
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
    from memserve.models import ModelConfig
    from memserve.worker import WorkerConfig, run_worker

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
    }
    with Client(args.server) as client:
        if args.stream:
            seed = None
            for chunk in client.generate_stream(prompt, **options):
                print(chunk.text, end="", flush=True)
                seed = chunk.seed if seed is None else seed
                finish = chunk
            print()
            summary = (finish.finish_reason, finish.prompt_tokens, finish.generated_tokens, seed)
        else:
            completion = client.generate(prompt, **options)
            print(completion.text)
            summary = (
                completion.finish_reason,
                completion.prompt_tokens,
                completion.generated_tokens,
                completion.seed,
            )
    if args.verbose:
        reason, prompt_tokens, generated, seed = summary
        print(
            f"[{reason}; {prompt_tokens} prompt + {generated} generated tokens; seed {seed}]", file=sys.stderr
        )
    return 0


def _info(args: argparse.Namespace) -> int:
    with Client(args.server) as client:
        print(client.model_info(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    _model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port; 0 = off")
    _redis_option(serve, "default: an embedded Redis, persisted under --data-dir")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the embedded Redis keeps memories and jobs (default: $MEMSERVE_DATA_DIR or the user data dir)",
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
    _plugin_option(worker)
    worker.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    worker.set_defaults(run=_worker)

    generate = commands.add_parser("generate", help="generate text with a running server")
    generate.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    _server_option(generate)
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
    generate.add_argument("-v", "--verbose", action="store_true", help="print finish reason and token counts")
    generate.set_defaults(run=_generate)

    info = commands.add_parser("info", help="describe the served model and the server's limits")
    _server_option(info)
    info.set_defaults(run=_info)
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
