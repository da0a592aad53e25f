"""Every CLI error path: its exit code (README: 0 ok, 1 operational, 2 bad input, 3 locked),
its message, and that nothing was published. Runs ``cli.main`` in-process on milvus-lite."""
import logging

import numpy as np
import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from milvus_ltr_router import cli
from milvus_ltr_router.errors import (EXIT_FAIL, EXIT_LOCKED, EXIT_USAGE, InputError,
                                      LockHeldError, OperationalError, describe, exit_code)
from milvus_ltr_router.layout import LayoutError
from milvus_ltr_router.milvus_io import CollectionError, release_lite
from milvus_ltr_router.registry import LockedError, ModelRegistry, RegistryError
from milvus_ltr_router.router import RouterError

DEAD = "http://127.0.0.1:9"      # nothing listens: a command that contacts Milvus fails with 1


def run(caplog, *argv):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli.main([str(a) for a in argv])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return code, "\n".join(errors), caplog.text


def retrain(uri, model_dir, *extra):
    return ["retrain", "--uri", uri, "--collection", "docs", "--model-dir", model_dir, *extra]


def nothing_published(model_dir):
    return not (model_dir / "docs" / "CURRENT.json").exists() and \
        not list(model_dir.glob("docs/*.onnx"))


# ---------------------------------------------------------------- exit_code and describe
@pytest.mark.parametrize("exc,code", [
    (InputError("x"), EXIT_USAGE), (CollectionError("unknown collection"), EXIT_USAGE),
    (OperationalError("x"), EXIT_FAIL), (LayoutError("x"), EXIT_FAIL),
    (RouterError("corrupt"), EXIT_FAIL), (RegistryError("x"), EXIT_FAIL),
    (LockedError("held"), EXIT_LOCKED), (LockHeldError("held"), EXIT_LOCKED),
    (MilvusException(message="down"), EXIT_FAIL), (ConnectionError("refused"), EXIT_FAIL),
    (PermissionError(13, "Permission denied", "/srv/models"), EXIT_FAIL),
    (ValueError("plain bad value"), EXIT_USAGE),
])
def test_exit_code_of_each_error(exc, code):
    assert exit_code(exc) == code


def test_router_errors_are_operational_and_old_bases_still_hold():
    assert not issubclass(RouterError, ValueError) and issubclass(RouterError, RuntimeError)
    assert issubclass(CollectionError, ValueError) and issubclass(LayoutError, RuntimeError)
    assert issubclass(LockedError, RegistryError)


def test_only_connection_failures_mention_reaching_milvus():
    perm = describe(PermissionError(13, "Permission denied", "/srv/models/docs"), "http://m:19530")
    assert perm == "file system error: [Errno 13] Permission denied: '/srv/models/docs'"
    assert describe(ConnectionError("refused"), "http://m:19530") == \
        "cannot reach Milvus at http://m:19530: refused"
    assert describe(MilvusException(message="no such field"), "http://m:19530") == \
        "Milvus at http://m:19530: no such field"


def test_permission_error_on_the_model_dir_exits_1_without_blaming_milvus(lite, tmp_path,
                                                                          caplog, monkeypatch):
    def denied(self, collection):
        raise PermissionError(13, "Permission denied", str(tmp_path / "m" / collection))
    monkeypatch.setattr(ModelRegistry, "lock", denied)
    code, err, _ = run(caplog, *retrain(lite, tmp_path / "m", "--queries", tmp_path / "none.npy"))
    assert code == EXIT_USAGE and "query file not found" in err      # input checks come first
    code, err, _ = run(caplog, *retrain(lite, tmp_path / "m"))
    assert code == EXIT_FAIL and "Permission denied" in err and "Milvus" not in err


