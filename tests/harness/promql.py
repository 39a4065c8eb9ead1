"""PromQL expressions held against what the sidecar exports: for the tests that keep
config/prometheus-alerts.yml and config/grafana-dashboard.json true to the code.

`parse` is a small PromQL reader, enough for the expressions we write: it finds every vector
selector (metric name and label matchers), every grouping label (by, without, on, ignoring,
group_left, group_right) and every function called, and rejects what it cannot read
(unbalanced brackets, a malformed matcher). It is not a full parser: operator precedence and
types are not its business, only the names an expression depends on.

`Catalogue` is what the code exports, read from a real `Metrics` registry, and the label values
the code can set. `Catalogue.problems` says what in one expression the sidecar does not export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prometheus_client.metrics import MetricWrapperBase

from dkim_sidecar import __version__
from dkim_sidecar.dkim.keys import Algorithm
from dkim_sidecar.metrics import Metrics
from dkim_sidecar.runtime import SOURCE_KINDS
from dkim_sidecar.session import Reason

# Series Prometheus makes itself for each scrape target, and the labels it puts on every series
# of a target (from the scrape config, not from the sidecar).
PROMETHEUS_SERIES = {"up": ("job", "instance")}
TARGET_LABELS = ("job", "instance")
# Labels whose values are data, not code (a domain the config names): any value is right. Every
# other label's values the Catalogue lists; a label with no list is an error, not "anything".
# (The target labels are the scrape config's: _matcher_problems checks them apart.)
FREE_LABELS = {("dkim_sidecar_domain_messages", "domain")}

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "hour",
    "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_desc", "sort_by_label",
    "sort_by_label_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan",
    "tanh", "time", "timestamp", "vector", "year",
    "start", "end",  # the @ modifier's
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)(?:(?:ms|[smhdwy])\d*)*)
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}@])
    """,
    re.VERBOSE,
)
_STRING_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str  # =, !=, =~, !~
    value: str


@dataclass(frozen=True)
class Selector:
    metric: str | None  # None: {__name__=~"..."} or a selector without a name
    matchers: tuple[Matcher, ...]


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    grouping: list[str] = field(default_factory=list)  # by (...), on (...), ...
    functions: list[str] = field(default_factory=list)  # rate, sum, histogram_quantile, ...


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group()))
    return out


def _unquote(literal: str) -> str:
    if literal[0] == "`":
        return literal[1:-1]
    return _STRING_ESCAPE.sub(r"\1", literal[1:-1])


def parse(expr: str) -> Query:
    """The names one PromQL expression depends on; ValueError for what it cannot read."""
    tokens = _tokens(expr)
    query = Query()
    depth = 0  # parentheses
    i = 0

    def at(k: int) -> tuple[str, str]:
        return tokens[k] if k < len(tokens) else ("end", "")

    def matchers(k: int) -> tuple[tuple[Matcher, ...], int]:
        """Label matchers from the `{` at k; returns them and the index past the `}`."""
        found: list[Matcher] = []
        k += 1
        while at(k) != ("op", "}"):
            kind, label = at(k)
            if kind == "string":
                label = _unquote(label)
            elif kind != "name":
                raise ValueError(f"label name expected, not {label!r} in {expr!r}")
            _, op = at(k + 1)
            value_kind, value = at(k + 2)
            if op not in {"=", "!=", "=~", "!~"} or value_kind != "string":
                raise ValueError(f"malformed matcher after {label!r} in {expr!r}")
            found.append(Matcher(label, op, _unquote(value)))
            k += 3
            if at(k) == ("op", ","):
                k += 1
            elif at(k) != ("op", "}"):
                raise ValueError(f"',' or '}}' expected after {label}{op}{value} in {expr!r}")
        return tuple(found), k + 1

    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "name" and text in GROUPING:
            i += 1
            if at(i) == ("op", "("):
                i += 1
                while at(i) != ("op", ")"):
                    label_kind, label = at(i)
                    if label_kind not in {"name", "string"}:
                        raise ValueError(f"label name expected in {text}(...) of {expr!r}")
                    query.grouping.append(_unquote(label) if label_kind == "string" else label)
                    i += 1
                    if at(i) == ("op", ","):
                        i += 1
                i += 1
            elif text not in {"group_left", "group_right"}:
                raise ValueError(f"{text} without a label list in {expr!r}")
        elif kind == "name" and text in KEYWORDS:
            i += 1
        elif kind == "name" and (at(i + 1) == ("op", "(") or text in AGGREGATIONS):
            query.functions.append(text)
            i += 1
        elif kind == "name":
            i += 1
            found: tuple[Matcher, ...] = ()
            if at(i) == ("op", "{"):
                found, i = matchers(i)
            query.selectors.append(Selector(text, found))
        elif (kind, text) == ("op", "{"):
            found, i = matchers(i)
            names = [m.value for m in found if m.label == "__name__" and m.op == "="]
            rest = tuple(m for m in found if m.label != "__name__" or m.op != "=")
            query.selectors.append(Selector(names[0] if names else None, rest))
        else:
            if (kind, text) == ("op", "("):
                depth += 1
            elif (kind, text) == ("op", ")"):
                depth -= 1
                if depth < 0:
                    raise ValueError(f"unbalanced ')' in {expr!r}")
            elif (kind, text) == ("op", "}"):
                raise ValueError(f"unbalanced '}}' in {expr!r}")
            i += 1
    if depth:
        raise ValueError(f"unbalanced '(' in {expr!r}")
    return query


