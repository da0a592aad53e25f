"""docs/grafana-dashboard.json: valid JSON, a Grafana dashboard whose every PromQL expression
queries only metrics the code defines (the routed client's, metrics.py; the retrain job's
textfile metrics, jobmetrics.py) under the names Prometheus exposes them, and every one of them
somewhere."""
import json
import pathlib
import re

import pytest

from milvus_ltr_router import jobmetrics

DASHBOARD = pathlib.Path(__file__).parents[1] / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(milvus_ltr_router_[a-zA-Z0-9_]+)")
# what a family of each type exposes (prometheus_client's text format; _created left out)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "info": ("_info",), "gauge": ("",)}


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def panels(dashboard):
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def expressions(dashboard):
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def client_series_names():
    """The series names the routed client's recorder exposes, from its registered families."""
    prom = pytest.importorskip("prometheus_client")
    from milvus_ltr_router.metrics import RouterMetrics
    registry = prom.CollectorRegistry()
    RouterMetrics(registry)
    names = set()
    for family in registry.collect():
        suffixes = SUFFIXES["info" if family.type == "info" else family.type]
        names |= {family.name + s for s in suffixes}
    return names


def test_the_dashboard_is_a_grafana_dashboard(dashboard):
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "collection", "target"} <= variables
    for p in panels(dashboard):
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    for title, expr in expressions(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), title
        used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
        assert used <= variables, (title, used)


def test_every_queried_metric_is_defined_and_every_defined_one_is_shown(dashboard):
    client = client_series_names()
    retrain = set(jobmetrics.METRICS)
    queried = {name for _, expr in expressions(dashboard) for name in METRIC.findall(expr)}
    for v in dashboard["templating"]["list"]:
        queried |= set(METRIC.findall(json.dumps(v.get("query", ""))))
    undefined = queried - client - retrain
    assert not undefined, f"the dashboard queries metrics nobody defines: {sorted(undefined)}"
    # every metric is on the dashboard (in at least one of the names its family exposes)
    bases = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in queried}
    missing = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in client} - bases
    assert not missing, f"client metrics without a panel: {sorted(missing)}"
    assert retrain <= queried, f"retrain metrics without a panel: {sorted(retrain - queried)}"


def test_the_panels_the_issue_asks_for(dashboard):
    titles = " | ".join(p["title"].lower() for p in panels(dashboard))
    for words in ("routed vs passed through", "fallbacks by reason", "clusters probed per query",
                  "routing latency", "search latency", "live recall", "routed writes",
                  "query log", "retrain outcome", "gain", "age of the last run"):
        assert words in titles, words
    exprs = " ".join(e for _, e in expressions(dashboard))
    assert "histogram_quantile(0.5" in exprs and "histogram_quantile(0.99" in exprs
    assert "vector($target)" in exprs                     # live recall against its target


def test_documented_retrain_metrics_are_the_ones_written():
    doc = (DASHBOARD.parent / "metrics.md").read_text()
    documented = set(re.findall(r"^\| [^|`]+ \| `(milvus_ltr_router_retrain_\w+)`", doc, re.M))
    assert documented == set(jobmetrics.METRICS)
