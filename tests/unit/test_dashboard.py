"""config/grafana-dashboard.json stays true to the code, like the alert rules (test_alerts.py):
every metric a panel queries is one the sidecar exports (the same registry /metrics serves),
every label it filters or groups on is one that metric has, every label value is one the code
can set, and every legend names a label the query keeps. A renamed metric or reason would
otherwise leave a panel that shows "No data", silently.

And the other way round: every metric family the sidecar exports has a panel, or is listed in
NO_PANEL with the reason. A new metric (say a counter of refused connections) fails
test_every_metric_family_has_a_panel until it gets either.

The dashboard must import into any Grafana: the Prometheus data source is an import input
(${DS_PROMETHEUS}), never a UID of one installation."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

from dkim_sidecar.metrics import Metrics
from harness.paths import REPO
from harness.promql import PROMETHEUS_SERIES, TARGET_LABELS, Catalogue, parse

DASHBOARD = REPO / "config" / "grafana-dashboard.json"
PROMETHEUS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
GRAFANA_BUILTIN = {"type": "grafana", "uid": "-- Grafana --"}  # the built-in annotations
SCHEMA_VERSION = 42  # Grafana 12.3 to 13.2

# Metric families deliberately without a panel: family name (as registered, without _total)
# -> why. Adding a metric to metrics.py means adding a panel for it, or a line here.
NO_PANEL: dict[str, str] = {}

_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_VARIABLE = re.compile(r"\$\{?(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?(\w+)\)$")


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expr, legendFormat) for every PromQL expression anywhere in the dashboard:
    panel targets and annotations alike."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, str, str]]:
        if isinstance(node, dict):
            where = node.get("title") or node.get("name") or where
            if "expr" in node:
                yield where, node["expr"], node.get("legendFormat", "")
            for value in node.values():
                yield from walk(value, where)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value, where)

    yield from walk({k: v for k, v in dashboard.items() if k != "templating"}, "dashboard")


def problems(dashboard: dict[str, Any], catalogue: Catalogue) -> list[str]:
    """What in the dashboard's queries the sidecar does not export."""
    found = []
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for where, expr, legend in queries(dashboard):
        for name in set(_VARIABLE.findall(expr)) - variables:
            if not name.startswith("__"):  # Grafana's own: $__rate_interval, $__range...
                found.append(f"{where}: ${name} is no variable of the dashboard")
        bad = catalogue.problems(expr, variables=True)
        found += [f"{where}: {p}" for p in bad]
        try:
            query = parse(expr)
        except ValueError:
            continue  # reported above
        # a label the legend shows must survive the query: one it groups by, or (without
        # aggregation) one of its series'
        kept = set(query.grouping) or {
            label
            for s in query.selectors
            if s.metric in catalogue.family_of or s.metric in PROMETHEUS_SERIES
            for label in catalogue.sample_labels(s.metric or "")
        }
        for label in _LEGEND_LABEL.findall(legend):
            if label not in kept:
                found.append(f"{where}: legend {{{{{label}}}}} is not a label of the result")
    for variable in dashboard["templating"]["list"]:
        spec = variable.get("query")
        text = spec.get("query", "") if isinstance(spec, dict) else spec
        m = _LABEL_VALUES.match(text or "")
        if variable["type"] != "query" or m is None:
            found.append(f"variable {variable['name']}: not a label_values() query")
            continue
        selector, label = m.groups()
        if selector is None or label not in TARGET_LABELS:
            found.append(f"variable {variable['name']}: {text} (a target label of ours expected)")
            continue
        found += [
            f"variable {variable['name']}: {p}"
            for p in catalogue.problems(selector, variables=True)
        ]
    return found


def uncovered(dashboard: dict[str, Any], catalogue: Catalogue) -> set[str]:
    """The metric families no query of the dashboard reads."""
    used = {s.metric for _, expr, _ in queries(dashboard) for s in parse(expr).selectors}
    return {family for family, names in catalogue.families.items() if not names & used}


