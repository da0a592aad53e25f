"""Two routed clients upsert the same existing key into two different clusters at the same
moment (partition storage on a real server). Each writer deletes the old copy only from the
partition it found it in before writing, so neither erases the other's new row: the key keeps
one row or, in the race window, two (never none); the next upsert of the key leaves one."""
import threading
import uuid

import numpy as np
from pymilvus import MilvusClient

from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.build import build_layout
from milvus_ltr_router.layout import cluster_of, drop_layout
from milvus_ltr_router.writer import create_vector_collection

ROUNDS = 12


def test_concurrent_upserts_of_one_key_never_lose_it(milvus_uri, fixture_data, tmp_path):
    # (grouped and single storage locate stored rows by their cluster field: not at risk)
    storage = "partition"
    docs = fixture_data.docs[:600]
    plain = MilvusClient(uri=milvus_uri)
    tag = uuid.uuid4().hex[:6]
    src, target = f"race_src_{tag}", f"race_ivf_{tag}"
    create_vector_collection(plain, src, docs)
    plain.load_collection(src)
    layout = build_layout(plain, src, target, n_clusters=4, storage=storage, seed=0).layout
    clusters = cluster_of(layout, docs)
    vecs = [docs[np.flatnonzero(clusters == k)[0]].tolist() for k in (0, 1, 2)]
    writers = [RoutedMilvusClient(uri=milvus_uri, model_dir=str(tmp_path / "m"), log_rate=0)
               for _ in range(2)]

    def rows_of(key: int) -> int:
        return len(plain.query(target, filter=f"id == {key}", output_fields=["id"],
                               consistency_level="Strong"))
    counts = []
    try:
        for it in range(ROUNDS):
            key = 5_000_000 + it
            writers[0].insert(target, [{"id": key, "vector": vecs[0]}])
            barrier = threading.Barrier(2)
            errors = []

            def upsert(i: int) -> None:
                barrier.wait()
                try:
                    writers[i].upsert(target, [{"id": key, "vector": vecs[i + 1]}])
                except Exception as exc:
                    errors.append(repr(exc))
            threads = [threading.Thread(target=upsert, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not errors, errors
            counts.append(rows_of(key))
            writers[0].upsert(target, [{"id": key, "vector": vecs[1]}])   # repairs a duplicate
            assert rows_of(key) == 1, f"round {it}: {rows_of(key)} rows after a single upsert"
    finally:
        for w in writers:
            w.close()
        drop_layout(plain, target)
        plain.drop_collection(src)
        plain.close()
    print(f"\nconcurrent upserts ({storage}): rows per key after the race {counts}")
    assert min(counts) >= 1, f"a key lost every row: {counts}"
    assert max(counts) <= 2
