"""Storage modes as pure functions: what a routed request names, metadata round trip, grouping."""
import numpy as np
import pytest

from milvus_ltr_router.errors import InputError
from milvus_ltr_router.layout import partition_names_for
from milvus_ltr_router.storage import (CLUSTER_FIELD, Storage, StorageError, check_clustering_key_support,
                                       choose_mode, group_clusters, make_storage, server_version)

NAMES = partition_names_for(6)


def test_search_target_per_mode():
    part = make_storage("partition", NAMES)
    assert part.search_target([4, 1, 4], "grp == 2") == (["c0001", "c0004"], "grp == 2")
    single = make_storage("single", NAMES)
    assert single.search_target([4, 1, 4], "") == (None, f"{CLUSTER_FIELD} in [1, 4]")
    # the caller's filter is parenthesised, so its own "or" cannot widen the cluster restriction
    assert single.search_target([3], "a == 1 or b == 2")[1] == \
        f"(a == 1 or b == 2) and {CLUSTER_FIELD} in [3]"
    assert single.search_target([3], "   ")[1] == f"{CLUSTER_FIELD} in [3]"
    grouped = make_storage("grouped", NAMES, np.array([0, 0, 1, 1, 2, 2]))
    assert grouped.search_target([5, 0, 1], "") == (["g000", "g002"], f"{CLUSTER_FIELD} in [0, 1, 5]")
    assert grouped.n_groups == 3 and single.n_groups == 1 and part.n_groups == 6


def test_write_partition_and_metadata_round_trip():
    for storage in (make_storage("partition", NAMES), make_storage("single", NAMES),
                    make_storage("grouped", NAMES, np.array([1, 0, 1, 0, 2, 2]))):
        back = Storage.from_meta(storage.meta(), NAMES)
        assert back == storage
        assert set(storage.meta()) <= Storage.META_KEYS     # read_layout keeps these out of extra
    assert make_storage("single", NAMES).write_partition(3) == ""          # the default partition
    assert make_storage("partition", NAMES).write_partition(3) == "c0003"
    # layouts written before storage modes had no "storage" key: one partition per cluster
    assert Storage.from_meta({}, NAMES) == make_storage("partition", NAMES)
    with pytest.raises(StorageError, match="group_of_cluster"):
        Storage.from_meta({"storage": "grouped", "group_names": ["g000"], "group_of_cluster": [0, 3]},
                          NAMES[:2])
    with pytest.raises(StorageError, match="unknown storage mode 'shards'"):
        Storage.from_meta({"storage": "shards"}, NAMES)
    assert issubclass(StorageError, InputError)


def test_group_clusters_puts_close_centroids_together():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16, dtype=np.float32)
    # 5 clusters around each of 4 far-apart directions
    cents = np.concatenate([c + 0.05 * rng.standard_normal((5, 16)).astype(np.float32) for c in centres])
    of = group_clusters(cents, 4, "spherical", seed=0)
    assert len(set(of.tolist())) == 4
    for block in range(4):
        assert len(set(of[block * 5:(block + 1) * 5].tolist())) == 1
    assert of[0] == 0                         # numbered by first use in cluster order
    assert (group_clusters(cents, 1, "spherical") == 0).all()
    with pytest.raises(StorageError, match=r"groups must be in \[1, 20\]"):
        group_clusters(cents, 21, "spherical")


def test_auto_mode_and_server_versions():
    assert choose_mode("auto", lite=True) == "partition"
    assert choose_mode("auto", lite=False) == "single"
    assert choose_mode("grouped", lite=True) == "grouped"
    with pytest.raises(StorageError, match="unknown storage mode"):
        choose_mode("sharded", lite=False)
    assert server_version("v2.3.5-lite") == (2, 3, 5)
    assert server_version("2.5.14-gpu") == (2, 5, 14)
    assert server_version("milvus_lite 3.2.2") is None
    check_clustering_key_support("v2.4.7")
    check_clustering_key_support("2.5.14")
    for old in ("v2.3.5", "v2.4.6", "milvus_lite 3.2.2", ""):
        with pytest.raises(StorageError, match="clustering_key needs Milvus >= 2.4.7"):
            check_clustering_key_support(old)
    with pytest.raises(StorageError, match="clustering_key needs a cluster-id field"):
        make_storage("partition", NAMES, clustering_key=True)
