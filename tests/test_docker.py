"""docker/: the files are checked everywhere; the image is built and run where a Docker engine answers."""
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def test_compose_file_parses_and_names_services_and_images():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"etcd", "minio", "milvus", "retrain-router"}
    image = services["milvus"]["image"]
    assert image.startswith("milvusdb/milvus:v2.5.") or image.startswith("milvusdb/milvus:v2.6.")
    assert services["milvus"]["command"] == ["milvus", "run", "standalone"]
    env = services["milvus"]["environment"]
    assert env["ETCD_ENDPOINTS"] == "etcd:2379" and env["MINIO_ADDRESS"] == "minio:9000"
    job = services["retrain-router"]
    assert job["build"]["dockerfile"] == "docker/Dockerfile"
    assert job["environment"]["MILVUS_URI"] == "http://milvus:19530"
    assert job["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert any(v.startswith("models:") for v in job["volumes"])
    assert "--maintain" in job["environment"]["RETRAIN_ARGS"]      # the layout's upkeep too


def test_dockerfile_installs_console_scripts_with_cpu_torch():
    text = (DOCKER / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "pip install '/src[train]'" in text and "rm -rf /src" in text   # a normal install
    assert "COPY milvus_ltr_router /src/milvus_ltr_router" in text          # with its fixture
    assert "milvus-ltr-router --help" in text and "retrain-router --help" in text
    assert 'ENTRYPOINT ["retrain-router"]' in text


def test_cron_script_runs_retrain_router_per_collection():
    text = (DOCKER / "retrain-cron.sh").read_text()
    assert 'retrain-router --uri "$MILVUS_URI" --collection "$c"' in text
    assert "sleep \"$RETRAIN_INTERVAL\"" in text
    assert "--nprobe 8 --maintain}" in text


def test_dockerignore_sends_only_what_the_image_is_built_from():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!milvus_ltr_router/", "!docker/"} <= set(lines)
    assert not any(line.startswith("!") and (".venv" in line or ".git" in line) for line in lines)


def docker_unavailable() -> str | None:
    """Why the image cannot be built here, or None when a Docker engine answers."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        probe = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                               capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer 'docker version' within 20 s"
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers: {why}"
    return None


@pytest.fixture(scope="module")
def image():
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"cannot build docker/Dockerfile: {reason}")
    tag = f"milvus-ltr-router-test:{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "build", "-f", "docker/Dockerfile", "-t", tag, "."], cwd=ROOT,
                   check=True, timeout=3600)
    yield tag
    subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)


def docker_run(tag: str, *args: str, entrypoint: str | None = None, timeout: int = 120):
    cmd = ["docker", "run", "--rm"] + (["--entrypoint", entrypoint] if entrypoint else [])
    return subprocess.run(cmd + [tag, *args], capture_output=True, text=True, timeout=timeout)


def test_image_runs_both_console_scripts_and_the_demo(image):
    run = docker_run(image, "--help")                       # the ENTRYPOINT: retrain-router
    assert run.returncode == 0 and "retrain-router" in run.stdout, run.stderr
    run = docker_run(image, "--help", entrypoint="milvus-ltr-router")
    assert run.returncode == 0 and "demo" in run.stdout, run.stderr
    run = docker_run(image, "demo", "--clusters", "32", entrypoint="milvus-ltr-router",
                     timeout=1200)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert re.fullmatch(r"demo finished in \d+ s", lines[-1]), lines[-5:]
    assert "20000 documents, 4000 questions, dim 384" in run.stdout
