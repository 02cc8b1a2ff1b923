"""What deploy/prometheus and deploy/grafana ship is valid and refers only to metrics that
exist; the gateway's exposition parses and follows the naming conventions."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.core import metrics
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread, require_tool, tiny_store

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "genfleet-dashboard.json"

# Ray Serve's own metrics the rules and the dashboard use (tests/integration/
# test_prometheus.py finds each of them in a real Prometheus scraping `genfleet up`)
RAY_SERVE = frozenset({"ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas",
                       "ray_serve_autoscaling_desired_replicas"})
STANDARD = frozenset({"up", "process_cpu_seconds_total"})
_KEYWORDS = frozenset({"sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "and", "or", "unless", "offset", "bool"})


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        token, rest = match.group(), expr[match.end():].lstrip()
        if rest.startswith("(") or token in _KEYWORDS or re.fullmatch(r"[0-9.e+-]+", token):
            continue
        names.add(token)
    return names


def exposed_names() -> set[str]:
    """Every series name the specs produce, as Prometheus stores them."""
    out = set()
    for spec in metrics.ALL:
        suffixes = ("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",)
        out |= {spec.exposed + s for s in suffixes}
    return out


def _rules() -> list[dict[str, Any]]:
    return [rule for path in sorted((PROMETHEUS / "rules").glob("*.yml"))
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in _rules() if "record" in r}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


# --------------------------------------------------------------------- promtool
def _promtool() -> str:
    return require_tool("promtool", "apt-get install prometheus")


@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml"],
    ["check", "rules", "rules/recording.yml", "rules/alerts.yml"],
    ["test", "rules", "tests/alerts.test.yml"],
], ids=["check-config", "check-rules", "test-rules"])
def test_promtool_accepts_the_shipped_files(args: list[str]) -> None:
    done = subprocess.run([_promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS / "tests" / "alerts.test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
              if case["exp_alerts"]}
    assert alerts == tested


# ------------------------------------------------------------- names and queries
def test_the_extractor_finds_metric_names() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{m=~"x"}[5m])))'
                        ) == {"a_bucket"}
    assert metric_names("x:y:z > 1 and on (model) b_total unless c") == {"x:y:z", "b_total", "c"}


def test_rules_and_dashboard_read_only_metrics_that_exist() -> None:
    known = exposed_names() | recorded_names() | RAY_SERVE | STANDARD
    for rule in _rules():
        assert metric_names(rule["expr"]) <= known, rule
    queries = dashboard_queries()
    assert len(queries) >= 15
    for expr in queries:
        assert metric_names(expr) <= known, expr
    # every recorded series is shown or alerted on
    used = set().union(*(metric_names(e) for e in queries + [r["expr"] for r in _rules()
                                                             if "alert" in r]))
    assert recorded_names() <= used


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"


# ------------------------------------------------------------------ exposition
def test_gateway_exposition_parses_and_follows_the_conventions(tmp_path: Path) -> None:
    tiny_store(tmp_path, ["gan"], steps=1)
    thread = GatewayThread(lambda: InProcessBackend(tmp_path, ["gan"]),
                           GatewayConfig(host="127.0.0.1", port=0, metrics_port=0, token="s"))
    try:
        with GenfleetClient(thread.target, token="s", retries=0) as client:
            client.generate("gan", 2, seed=1)
            client.generate("gan@1", 1, seed=2)
            for bad in ("nope", "gan@7"):
                with pytest.raises(grpc.RpcError):
                    client.generate(bad, 1)
            client.list_models()
        with GenfleetClient(thread.target, token="wrong", retries=0) as client, \
                pytest.raises(grpc.RpcError):
            client.generate("gan", 1)
        url = f"http://127.0.0.1:{thread.gateway.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        thread.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    specs = {s.name.removesuffix("_total") if s.kind == "counter" else s.name: s
             for s in metrics.GATEWAY}
    ours = {name: f for name, f in families.items() if name.startswith("genfleet_")}
    assert set(ours) == set(specs)
    for name, family in ours.items():
        spec = specs[name]
        assert family.type == spec.kind
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}
            assert labels == set(spec.labels), (sample.name, labels)
    requests = {(s.labels["model"], s.labels["code"]): s.value
                for s in families["genfleet_gateway_requests"].samples
                if s.name.endswith("_total") and s.labels["method"] == "Generate"}
    # a served name (any version) is its own label; an unknown name is "other"
    assert requests == {("gan", "OK"): 2, ("other", "NOT_FOUND"): 1, ("gan", "NOT_FOUND"): 1,
                        ("", "UNAUTHENTICATED"): 1}
    latency = families["genfleet_gateway_request_duration_seconds"]
    counts = {s.labels["model"]: s.value for s in latency.samples
              if s.name.endswith("_count") and s.labels["method"] == "Generate"}
    assert counts == {"gan": 3, "other": 1, "": 1}
    assert "process_cpu_seconds" in families
