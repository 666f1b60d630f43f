"""``dicom-triage listen`` with a DICOM TLS port (issue 18): the real command, configured by environment, takes
storescu +tls on its TLS port and plain storescu on its plain one (one process, and two sharing both sockets);
TLS alone; Orthanc, a real PACS, pushing with ``UseDicomTls`` (its own TLS stack, DCMTK's) and its client
certificate; ``tls make-dev-certs``; a missing or mismatched certificate file fails the start with a message naming
it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_factory import brain_images, storescu, write_files
from dicom_io.synthesis import mr_series
from dicom_io.tls import DevCertificates, make_dev_certs
from processes import (Child, NetworkNamespace, free_port, serve_ready, triage_command, triage_environment,
                       wait_for)
from worker.db import Database, Instance

AE = "DICOM_TRIAGE"
ORTHANC = "/usr/sbin/Orthanc"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


def tls_environment(tmp_path: Path, certs: DevCertificates, **settings: object) -> dict[str, str]:
    tls: dict[str, object] = {"dicom_tls_cert": certs.server_cert, "dicom_tls_key": certs.server_key,
                              "dicom_tls_ca": certs.ca_cert, "require_client_certificate": "true"}
    return triage_environment(tmp_path / "models", **{**tls, **settings})


def recorded(data_dir: Path) -> set[str]:
    database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
    try:
        with database.read_session() as session:
            return set(session.scalars(select(Instance.sop_instance_uid)))
    finally:
        database.dispose()


def tls_options(certs: DevCertificates) -> list[str]:
    return ["+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca_cert)]


@pytest.mark.parametrize("processes", [1, 2])
def test_listen_serves_plain_and_tls_side_by_side(tmp_path: Path, certs: DevCertificates, processes: int) -> None:
    plain_port, tls_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    env = tls_environment(tmp_path, certs, dicom_tls_port=tls_port)
    listen = Child(triage_command("listen", "--data-dir", str(data_dir), "--dicom-port", str(plain_port),
                                  "--processes", str(processes)), env, name="listen")
    try:
        ready = listen.wait_for_line(serve_ready, 120)
        assert f":{plain_port} and {tls_port} (TLS)" in ready
        series = mr_series(brain_images(4, seed=41))
        files = write_files(series, tmp_path / "send")
        over_tls = storescu(tls_port, files[:2], *tls_options(certs), called_ae=AE)
        assert over_tls.statuses == [0, 0], over_tls.output[-3000:]
        plain = storescu(plain_port, files[2:], called_ae=AE)
        assert plain.statuses == [0, 0], plain.output[-3000:]
        refused = storescu(tls_port, files[:1], called_ae=AE, timeout=60)  # plain DICOM on the TLS port
        assert refused.statuses == [] and refused.returncode != 0
        assert recorded(data_dir) == {ds.SOPInstanceUID for ds in series}
        assert listen.terminate() == 0, listen.output[-3000:]
    finally:
        listen.stop()


def test_listen_tls_only(tmp_path: Path, certs: DevCertificates) -> None:
    plain_port, tls_port = free_port(), free_port()
    env = tls_environment(tmp_path, certs, dicom_tls_port=tls_port, dicom_plain="false")
    listen = Child(triage_command("listen", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(plain_port)),
                   env, name="listen")
    try:
        ready = listen.wait_for_line(serve_ready, 120)
        assert f"@127.0.0.1:{tls_port} (TLS)," in ready
        files = write_files(mr_series(brain_images(1, seed=42)), tmp_path / "send")
        assert storescu(tls_port, files, *tls_options(certs), called_ae=AE).statuses == [0]
        assert storescu(plain_port, files, called_ae=AE).returncode != 0  # nothing listens there
    finally:
        listen.stop()


@pytest.mark.parametrize("client", ["ours", "foreign"])
def test_orthanc_pushes_over_dicom_tls_with_its_client_certificate(tmp_path: Path, certs: DevCertificates,
                                                                    client: str) -> None:
    """Stored when Orthanc's client certificate is from our CA; refused, nothing stored, when from another CA."""
    # Orthanc 1.10 listens on every interface: it and listen run in a namespace with only loopback.
    shown = certs if client == "ours" else make_dev_certs(tmp_path / "foreign", organization="another CA")
    tls_port, orthanc_dicom, orthanc_http = 11240, 11241, 8044
    data_dir = tmp_path / "data"
    directory = tmp_path / "orthanc"
    directory.mkdir()
    (directory / "orthanc.json").write_text(json.dumps({
        "Name": "dicom-triage-tls-push", "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"), "HttpPort": orthanc_http, "DicomPort": orthanc_dicom,
        "DicomAet": "ORTHANC_TLS", "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        # Orthanc shows a client certificate (listen requires one) and trusts our server's CA.
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(shown.client_cert),
        "DicomTlsPrivateKey": str(shown.client_key), "DicomTlsTrustedCertificates": str(certs.ca_cert),
        "DicomModalities": {"triage": {"AET": AE, "Host": "127.0.0.1", "Port": tls_port, "UseDicomTls": True}},
    }))
    netns = NetworkNamespace()
    env = tls_environment(tmp_path, certs, dicom_tls_port=tls_port, dicom_plain="false")
    listen = Child(triage_command("listen", "--data-dir", str(data_dir), "--dicom-port", "11242"), env,
                   name="listen", netns=netns)
    orthanc = Child([ORTHANC, str(directory / "orthanc.json")], name="orthanc", netns=netns)
    http = f"http://127.0.0.1:{orthanc_http}"
    try:
        listen.wait_for_line(serve_ready, 120)
        wait_for(lambda: netns.run(["curl", "-sf", f"{http}/system"]).returncode == 0, 30, "Orthanc", orthanc)
        series = mr_series(brain_images(3, seed=43))
        ids = []
        for path in write_files(series, tmp_path / "send"):
            upload = netns.run(["curl", "-sf", "-X", "POST", "--data-binary", f"@{path}", f"{http}/instances"])
            assert upload.returncode == 0, upload.stderr
            ids.append(json.loads(upload.stdout)["ID"])
        push = netns.run(["curl", "-s", "-X", "POST", "-d", json.dumps({"Resources": ids, "Synchronous": True}),
                          f"{http}/modalities/triage/store"])
        assert push.returncode == 0, push.stderr
        answer = json.loads(push.stdout)
        if client == "ours":
            assert answer.get("InstancesCount") == 3, push.stdout + orthanc.output[-3000:] + listen.output[-3000:]
            assert recorded(data_dir) == {ds.SOPInstanceUID for ds in series}
        else:
            assert "InstancesCount" not in answer and answer["HttpStatus"] >= 400, push.stdout
            assert recorded(data_dir) == set()
            assert listen.popen.poll() is None  # the refusal ends that association only
    finally:
        orthanc.stop()
        listen.stop()
        netns.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_missing_or_mismatched_certificate_fails_the_start(tmp_path: Path, certs: DevCertificates,
                                                          processes: int) -> None:
    other = make_dev_certs(tmp_path / "other")
    for cert, key, message in [
        (tmp_path / "absent.pem", certs.server_key, f"TLS certificate {tmp_path / 'absent.pem'} does not exist"),
        (certs.server_cert, other.server_key, "cannot be used together"),
    ]:
        env = tls_environment(tmp_path, certs, dicom_tls_port=free_port(), dicom_tls_cert=cert, dicom_tls_key=key)
        done = subprocess.run(triage_command("listen", "--data-dir", str(tmp_path / "data"), "--dicom-port",
                                             str(free_port()), "--processes", str(processes)),
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr[-3000:]
        assert "cannot listen for DICOM TLS" in done.stderr and message in done.stderr, done.stderr[-3000:]


def test_make_dev_certs_command(tmp_path: Path) -> None:
    done = subprocess.run(triage_command("tls", "make-dev-certs", str(tmp_path / "certs"), "--host", "pacs.local"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not for production" in done.stdout
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
        "ca.key", "ca.pem", "client.key", "client.pem", "server.key", "server.pem"]
    assert oct((tmp_path / "certs" / "server.key").stat().st_mode & 0o777) == "0o600"
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "certs" / "ca.pem"),
                             str(tmp_path / "certs" / "server.pem"), str(tmp_path / "certs" / "client.pem")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                           str(tmp_path / "certs" / "server.pem")], capture_output=True, text=True, timeout=60)
    assert "DNS:pacs.local" in text.stdout
