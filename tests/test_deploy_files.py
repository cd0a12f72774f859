"""The operator files in deploy/: the Grafana dashboard checked against Grafana's dashboard JSON
model (top-level fields, panels, grid, datasource, targets, template variables), the Prometheus
alert rules and scrape config parsed; every PromQL expression's metric names, label names and
label values exist in what `chroma_agent.serving.metrics` exposes (or Prometheus' own `up`)."""
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from chroma_agent.serving.metrics import NAMES, ServerMetrics, exposition

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "chroma-agent.json"
ALERTS = REPO / "deploy" / "prometheus" / "chroma-agent-alerts.yml"
SCRAPE = REPO / "deploy" / "prometheus" / "scrape.yml"

# Grafana's dashboard JSON model: the top-level fields an exported dashboard carries, by type
TOP_LEVEL = {"title": str, "uid": str, "schemaVersion": int, "panels": list, "templating": dict,
             "time": dict, "timepicker": dict, "annotations": dict, "editable": bool, "graphTooltip": int,
             "refresh": str, "tags": list, "timezone": str, "version": int}
# the panel types Grafana ships (no plugin to install)
BUILTIN_PANELS = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap", "histogram",
                  "piechart", "barchart", "state-timeline", "status-history", "xychart", "trend", "logs",
                  "nodeGraph", "traces", "flamegraph", "alertlist", "annolist", "dashlist", "news", "canvas",
                  "geomap", "candlestick", "datagrid"}
VARIABLE_TYPES = {"query", "datasource", "custom", "constant", "interval", "textbox", "adhoc"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__all"}
# Grafana unit ids this dashboard may use (a typo would show raw numbers)
UNITS = {"s", "ms", "bytes", "percentunit", "percent", "short", "none", "cps", "ops", "reqps", "mps"}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
TARGET_LABELS = {"job", "instance", "server"}   # added by Prometheus / scrape.yml, not by the servers
FUNCTIONS_OR_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                      "unless", "offset", "inf", "nan"}


def exposed() -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> values, as a fresh server's /metrics shows them (every
    labelled family given a series), plus Prometheus' own `up`."""
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    metrics.outbound("answered", 0)        # these series appear on first use
    metrics.invalid_message("invalid_json", 0)
    metrics.invalid_message("invalid_json")
    body, _ = exposition(registry)
    samples: dict[str, dict[str, set[str]]] = {"up": {}}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return samples


