"""Issue 23 item 0 and 4 on a real server: rebuilds and layout switches that lose nothing
and fail nothing, sizes that count unflushed rows, and builds that one seed repeats.

The goal run: a rebuild (a new target plus ``--alias``, then ``--overwrite`` of that
target) under 4 searching threads and 1 routed writer: 0 failed searches through the
alias, 0 acknowledged writes lost, 0 duplicate keys, aliases intact, every row in the
cluster of the layout it lands in. The figures are printed (``-s`` shows them).
"""
from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

N_SOURCE = 6000
L = 24


def _source(client, fixture_data, n, order=None, name=None):
    from milvus_ltr_router.writer import create_vector_collection
    name = name or f"rb_src_{uuid.uuid4().hex[:6]}"
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    vecs = fixture_data.docs[:n]
    if order is not None:
        ids, vecs = ids[order], vecs[order]
    create_vector_collection(client, name, vecs, ids=ids,
                             scalars={"title": [f"doc {int(i)}" for i in ids]})
    client.load_collection(name)
    return name


def _all_rows(client, name):
    from milvus_ltr_router.scan import iter_columns
    from milvus_ltr_router.storage import CLUSTER_FIELD
    keys, vecs, cids = [], [], []
    for cols in iter_columns(client, name, ["id", "vector", CLUSTER_FIELD]):
        keys.extend(np.asarray(cols["id"]).tolist())
        vecs.append(np.asarray(cols["vector"], dtype=np.float32))
        cids.extend(np.asarray(cols[CLUSTER_FIELD]).tolist())
    return keys, np.concatenate(vecs), np.asarray(cids)


class _Load:
    """4 threads searching ``alias`` (and one searching the physical ``name``, counted
    apart), 1 routed writer: inserts of new keys and upserts of source keys."""

    def __init__(self, uri, alias, physical, queries, docs, model_dir):
        from milvus_ltr_router.client import RoutedMilvusClient
        self.client = RoutedMilvusClient(uri=uri, model_dir=model_dir, nprobe=4, log_rate=0.0)
        self.alias, self.physical = alias, physical
        self.queries, self.docs = queries, docs
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.physical_on = threading.Event()      # search the physical name from then on
        self.physical_ok = 0
        self.physical_failed: list[str] = []
        self.acked: dict[int, np.ndarray] = {}
        self.write_errors: list[str] = []
        self.writes = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._search, args=(i,)) for i in range(4)]
        self.threads.append(threading.Thread(target=self._search_physical))
        self.threads.append(threading.Thread(target=self._write))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        self.client.close()

    def _search(self, seed):
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            q = self.queries[rng.integers(len(self.queries))]
            try:
                res = self.client.search(self.alias, data=[q.tolist()], limit=10)
                assert len(res) == 1
                with self.lock:
                    self.ok += 1
            except Exception as exc:
                with self.lock:
                    self.failed.append(f"{type(exc).__name__}: {exc}"[:200])

    def _search_physical(self):
        rng = np.random.default_rng(99)
        while not self.stop.is_set():
            if not self.physical_on.is_set():
                time.sleep(0.05)
                continue
            q = self.queries[rng.integers(len(self.queries))]
            try:
                self.client.search(self.physical[0], data=[q.tolist()], limit=10)
                self.physical_ok += 1
            except Exception as exc:
                self.physical_failed.append(f"{type(exc).__name__}: {exc}"[:200])
            time.sleep(0.002)

    def _write(self):
        rng = np.random.default_rng(7)
        i = 0
        while not self.stop.is_set():
            i += 1
            if i % 2:
                keys = [10_000_000 + 5 * i + j for j in range(5)]
                kind = "insert"
            else:
                keys = [int(k) * 3 + 1 for k in rng.integers(0, N_SOURCE, 5)]
                kind = "upsert"
            vecs = self.docs[rng.integers(N_SOURCE, len(self.docs), len(keys))]
            rows = [{"id": k, "vector": v.tolist(), "title": f"w{i}"} for k, v in zip(keys, vecs)]
            try:
                getattr(self.client, kind)(self.alias, rows)
            except Exception as exc:
                self.write_errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
                continue
            self.writes += 1
            for k, v in zip(keys, vecs):
                self.acked[k] = v
            time.sleep(0.01)