# ---------------------------------------------------------------- retrain: bad options, no work
@pytest.mark.parametrize("option,message", [
    (["--nprobe", "0"], "--nprobe must be an integer >= 1, got 0"),
    (["--label-k", "0"], "--label-k must be an integer >= 1, got 0"),
    (["--top1-weight", "2"], "--top1-weight must be in [0, 1], got 2.0"),
    (["--sample", "0"], "--sample must be an integer >= 1, got 0"),
    (["--k", "0"], "--k must be an integer >= 1, got 0"),
    (["--min-queries", "0"], "--min-queries must be an integer >= 10, got 0"),
    (["--keep", "0"], "--keep must be an integer >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--min-gain", "nan"], "--min-gain must be a finite number"),
])
def test_bad_retrain_options_exit_2_before_contacting_milvus(tmp_path, caplog, option, message):
    code, err, _ = run(caplog, *retrain(DEAD, tmp_path / "m", *option))
    assert code == EXIT_USAGE and message in err
    assert "Milvus" not in err and not (tmp_path / "m").exists()


def test_report_path_that_is_a_file_exits_2_and_publishes_nothing(tmp_path, caplog):
    report = tmp_path / "report.txt"
    report.write_text("not a directory")
    code, err, _ = run(caplog, *retrain(DEAD, tmp_path / "m", "--report", report))
    assert code == EXIT_USAGE and f"--report {report} is a file, not a directory" in err
    assert nothing_published(tmp_path / "m")


def test_model_dir_that_is_a_file_exits_2(tmp_path, caplog):
    models = tmp_path / "models"
    models.write_text("")
    code, err, _ = run(caplog, *retrain(DEAD, models))
    assert code == EXIT_USAGE and f"--model-dir {models} is a file" in err


def test_nprobe_above_the_partitions_exits_2_before_labelling(lite, tmp_path, caplog):
    np.save(tmp_path / "q.npy", np.random.default_rng(0).standard_normal((300, 384)))
    code, err, text = run(caplog, *retrain(lite, tmp_path / "m", "--queries", tmp_path / "q.npy",
                                           "--nprobe", "999"))
    assert code == EXIT_USAGE and "--nprobe 999 out of range [1, 8]" in err
    assert "queries" not in text.replace(err, "")       # no query read, nothing labelled
    assert nothing_published(tmp_path / "m")


# ---------------------------------------------------------------- retrain: bad query files
@pytest.mark.parametrize("name,array,message", [
    ("nan", np.full((300, 384), np.nan, np.float32), "has no usable query vectors: all 300 rows"),
    ("zero", np.zeros((300, 384), np.float32), "has no usable query vectors: all 300 rows"),
    ("constant", np.full((300, 384), 0.5, np.float32), "has no usable query vectors"),
    ("three_d", np.ones((2, 150, 384), np.float32),
     "expected a 2-D array [n, dim], got shape (2, 150, 384)"),
    ("dim", np.ones((300, 7), np.float32), "dimension 7 does not match the collection's 384"),
])
def test_unusable_query_files_exit_2_and_publish_nothing(lite, tmp_path, caplog, name, array,
                                                         message):
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    code, err, _ = run(caplog, *retrain(lite, tmp_path / "m", "--queries", path))
    assert code == EXIT_USAGE and message in err, err
    assert nothing_published(tmp_path / "m")


def test_mostly_degenerate_query_file_says_how_many_were_dropped(lite, tmp_path, caplog,
                                                                 fixture_data):
    """300 all-zero queries once published 'top-1 1.0000 vs centroid 0.0000': now refused."""
    mixed = np.vstack([np.zeros((290, 384), np.float32), fixture_data.queries[:20]])
    np.save(tmp_path / "q.npy", mixed)
    code, err, text = run(caplog, *retrain(lite, tmp_path / "m", "--queries", tmp_path / "q.npy",
                                           "--min-queries", "100"))
    assert code == EXIT_USAGE and "only 20 queries in query file" in err
    assert "dropped 290 all-zero or constant rows" in text
    assert nothing_published(tmp_path / "m")


