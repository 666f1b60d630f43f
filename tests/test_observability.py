"""Operations (issue 20), with real things throughout.

1. ``listen`` on the real PostgreSQL and Redis, each reached through a TCP forwarder this test can close (a closed
   port, as when the server is stopped), its archive on a 32 MB tmpfs of its own (``unshare -m``): ``/readyz`` turns
   not-ready naming ``database``, ``broker`` and ``archive`` (the disk watermark crossed by a file this test writes)
   in turn, and ready again after each; ``dicom-triage status --json`` lists the process meanwhile.
2. ``serve`` with ``--log-format json`` in a network namespace of its own with Debian's Prometheus scraping it,
   while dcmtk's storescu pushes a series carrying marker strings in every patient field: Prometheus' HTTP API
   then returns non-zero received instances, finished jobs and job latency observations; every log line is a JSON
   object and none holds a marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
import yaml

from dicom_factory import brain_images, write_files
from dicom_io.synthesis import mr_series
from processes import Child, NetworkNamespace, free_port, serve_ready, triage_command, triage_environment, wait_for

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
STORESCU = "/usr/bin/storescu"
OUR_AE = "DICOM_TRIAGE"
REDIS_DB = 12
#: Strings put in the pushed series' patient and study fields; none may reach a log line.
MARKERS = {"PatientName": "Phimarkername^Given", "PatientID": "PHIMARKERID77", "PatientBirthDate": "19230405",
           "StudyDescription": "PHIMARKER STUDY DESC", "AccessionNumber": "PHIACC4711",
           "ReferringPhysicianName": "Phimarkerdoctor^Ref", "InstitutionName": "PHIMARKER HOSPITAL"}


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to ``target`` that can be closed (new connections refused, open ones cut)
    and opened again on the same port: the server going away and coming back, as a client sees it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        assert self._server is not None
        self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not, on Linux)
        self._server.close()
        self._server = None
        with self._lock:
            connections, self._open = self._open, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    import urllib.error

    try:
        with urlopen(f"http://127.0.0.1:{port}/readyz", timeout=20) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_readiness(port: int, ready: bool, failing: str | None, child: Child) -> dict[str, Any]:
    def matches() -> dict[str, Any] | None:
        status, body = readyz(port)
        wanted = ready == (status == 200) and (failing is None or failing in body["failing"])
        return body if wanted and body["ready"] == ready else None

    return wait_for(matches, 30, f"/readyz ready={ready} failing={failing}", child, interval=0.3, alive=True)


@pytest.fixture
def forwarders() -> Iterator[list[Forwarder]]:
    made: list[Forwarder] = []
    yield made
    for forwarder in made:
        if forwarder._server is not None:
            forwarder.close()


def test_readyz_names_the_database_the_broker_and_the_disk_and_recovers(
        postgres_url: str, tmp_path: Path, processes: list[Child], forwarders: list[Forwarder]) -> None:
    postgres, redis = Forwarder(5432), Forwarder(6379)
    forwarders += [postgres, redis]
    data_dir, health_port = tmp_path / "data", free_port()
    data_dir.mkdir()
    database_url = postgres_url.replace(":5432/", f":{postgres.port}/")
    env = triage_environment(tmp_path / "no-models", database_url=database_url, min_free_disk_mb=16,
                             broker_url=f"redis://127.0.0.1:{redis.port}/{REDIS_DB}")
    listen = triage_command("listen", "--data-dir", str(data_dir), "--dicom-port", str(free_port()),
                            "--health-port", str(health_port))
    # The data directory on a 32 MB tmpfs seen by this listener only; the shell execs it, keeping its pid.
    script = f'mount -t tmpfs -o size=32m tmpfs "{data_dir}" && exec "$@"'
    child = Child(["unshare", "-m", "sh", "-c", script, "sh", *listen], env, name="listen")
    processes.append(child)
    child.wait_for_line(serve_ready, 120)
    wait_readiness(health_port, True, None, child)
    seen = Path(f"/proc/{child.popen.pid}/root") / str(data_dir).lstrip("/")  # its tmpfs, from here

    status = subprocess.run(
        ["nsenter", f"--mount=/proc/{child.popen.pid}/ns/mnt", *triage_command("status", "--json", "--data-dir",
                                                                                str(data_dir))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["ready"], status.stdout + status.stderr
    assert [p["role"] for p in report["processes"]] == ["listen"]
    assert report["queues"]["inference"]["depth"] == 0 and report["disk"]["free_bytes"] > 16 * 2**20

    postgres.close()
    body = wait_readiness(health_port, False, "database", child)
    assert body["failing"] == ["database"], body
    postgres.open()
    wait_readiness(health_port, True, None, child)

    redis.close()
    body = wait_readiness(health_port, False, "broker", child)
    assert body["failing"] == ["broker"], body
    redis.open()
    wait_readiness(health_port, True, None, child)

    filler = seen / "filler"
    with filler.open("wb") as handle:  # 20 of the 32 MB: 12 left, under the 16 MB watermark
        for _ in range(20):
            handle.write(b"\0" * 2**20)
    body = wait_readiness(health_port, False, "archive", child)
    assert body["failing"] == ["archive"] and "watermark" in json.dumps(body), body
    filler.unlink()
    wait_readiness(health_port, True, None, child)
    assert child.terminate() == 0


def _phi_series(count: int) -> list[Any]:
    datasets = mr_series(brain_images(count, seed=77), patient_id=MARKERS["PatientID"],
                         patient_name=MARKERS["PatientName"])
    for ds in datasets:
        for keyword, value in MARKERS.items():
            setattr(ds, keyword, value)
    return datasets


def _prometheus_query(netns: NetworkNamespace, port: int, query: str) -> float:
    answer = netns.run(["curl", "-sf", "--get", "--data-urlencode", f"query={query}",
                        f"http://127.0.0.1:{port}/api/v1/query"])
    if answer.returncode != 0:
        return 0.0
    result = json.loads(answer.stdout)["data"]["result"]
    return sum(float(item["value"][1]) for item in result)


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="Debian's prometheus package is not installed")
def test_prometheus_scrapes_serve_and_json_logs_carry_no_phi(models_dir: Path, tmp_path: Path,
                                                              processes: list[Child]) -> None:
    netns = NetworkNamespace()
    try:
        dicom_port, web_port, prom_port = free_port(), free_port(), free_port()
        env = triage_environment(models_dir, ae_title=OUR_AE)
        serve = Child(triage_command("serve", "--log-format", "json", "--data-dir", str(tmp_path / "data"),
                                     "--dicom-port", str(dicom_port), "--web-port", str(web_port)),
                      env, name="serve", netns=netns)
        processes.append(serve)
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "dicom-triage", "static_configs": [
                {"targets": [f"127.0.0.1:{web_port}"]}]}],
        }))
        prometheus = Child([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}"], name="prometheus", netns=netns)
        processes.append(prometheus)
        serve.wait_for_line(serve_ready, 180)

        series = _phi_series(6)
        files = write_files(series, tmp_path / "series")
        sent = netns.run([STORESCU, "-aet", "PACS", "-aec", OUR_AE, "127.0.0.1", str(dicom_port),
                          *map(str, files)])
        assert sent.returncode == 0, sent.stdout + sent.stderr

        received = wait_for(lambda: _prometheus_query(netns, prom_port, "sum(dicom_triage_instances_received_total)")
                            >= len(files), 120, "Prometheus sees the received instances", serve, prometheus)
        assert received
        wait_for(lambda: _prometheus_query(netns, prom_port, 'sum(dicom_triage_jobs_finished_total{outcome="done"})')
                 >= 1, 180, "Prometheus sees a finished job", serve, prometheus)
        latency = _prometheus_query(netns, prom_port, "sum(dicom_triage_job_latency_seconds_count)")
        buckets = _prometheus_query(netns, prom_port, 'sum(dicom_triage_job_latency_seconds_bucket{le="+Inf"})')
        assert latency >= 1 and buckets >= 1
        assert _prometheus_query(netns, prom_port, 'sum(dicom_triage_ready{check="dicom"})') == 1
        assert _prometheus_query(netns, prom_port, "sum(dicom_triage_associations_accepted_total)") >= 1
        assert _prometheus_query(netns, prom_port, "count(dicom_triage_active_model_info)") >= 1
        assert serve.terminate() == 0
    finally:
        netns.close()

    # Every line serve and its children wrote is a JSON object (the one printed ready line aside), and no patient
    # field's marker is in any of them.
    lines = [line for line in serve.lines if line.strip() and not serve_ready(line)]
    assert lines
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON object: {line!r}")
        assert {"time", "level", "process", "logger", "message"} <= set(entry), line
    # The lines about the series' job carry its ids: the job's row id and the series UID's digest (SHA-256, 16 hex
    # digits), so that a log search finds them without the UID.
    digest = hashlib.sha256(series[0].SeriesInstanceUID.encode()).hexdigest()[:16]
    about = [json.loads(line)["ids"] for line in lines if '"series_uid_hash"' in line]
    assert about and all(ids["series_uid_hash"] == digest and ids["job_id"] >= 1 for ids in about), about
    assert any("model_uid" in ids for ids in about), about  # the classified line names the model
    text = "".join(serve.lines)
    for keyword, value in MARKERS.items():
        for fragment in {value, *value.replace("^", " ").split()}:
            if len(fragment) >= 6:
                assert fragment.lower() not in text.lower(), f"{keyword} ({fragment}) in the logs"


def test_deploy_rules_and_dashboard_are_valid_and_use_our_metrics() -> None:
    """promtool accepts the alerting rules; the dashboard is JSON whose every query names a metric we export."""
    rules = ROOT / "deploy" / "prometheus" / "alerts.yml"
    if shutil.which(PROMTOOL) or Path(PROMTOOL).exists():
        checked = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True,
                                 timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    else:
        pytest.fail("promtool (Debian's prometheus package) is missing: .ci/run installs it")
    exported = exported_metric_names()
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dicom-triage.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert queries
    for query in queries:
        names = set(__import__("re").findall(r"\b(dicom_triage_[a-z_]+|up)\b", query))
        assert names, query
        assert names <= exported | {"up"}, (query, names - exported)
    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            names = set(__import__("re").findall(r"\b(dicom_triage_[a-z_]+)\b", rule["expr"]))
            assert names <= exported, (rule["alert"], names - exported)


def exported_metric_names() -> set[str]:
    """Every sample name /metrics can show: the counters and histograms' series and the state gauges."""
    from prometheus_client import REGISTRY

    import worker.metrics as metrics
    from worker.health import Readiness

    names = {sample_name for family in REGISTRY.collect() for sample_name in
             [family.name, *(f"{family.name}{suffix}" for suffix in ("_total", "_created", "_bucket", "_count",
                                                                    "_sum"))]}
    names |= {"dicom_triage_ready", "dicom_triage_disk_free_bytes", "dicom_triage_disk_watermark_bytes",
              "dicom_triage_database_up", "dicom_triage_series", "dicom_triage_queue_depth",
              "dicom_triage_queue_oldest_age_seconds", "dicom_triage_sr_deliveries", "dicom_triage_training_runs",
              "dicom_triage_active_model_info", "dicom_triage_worker_processes", "dicom_triage_drift_class_share",
              "dicom_triage_drift_indeterminate_rate", "dicom_triage_drift_correction_rate",
              "dicom_triage_drift_mean_confidence", "dicom_triage_drift_warning"}
    # The state gauges above are named in worker.metrics.StateCollector: each of them must be there.
    source = (Path(metrics.__file__).read_text() + Path(__import__("worker.health").health.__file__).read_text()
              + Path(__import__("worker.drift").drift.__file__).read_text())
    missing = {name for name in names if name.startswith("dicom_triage_") and not name.endswith(
        ("_total", "_created", "_bucket", "_count", "_sum")) and f'"{name}"' not in source}
    assert not missing, missing
    assert Readiness  # imported for its module's source
    return names


