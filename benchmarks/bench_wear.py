"""Layout wear under writes (issue 23, item 1): a worn layout against a fresh build of the same rows.

On a real Milvus server (``MILVUS_URI``, else the embedded 2.3.5 one) and the cached ``large``
set (WordNet glosses + GCIDE definitions, model2vec 256-d; the WordNet rows come first):

1. a subset of ``--rows`` rows is drawn; ``--initial-share`` of it (mostly WordNet:
   ``--initial-wordnet``) becomes a source collection, laid out with ``build_layout``'s
   defaults (``storage="single"``: one ``_ltr_cluster`` field and a filter) and given a router
   retrained on held-in questions (:func:`milvus_ltr_router.retrain.retrain`);
2. the rest is written through :class:`~milvus_ltr_router.client.RoutedMilvusClient` in
   batches (``--insert-gcide`` of it GCIDE: the drift), with routed upserts of older keys
   (their new vector is an unused dataset row's, so keys move clusters) and deletes of older
   keys mixed in (:func:`plan_writes`); then a flush and a bounded wait for Milvus's own
   compaction (segment counts before and after);
3. the final rows (same keys, same vectors: tracked by :func:`apply_plan`, checked against the
   server's row count) are loaded into a new source and built afresh with the same options and,
   by default, the same number of clusters (``--fresh-clusters default``: round(sqrt(N)) of
   the final rows, what a rebuild with CLI defaults picks), with its own retrained router;
4. worn and fresh are timed on the same held-out questions, every configuration of a query in
   a fresh random order (:func:`benchmarks.bench_end_to_end.timed_interleaved`): recall@10
   (exact neighbours of the final rows) at fixed nprobe and at ``recall_target``, latency at
   the cheapest swept nprobe reaching recall@10 0.9, cluster size skew, segments, and how
   ordered the rows are (:func:`run_share`, :func:`fragments_per_cluster`);
5. (unless ``--no-compact``) the worn collection is compacted by hand (``compact()``, one
   segment, deleted rows dropped) and timed again beside the fresh one: what upkeep short of a
   rebuild buys.

Orderedness is measured on the write order, not read back: on Milvus 2.3 a segment keeps its
rows in insert order and a (mix) compaction concatenates segments without re-sorting, so the
physical row order is the order rows were written - the build's cluster order for the
initial rows, then the routed writes' arrival order - with deleted and superseded rows taken
out (as compaction does), up to segment boundaries.

    python -m benchmarks.bench_wear [--rows 100000] [--norms unit raw] [--out DIR]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.wear")

NPROBES = (2, 4, 8, 16, 32)
RUN_MIN = 32            # rows: a run of at least this many same-cluster rows counts as ordered


# --------------------------------------------------------------------------- pure parts
@dataclass(frozen=True)
class Op:
    """One write request: ``kind`` insert / upsert / delete of ``keys``; ``rows`` are the
    dataset rows whose vectors are written (None for a delete)."""
    kind: str
    keys: np.ndarray
    rows: np.ndarray | None = None


def choose_rows(n_wordnet: int, n_docs: int, rows: int, initial_share: float = 0.6,
                initial_wordnet: float = 0.9, insert_gcide: float = 0.5, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Dataset rows of the initial build and of the routed inserts (keys = row indices).

    Rows ``[0, n_wordnet)`` are WordNet, ``[n_wordnet, n_docs)`` GCIDE. The initial
    ``round(rows * initial_share)`` rows are ``initial_wordnet`` WordNet; the inserts that
    follow are ``insert_gcide`` GCIDE, in a random order. All distinct."""
    rng = np.random.default_rng(seed)
    n_init = int(round(rows * initial_share))
    n_ins = rows - n_init
    init_wn = int(round(n_init * initial_wordnet))
    ins_gc = int(round(n_ins * insert_gcide))
    need_wn, need_gc = init_wn + n_ins - ins_gc, n_init - init_wn + ins_gc
    if need_wn > n_wordnet or need_gc > n_docs - n_wordnet:
        raise ValueError(f"{rows} rows need {need_wn} WordNet and {need_gc} GCIDE rows; the set has "
                         f"{n_wordnet} and {n_docs - n_wordnet}")
    wn = rng.permutation(n_wordnet)
    gc = n_wordnet + rng.permutation(n_docs - n_wordnet)
    initial = np.sort(np.concatenate([wn[:init_wn], gc[:n_init - init_wn]]))
    inserts = rng.permutation(np.concatenate([wn[init_wn:need_wn], gc[n_init - init_wn:need_gc]]))
    return initial, inserts


