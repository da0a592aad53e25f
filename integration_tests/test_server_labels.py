"""Labels computed by Milvus (issue 14): the same exact neighbours as the local path."""
import numpy as np
import pytest

from milvus_ltr_router.labels import exact_knn
from milvus_ltr_router.layout import read_layout
from milvus_ltr_router.readout import iter_layout_blocks
from milvus_ltr_router.server_knn import LabelPathError, choose_label_path, milvus_knn


def test_milvus_and_local_labels_agree(client, wordnet_layout, fixture_data):
    layout = read_layout(client, wordnet_layout.layout.collection)
    queries = fixture_data.queries[:300].astype(np.float32)
    assert choose_label_path("milvus", client, layout, len(queries)) == "milvus"
    # auto: local for a small collection, Milvus once the vectors to stream pass the threshold
    assert choose_label_path("auto", client, layout, len(queries)) == "local"
    assert choose_label_path("auto", client, layout, len(queries), auto_bytes=1 << 20) == "milvus"
    remote = milvus_knn(client, layout, queries, k=10, nq=64, workers=2)
    local = exact_knn(queries, iter_layout_blocks(client, layout), k=10, metric=layout.metric)
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-5, atol=1e-5)
    # identical ids and clusters wherever the local scores are not (near-)tied with a neighbour
    gap = np.diff(local.scores, axis=1)
    distinct = np.ones_like(local.ids, dtype=bool)
    distinct[:, 1:] &= np.abs(gap) > 1e-5
    distinct[:, :-1] &= np.abs(gap) > 1e-5
    assert distinct.mean() > 0.9
    np.testing.assert_array_equal(remote.ids[distinct], local.ids[distinct])
    np.testing.assert_array_equal(remote.partitions[distinct], local.partitions[distinct])
    np.testing.assert_array_equal(remote.labels, local.labels)


def test_milvus_labels_refused_where_search_is_not_exact(client, wordnet_source, wordnet_layout,
                                                        unique_name):
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import drop_layout
    name = unique_name("ivf_layout")
    lay = build_layout(client, wordnet_source, name, storage="single", clusters_from=wordnet_layout.layout,
                       index={"index_type": "IVF_FLAT", "params": {"nlist": 16}}).layout
    try:
        with pytest.raises(LabelPathError, match="approximate"):
            choose_label_path("milvus", client, lay, 100)
        assert choose_label_path("auto", client, lay, 100) == "local"
    finally:
        drop_layout(client, name)
