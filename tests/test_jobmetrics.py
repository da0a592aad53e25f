"""retrain-router --metrics-file: the textfile-collector format (parsed with prometheus_client's
parser), every outcome written with its exit code (failures included, through the CLI on
milvus-lite), timestamps carried over a failed run, and atomic replacement (a failure while
writing leaves the old file and no temp file)."""
import contextlib
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from milvus_ltr_router import cli
from milvus_ltr_router import jobmetrics as jm
from milvus_ltr_router.errors import EXIT_FAIL, EXIT_LOCKED, EXIT_OK, EXIT_USAGE
from milvus_ltr_router.registry import ModelRegistry
from milvus_ltr_router.retrain import RetrainResult

P = jm.PREFIX
ROWS = [{"nprobe": 2, "k": 10, "top1_accuracy": 0.5, "recall": 0.4, "mean_probed": 2.0}]


def result(decision="published", version="20261204T010101-abc", gain=0.0123):
    return RetrainResult(decision=decision, reason="r", collection="docs", layout_id="L",
                         n_queries=600, nprobe=2,
                         version=version if decision == "published" else None,
                         baseline="centroid", gain=gain, table={"centroid": ROWS, "learned": ROWS},
                         training={"router_kind": "learned-moments", "n_test": 120},
                         seconds={"queries": 0.5, "label": 1.25, "moments": 0.1, "train": 3.0,
                                  "evaluate": 0.75})


def parse(text):
    """``{name: {frozenset(labels.items()): value}}`` through prometheus_client's parser
    (types checked: every family a gauge)."""
    parser = pytest.importorskip("prometheus_client.parser")
    out = {}
    for family in parser.text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def one(families, name, **labels):
    return families[P + name][frozenset({"collection": "docs", **labels}.items())]


def outcome(families):
    got = {dict(k)["outcome"]: v for k, v in families[P + "outcome"].items()}
    assert set(got) == set(jm.OUTCOMES) and sum(got.values()) == 1, got
    return next(o for o, v in got.items() if v == 1)


# ---------------------------------------------------------------- the format, pure
def test_a_published_run_parses_with_every_metric():
    text = jm.format_textfile(jm.retrain_samples(jm.RunRecord("docs", 0, 1000.0, 1010.5,
                                                              result())))
    f = parse(text)
    assert set(f) == set(jm.METRICS)
    assert outcome(f) == "published" and one(f, "exit_code") == 0
    assert one(f, "last_run_timestamp_seconds") == 1010.5
    assert one(f, "last_success_timestamp_seconds") == 1010.5
    assert one(f, "last_publish_timestamp_seconds") == 1010.5
    assert one(f, "duration_seconds") == 10.5
    assert one(f, "gain", metric="top1", nprobe="2", baseline="centroid") == pytest.approx(0.0123)
    assert one(f, "queries") == 600 and one(f, "heldout_queries") == 120
    phases = {dict(k)["phase"]: v for k, v in f[P + "phase_duration_seconds"].items()}
    assert phases == {"queries": 0.5, "label": 1.25, "moments": 0.1, "train": 3.0,
                      "evaluate": 0.75}
    assert one(f, "router_info", version="20261204T010101-abc", kind="learned-moments") == 1


def test_names_follow_the_conventions():
    for name in jm.METRICS:
        assert name.startswith("milvus_ltr_router_retrain_") and name == name.lower()
        assert not name.endswith("_total")                    # gauges, not counters
        if "timestamp" in name:
            assert name.endswith("_timestamp_seconds")
        if "duration" in name:
            assert name.endswith("_seconds")


@pytest.mark.parametrize("decision", ["kept", "dry-run"])
def test_kept_and_dry_run_name_the_weighed_kind_without_a_version(decision):
    f = parse(jm.format_textfile(jm.retrain_samples(
        jm.RunRecord("docs", 0, 1.0, 2.0, result(decision, gain=-0.004),
                     previous={P + "last_publish_timestamp_seconds": 0.5}))))
    assert outcome(f) == decision and one(f, "exit_code") == 0
    assert one(f, "gain", metric="top1", nprobe="2", baseline="centroid") == pytest.approx(-0.004)
    assert one(f, "router_info", version="", kind="learned-moments") == 1
    assert one(f, "last_success_timestamp_seconds") == 2.0
    assert one(f, "last_publish_timestamp_seconds") == 0.5          # carried over


