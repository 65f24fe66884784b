"""`memserve generate`: text from a running server, with or without memories."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from memserve.clients.cli.arguments import (
    adapter_argument,
    doc_argument,
    docrep_argument,
    facts_argument,
    memory_argument,
    mix_argument,
    non_negative,
)
from memserve.clients.cli.common import add_flags, command, connect, flag
from memserve.clients.cli.output import print_json, print_json_line
from memserve.clients.types import Chunk, Completion, TokenInfo, UsedMemory

# --memory, --doc, --docrep, --mix, --facts and --adapter add to one list, in the order given.
MEMORY_FLAGS = (
    flag(
        "--memory",
        type=memory_argument,
        metavar="NAME[@VERSION]",
        help="a stored memory to use, by name, optionally pinned to a version (repeatable)",
    ),
    flag(
        "--doc",
        type=doc_argument,
        metavar="BANK[@VERSION]/DOC",
        help=(
            "a document of a document bank, by id: --doc news/storm, or --doc news@2/storm for "
            "version 2 of the bank (repeatable)"
        ),
    ),
    flag(
        "--docrep",
        type=docrep_argument,
        metavar="BANK[@VERSION]=X,Y,...",
        help=(
            "an explicit DocRep of a bank, as many values as its key_dim (`memserve docs ls BANK` "
            "shows its documents'): --docrep news=0.5,-0.2 or --docrep news@2=0.5,-0.2 (repeatable)"
        ),
    ),
    flag(
        "--mix",
        type=mix_argument,
        metavar="BANK[@VERSION]/DOC=W,...",
        help=(
            "a weighted mix of documents of one bank, weights >= 0 (normalised): --mix "
            "news/storm=0.7,news/flood=0.3; pin a version with BANK@VERSION "
            "(news@2/storm=0.7,news/flood=0.3) (repeatable)"
        ),
    ),
    flag(
        "--facts",
        type=facts_argument,
        metavar="SET[@VERSION]",
        help="a local memory set (facts registered with `memserve facts add`) (repeatable)",
    ),
    flag(
        "--adapter",
        type=adapter_argument,
        metavar="NAME[@VERSION]",
        help="an adapter memory (trained with `memserve adapters add`) (repeatable)",
    ),
)
GENERATE_FLAGS = (
    flag(
        "--trace",
        action="store_true",
        help="print, per generated token, which memory entries acted on it and how strongly (stderr)",
    ),
    flag("--max-new-tokens", type=int, default=None, help="default: the server's (128)"),
    flag("--temperature", type=float, default=0.0, help="0 = greedy (default)"),
    flag("--top-k", type=non_negative, default=0, help="0 = no limit"),
    flag("--top-p", type=float, default=None),
    flag("--repetition-penalty", type=float, default=None),
    flag("--seed", type=non_negative, default=None),
    flag("--stop", action="append", default=[], help="a stop sequence (repeatable)"),
    flag(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the model's chat template",
    ),
    flag(
        "--stream", action="store_true", help="print tokens as they come (with --json: a JSON line per chunk)"
    ),
    flag(
        "-v",
        "--verbose",
        action="store_true",
        help="print the memories used, finish reason and token counts (stderr)",
    ),
)


def register(commands: Any) -> None:
    parser = command(commands, "generate", "generate text with a running server", run)
    parser.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    for names, options in MEMORY_FLAGS:
        parser.add_argument(*names, dest="memories", action="append", default=[], **options)
    add_flags(parser, GENERATE_FLAGS)


def run(args: argparse.Namespace) -> int:
    # A prompt piped in ends with the newline of its last line, which is not part of it.
    prompt = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
    with connect(args) as client:
        if args.stream:
            result = _stream(client.generate_stream(prompt, **_options(args)), args.json)
        else:
            result = client.generate(prompt, **_options(args))
            _print(result, args.json)
    if args.trace:
        print_trace(result.tokens)
    if args.verbose:
        print_summary(result)
    return 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "chat": args.chat,
        "memories": args.memories,
        "memory_trace": args.trace,
    }


def _print(result: Completion, json: bool) -> None:
    if json:
        print_json(result)
    else:
        print(result.text)


def _stream(chunks: Any, json: bool) -> Completion:
    """Prints the chunks as they come; returns them as one completion."""
    received: list[Chunk] = []
    for chunk in chunks:
        received.append(chunk)
        if json:
            print_json_line(chunk)
        else:
            print(chunk.text, end="", flush=True)
    if not json:
        print()
    first, last = received[0], received[-1]
    return Completion(
        text="".join(c.text for c in received),
        tokens=[token for c in received for token in c.tokens],
        finish_reason=last.finish_reason or "",
        prompt_tokens=last.prompt_tokens,
        generated_tokens=last.generated_tokens,
        seed=first.seed or 0,
        memories=first.memories,
    )


def print_trace(tokens: Sequence[TokenInfo]) -> None:
    """Which memory acted on the position that produced each token, and how strongly (stderr)."""
    print("[trace: token, then each memory that acted on it: name, layer, entry, value]", file=sys.stderr)
    for index, token in enumerate(tokens):
        acted = "; ".join(f"{t.memory} L{t.layer} {t.entry} {t.value:.3f}" for t in token.trace) or "-"
        print(f"{index:>4} {token.text!r:<16} {acted}", file=sys.stderr)


def print_summary(result: Completion) -> None:
    used: Sequence[UsedMemory] = result.memories
    for name, kind, version in used:
        print(f"[memory {name} {kind} v{version}]", file=sys.stderr)
    counts = f"{result.prompt_tokens} prompt + {result.generated_tokens} generated tokens"
    print(f"[{result.finish_reason}; {counts}; seed {result.seed}]", file=sys.stderr)
