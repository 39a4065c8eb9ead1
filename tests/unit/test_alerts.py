"""config/prometheus-alerts.yml stays true to the code: every metric it names is one the
sidecar exports (the same registry /metrics serves) or Prometheus's own `up`, every label it
filters or groups on is one that metric has, and every label value is one the sidecar can set
(with =, !=, =~ or !~; a regex must also compile as Prometheus reads it, RE2 and anchored).
A renamed metric or reason would otherwise leave an alert that never fires, silently. Reading
the PromQL and listing what the code exports is harness/promql.py's, shared with
test_dashboard.py."""

from __future__ import annotations

import pytest
import yaml

from harness.paths import REPO
from harness.promql import Catalogue, parse

RULES = REPO / "config" / "prometheus-alerts.yml"


def test_alert_rules_name_what_the_sidecar_exports() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert len(rules) >= 8
    catalogue = Catalogue()
    seen = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert catalogue.problems(rule["expr"]) == [], rule["alert"]
        seen.update(s.metric for s in parse(rule["expr"]).selectors)
    # the rules reach the metrics an operator most needs watched
    assert {
        "up",
        "dkim_sidecar_keys_loaded",
        "dkim_sidecar_redis_up",
        "dkim_sidecar_messages_total",
    } <= seen


def test_the_checker_catches_a_wrong_name() -> None:
    """The check above can fail: a misspelt metric, a label the metric lacks and a reason no
    code sets are caught."""
    catalogue = Catalogue()
    assert (
        catalogue.problems('increase(dkim_sidecar_messages_total{reason="no_key"}[1h]) > 0') == []
    )
    # the real one ends in messages_total
    assert catalogue.problems("dkim_sidecar_message_total > 0") != []
    assert catalogue.problems('dkim_sidecar_messages_total{reason="no_keys"} > 0') != []
    assert catalogue.problems('dkim_sidecar_redis_up{source="redis"} == 0') != []


# every matcher kind, right: = and =~ select, != and !~ exclude, values the code sets
RIGHT = [
    'dkim_sidecar_messages_total{reason!="not_relay"}',
    'dkim_sidecar_messages_total{reason=~"no_key|already_signed"}',
    'dkim_sidecar_messages_total{reason=~"no_(key|sender)|(bad|multiple)_from"}',
    'dkim_sidecar_messages_total{reason=~"no_.*", outcome!~"signed|aborted"}',
    'up{job=~"dkim-sidecar|mailcow-.+", instance!~"127[.].*"}',
    'dkim_sidecar_domain_messages_total{domain="example.com"}',  # any domain can be a value
    'dkim_sidecar_sign_duration_seconds_bucket{le=~"0[.]01|[+]Inf"}',  # the buckets it has
]


@pytest.mark.parametrize("expr", RIGHT)
def test_the_checker_takes_right_matchers_of_every_kind(expr: str) -> None:
    assert Catalogue().problems(expr) == []


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ('dkim_sidecar_messages_total{reason="no_keys"}', "never sets it"),
        ('dkim_sidecar_messages_total{reason!="not_relays"}', "never sets it"),
        ('dkim_sidecar_redis_up{source!="redis"}', "has no label source"),
        ('dkim_sidecar_messages_total{reason=~"no_key|no_keys"}', "'no_keys' matches no value"),
        ('dkim_sidecar_messages_total{reason=~"(no_key|authenticated"}', "not a regex"),
        ('dkim_sidecar_messages_total{reason=~"(?!no_key).*"}', "not RE2"),
        ('dkim_sidecar_messages_total{reason=~"no_"}', "'no_' matches no value"),  # anchored
        ('dkim_sidecar_signatures_total{outcome=~"signed"}', "has no label outcome"),
        ('dkim_sidecar_messages_total{outcome!~"signed|faild"}', "'faild' matches no value"),
        ('up{job!~"dkim-sidecar["}', "not a regex"),
        ('dkim_sidecar_redis_up{source!~"redis"}', "has no label source"),
        ('dkim_sidecar_sign_duration_seconds_bucket{le="0.2"}', "never sets it"),
        ('dkim_sidecar_sign_duration_seconds_count{le="0.1"}', "has no label le"),
    ],
)
def test_the_checker_catches_a_wrong_matcher_of_every_kind(expr: str, why: str) -> None:
    found = Catalogue().problems(expr)
    assert any(why in p for p in found), found


def test_a_label_without_a_value_list_is_an_error() -> None:
    """Only FREE_LABELS take any value: a label whose value list is missing (one added to the
    code and not to the catalogue) is reported, not let through."""
    catalogue = Catalogue()
    expr = 'dkim_sidecar_messages_total{reason="no_key"}'
    assert catalogue.problems(expr) == []
    del catalogue.values[("dkim_sidecar_messages", "reason")]
    assert any("lists no values" in p for p in catalogue.problems(expr)), catalogue.problems(expr)
