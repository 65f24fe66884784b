"""Scale-out: a client given several servers (what a headless Service's DNS name resolves to)
spreads its requests over all of them instead of pinning one connection to the first."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from memserve.clients import Client
from tests.test_server import ServerThread, tiny_server_config


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir) -> Iterator[list[ServerThread]]:
    servers = [ServerThread(tiny_server_config(tiny_llama_dir)) for _ in range(2)]
    yield servers
    for server in servers:
        server.close()


def counting(submit: Callable[..., Any], served: list[int], index: int) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        served[index] += 1
        return submit(*args, **kwargs)

    return counted


def test_a_multi_address_target_reaches_every_replica(replicas, monkeypatch):
    served = [0] * len(replicas)
    for index, server in enumerate(replicas):
        engine = server.running.engine
        monkeypatch.setattr(engine, "submit", counting(engine.submit, served, index))
    target = "ipv4:" + ",".join(f"127.0.0.1:{server.running.port}" for server in replicas)
    with Client(target, timeout=30) as client:
        for _ in range(8):
            client.generate("Once upon a time", max_new_tokens=1)
    assert sum(served) == 8 and min(served) >= 2, served

    served[:] = [0] * len(replicas)
    with Client(f"127.0.0.1:{replicas[0].running.port}", timeout=30) as client:
        for _ in range(4):
            client.generate("Once upon a time", max_new_tokens=1)
    assert served == [4, 0]
