"""The wheel alone runs the demo: a normal (non-editable) install in an empty directory.

Builds the wheel from what ``docker/Dockerfile`` also copies (``pyproject.toml``,
``README.md``, ``milvus_ltr_router/``) in a temporary copy, so nothing is
written into the checkout; installs it with ``pip install --target`` and runs
its ``milvus-ltr-router demo`` console script with this venv's interpreter and
``PYTHONPATH`` pointing at that install only (the editable checkout must not be
what gets imported). The demo's dependencies come from this venv.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = "milvus_ltr_router/data/wordnet20k_minilm.npz"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this venv")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "milvus_ltr_router", src / "milvus_ltr_router",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), "."], cwd=src, check=True)
    [built] = (tmp / "dist").glob("milvus_ltr_router-*.whl")
    return built


def test_wheel_ships_the_fixture_and_only_the_runtime_package(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        fixture_size = whl.getinfo(FIXTURE).file_size
        sources = {n: whl.read(n).decode() for n in names if n.endswith(".py")}
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"milvus_ltr_router"}, top
    assert fixture_size > 10_000_000                       # the real 20k x 384 fp16 vectors
    assert "milvus_ltr_router/cli/__main__.py" in names    # subpackages too (the command line)
    assert not any(n.startswith(("benchmarks/", "tests/", "integration_tests/")) for n in names)
    assert "milvus_ltr_router/datasets.py" not in names
    assert "milvus_ltr_router/embedded_server.py" not in names
    importers = [n for n, text in sources.items()
                 if re.search(r"^\s*(from|import)\s+(benchmarks|tests)\b", text, re.M)]
    assert importers == [], f"runtime modules import tooling: {importers}"
    assert wheel.stat().st_size < 25_000_000


def test_installed_wheel_runs_the_demo_in_an_empty_directory(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    # Third-party caches (matplotlib's font list, onnxruntime's device id under ~/.cache) and
    # temporaries go to this HOME and TMPDIR, not the real ones.
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(home),
           "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(home / "mpl"),
           "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    env.pop("MILVUS_LTR_ROUTER_CACHE", None)

    where = subprocess.run([sys.executable, "-c",
                            "import milvus_ltr_router, milvus_ltr_router.fixture as f; "
                            "print(milvus_ltr_router.__file__); print(f.fixture_resource())"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    module_file, fixture_file = where.stdout.split()
    assert Path(module_file).is_relative_to(site), module_file
    assert Path(fixture_file) == site / FIXTURE

    script = site / "bin" / "milvus-ltr-router"
    run = subprocess.run([sys.executable, str(script), "demo", "--clusters", "32"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert re.fullmatch(r"demo finished in \d+ s", lines[-1]), lines[-5:]
    assert "20000 documents, 4000 questions, dim 384" in run.stdout
    assert re.search(r"recall@10 = 0\.\d+", run.stdout)
    # It wrote only under its working directory (and third-party caches under HOME).
    assert sorted(p.name for p in work.iterdir()) == ["demo_output"]
    assert (work / "demo_output" / "onnx_models" / "wordnet_ivf" / "CURRENT.json").is_file()
    # TMPDIR (torch's inductor cache dir, ...) and HOME hold only third-party temporaries and caches.
    stray = [p for p in home.rglob("*") if p.is_file()
             and p.relative_to(home).parts[0] not in ("mpl", ".cache")]
    assert stray == [], stray
