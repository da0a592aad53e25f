"""RouterMetrics: real prometheus_client registry values after each recorder call; the no-op
recorder and a clear ImportError when prometheus_client is missing."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from milvus_ltr_router import metrics as m
from milvus_ltr_router.live_recall import RecallEstimate

NS = "milvus_ltr_router"


@pytest.fixture
def prom():
    return pytest.importorskip("prometheus_client")


@pytest.fixture
def registry(prom):
    return prom.CollectorRegistry()


@pytest.fixture
def rec(registry):
    return m.metrics_recorder(registry)


def value(registry, name, **labels):
    return registry.get_sample_value(f"{NS}_{name}", labels)


def test_one_recorder_per_registry(prom, registry):
    a = m.metrics_recorder(registry)
    assert isinstance(a, m.RouterMetrics) and a.enabled and a.registry is registry
    assert m.metrics_recorder(registry) is a                 # a second client shares the series
    assert m.metrics_recorder(a) is a
    assert m.metrics_recorder(prom.CollectorRegistry()) is not a
    default = m.metrics_recorder(True)
    assert default.registry is prom.REGISTRY and m.metrics_recorder(True) is default


def test_off_is_the_null_recorder():
    for off in (None, False):
        rec = m.metrics_recorder(off)
        assert rec is m.NULL_METRICS and not rec.enabled
    rec = m.NULL_METRICS            # every method accepts the calls and does nothing
    rec.search_routed("c", 2, [1, 2], 0.001, 0.01, "learned")
    rec.search_passed_through("c", "no_layout")
    rec.search_failed("c")
    rec.fallback("c", "no_router")
    rec.router_info("c", None, "centroid", "no_router")
    rec.routed_write("c", 3, 1, 1, 0)
    rec.rows_outside_layout("c", 0)
    rec.query_log("c", sampled=1)
    rec.recall_audit("c", "done")


def test_bad_argument_is_a_type_error():
    with pytest.raises(TypeError, match="CollectorRegistry"):
        m.metrics_recorder("yes")


def test_routed_and_passed_through_searches(registry, rec):
    rec.search_routed("docs", 5, np.array([1, 2, 8, 9, 2000]), 0.0003, 0.02, "learned")
    rec.search_routed("docs", 1, [4], 0.0001, 0.004, "centroid")
    rec.search_passed_through("docs", "partition_names")
    rec.search_passed_through("plain", "no_layout")
    rec.search_passed_through("plain", "something new")     # unknown reason: "other"
    rec.search_failed("docs")
    assert value(registry, "searches_total", collection="docs", routed="true") == 2
    assert value(registry, "searches_total", collection="docs", routed="false") == 1
    assert value(registry, "searches_total", collection="plain", routed="false") == 2
    assert value(registry, "passthrough_searches_total", collection="docs",
                 reason="partition_names") == 1
    assert value(registry, "passthrough_searches_total", collection="plain", reason="other") == 1
    assert value(registry, "search_errors_total", collection="docs") == 1
    assert value(registry, "routed_queries_total", collection="docs", router="learned") == 5
    assert value(registry, "routed_queries_total", collection="docs", router="centroid") == 1
    # probed clusters: one observation per query, cumulative buckets
    for le, n in (("1.0", 1), ("2.0", 2), ("4.0", 3), ("8.0", 4), ("12.0", 5), ("1024.0", 5),
                  ("+Inf", 6)):
        assert value(registry, "probed_clusters_bucket", collection="docs", le=le) == n, le
    assert value(registry, "probed_clusters_count", collection="docs") == 6
    assert value(registry, "probed_clusters_sum", collection="docs") == 1 + 2 + 8 + 9 + 2000 + 4
    assert value(registry, "routing_seconds_count", collection="docs") == 2
    assert value(registry, "routing_seconds_sum", collection="docs") == pytest.approx(0.0004)
    assert value(registry, "routing_seconds_bucket", collection="docs", le="0.0001") == 1
    assert value(registry, "search_seconds_count", collection="docs") == 2
    assert value(registry, "search_seconds_bucket", collection="docs", le="0.005") == 1
    assert value(registry, "search_seconds_sum", collection="docs") == pytest.approx(0.024)


def test_fallbacks_and_router_info(registry, rec):
    for reason in m.FALLBACK_REASONS:
        rec.fallback("docs", reason)
    rec.fallback("docs", "unreadable_file")
    rec.fallback("docs", "bogus")
    assert value(registry, "fallbacks_total", collection="docs", reason="unreadable_file") == 2
    assert value(registry, "fallbacks_total", collection="docs", reason="layout_mismatch") == 1
    assert value(registry, "fallbacks_total", collection="docs", reason="other") == 1
    rec.router_info("docs", None, "centroid", "no_router")
    assert value(registry, "router_info", collection="docs", version="", kind="centroid",
                 fallback_reason="no_router") == 1
    rec.router_info("docs", "20240101-000000", "learned")
    # one series per collection: the new router replaces the fallback's
    assert value(registry, "router_info", collection="docs", version="20240101-000000",
                 kind="learned", fallback_reason="") == 1
    assert value(registry, "router_info", collection="docs", version="", kind="centroid",
                 fallback_reason="no_router") is None


def test_writes_outside_rows_and_query_log(registry, rec):
    rec.routed_write("docs", 100, spilled=7, moved=3)
    rec.routed_write("docs", 0, failed=50)
    assert value(registry, "write_rows_total", collection="docs") == 100
    assert value(registry, "write_spilled_rows_total", collection="docs") == 7
    assert value(registry, "write_moved_keys_total", collection="docs") == 3
    assert value(registry, "write_failed_rows_total", collection="docs") == 50
    rec.rows_outside_layout("docs", 12)
    assert value(registry, "rows_outside_layout", collection="docs") == 12
    rec.rows_outside_layout("docs", -1)
    assert value(registry, "rows_outside_layout", collection="docs") == -1
    rec.query_log("docs", sampled=10)
    rec.query_log("docs", written=8, dropped=1, failed=1)
    for name, n in (("sampled", 10), ("written", 8), ("dropped", 1), ("failed", 1)):
        assert value(registry, f"query_log_{name}_total", collection="docs") == n


def test_live_recall_gauges_and_audits(registry, rec):
    est = RecallEstimate("docs", 0.9, 10, 250, 300, 0.87, 0.85, 0.89, 0.95, True)
    rec.recall("docs", est)
    rec.recall("docs", RecallEstimate("docs", None, 10, 5, 5, 0.99, 0.9, 1.0, 0.95, False))
    labels = dict(collection="docs", target="0.9", k="10")
    assert value(registry, "live_recall", **labels) == pytest.approx(0.87)
    assert value(registry, "live_recall_lower", **labels) == pytest.approx(0.85)
    assert value(registry, "live_recall_upper", **labels) == pytest.approx(0.89)
    assert value(registry, "live_recall_samples", **labels) == 250
    assert value(registry, "live_recall", collection="docs", target="none", k="10") == \
        pytest.approx(0.99)
    rec.recall_audit("docs", "done", 3)
    rec.recall_audit("docs", "dropped")
    assert value(registry, "recall_audits_total", collection="docs", outcome="done") == 3
    assert value(registry, "recall_audits_total", collection="docs", outcome="dropped") == 1


def test_target_label():
    assert m.target_label(None) == "none"
    assert m.target_label(0.9) == "0.9"
    assert m.target_label(0.95000001) == "0.95"


def test_exposition_parses(prom, registry, rec):
    """What a scrape returns parses with prometheus_client's own parser (the bulk histogram
    included) and names each metric's type."""
    rec.search_routed("docs", 3, [2, 2, 3], 0.0002, 0.01, "learned")
    rec.router_info("docs", "v1", "learned")
    rec.routed_write("docs", 4)
    from prometheus_client.parser import text_string_to_metric_families
    text = prom.generate_latest(registry).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families[f"{NS}_probed_clusters"] == "histogram"
    assert families[f"{NS}_routing_seconds"] == "histogram"
    assert families[f"{NS}_searches"] == "counter"
    assert families[f"{NS}_router_info"] == "gauge"        # an Info in the text format
    assert families[f"{NS}_rows_outside_layout"] == "gauge"