# ---------------------------------------------------------------- retrain: operational failures
def test_unknown_collection_exits_2(lite, tmp_path, caplog):
    code, err, _ = run(caplog, "retrain", "--uri", lite, "--collection", "nope",
                       "--model-dir", tmp_path / "m")
    assert code == EXIT_USAGE and err == f"unknown collection 'nope' at {lite}; collections there: docs, src"
    code, err, _ = run(caplog, "status", "--uri", lite, "--collection", "nope")
    assert code == EXIT_USAGE and err.startswith(f"unknown collection 'nope' at {lite}")


def test_collection_without_layout_exits_1(lite, tmp_path, caplog):
    code, err, _ = run(caplog, "retrain", "--uri", lite, "--collection", "src",
                       "--model-dir", tmp_path / "m")
    assert code == EXIT_FAIL and err.startswith(f"Milvus at {lite}: collection 'src' has no layout")


def test_empty_query_log_exits_1(lite, tmp_path, caplog):
    code, err, _ = run(caplog, *retrain(lite, tmp_path / "m"))
    assert code == EXIT_FAIL and "only 0 queries in the query log of 'docs'" in err
    assert err.endswith(f"(Milvus at {lite})")
    assert nothing_published(tmp_path / "m")


def test_unreachable_milvus_exits_1_naming_the_uri(tmp_path, caplog):
    code, err, _ = run(caplog, *retrain(DEAD, tmp_path / "m"))
    assert code == EXIT_FAIL and err.startswith(f"Milvus at {DEAD}:")


def test_held_lock_exits_3(lite, tmp_path, caplog):
    with ModelRegistry(tmp_path / "m").lock("docs"):
        code, err, _ = run(caplog, *retrain(lite, tmp_path / "m"))
    assert code == EXIT_LOCKED and "another retrain" in err


# ---------------------------------------------------------------- other commands
def test_build_layout_source_equal_to_target_exits_2_before_any_work(tmp_path, caplog):
    code, err, _ = run(caplog, "build-layout", "--uri", DEAD, "--source", "a", "--target", "a")
    assert code == EXIT_USAGE and "--target must differ from --source ('a')" in err


@pytest.mark.parametrize("clusters,message", [
    ("0", "--clusters must be >= 1, got 0"),
    ("2000", "--clusters 2000 is more than the 1500 rows of 'src'"),
])
def test_build_layout_bad_cluster_count_exits_2(lite, caplog, clusters, message):
    code, err, _ = run(caplog, "build-layout", "--uri", lite, "--source", "src", "--target",
                       "new", "--clusters", clusters)
    assert code == EXIT_USAGE and message in err
    client = MilvusClient(lite)
    try:
        assert not client.has_collection("new")
    finally:
        client.close()
        release_lite(lite)


def test_build_layout_bad_index_params_exit_2(caplog):
    code, err, _ = run(caplog, "build-layout", "--uri", DEAD, "--source", "a", "--target", "b",
                       "--index-params", "{nlist: 4}")
    assert code == EXIT_USAGE and "--index-params is not valid JSON" in err


def test_evaluate_bad_options_exit_2(lite, tmp_path, caplog):
    code, err, _ = run(caplog, "evaluate", "--uri", DEAD, "--collection", "docs", "--queries",
                       tmp_path / "q.npy", "--k", "0")
    assert code == EXIT_USAGE and "--k must be >= 1, got 0" in err
    np.save(tmp_path / "q.npy", np.full((5, 384), np.nan, np.float32))
    code, err, _ = run(caplog, "evaluate", "--uri", lite, "--collection", "docs", "--queries",
                       tmp_path / "q.npy")
    assert code == EXIT_USAGE and "has no usable query vectors" in err
    np.save(tmp_path / "q.npy", np.random.default_rng(0).standard_normal((5, 384)))
    code, err, _ = run(caplog, "evaluate", "--uri", lite, "--collection", "docs", "--queries",
                       tmp_path / "q.npy", "--nprobe", "999")
    assert code == EXIT_USAGE and "nprobe values [999] out of range [1, 8]" in err


