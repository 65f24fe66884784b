"""Per-tenant quotas against a running server (tiny model, real Redis, no workers, so jobs stay
queued): requests per second, jobs queued or running, stored bytes; each answered
RESOURCE_EXHAUSTED (429 over HTTP) for its tenant only, set in the tokens file and re-read."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx2 as httpx
import pytest

import tests.kinds  # noqa: F401  (the test-bias kind)
from memserve.api.auth import Auth
from memserve.api.quotas import MAX_IDLE_BUCKETS, Quota, RateLimiter
from memserve.clients.errors import ResourceExhausted as Refused
from memserve.errors import InvalidArgument, ResourceExhausted
from tests.test_server import ServerThread, tiny_server_config
from tests.test_server_store import publish_bias, store_config
from tests.test_tenants import FACT, client, status

TOKENS = {name: f"{name}-" + "t" * 20 for name in ("alice", "bob", "carol", "dave")}


def tokens_file(quotas: dict[str, dict[str, float]]) -> dict:
    tokens = [
        {"token": token, "tenant": tenant, "scopes": ["read", "write"]} for tenant, token in TOKENS.items()
    ]
    return {"tokens": tokens, "quotas": quotas}


QUOTAS = {"alice": {"active_jobs": 2}, "carol": {"requests_per_second": 3}}


@pytest.fixture(scope="module")
def quoted(tiny_llama_dir, redis_standalone, tmp_path_factory) -> Iterator[tuple[ServerThread, Path]]:
    from tests.conftest import flush

    flush([redis_standalone])
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    path.write_text(json.dumps(tokens_file(QUOTAS)))
    config = tiny_server_config(tiny_llama_dir, store=store_config(str(redis_standalone.url), workers=0))
    server = ServerThread(replace(config, http_port=0, tokens_file=path))
    yield server, path
    server.close()


def as_tenant(server: ServerThread, tenant: str):
    return client(server, TOKENS[tenant])


def test_a_tenant_over_its_request_rate_is_refused_and_others_are_not(quoted):
    server, _ = quoted
    time.sleep(1.0)  # a full bucket
    with as_tenant(server, "carol") as carol, as_tenant(server, "bob") as bob:
        outcomes = [status(carol.model_info) for _ in range(8)]
        assert outcomes[:3] == ["OK"] * 3 and set(outcomes[3:]) == {"RESOURCE_EXHAUSTED"}, outcomes
        assert [status(bob.model_info) for _ in range(8)] == ["OK"] * 8  # no quota of his own
        with pytest.raises(Refused, match=r"over its 3 requests per second: retry in"):
            carol.model_info()
        time.sleep(0.7)  # two more tokens
        assert [status(carol.model_info) for _ in range(2)] == ["OK"] * 2
    base = f"http://127.0.0.1:{server.running.http_port}"
    answers = [
        httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {TOKENS['carol']}"})
        for _ in range(6)
    ]
    limited = [a for a in answers if a.status_code == 429]
    assert limited and limited[0].json()["error"]["type"] == "rate_limit_error"
    assert limited[0].headers["Retry-After"] == "1"  # whole seconds, rounded up, as OpenAI's SDK reads it


def test_jobs_past_the_quota_are_refused_until_one_ends(quoted):
    server, _ = quoted
    with as_tenant(server, "alice") as alice, as_tenant(server, "bob") as bob:
        first = alice.register_facts("facts", [FACT])
        alice.submit_job("local", "facts", {"facts": [FACT]})
        assert status(lambda: alice.register_facts("facts", [FACT])) == "RESOURCE_EXHAUSTED"
        assert status(lambda: alice.submit_job("local", "facts", {"facts": [FACT]})) == "RESOURCE_EXHAUSTED"
        assert all(status(lambda: bob.register_facts("facts", [FACT])) == "OK" for _ in range(3))
        alice.cancel_job(first.id)  # an ended job leaves the count
        assert status(lambda: alice.register_facts("facts", [FACT])) == "OK"
        assert status(lambda: alice.register_facts("facts", [FACT])) == "RESOURCE_EXHAUSTED"
        for job in alice.list_jobs():
            alice.cancel_job(job.id)


def test_simultaneous_submissions_never_pass_the_job_quota(quoted):
    server, _ = quoted
    outcomes: list[str] = []
    with as_tenant(server, "alice") as alice:
        for job in alice.list_jobs():
            alice.cancel_job(job.id)

        def submit() -> None:
            with as_tenant(server, "alice") as mine:
                outcomes.append(status(lambda: mine.register_facts("facts", [FACT])))

        threads = [threading.Thread(target=submit) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 10
        assert len([j for j in alice.list_jobs() if j.state == "queued"]) == 2
        for job in alice.list_jobs():
            alice.cancel_job(job.id)


def test_stored_bytes_past_the_quota_are_refused_until_memories_go(quoted):
    server, path = quoted
    store = server.running.runtime.store
    blob = publish_bias(server.running, "probe", seed=2).size_bytes  # in the default tenant
    exported = b"".join(store.export_chunks("probe")[1])
    with as_tenant(server, "dave") as dave:
        try:
            path.write_text(json.dumps(tokens_file({**QUOTAS, "dave": {"stored_bytes": blob * 3 // 2}})))
            time.sleep(1.1)
            assert store.stored_bytes("dave") == 0
            dave.put_memory(exported, name="first")  # 1.0 of 1.5: fits
            assert store.stored_bytes("dave") == blob
            assert dave.put_memory(exported, name="first").version == 1  # a retry: nothing new, allowed
            assert status(lambda: dave.put_memory(exported, name="second")) == "RESOURCE_EXHAUSTED"  # 2.0
            assert status(lambda: dave.register_facts("facts", [FACT])) == "OK"  # under it: a job may start
            other = store.load("probe")  # what a job would publish: it may pass the quota
            store.publish(replace(other.meta, name="trained", tenant="dave", version=0), other.tensors)
            assert store.stored_bytes("dave") == 2 * blob
            assert status(lambda: dave.register_facts("facts", [FACT])) == "RESOURCE_EXHAUSTED"
            dave.delete_memory("trained")
            assert status(lambda: dave.register_facts("facts", [FACT])) == "OK"
        finally:
            path.write_text(json.dumps(tokens_file(QUOTAS)))
            time.sleep(1.1)
        for job in dave.list_jobs():
            dave.cancel_job(job.id)


def test_a_changed_quota_applies_without_a_restart(quoted):
    server, path = quoted
    with as_tenant(server, "bob") as bob:
        try:
            path.write_text(json.dumps(tokens_file({**QUOTAS, "bob": {"requests_per_second": 1}})))
            time.sleep(1.1)
            outcomes = [status(bob.model_info) for _ in range(4)]
            assert "RESOURCE_EXHAUSTED" in outcomes
        finally:
            path.write_text(json.dumps(tokens_file(QUOTAS)))
            time.sleep(1.1)
        time.sleep(1.0)
        assert [status(bob.model_info) for _ in range(4)] == ["OK"] * 4


def test_the_server_default_applies_to_every_tenant_without_its_own(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [], "quotas": {"vip": {"requests_per_second": 0}}}))
    auth = Auth(tokens_file=path, quota=Quota(requests_per_second=2, active_jobs=5))
    assert auth.quota("anyone") == Quota(requests_per_second=2, active_jobs=5)
    assert auth.quota("vip") == Quota(requests_per_second=0, active_jobs=5)  # 0: no limit of its own
    calls = [[("memserve-tenant", "anyone")]] * 3
    assert auth.authorize(calls[0], "Generate") is None
    auth.authorize(calls[1], "Generate")
    with pytest.raises(ResourceExhausted):
        auth.authorize(calls[2], "Generate")
    for _ in range(10):
        auth.authorize([("memserve-tenant", "vip")], "Generate")
    with pytest.raises(InvalidArgument, match="tenant"):
        auth.authorize([("memserve-tenant", "Not A Tenant")], "Generate")


@pytest.mark.parametrize(
    ("quotas", "message"),
    [
        ([], "quotas must be an object"),
        ({"alice": 3}, "is not an object"),
        ({"alice": {"bytes": 3}}, "unknown"),
        ({"alice": {"stored_bytes": -1}}, "whole number"),
        ({"alice": {"active_jobs": 1.5}}, "whole number"),
        ({"alice": {"requests_per_second": "fast"}}, "a number"),
        ({"alice": {"requests_per_second": True}}, "a number"),
        ({"Alice!": {"active_jobs": 1}}, "tenant"),
    ],
)
def test_a_bad_quota_is_one_clear_error(quotas, message, tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [], "quotas": quotas}))
    with pytest.raises(InvalidArgument, match=message):
        Auth(tokens_file=path)


def test_idle_rate_buckets_are_forgotten():
    limiter = RateLimiter()
    for index in range(MAX_IDLE_BUCKETS):
        limiter.admit(f"idle{index}", 1000.0)  # full again 1 ms later
    time.sleep(0.01)
    limiter.admit("busy", 0.001)  # past the bound: the full ones go; this one is empty for long
    limiter.admit("last", 1000.0)
    assert set(limiter._buckets) == {"busy", "last"}
    with pytest.raises(ResourceExhausted):  # the busy tenant's bucket was kept: still empty
        limiter.admit("busy", 0.001)
