"""The size bound on a real Milvus server: a layout built with ``build-layout
--max-cluster-ratio``, then routed inserts and upserts that all want one cluster. No cluster
passes the bound, the rest spill to their next clusters, and every row is found by a routed
search probing its cluster's rank (+1) clusters (ranked by the router the client serves: with
no router published, the layout's training-free one, ``serving.fallback_router``). Partition storage (sizes counted per
partition) and single storage (sizes from the cluster-id column)."""
import uuid

import numpy as np
import pytest

from milvus_ltr_router.cli import main as cli_main
from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.clustering import balanced_capacity
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import cluster_of, cluster_sizes, drop_layout, read_layout
from milvus_ltr_router.milvus_io import count_rows
from milvus_ltr_router.serving import fallback_kind, fallback_router
from milvus_ltr_router.storage import CLUSTER_FIELD

RATIO, L, N = 1.5, 64, 20_000
NEW = 1000


@pytest.fixture(scope="module")
def bounded_layouts(milvus_server, wordnet_source):
    """The session source clustered by the CLI with the bound (single storage), and the same
    clusters with the bound in partition storage."""
    from pymilvus import MilvusClient
    client = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    single = f"bal_single_{uuid.uuid4().hex[:8]}"
    assert cli_main(["build-layout", "--uri", milvus_server.uri, "--source", wordnet_source,
                     "--target", single, "--storage", "single", "--clusters", str(L),
                     "--max-cluster-ratio", str(RATIO), "--seed", "0"]) == 0
    out = {"single": read_layout(client, single)}
    out["partition"] = build_layout(client, wordnet_source, f"bal_part_{uuid.uuid4().hex[:8]}", storage="partition",
                                    clusters_from=out["single"], max_cluster_ratio=RATIO).layout
    yield out
    for lay in out.values():
        drop_layout(client, lay.collection)
    client.close()


def crowd(layout, docs, n, seed=0):
    """``n`` new vectors that all want the largest cluster: its rows, perturbed."""
    target = int(np.argmax(layout.sizes))
    members = docs[cluster_of(layout, docs) == target]
    rng = np.random.default_rng(seed)
    base = members[rng.integers(0, len(members), 4 * n)]
    noise = rng.standard_normal(base.shape).astype(np.float32)
    cand = base + 0.15 * np.linalg.norm(base, axis=1, keepdims=True) * noise / np.sqrt(base.shape[1])
    cand = cand[cluster_of(layout, cand) == target]
    assert len(cand) >= n
    return cand[:n].astype(np.float32), target


def rows_of(ids, vecs, title="new"):
    return [{"id": int(i), "vector": v.tolist(), "title": title, "grp": 0, "weight": 0.0}
            for i, v in zip(ids, vecs)]


def live_sizes(client, layout) -> np.ndarray:
    """Rows in each cluster now: count(*) per partition (partition statistics miss unflushed
    rows and keep deleted ones), or the cluster-id column."""
    if layout.storage.cluster_field is None:
        return np.array([count_rows(client, layout.collection, [p]) for p in layout.partition_names])
    return cluster_sizes(client, layout)


def stored_clusters(client, layout, ids) -> dict:
    expr = f"id in {[int(i) for i in ids]}"
    if layout.storage.cluster_field is not None:
        return {r["id"]: r[CLUSTER_FIELD] for r in client.query(
            layout.collection, filter=expr, output_fields=[CLUSTER_FIELD], consistency_level="Strong")}
    out = {}
    for c, part in enumerate(layout.partition_names):
        for r in client.query(layout.collection, filter=expr, partition_names=[part], output_fields=["id"],
                              consistency_level="Strong"):
            out[r["id"]] = c
    return out