def test_a_failed_run_has_outcome_exit_code_and_no_result_metrics():
    f = parse(jm.format_textfile(jm.retrain_samples(jm.RunRecord("docs", 3, 1.0, 4.0))))
    assert outcome(f) == "failed" and one(f, "exit_code") == 3
    assert one(f, "duration_seconds") == 3.0
    assert set(f) == {P + n for n in ("last_run_timestamp_seconds", "outcome", "exit_code",
                                      "duration_seconds")}


def test_a_non_zero_exit_after_a_result_is_failed():
    assert jm.outcome_of(1, result()) == "failed"
    assert jm.outcome_of(0, result("kept")) == "kept"
    assert jm.outcome_of(0, None) == "failed"


def test_label_values_and_numbers_are_escaped():
    samples = [jm.Sample(P + "router_info", {"collection": 'a"b\\c\nd', "version": "",
                                             "kind": "x"}, 1),
               jm.Sample(P + "gain", {"collection": "c", "metric": "m", "nprobe": "1",
                                      "baseline": "b"}, float("nan")),
               jm.Sample(P + "duration_seconds", {"collection": "c"}, float("inf"))]
    f = parse(jm.format_textfile(samples))
    assert f[P + "router_info"] == {frozenset({"collection": 'a"b\\c\nd', "version": "",
                                               "kind": "x"}.items()): 1}
    assert np.isnan(next(iter(f[P + "gain"].values())))
    assert next(iter(f[P + "duration_seconds"].values())) == float("inf")
    with pytest.raises(ValueError, match="undeclared"):
        jm.format_textfile([jm.Sample("other_metric", {}, 1)])


# ---------------------------------------------------------------- the file
def test_timestamps_carry_over_a_failed_run(tmp_path):
    path = tmp_path / "retrain_docs.prom"
    jm.write_retrain_metrics(path, jm.RunRecord("docs", 0, 90.0, 100.0, result()))
    jm.write_retrain_metrics(path, jm.RunRecord("docs", 1, 190.0, 200.0))
    f = parse(path.read_text())
    assert outcome(f) == "failed" and one(f, "exit_code") == 1
    assert one(f, "last_run_timestamp_seconds") == 200.0
    assert one(f, "last_success_timestamp_seconds") == 100.0
    assert one(f, "last_publish_timestamp_seconds") == 100.0
    jm.write_retrain_metrics(path, jm.RunRecord("docs", 0, 290.0, 300.0, result("kept")))
    f = parse(path.read_text())
    assert one(f, "last_success_timestamp_seconds") == 300.0
    assert one(f, "last_publish_timestamp_seconds") == 100.0
    # another collection's timestamps, or garbage, are not carried
    assert jm.read_previous(path, "other") == {}
    (tmp_path / "junk.prom").write_bytes(b"\xff\xfe garbage {{{\n")
    assert jm.read_previous(tmp_path / "junk.prom", "docs") == {}
    assert jm.read_previous(tmp_path / "missing.prom", "docs") == {}