def _rebuild(errors, client, *args, **kwargs):
    from milvus_ltr_router.build import build_layout
    try:
        return build_layout(client, *args, **kwargs)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}"[:300])
        return None


def _check_final(client, alias, load, n_before, fallback):
    """Lost acknowledged writes, duplicate keys and rows outside their cluster, as counts
    (in what the alias names, else in ``fallback`` where the alias was lost)."""
    from milvus_ltr_router.layout import cluster_of, read_layout
    try:
        layout = read_layout(client, alias)
    except Exception:
        layout = read_layout(client, fallback)
    keys, vecs, cids = _all_rows(client, layout.collection)
    pos = {k: i for i, k in enumerate(keys)}
    dup = len(keys) - len(pos)
    lost = sum(1 for k, v in load.acked.items()
               if k not in pos or not np.allclose(vecs[pos[k]], v, atol=1e-6))
    wrong = int((cluster_of(layout, vecs) != cids).sum())
    inserted = sum(1 for k in load.acked if k >= 10_000_000)
    return {"rows": len(keys), "expected_rows": n_before + inserted, "duplicates": dup,
            "lost": lost, "wrong_cluster": wrong, "layout": layout}


def test_rebuild_under_load_loses_nothing_and_fails_nothing(client, milvus_server, fixture_data,
                                                            tmp_path):
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import drop_layout
    src = _source(client, fixture_data, N_SOURCE)
    t1, t2 = f"rb_a_{uuid.uuid4().hex[:6]}", f"rb_b_{uuid.uuid4().hex[:6]}"
    alias = f"rb_app_{uuid.uuid4().hex[:6]}"
    try:
        build_layout(client, src, t1, n_clusters=L, storage="single", alias=alias, seed=0)
        physical, errors = [t2], []
        with _Load(milvus_server.uri, alias, physical, fixture_data.queries, fixture_data.docs,
                   str(tmp_path / "models")) as load:
            time.sleep(3)                       # writes into the first layout before its rebuild
            # 1. a new target plus --alias: reads t1 (with the routed writes), switches the alias
            second = _rebuild(errors, client, src, t2, n_clusters=L, storage="single", alias=alias,
                              seed=1)
            load.physical_on.set()
            time.sleep(2)
            # 2. --overwrite of t2 (the alias on it must survive), again under load
            third = _rebuild(errors, client, src, t2, n_clusters=L, storage="single",
                             overwrite=True, seed=2)
            time.sleep(2)
        out = _check_final(client, alias, load, N_SOURCE, t2)
        figures = {"searches_ok": load.ok, "searches_failed": len(load.failed),
                   "physical_searches_ok": load.physical_ok,
                   "physical_searches_failed": len(load.physical_failed),
                   "routed_writes": load.writes, "acked_keys": len(load.acked),
                   "write_errors": len(load.write_errors), "lost": out["lost"],
                   "duplicates": out["duplicates"], "wrong_cluster": out["wrong_cluster"],
                   "rows": out["rows"], "expected_rows": out["expected_rows"],
                   "rebuild_errors": errors,
                   "switch_alias": getattr(second, "switch", None),
                   "switch_overwrite": getattr(third, "switch", None)}
        print("\nREBUILD GOAL FIGURES", figures)
        assert errors == []
        assert load.failed == [], load.failed[:5]
        assert load.write_errors == [], load.write_errors[:5]
        assert out["lost"] == 0 and out["duplicates"] == 0 and out["wrong_cluster"] == 0
        assert out["rows"] == out["expected_rows"]
        assert load.writes > 20 and load.ok > 100
        # aliases intact: the alias names the overwritten target, which serves the new layout
        assert client.describe_alias(alias)["collection_name"] == t2
        assert out["layout"].layout_id == third.layout.layout_id and third.layout.collection == t2
        assert second.switch["live"] == t1 and second.switch["replaced"] == "retired"
        assert third.switch["renamed"] and alias in third.switch["aliases_moved"]
    finally:
        for name in (t1, t2, f"{t2}__ltr_next", f"{t2}__ltr_prev"):
            drop_layout(client, name)
        try:
            client.drop_alias(alias)
        except Exception:
            pass
        client.drop_collection(src)


