"""The scale-out deployment file is valid for docker-compose and has every role."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from worker.lifetime import STOP_BOUND_SECONDS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ["docker-compose", "-f", str(ROOT / "docker-compose.yml")]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is installed by .ci/run")
def test_docker_compose_config_is_valid() -> None:
    config = subprocess.run([*COMPOSE, "config"], capture_output=True, text=True, check=False)
    assert config.returncode == 0, config.stderr
    services = subprocess.run([*COMPOSE, "config", "--services"], capture_output=True, text=True, check=True)
    assert set(services.stdout.split()) == {"redis", "postgres", "listener", "worker", "delivery", "training-worker", "web"}
    worker = config.stdout.split("\n  worker:\n", 1)[1].split("\nvolumes:", 1)[0]  # worker is the last service
    assert "- capabilities:\n            - gpu" in worker  # inference workers reserve a GPU
    # Docker waits as long as our processes promise to take to stop (worker.lifetime) before it kills them.
    for service in ("listener", "worker", "delivery", "training-worker"):
        section = re.search(rf"^  {re.escape(service)}:\n((?:    .*\n|\s*\n)*)", config.stdout, re.MULTILINE)
        assert section is not None, config.stdout
        assert f"stop_grace_period: {STOP_BOUND_SECONDS:.0f}s" in section[1], section[1]


def test_broken_compose_file_is_rejected(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is installed by .ci/run")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("services:", "servicez:"))
    result = subprocess.run(["docker-compose", "-f", str(broken), "config"], capture_output=True, text=True)
    assert result.returncode != 0


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is installed by .ci/run")
def test_our_services_are_health_checked_by_their_readyz() -> None:
    import yaml

    config = subprocess.run([*COMPOSE, "config"], capture_output=True, text=True, check=True)
    services = yaml.safe_load(config.stdout)["services"]
    for name, port in (("listener", 9101), ("worker", 9101), ("delivery", 9101), ("training-worker", 9101),
                       ("web", 8080)):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in test, (name, test)
        if name != "web":  # the web app serves its own on the web port
            assert str(services[name]["environment"]["DICOM_TRIAGE_HEALTH_PORT"]) == str(port)
