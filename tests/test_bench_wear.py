"""The pure parts of benchmarks/bench_wear.py: the write plan, its replay, the orderedness and
skew measures (no server)."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_wear import (apply_plan, choose_rows, fragments_per_cluster, physical_clusters,
                                   plan_writes, run_share, runs, skew, spare_rows)


def test_runs_and_run_share():
    seq = [3] * 40 + [1, 2, 1, 2] + [5] * 32 + [7] * 31
    assert runs(seq).tolist() == [40, 1, 1, 1, 1, 32, 31]
    # the runs of 40 and 32 count; the run of 31 and the four singles do not
    assert run_share(seq, 32) == pytest.approx(72 / 107)
    assert run_share(np.sort(np.repeat(np.arange(10), 50)), 32) == 1.0
    rng = np.random.default_rng(0)
    assert run_share(rng.integers(0, 100, 5000), 32) == 0.0      # interleaved rows: no runs


def test_fragments_per_cluster():
    assert fragments_per_cluster(np.repeat(np.arange(7), 20)) == 1.0
    # cluster 0 in three pieces, cluster 1 in two: 5 runs over 2 clusters
    assert fragments_per_cluster([0, 0, 1, 0, 1, 1, 0]) == 2.5


def test_skew():
    even = skew([100] * 10)
    assert even["max_over_mean"] == 1.0 and even["cv"] == 0.0 and even["empty"] == 0
    s = skew([0, 100, 200, 500])
    assert s["max_over_mean"] == pytest.approx(500 / 200)
    assert s["cv"] == pytest.approx(np.std([0, 100, 200, 500]) / 200)
    assert s["empty"] == 1 and s["min"] == 0 and s["max"] == 500


def test_choose_rows_draws_the_corpora_as_asked():
    n_wn, n_docs = 5000, 12000
    initial, inserts = choose_rows(n_wn, n_docs, 4000, initial_share=0.6, initial_wordnet=0.9,
                                   insert_gcide=0.5, seed=1)
    assert len(initial) == 2400 and len(inserts) == 1600
    assert len(np.unique(np.concatenate([initial, inserts]))) == 4000
    assert np.mean(initial < n_wn) == pytest.approx(0.9)
    assert np.mean(inserts >= n_wn) == pytest.approx(0.5)
    # inserts come in a random order, not corpus by corpus
    assert 0.3 < np.mean(inserts[:800] >= n_wn) < 0.7
    with pytest.raises(ValueError, match="WordNet"):
        choose_rows(1000, n_docs, 4000)


def _plan(seed=0):
    initial, inserts = choose_rows(5000, 10000, 5000, seed=seed)
    spare = spare_rows(10000, np.concatenate([initial, inserts]), 200, seed)
    ops = plan_writes(initial, inserts, spare, 150, batch=500, seed=seed)
    return initial, inserts, spare, ops


def test_plan_writes_touches_only_stored_keys_once():
    initial, inserts, spare, ops = _plan()
    assert [o.kind for o in ops[:3]] == ["insert", "upsert", "delete"]
    assert sum(len(o.keys) for o in ops if o.kind == "insert") == len(inserts)
    ups = np.concatenate([o.keys for o in ops if o.kind == "upsert"])
    dels = np.concatenate([o.keys for o in ops if o.kind == "delete"])
    assert len(ups) == 200 and len(dels) == 150
    assert len(np.unique(np.concatenate([ups, dels]))) == 350       # no key touched twice
    assert not set(spare) & set(np.concatenate([initial, inserts]))  # new vectors: unused rows
    stored = set(initial.tolist())
    for o in ops:                    # every upsert / delete names a key stored at that moment
        if o.kind == "insert":
            stored |= set(o.keys.tolist())
        else:
            assert set(o.keys.tolist()) <= stored
            if o.kind == "delete":
                stored -= set(o.keys.tolist())
    # touched keys include inserted ones, not only the build's
    assert set(np.concatenate([ups, dels]).tolist()) & set(inserts.tolist())


def test_apply_plan_replays_the_writes():
    initial, inserts, spare, ops = _plan()
    keys, vec_rows, position = apply_plan(initial, ops)
    ups = {int(k): int(r) for o in ops if o.kind == "upsert" for k, r in zip(o.keys, o.rows)}
    dels = {int(k) for o in ops if o.kind == "delete" for k in o.keys}
    assert len(keys) == len(initial) + len(inserts) - len(dels)
    assert not dels & set(keys.tolist())
    assert np.all(np.diff(position) > 0)                    # sorted by write position
    for k, r, p in zip(keys.tolist(), vec_rows.tolist(), position.tolist()):
        if k in ups:                                        # upserted: the spare row's vector,
            assert r == ups[k] and p >= len(initial)        # written after the build
        else:
            assert r == k
    untouched = [k for k in initial.tolist() if k not in ups and k not in dels]
    assert np.sum(position < len(initial)) == len(untouched)
    with pytest.raises(ValueError, match="not stored"):
        apply_plan(initial, ops + [ops[2]])                 # the same delete again


def test_physical_clusters_matches_keys_and_flags_missing():
    read_keys = np.array([30, 10, 20])
    read_cids = np.array([3, 1, 2])
    cids, found = physical_clusters(np.array([10, 20, 40, 30]), read_keys, read_cids)
    assert found.tolist() == [True, True, False, True]
    assert cids.tolist() == [1, 2, 3]
