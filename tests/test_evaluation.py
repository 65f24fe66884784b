"""The Evaluate RPC: a memory's evaluation on the server's model and engine, streamed back."""

from __future__ import annotations

import json
import threading
import time

import pytest

import tests.kinds  # noqa: F401  (registers the test-bias kind, which has an evaluation)
from memserve.clients import Client, EvaluationProgress, ReportFile
from memserve.clients.errors import InvalidArgument, NotFound, ResourceExhausted
from tests.test_server_store import peer, publish_bias  # noqa: F401  (a fixture)


def run(client: Client, name: str, **options: object) -> tuple[list[EvaluationProgress], dict[str, bytes]]:
    events = list(client.evaluate("test-bias", name, options=options))
    progress = [e for e in events if isinstance(e, EvaluationProgress)]
    files = {e.name: e.content for e in events if isinstance(e, ReportFile)}
    return progress, files


def test_an_evaluation_streams_its_progress_then_its_report(peer):  # noqa: F811
    publish_bias(peer.running, "shift", value=8.0)
    with Client(f"127.0.0.1:{peer.running.port}") as client:
        progress, files = run(client, "shift", steps=3)
    assert [(p.step, p.total) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    assert sorted(files) == ["metrics.json", "report.md"]
    metrics = json.loads(files["metrics.json"])
    assert metrics["memory"] == "shift" and len(metrics["with"]) == len(metrics["without"]) == 4
    assert metrics["with"] != metrics["without"]  # a bias of norm ~8·√d moves the greedy tokens


@pytest.mark.parametrize(
    ("kind", "name", "options", "error", "match"),
    [
        ("test-bias", "nowhere", {}, NotFound, "nowhere"),
        ("document", "shift", {}, InvalidArgument, "is a test-bias memory, not a document memory"),
        ("test-bias", "shift", {"colour": "red"}, InvalidArgument, "colour"),
        ("no-such-kind", "shift", {}, InvalidArgument, "unknown memory kind"),
    ],
)
def test_a_bad_evaluation_request_says_what_to_fix(peer, kind, name, options, error, match):  # noqa: F811
    publish_bias(peer.running, "shift")
    with Client(f"127.0.0.1:{peer.running.port}") as client, pytest.raises(error, match=match):
        list(client.evaluate(kind, name, options=options))


def test_one_evaluation_at_a_time_and_a_cancelled_one_frees_the_server(peer):  # noqa: F811
    publish_bias(peer.running, "shift")
    with Client(f"127.0.0.1:{peer.running.port}") as client:
        slow = client.evaluate("test-bias", "shift", options={"steps": 200, "step_seconds": 0.05})
        assert isinstance(next(slow), EvaluationProgress)  # it runs
        with pytest.raises(ResourceExhausted, match="running an evaluation"):
            list(client.evaluate("test-bias", "shift"))
        slow.close()  # cancels the call: the evaluation stops at its next progress report
        deadline = time.monotonic() + 10
        while True:
            try:
                _, files = run(client, "shift")
                break
            except ResourceExhausted:
                assert time.monotonic() < deadline, "the cancelled evaluation never ended"
                time.sleep(0.1)
    assert "report.md" in files
    assert threading.active_count() < 50
