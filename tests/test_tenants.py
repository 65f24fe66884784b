"""Tenants bound to tokens: the tenant matrix (every cross-tenant read, export, use in generation,
delete and job action refused), scopes, --auth-reads, the same rules over HTTP, and a tokens file
reloaded without a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch

import tests.kinds  # noqa: F401  (the test-bias kind)
from memserve.api.auth import Auth, parse_tokens
from memserve.clients import Client
from memserve.clients.errors import MemserveError
from memserve.errors import InvalidArgument, PermissionDenied
from memserve.memory_store.artifact import MemoryMeta
from tests.test_server import ServerThread, tiny_server_config
from tests.test_server_store import store_config

ALICE, BOB, ALICE_READER, ADMIN = ("alice-" + "a" * 20, "bob-" + "b" * 20, "alice-ro-" + "c" * 20,
                                   "admin-" + "d" * 20)  # fmt: skip
TOKENS = {
    "tokens": [
        {"token": ALICE, "tenant": "alice", "scopes": ["read", "write"]},
        {"token": BOB, "tenant": "bob", "scopes": ["read", "write"]},
        {"token": ALICE_READER, "tenant": "alice", "scopes": ["read"]},
        {"token": ADMIN, "scopes": ["admin"]},
    ]
}
FACT = {"id": "f", "prompt": "The sky is", "target": " green"}


@pytest.fixture(scope="module", params=[False, True], ids=["reads-open", "auth-reads"])
def tenanted(
    request, tiny_llama_dir, redis_standalone, tmp_path_factory
) -> Iterator[tuple[ServerThread, Path, bool]]:
    from tests.conftest import flush

    flush([redis_standalone])
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    config = tiny_server_config(tiny_llama_dir, store=store_config(str(redis_standalone.url), workers=0))
    server = ServerThread(replace(config, http_port=0, tokens_file=tokens, auth_reads=request.param))
    store = server.running.runtime.store
    for tenant in ("alice", "bob"):
        meta = MemoryMeta(kind="test-bias", name="mem", tenant=tenant, hyperparameters={"layer": 1},
                          base_model=server.running.runtime.cache.fingerprint)  # fmt: skip
        store.publish(meta, {"delta": torch.randn(64) * 4, "padding": torch.zeros(0, 64)})
    yield server, tokens, request.param
    server.close()


def client(server: ServerThread, token: str | None, tenant: str | None = None) -> Client:
    return Client(f"127.0.0.1:{server.running.port}", timeout=30, tenant=tenant or "", token=token or "")


def status(action: Callable[[], Any]) -> str:
    try:
        result = action()
        if hasattr(result, "__next__"):
            next(result)
        return "OK"
    except MemserveError as exc:
        return exc.status.name


def bob_job(server: ServerThread) -> str:
    with client(server, BOB) as bob:
        return bob.register_facts("facts", [FACT]).id


ACTIONS: dict[str, Callable[[Client, str], Any]] = {
    "GetMemory": lambda c, job: c.get_memory("mem"),
    "ListMemories": lambda c, job: c.list_memories(),
    "ExportMemory": lambda c, job: c.export_memory("mem"),
    "Generate with the memory": lambda c, job: c.generate("Hi", memories=["mem"], max_new_tokens=1),
    "DeleteMemory": lambda c, job: c.delete_memory("mem"),
    "GetJob": lambda c, job: c.get_job(job),
    "WatchJob": lambda c, job: c.watch_job(job),
    "CancelJob": lambda c, job: c.cancel_job(job),
    "ListJobs": lambda c, job: c.list_jobs(),
    "RegisterFacts": lambda c, job: c.register_facts("facts", [FACT]),
    "SubmitJob": lambda c, job: c.submit_job("local", "facts", {"facts": [FACT]}),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_a_token_cannot_name_another_tenant(tenanted, action):
    server, _, _ = tenanted
    job = bob_job(server)
    with client(server, ALICE, tenant="bob") as alice_as_bob:
        assert status(lambda: ACTIONS[action](alice_as_bob, job)) == "PERMISSION_DENIED"
    with client(server, BOB) as bob:  # nothing of Bob's was touched
        assert bob.get_memory("mem").tenant == "bob" and bob.get_job(job).state == "queued"


@pytest.mark.parametrize("action", ["GetJob", "WatchJob", "CancelJob"])
def test_another_tenants_job_does_not_exist_for_a_token(tenanted, action):
    server, _, _ = tenanted
    job = bob_job(server)
    with client(server, ALICE) as alice:
        assert status(lambda: ACTIONS[action](alice, job)) == "NOT_FOUND"


def test_a_token_works_in_its_own_tenant(tenanted):
    server, _, _ = tenanted
    with client(server, ALICE) as alice, client(server, ADMIN, tenant="bob") as admin:
        assert alice.get_memory("mem").tenant == "alice"
        assert [m.tenant for m in alice.list_memories()] == ["alice"]
        assert alice.generate("Hi", memories=["mem"], max_new_tokens=1).memories[0].version >= 1
        assert admin.get_memory("mem").tenant == "bob"  # the admin scope may name any tenant


def test_scopes_and_missing_tokens(tenanted):
    server, _, auth_reads = tenanted
    with client(server, ALICE_READER) as reader:
        assert status(lambda: reader.get_memory("mem")) == "OK"
        assert status(lambda: reader.delete_memory("mem")) == "PERMISSION_DENIED"
        assert status(lambda: reader.register_facts("facts", [FACT])) == "PERMISSION_DENIED"
    with client(server, None, tenant="bob") as anonymous:
        assert status(lambda: anonymous.delete_memory("mem")) == "UNAUTHENTICATED"
        read = status(lambda: anonymous.generate("Hi", max_new_tokens=1))
        assert read == ("UNAUTHENTICATED" if auth_reads else "OK")
    with client(server, "not-a-token-" + "x" * 10) as stranger:  # as no token, where reads are open
        # reads open: the default tenant, which has no "mem" (Alice's and Bob's stay out of reach)
        assert status(lambda: stranger.get_memory("mem")) == (
            "UNAUTHENTICATED" if auth_reads else "NOT_FOUND"
        )
        assert status(lambda: stranger.delete_memory("mem")) == "UNAUTHENTICATED"


def test_http_follows_the_same_rules(tenanted):
    server, _, auth_reads = tenanted
    base = f"http://127.0.0.1:{server.running.http_port}"
    as_alice = {"Authorization": f"Bearer {ALICE}"}
    assert httpx.get(f"{base}/v1/memories/mem", headers=as_alice).json()["tenant"] == "alice"
    naming_bob = {**as_alice, "memserve-tenant": "bob"}
    assert httpx.get(f"{base}/v1/memories/mem", headers=naming_bob).status_code == 403
    body = {"model": "x", "prompt": "Hi", "max_tokens": 1, "memories": [{"name": "mem"}]}
    model = httpx.get(f"{base}/v1/models", headers=as_alice).json()["data"][0]["id"]
    answered = httpx.post(f"{base}/v1/completions", json={**body, "model": model}, headers=naming_bob)
    assert answered.status_code == 403 and answered.json()["error"]["type"] == "permission_error"
    anonymous = httpx.post(f"{base}/v1/completions", json={**body, "model": model, "memories": []})
    assert anonymous.status_code == (401 if auth_reads else 200)


def test_the_tokens_file_is_reloaded_without_a_restart(tenanted):
    server, tokens, _ = tenanted
    try:
        revoked = {"tokens": [t for t in TOKENS["tokens"] if t["token"] != BOB]}
        tokens.write_text(json.dumps(revoked, indent=1))
        time.sleep(1.1)
        with client(server, BOB) as bob:
            assert status(lambda: bob.delete_memory("mem")) == "UNAUTHENTICATED"
        tokens.write_text("{not json")  # a broken edit keeps the last good tokens
        time.sleep(1.1)
        with client(server, ALICE) as alice:
            assert status(lambda: alice.get_memory("mem")) == "OK"
    finally:
        tokens.write_text(json.dumps(TOKENS, indent=2))
        time.sleep(1.1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "not a tokens file"),
        ('{"tokens": [{"token": "short", "tenant": "a"}]}', "16 characters"),
        ('{"tokens": [{"token": "a-long-enough-token", "scopes": ["read"]}]}', "needs a tenant"),
        ('{"tokens": [{"token": "a-long-enough-token", "tenant": "a", "scopes": ["root"]}]}', "scopes must"),
        ('{"tokens": [{"token": "a-long-enough-token", "tenant": "a"}, {"token": "a-long-enough-token",'
         ' "tenant": "b"}]}', "appears twice"),
    ],
)  # fmt: skip
def test_a_bad_tokens_file_is_one_clear_error(text, message, tmp_path):
    with pytest.raises(InvalidArgument, match=message):
        parse_tokens(text, "tokens.json")
    path = tmp_path / "tokens.json"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        Auth(tokens_file=path)


def test_a_token_may_be_given_by_its_sha256(tmp_path):
    import hashlib

    path = tmp_path / "tokens.json"
    digest = hashlib.sha256(ALICE.encode()).hexdigest()
    path.write_text(json.dumps({"tokens": [{"sha256": digest, "tenant": "alice", "scopes": ["read"]}]}))
    auth = Auth(tokens_file=path, auth_reads=True)
    assert auth.authorize([("authorization", f"Bearer {ALICE}")], "Generate") == "alice"
    with pytest.raises(PermissionDenied, match="'write' scope"):
        auth.authorize([("authorization", f"Bearer {ALICE}")], "DeleteMemory")
