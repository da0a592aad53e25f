"""What the command line shows a person: help on every option with its default, and
``status`` in readable lines (``--json`` for scripts). Runs ``cli.main`` in-process on
milvus-lite."""
import json

import numpy as np
import pytest

from milvus_ltr_router import cli
from milvus_ltr_router.registry import ModelRegistry

PARSERS = {"milvus-ltr-router": cli.build_parser, "retrain-router": cli.retrain_parser}


# ---------------------------------------------------------------- help text
def all_options():
    return [(parser.prog, "/".join(action.option_strings), action)
            for build in PARSERS.values() for parser, action in cli.iter_options(build())]


def test_every_option_of_every_command_has_help_and_says_its_default():
    options = all_options()
    commands = {prog for prog, _, _ in options}
    # every subcommand and the cron entry point are walked, not just the top-level parser
    assert {"milvus-ltr-router status", "milvus-ltr-router demo", "milvus-ltr-router adopt-layout",
            "milvus-ltr-router retrain", "retrain-router"} <= commands
    missing_help = [(prog, opt) for prog, opt, action in options if not (action.help or "").strip()]
    assert missing_help == []
    # an option that takes a value and may be left out says what happens then
    no_default = [(prog, opt) for prog, opt, action in options
                  if action.nargs != 0 and not action.required
                  and "default" not in cli.option_help(action)]
    assert no_default == []


@pytest.mark.parametrize("argv,shown", [
    (["retrain"], ["--min-queries MIN_QUERIES", "(default: 200)", "(default: 100)",
                   "(default: auto)", "--model-dir DIR", "(default: onnx_models)",
                   "--moments {auto,off}", "'off' trains only the linear router"]),
    (["status"], ["(default: onnx_models)", "(default: ./milvus_ltr.db)", "--json"]),
    (["demo"], ["(default: ./demo_output/demo.db)", "(default: 2)", "round(sqrt(20000)) = 141"]),
    (["adopt-layout"], ["(default: kmeans)", "(default: the collection index's, else IP)"]),
    (["build-layout"], ["(default: spherical)", "(default FLAT: exact scans", "never created empty"]),
])
def test_rendered_help_shows_the_defaults(capsys, argv, shown):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())      # argparse wraps lines
    for piece in shown:
        assert " ".join(piece.split()) in text, piece


def test_top_level_help_ends_with_the_next_commands_and_exit_codes(capsys):
    for name, build in PARSERS.items():
        text = build().format_help()
        assert "exit codes: 0" in text, name
    text = cli.build_parser().format_help()
    assert "milvus-ltr-router build-layout --uri URI --source" in text
    assert "retrain-router --uri URI --collection" in text
    assert "top-1 accuracy: share of held-out queries" in cli.retrain_parser().format_help()


@pytest.mark.parametrize("argv,moments", [([], "auto"), (["--moments", "off"], "off"),
                                           (["--moments", "auto"], "auto")])
def test_retrain_passes_moments_and_names_the_kind_it_published(monkeypatch, capsys, tmp_path,
                                                                argv, moments):
    import contextlib
    from milvus_ltr_router import retrain as job
    from milvus_ltr_router.cli import retrain_cmd
    seen = []
    kind = "learned" if moments == "off" else "learned-moments"
    rows = [{"nprobe": 2, "k": 10, "top1_accuracy": 0.5, "recall": 0.4, "mean_probed": 2.0}]
    result = job.RetrainResult(
        decision="published", reason="gain +0.0100 over centroid", collection="docs",
        layout_id="L", n_queries=300, nprobe=2, version="v1",
        table={"centroid": rows, "learned": rows, **({"moments": rows} if moments == "auto"
                                                     else {})},
        training={"router_kind": kind, "n_test": 60})

    def fake_retrain(client, cfg, seconds=None):
        seen.append(cfg.moments)
        return result
    monkeypatch.setattr(job, "retrain", fake_retrain)
    monkeypatch.setattr(retrain_cmd, "connected", lambda args: contextlib.nullcontext(None))
    code = cli.main(["retrain", "--uri", "http://unused:1", "--collection", "docs",
                     "--model-dir", str(tmp_path / "m"), *argv])
    out = capsys.readouterr().out
    assert code == 0 and seen == [moments]
    header = next(line for line in out.splitlines() if line.startswith("nprobe "))
    assert ("moments top1" in header) == (moments == "auto")
    assert "'centroid' = centroid routing, 'learned' = the router trained now" in out
    assert out.splitlines()[-1] == f"published a {kind} router: gain +0.0100 over centroid"


