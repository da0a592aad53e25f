"""The publish gate as a pure function, and the argument checks that run before any work."""
import errno
import os

import numpy as np
import pytest

from milvus_ltr_router.errors import EXIT_FAIL, EXIT_USAGE, InputError, exit_code
from milvus_ltr_router.evaluate import RoutingQuality
from milvus_ltr_router.registry import ModelRegistry
from milvus_ltr_router.retrain import (Decision, QueryInputError, RetrainConfig, RetrainError,
                                       calibration_misses, check_output_dir, decide,
                                       require_queries, validate_config)


def q(top1, recall=0.5, nprobe=8):
    return RoutingQuality(nprobe=nprobe, top1_accuracy=top1, recall=recall, k=10, mean_probed=nprobe)


def test_better_than_centroid_without_live_router_is_published():
    d = decide(q(0.60), None, q(0.50), 0.0)
    assert d == Decision("published", "centroid", pytest.approx(0.10), d.reason, True)
    assert "new top1@nprobe=8 0.6000 vs centroid 0.5000 (gain +0.1000" in d.reason


def test_worse_router_is_kept():
    d = decide(q(0.45), None, q(0.50), 0.0)
    assert d.action == "kept" and d.gain == pytest.approx(-0.05)
    assert d.reason.startswith("kept current router: new top1@nprobe=8 0.4500 vs centroid 0.5000")


def test_gain_below_min_gain_is_kept_and_exactly_min_gain_is_published():
    assert decide(q(0.52), None, q(0.50), 0.05).action == "kept"
    # 0.7 - 0.6 is 0.0999... in floating point: still "at least 0.1 better"
    assert decide(q(0.7), None, q(0.6), 0.1).action == "published"


def test_live_router_is_the_baseline_when_it_beats_centroids():
    d = decide(q(0.62), q(0.65), q(0.50), 0.0)
    assert (d.action, d.baseline) == ("kept", "current") and d.gain == pytest.approx(-0.03)
    d = decide(q(0.70), q(0.65), q(0.50), 0.0)
    assert (d.action, d.baseline) == ("published", "current") and d.gain == pytest.approx(0.05)
    # a live router worse than centroid routing is not the bar: centroids are
    d = decide(q(0.55), q(0.40), q(0.50), 0.0)
    assert (d.action, d.baseline) == ("published", "centroid")


def test_negative_min_gain_accepts_a_slightly_worse_router():
    d = decide(q(0.64), q(0.65), q(0.50), -0.02)
    assert d.action == "published" and d.gain == pytest.approx(-0.01)
    assert decide(q(0.62), q(0.65), q(0.50), -0.02).action == "kept"


def test_equal_router_is_published_at_min_gain_zero():
    assert decide(q(0.65), q(0.65), q(0.50), 0.0).action == "published"


def test_recall_metric_decides_on_recall():
    d = decide(q(0.40, recall=0.80), None, q(0.50, recall=0.70), 0.0, metric="recall")
    assert d.action == "published" and "recall@nprobe=8 0.8000 vs centroid 0.7000" in d.reason
    with pytest.raises(ValueError, match="metric must be top1 or recall"):
        decide(q(0.4), None, q(0.5), 0.0, metric="mrr")


def test_missed_calibration_publishes_without_it_unless_the_live_router_has_one():
    d = decide(q(0.60), None, q(0.50), 0.0, calibration_ok=False)
    assert d.action == "published" and not d.with_calibration
    assert "published without its recall_target calibration" in d.reason
    d = decide(q(0.60), q(0.55), q(0.50), 0.0, calibration_ok=False, live_calibrated=False)
    assert d.action == "published" and not d.with_calibration
    d = decide(q(0.60), q(0.55), q(0.50), 0.0, calibration_ok=False, live_calibrated=True)
    assert d.action == "kept" and "would take recall_target away" in d.reason
    # a router that is not better is kept whatever its calibration
    assert decide(q(0.40), None, q(0.50), 0.0, calibration_ok=False).action == "kept"


def test_dry_run_publishes_nothing_and_says_what_it_would_do():
    d = decide(q(0.60), None, q(0.50), 0.0, dry_run=True)
    assert d.action == "dry-run" and d.reason.startswith("dry run (would publish)")
    d = decide(q(0.40), None, q(0.50), 0.0, dry_run=True)
    assert d.action == "dry-run" and "would keep the current router" in d.reason


def test_calibration_misses_allow_two_points_below_target():
    rows = [{"recall_target": 0.5, "recall": 0.49}, {"recall_target": 0.8, "recall": 0.775},
            {"recall_target": 0.9, "recall": 0.95}, {"recall_target": 0.95, "recall": 0.90}]
    assert calibration_misses(rows) == [(0.8, 0.775), (0.95, 0.90)]
    assert calibration_misses(rows[:1] + rows[2:3]) == []