def test_documented_metric_names_exist(registry, rec):
    """docs/metrics.md names every metric the recorder registers, and nothing else."""
    import pathlib
    import re
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(milvus_ltr_router_\w+)`", doc, re.M))
    registered = {family.name for family in registry.collect()}   # names without _total/_info
    assert {re.sub(r"_(total|info)$", "", n) for n in documented} == registered


def test_without_prometheus_client_import_works_and_asking_raises():
    """Simulated missing extra: importing the metrics and live recall modules needs nothing,
    metrics off is the null recorder, metrics on raises an ImportError naming [metrics]."""
    script = textwrap.dedent("""
        import sys
        sys.modules["prometheus_client"] = None      # import prometheus_client -> ImportError
        import milvus_ltr_router.metrics as m, milvus_ltr_router.live_recall as lr
        assert m.metrics_recorder(False) is m.NULL_METRICS
        auditor = lr.RecallAuditor(lambda job: [1], metrics=m.metrics_recorder(None))
        auditor.submit(lr.RecallJob("c", [0.0], [1], limit=1)); auditor.flush(); auditor.close()
        assert auditor.status()["done"] == 1
        for arg in (True, object.__new__(type("R", (), {"register": len, "collect": len}))):
            try:
                m.metrics_recorder(arg)
            except ImportError as exc:
                assert "milvus-ltr-router[metrics]" in str(exc), exc
            else:
                raise AssertionError("no ImportError")
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"


def test_importing_the_modules_does_not_import_prometheus_client():
    script = ("import sys, milvus_ltr_router.metrics, milvus_ltr_router.live_recall; "
              "print('prometheus_client' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "False"