def test_corrupt_published_router_exits_1_not_2(lite, tmp_path, caplog, fixture_data):
    registry = ModelRegistry(tmp_path / "m")
    path = registry.version_path("docs", "v1")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not onnx")
    registry.publish("docs", path, "v1", {})
    np.save(tmp_path / "q.npy", fixture_data.queries[:20])
    code, err, _ = run(caplog, "evaluate", "--uri", lite, "--collection", "docs", "--queries",
                       tmp_path / "q.npy", "--model-dir", tmp_path / "m")
    assert code == EXIT_FAIL and "not a loadable ONNX model" in err
    assert str(tmp_path / "m") in err                   # the model dir it looked in


def test_rollback_without_history_exits_1(tmp_path, caplog):
    code, err, _ = run(caplog, "rollback", "--collection", "docs", "--model-dir", tmp_path / "m")
    assert code == EXIT_FAIL and "no router of 'docs' was published" in err


def test_rollback_with_one_version_exits_1_naming_the_model_dir(tmp_path, caplog):
    registry = ModelRegistry(tmp_path / "m")
    path = registry.version_path("docs", "v1")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not onnx")
    registry.publish("docs", path, "v1", {})
    code, err, _ = run(caplog, "rollback", "--collection", "docs", "--model-dir", tmp_path / "m")
    assert code == EXIT_FAIL
    assert err == f"no earlier router of 'docs' to roll back to (model dir {tmp_path / 'm'})"


def test_drop_layout_of_a_plain_collection_exits_2(lite, caplog):
    code, err, _ = run(caplog, "drop-layout", "--uri", lite, "--collection", "src")
    assert code == EXIT_USAGE and f"'src' at {lite} has no layout; refusing to drop it" in err
    client = MilvusClient(lite)
    try:
        assert client.has_collection("src")
    finally:
        client.close()
        release_lite(lite)


# ---------------------------------------------------------------- --uri: a mistyped milvus-lite path
@pytest.mark.parametrize("argv", [
    ["status", "--collection", "docs"],
    ["evaluate", "--collection", "docs", "--queries", "q.npy"],
    ["retrain", "--collection", "docs"],
    ["drop-layout", "--collection", "docs"],
    ["repair-layout", "--collection", "docs"],
    ["adopt-layout", "--collection", "docs"],
    ["build-layout", "--source", "src", "--target", "new"],
    ["build-layout", "--source", "src", "--target", "new", "--clusters", "4"],
])
def test_a_missing_lite_file_exits_2_naming_it_and_is_never_created(tmp_path, caplog, argv):
    missing = tmp_path / "typo" / "docs.db"
    code, err, _ = run(caplog, *argv, "--uri", missing)
    assert code == EXIT_USAGE and f"milvus-lite file {missing} does not exist" in err, err
    assert "refusing to create an empty database there" in err
    assert not missing.exists() and not missing.parent.exists()


def test_retrain_router_refuses_a_missing_lite_file_too(tmp_path, caplog):
    missing = tmp_path / "docs.db"
    caplog.clear()
    assert cli.retrain_main(["--uri", str(missing), "--collection", "docs"]) == EXIT_USAGE
    assert f"milvus-lite file {missing} does not exist" in caplog.text
    assert not missing.exists()


