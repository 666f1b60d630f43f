"""Commands and settings no other test reaches, each through the real ``dicom-triage`` command and a real TOML file
named by ``DICOM_TRIAGE_CONFIG`` (issue 24): ``users add|list|disable`` with a started ``dicom-triage web``,
``web`` on the ``web_host`` of the file, ``models rollback`` and ``models retrain``, and ``worker_concurrency`` and
``result_backend_url`` as a started ``dicom-triage worker`` reports them to ``celery inspect`` on the real Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from config import load_settings
from databases import scratch_redis
from processes import ROOT, Child, celery_ready, free_port, triage_command, wait_for
from test_registry_helpers import save_threshold_model
from worker.celery_app import create_celery_app
from worker.db import Database
from worker.db.registry import TrainingRun
from worker.lifetime import STOP_BOUND_SECONDS
from worker.registry import register_model
from worker.retraining import RETRAIN_MODEL, TRAINING_QUEUE

PASSWORD = "a long enough password"
#: Redis databases of this file (test_observability uses 12, test_e2e_pipeline 13).
BROKER_DB, RESULTS_DB = 14, 15
#: A loopback address other than the default web_host 127.0.0.1: the server answering there, and not on
#: 127.0.0.1, shows that web_host came from the file.
WEB_HOST = "127.0.0.2"


def write_config(path: Path, **settings: object) -> Path:
    """A TOML settings file with ``settings`` (strings, numbers and paths only)."""
    lines = []
    for key, value in settings.items():
        lines.append(f"{key} = {value}" if isinstance(value, int) else f"{key} = {json.dumps(str(value))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def config_environment(config: Path) -> dict[str, str]:
    """This process's environment without DICOM_TRIAGE_* variables, with ``DICOM_TRIAGE_CONFIG`` naming ``config``
    (the only way the commands below learn their settings) and the CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update(DICOM_TRIAGE_CONFIG=str(config), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def run_cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(triage_command(*args), cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                          timeout=120)


def start_web(env: dict[str, str], host: str, port: int) -> Child:
    """``dicom-triage web`` (settings from the file only), once it answers ``/healthz``."""
    web = Child(triage_command("web"), env, name="web")
    client = httpx.Client(base_url=f"http://{host}:{port}", timeout=5)

    def healthy() -> bool:
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, 60, "dicom-triage web answering /healthz", web, alive=True)
    finally:
        client.close()
    return web


def stop_within_bound(child: Child, status: int = 0) -> None:
    """SIGTERM; the process must exit with ``status`` within the stated stop bound."""
    assert child.terminate(timeout=STOP_BOUND_SECONDS) == status, child.output[-3000:]


def stop_web(web: Child) -> None:
    """``dicom-triage web`` shuts the app down on SIGTERM and exits 0 after a complete shutdown (uvicorn re-raises
    the signal it caught to the command's own handler)."""
    stop_within_bound(web)
    assert "Application shutdown complete." in web.output and "Finished server process" in web.output


def log_in(client: httpx.Client, name: str, password: str) -> httpx.Response:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token[1]})


def test_web_starts_on_the_web_host_of_the_file_in_DICOM_TRIAGE_CONFIG_and_stops(
    tmp_path: Path, processes: list[Child]
) -> None:
    port = free_port()
    config = write_config(tmp_path / "triage.toml", data_dir=tmp_path / "data", web_host=WEB_HOST, web_port=port)
    web = start_web(config_environment(config), WEB_HOST, port)
    processes.append(web)
    with httpx.Client(base_url=f"http://{WEB_HOST}:{port}", timeout=5) as client:
        assert client.get("/healthz").status_code == 200
        login = client.get("/login")
        assert login.status_code == 200 and "Log in" in login.text
    with pytest.raises(httpx.ConnectError):  # bound to web_host only, not to the default 127.0.0.1
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert (tmp_path / "data" / "triage.sqlite3").is_file()  # data_dir from the file too
    stop_web(web)


