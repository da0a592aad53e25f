"""Issue 24 on a real Milvus server: the live recall estimate and the metrics endpoint.

The session's WordNet layout (20,000 MiniLM glosses, 64 clusters; ids are ``7 i + 3``) with a
router retrained here on 2,000 real questions (linear router, ``--moments off``: nothing is
written back to the shared layout), published into this module's own model dir. Held-out
questions are searched with ``recall_target=0.9``; every one is re-run exactly in the
background (``recall_sample=1.0``) and the live estimate is compared with numpy's exact
top-10 of the same queries.
"""
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus_ltr_router.client import RoutedMilvusClient
from milvus_ltr_router.querylog import log_collection_name
from milvus_ltr_router.retrain import RetrainConfig, retrain

prom = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

TARGET = 0.9
N_TRAIN = 2000


@pytest.fixture(scope="module")
def trained(milvus_server, wordnet_layout, fixture_data, tmp_path_factory):
    """A calibrated router for the session layout, published into a model dir of our own."""
    models = tmp_path_factory.mktemp("live_recall_models")
    qfile = models / "queries.npy"
    np.save(qfile, fixture_data.queries[:N_TRAIN])
    raw = MilvusClient(uri=milvus_server.uri, token=milvus_server.token)
    try:
        result = retrain(raw, RetrainConfig(collection=wordnet_layout.layout.collection,
                                            model_dir=str(models), queries_file=str(qfile),
                                            nprobe=2, min_gain=-1.0, min_queries=100,
                                            max_epochs=30, moments="off"))
    finally:
        raw.close()
    assert result.decision == "published", result.reason
    assert result.training["calibration_published"]
    return models, result


