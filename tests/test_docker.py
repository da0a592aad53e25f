"""docker/: no Docker engine here, so check what can be checked without one."""
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"


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


def test_dockerfile_installs_console_scripts_with_cpu_torch():
    text = (DOCKER / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "pip install '.[train]'" in text
    assert "milvus-ltr-router --help" in text and "retrain-router --help" in text
    assert 'ENTRYPOINT ["retrain-router"]' in text


def test_cron_script_runs_retrain_router_per_collection():
    text = (DOCKER / "retrain-cron.sh").read_text()
    assert 'retrain-router --uri "$MILVUS_URI" --collection "$c"' in text
    assert "sleep \"$RETRAIN_INTERVAL\"" in text
