import numpy as np
import pytest


@pytest.fixture(scope="session")
def fixture_data():
    """The committed real-data fixture: 20k WordNet glosses, 4k real questions, MiniLM."""
    from milvus_ltr_router.fixture import load_fixture
    return load_fixture()


@pytest.fixture(scope="session")
def small_layout_arrays(fixture_data):
    """A 5k-document slice clustered into 32 spherical clusters, with exact neighbours."""
    from milvus_ltr_router.clustering import assign_clusters, fit_centroids
    from milvus_ltr_router.labels import array_blocks, exact_knn
    docs = fixture_data.docs[:5000]
    queries = fixture_data.queries
    centroids = fit_centroids(docs, 32, "spherical", seed=0)
    parts = assign_clusters(docs, centroids, "spherical")
    nb = exact_knn(queries, array_blocks(docs, parts, block_rows=1000), k=10)
    return docs, queries, centroids, parts, nb


@pytest.fixture
def lite_uri(tmp_path):
    """A fresh milvus-lite file; its in-process server is released afterwards."""
    from milvus_ltr_router.milvus_io import release_lite
    uri = str(tmp_path / "test.db")
    yield uri
    release_lite(uri)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def second_lock_attempt():
    """A function that tries the registry lock of ``collection`` from another thread while the
    caller holds it, and returns the LockedError that attempt got (None if it got the lock)."""
    import threading
    from milvus_ltr_router.registry import LockedError, ModelRegistry

    def attempt(model_dir, collection: str):
        errors = []

        def second():
            try:
                with ModelRegistry(model_dir).lock(collection):
                    pass
            except LockedError as exc:
                errors.append(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join()
        return errors[0] if errors else None
    return attempt


@pytest.fixture(scope="module")
def lite(tmp_path_factory, fixture_data, request):
    """A milvus-lite file (one per test module) with 'src' (1,500 MiniLM documents) laid out as
    'docs' (8 clusters, partition storage); released so a CLI run can open it."""
    from pymilvus import MilvusClient
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.milvus_io import release_lite
    from milvus_ltr_router.writer import create_vector_collection
    uri = str(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]) / "test.db")
    client = MilvusClient(uri)
    create_vector_collection(client, "src", fixture_data.docs[:1500])
    build_layout(client, "src", "docs", n_clusters=8, seed=0)
    client.close()
    release_lite(uri)            # milvus-lite serves a file to one client at a time
    yield uri
    release_lite(uri)
