"""DICOMweb auth by client certificate (issue 19): ``dicom-triage web`` over HTTPS with ``--web-tls-client-ca``, a
sending system bound to a certificate subject by ``tokens add-certificate``. dicomweb-client presenting only that
certificate stores an instance by STOW-RS (its calling AE the system's name) and searches by QIDO-RS; a verified
certificate bound to no system: 403 naming its subject; neither certificate nor token: 401; a token still works;
a certificate from another CA never completes the handshake; the login page still answers a browser-like client
without a certificate. ``tokens remove-certificate`` revokes a binding at once; bad bindings are refused by name."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from dicom_factory import brain_images
from dicom_io.synthesis import mr_series
from dicom_io.tls import make_client_cert, make_dev_certs
from processes import Child, free_port, triage_command, triage_environment, wait_for
from test_stow import BOUNDARY, _multipart, _part_file
from test_web_helpers import make_database, make_settings
from worker.db import Database, Instance

BOUND_SUBJECT = "O=dicom-triage development CA,CN=dicom-triage-client"
UNBOUND_SUBJECT = "O=dicom-triage development CA,CN=unbound-pacs"


def _run_cli(data_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(triage_command("tokens", *args, "--data-dir", str(data_dir)), env=env,
                          capture_output=True, text=True, timeout=120)


def _cli(data_dir: Path, env: dict[str, str], *args: str) -> str:
    done = _run_cli(data_dir, env, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def _context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("certauth")
    certs = make_dev_certs(tmp / "certs")
    unbound = make_client_cert(certs, "unbound-pacs")
    revoked = make_client_cert(certs, "revoked-pacs")
    foreign = make_dev_certs(tmp / "foreign")  # same subject as the bound client, another CA
    settings = make_settings(tmp)
    make_database(settings).dispose()
    env = triage_environment(settings.models_dir or tmp / "models")
    token = _cli(settings.data_dir, env, "add", "token-pacs")
    assert _cli(settings.data_dir, env, "add-certificate", "cert-pacs", "--subject", BOUND_SUBJECT) \
        == f"bound {BOUND_SUBJECT} to cert-pacs"
    port = free_port()
    child = Child(triage_command("web", "--data-dir", str(settings.data_dir), "--web-port", str(port),
                                 "--web-tls-cert", str(certs.server_cert), "--web-tls-key", str(certs.server_key),
                                 "--web-tls-client-ca", str(certs.ca_cert)), env, name="web")
    url = f"https://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/login", verify=_context(certs.ca_cert), timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    database = Database(settings.effective_database_url)
    try:
        wait_for(up, 120, "the HTTPS web app", child, interval=0.25, alive=True)
        yield {"url": url, "certs": certs, "unbound": unbound, "revoked": revoked, "foreign": foreign,
               "token": token, "database": database, "web": child, "data_dir": settings.data_dir, "env": env}
    finally:
        database.dispose()
        child.stop(timeout=30)


def _stow(web: dict[str, Any], ds: pydicom.Dataset, context: ssl.SSLContext, **headers: str) -> httpx.Response:
    return httpx.post(f"{web['url']}/dicomweb/studies", content=_multipart([("application/dicom", _part_file(ds))]),
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                               **headers}, verify=context, timeout=30)


def _stored_by(database: Database, sop_uid: str) -> list[str]:
    with database.session() as session:
        return list(session.scalars(select(Instance.calling_ae).where(Instance.sop_instance_uid == sop_uid)))


def test_a_bound_certificate_alone_stores_by_stow_rs(web: dict[str, Any]) -> None:
    certs = web["certs"]
    series = mr_series(brain_images(1, seed=91), patient_name="Cert^Stow")
    session = requests.Session()
    session.verify, session.cert = str(certs.ca_cert), (str(certs.client_cert), str(certs.client_key))
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, where set, replaces session.verify on each request
    client = DICOMwebClient(f"{web['url']}/dicomweb", session=session)  # no Authorization header
    answer = client.store_instances(series)
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [series[0].SOPInstanceUID]
    assert _stored_by(web["database"], series[0].SOPInstanceUID) == ["cert-pacs"]
    assert client.search_for_studies() == []  # QIDO-RS with the same certificate: no SR of ours yet, but allowed


def test_a_certificate_bound_to_no_system_is_403_naming_its_subject(web: dict[str, Any]) -> None:
    ds = mr_series(brain_images(1, seed=92))[0]
    cert, key = web["unbound"]
    answer = _stow(web, ds, _context(web["certs"].ca_cert, cert, key))
    assert answer.status_code == 403, answer.text
    assert UNBOUND_SUBJECT in answer.json()["detail"] and "add-certificate" in answer.json()["detail"]
    search = httpx.get(f"{web['url']}/dicomweb/studies", verify=_context(web["certs"].ca_cert, cert, key))
    assert search.status_code == 403
    assert _stored_by(web["database"], ds.SOPInstanceUID) == []


def test_no_certificate_and_no_token_is_401_and_a_token_still_works(web: dict[str, Any]) -> None:
    ds = mr_series(brain_images(1, seed=93))[0]
    plain = _context(web["certs"].ca_cert)
    refused = _stow(web, ds, plain)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert _stow(web, ds, plain, Authorization="Bearer not-a-token").status_code == 401
    assert _stored_by(web["database"], ds.SOPInstanceUID) == []
    assert _stow(web, ds, plain, Authorization=f"Bearer {web['token']}").status_code == 200
    assert _stored_by(web["database"], ds.SOPInstanceUID) == ["token-pacs"]


def test_a_wrong_token_is_401_even_with_a_bound_certificate(web: dict[str, Any]) -> None:
    ds = mr_series(brain_images(1, seed=94))[0]
    certs = web["certs"]
    answer = _stow(web, ds, _context(certs.ca_cert, certs.client_cert, certs.client_key),
                   Authorization="Bearer not-a-token")
    assert answer.status_code == 401
    assert _stored_by(web["database"], ds.SOPInstanceUID) == []


def test_a_certificate_from_another_ca_fails_the_handshake(web: dict[str, Any]) -> None:
    ds = mr_series(brain_images(1, seed=95))[0]
    foreign = web["foreign"]
    with pytest.raises(httpx.TransportError):
        _stow(web, ds, _context(web["certs"].ca_cert, foreign.client_cert, foreign.client_key))
    assert _stored_by(web["database"], ds.SOPInstanceUID) == []
    # The server is unharmed: the login page still answers a client without a certificate.
    assert httpx.get(web["url"] + "/login", verify=_context(web["certs"].ca_cert)).status_code == 200


def test_an_admin_binds_and_unbinds_a_subject_and_bad_input_is_refused(web: dict[str, Any]) -> None:
    subject = "O=dicom-triage development CA,CN=revoked-pacs"
    data_dir, env = web["data_dir"], web["env"]
    cert, key = web["revoked"]
    context = _context(web["certs"].ca_cert, cert, key)
    for args, message in ((("add-certificate", "other", "--subject", BOUND_SUBJECT), "is bound to 'cert-pacs'"),
                          (("add-certificate", "x", "--subject", "dicom-triage-client"), "not a certificate subject"),
                          (("add-certificate", " ", "--subject", subject), "has 1 to 64 characters"),
                          (("remove-certificate", "--subject", subject), "no sending system is bound")):
        done = _run_cli(data_dir, env, *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-2000:])
    assert _cli(data_dir, env, "add-certificate", "revoked-pacs", "--subject", subject) \
        == f"bound {subject} to revoked-pacs"
    first = mr_series(brain_images(1, seed=96))[0]
    assert _stow(web, first, context).status_code == 200
    assert _stored_by(web["database"], first.SOPInstanceUID) == ["revoked-pacs"]
    assert _cli(data_dir, env, "remove-certificate", "--subject", subject) \
        == f"removed the binding of {subject} to revoked-pacs"
    second = mr_series(brain_images(1, seed=97))[0]
    assert _stow(web, second, context).status_code == 403  # at once: bindings are read per request
    assert _stored_by(web["database"], second.SOPInstanceUID) == []