def test_the_default_uri_when_missing_is_named_as_the_default(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err, _ = run(caplog, "status", "--collection", "docs")
    assert code == EXIT_USAGE
    assert f"milvus-lite file ./milvus_ltr.db ({tmp_path / 'milvus_ltr.db'}) does not exist" in err
    assert "--uri defaults to ./milvus_ltr.db" in err
    assert not (tmp_path / "milvus_ltr.db").exists()


def test_a_uri_neither_server_nor_lite_file_exits_2(caplog):
    code, err, _ = run(caplog, "status", "--uri", "localhost:19530", "--collection", "docs")
    assert code == EXIT_USAGE
    assert "--uri 'localhost:19530' is neither a server URI (http://" in err


def test_demo_bad_options_exit_2(caplog):
    code, err, _ = run(caplog, "demo", "--nprobe", "0")
    assert code == EXIT_USAGE and "--nprobe must be >= 1, got 0" in err
    code, err, _ = run(caplog, "demo", "--clusters", "0")
    assert code == EXIT_USAGE and "--clusters must be >= 1, got 0" in err


@pytest.mark.parametrize("flag,value,message", [
    ("--log-sample", "0", "--log-sample must be >= 1, got 0"),
    ("--probe-nprobe", "0", "--probe-nprobe must be >= 1, got 0"),
    ("--cost-model", "/nonexistent/costs.json", "cannot read the cost model '/nonexistent/costs.json'"),
])
def test_build_layout_bad_storage_choice_options_exit_2(caplog, flag, value, message):
    code, err, _ = run(caplog, "build-layout", "--uri", DEAD, "--source", "a", "--target", "b",
                       flag, value)
    assert code == EXIT_USAGE and message in err


def test_build_layout_groups_clusters_the_logged_queries_probe_together(lite, caplog, capsys,
                                                                        fixture_data):
    """With a query log of the target, ``grouped`` storage groups clusters by the logged
    queries' co-probes (and says so); with --no-query-log by centroid geometry."""
    from milvus_ltr_router.grouping import centroid_probes, coprobe_groups
    from milvus_ltr_router.layout import drop_layout, read_layout
    from milvus_ltr_router.querylog import ensure_log_collection, write_queries
    queries = np.asarray(fixture_data.queries[:300], dtype=np.float32)
    client = MilvusClient(lite)
    try:
        ensure_log_collection(client, "grp", queries.shape[1])
        write_queries(client, "grp", queries)
    finally:
        client.close()
        release_lite(lite)
    argv = ["build-layout", "--uri", lite, "--source", "src", "--target", "grp", "--storage",
            "grouped", "--groups", "3", "--clusters", "12", "--probe-nprobe", "4"]
    capsys.readouterr()
    code, err, _ = run(caplog, *argv)
    out = capsys.readouterr().out
    assert code == 0, err
    assert "storage grouped (3 groups of clusters probed together), from the probes of 300 " \
           "logged queries" in out
    client = MilvusClient(lite)
    try:
        lay = read_layout(client, "grp")
        index = {p: i for i, p in enumerate(lay.storage.partitions)}
        got = np.array([index[p] for p in lay.storage.cluster_partitions])
        probed = centroid_probes(queries, lay.centroids, lay.metric, 4)
        # sizes at build time are estimated from the k-means sample (here: every row)
        expect = coprobe_groups(probed, np.asarray(lay.sizes, dtype=float), 3)
        assert np.array_equal(got, expect)
        drop_layout(client, "grp")
    finally:
        client.close()
        release_lite(lite)
    code, err, _ = run(caplog, *argv, "--no-query-log")
    out = capsys.readouterr().out
    assert code == 0, err
    assert "logged queries" not in out
    client = MilvusClient(lite)
    try:
        assert read_layout(client, "grp").storage.n_groups == 3
        drop_layout(client, "grp")
    finally:
        client.close()
        release_lite(lite)


def test_logged_queries_of_another_dimension_fail_only_where_they_decide(lite):
    """Queries of another embedding are refused, naming --no-query-log, where they would decide
    the storage (grouped); where they decide nothing (partition storage) they are not read."""
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import drop_layout
    wrong = np.ones((50, 8), dtype=np.float32)
    client = MilvusClient(lite)
    try:
        with pytest.raises(LayoutError, match="no-query-log") as err:
            build_layout(client, "src", "dims", n_clusters=4, storage="grouped", groups=2,
                         queries=wrong)
        assert "[n, 384]" in str(err.value) and not client.has_collection("dims")
        report = build_layout(client, "src", "dims", n_clusters=4, storage="partition",
                              queries=wrong)
        assert report.storage_choice is None and report.layout.storage.mode == "partition"
        drop_layout(client, "dims")
    finally:
        client.close()
        release_lite(lite)
