import numpy as np

from milvus_ltr_router.evaluate import coverage, nprobe_grid, routing_quality
from milvus_ltr_router.labels import Neighbours


def test_routing_quality_on_a_hand_example():
    parts = np.array([[0, 1, 1, 2], [3, 3, 0, -1]])
    nb = Neighbours(ids=np.zeros_like(parts), scores=np.zeros(parts.shape, np.float32), partitions=parts)
    probed = np.array([[1, 2], [0, 5]])
    np.testing.assert_array_equal(coverage(probed, parts),
                                  [[False, True, True, True], [False, False, True, False]])
    q = routing_quality(probed, nb, k=4)
    assert q.top1_accuracy == 0.0
    assert np.isclose(q.recall, (3 / 4 + 1 / 3) / 2)    # -1 (no neighbour) is not counted
    assert q.nprobe == 2 and q.mean_probed == 2


def test_nprobe_grid_covers_paper_fractions():
    assert nprobe_grid(1000) == [1, 2, 10, 20, 50, 100]
    assert nprobe_grid(1) == [1]


def test_tied_top1_is_never_a_hit():
    # every query probes the partition of its (arbitrary) top-1 label; the first two are tied
    parts = np.array([[4, 4], [2, 1], [3, 3]])
    tied = np.array([True, True, False])
    probed = parts[:, :1]
    untied = Neighbours(np.zeros_like(parts), np.zeros(parts.shape, np.float32), parts)
    assert routing_quality(probed, untied, k=2).top1_accuracy == 1.0
    q = routing_quality(probed, Neighbours(untied.ids, untied.scores, parts, top1_tied=tied), k=2)
    assert q.top1_accuracy == 1 / 3           # only the untied query counts as a hit
    assert np.isclose(q.recall, (1 + 0.5 + 1) / 3)   # recall@k is unchanged


def test_all_zero_queries_give_no_router_a_free_top1_hit(rng):
    """The gate once published a router at 'top-1 1.0000 vs centroid 0.0000' on zero queries."""
    from milvus_ltr_router.labels import array_blocks, exact_knn
    docs = rng.standard_normal((200, 8)).astype(np.float32)
    doc_parts = np.arange(200) % 5
    nb = exact_knn(np.zeros((30, 8), np.float32), array_blocks(docs, doc_parts, block_rows=64), k=3)
    learned_the_tie_break = nb.partitions[:, :1]        # a router that memorised the label
    assert routing_quality(learned_the_tie_break, nb, k=3).top1_accuracy == 0.0


def test_report_table_takes_quality_rows_or_their_dicts():
    from dataclasses import asdict
    from milvus_ltr_router.evaluate import RoutingQuality
    from milvus_ltr_router.report import format_table
    rows = {"centroid": [RoutingQuality(1, 0.25, 0.5, 10, 1.0), RoutingQuality(4, 0.5, 0.75, 10, 4.0)],
            "learned": [RoutingQuality(1, 0.375, 0.625, 10, 1.0), RoutingQuality(4, 0.875, 0.9, 10, 4.0)]}
    text = format_table(rows)
    assert text == format_table({n: [asdict(q) for q in r] for n, r in rows.items()}, 10)
    lines = text.splitlines()
    assert "centroid top1" in lines[0] and "learned R@10" in lines[0] and len(lines) == 3
    assert lines[2].split() == ["4", "0.5000", "0.7500", "0.8750", "0.9000"]
    import json
    from milvus_ltr_router.report import quality_json
    assert json.loads(quality_json(rows)) == {n: [asdict(q) for q in r] for n, r in rows.items()}


def test_write_report_writes_the_result_json_and_a_plot(tmp_path):
    import json
    from milvus_ltr_router.evaluate import RoutingQuality
    from milvus_ltr_router.report import retrain_quality, write_report
    from milvus_ltr_router.retrain import RetrainResult
    from dataclasses import asdict
    row = asdict(RoutingQuality(2, 0.5, 0.6, 10, 2.0))
    result = RetrainResult(decision="kept", reason="r", collection="docs", layout_id="L",
                           n_queries=100, nprobe=2, table={"centroid": [row], "learned": [row]},
                           adaptive=[{"recall_target": 0.9, **row, "mean_probed": 3.5}])
    paths = write_report(result, tmp_path / "reports" / "new")
    assert json.loads(open(paths[0]).read())["table"]["learned"] == [row]
    table = retrain_quality(result)
    assert list(table) == ["centroid", "learned", "learned, adaptive"]
    assert table["learned, adaptive"][0].mean_probed == 3.5
    # a retrain that chose the moment router: its adaptive rows follow its own table row
    result.table["moments"] = [row]
    result.training["router_kind"] = "moments"
    assert list(retrain_quality(result)) == ["centroid", "learned", "moments", "moments, adaptive"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert len(paths) == 1
    else:
        assert paths[1].endswith(".png") and open(paths[1], "rb").read(4) == b"\x89PNG"


def test_retrain_does_not_import_the_report():
    import subprocess
    import sys
    code = ("import sys, milvus_ltr_router.retrain; "
            "assert 'milvus_ltr_router.report' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
