"""Live recall published to the model directory (live_stats): the write side a client calls
(publish_live_recall, RecallPublisher), the read side and how records combine, and
``milvus-ltr-router status`` showing it (``--json`` and the readable line) on milvus-lite."""
import json
import logging
import os

import pytest

from milvus_ltr_router import cli
from milvus_ltr_router import live_stats as ls
from milvus_ltr_router.live_recall import RecallEstimator
from milvus_ltr_router.registry import InvalidNameError, ModelRegistry


def estimate(recall=0.93, lower=0.91, upper=0.95, n=500, target=0.9, k=10, total=None):
    return {"collection": "docs", "recall_target": target, "k": k, "n": n,
            "total": total or n, "recall": recall, "lower": lower, "upper": upper,
            "confidence": 0.95, "below_target": False}


def live_part(*estimates, rate=0.01):
    """What router_status()["live_recall"] holds (serving.LiveRecall.status)."""
    return {"sample_rate": rate, "submitted": 600, "done": 590, "empty": 2, "failed": 1,
            "dropped": 7, "queue": 0, "max_queue": 256, "last_error": "", "warnings": 0,
            "window": 2000, "confidence": 0.95, "estimates": list(estimates)}


def router_status(*estimates, version="v1", layout_id="L1", mode="learned-moments"):
    return {"collection": "docs", "mode": mode, "version": version, "layout_id": layout_id,
            "live_recall": live_part(*estimates)}


# ---------------------------------------------------------------- write side
def test_publish_from_router_status_and_read_back(tmp_path):
    path = ls.publish_live_recall(tmp_path, "docs", router_status(estimate()), client_id="web-1",
                                  now=1000.0)
    assert path == tmp_path / "docs" / "live_recall" / "web-1.json"
    record = json.loads(path.read_text())
    assert record["router"] == {"version": "v1", "kind": "learned-moments", "layout_id": "L1"}
    assert record["counts"] == {"submitted": 600, "done": 590, "empty": 2, "failed": 1,
                                "dropped": 7}
    got = ls.read_live_recall(tmp_path, "docs", version="v1", layout_id="L1", now=1060.0)
    (client,) = got["clients"]
    assert client["client_id"] == "web-1" and client["age_s"] == 60.0
    assert client["current"] and not client["stale"]
    (e,) = got["estimates"]                     # one client: its estimate unchanged
    assert e["recall"] == 0.93 and e["lower"] == pytest.approx(0.91)
    assert e["upper"] == pytest.approx(0.95) and e["n"] == 500 and e["clients"] == 1
    assert e["recall_target"] == 0.9 and e["k"] == 10 and not e["below_target"]
    assert [p.name for p in path.parent.iterdir()] == ["web-1.json"]     # no temp file left


def test_publish_the_live_recall_part_with_the_router_given(tmp_path):
    ls.publish_live_recall(str(tmp_path), "docs", live_part(estimate(target=None)),
                           client_id="a", version=None, kind="moments", layout_id="L1", now=5.0)
    got = ls.read_live_recall(tmp_path, "docs", version=None, layout_id="L1", now=6.0)
    assert got["clients"][0]["router"]["kind"] == "moments"
    assert got["estimates"][0]["recall_target"] is None


def test_a_real_estimator_round_trips(tmp_path):
    est = RecallEstimator()
    for i in range(200):
        est.add("docs", 1.0 if i % 10 else 0.2, recall_target=0.95, k=10)
    live = live_part(*[e.as_dict() for e in est.estimates("docs")])
    ls.publish_live_recall(tmp_path, "docs", live, client_id="c", version="v", layout_id="L")
    (e,) = ls.read_live_recall(tmp_path, "docs", version="v", layout_id="L")["estimates"]
    ref = est.estimate("docs", 0.95, 10)
    assert (e["recall"], e["lower"], e["upper"], e["n"]) == \
        pytest.approx((ref.recall, ref.lower, ref.upper, ref.n))
    assert e["below_target"] == ref.below_target is True


def test_a_real_auditor_status_publishes(tmp_path):
    """The shape serving.LiveRecall.status() gives: {"sample_rate", **RecallAuditor.status()}."""
    from milvus_ltr_router.live_recall import RecallAuditor, RecallJob
    auditor = RecallAuditor(lambda job: [1, 2, 3, 4])
    try:
        for served in ([1, 2, 3, 4], [1, 2, 9, 9]):
            auditor.submit(RecallJob("docs", [0.0], served, limit=4, recall_target=0.9))
        assert auditor.flush()
        status = {"collection": "docs", "mode": "moments", "version": None, "layout_id": "L",
                  "live_recall": {"sample_rate": 0.5, **auditor.status("docs")}}
    finally:
        auditor.close()
    path = ls.publish_live_recall(tmp_path, "docs", status, client_id="x")
    record = json.loads(path.read_text())
    assert record["counts"]["done"] == 2 and record["sample_rate"] == 0.5
    (e,) = ls.read_live_recall(tmp_path, "docs", version=None, layout_id="L")["estimates"]
    assert (e["recall"], e["n"], e["k"], e["recall_target"]) == (0.75, 2, 4, 0.9)