@pytest.mark.parametrize("change,message", [
    ({"sample": 0}, "--sample must be an integer >= 1, got 0"),
    ({"nprobe": 0}, "--nprobe must be an integer >= 1, got 0"),
    ({"k": 0}, "--k must be an integer >= 1, got 0"),
    ({"label_k": 0}, "--label-k must be an integer >= 1, got 0"),
    ({"min_queries": 0}, "--min-queries must be an integer >= 10, got 0"),
    ({"max_epochs": 0}, "--epochs must be an integer >= 1, got 0"),
    ({"keep": 0}, "--keep must be an integer >= 1, got 0"),
    ({"top1_weight": 2.0}, r"--top1-weight must be in \[0, 1\], got 2.0"),
    ({"top1_weight": float("nan")}, r"--top1-weight must be in \[0, 1\], got nan"),
    ({"min_gain": float("nan")}, "--min-gain must be a finite number"),
    ({"metric": "mrr"}, "--metric must be top1 or recall"),
    ({"since_seconds": -60.0}, "--since must be a positive duration"),
    ({"queries_file": "/nonexistent/q.npy"}, "query file not found: /nonexistent/q.npy"),
])
def test_bad_options_are_input_errors(tmp_path, change, message):
    cfg = RetrainConfig(collection="c", model_dir=str(tmp_path / "m"), **change)
    with pytest.raises(InputError, match=message) as info:
        validate_config(cfg)
    assert exit_code(info.value) == EXIT_USAGE and isinstance(info.value, RetrainError)


def test_output_dirs_are_checked_before_any_work(tmp_path):
    validate_config(RetrainConfig(collection="c", model_dir=str(tmp_path / "a" / "b")))
    check_output_dir(tmp_path / "r" / "s", "--report")                 # creatable: fine
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()   # nothing created
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(InputError, match=f"--report {afile} is a file, not a directory"):
        check_output_dir(afile, "--report")
    with pytest.raises(InputError, match=f"--model-dir {afile} is a file, not a directory"):
        validate_config(RetrainConfig(collection="c", model_dir=str(afile)))
    with pytest.raises(InputError, match=f"--model-dir {afile}/m cannot be created: {afile} is a file"):
        check_output_dir(afile / "m", "--model-dir")


def test_unwritable_model_dir_is_operational_not_a_connection_problem(tmp_path, monkeypatch):
    import os
    monkeypatch.setattr(os, "access", lambda path, mode: False)     # as for a non-root user
    with pytest.raises(RetrainError, match=f"--model-dir {tmp_path}/m: no permission to write in "
                                           f"{tmp_path}") as info:
        check_output_dir(tmp_path / "m", "--model-dir")
    assert exit_code(info.value) == EXIT_FAIL and "Milvus" not in str(info.value)


def test_too_few_queries_is_bad_input_for_a_file_and_operational_for_the_log():
    cfg = RetrainConfig(collection="c", min_queries=50)
    require_queries(50, cfg, "c")
    with pytest.raises(RetrainError, match=r"only 49 queries in the query log of 'c'") as info:
        require_queries(49, cfg, "c")
    assert exit_code(info.value) == EXIT_FAIL
    cfg = RetrainConfig(collection="c", min_queries=50, queries_file="q.npy")
    with pytest.raises(QueryInputError, match=r"only 3 queries in query file q.npy") as info:
        require_queries(3, cfg, "c")
    assert exit_code(info.value) == EXIT_USAGE


def test_neighbour_subset_keeps_tie_flags():
    from milvus_ltr_router.labels import Neighbours
    nb = Neighbours(np.arange(6).reshape(3, 2), np.zeros((3, 2), np.float32),
                    np.arange(6).reshape(3, 2), np.array([True, False, True]))
    sub = nb.subset(np.array([2, 1]))
    assert sub.top1_tied.tolist() == [True, False] and sub.ids.tolist() == [[4, 5], [2, 3]]


# ---------------------------------------------------------------- the gate inside a real retrain
@pytest.fixture(scope="module")
def lite_docs(tmp_path_factory, fixture_data):
    """milvus-lite with 1,500 MiniLM documents laid out in 8 partitions, and 400 real queries."""
    from pymilvus import MilvusClient
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.milvus_io import release_lite
    from milvus_ltr_router.writer import create_vector_collection
    tmp = tmp_path_factory.mktemp("retrain_gate")
    uri = str(tmp / "test.db")
    client = MilvusClient(uri)
    create_vector_collection(client, "src", fixture_data.docs[:1500])
    build_layout(client, "src", "docs", n_clusters=8, seed=0)
    np.save(tmp / "q.npy", fixture_data.queries[:400])
    yield client, str(tmp / "q.npy")
    client.close()
    release_lite(uri)