EXPOSED = exposed()
_STRING = r'"(?:[^"\\]|\\.)*"'
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*(' + _STRING + ")")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w$:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")   # a whole word, not a call


def promql_problems(expr: str) -> list[str]:
    """What in `expr` names a metric, label or label value that the servers do not expose."""
    problems, metrics = [], []
    for name, matchers in _SELECTOR.findall(expr):
        if name:
            metrics.append(name)
        for label, op, quoted in _MATCHER.findall(matchers):
            value = json.loads(quoted)
            if name and label not in TARGET_LABELS | {"__name__"}:
                known = EXPOSED.get(name, {})
                if label not in known:
                    problems.append(f"{name} has no label {label!r}")
                elif op in ("=", "!=") and "$" not in value and value not in known[label]:
                    problems.append(f"{name}{{{label}}} never has the value {value!r}")
    bare = re.sub(_STRING, '""', expr)
    bare = re.sub(r"\{[^{}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    grouped = set()
    for _, labels in _GROUPING.findall(bare):
        grouped |= {label.strip() for label in labels.split(",") if label.strip()}
    bare = _GROUPING.sub(" ", bare)
    metrics += [word for word in _IDENTIFIER.findall(bare) if word.lower() not in FUNCTIONS_OR_WORDS]
    metrics = list(dict.fromkeys(metrics))   # a selector's name is found again once its braces go
    for name in metrics:
        if name not in EXPOSED and not (name.startswith("process_") and sys.platform != "linux"):
            problems.append(f"no metric named {name!r}")
    known_labels = TARGET_LABELS.union(*(EXPOSED.get(name, {}) for name in metrics))
    problems += [f"no metric in {expr!r} has the label {label!r}" for label in sorted(grouped - known_labels)]
    if not metrics:
        problems.append(f"no metric in {expr!r}")
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def all_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in data_panels(dashboard) for t in p["targets"]]


# -- the checker itself must catch mistakes ---------------------------------------------------

@pytest.mark.parametrize("expr,problem", [
    ("sum(rate(chroma_calls_totl[5m]))", "no metric named 'chroma_calls_totl'"),
    ("histogram_quantile(0.95, sum by (le) (rate(chroma_engine_tick_second_bucket[1m])))", "no metric named"),
    ('rate(chroma_calls_refused_total{reason="capcity"}[1m])', "never has the value 'capcity'"),
    ('rate(chroma_calls_total{status="completed"}[1m])', "has no label 'status'"),
    ("sum by (outcom) (rate(chroma_calls_total[1m]))", "has the label 'outcom'"),
    ("process_rss_bytes", "no metric named 'process_rss_bytes'"),
])
def test_the_checker_catches_a_wrong_name(expr, problem):
    assert any(problem in p for p in promql_problems(expr)), promql_problems(expr)


def test_the_checker_accepts_what_the_servers_expose():
    for expr in ('1 - sum by (instance) (rate(chroma_engine_tick_seconds_bucket{job=~"$job", le="0.08"}[5m]))'
                 " / sum by (instance) (rate(chroma_engine_tick_seconds_count[5m]))",
                 'sum by (kind) (rate(chroma_invalid_messages_total{instance=~"$instance"}[$__rate_interval]))',
                 'absent(up{job=~"chroma-agent.*"})', "process_threads", "max by (job) (chroma_engine_load) > 0.9"):
        assert promql_problems(expr) == [], expr


# -- the dashboard -----------------------------------------------------------------------------

def test_dashboard_has_grafanas_top_level_fields(dashboard):
    for key, kind in TOP_LEVEL.items():
        assert isinstance(dashboard.get(key), kind), f"{key}: {dashboard.get(key)!r}"
    assert dashboard["schemaVersion"] >= 39
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard.get("id") is None   # an import makes its own id
    assert dashboard["time"]["from"].startswith("now-") and dashboard["time"]["to"] == "now"
    assert isinstance(dashboard["templating"]["list"], list)
    assert isinstance(dashboard["annotations"]["list"], list)


def test_dashboard_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert len(variables) == len(dashboard["templating"]["list"]), "variable names repeat"
    for v in variables.values():
        assert v["type"] in VARIABLE_TYPES, v
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "instance"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == DATASOURCE and v["includeAll"] and v["multi"]
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        inner = re.fullmatch(rf"label_values\((.*), {name}\)", query)
        assert inner and promql_problems(inner.group(1)) == [], query
    used = set()
    for text in [*all_exprs(dashboard), json.dumps([p.get("datasource") for p in dashboard["panels"]])]:
        used |= set(re.findall(r"\$\{?(\w+)", text))
    assert used - GRAFANA_BUILTINS <= set(variables), used - GRAFANA_BUILTINS - set(variables)


def test_dashboard_panels_follow_grafanas_model(dashboard):
    panels = dashboard["panels"]
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), ids
    cells = {}
    row_y = None
    for p in panels:
        assert p.get("type") in BUILTIN_PANELS, p.get("type")
        assert isinstance(p.get("title"), str) and p["title"].strip(), p
        grid = p["gridPos"]
        assert set(grid) >= {"h", "w", "x", "y"} and all(isinstance(grid[k], int) for k in "hwxy"), p["title"]
        assert 1 <= grid["w"] <= 24 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]
        assert grid["h"] >= 1 and grid["y"] >= 0, p["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):   # no two panels share a cell
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            assert grid["w"] == 24 and grid["h"] == 1 and isinstance(p["panels"], list)
            assert row_y is None or grid["y"] > row_y
            row_y = grid["y"]
            continue
        assert row_y is not None and grid["y"] > row_y, f"{p['title']} sits above its row"
        assert p.get("datasource") == DATASOURCE, p["title"]
        targets = p.get("targets")
        assert targets, p["title"]
        ref_ids = [t.get("refId") for t in targets]
        assert all(isinstance(r, str) and r for r in ref_ids) and len(set(ref_ids)) == len(ref_ids), p["title"]
        for t in targets:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), p["title"]
            assert t.get("datasource", DATASOURCE) == DATASOURCE, p["title"]
        defaults = p["fieldConfig"]["defaults"]
        assert defaults.get("unit") in UNITS, f"{p['title']}: unit {defaults.get('unit')!r}"
        steps = defaults.get("thresholds", {}).get("steps", [])
        assert not steps or steps[0]["value"] is None, f"{p['title']}: the base step has no value"