def test_nothing_is_published_while_sampling_is_off(tmp_path):
    assert ls.publish_live_recall(tmp_path, "docs", None) is None
    off = router_status()
    off["live_recall"] = None
    assert ls.publish_live_recall(tmp_path, "docs", off) is None
    assert not (tmp_path / "docs").exists()
    assert ls.read_live_recall(tmp_path, "docs") is None


def test_names_cannot_leave_the_model_dir(tmp_path):
    with pytest.raises(InvalidNameError):
        ls.publish_live_recall(tmp_path, "../etc", live_part(estimate()))
    path = ls.publish_live_recall(tmp_path, "docs", live_part(estimate()), client_id="../../x y")
    assert path.parent == tmp_path / "docs" / "live_recall" and path.name == "_.._x_y.json"
    assert ls.default_client_id() == ls.client_id_of(ls.default_client_id())
    assert str(os.getpid()) in ls.default_client_id()


def test_model_dir_of_a_registry_or_a_client(tmp_path):
    registry = ModelRegistry(tmp_path)
    assert ls.model_dir_of(registry) == registry.model_dir

    class Table:
        pass
    client = Table()
    client._routing = Table()
    client._routing.registry = registry
    assert ls.model_dir_of(client) == registry.model_dir
    with pytest.raises(TypeError):
        ls.model_dir_of(object())


def test_old_records_are_pruned_when_publishing(tmp_path):
    old = ls.publish_live_recall(tmp_path, "docs", live_part(estimate()), client_id="gone")
    long_ago = old.stat().st_mtime - ls.PRUNE_AFTER_S - 10
    os.utime(old, (long_ago, long_ago))
    ls.publish_live_recall(tmp_path, "docs", live_part(estimate()), client_id="here")
    assert sorted(p.name for p in old.parent.iterdir()) == ["here.json"]


def test_the_publisher_throttles_and_never_raises(tmp_path, caplog):
    clock = [100.0]
    pub = ls.RecallPublisher(tmp_path, client_id="w", interval=30, clock=lambda: clock[0])
    assert pub.maybe_publish("docs", router_status(estimate())) is not None
    clock[0] += 10
    assert pub.maybe_publish("docs", router_status(estimate())) is None        # too soon
    assert pub.maybe_publish("docs", router_status(estimate()), force=True) is not None
    clock[0] += 31
    assert pub.maybe_publish("docs", router_status(estimate())) is not None
    blocked = tmp_path / "file"
    blocked.write_text("")                                   # a model dir that is a file
    bad = ls.RecallPublisher(blocked, client_id="w", interval=0, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="milvus_ltr_router.live_stats"):
        assert bad.maybe_publish("docs", router_status(estimate())) is None
        assert bad.maybe_publish("docs", router_status(estimate())) is None
    assert bad.failures == 2
    assert len([r for r in caplog.records if "not published" in r.getMessage()]) == 1


# ---------------------------------------------------------------- read side
def test_two_clients_combine_by_samples(tmp_path):
    ls.publish_live_recall(tmp_path, "docs", router_status(estimate(0.90, 0.88, 0.92, n=300)),
                           client_id="a", now=100.0)
    ls.publish_live_recall(tmp_path, "docs", router_status(estimate(0.95, 0.94, 0.96, n=100),
                                                           estimate(0.8, 0.7, 0.9, n=50,
                                                                    target=None)),
                           client_id="b", now=110.0)
    got = ls.read_live_recall(tmp_path, "docs", version="v1", layout_id="L1", now=120.0)
    assert [c["client_id"] for c in got["clients"]] == ["b", "a"]          # newest first
    fixed, at09 = got["estimates"]                       # fixed nprobe first
    assert fixed["recall_target"] is None and fixed["clients"] == 1
    assert at09["n"] == 400 and at09["clients"] == 2
    assert at09["recall"] == pytest.approx(0.75 * 0.90 + 0.25 * 0.95)
    half = ((0.75 * .02) ** 2 + (0.25 * .01) ** 2) ** .5
    assert at09["lower"] == pytest.approx(at09["recall"] - half)
    assert at09["upper"] == pytest.approx(at09["recall"] + half)
    assert at09["lower"] > 0.88                   # narrower than the single clients' spread


