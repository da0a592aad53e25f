"""Serving writes nothing outside the model dir: loading a router and scoring with it leaves
HOME and the temp dir as they were (onnxruntime writes a device id and a telemetry database
under ~/.cache/Microsoft and a .ses file in TMPDIR unless its telemetry is disabled)."""
import os
import subprocess
import sys
import textwrap


def test_serving_a_router_writes_nothing_under_home_or_tmp(tmp_path):
    home, tmp, models = tmp_path / "home", tmp_path / "tmp", tmp_path / "models"
    for d in (home, tmp, models):
        d.mkdir()
    script = textwrap.dedent(f"""
        import numpy as np
        from milvus_ltr_router.export import export_router
        from milvus_ltr_router.router import Router, LinearRouter
        w = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
        b = np.zeros(8, np.float32)
        names = [f"p{{i}}" for i in range(8)]
        lin = LinearRouter(w, b, names)
        import milvus_ltr_router.layout as lay
        layout = lay.Layout(collection="c", layout_id="lid", metric="IP", dim=16,
                            partition_names=names, centroids=w, sizes=np.ones(8, np.int64),
                            algorithm="spherical", vector_field="vector", primary_field="id")
        path = {str(models)!r} + "/r.onnx"
        export_router(w, b, layout, "c", path, nprobe=2)
        r = Router.load(path, layout=layout)
        print(r.rank(np.ones((3, 16), np.float32), 2).shape, lin.rank(np.ones((1, 16), np.float32), 2).shape)
    """)
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), TMPDIR=str(tmp), MPLCONFIGDIR=str(tmp / "mpl-unused"))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         cwd=str(tmp_path), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(3, 2) (1, 2)" in run.stdout
    assert sorted(p.name for p in home.rglob("*")) == []
    assert sorted(p.name for p in tmp.rglob("*")) == []
    assert sorted(p.name for p in models.iterdir()) == ["r.onnx"]