@pytest.mark.parametrize("mode", ["partition", "single"])
def test_routed_writes_keep_the_bound_on_a_server(milvus_uri, bounded_layouts, fixture_data, tmp_path, mode):
    layout = bounded_layouts[mode]
    assert layout.extra["max_cluster_ratio"] == RATIO
    assert layout.sizes.sum() == N and layout.sizes.max() <= balanced_capacity(N, L, RATIO)
    vecs, target = crowd(layout, fixture_data.docs, NEW)
    ids = 50_000_000 + np.arange(NEW)
    routed = RoutedMilvusClient(milvus_uri, model_dir=str(tmp_path / "models"), log_rate=0,
                                size_refresh_interval=3600)
    try:
        assert routed.router_status(layout.collection)["balance"]["sizes_age_s"] is None
        for start in range(0, NEW, 200):
            res = routed.insert(layout.collection, rows_of(ids[start:start + 200], vecs[start:start + 200]))
            assert res["insert_count"] == 200
        cap = balanced_capacity(N + NEW, L, RATIO)
        status = routed.router_status(layout.collection)["balance"]
        assert status["rows"] == N + NEW and status["capacity"] == cap and status["largest"] == cap
        live = live_sizes(routed, layout)
        assert live.sum() == N + NEW and live.max() <= cap and live[target] == cap
        stored = stored_clusters(routed, layout, ids)
        clusters = np.array([stored[int(i)] for i in ids])
        assert (clusters != target).sum() >= NEW - (cap - layout.sizes[target])
        # every row is found by a routed search probing its cluster's rank + 1 clusters only,
        # ranked by the layout's training-free router (no router is published here)
        served = routed.layout(layout.collection)
        assert routed.router_status(layout.collection)["mode"] == fallback_kind(served)
        order = fallback_router(served).rank(vecs, L)
        ranks = np.argmax(order == clusters[:, None], axis=1)
        assert ranks.max() >= 1
        assert routed.route(layout.collection, vecs[:5], nprobe=L) == order[:5].tolist()
        for j in np.random.default_rng(1).choice(NEW, 40, replace=False):
            flt = f"id == {int(ids[j])}"
            hit = routed.search(layout.collection, data=[vecs[j].tolist()], limit=3, filter=flt,
                                nprobe=int(ranks[j]) + 1, consistency_level="Strong")[0]
            assert [h["id"] for h in hit] == [int(ids[j])]
            if ranks[j]:
                assert not routed.search(layout.collection, data=[vecs[j].tolist()], limit=3, filter=flt,
                                         nprobe=int(ranks[j]), consistency_level="Strong")[0]
        # upserts that move keys into the full cluster: one row per key, the bound kept (until
        # the next read an upsert counts as one more row: the capacity of N + NEW + 300 rows)
        moved = ids[:300]
        other, _ = crowd(layout, fixture_data.docs, 300, seed=2)
        routed.upsert(layout.collection, rows_of(moved, other, title="moved"))
        assert count_rows(routed, layout.collection) == N + NEW
        got = routed.query(layout.collection, filter=f"id in {[int(i) for i in moved]}",
                           output_fields=["title"], consistency_level="Strong")
        assert len(got) == 300 and {r["title"] for r in got} == {"moved"}
        live = live_sizes(routed, layout)
        assert live.sum() == N + NEW and live.max() <= balanced_capacity(N + NEW + 300, L, RATIO)
        assert routed.reload_router(layout.collection)["balance"]["rows"] == N + NEW
    finally:
        routed.delete(layout.collection, filter=f"id >= {50_000_000}")
        routed.close()


