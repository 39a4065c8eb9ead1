"""config/prometheus-alerts.yml stays true to the code: every dkim_sidecar metric it names is
one the sidecar exports (the same registry /metrics serves), every label it filters on is one
that metric has, and every label value is one the sidecar can set. A renamed metric or reason
would otherwise leave an alert that never fires, silently."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from dkim_sidecar.metrics import Metrics
from dkim_sidecar.session import Reason

RULES = Path(__file__).resolve().parents[1] / "config" / "prometheus-alerts.yml"
SELECTOR = re.compile(r"(dkim_sidecar_\w+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')

# the values each label can take, from the code that sets it
VALUES = {
    "outcome": {r.outcome for r in Reason},
    "reason": {r.value for r in Reason},
    "source": {"directory", "table", "redis"},
    "result": {"ok", "failed", "partial"},
    "algorithm": {"rsa-sha256", "ed25519-sha256"},
}


def exported() -> dict[str, tuple[str, ...]]:
    """Each name a sample of ours can have -> the labels of its family. (prometheus_client
    has no public accessor for a metric's label names; `_labelnames` it has had for years.)"""
    names: dict[str, tuple[str, ...]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = tuple(collector._labelnames)
        for family in collector.describe():
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_count", "_sum"),
            }.get(family.type, ("",))
            for suffix in suffixes:
                names[family.name + suffix] = labels
    return names


def test_alert_rules_name_what_the_sidecar_exports() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert len(rules) >= 8
    names = exported()
    seen = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        for metric, matchers in SELECTOR.findall(rule["expr"]):
            assert metric in names, f"{rule['alert']}: {metric} is not exported"
            seen.add(metric)
            for label, value in MATCHER.findall(matchers):
                assert label in names[metric], f"{rule['alert']}: {metric} has no {label}"
                assert value in VALUES[label], f"{rule['alert']}: {label}={value} never set"
    # the rules reach the metrics an operator most needs watched
    assert {
        "dkim_sidecar_keys_loaded",
        "dkim_sidecar_redis_up",
        "dkim_sidecar_messages_total",
    } <= seen


def test_the_checker_catches_a_wrong_name() -> None:
    """The check above can fail: a misspelt metric and a reason no code sets are caught."""
    names = exported()
    assert "dkim_sidecar_message_total" not in names  # the real one ends in messages_total
    assert "no_keys" not in VALUES["reason"]
    assert "outcome" in names["dkim_sidecar_messages_total"]
