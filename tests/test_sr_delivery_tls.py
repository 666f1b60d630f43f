"""SR delivery over DICOM TLS (issue 18) by the real delivery worker, inside a fresh network namespace
(``unshare -n``; see test_sr_delivery.py), to dcmtk's ``storescp +tls`` and to Orthanc with ``DicomTlsEnabled``.
A destination whose certificate our CA bundle does not trust gets a recorded error per attempt, never a plain
association, and is delivered to by a later attempt once the bundle trusts it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from config import Settings, load_settings
from dicom_factory import brain_images
from dicom_io.archive import Archive
from dicom_io.synthesis import mr_series
from dicom_io.tls import DevCertificates, make_dev_certs
from processes import Child, NetworkNamespace, celery_ready, triage_command, wait_for
from test_sr_delivery import RETRY_SETTINGS, delivery_environment, received, record_result, start_storescp
from worker.db import Database, SrDelivery, upgrade_database
from worker.ingest import DatabaseSink
from worker.reporting import publish_result

ORTHANC = "/usr/sbin/Orthanc"
PORT = 11231
ORTHANC_HTTP = 8043


@dataclass
class World:
    tmp: Path
    netns: NetworkNamespace
    ours: DevCertificates  # the peer's CA and server certificate, and our client certificate
    trusted: Path  # our CA bundle for the destination: at first another CA's
    settings: Settings
    database: Database

    def start_worker(self) -> Child:
        worker = Child(triage_command("worker", "--queue", "delivery", "--config", str(self.tmp / "config.toml"),
                                      "--data-dir", str(self.settings.data_dir)),
                       delivery_environment(self.settings), name="worker", netns=self.netns)
        worker.wait_for_line(celery_ready, 120, "the delivery worker")
        return worker

    def publish(self, seed: int) -> tuple[str, int]:
        """An SR for a new series; its SOP Instance UID and document id."""
        series = mr_series(brain_images(3, seed=seed))
        sink = DatabaseSink(Archive(self.settings.archive_dir), self.database)
        for ds in series:
            assert sink.accept(ds, "MODALITY") == 0
        published = publish_result(self.database, self.settings, record_result(self.database, series))
        assert published is not None
        return published.sop_instance_uid, published.document_pk

    def delivery(self, document_pk: int) -> SrDelivery:
        with self.database.session() as session:
            return session.scalars(select(SrDelivery).where(SrDelivery.document_pk == document_pk)).one()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ours = make_dev_certs(tmp_path / "ours")
    stranger = make_dev_certs(tmp_path / "stranger", organization="another CA")
    trusted = tmp_path / "trusted-ca.pem"
    shutil.copy(stranger.ca_cert, trusted)
    (tmp_path / "config.toml").write_text(
        "[[sr_destinations]]\n"
        f'ae_title = "PACS_TLS"\nhost = "127.0.0.1"\nport = {PORT}\ntls = true\n'
        f'tls_ca = "{trusted}"\ntls_cert = "{ours.client_cert}"\ntls_key = "{ours.client_key}"\n'
    )
    settings = load_settings(tmp_path / "config.toml", env={}, data_dir=tmp_path / "data", ae_title="TRIAGE_TLS",
                             **RETRY_SETTINGS)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    netns = NetworkNamespace()
    try:
        yield World(tmp_path, netns, ours, trusted, settings, database)
    finally:
        netns.close()
        database.dispose()


def untrusted_then_trusted(world: World, document_pk: int, *peers: Child) -> None:
    """The delivery fails over TLS with the certificate's reason until our bundle trusts the peer's CA."""
    wait_for(lambda: world.delivery(document_pk).attempts >= 2, 30, "failed TLS attempts", *peers)
    failing = world.delivery(document_pk)
    assert failing.destination == f"PACS_TLS@127.0.0.1:{PORT}+tls"
    assert failing.status == "pending"
    assert "TLS handshake failed" in failing.error and "certificate" in failing.error, failing.error
    shutil.copy(world.ours.ca_cert, world.trusted)  # read afresh by the next attempt
    wait_for(lambda: world.delivery(document_pk).status == "sent", 30, "the delivery once trusted", *peers)
    assert world.delivery(document_pk).error == ""


def test_storescp_over_tls(world: World) -> None:
    ours = world.ours
    storescp = start_storescp(world.netns, PORT, world.tmp / "pacs", "+tls", str(ours.server_key),
                              str(ours.server_cert), "+cf", str(ours.ca_cert), ae_title="PACS_TLS")  # -rc: ours
    worker = world.start_worker()
    try:
        sop_instance_uid, document_pk = world.publish(seed=31)
        wait_for(lambda: world.delivery(document_pk).attempts >= 1, 30, "a first attempt", worker, storescp)
        assert not received(world.tmp / "pacs")
        untrusted_then_trusted(world, document_pk, worker, storescp)
        assert set(received(world.tmp / "pacs")) == {sop_instance_uid}
    finally:
        worker.stop()
        storescp.stop()


def test_orthanc_with_dicom_tls(world: World) -> None:
    ours = world.ours
    directory = world.tmp / "orthanc"
    directory.mkdir()
    config = {
        "Name": "dicom-triage-tls-test", "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"), "HttpPort": ORTHANC_HTTP, "DicomPort": PORT,
        "DicomAet": "PACS_TLS", "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(ours.server_cert),
        "DicomTlsPrivateKey": str(ours.server_key), "DicomTlsTrustedCertificates": str(ours.ca_cert),
        "DicomTlsRemoteCertificateRequired": True,
    }
    (directory / "orthanc.json").write_text(json.dumps(config))
    orthanc = Child([ORTHANC, str(directory / "orthanc.json")], netns=world.netns)
    http = f"http://127.0.0.1:{ORTHANC_HTTP}"
    wait_for(lambda: world.netns.run(["curl", "-sf", f"{http}/system"]).returncode == 0, 30, "Orthanc", orthanc)
    worker = world.start_worker()
    try:
        sop_instance_uid, document_pk = world.publish(seed=32)
        untrusted_then_trusted(world, document_pk, worker, orthanc)
        lookup = world.netns.run(["curl", "-sf", "-X", "POST", "-d", sop_instance_uid, f"{http}/tools/lookup"])
        assert lookup.returncode == 0, lookup.stderr
        assert [item["Type"] for item in json.loads(lookup.stdout)] == ["Instance"]
    finally:
        worker.stop()
        orthanc.stop()
