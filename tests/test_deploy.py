"""deploy/: Prometheus config and alert rules checked and unit-tested by promtool (Debian's
prometheus package, which `make install` installs), the compose file and the Helm chart call
the real CLI, and the Grafana dashboard is provisioned as the compose stack expects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from memserve.clients.cli import build_parser
from memserve.clients.cli import serve as cli_serve

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make install` installs Debian's prometheus package"
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "rules.yml"),
        ("test", "rules", "rules_test.yml"),
    ],
    ids=["check config", "check rules", "test rules"],
)
def test_promtool_passes(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
    fired = {
        case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    assert alerts == fired
    wanted = ["ServerDown", "HighErrorRatio", "HighLatencyP95", "SlowFirstToken", "TriggerRateJump",
              "TriggerRateCollapse", "JobFailures", "JobBacklog", "NoWorkers"]  # fmt: skip
    assert {f"Memserve{name}" for name in wanted} <= alerts


def test_the_compose_stack_runs_the_real_commands_with_redis_on_aof():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"server", "worker", "redis", "prometheus", "grafana"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    parser = build_parser()
    for name in ("server", "worker"):
        args = parser.parse_args(services[name]["command"])  # every option exists, every value parses
        assert args.metrics_port in (9464, 9465)
    scraped = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {t for job in scraped["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"server:9464", "worker:9465"}


def test_the_helm_chart_passes_only_options_the_cli_knows():
    values = yaml.safe_load((DEPLOY / "helm" / "memserve" / "values.yaml").read_text())
    assert values["redis"]["url"] and "auth" in values and values["serviceMonitor"]["enabled"]
    parser = build_parser()
    for template, command in (("server-deployment.yaml", "serve"), ("worker-deployment.yaml", "worker")):
        text = (DEPLOY / "helm" / "memserve" / "templates" / template).read_text()
        flags = re.findall(r"- (--[a-z-]+)=", text)
        assert flags, template
        # Each flag with a placeholder value of the right type parses.
        numbers = ("--port", "--http-port", "--metrics-port", "--workers", "--max-batch-size", "--cache-mb")
        numbers += ("--threads",)
        sample = dict.fromkeys(numbers, "1")
        argv = [command] + [f"{flag}={sample.get(flag, 'auto' if flag in ('--dtype', '--device') else 'x')}"
                            for flag in flags]  # fmt: skip
        if command == "worker":
            argv += ["--redis-url", "redis://r"]
        parser.parse_args(argv)
    for name in ("secret.yaml", "hpa.yaml", "servicemonitor.yaml", "service.yaml", "prometheusrule.yaml"):
        assert (DEPLOY / "helm" / "memserve" / "templates" / name).exists()
    # The chart's alert rules are the tested ones, and its jobs are named as the rules expect.
    assert (DEPLOY / "helm" / "memserve" / "files" / "rules.yml").read_text() == (
        PROMETHEUS / "rules.yml"
    ).read_text()
    services = (DEPLOY / "helm" / "memserve" / "templates" / "service.yaml").read_text()
    assert "memserve.io/job: memserve-server" in services and "memserve.io/job: memserve-worker" in services
    assert (
        "jobLabel: memserve.io/job"
        in (DEPLOY / "helm" / "memserve" / "templates" / "servicemonitor.yaml").read_text()
    )


def test_the_chart_spreads_load_waits_for_slow_loads_and_can_turn_tls_on():
    chart = DEPLOY / "helm" / "memserve"
    services = (chart / "templates" / "service.yaml").read_text().split("\n---\n")
    headless = [s for s in services if "-headless" in s and "component: server" in s]
    assert len(headless) == 1 and "clusterIP: None" in headless[0] and "name: grpc" in headless[0]
    server = (chart / "templates" / "server-deployment.yaml").read_text()
    assert (
        "startupProbe:" in server and "failureThreshold: {{ div .Values.server.startupSeconds 5 }}" in server
    )
    assert "initialDelaySeconds" not in server  # the startup probe replaces a guessed delay
    values = yaml.safe_load((chart / "values.yaml").read_text())
    assert values["tls"] == {"enabled": False, "secretName": "", "mutual": False}
    assert {"--tls-cert", "--tls-key", "--tls-client-ca"} <= set(re.findall(r"- (--tls-[a-z-]+)=", server))
    assert "- --tokens-file=/etc/memserve/auth/{{ .Values.auth.tokensKey }}" in server
    assert "- --auth-reads" in server and values["auth"]["authReads"] is False
    assert build_parser().parse_args(["serve", "--tokens-file=/etc/x.json", "--auth-reads"]).auth_reads
    assert values["server"]["startupSeconds"] % 5 == 0


def test_the_compose_tls_file_sets_what_serve_reads():
    override = yaml.safe_load((DEPLOY / "docker-compose.tls.yml").read_text())
    environment = override["services"]["server"]["environment"]
    serve_source = Path(cli_serve.__file__).read_text()
    for name in environment:
        assert f'os.environ.get("{name}")' in serve_source, name
    assert any(v.endswith(":/etc/memserve/tls:ro") for v in override["services"]["server"]["volumes"])


def test_the_dashboard_is_provisioned_with_the_datasource_it_names():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "memserve.json").read_text())
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets and all(t["datasource"]["uid"] == uid and t["expr"] for t in targets)
    titles = {p["title"] for p in dashboard["panels"]}
    wanted = ["Requests by RPC", "Responses by status", "Time to first token", "Tokens/s", "Batch size",
              "Queue and running", "Document selection per bank", "Local trigger rate per set",
              "Memory cache hit ratio", "Memory load time", "Jobs finished",
              "Job queue and workers"]  # fmt: skip
    assert set(wanted) <= titles