class Catalogue:
    """What a fresh `Metrics` registry exports (the same registry /metrics serves): every
    name a sample can have, with the labels of its family, and the values each label can take."""

    def __init__(self) -> None:
        metrics = Metrics()
        # family name -> its sample names; from the registry, so a collector that is not a
        # Metrics attribute still counts
        self.families: dict[str, set[str]] = {}
        # sample name -> family name, and family -> label names
        self.family_of: dict[str, str] = {}
        self.labels: dict[str, tuple[str, ...]] = {}
        # (family, label) -> the values the code can set (a label in FREE_LABELS: any value)
        self.values: dict[tuple[str, str], set[str]] = {}
        wrappers = {
            family.name: collector
            for collector in vars(metrics).values()
            if isinstance(collector, MetricWrapperBase)
            for family in collector.describe()
        }
        for family in metrics.registry.collect():
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_count", "_sum"),
            }.get(family.type, ("",))
            names = {family.name + suffix for suffix in suffixes}
            self.families[family.name] = names
            collector = wrappers.get(family.name)
            # prometheus_client has no public accessor for a metric's label names;
            # `_labelnames` it has had for years. Without a wrapper: the labels its samples show.
            labels = (
                list(collector._labelnames)
                if collector is not None
                else sorted({k for s in family.samples for k in s.labels} - {"le"})
            )
            self.labels[family.name] = tuple(labels)
            for name in names:
                self.family_of[name] = family.name
            # the children a fresh registry already has (Metrics creates them up front), and
            # the buckets of a histogram (le)
            for sample in family.samples:
                for label, value in sample.labels.items():
                    self.values.setdefault((family.name, label), set()).add(value)
        # the children made on the fly, from the code that makes them
        outcomes = {r.outcome for r in Reason}
        self._add("dkim_sidecar_messages", "outcome", outcomes)
        self._add("dkim_sidecar_messages", "reason", {r.value for r in Reason})
        self._add("dkim_sidecar_domain_messages", "outcome", outcomes)
        self._add("dkim_sidecar_signatures", "algorithm", {a.value for a in Algorithm})
        self._add("dkim_sidecar_keys_loaded", "source", set(SOURCE_KINDS))
        self._add("dkim_sidecar_build_info", "version", {__version__})

    def _add(self, family: str, label: str, values: set[str]) -> None:
        assert label in self.labels[family], f"{family} has no label {label}"
        self.values.setdefault((family, label), set()).update(values)

    def values_of(self, family: str, label: str) -> set[str] | None:
        """The values the code can give `label` of `family`; None for a free label (any value).
        LookupError for a label with no list: the list is missing here (see _add)."""
        if (family, label) in FREE_LABELS:
            return None
        known = self.values.get((family, label))
        if known is None:
            raise LookupError(f"{family}{{{label}}}: the catalogue lists no values for it")
        return known

    def sample_labels(self, name: str) -> tuple[str, ...]:
        """The labels a series of this name has, the target's included."""
        if name in PROMETHEUS_SERIES:
            return PROMETHEUS_SERIES[name]
        labels = self.labels[self.family_of[name]] + TARGET_LABELS
        return (*labels, "le") if name.endswith("_bucket") else labels

    def problems(self, expr: str, *, variables: bool = False) -> list[str]:
        """What in `expr` the sidecar does not export: metric names, labels, label values,
        grouping labels, functions. With `variables`, Grafana's $variables may stand for the
        value of a target label (job, instance)."""
        try:
            query = parse(expr)
        except ValueError as e:
            return [str(e)]
        found = []
        labels: set[str] = set()
        for selector in query.selectors:
            name = selector.metric
            if name is None or (name not in self.family_of and name not in PROMETHEUS_SERIES):
                found.append(f"{name}: not a metric the sidecar exports")
                continue
            labels.update(self.sample_labels(name))
            family = self.family_of.get(name)
            for m in selector.matchers:
                found += self._matcher_problems(name, family, m, variables)
        for label in query.grouping:
            if label not in labels:
                found.append(f"grouping by {label}: no series in the expression has it")
        for function in query.functions:
            if function not in FUNCTIONS | AGGREGATIONS:
                found.append(f"{function}: not a PromQL function")
        return found

    def _matcher_problems(
        self, name: str, family: str | None, m: Matcher, variables: bool
    ) -> list[str]:
        """One matcher of any kind (=, !=, =~, !~): the metric has the label, and the value is
        one the code can set (a regex: each alternative matches one) where the values are known.
        A matcher for a value no series has is a bug either way: = and =~ select nothing, != and
        !~ exclude nothing."""
        if m.label not in self.sample_labels(name):
            return [f"{name} has no label {m.label}"]
        where = f"{name}{{{m.label}{m.op}{m.value!r}}}"
        regex = m.op in {"=~", "!~"}
        if m.label in TARGET_LABELS:  # set by the scrape config, not the code: values unknown
            if variables:
                variable = re.fullmatch(r"\$\w+|\$\{\w+(:\w+)?\}", m.value)
                return [] if variable else [f"{name}{{{m.label}}}: a $variable expected"]
            return _regex_problems(where, m.value, None) if regex else []
        try:
            known = self.values_of(family or "", m.label)
        except LookupError as e:
            return [f"{where}: {e}"]
        if regex:
            return _regex_problems(where, m.value, known)
        if known is not None and m.value not in known:
            return [f"{where}: the code never sets it"]
        return []