def layout_problems(dashboard: dict[str, Any]) -> list[str]:
    """What keeps the dashboard from importing cleanly into another Grafana."""
    found = []
    inputs = {i["name"]: i for i in dashboard.get("__inputs", [])}
    if set(inputs) != {"DS_PROMETHEUS"} or inputs["DS_PROMETHEUS"]["pluginId"] != "prometheus":
        found.append(f"__inputs: one Prometheus input DS_PROMETHEUS expected, not {inputs}")
    if dashboard.get("schemaVersion", 0) < SCHEMA_VERSION:
        found.append(f"schemaVersion {dashboard.get('schemaVersion')} < {SCHEMA_VERSION}")
    if dashboard.get("id") is not None:
        found.append("id: must be null (it is per installation)")

    def datasources(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield value
                else:
                    yield from datasources(value)
        elif isinstance(node, list):
            for value in node:
                yield from datasources(value)

    for ref in datasources({k: v for k, v in dashboard.items() if not k.startswith("__")}):
        if ref not in (PROMETHEUS, GRAFANA_BUILTIN):
            found.append(f"datasource {ref}: {PROMETHEUS} expected")
    for name in set(re.findall(r"\$\{(DS_\w+)\}", json.dumps(dashboard))) - set(inputs):
        found.append(f"${{{name}}} is no import input")

    ids, titles, cells = set(), set(), set()
    for panel in panels(dashboard):
        title = panel.get("title", "")
        if panel["id"] in ids or not title or title in titles:
            found.append(f"panel {panel['id']} {title!r}: id and title must be unique")
        ids.add(panel["id"])
        titles.add(title)
        if panel["type"] != "row" and not (panel.get("description") and panel.get("targets")):
            found.append(f"{title}: a panel needs a description and a query")
        pos = panel["gridPos"]
        if pos["x"] < 0 or pos["x"] + pos["w"] > 24:
            found.append(f"{title}: wider than the grid's 24 columns")
        mine = {(pos["x"] + x, pos["y"] + y) for x in range(pos["w"]) for y in range(pos["h"])}
        if panel["type"] != "row" or not panel.get("collapsed"):
            if mine & cells:
                found.append(f"{title}: overlaps another panel")
            cells |= mine
    return found


def test_dashboard_imports_into_any_grafana() -> None:
    assert layout_problems(load()) == []


def test_every_query_names_what_the_sidecar_exports() -> None:
    dashboard = load()
    assert len(list(queries(dashboard))) >= 20
    assert problems(dashboard, Catalogue()) == []


def test_every_metric_family_has_a_panel() -> None:
    catalogue = Catalogue()
    assert set(NO_PANEL) <= set(catalogue.families), "NO_PANEL names a metric that is gone"
    missing = uncovered(load(), catalogue)
    assert missing == set(NO_PANEL), (
        f"no panel for {sorted(missing - set(NO_PANEL))}: add one to config/grafana-dashboard"
        ".json, or the family to NO_PANEL with the reason; "
        f"with a panel now, drop from NO_PANEL: {sorted(set(NO_PANEL) - missing)}"
    )


def _with_expr(dashboard: dict[str, Any], expr: str, legend: str = "") -> dict[str, Any]:
    changed = copy.deepcopy(dashboard)
    panel = next(p for p in panels(changed) if p["type"] == "timeseries")
    panel["targets"][0].update(expr=expr, legendFormat=legend)
    return changed


def test_the_checker_catches_mistakes() -> None:
    """The checks above can fail: each kind of mistake is caught."""
    dashboard, catalogue = load(), Catalogue()
    ok = 'sum by (outcome) (rate(dkim_sidecar_messages_total{job=~"$job"}[$__rate_interval]))'
    assert problems(_with_expr(dashboard, ok, "{{outcome}}"), catalogue) == []
    for expr, legend, why in [
        # the real one is messages_total
        ("rate(dkim_sidecar_message_total[5m])", "", "dkim_sidecar_message_total"),
        ("rate(dkim_sidecar_messages[5m])", "", "dkim_sidecar_messages:"),
        ("dkim_sidecar_sign_duration_seconds", "", "dkim_sidecar_sign_duration_seconds:"),
        ('rate(dkim_sidecar_messages_total{reason="no_keys"}[5m])', "", "no_keys"),
        ('rate(dkim_sidecar_messages_total{outcome=~"signed|failed"}[5m])', "", "'failed'"),
        ('dkim_sidecar_config_reloads_total{result="partial"}', "", "partial"),
        ('dkim_sidecar_redis_up{source="redis"}', "", "no label source"),
        ('dkim_sidecar_ready{job="dkim-sidecar"}', "", "$variable"),
        ('dkim_sidecar_ready{job=~"$jobs"}', "", "$jobs is no variable"),
        ("sum by (reason) (dkim_sidecar_signatures_total)", "", "grouping by reason"),
        ("sum by (outcome) (dkim_sidecar_messages_total)", "{{reason}}", "legend {{reason}}"),
        ("rat(dkim_sidecar_messages_total[5m])", "", "rat:"),
        ("sum(rate(dkim_sidecar_messages_total[5m])", "", "unbalanced"),
    ]:
        found = problems(_with_expr(dashboard, expr, legend), catalogue)
        assert any(why in p for p in found), (expr, found)

    # a family without a panel is noticed
    family = "dkim_sidecar_key_problems"
    assert family not in uncovered(dashboard, catalogue)
    without = copy.deepcopy(dashboard)
    for panel in panels(without):
        panel["targets"] = [
            t for t in panel.get("targets", []) if "dkim_sidecar_key_problems" not in t["expr"]
        ]
    assert family in uncovered(without, catalogue)

    # a data source of one installation, and a panel on top of another
    local = copy.deepcopy(dashboard)
    panel = next(p for p in panels(local) if p["type"] == "timeseries")
    panel["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
    panel["gridPos"] = dict(next(iter(panels(local)))["gridPos"])
    found = layout_problems(local)
    assert any("P1809F7CD0C75ACF3" in p for p in found), found
    assert any("overlaps" in p for p in found), found


def test_no_created_series() -> None:
    """prometheus_client's *_created series (one per counter and histogram child) are off:
    they double the series and nothing reads them."""
    metrics = Metrics()
    metrics.messages.labels("signed", "signed").inc()
    metrics.domain_messages.labels("example.com", "signed").inc()
    metrics.sign_seconds.observe(0.001)
    metrics.message_bytes.observe(2048)
    text = metrics.render().decode()
    assert "dkim_sidecar_messages_total{" in text
    assert "_created" not in text
    names = {s.name for family in metrics.registry.collect() for s in family.samples}
    assert not {name for name in names if name.endswith("_created")}


def test_the_readme_lists_every_metric() -> None:
    """README's metrics table is what an admin reads first: every family the code exports is
    in it, under the name a scrape shows (`_total` for counters), and nothing else is."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(dkim_sidecar_\w+)` \|", section, re.M))
    catalogue = Catalogue()
    exported = {
        family + "_total" if family + "_total" in names else family
        for family, names in catalogue.families.items()
    }
    assert listed == exported