def test_below_target_needs_samples_and_the_whole_interval_below():
    assert ls.combine([estimate(0.80, 0.78, 0.82, n=100)])["below_target"]
    assert not ls.combine([estimate(0.80, 0.60, 0.95, n=100)])["below_target"]
    assert not ls.combine([estimate(0.80, 0.78, 0.82, n=20)])["below_target"]
    assert not ls.combine([estimate(0.80, 0.78, 0.82, n=100, target=None)])["below_target"]


def test_stale_other_router_and_unreadable_records_are_not_combined(tmp_path):
    ls.publish_live_recall(tmp_path, "docs", router_status(estimate(0.5, 0.4, 0.6)),
                           client_id="stale", now=0.0)
    ls.publish_live_recall(tmp_path, "docs", router_status(estimate(0.6, 0.5, 0.7), version="v0"),
                           client_id="old-router", now=2000.0)
    ls.publish_live_recall(tmp_path, "docs", router_status(estimate(0.6, 0.5, 0.7),
                                                           layout_id="L0"),
                           client_id="old-layout", now=2000.0)
    ls.publish_live_recall(tmp_path, "docs", router_status(estimate()), client_id="ok", now=2000.0)
    directory = tmp_path / "docs" / "live_recall"
    (directory / "broken.json").write_text("{not json")
    (directory / ".tmp-0123.json").write_text("{half")            # a writer's temp file
    got = ls.read_live_recall(tmp_path, "docs", version="v1", layout_id="L1", now=2010.0)
    by_id = {c["client_id"]: c for c in got["clients"]}
    assert by_id["stale"]["stale"] and by_id["stale"]["current"]
    assert not by_id["old-router"]["current"] and not by_id["old-layout"]["current"]
    assert [u["file"] for u in got["unreadable"]] == ["broken.json"]
    (e,) = got["estimates"]
    assert e["clients"] == 1 and e["recall"] == 0.93
    anyway = ls.read_live_recall(tmp_path, "docs", check_router=False, now=2010.0)
    assert anyway["estimates"][0]["clients"] == 3


# ---------------------------------------------------------------- status on milvus-lite
def status_json(capsys, lite, models):
    code = cli.main(["status", "--uri", lite, "--collection", "docs", "--model-dir", str(models),
                     "--json"])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def status_text(capsys, lite, models):
    code = cli.main(["status", "--uri", lite, "--collection", "docs", "--model-dir", str(models)])
    assert code == 0
    captured = capsys.readouterr()
    line = next(li for li in captured.out.splitlines() if li.startswith("live recall"))
    return line.split("  ", 1)[1].strip(), captured.err


def test_status_shows_the_live_recall_a_client_published(lite, tmp_path, capsys):
    models = tmp_path / "models"
    before = status_json(capsys, lite, models)
    assert before["live_recall"] is None
    text, _ = status_text(capsys, lite, models)
    assert text.startswith("none published")
    # a client serving the layout's fallback (no router published: version None)
    served = router_status(estimate(0.93, 0.91, 0.95, n=500), version=None,
                           layout_id=before["layout_id"], mode=before["router"]["kind"])
    ls.publish_live_recall(models, "docs", served, client_id="app-1")
    data = status_json(capsys, lite, models)
    (e,) = data["live_recall"]["estimates"]
    assert (e["recall"], e["n"], e["recall_target"], e["k"]) == (0.93, 500, 0.9, 10)
    assert data["live_recall"]["clients"][0]["client_id"] == "app-1"
    text, err = status_text(capsys, lite, models)
    assert text.startswith("recall@10 0.930 (0.910-0.950, 500 sampled searches) at "
                           "recall_target 0.9 (from 1 client, newest ")
    assert "warning: live recall" not in err
    # below its target by more than the interval: a warning on stderr
    low = router_status(estimate(0.80, 0.78, 0.82, n=500), version=None,
                        layout_id=before["layout_id"])
    ls.publish_live_recall(models, "docs", low, client_id="app-1")
    text, err = status_text(capsys, lite, models)
    assert "BELOW TARGET" in text
    assert "warning: live recall@10 0.800 (0.780-0.820, 500 sampled searches) at " \
           "recall_target 0.9 of 'docs': below the target" in err
    # a record made for another router (a router published since) is not the current estimate
    other = router_status(estimate(), version="20260101T000000-x", layout_id=before["layout_id"])
    ls.publish_live_recall(models, "docs", other, client_id="app-1")
    data = status_json(capsys, lite, models)
    assert data["live_recall"]["estimates"] == []
    assert data["live_recall"]["clients"][0]["current"] is False
    text, _ = status_text(capsys, lite, models)
    assert text == "no current estimate (1 for another router or layout of 1 client record(s))"