def _associations_open(port: int) -> float | None:
    """``dicom_triage_associations_open`` on a process's ``/metrics``, or None when it is not there."""
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("dicom_triage_associations_open "):
                return float(line.split()[1])
    return None


def test_listen_counts_its_open_associations(tmp_path: Path, processes: list[Child]) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicom_io.network import TCP_NODELAY_HANDLER

    port, health_port = free_port(), free_port()
    listen = Child(triage_command("listen", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(port),
                                  "--health-port", str(health_port)), triage_environment(tmp_path / "no-models"),
                   name="listen")
    processes.append(listen)
    listen.wait_for_line(serve_ready, 120)
    assert _associations_open(health_port) == 0

    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title=OUR_AE, evt_handlers=[TCP_NODELAY_HANDLER]) for _ in range(3)]
    assert all(assoc.is_established for assoc in held)
    wait_for(lambda: _associations_open(health_port) == 3, 30, "three open associations", listen, alive=True)
    held[0].release()
    held[1].abort()  # an aborted association is closed too
    wait_for(lambda: _associations_open(health_port) == 1, 30, "one open association", listen, alive=True)
    held[2].release()
    wait_for(lambda: _associations_open(health_port) == 0, 30, "no open association", listen, alive=True)
    assert listen.terminate() == 0