def exact_top10(docs: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact inner-product top-10 ids of the session source (ids 7 i + 3)."""
    scores = queries @ docs.T
    top = np.argpartition(-scores, 10, axis=1)[:, :10]
    return top * 7 + 3


def test_live_estimate_agrees_with_offline_exact_evaluation(milvus_server, wordnet_layout,
                                                            fixture_data, trained):
    """Issue 24's goal: after >= 2,000 sampled queries the live recall@10 at recall_target 0.9
    is within +-0.02 of an offline exact evaluation of the same queries."""
    models, result = trained
    collection = wordnet_layout.layout.collection
    queries = fixture_data.queries[N_TRAIN:N_TRAIN + 2000]
    client = RoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token,
                                model_dir=str(models), log_rate=0, recall_sample=1.0, seed=0,
                                metrics=prom.CollectorRegistry())
    try:
        status = client.router_status(collection)
        assert status["version"] == result.version and status["adaptive"] is not None
        started = time.monotonic()
        served = []
        for s in range(0, len(queries), 100):
            res = client.search(collection, data=queries[s:s + 100], limit=10,
                                recall_target=TARGET)
            served += [[h["id"] for h in hits] for hits in res]
            assert client.flush_live_recall(120)    # within the auditor's bounded queue
        seconds = time.monotonic() - started
        live = client.router_status(collection)["live_recall"]
    finally:
        client.close()
    assert live["done"] == 2000 and live["dropped"] == 0 and live["failed"] == 0, live
    (est,) = [e for e in live["estimates"] if e["recall_target"] == TARGET]
    truth = exact_top10(fixture_data.docs, queries)
    offline = float(np.mean([len(set(t.tolist()) & set(s)) / 10 for t, s in zip(truth, served)]))
    print(f"live recall@10 {est['recall']:.4f} [{est['lower']:.4f}, {est['upper']:.4f}] "
          f"n={est['n']}, offline exact {offline:.4f}; 2,000 queries searched and re-run in "
          f"{seconds:.1f} s")
    assert est["n"] == 2000 and est["k"] == 10
    assert abs(est["recall"] - offline) <= 0.02
    assert est["lower"] <= offline <= est["upper"]
    assert offline < 1.0                  # routing misses some neighbours: a real comparison


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """Every sample of the endpoint, by (name, sorted labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_scraped_over_http_while_searches_run(milvus_server, wordnet_layout,
                                                      wordnet_source, fixture_data, tmp_path):
    collection = wordnet_layout.layout.collection
    registry = prom.CollectorRegistry()
    port = free_port()
    server, _thread = prom.start_http_server(port, addr="127.0.0.1", registry=registry)
    client = RoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token,
                                model_dir=str(tmp_path / "models"), nprobe=2, log_rate=0.5,
                                recall_sample=0.2, seed=0, metrics=registry)
    queries = fixture_data.queries[:400]
    stop, searched, errors = threading.Event(), [], []

    def searcher():
        try:
            for s in range(0, len(queries), 10):
                if stop.is_set():
                    return
                client.search(collection, data=queries[s:s + 10], limit=10)
                searched.append(10)
        except Exception as exc:     # the assertion below names it
            errors.append(exc)
    routed = ("milvus_ltr_router_searches_total", (("collection", collection), ("routed", "true")))
    try:
        worker = threading.Thread(target=searcher)
        worker.start()
        seen = []
        while worker.is_alive() and len(seen) < 20:
            seen.append(scrape(port).get(routed, 0.0))      # parsed while searches run
            time.sleep(0.05)
        worker.join(120)
        assert not errors, errors
        assert seen == sorted(seen) and len(seen) >= 2      # a counter never goes back
        client.search(wordnet_source, data=queries[:1].tolist(), limit=3)   # no layout
        assert client.flush_query_log(60) and client.flush_live_recall(60)
        samples = scrape(port)
    finally:
        stop.set()
        client.close()
        server.shutdown()
        MilvusClient(uri=milvus_server.uri, token=milvus_server.token).drop_collection(
            log_collection_name(collection))

    def get(name, **labels):
        return samples.get((f"milvus_ltr_router_{name}", tuple(sorted(labels.items()))))
    n_searches, n_queries = len(searched), sum(searched)
    assert n_searches == 40 and seen[-1] <= n_searches
    assert get("searches_total", collection=collection, routed="true") == n_searches
    kinds = [k for (name, labels), v in samples.items()
             if name == "milvus_ltr_router_routed_queries_total" for key, k in labels
             if key == "router"]
    assert len(kinds) == 1
    assert get("routed_queries_total", collection=collection, router=kinds[0]) == n_queries
    assert get("probed_clusters_count", collection=collection) == n_queries
    assert get("probed_clusters_sum", collection=collection) == 2 * n_queries
    assert get("search_seconds_count", collection=collection) == n_searches
    assert get("routing_seconds_count", collection=collection) == n_searches
    assert get("passthrough_searches_total", collection=wordnet_source, reason="no_layout") == 1
    assert get("router_info", collection=collection, version="", kind=kinds[0],
               fallback_reason="no_router") == 1
    sampled = get("query_log_sampled_total", collection=collection)
    assert 0 < sampled < n_queries and get("query_log_written_total", collection=collection) == sampled
    audits = get("recall_audits_total", collection=collection, outcome="done")
    assert 0 < audits < n_queries
    assert get("live_recall_samples", collection=collection, target="none", k="10") == audits
    assert 0.0 < get("live_recall", collection=collection, target="none", k="10") <= 1.0


class Proxy:
    """A TCP forwarder to the server's gRPC port. :meth:`kill` cuts every connection through
    it and stops listening (what a dropped network path or a dead replica looks like to the
    client); :meth:`start` listens again on the same port."""

    def __init__(self, host: str, port: int):
        self.target, self.port = (host, port), free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self.sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock) -> None:
        while True:
            try:
                conn, _ = sock.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self.lock:
                self.conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def kill(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the accept (a close alone does not)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def test_searches_are_unaffected_when_the_exact_search_connection_dies(
        milvus_server, wordnet_layout, fixture_data, trained):
    """Issue 24: the live recall's exact re-runs go through a connection of their own
    (``recall_uri``, here a TCP proxy to the same server). Cutting that connection and
    refusing new ones mid-run fails no search and changes no result; once the path is back
    the auditor opens a fresh connection and the estimate grows again."""
    models, _ = trained
    collection = wordnet_layout.layout.collection
    host, port = milvus_server.uri.split("://")[-1].rsplit(":", 1)
    proxy = Proxy(host, int(port))
    proxy.start()
    queries = fixture_data.queries[N_TRAIN:N_TRAIN + 600]
    plain = RoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token,
                               model_dir=str(models), log_rate=0)
    client = RoutedMilvusClient(uri=milvus_server.uri, token=milvus_server.token,
                                model_dir=str(models), log_rate=0, recall_sample=1.0, seed=0,
                                recall_uri=proxy.uri)

    def search(c, block):
        return [[h["id"] for h in hits]
                for hits in c.search(collection, data=block, limit=10, recall_target=TARGET)]
    try:
        for s in range(0, 200, 20):                             # audits through the proxy
            search(client, queries[s:s + 20])
        assert client.flush_live_recall(120)
        before = client.router_status(collection)["live_recall"]
        assert before["done"] == 200 and before["failed"] == 0, before
        proxy.kill()                                            # the audit path is gone
        served, want = [], []
        started = time.monotonic()
        for s in range(200, 400, 20):
            served += search(client, queries[s:s + 20])         # never waits on the audits
            want += search(plain, queries[s:s + 20])
        searched_in = time.monotonic() - started
        time.sleep(2.0)
        during = client.router_status(collection)["live_recall"]
        proxy.start()                                           # back: the estimate resumes
        for s in range(400, 600, 20):
            served += search(client, queries[s:s + 20])
            want += search(plain, queries[s:s + 20])
        assert client.flush_live_recall(240)
        after = client.router_status(collection)["live_recall"]
    finally:
        client.close()
        plain.close()
        proxy.kill()
    print(f"searched 200 queries in {searched_in:.1f} s with the audit path down; live recall "
          f"before {before['done']} done, during {during}, after {after['done']} done, "
          f"{after['failed']} failed, {after['dropped']} dropped")
    assert served == want                       # same answers as a client without audits
    assert during["failed"] + during["queue"] > 0 and during["done"] < 400, during  # held up
    assert after["done"] > during["done"] and after["done"] >= 300          # ... and resumed
    assert after["submitted"] == 600
    assert after["done"] + after["empty"] + after["failed"] + after["dropped"] == 600
    (est,) = [e for e in after["estimates"] if e["recall_target"] == TARGET]
    assert est["n"] == after["done"] and 0.8 < est["recall"] <= 1.0