# What Python's re has and RE2 (Prometheus's regex engine) lacks: lookaround, a named
# backreference, atomic groups, conditionals (a numbered backreference: _alternatives).
_NOT_RE2 = ("(?=", "(?!", "(?<=", "(?<!", "(?P=", "(?>", "(?(")


def _alternatives(pattern: str) -> tuple[list[str], list[str]]:
    """The top-level alternatives of a regex (`|` outside groups and classes), and what in it
    RE2 lacks."""
    parts: list[str] = []
    lacking: list[str] = []
    depth = start = i = 0
    in_class = False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if not in_class and pattern[i + 1 : i + 2] in tuple("123456789"):
                lacking.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 2 if pattern[i + 1 : i + 2] == "^" else 1
            if pattern[i : i + 1] == "]":  # a ']' first in a class is one of its characters
                i += 1
            continue
        elif c == "(":
            depth += 1
            lacking += [s for s in _NOT_RE2 if pattern.startswith(s, i)]
        elif c == ")":
            depth -= 1
        elif c == "|" and not depth:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    return [*parts, pattern[start:]], lacking


def _regex_problems(where: str, pattern: str, known: set[str] | None) -> list[str]:
    """A label regex as Prometheus reads it (RE2, anchored at both ends, so Python's fullmatch):
    it compiles, uses nothing RE2 lacks and, where the label's values are known, each of its
    alternatives matches one of them (else it is a typo, or selects nothing)."""
    try:
        re.compile(pattern)
    except re.error as e:
        return [f"{where}: not a regex ({e})"]
    parts, lacking = _alternatives(pattern)
    if lacking:
        return [f"{where}: {', '.join(lacking)} is not RE2, which Prometheus uses"]
    if known is None:
        return []
    return [
        f"{where}: {part!r} matches no value the code sets"
        for part in parts
        if not any(re.fullmatch(part, value) for value in known)
    ]