def test_bad_moments_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["retrain", "--collection", "docs", "--moments", "on"])
    assert exit_.value.code == 2
    assert "--moments: invalid choice: 'on'" in capsys.readouterr().err


# ---------------------------------------------------------------- status


def status(capsys, uri, model_dir, *extra):
    code = cli.main(["status", "--uri", uri, "--collection", "docs", "--model-dir",
                     str(model_dir), *extra])
    out = capsys.readouterr().out
    assert code == 0
    return out


def lines_of(text):
    """``{key: value}`` of status's aligned ``key  value`` lines."""
    pairs = [line.split("  ", 1) for line in text.splitlines() if "  " in line
             and not line.startswith(" ")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_status_without_a_router_names_the_uri_and_the_model_dir_it_looked_in(lite, tmp_path,
                                                                             capsys):
    models = tmp_path / "models"
    out = status(capsys, lite, models)
    got = lines_of(out)
    assert got["collection"] == "docs (laid out from 'src')"
    assert got["Milvus"] == lite
    assert got["clusters"].startswith("8 (spherical k-means, metric IP, dim 384)")
    assert got["storage"].startswith("partition: one partition per cluster (8 partitions in Milvus)")
    assert got["rows"] == "1500 now, 1500 when laid out"
    assert got["rows outside layout"] == "0"
    assert got["query log"] == "0 queries logged"
    assert got["model dir"] == f"{models} (looked in {models / 'docs'}, which does not exist)"
    # a built layout has its clusters' moments: clients route by them until a router is published
    assert got["router"] == "none published: searches route by the layout's cluster moments"
    assert f"retrain-router --uri {lite} --collection docs --model-dir {models}" in out
    assert "{" not in out                                   # no raw Python dicts
    # the keys are aligned: every value starts in the same column
    starts = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in out.splitlines()
              if "  " in line and not line.startswith(" ")}
    assert len(starts) == 1


def test_status_json_keeps_its_keys_and_adds_where_it_looked(lite, tmp_path, capsys):
    models = tmp_path / "models"
    data = json.loads(status(capsys, lite, models, "--json"))
    assert data["partitions"] == 8 and data["rows"] == 1500 and data["rows_live"] == 1500
    assert data["uri"] == lite and data["model_dir"] == str(models)
    assert data["router_dir"] == str(models / "docs") and data["router_dir_exists"] is False
    assert data["router"] == {"version": None, "kind": "moments"} and data["logged_queries"] == 0
    assert data["storage"]["mode"] == "partition" and data["cluster_sizes"]["empty"] == 0
    assert data["versions"] == [] and data["rows_outside_layout"] == 0


def test_status_with_a_published_router(lite, tmp_path, capsys, fixture_data):
    models = tmp_path / "models"
    np.save(tmp_path / "q.npy", fixture_data.queries[:600])
    code = cli.main(["retrain", "--uri", lite, "--collection", "docs", "--model-dir", str(models),
                     "--queries", str(tmp_path / "q.npy"), "--nprobe", "2", "--epochs", "5",
                     "--min-gain", "-1"])
    out = capsys.readouterr().out
    assert code == 0
    # the retrain table says which split it is computed on, how many queries, what columns mean
    assert "routing quality on the held-out test split: " in out and " of the 600 queries" in out
    assert "top1 = top-1 accuracy: share of queries whose exact nearest neighbour" in out
    assert "R@10 = recall@10: share of each query's exact 10 nearest neighbours" in out
    # a row (top1 and R@10 columns) for every router the retrain compared, each named
    header = next(line for line in out.splitlines() if line.startswith("nprobe "))
    for name in ("centroid", "learned", "moments"):
        assert f"{name} top1" in header and f"{name} R@10" in header, name
        assert f"'{name}' = " in out
    version = ModelRegistry(models).current("docs").version
    data = json.loads(status(capsys, lite, models, "--json"))
    kind = data["router"]["kind"]
    assert kind in ("learned-moments", "moments") and data["router"]["usable"] is True
    assert f"published {kind} router {version}" in out          # the summary names the kind
    got = lines_of(status(capsys, lite, models))
    assert got["model dir"] == f"{models} (looked in {models / 'docs'})"
    assert got["router"].startswith(f"{kind} router {version}, published ")
    assert got["router"].endswith("usable")
    assert got["router metrics"].startswith("top1@nprobe=2 0.")
    assert "over centroid (retrain's held-out queries)" in got["router metrics"]
    assert got["recall_target"].startswith("calibrated ")
    assert got["versions kept"] == version