def test_dashboard_exprs_name_only_exposed_metrics(dashboard):
    problems = {expr: found for expr in all_exprs(dashboard) if (found := promql_problems(expr))}
    assert not problems, problems


def test_dashboard_shows_every_metric(dashboard):
    text = " ".join(all_exprs(dashboard))
    missing = [n for n in NAMES if not re.search(rf"\b{n}(_bucket|_count|_sum)?\b", text)]
    assert not missing, missing
    for name in ("process_resident_memory_bytes", "process_threads"):
        assert name in text


def test_dashboard_key_panels(dashboard):
    by_title = {p["title"]: p for p in data_panels(dashboard)}
    ttfa = " ".join(t["expr"] for t in by_title["Time to first audio p50 / p95"]["targets"])
    for q in ("0.5", "0.95"):
        assert f"histogram_quantile({q}, sum by (le) (rate(chroma_time_to_first_audio_seconds_bucket" in ttfa
    tick = by_title["Engine tick p95 vs the 80 ms budget"]
    defaults = tick["fieldConfig"]["defaults"]
    assert defaults["unit"] == "s"
    assert any(step["value"] == 0.08 for step in defaults["thresholds"]["steps"])
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off"   # the budget drawn as a line
    assert "histogram_quantile(0.95" in tick["targets"][-1]["expr"]
    assert "chroma_engine_tick_seconds_bucket" in tick["targets"][-1]["expr"]
    assert by_title["Resident memory"]["fieldConfig"]["defaults"]["unit"] == "bytes"
    assert by_title["Engine load"]["fieldConfig"]["defaults"]["unit"] == "percentunit"


# -- the alert rules and the scrape config -----------------------------------------------------

@pytest.fixture(scope="module")
def rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"} and document["groups"]
    found = []
    for group in document["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        found += group["rules"]
    return found


def test_alert_rules_follow_prometheus_format(rules):
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
        assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", rule["for"]), rule["for"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), rule["alert"]
        assert promql_problems(rule["expr"]) == [], (rule["alert"], promql_problems(rule["expr"]))
        grouped = {label.strip() for _, labels in _GROUPING.findall(rule["expr"]) for label in labels.split(",")}
        for text in annotations.values():
            assert text.count("{{") == text.count("}}"), rule["alert"]
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert not grouped or used <= grouped, f"{rule['alert']}: {used - grouped} is summed away"


def test_alert_rules_cover_the_issue(rules):
    by_name = {r["alert"]: r for r in rules}
    tick = by_name["ChromaEngineTickOverBudget"]
    assert "chroma_engine_tick_seconds_bucket" in tick["expr"] and "histogram_quantile(0.95" in tick["expr"]
    assert re.search(r">\s*0\.08\b", tick["expr"]) and tick["for"] == "1m"
    assert "chroma_calls_refused_total" in by_name["ChromaCallsRefused"]["expr"]
    assert re.search(r"\bup\{.*\}\s*==\s*0", by_name["ChromaTargetDown"]["expr"])
    assert by_name["ChromaTargetsAbsent"]["expr"].startswith("absent(up{")


def test_scrape_config_matches_the_alerts():
    document = yaml.safe_load(SCRAPE.read_text())
    assert ALERTS.name in document["rule_files"]
    jobs = document["scrape_configs"]
    assert jobs
    up_matchers = set(re.findall(r'up\{job=~"([^"]+)"\}', ALERTS.read_text()))
    assert up_matchers
    for job in jobs:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for matcher in up_matchers:   # the no-scrape alerts see every job here
            assert re.fullmatch(matcher, job["job_name"]), (matcher, job["job_name"])
        for static in job["static_configs"]:
            assert all(re.fullmatch(r"[\w.-]+:\d+", target) for target in static["targets"])


def test_readme_shows_how_to_use_them():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Dashboards and alerts", 1)[1].split("\n## ", 1)[0]
    for path in (DASHBOARD, ALERTS, SCRAPE):
        assert str(path.relative_to(REPO)) in section