@pytest.mark.parametrize("fail_at", ["fsync", "replace", "write"])
def test_a_failure_while_writing_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch,
                                                                      fail_at):
    path = tmp_path / "retrain_docs.prom"
    jm.write_retrain_metrics(path, jm.RunRecord("docs", 0, 90.0, 100.0, result()))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")
    if fail_at == "write":              # half the temp file written, then the disk is full
        real_fdopen = jm.os.fdopen

        class Broken:
            def __init__(self, fd, mode):
                self.fh = real_fdopen(fd, mode)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[:10])
                boom()
        monkeypatch.setattr(jm.os, "fdopen", Broken)
    else:
        monkeypatch.setattr(jm.os, fail_at, boom)
    with pytest.raises(OSError):
        jm.write_retrain_metrics(path, jm.RunRecord("docs", 1, 1.0, 2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_temp_file_is_not_a_prom_file_and_sits_beside_the_target(tmp_path, monkeypatch):
    seen = []
    real = jm.os.replace

    def spy(src, dst):
        seen.append((src, dst))
        return real(src, dst)
    monkeypatch.setattr(jm.os, "replace", spy)
    path = tmp_path / "sub" / "retrain_docs.prom"          # missing parents are created
    jm.write_textfile(path, "x 1\n")
    (src, dst), = seen
    assert src.parent == path.parent and dst == path
    assert src.name.startswith(".") and not src.name.endswith(".prom")
    assert path.read_text() == "x 1\n"


def test_check_metrics_path(tmp_path):
    from milvus_ltr_router.errors import InputError
    assert jm.check_metrics_path(tmp_path / "a" / "b.prom") == tmp_path / "a" / "b.prom"
    with pytest.raises(InputError, match="is a directory"):
        jm.check_metrics_path(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="is a file"):
        jm.check_metrics_path(tmp_path / "f" / "b.prom")


def test_no_prometheus_client_needed():
    script = textwrap.dedent("""
        import sys
        sys.modules["prometheus_client"] = None
        from milvus_ltr_router import jobmetrics as jm
        from milvus_ltr_router.cli import retrain_cmd
        print(jm.format_textfile(jm.retrain_samples(jm.RunRecord("docs", 2, 1.0, 2.0))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert 'milvus_ltr_router_retrain_exit_code{collection="docs"} 2' in out


# ---------------------------------------------------------------- through the command line
def run_cli(caplog, *argv):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli.main([str(a) for a in argv])
    return code, "\n".join(r.getMessage() for r in caplog.records
                           if r.levelno >= logging.ERROR)


def retrain_argv(uri, tmp_path, *extra):
    return ["retrain", "--uri", uri, "--collection", "docs", "--model-dir", tmp_path / "m",
            "--metrics-file", tmp_path / "prom" / "retrain_docs.prom", *extra]


def test_a_bad_query_file_writes_failed_with_exit_code_2(lite, tmp_path, caplog):
    path = tmp_path / "prom" / "retrain_docs.prom"
    jm.write_retrain_metrics(path, jm.RunRecord("docs", 0, 10.0, 20.0, result()))
    np.save(tmp_path / "q.npy", np.ones((300, 7), np.float32))       # wrong dimension
    code, err = run_cli(caplog, *retrain_argv(lite, tmp_path, "--queries", tmp_path / "q.npy"))
    assert code == EXIT_USAGE and "dimension 7" in err                # README: bad input, 2
    f = parse(path.read_text())
    assert outcome(f) == "failed" and one(f, "exit_code") == EXIT_USAGE
    assert one(f, "last_run_timestamp_seconds") > 20.0
    assert one(f, "last_success_timestamp_seconds") == 20.0           # the previous run's
    assert P + "gain" not in f and P + "phase_duration_seconds" not in f


def test_failures_before_the_job_starts_are_written_too(tmp_path, caplog):
    # a milvus-lite --uri that does not exist is refused before the command runs (exit 2)
    code, err = run_cli(caplog, *retrain_argv(str(tmp_path / "nope.db"), tmp_path))
    assert code == EXIT_USAGE and "does not exist" in err
    f = parse((tmp_path / "prom" / "retrain_docs.prom").read_text())
    assert outcome(f) == "failed" and one(f, "exit_code") == EXIT_USAGE
    # Milvus unreachable: operational failure (exit 1)
    code, _ = run_cli(caplog, *retrain_argv("http://127.0.0.1:9", tmp_path))
    f = parse((tmp_path / "prom" / "retrain_docs.prom").read_text())
    assert code == EXIT_FAIL and one(f, "exit_code") == EXIT_FAIL


def test_a_held_lock_writes_exit_code_3(lite, tmp_path, caplog):
    with ModelRegistry(tmp_path / "m").lock("docs"):
        code, _ = run_cli(caplog, *retrain_argv(lite, tmp_path))
    f = parse((tmp_path / "prom" / "retrain_docs.prom").read_text())
    assert code == EXIT_LOCKED and outcome(f) == "failed" and one(f, "exit_code") == EXIT_LOCKED


def test_a_directory_as_metrics_file_exits_2(tmp_path, caplog):
    (tmp_path / "d").mkdir()
    code, err = run_cli(caplog, "retrain", "--uri", "http://127.0.0.1:9", "--collection", "docs",
                        "--model-dir", tmp_path / "m", "--metrics-file", tmp_path / "d")
    assert code == EXIT_USAGE and f"--metrics-file {tmp_path / 'd'} is a directory" in err
    assert "Milvus" not in err.splitlines()[0]


@pytest.fixture
def fake_retrain(monkeypatch):
    """retrain() replaced by one returning ``box[0]`` (or raising it)."""
    from milvus_ltr_router import retrain as job
    from milvus_ltr_router.cli import retrain_cmd
    box = []

    def fake(client, cfg, seconds=None):
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]
    monkeypatch.setattr(job, "retrain", fake)
    monkeypatch.setattr(retrain_cmd, "connected", lambda args: contextlib.nullcontext(None))
    return box


@pytest.mark.parametrize("decision", ["published", "kept"])
def test_a_successful_run_writes_its_outcome(fake_retrain, tmp_path, caplog, capsys, decision):
    fake_retrain.append(result(decision))
    code, _ = run_cli(caplog, *retrain_argv("http://unused:1", tmp_path))
    assert code == EXIT_OK
    f = parse((tmp_path / "prom" / "retrain_docs.prom").read_text())
    assert outcome(f) == decision and one(f, "exit_code") == 0
    assert one(f, "queries") == 600


def test_a_bug_in_the_job_writes_failed_and_still_raises(fake_retrain, tmp_path, caplog):
    fake_retrain.append(KeyError("bug"))
    with pytest.raises(KeyError):
        run_cli(caplog, *retrain_argv("http://unused:1", tmp_path))
    f = parse((tmp_path / "prom" / "retrain_docs.prom").read_text())
    assert outcome(f) == "failed" and one(f, "exit_code") == 1


def test_an_unwritable_metrics_file_after_a_publish_keeps_exit_0(fake_retrain, tmp_path, caplog,
                                                                 capsys, monkeypatch):
    fake_retrain.append(result())

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(jm, "write_textfile", full)
    code, err = run_cli(caplog, *retrain_argv("http://unused:1", tmp_path))
    assert code == EXIT_OK and "metrics not written to" in err and "No space left" in err


def test_a_retrain_failing_in_training_writes_the_phases_that_ended(lite, tmp_path, caplog,
                                                                   fixture_data, monkeypatch):
    """A real retrain on milvus-lite whose training step fails: the file says failed, exit 1,
    and has the wall time of the phases that ended before it (queries, label, moments)."""
    from milvus_ltr_router import candidates
    from milvus_ltr_router.retrain import RetrainError

    def diverged(*args, **kwargs):
        raise RetrainError("training diverged")
    monkeypatch.setattr(candidates, "learned_candidate", diverged)
    np.save(tmp_path / "q.npy", fixture_data.queries[:400])
    code, err = run_cli(caplog, *retrain_argv(lite, tmp_path, "--queries", tmp_path / "q.npy"))
    assert code == EXIT_FAIL and "training diverged" in err
    f = parse((tmp_path / "prom" / "retrain_docs.prom").read_text())
    assert outcome(f) == "failed" and one(f, "exit_code") == EXIT_FAIL
    phases = {dict(k)["phase"]: v for k, v in f[P + "phase_duration_seconds"].items()}
    assert set(phases) == {"queries", "label", "moments"} and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= one(f, "duration_seconds")


def test_a_real_retrain_writes_the_phases_it_timed(lite, tmp_path, caplog, capsys, fixture_data):
    np.save(tmp_path / "q.npy", fixture_data.queries[:400])
    code, _ = run_cli(caplog, *retrain_argv(lite, tmp_path, "--queries", tmp_path / "q.npy",
                                            "--nprobe", "2", "--epochs", "3", "--min-gain", "-1",
                                            "--json"))
    assert code == EXIT_OK
    import json
    out = json.loads(capsys.readouterr().out)
    f = parse((tmp_path / "prom" / "retrain_docs.prom").read_text())
    assert outcome(f) == out["decision"] == "published"
    phases = {dict(k)["phase"]: v for k, v in f[P + "phase_duration_seconds"].items()}
    assert phases == pytest.approx(out["seconds"])
    assert one(f, "gain", metric="top1", nprobe="2", baseline=out["baseline"]) == \
        pytest.approx(out["gain"])
    assert one(f, "queries") == out["n_queries"]
    kind = out["training"]["router_kind"]
    assert one(f, "router_info", version=out["version"], kind=kind) == 1
    assert one(f, "duration_seconds") >= sum(out["seconds"].values())