def test_status_with_an_unusable_router_still_answers(lite, tmp_path, capsys):
    registry = ModelRegistry(tmp_path / "m")
    path = registry.version_path("docs", "v1")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not onnx")
    registry.publish("docs", path, "v1", {})
    got = lines_of(status(capsys, lite, tmp_path / "m"))
    assert got["router"].startswith("v1, published ")
    assert "NOT USABLE (" in got["router"]
    assert got["router"].endswith("searches route by the layout's cluster moments")
    assert "recall_target" not in got


def test_status_with_a_corrupt_pointer_still_answers(lite, tmp_path, capsys):
    """What clients do with a corrupt CURRENT.json (route by the layout's training-free router),
    status says, exit 0."""
    registry = ModelRegistry(tmp_path / "m")
    registry.pointer_path("docs").parent.mkdir(parents=True)
    registry.pointer_path("docs").write_text("{not json")
    got = lines_of(status(capsys, lite, tmp_path / "m"))
    assert got["router"].startswith("NOT USABLE (router pointer ") and "corrupt" in got["router"]
    assert "searches route by the layout's cluster moments" in got["router"]
    data = json.loads(status(capsys, lite, tmp_path / "m", "--json"))
    assert data["router"]["usable"] is False and "corrupt" in data["router"]["error"]
    assert data["router"]["kind"] == "moments"


def test_status_of_a_layout_without_moments_says_centroids(lite, tmp_path, capsys):
    """A layout stored before cluster moments (or without them) is routed by centroids."""
    from pymilvus import MilvusClient
    from milvus_ltr_router.build import build_layout
    from milvus_ltr_router.layout import moments_collection_name
    from milvus_ltr_router.milvus_io import release_lite
    client = MilvusClient(lite)
    try:
        build_layout(client, "src", "plain", n_clusters=4, seed=0)
        client.drop_collection(moments_collection_name("plain"))
    finally:
        client.close()
        release_lite(lite)
    args = ["status", "--uri", lite, "--collection", "plain", "--model-dir", str(tmp_path / "m")]
    assert cli.main(args) == 0
    got = lines_of(capsys.readouterr().out)
    assert got["router"] == "none published: searches route by centroids"
    assert cli.main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["router"] == {"version": None, "kind": "centroid"}


def test_format_status_of_an_adopted_grouped_layout_with_strays():
    """The pure formatter over the dict that ``status --json`` prints."""
    data = {"collection": "c", "uri": "http://m:19530", "model_dir": "/srv/m",
            "router_dir": "/srv/m/c", "router_dir_exists": True, "layout_id": "L1",
            "partitions": 4, "rows": 10, "algorithm": "kmeans", "metric": "L2", "dim": 3,
            "created_at": "2026-01-01", "source": None,
            "storage": {"mode": "grouped", "partitions": 1, "cluster_field": "_ltr_cluster",
                        "clustering_key": True},
            "rows_live": 12, "cluster_sizes": {"min": 0, "median": 2.5, "max": 6,
                                               "max_over_mean": 2.0, "empty": 1},
            "rows_outside_layout": 2, "logged_queries": 7, "versions": ["a", "b"],
            "router": {"version": "b", "published_at": "t", "metrics": {}, "usable": True,
                       "recall_target_calibrated": False, "stopping_model": False,
                       "adaptive_head": True, "kind": "learned"}}
    got = lines_of(cli.format_status(data))
    assert got["collection"] == "c (adopted layout)"
    assert got["clusters"] == "4 (standard k-means, metric L2, dim 3)"
    assert got["storage"] == ("grouped: clusters grouped into partitions, plus a cluster-id "
                              "filter (1 partition in Milvus, cluster field _ltr_cluster, "
                              "clustering key)")
    assert got["cluster sizes"] == "min 0, median 2.5, max 6 (max/mean 2.00), 1 empty"
    assert got["rows outside layout"] == "2 (see the warning below)"
    assert got["router"] == "learned router b, published t, usable"
    assert got["router metrics"] == "none recorded (rolled back)"
    assert got["recall_target"] == "calibrated no, stopping model no, adaptive head yes"
    assert got["versions kept"] == "a, b"