def spare_rows(n_docs: int, used: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` dataset rows not in ``used``: the new vectors of upserted keys."""
    free = np.setdiff1d(np.arange(n_docs), used)
    if n > len(free):
        raise ValueError(f"{n} spare rows asked for, {len(free)} free")
    return np.random.default_rng(seed + 1).choice(free, n, replace=False)


def plan_writes(initial: np.ndarray, inserts: np.ndarray, spare: np.ndarray, n_deletes: int,
                batch: int = 1000, seed: int = 0) -> list[Op]:
    """The write requests: ``inserts`` in batches of ``batch``; after each insert batch an
    upsert and a delete request, their shares of ``spare`` (one upsert each: a stored key
    gets that row's vector) and of ``n_deletes`` spread evenly over the batches. Each upsert
    or delete names a key stored at that moment (initial or inserted earlier), and no key is
    upserted or deleted twice, so every request acts on a live row."""
    rng = np.random.default_rng(seed + 2)
    starts = list(range(0, len(inserts), batch))
    n_batches = max(len(starts), 1)
    up_cuts = np.linspace(0, len(spare), n_batches + 1).round().astype(int)
    del_cuts = np.linspace(0, n_deletes, n_batches + 1).round().astype(int)
    live = list(np.asarray(initial).tolist())      # keys stored and not yet touched
    ops: list[Op] = []
    for b, s in enumerate(starts or [0]):
        keys = np.asarray(inserts[s:s + batch])
        if len(keys):
            ops.append(Op("insert", keys, keys))
        n_up, n_del = up_cuts[b + 1] - up_cuts[b], del_cuts[b + 1] - del_cuts[b]
        if n_up + n_del > len(live):
            raise ValueError("more upserts and deletes than stored keys")
        pick = rng.choice(len(live), n_up + n_del, replace=False)
        chosen = [live[i] for i in pick]
        for i in sorted(pick, reverse=True):
            live[i] = live[-1]
            live.pop()
        if n_up:
            ops.append(Op("upsert", np.asarray(chosen[:n_up]), np.asarray(spare[up_cuts[b]:up_cuts[b + 1]])))
        if n_del:
            ops.append(Op("delete", np.asarray(chosen[n_up:])))
        live.extend(keys.tolist())
    return ops


def apply_plan(initial: np.ndarray, ops: list[Op]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the collection holds after ``ops``: (keys, vector rows, write position), one per
    live key, sorted by write position - the initial keys take positions 0..len-1 in the given
    order, each insert or upsert appends, an upsert or delete retires the key's old row."""
    where: dict[int, tuple[int, int]] = {int(k): (i, int(k)) for i, k in enumerate(initial)}
    pos = len(initial)
    for op in ops:
        for j, k in enumerate(op.keys.tolist()):
            if op.kind == "delete":
                if where.pop(k, None) is None:
                    raise ValueError(f"delete of key {k} that is not stored")
                continue
            if op.kind == "insert" and k in where:
                raise ValueError(f"insert of key {k} that is already stored")
            if op.kind == "upsert" and k not in where:
                raise ValueError(f"upsert of key {k} that is not stored")
            where[k] = (pos, int(op.rows[j]))
            pos += 1
    items = sorted(where.items(), key=lambda kv: kv[1][0])
    keys = np.asarray([k for k, _ in items], dtype=np.int64)
    vec_rows = np.asarray([v[1] for _, v in items], dtype=np.int64)
    position = np.asarray([v[0] for _, v in items], dtype=np.int64)
    return keys, vec_rows, position


def runs(seq) -> np.ndarray:
    """Lengths of the maximal runs of equal consecutive values of ``seq``."""
    seq = np.asarray(seq)
    if seq.size == 0:
        return np.zeros(0, dtype=np.int64)
    cuts = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    return np.diff(np.concatenate([[0], cuts, [seq.size]]))


def run_share(seq, min_run: int = RUN_MIN) -> float:
    """Share of the rows of ``seq`` (cluster ids in physical order) sitting in runs of at
    least ``min_run`` consecutive rows of one cluster: 1.0 for a fresh build (clusters of at
    least ``min_run`` rows), about the share of never-moved build rows for a worn one (rows
    appended one by one land next to other clusters' rows)."""
    r = runs(seq)
    return float(r[r >= min_run].sum() / r.sum()) if r.size else float("nan")


def fragments_per_cluster(seq) -> float:
    """Mean number of separate runs a cluster's rows are split into (1.0: each cluster is
    contiguous): how many places a probed cluster's rows are scattered over."""
    seq = np.asarray(seq)
    if seq.size == 0:
        return float("nan")
    starts = np.concatenate([[True], seq[1:] != seq[:-1]])
    return float(starts.sum() / np.unique(seq).size)


def skew(sizes) -> dict:
    """Cluster size skew: max / mean and the coefficient of variation (std / mean) of the
    cluster sizes, with min, max and the empty clusters."""
    sizes = np.asarray(sizes, dtype=np.float64)
    mean = sizes.mean()
    return {"max_over_mean": float(sizes.max() / mean) if mean else float("nan"),
            "cv": float(sizes.std() / mean) if mean else float("nan"),
            "min": int(sizes.min()), "max": int(sizes.max()), "empty": int((sizes == 0).sum())}


def order_measures(seq) -> dict:
    return {f"run_share@{RUN_MIN}": run_share(seq), "fragments_per_cluster": fragments_per_cluster(seq)}


# --------------------------------------------------------------------------- server parts
def wordnet_rows(n_docs: int) -> int:
    """How many of the large set's first rows are WordNet glosses (the set is WordNet's
    distinct glosses, then GCIDE's definitions not already among them)."""
    from benchmarks.datasets import read_wordnet_glosses, wordnet_dir
    n = len(dict.fromkeys(read_wordnet_glosses(wordnet_dir())))
    if not 0 < n < n_docs:
        raise ValueError(f"{n} WordNet glosses do not fit a set of {n_docs} rows")
    return n


def segments(client, collection: str) -> dict:
    """Persistent segments (count, rows, by state) and loaded segments of ``collection``."""
    out = {}
    try:
        pers = client.list_persistent_segments(collection)
        states: dict = {}
        for s in pers:
            st = str(getattr(s, "state", "?")).split(".")[-1]
            states[st] = states.get(st, 0) + 1
        out.update(persistent=len(pers), persistent_rows=int(sum(getattr(s, "num_rows", 0) for s in pers)),
                   states=states)
    except Exception as exc:            # noqa: BLE001 - reported, not fatal
        out["persistent_error"] = str(exc)[:200]
    try:
        loaded = client.list_loaded_segments(collection)
        out.update(loaded=len(loaded), loaded_rows=int(sum(getattr(s, "num_rows", 0) for s in loaded)))
    except Exception as exc:            # noqa: BLE001
        out["loaded_error"] = str(exc)[:200]
    return out


def wait_compaction(client, collection: str, seconds: float, poll: float = 5.0) -> list[dict]:
    """Poll the segments of ``collection`` for up to ``seconds`` (Milvus's own compaction, nothing
    triggered); stops early once one flushed segment is left and loaded."""
    trace = []
    t0 = time.perf_counter()
    while True:
        seg = segments(client, collection)
        trace.append({"t_s": round(time.perf_counter() - t0, 1), **seg})
        if seg.get("states", {}).get("Flushed") == 1 and seg.get("loaded") == 1:
            break
        if time.perf_counter() - t0 + poll > seconds:
            break
        time.sleep(poll)
    return trace


def cluster_column(client, layout) -> tuple[np.ndarray, np.ndarray]:
    """(keys, cluster ids) of every row of a ``single``/``grouped`` layout, read from Milvus."""
    from milvus_ltr_router.layout import cluster_range_filters, live_sizes
    from milvus_ltr_router.scan import iter_columns
    field, pk = layout.storage.cluster_field, layout.primary_field
    parts = cluster_range_filters(field, live_sizes(client, layout), 65536, pk)
    keys, cids = [], []
    for cols in iter_columns(client, layout.collection, [pk, field], 65536, parts=parts):
        keys.append(np.asarray(cols[pk], dtype=np.int64))
        cids.append(np.asarray(cols[field], dtype=np.int64))
    return np.concatenate(keys), np.concatenate(cids)


def physical_clusters(keys_in_order: np.ndarray, read_keys: np.ndarray, read_cids: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The cluster id of each of ``keys_in_order`` found in a (keys, cluster ids) read-out, and
    the mask of those found (a key missing from the collection is left out, and counted by
    the caller)."""
    order = np.argsort(read_keys)
    sk = read_keys[order]
    idx = np.minimum(np.searchsorted(sk, keys_in_order), max(len(sk) - 1, 0))
    found = (sk[idx] == keys_in_order) if len(sk) else np.zeros(len(keys_in_order), bool)
    return read_cids[order][idx[found]], found


def routed_writes(rc, collection: str, ops: list[Op], docs: np.ndarray) -> dict:
    """Send ``ops`` through the routed client; seconds and rows per kind."""
    from milvus_ltr_router.progress import progress
    t: dict = {}
    n: dict = {}
    for op in progress(ops, total=len(ops), desc="routed writes", unit="requests"):
        t0 = time.perf_counter()
        if op.kind == "delete":
            rc.delete(collection, ids=op.keys.tolist())
        else:
            data = [{"id": int(k), "vector": v} for k, v in zip(op.keys, docs[op.rows].tolist())]
            getattr(rc, op.kind)(collection, data=data)
        t[op.kind] = t.get(op.kind, 0.0) + time.perf_counter() - t0
        n[op.kind] = n.get(op.kind, 0) + len(op.keys)
    return {"seconds": t, "rows": n}


def run_variant(client, uri: str, tmp: str, docs: np.ndarray, queries: np.ndarray,
                args, unit: bool) -> dict:
    """One worn-vs-fresh comparison (unit-norm or raw vectors)."""
    from benchmarks.bench_end_to_end import cheapest_reaching, timed_interleaved
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.client import RoutedMilvusClient
    from milvus_ltr_router.labels import array_blocks, exact_knn
    from milvus_ltr_router.layout import cluster_sizes, drop_layout
    from milvus_ltr_router.retrain import RetrainConfig, retrain
    from milvus_ltr_router.writer import create_vector_collection

    label = "unit" if unit else "raw"
    tag = f"{label}_{uuid.uuid4().hex[:6]}"
    t_all = time.perf_counter()
    n_wn = args.wordnet_rows
    initial, inserts = choose_rows(n_wn, len(docs), args.rows, args.initial_share,
                                   args.initial_wordnet, args.insert_gcide, args.seed)
    n_up = int(round(len(inserts) * args.upsert_share))
    n_del = int(round(len(inserts) * args.delete_share))
    spare = spare_rows(len(docs), np.concatenate([initial, inserts]), n_up, args.seed)
    ops = plan_writes(initial, inserts, spare, n_del, args.batch, args.seed)
    perm = np.random.default_rng(0).permutation(len(queries))
    test_q = queries[np.sort(perm[:args.queries])]
    train_q = queries[np.sort(perm[args.queries:args.queries + args.train_queries])]
    train_file = f"{tmp}/train_{label}.npy"
    np.save(train_file, train_q)
    model_dir = f"{tmp}/models_{label}"
    info: dict = {"variant": label, "initial_rows": len(initial),
                  "initial_wordnet_share": float(np.mean(initial < n_wn)),
                  "inserts": len(inserts), "inserts_gcide_share": float(np.mean(inserts >= n_wn)),
                  "upserts": n_up, "deletes": n_del, "write_requests": len(ops), "seconds": {}}
    secs = info["seconds"]

    def publish(collection: str) -> dict:
        t0 = time.perf_counter()
        res = retrain(client, RetrainConfig(collection=collection, model_dir=model_dir,
                                            queries_file=train_file, sample=len(train_q),
                                            nprobe=args.nprobe, min_queries=10, metric="recall",
                                            min_gain=-1.0))
        return {"decision": res.decision, "gain": res.gain, "reason": res.reason,
                "seconds": time.perf_counter() - t0}

    # 1. initial build + router
    src0, worn_name = f"wear_src0_{tag}", f"wear_worn_{tag}"
    t0 = time.perf_counter()
    create_vector_collection(client, src0, docs[initial], ids=initial)
    rep = build_layout(client, src0, worn_name, storage="single")
    secs["worn_build"] = time.perf_counter() - t0
    worn_layout = rep.layout
    client.release_collection(src0)     # kept (not loaded) as the rebuild's named source
    info["worn_router"] = publish(worn_name)
    info["segments_after_build"] = segments(client, worn_name)
    info["sizes_after_build"] = skew(cluster_sizes(client, worn_layout))

    # 2. routed writes, flush, Milvus's own compaction
    rc = RoutedMilvusClient(uri, model_dir=model_dir, log_rate=0)
    t0 = time.perf_counter()
    info["writes"] = routed_writes(rc, worn_name, ops, docs)
    secs["writes"] = time.perf_counter() - t0
    info["segments_after_writes"] = segments(client, worn_name)
    t0 = time.perf_counter()
    client.flush(worn_name)
    secs["flush"] = time.perf_counter() - t0
    info["segments_after_flush"] = segments(client, worn_name)
    trace = wait_compaction(client, worn_name, args.compaction_wait)
    info["compaction_trace"] = trace
    info["segments_after_wait"] = trace[-1]
    secs["compaction_wait"] = trace[-1]["t_s"]

    # the final rows: tracked, checked against the server
    keys, vec_rows, position = apply_plan(initial, ops)
    read_keys, read_cids = cluster_column(client, worn_layout)
    info["rows_final"] = len(keys)
    info["rows_read_back"] = len(read_keys)
    # physical order: build rows in cluster order (their build-time cluster = the one read
    # back, as untouched rows never move), then the routed writes in arrival order
    n_init = len(initial)
    cid_by_key, found = physical_clusters(keys, read_keys, read_cids)
    info["tracked_rows_missing"] = int((~found).sum())
    info["rows_not_tracked"] = int(len(read_keys) - found.sum())
    built = position[found] < n_init
    seq_worn = np.concatenate([np.sort(cid_by_key[built], kind="stable"), cid_by_key[~built]])
    info["rows_from_build_share"] = float(built.mean())
    final_vecs = docs[vec_rows]

    # 3. fresh build of the final rows
    src1, fresh_name = f"wear_src1_{tag}", f"wear_fresh_{tag}"
    n_clusters = None if args.fresh_clusters == "default" else worn_layout.n_clusters
    t0 = time.perf_counter()
    create_vector_collection(client, src1, final_vecs, ids=keys)
    fresh_layout = build_layout(client, src1, fresh_name, storage="single", n_clusters=n_clusters).layout
    secs["fresh_build"] = time.perf_counter() - t0
    client.drop_collection(src1)
    info["fresh_router"] = publish(fresh_name)
    f_keys, f_cids = cluster_column(client, fresh_layout)
    seq_fresh = np.sort(f_cids, kind="stable")      # written in cluster order by the build
    rc.close()
    rc = RoutedMilvusClient(uri, model_dir=model_dir, log_rate=0)
    # release/load both so both serve from loaded, flushed segments the same way
    for name in (worn_name, fresh_name):
        client.release_collection(name)
        client.load_collection(name)
    colls = {"worn": (worn_name, worn_layout), "fresh": (fresh_name, fresh_layout)}
    per: dict = {}
    for which, (name, lay) in colls.items():
        sizes = cluster_sizes(client, lay)
        st = rc.router_status(name)
        per[which] = {"collection": name, "clusters": lay.n_clusters, "rows": int(sizes.sum()),
                      "router": st.get("mode"), "calibrated": bool(st.get("adaptive")),
                      **skew(sizes), "segments": segments(client, name),
                      **order_measures(seq_worn if which == "worn" else seq_fresh), "_sizes": sizes}

    # 4. exact neighbours of the final rows; interleaved timing
    exact = keys[exact_knn(test_q, array_blocks(final_vecs, np.zeros(len(keys), int)), k=10).ids]
    nprobes = sorted({n for n in list(NPROBES) + [args.nprobe, 2 * args.nprobe]})
    configs = []
    for which, (name, lay) in colls.items():
        for n in nprobes:
            if n <= lay.n_clusters:
                configs.append((which, f"nprobe={n}", n, lambda q, name=name, n=n: rc.search(
                    name, data=[q.tolist()], limit=10, nprobe=n)[0]))
        if per[which]["calibrated"]:
            t = args.recall_target
            probed = rc.route(name, test_q, recall_target=t)
            per[which]["probed@target"] = float(np.mean([len(p) for p in probed]))
            configs.append((which, f"target={t}", per[which]["probed@target"],
                            lambda q, name=name, t=t: rc.search(name, data=[q.tolist()], limit=10,
                                                                recall_target=t)[0]))
    for which, (name, lay) in colls.items():       # rows scanned per query at each nprobe
        sizes = per[which].pop("_sizes")
        ranked = rc.route(name, test_q, nprobe=max(nprobes))
        per[which]["rows_scanned"] = {n: float(np.mean([sizes[r[:n]].sum() for r in ranked]))
                                      for n in nprobes}
    load_before = os.getloadavg()
    log.info("%s: timing %d configurations x %d queries, interleaved (load %.2f %.2f %.2f)",
             label, len(configs), len(test_q), *load_before)
    rows = timed_interleaved(configs, test_q, exact, seed=args.seed)
    load_after = os.getloadavg()

    def at_09(rows_, which):
        r90 = cheapest_reaching([r for r in rows_ if r["param"].startswith("nprobe")], which, 0.9)
        return r90 and {"param": r90["param"], "recall@10": r90["recall@10"],
                        "median_ms": r90["median_ms"], "p99_ms": r90["p99_ms"]}
    for which in colls:
        per[which]["nprobe@0.9"] = at_09(rows, which)
    if args.maintain:           # upkeep: maintain-layout (only the rows written since the build)
        from milvus_ltr_router.maintain import maintain_layout
        t0 = time.perf_counter()
        mrep = maintain_layout(client, worn_name, flush=args.maintain_flush)
        seconds = time.perf_counter() - t0
        trace = wait_compaction(client, worn_name, args.compaction_wait, poll=3.0)
        configs_m = [c for c in configs if c[0] == "fresh"] + \
            [("worn+maintained",) + tuple(c[1:]) for c in configs if c[0] == "worn"]
        load_m = os.getloadavg()
        log.info("%s: after maintain-layout (%.1f s, %d rows rewritten), timing %d configurations "
                 "again (load %.2f)", label, seconds, mrep.rewritten, len(configs_m), load_m[0])
        rows_m = timed_interleaved(configs_m, test_q, exact, seed=args.seed + 3)
        # physical order now: build rows in cluster order, then the rewritten rows in cluster order
        seq_m = np.concatenate([np.sort(cid_by_key[built], kind="stable"),
                                np.sort(cid_by_key[~built], kind="stable")])
        info["maintain"] = {
            "seconds": seconds, "report": mrep.to_dict(),
            "fresh_build_seconds": secs["fresh_build"],
            "share_of_fresh_build": seconds / secs["fresh_build"],
            "compaction_trace": trace, "segments": trace[-1], **order_measures(seq_m),
            "rows": rows_m, "load_before_timing": load_m, "load_after_timing": os.getloadavg(),
            "at_09": {w: at_09(rows_m, w) for w in ("worn+maintained", "fresh")}}
    if args.compact:            # upkeep: a manual compaction of the worn collection, timed again
        t0 = time.perf_counter()
        job = client.compact(worn_name)
        state = None
        while time.perf_counter() - t0 < args.compaction_wait:
            state = client.get_compaction_state(job)
            if state == "Completed":
                break
            time.sleep(3)
        info["manual_compaction"] = {"state": state, "seconds": time.perf_counter() - t0}
        trace = wait_compaction(client, worn_name, args.compaction_wait, poll=3.0)
        info["manual_compaction"]["segments_trace"] = trace
        info["manual_compaction"]["segments"] = trace[-1]
        configs2 = [c for c in configs if c[0] == "fresh"] + \
            [("worn+compact",) + tuple(c[1:]) for c in configs if c[0] == "worn"]
        load2 = os.getloadavg()
        log.info("%s: after a manual compaction (%s), timing %d configurations again (load %.2f)",
                 label, state, len(configs2), load2[0])
        rows2 = timed_interleaved(configs2, test_q, exact, seed=args.seed + 1)
        info["manual_compaction"].update(rows=rows2, load_before_timing=load2,
                                         load_after_timing=os.getloadavg(),
                                         at_09={w: at_09(rows2, w) for w in ("worn+compact", "fresh")})
    if args.rebuild:            # upkeep: build-layout --overwrite --keep-clusters of the worn one
        t0 = time.perf_counter()
        rep = build_layout(client, src0, worn_name, overwrite=True, clusters_from=worn_layout,
                           storage="single")    # reads the worn collection (the layout in use)
        seconds = time.perf_counter() - t0
        rebuilt = rep.layout
        rc.reload_router(worn_name)
        st = rc.router_status(worn_name)
        configs3 = [c for c in configs if c[0] == "fresh"] + \
            [("worn+rebuilt",) + tuple(c[1:]) for c in configs if c[0] == "worn"]
        load3 = os.getloadavg()
        log.info("%s: after a rebuild keeping the clusters (%.0f s), timing %d configurations "
                 "again (load %.2f)", label, seconds, len(configs3), load3[0])
        rows3 = timed_interleaved(configs3, test_q, exact, seed=args.seed + 2)
        info["keep_clusters_rebuild"] = {
            "seconds": seconds, "fresh_build_seconds": secs["fresh_build"],
            "share_of_fresh_build": seconds / secs["fresh_build"],
            "same_clustering": rebuilt.clustering_id == worn_layout.clustering_id,
            "router_kept": st.get("version") is not None, "router": st.get("mode"),
            "segments": segments(client, worn_name), "rows": rows3,
            "load_before_timing": load3, "load_after_timing": os.getloadavg(),
            "at_09": {w: at_09(rows3, w) for w in ("worn+rebuilt", "fresh")}}
    rc.close()
    client.drop_collection(src0)
    if not args.keep:
        for name in (worn_name, fresh_name):
            drop_layout(client, name)
    secs["total"] = time.perf_counter() - t_all
    info.update(per=per, rows=rows, load_before_timing=load_before, load_after_timing=load_after,
                nprobes=nprobes)
    return info


# --------------------------------------------------------------------------- report
def summary_rows(info: dict, args) -> list[dict]:
    """The worn-vs-fresh table: one row per measure, worn / fresh / fresh - worn."""
    per, rows = info["per"], info["rows"]
    by = {(r["method"], r["param"]): r for r in rows}

    def rec(which, param):
        r = by.get((which, param))
        return r and r["recall@10"]

    out = []

    def add(measure, w, f, ratio=False):
        d = None
        if isinstance(w, (int, float)) and isinstance(f, (int, float)):
            d = (w / f) if ratio else (w - f)
        out.append({"measure": measure, "worn": w, "fresh": f,
                    ("worn/fresh" if ratio else "worn-fresh"): d, "_ratio": ratio})
    for n in (args.nprobe, 2 * args.nprobe):
        add(f"recall@10 nprobe={n}", rec("worn", f"nprobe={n}"), rec("fresh", f"nprobe={n}"))
    t = args.recall_target
    add(f"recall@10 target={t}", rec("worn", f"target={t}"), rec("fresh", f"target={t}"))
    add(f"clusters probed target={t}", per["worn"].get("probed@target"),
        per["fresh"].get("probed@target"), ratio=True)
    for key, name in (("param", "cheapest nprobe to recall 0.9"), ("median_ms", "median ms there"),
                      ("p99_ms", "p99 ms there")):
        w, f = per["worn"]["nprobe@0.9"], per["fresh"]["nprobe@0.9"]
        add(name, w and (w[key] if key == "param" else w[key]), f and (f[key] if key == "param" else f[key]),
            ratio=key != "param")
    add(f"rows scanned nprobe={args.nprobe}", per["worn"]["rows_scanned"][args.nprobe],
        per["fresh"]["rows_scanned"][args.nprobe], ratio=True)
    for key in ("max_over_mean", "cv", "empty"):
        add(f"cluster size {key}", per["worn"][key], per["fresh"][key], ratio=key != "empty")
    add("loaded segments", per["worn"]["segments"].get("loaded"), per["fresh"]["segments"].get("loaded"))
    add("persistent segments", per["worn"]["segments"].get("persistent"),
        per["fresh"]["segments"].get("persistent"))
    add(f"run_share@{RUN_MIN}", per["worn"][f"run_share@{RUN_MIN}"], per["fresh"][f"run_share@{RUN_MIN}"])
    add("fragments per cluster", per["worn"]["fragments_per_cluster"],
        per["fresh"]["fragments_per_cluster"], ratio=True)
    for r in out:
        r.pop("_ratio")
    return out


def _fmt_secs(seconds: dict) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())


def main(argv=None) -> int:
    from benchmarks.common import RESULTS, plot_lines, print_table, save, setup_logging
    from benchmarks.datasets import load_or_build
    from benchmarks.server import milvus_uri
    from milvus_ltr_router.clustering import normalize_rows
    from pymilvus import MilvusClient

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows in all (initial + inserted)")
    p.add_argument("--norms", nargs="+", default=["unit"], choices=["unit", "raw"],
                   help="unit-norm vectors (cosine data) and/or the raw model2vec vectors")
    p.add_argument("--initial-share", type=float, default=0.6)
    p.add_argument("--initial-wordnet", type=float, default=0.9,
                   help="share of the initial rows drawn from WordNet (the rest GCIDE)")
    p.add_argument("--insert-gcide", type=float, default=0.5,
                   help="share of the inserted rows drawn from GCIDE (the drift)")
    p.add_argument("--upsert-share", type=float, default=0.1,
                   help="upserts of older keys, as a share of the inserted rows")
    p.add_argument("--delete-share", type=float, default=0.1,
                   help="deletes of older keys, as a share of the inserted rows")
    p.add_argument("--batch", type=int, default=1000, help="rows per routed insert request")
    p.add_argument("--fresh-clusters", choices=["same", "default"], default="same",
                   help="clusters of the fresh build: the worn layout's count, or round(sqrt(N))")
    p.add_argument("--queries", type=int, default=400, help="held-out questions to time")
    p.add_argument("--train-queries", type=int, default=20_000, help="questions to retrain on")
    p.add_argument("--nprobe", type=int, default=8, help="the default nprobe (retrain's CLI default)")
    p.add_argument("--recall-target", type=float, default=0.9)
    p.add_argument("--compaction-wait", type=float, default=150.0,
                   help="seconds to wait at most for Milvus's own compaction after the flush")
    p.add_argument("--no-maintain", dest="maintain", action="store_false",
                   help="skip maintain-layout of the worn collection (the rows written since the "
                        "build rewritten in cluster order, in place) and its timing")
    p.add_argument("--maintain-no-flush", dest="maintain_flush", action="store_false",
                   help="maintain-layout --no-flush (Milvus seals the rewritten rows itself)")
    p.add_argument("--no-compact", dest="compact", action="store_false",
                   help="skip the manual compaction of the worn collection and the second timing")
    p.add_argument("--no-rebuild", dest="rebuild", action="store_false",
                   help="skip the upkeep step: build-layout --overwrite --keep-clusters of the worn "
                        "collection (rows rewritten in cluster order under the same clusters and "
                        "router), timed against the fresh build")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the collections")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    setup_logging()
    t_start = time.perf_counter()
    data = load_or_build("large", neighbours=0)
    args.wordnet_rows = wordnet_rows(len(data.docs))
    results = []
    with milvus_uri() as (uri, server_label), tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(uri)
        version = client.get_server_version()
        for norm in args.norms:
            unit = norm == "unit"
            docs = normalize_rows(data.docs) if unit else data.docs
            queries = normalize_rows(data.queries) if unit else data.queries
            results.append(run_variant(client, uri, tmp, docs, queries, args, unit))
        client.close()
    out = Path(args.out) if args.out else RESULTS
    tables = {}
    for info in results:
        tab = summary_rows(info, args)
        tables[info["variant"]] = tab
        lb, la = info["load_before_timing"], info["load_after_timing"]
        print(f"\n{server_label} ({version}); {info['variant']} vectors; {info['rows_final']} final rows "
              f"(read back {info['rows_read_back']}), L={info['per']['worn']['clusters']} worn / "
              f"{info['per']['fresh']['clusters']} fresh; {args.queries} held-out questions; load "
              f"average {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} before timing, {la[0]:.2f} after")
        print(f"writes: {info['writes']['rows']} in {info['write_requests']} requests, "
              f"{sum(info['writes']['seconds'].values()):.1f} s; segments after build "
              f"{info['segments_after_build']}, after writes {info['segments_after_writes']}, "
              f"after flush {info['segments_after_flush']}, after {info['segments_after_wait']['t_s']} s "
              f"wait {info['segments_after_wait']}; routers worn {info['worn_router']['decision']} "
              f"(gain {info['worn_router']['gain']:+.3f}) fresh {info['fresh_router']['decision']} "
              f"(gain {info['fresh_router']['gain']:+.3f})")
        print_table(tab, ["measure", "worn", "fresh", "worn-fresh", "worn/fresh"],
                    f"worn vs fresh ({info['variant']})")
        print_table(info["rows"], ["method", "param", "partitions", "recall@10", "median_ms", "p99_ms"],
                    "every configuration (method = collection)")
        mc = info.get("manual_compaction")
        if mc and "rows" in mc:
            print(f"\nafter a manual compaction of the worn collection ({mc['state']} in "
                  f"{mc['seconds']:.1f} s; segments {mc['segments']}), timed again beside fresh "
                  f"(load average {mc['load_before_timing'][0]:.2f} before, "
                  f"{mc['load_after_timing'][0]:.2f} after); cheapest nprobe to recall 0.9: {mc['at_09']}")
            print_table(mc["rows"], ["method", "param", "partitions", "recall@10", "median_ms", "p99_ms"],
                        "second timing (method = collection)")
        mt = info.get("maintain")
        if mt:
            r = mt["report"]
            print(f"\nafter maintain-layout of the worn collection ({mt['seconds']:.1f} s = "
                  f"{mt['share_of_fresh_build']:.0%} of the fresh build's {mt['fresh_build_seconds']:.1f} s; "
                  f"{r['rewritten']} rows rewritten in {r['chunks']} chunks, writers held "
                  f"{r['frozen_seconds']:.1f} s in all; phases {_fmt_secs(r['seconds'])}; segments "
                  f"{mt['segments']}; fragments per cluster {mt['fragments_per_cluster']:.1f}), timed "
                  f"again beside fresh (load average {mt['load_before_timing'][0]:.2f} before, "
                  f"{mt['load_after_timing'][0]:.2f} after); cheapest nprobe to recall 0.9: {mt['at_09']}")
            print_table(mt["rows"], ["method", "param", "partitions", "recall@10", "median_ms", "p99_ms"],
                        "after upkeep (method = collection)")
        kr = info.get("keep_clusters_rebuild")
        if kr:
            print(f"\nafter build-layout --overwrite --keep-clusters of the worn collection "
                  f"({kr['seconds']:.1f} s = {kr['share_of_fresh_build']:.0%} of the fresh build's "
                  f"{kr['fresh_build_seconds']:.1f} s; same clustering {kr['same_clustering']}, "
                  f"router {kr['router']} kept {kr['router_kept']}; segments {kr['segments']}), "
                  f"timed again beside fresh (load average {kr['load_before_timing'][0]:.2f} before, "
                  f"{kr['load_after_timing'][0]:.2f} after); cheapest nprobe to recall 0.9: {kr['at_09']}")
            print_table(kr["rows"], ["method", "param", "partitions", "recall@10", "median_ms", "p99_ms"],
                        "third timing (method = collection)")
        series = {}
        for which in ("worn", "fresh"):
            rs = [r for r in info["rows"] if r["method"] == which and r["param"].startswith("nprobe")]
            series[f"{which}"] = ([r["median_ms"] for r in rs], [r["recall@10"] for r in rs])
        if mc and "rows" in mc:
            rs = [r for r in mc["rows"] if r["method"] == "worn+compact" and r["param"].startswith("nprobe")]
            series["worn + manual compaction (2nd timing)"] = ([r["median_ms"] for r in rs],
                                                               [r["recall@10"] for r in rs])
        if mt:
            rs = [r for r in mt["rows"] if r["method"] == "worn+maintained" and r["param"].startswith("nprobe")]
            series["worn + maintain-layout"] = ([r["median_ms"] for r in rs], [r["recall@10"] for r in rs])
        if kr:
            rs = [r for r in kr["rows"] if r["method"] == "worn+rebuilt" and r["param"].startswith("nprobe")]
            series["worn + rebuild keeping the clusters (3rd timing)"] = (
                [r["median_ms"] for r in rs], [r["recall@10"] for r in rs])
        plot_lines(out / f"wear_{info['variant']}.png", series, "median latency (ms), nprobe 2..32",
                   "recall@10", f"worn vs fresh layout, {info['rows_final']} rows ({info['variant']})")
    save("wear", {"server": server_label, "server_version": version, "args": vars(args),
                  "tables": tables, "variants": results,
                  "wall_s": time.perf_counter() - t_start}, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