def test_client_sees_new_layout_before_next_write_and_search(client, milvus_server,
                                                             fixture_data, tmp_path):
    """A client serving layout A of an alias writes into and searches layout B at once after
    the alias moves, never with A's cluster ids."""
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.layout import cluster_of, drop_layout, point_alias, read_layout
    src = _source(client, fixture_data, 3000)
    a, b = f"rb_x_{uuid.uuid4().hex[:6]}", f"rb_y_{uuid.uuid4().hex[:6]}"
    alias = f"rb_sw_{uuid.uuid4().hex[:6]}"
    app = RoutedMilvusClient(uri=milvus_server.uri, model_dir=str(tmp_path / "m"), nprobe=2,
                             log_rate=0.0, reload_interval=600)
    try:
        build_layout(client, src, a, n_clusters=12, storage="single", alias=alias, seed=0)
        lb = build_layout(client, src, b, n_clusters=20, storage="single", seed=5).layout
        app.search(alias, data=[fixture_data.queries[0].tolist()], limit=5)
        assert app.router_status(alias)["layout_id"] != lb.layout_id
        point_alias(client, alias, b)           # behind the client's back
        rows = [{"id": 50_000_000 + j, "vector": fixture_data.docs[4000 + j].tolist(),
                 "title": "x"} for j in range(40)]
        app.insert(alias, rows)                 # the write checks the layout id first
        got = client.query(b, filter="id >= 50000000", output_fields=["id", "vector", "_ltr_cluster"],
                           consistency_level="Strong")
        assert len(got) == 40
        vecs = np.asarray([r["vector"] for r in got], dtype=np.float32)
        assert (cluster_of(lb, vecs) == np.asarray([r["_ltr_cluster"] for r in got])).all()
        assert client.query(a, filter="id >= 50000000", output_fields=["count(*)"],
                            consistency_level="Strong")[0]["count(*)"] == 0
        app.search(alias, data=[fixture_data.queries[1].tolist()], limit=5)
        assert app.router_status(alias)["layout_id"] == lb.layout_id
        # and a search alone notices within layout_check_interval (1 s) too
        point_alias(client, alias, a)
        time.sleep(1.1)
        app.search(alias, data=[fixture_data.queries[2].tolist()], limit=5)
        assert app.router_status(alias)["layout_id"] == read_layout(client, a).layout_id
    finally:
        app.close()
        for name in (a, b):
            drop_layout(client, name)
        try:
            client.drop_alias(alias)
        except Exception:
            pass
        client.drop_collection(src)


def test_partition_sizes_count_unflushed_rows(client, unique_name):
    from pymilvus import DataType, MilvusClient
    from milvus_ltr_router.layout import partition_sizes
    name = unique_name("rb_parts")
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=index)
    try:
        client.create_partition(name, "p1")
        client.load_collection(name)
        client.insert(name, [{"id": i, "vector": [1.0, 0, 0, float(i)]} for i in range(7)],
                      partition_name="p1")
        client.insert(name, [{"id": 100 + i, "vector": [0, 1.0, 0, 0]} for i in range(3)])
        # no flush: the rows sit in growing segments
        assert partition_sizes(client, name, ["p1", "_default"]).tolist() == [7, 3]
    finally:
        client.drop_collection(name)


def test_same_seed_same_layout_whatever_the_read_order(client, fixture_data):
    """Two builds with one seed on the same rows give identical clusters, also when the rows
    are read in another order: here another read batch size (the read-out's parts are
    residue classes of the key modulo rows / batch size; the byte budget of a row sets it
    too) and another insert order."""
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import drop_layout
    n = 2500
    rng = np.random.default_rng(3)
    s1 = _source(client, fixture_data, n)
    s2 = _source(client, fixture_data, n, order=rng.permutation(n))
    t1, t2 = f"rb_d1_{uuid.uuid4().hex[:6]}", f"rb_d2_{uuid.uuid4().hex[:6]}"
    try:
        r1 = build_layout(client, s1, t1, n_clusters=16, storage="single", seed=11,
                          sample_size=1000, batch_size=700)
        r2 = build_layout(client, s2, t2, n_clusters=16, storage="single", seed=11,
                          sample_size=1000)
        assert np.array_equal(r1.layout.centroids, r2.layout.centroids)
        k1, _, c1 = _all_rows(client, t1)
        k2, _, c2 = _all_rows(client, t2)
        assert dict(zip(k1, c1.tolist())) == dict(zip(k2, c2.tolist()))
    finally:
        for name in (t1, t2):
            drop_layout(client, name)
        client.drop_collection(s1)
        client.drop_collection(s2)
