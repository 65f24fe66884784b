"""The committed gRPC stubs must be exactly what scripts/gen_protos.py makes from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_up_to_date():
    gen = _generator()
    expected = gen.generate_stubs()
    committed = {p.name: p.read_text() for p in gen.STUB_DIR.glob("*_pb2*")}
    assert sorted(committed) == sorted(expected), "stub files differ: run `make protos`"
    stale = [name for name, text in expected.items() if committed[name] != text]
    assert not stale, f"stale stubs {stale}: run `make protos` and commit the result"


def test_every_rpc_is_documented():
    """Each RPC in proto/ carries a comment: the API is its own documentation."""
    for proto in (ROOT / "proto" / "memserve" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.strip().startswith("rpc "):
                assert lines[number - 1].strip().startswith("//"), f"{proto.name}:{number + 1} {line.strip()}"


def test_the_config_messages_document_exactly_the_kinds_options():
    """Each kind's options are defined once (its config dataclass); the API's docs follow from them."""
    gen = _generator()
    proto = gen.MEMORY_PROTO.read_text()
    assert gen.documented(proto) == proto, "option docs are stale: run `make protos` and commit the result"


def test_a_config_message_that_lacks_an_option_is_caught():
    gen = _generator()
    proto = gen.MEMORY_PROTO.read_text().replace("  optional uint32 key_depth = 5;\n", "")
    with pytest.raises(ValueError, match="lacks the options \\['key_depth'\\]"):
        gen.documented(proto)


def test_the_option_tables_of_the_docs_are_the_kinds_options():
    gen = _generator()
    markdown = gen.MEMORIES_DOC.read_text()
    assert markdown.count("<!-- options: ") == 3
    assert gen.option_tables(markdown) == markdown, "option tables are stale: run `make protos` and commit"