def test_users_add_list_disable_and_a_disabled_user_cannot_log_in(tmp_path: Path, processes: list[Child]) -> None:
    port = free_port()
    config = write_config(tmp_path / "triage.toml", data_dir=tmp_path / "data", web_host=WEB_HOST, web_port=port)
    env = config_environment(config)

    added = run_cli(env, "users", "add", "alice", "--role", "radiologist", "--password-stdin", stdin=PASSWORD + "\n")
    assert (added.returncode, added.stdout) == (0, "added radiologist alice\n"), added.stderr
    admin = run_cli(env, "users", "add", "bob", "--role", "admin", stdin=PASSWORD + "\n")  # stdin without the flag
    assert (admin.returncode, admin.stdout) == (0, "added admin bob\n"), admin.stderr
    again = run_cli(env, "users", "add", "alice", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")
    assert (again.returncode, again.stderr.strip()) == (2, "dicom-triage: user 'alice' already exists")
    listed = run_cli(env, "users", "list")
    assert (listed.returncode, listed.stdout) == (0, "alice\tradiologist\tactive\nbob\tadmin\tactive\n")

    web = start_web(env, WEB_HOST, port)
    processes.append(web)
    with httpx.Client(base_url=f"http://{WEB_HOST}:{port}", timeout=10) as before, \
            httpx.Client(base_url=f"http://{WEB_HOST}:{port}", timeout=10) as after:
        assert log_in(before, "alice", PASSWORD).status_code == 303
        me = before.get("/api/me")
        assert (me.status_code, me.json()["name"]) == (200, "alice")

        disabled = run_cli(env, "users", "disable", "alice")
        assert (disabled.returncode, disabled.stdout) == (0, "disabled alice\n"), disabled.stderr
        # The session opened before is dead, and a new login with the right password is refused.
        assert before.get("/api/me").status_code == 401
        refused = log_in(after, "alice", PASSWORD)
        assert refused.status_code == 401 and "Wrong user name or password." in refused.text
        assert after.get("/api/me").status_code == 401
    stop_web(web)

    listed = run_cli(env, "users", "list")
    assert (listed.returncode, listed.stdout) == (0, "alice\tradiologist\tdisabled\nbob\tadmin\tactive\n")
    unknown = run_cli(env, "users", "disable", "nobody")
    assert (unknown.returncode, unknown.stderr.strip()) == (2, "dicom-triage: no user 'nobody'")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """An installed covid-ct model (the first active one) and a second, candidate model beside it."""
    root = tmp_path_factory.mktemp("cli-models")
    first_uid = save_threshold_model(root / "installed" / "covid-ct", "first")
    second_uid = save_threshold_model(root / "second", "second")
    return {"models_dir": root / "installed", "first_uid": first_uid, "second": root / "second",
            "second_uid": second_uid}


def test_models_rollback_restores_the_replaced_model_and_refuses_when_nothing_was_replaced(
    installed: dict, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "triage.toml", data_dir=tmp_path / "data", models_dir=installed["models_dir"])
    env = config_environment(config)
    first, second = installed["first_uid"], installed["second_uid"]

    nothing = run_cli(env, "models", "rollback", "covid-ct")  # registers the installed model as active first
    assert nothing.returncode == 2
    assert nothing.stderr.strip() == (f"dicom-triage: covid-ct's active model {first} replaced no earlier model; "
                                      "there is nothing to roll back to")
    # A candidate, as a retraining registers it (no command registers one), promoted through the command.
    settings = load_settings(config, env={})
    database = Database(settings.effective_database_url)
    try:
        with database.session() as session:
            register_model(session, installed["second"], actor="retraining")
    finally:
        database.dispose()
    promoted = run_cli(env, "models", "promote", second, "--force", "--reason", "no reference set here")
    assert (promoted.returncode, promoted.stdout) == (0, f"covid-ct: {second} is active (forced), replacing {first}\n")

    rolled = run_cli(env, "models", "rollback", "covid-ct", "--reason", "misses COVID in clinic", "--actor", "carol")
    assert (rolled.returncode, rolled.stdout) == (0, f"covid-ct: rolled back from {second} to {first}\n"), rolled.stderr
    listed = run_cli(env, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {m["model_uid"]: m["state"] for m in json.loads(listed.stdout)} == {first: "active", second: "retired"}
    shown = run_cli(env, "models", "show", second, "--json")
    assert shown.returncode == 0, shown.stderr
    last = json.loads(shown.stdout)["events"][-1]
    assert (last["action"], last["actor"], last["reason"]) == ("rollback", "carol", "misses COVID in clinic")
    # The restored model was itself never a promotion's replacement: a second rollback has nowhere to go.
    again = run_cli(env, "models", "rollback", "covid-ct")
    assert again.returncode == 2 and again.stderr.strip() == nothing.stderr.strip()


def broker_messages(queue_dir: Path) -> list[dict]:
    """The messages waiting in the filesystem broker's folder (one JSON file each)."""
    return [json.loads(path.read_text()) for path in sorted(queue_dir.glob("*.msg"))]


def test_models_retrain_queues_a_run_and_refuses_bad_options(installed: dict, tmp_path: Path) -> None:
    # No training worker runs on this fresh data directory, so the run stays queued and its message stays in the
    # filesystem broker's folder, where the test reads it.
    config = write_config(tmp_path / "triage.toml", data_dir=tmp_path / "data", models_dir=installed["models_dir"])
    env = config_environment(config)
    settings = load_settings(config, env={})

    refused = run_cli(env, "models", "retrain", "covid-ct", "--epochs", "0")
    assert (refused.returncode, refused.stderr.strip()) == (2, "dicom-triage: epochs must be 1..1000, not 0")
    queued = run_cli(env, "models", "retrain", "covid-ct", "--epochs", "3", "--from-active", "--actor", "dana")
    assert (queued.returncode, queued.stdout) == (0, "queued training run 1 on the training queue\n  labels: 0 "
                                                  "radiologist-reviewed series; left out 0 unreviewed results "
                                                  "(--include-unreviewed adds them)\n"), queued.stderr

    database = Database(settings.effective_database_url)
    try:
        with database.session() as session:
            runs = session.scalars(select(TrainingRun)).all()
            assert [(r.id, r.task, r.state, r.phase, r.requested_by) for r in runs] == [
                (1, "covid-ct", "queued", "queued", "dana")]  # the refused request made no run
            assert (runs[0].options["epochs"], runs[0].options["start_from_active"]) == (3, True)
    finally:
        database.dispose()
    [message] = broker_messages(settings.broker_dir / "queue")
    assert (message["headers"]["task"], message["headers"]["argsrepr"]) == (RETRAIN_MODEL, "[1]")
    assert message["properties"]["delivery_info"]["routing_key"] == TRAINING_QUEUE


@pytest.fixture
def redis_urls() -> Iterator[tuple[str, str]]:
    with scratch_redis(BROKER_DB) as broker, scratch_redis(RESULTS_DB) as results:
        yield broker, results


def test_worker_concurrency_and_result_backend_from_the_file_reach_the_started_worker(
    installed: dict, tmp_path: Path, processes: list[Child], redis_urls: tuple[str, str]
) -> None:
    broker_url, results_url = redis_urls
    config = write_config(tmp_path / "triage.toml", data_dir=tmp_path / "data", models_dir=installed["models_dir"],
                          broker_url=broker_url, result_backend_url=results_url, worker_concurrency=3)
    settings = load_settings(config, env={})
    assert (settings.worker_concurrency, settings.result_backend_url) == (3, results_url)

    worker = Child(triage_command("worker"), config_environment(config), name="worker")
    processes.append(worker)
    ready = worker.wait_for_line(celery_ready, 120, "the inference worker")
    name = re.search(r"(inference-\d+@\S+) ready\.", ready)
    assert name, ready
    # Celery's remote control over the real Redis broker: what the running worker itself reports.
    inspect = create_celery_app(settings).control.inspect(destination=[name[1]], limit=1, timeout=10)
    stats = inspect.stats()
    assert stats is not None, worker.output[-3000:]
    assert stats[name[1]]["pool"]["max-concurrency"] == 3
    conf = inspect.conf(with_defaults=False)
    assert conf is not None, worker.output[-3000:]
    assert conf[name[1]]["result_backend"] == results_url
    stop_within_bound(worker)