def test_calibration_that_misses_on_held_out_queries_is_not_published(lite_docs, tmp_path,
                                                                      monkeypatch):
    pytest.importorskip("torch")
    from milvus_ltr_router import retrain as job
    from milvus_ltr_router.router import Router
    client, qfile = lite_docs
    registry = ModelRegistry(tmp_path / "m")
    cfg = job.RetrainConfig(collection="docs", model_dir=str(tmp_path / "m"), queries_file=qfile,
                            nprobe=2, min_gain=-1.0, max_epochs=3, min_queries=100)
    # no live router: a router that is good enough is published, its calibration is not
    monkeypatch.setattr(job, "calibration_misses", lambda rows, tolerance=0.02: [(0.9, 0.8)])
    first = job.retrain(client, cfg)
    assert first.decision == "published" and first.calibration_misses == [[0.9, 0.8]]
    assert "published without its recall_target calibration" in first.reason
    assert first.training["calibration_published"] is False
    assert Router.load(registry.current("docs").path).recall_thresholds == []
    # calibration met: published with it (min-gain -1: even a worse router passes)
    monkeypatch.setattr(job, "calibration_misses", lambda rows, tolerance=0.02: [])
    second = job.retrain(client, cfg)
    assert second.decision == "published" and second.training["calibration_published"] is True
    assert Router.load(registry.current("docs").path).recall_thresholds
    # the live router is calibrated now: a new one that misses would take that away - kept
    monkeypatch.setattr(job, "calibration_misses", lambda rows, tolerance=0.02: [(0.5, 0.4)])
    third = job.retrain(client, cfg)
    assert third.decision == "kept" and "would take recall_target away" in third.reason
    assert registry.current("docs").version == second.version


def test_a_failure_after_the_pointer_swap_still_counts_as_published(tmp_path, monkeypatch, caplog):
    from milvus_ltr_router.registry import RegistryError
    from milvus_ltr_router.retrain import publish
    registry = ModelRegistry(tmp_path / "m")
    path = registry.version_path("docs", "v1")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"model")

    def prune_fails(collection):
        raise PermissionError(13, "Permission denied", str(path.parent))
    monkeypatch.setattr(registry, "prune", prune_fails)
    publish(registry, "docs", path, "v1", {})          # pointer written, then pruning failed
    assert registry.current("docs").version == "v1"
    assert "router v1 of 'docs' is published, but the registry failed afterwards" in caplog.text
    # a failure before the swap is raised: nothing was published
    with pytest.raises(RegistryError, match="cannot publish missing model"):
        publish(registry, "docs", tmp_path / "m" / "docs" / "v2.onnx", "v2", {})


def test_a_report_that_fails_after_a_publish_does_not_fail_the_command(tmp_path, monkeypatch,
                                                                         caplog, capsys):
    """The CLI writes the report after retrain() returns; an OSError then is logged, exit 0."""
    import contextlib
    from milvus_ltr_router import cli, report, retrain as job
    from milvus_ltr_router.cli import retrain_cmd
    published = job.RetrainResult(decision="published", reason="published router v1",
                                  collection="docs", layout_id="L", n_queries=300, nprobe=2,
                                  version="v1")
    monkeypatch.setattr(job, "retrain", lambda client, cfg, seconds=None: published)
    monkeypatch.setattr(retrain_cmd, "connected", lambda args: contextlib.nullcontext(None))

    def disk_full(result, report_dir):
        raise OSError(28, "No space left on device", str(report_dir))
    monkeypatch.setattr(report, "write_report", disk_full)
    code = cli.main(["retrain", "--uri", "http://unused:1", "--collection", "docs",
                     "--model-dir", str(tmp_path / "m"), "--report", str(tmp_path / "r"), "--json"])
    assert code == 0
    assert "report not written to" in caplog.text and "No space left on device" in caplog.text
    out = capsys.readouterr().out
    assert '"version": "v1"' in out and '"report_paths": []' in out


def full_disk_for(monkeypatch, suffix: str):
    """Files written atomically with ``suffix`` go to /dev/full: the kernel's own ENOSPC."""
    from milvus_ltr_router import atomic
    real = atomic.os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if not name.endswith(suffix):
            return real(fd, mode, *args, **kwargs)
        os.close(fd)
        return open("/dev/full", mode)
    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


def test_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    from milvus_ltr_router.atomic import write_atomic
    target = tmp_path / "router.onnx"
    target.write_bytes(b"old")
    full_disk_for(monkeypatch, ".onnx")
    with pytest.raises(OSError) as err:
        write_atomic(target, b"new" * 1000)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert str(target) in str(err.value) and "No space left on device" in str(err.value)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router.onnx"]    # no temp left


def test_a_retrain_on_a_full_disk_keeps_the_router_and_names_the_path(lite_docs, tmp_path,
                                                                      monkeypatch, caplog):
    """Publishing onto a full model dir: exit 1, the error names the router file it could
    not write, and the router served before stays published."""
    pytest.importorskip("torch")
    from milvus_ltr_router import retrain as job
    client, qfile = lite_docs
    cfg = job.RetrainConfig(collection="docs", model_dir=str(tmp_path / "m"), queries_file=qfile,
                            nprobe=2, min_gain=-1.0, max_epochs=3, min_queries=100)
    first = job.retrain(client, cfg)
    assert first.decision == "published"
    full_disk_for(monkeypatch, ".onnx")
    with pytest.raises(OSError) as err:
        job.retrain(client, cfg)
    assert err.value.errno == errno.ENOSPC
    assert str(tmp_path / "m" / "docs") in str(err.value) and ".onnx" in str(err.value)
    assert exit_code(err.value) == EXIT_FAIL
    assert ModelRegistry(tmp_path / "m").current("docs").version == first.version
