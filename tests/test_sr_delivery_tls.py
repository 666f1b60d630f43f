"""SR delivery over DICOM TLS (issue 18) by the real delivery worker to dcmtk's ``storescp +tls``, both inside a
fresh network namespace (``unshare -n``; see test_sr_delivery.py): delivered over TLS with our client certificate;
a destination whose certificate our CA bundle does not trust gets a recorded error per attempt, never a plain
association, and is delivered to by a later attempt once the bundle trusts it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
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

PORT = 11231


def destination_config(path: Path, ca: Path, client: DevCertificates) -> Path:
    path.write_text(
        "[[sr_destinations]]\n"
        f'ae_title = "PACS_TLS"\nhost = "127.0.0.1"\nport = {PORT}\ntls = true\n'
        f'tls_ca = "{ca}"\ntls_cert = "{client.client_cert}"\ntls_key = "{client.client_key}"\n'
    )
    return path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[NetworkNamespace, Settings, Database, Path, DevCertificates,
                                            DevCertificates]]:
    ours = make_dev_certs(tmp_path / "ours")  # the PACS's CA, its server certificate and our client certificate
    stranger = make_dev_certs(tmp_path / "stranger", organization="another CA")
    trusted = tmp_path / "trusted-ca.pem"
    shutil.copy(stranger.ca_cert, trusted)  # at first our bundle trusts another CA, not the PACS's
    config = destination_config(tmp_path / "config.toml", trusted, ours)
    settings = load_settings(config, env={}, data_dir=tmp_path / "data", ae_title="TRIAGE_TLS", **RETRY_SETTINGS)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    netns = NetworkNamespace()
    try:
        yield netns, settings, database, trusted, ours, stranger
    finally:
        netns.close()
        database.dispose()


def test_sr_delivered_over_tls_after_an_untrusted_certificate_is_trusted(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    netns, settings, database, trusted, ours, _stranger = setup
    storescp = start_storescp(netns, PORT, tmp_path / "pacs", "+tls", str(ours.server_key), str(ours.server_cert),
                              "+cf", str(ours.ca_cert), ae_title="PACS_TLS")  # -rc: our certificate is required
    worker = Child(triage_command("worker", "--queue", "delivery", "--config", str(tmp_path / "config.toml"),
                                  "--data-dir", str(settings.data_dir)),
                   delivery_environment(settings), name="worker", netns=netns)
    try:
        worker.wait_for_line(celery_ready, 120, "the delivery worker")
        series = mr_series(brain_images(3, seed=31))
        sink = DatabaseSink(Archive(settings.archive_dir), database)
        for ds in series:
            assert sink.accept(ds, "MODALITY") == 0
        published = publish_result(database, settings, record_result(database, series))
        assert published is not None

        def delivery() -> SrDelivery:
            with database.session() as session:
                return session.scalars(select(SrDelivery).where(SrDelivery.document_pk == published.document_pk)).one()

        wait_for(lambda: delivery().attempts >= 2, 30, "failed TLS attempts", worker, storescp)
        failing = delivery()
        assert failing.destination == f"PACS_TLS@127.0.0.1:{PORT}+tls"
        assert failing.status == "pending"
        assert "TLS handshake failed" in failing.error and "certificate" in failing.error, failing.error
        assert not (tmp_path / "pacs").exists() or not received(tmp_path / "pacs")

        shutil.copy(ours.ca_cert, trusted)  # the bundle now trusts the PACS's CA: the next retry goes through
        wait_for(lambda: delivery().status == "sent", 30, "delivery once trusted", worker, storescp)
        assert delivery().error == ""
        assert set(received(tmp_path / "pacs")) == {published.sop_instance_uid}
    finally:
        worker.stop()
        storescp.stop()