def test_end_to_end_benchmark_compares_with_and_without_the_bound(milvus_server, tmp_path, monkeypatch):
    """``bench_end_to_end --max-cluster-ratio``: the bounded layout is built, timed beside the
    unbounded one, and reported with median and p99 latency at recall@10 0.9 / 0.95."""
    import json
    from benchmarks import bench_end_to_end
    monkeypatch.setenv("MILVUS_URI", milvus_server.uri)
    assert bench_end_to_end.main(["--quick", "--storage", "single", "--max-cluster-ratio", "1.5",
                                  "--concurrency", "0", "--recall-targets", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "end_to_end_fixture_k10_quick.json").read_text())
    methods = {r["method"] for r in out["rows"]}
    assert {"learned routing (bound 1.5)", "centroid routing (bound 1.5)",
            "learned routing", "centroid routing"} <= methods
    bal = out["balance"]
    assert bal["sizes_bounded"]["max"] <= balanced_capacity(3000, out["L"], 1.5)
    assert bal["sizes"]["max_over_mean"] > bal["sizes_bounded"]["max_over_mean"]
    assert [r["method"] for r in bal["latency"]] == ["learned routing", "centroid routing",
                                                     "learned routing (bound 1.5)",
                                                     "centroid routing (bound 1.5)"]
    assert set(bal["latency"][0]) == {"method", "median_ms@0.9", "p99_ms@0.9", "median_ms@0.95",
                                      "p99_ms@0.95"}
    assert any(r["storage"] == "single, bound 1.5" for r in out["storage"])


def test_two_writers_keep_the_bound_when_they_say_they_are_two(milvus_uri, bounded_layouts,
                                                               wordnet_source, fixture_data,
                                                               tmp_path):
    """Two clients (as two processes would: each counts only its own rows between size reads)
    write crowded rows at the same time into a fresh copy of the bounded layout; with the
    default ``concurrent_writers=1`` each takes the whole room near the crowded cluster, with
    ``concurrent_writers=2`` each takes half of it. The largest cluster over the mean is printed
    for both (issue 23: 2.25x at a 1.5 bound with two writers before)."""
    import threading
    from pymilvus import MilvusClient
    client = MilvusClient(uri=milvus_uri)
    figures = {}
    try:
        for writers in (1, 2):
            name = f"bal_two_{writers}_{uuid.uuid4().hex[:6]}"
            lay = build_layout(client, wordnet_source, name, storage="single",
                               clusters_from=bounded_layouts["single"], max_cluster_ratio=RATIO).layout
            try:
                vecs, target = crowd(lay, fixture_data.docs, 2 * NEW, seed=writers)
                ids = 40_000_000 + 100_000 * writers + np.arange(2 * NEW)
                clients = [RoutedMilvusClient(milvus_uri, model_dir=str(tmp_path / "m"), log_rate=0,
                                              size_refresh_interval=3600,
                                              concurrent_writers=writers) for _ in range(2)]
                for c in clients:               # each reads the live sizes before anyone writes
                    c.reload_router(name)
                errors = []

                def write(c, part):
                    try:
                        for s in range(0, len(part), 100):
                            c.insert(name, rows_of(ids[part[s:s + 100]], vecs[part[s:s + 100]]))
                    except Exception as exc:
                        errors.append(exc)
                halves = [np.arange(0, 2 * NEW, 2), np.arange(1, 2 * NEW, 2)]
                threads = [threading.Thread(target=write, args=(c, h)) for c, h in zip(clients, halves)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(300)
                for c in clients:
                    c.close()
                assert not errors, errors[:3]
                sizes = live_sizes(client, lay)
                assert int(sizes.sum()) == N + 2 * NEW
                cap = balanced_capacity(int(sizes.sum()), L, RATIO)
                figures[writers] = {"max_over_mean": float(sizes.max() / sizes.mean()),
                                    "largest": int(sizes.max()), "capacity": cap,
                                    "over_capacity": int((sizes > cap).sum())}
            finally:
                drop_layout(client, name)
    finally:
        client.close()
    print(f"\nsize bound {RATIO} with two writers: concurrent_writers=1 {figures[1]}; "
          f"concurrent_writers=2 {figures[2]}")
    assert figures[1]["largest"] > figures[1]["capacity"]      # the gap this option closes
    # each writer's share of a cluster's room is rounded up: W writers may pass it by W - 1 rows
    assert figures[2]["largest"] <= figures[2]["capacity"] + 1
