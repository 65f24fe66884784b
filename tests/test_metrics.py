"""Prometheus metrics: a real server (tiny Llama, a real Redis) generates with every memory kind,
and its /metrics shows every metric the dashboard and the alert rules use, moved."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from memserve.clients.client import Client, adapter_ref, document_ref, local_ref
from memserve.metrics import BoundedLabels
from tests.conftest import wait_until
from tests.test_server import ServerThread, tiny_server_config
from tests.test_server_store import store_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

# What the issue names; the dashboard and the rules may use no other memserve_* metric.
EXPORTED = {
    "memserve_requests_total", "memserve_request_duration_seconds", "memserve_time_to_first_token_seconds",
    "memserve_inter_token_latency_seconds", "memserve_prompt_tokens_total", "memserve_generated_tokens_total",
    "memserve_batch_size", "memserve_queue_depth", "memserve_running_requests",
    "memserve_document_selected_entries", "memserve_document_selection_mass",
    "memserve_local_positions_checked_total", "memserve_local_triggers_total", "memserve_local_trigger_value",
    "memserve_adapter_tokens_total", "memserve_memory_cache_hits_total", "memserve_memory_cache_misses_total",
    "memserve_memory_cache_bytes", "memserve_memory_load_seconds", "memserve_jobs_total",
    "memserve_job_duration_seconds", "memserve_job_queue_depth", "memserve_workers_alive",
}  # fmt: skip
GAUGES = {"memserve_queue_depth", "memserve_running_requests", "memserve_job_queue_depth"}  # may read 0


def scrape(port: int) -> dict[str, list]:
    """Samples by family name (counters without their _total, as the parser names them)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def family(samples: dict[str, list], metric: str) -> list:
    for suffix in ("_total", ""):
        name = metric.removesuffix(suffix) if suffix else metric
        if name in samples:
            return samples[name]
    return []


def moved(samples: list) -> bool:
    """A counter or gauge above 0, a histogram with observations."""
    counts = [s for s in samples if s.name.endswith("_count")]
    values = counts or [s for s in samples if not s.name.endswith(("_bucket", "_sum", "_created"))]
    return any(s.value > 0 for s in values)


def used_by_deploy() -> set[str]:
    """memserve_* metric names in the dashboard and the alert rules (empty before deploy/ has them)."""
    names: set[str] = set()
    for path in [*DEPLOY.rglob("*.json"), *DEPLOY.rglob("*rules*.yml")]:
        text = path.read_text()
        names |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"memserve_[a-z_]+", text)}
    return names


@pytest.fixture(scope="module")
def metrics_server(tiny_llama_dir, redis_standalone):
    config = replace(
        tiny_server_config(tiny_llama_dir, store=store_config(redis_standalone.url)), metrics_port=0
    )
    server = ServerThread(config)
    yield server
    server.close()


MEMORIES = [document_ref("m-bank", "fox"), local_ref("m-set"), adapter_ref("m-adapter")]


@pytest.fixture(scope="module")
def address(metrics_server) -> str:
    """The server, with a bank, a local set and an adapter trained (tiny Llama)."""
    address = f"127.0.0.1:{metrics_server.running.port}"
    fox = "The quick brown fox jumps over the lazy dog. " * 4
    with Client(address, tenant="", token="") as client:
        jobs = [
            client.register_documents("m-bank", [("fox", fox), ("sea", "Once upon a time by the sea. " * 6)],
                                      config={"epochs": 2, "window_words": 16, "window_stride": 8}),
            client.register_facts("m-set", [{"prompt": "The quick brown fox", "target": " village"}],
                                  config={"generated_prompts": 1, "layers": [1, 2]}),
            client.register_adapter("m-adapter", templates=[("What jumps?", "The fox.")],
                                    config={"epochs": 2, "hidden_size": 8}),
        ]  # fmt: skip
        for job in jobs:
            assert list(client.watch_job(job.id))[-1].state == "succeeded"
    return address


