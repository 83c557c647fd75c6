"""The shipped Grafana dashboard and Prometheus alert rules: promtool checks the rules and runs
their unit tests, and every query names metrics the worker really exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kit.prometheus import DEPLOY, promtool
from worker.consume.observability import Metrics

RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "pabx-worker.json"
README = Path(__file__).resolve().parents[1] / "README.md"

#: Suffixes a histogram or counter sample adds to its family's name.
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def _family(sample: str) -> str:
    for suffix in _SUFFIXES:
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample


def _families(expr: str) -> set[str]:
    return {_family(name) for name in re.findall(r"\bpabx_worker_\w+", expr)}


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_runs_the_rule_unit_tests() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULE_TESTS.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_every_alert_has_a_runbook_line_in_the_readme() -> None:
    readme = README.read_text()
    for rule in alert_rules():
        assert re.search(rf"^\| `{rule['alert']}` \|.+\|.+\|$", readme, re.M), rule["alert"]
        assert "runbook" in rule["annotations"]


@pytest.mark.parametrize("expr", [r["expr"] for r in alert_rules()] + dashboard_exprs())
def test_queries_name_only_metrics_the_worker_exports(expr: str) -> None:
    exported = {family.name for family in Metrics().registry.collect()}
    assert _families(expr) <= exported


def test_dashboard_covers_what_an_operator_watches() -> None:
    families = set().union(*(_families(expr) for expr in dashboard_exprs()))
    assert families >= {
        "pabx_worker_commands",
        "pabx_worker_outcome_seconds",
        "pabx_worker_pabx_request_seconds",
        "pabx_worker_retries",
        "pabx_worker_circuit_state",
        "pabx_worker_in_flight",
        "pabx_worker_ready",
    }
    assert any(expr.startswith("sum by (queue) (rabbitmq_") for expr in dashboard_exprs())


def test_dashboard_panels_use_the_datasource_variable_and_unique_ids() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "instance", "queues"}
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