def test_every_metric_exists_and_moves_with_every_memory_kind(metrics_server, address):
    with Client(address, tenant="", token="") as client:
        for memory in MEMORIES:
            client.generate("The quick brown fox", memories=[memory], max_new_tokens=4, ignore_eos=True)
        client.generate("The quick brown fox", memories=MEMORIES, max_new_tokens=4, ignore_eos=True)
        list(client.generate_stream("Once upon a time", max_new_tokens=4, ignore_eos=True))
        with pytest.raises(grpc.RpcError):  # counted with its code
            client.generate("", max_new_tokens=4)
    samples = scrape(metrics_server.running.metrics_port)
    missing = [m for m in sorted(EXPORTED) if not family(samples, m)]
    assert not missing, f"not exported: {missing}"
    still = [m for m in sorted(EXPORTED - GAUGES) if not moved(family(samples, m))]
    assert not still, f"never moved: {still}"
    assert used_by_deploy(), "the dashboard and the rules name memserve metrics"
    assert not used_by_deploy() - EXPORTED, "deploy/ uses metrics the server does not export"
    requests = family(samples, "memserve_requests_total")
    codes = {(s.labels["rpc"], s.labels["code"]) for s in requests if s.value > 0}
    assert {("Generate", "OK"), ("GenerateStream", "OK"), ("Generate", "INVALID_ARGUMENT")} <= codes
    assert ("RegisterAdapter", "OK") in codes
    labelled = {
        "memserve_document_selection_mass": ("bank", "m-bank"),
        "memserve_local_triggers_total": ("set", "m-set"),
        "memserve_adapter_tokens_total": ("adapter", "m-adapter"),
    }
    for metric, (label, value) in labelled.items():
        assert any(s.labels.get(label) == value for s in family(samples, metric)), metric
    jobs_done = {
        (s.labels["kind"], s.labels["state"]) for s in family(samples, "memserve_jobs_total") if s.value
    }
    assert {("document", "succeeded"), ("local", "succeeded"), ("adapter", "succeeded")} <= jobs_done
    assert [s.value for s in family(samples, "memserve_workers_alive")] == [1.0]


def test_per_memory_labels_stay_bounded():
    labels = BoundedLabels(limit=2)
    assert [labels(n) for n in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "other", "a", "other", "b"]
    assert BoundedLabels(limit=0)("a") == "other"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_a_real_prometheus_scrapes_the_server_and_reads_back_the_trigger_rate(
    metrics_server, address, tmp_path
):
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is missing: `make install` installs Debian's prometheus package"
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{DEPLOY / 'prometheus' / 'rules.yml'}']\n"
        "scrape_configs:\n"
        "  - job_name: memserve-server\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_server.running.metrics_port}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: _ready(port), timeout=60)
        with Client(address, tenant="", token="") as client:
            deadline = time.monotonic() + 4  # traffic across several scrapes
            while time.monotonic() < deadline:
                client.generate(
                    "The quick brown fox", memories=[local_ref("m-set")], max_new_tokens=2, ignore_eos=True
                )
        own = scrape(metrics_server.running.metrics_port)
        triggers = sum(
            s.value for s in family(own, "memserve_local_triggers_total") if s.labels.get("set") == "m-set"
        )
        checked = sum(
            s.value
            for s in family(own, "memserve_local_positions_checked_total")
            if s.labels.get("set") == "m-set"
        )
        ratio = (
            'sum(memserve_local_triggers_total{set="m-set"})'
            ' / sum(memserve_local_positions_checked_total{set="m-set"})'
        )

        def read_back() -> bool:
            result = _query(port, ratio)["data"]["result"]
            return bool(result) and abs(float(result[0]["value"][1]) - triggers / checked) < 1e-9

        wait_until(read_back, timeout=30)  # the same trigger rate, through Prometheus's HTTP API
        assert 0 < triggers <= checked
        recorded = 'memserve:local_trigger_rate:ratio_rate15m{set="m-set"}'
        wait_until(lambda: bool(_query(port, recorded)["data"]["result"]), timeout=30)  # the recording rule
        # Every query of the dashboard is valid PromQL against this Prometheus.
        dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "memserve.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                answer = _query(port, target["expr"].replace("$__rate_interval", "1m"))
                assert answer["status"] == "success", (panel["title"], answer)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
