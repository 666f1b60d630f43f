"""The web app over HTTPS (issue 18): ``dicom-triage web --web-tls-cert/--web-tls-key`` with the dev certificates.
Python's TLS client verifying against the dev CA sees HSTS and Secure cookies; headless Chromium (Playwright),
trusting exactly the server's key, logs in and sees the worklist with a Secure session cookie; plain HTTP on the
HTTPS port gets no page; a missing or mismatched certificate file fails the start with a message naming it."""

from __future__ import annotations

import base64
import hashlib
import http.client
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import expect, sync_playwright

from dicom_io.tls import DevCertificates, make_dev_certs
from processes import Child, free_port, triage_command, triage_environment, wait_for
from test_web_browser import CHROMIUM, CHROMIUM_ARGS
from test_web_helpers import PASSWORD, add_users, make_database, make_settings
from worker.web.app import HSTS


def spki_hash(cert: Path) -> str:
    """Chromium's pin of a certificate's public key (base64 SHA-256 of its SubjectPublicKeyInfo)."""
    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def get(url: str, ca: Path) -> http.client.HTTPResponse:
    context = ssl.create_default_context(cafile=str(ca))  # verifies the chain and that the cert names 127.0.0.1
    return urllib.request.urlopen(url, timeout=5, context=context)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, DevCertificates]]:
    tmp = tmp_path_factory.mktemp("https")
    certs = make_dev_certs(tmp / "certs")
    settings = make_settings(tmp)
    database = make_database(settings)
    add_users(database)
    database.dispose()
    port = free_port()
    web = Child(triage_command("web", "--data-dir", str(settings.data_dir), "--web-port", str(port),
                               "--web-tls-cert", str(certs.server_cert), "--web-tls-key", str(certs.server_key)),
                triage_environment(settings.models_dir or tmp / "models"), name="web")
    url = f"https://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with get(url + "/login", certs.ca_cert) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(up, 120, "the HTTPS web app", web, interval=0.25, alive=True)
        yield url, certs
    finally:
        web.stop(timeout=30)


def test_https_sends_hsts_and_secure_cookies(https: tuple[str, DevCertificates]) -> None:
    url, certs = https
    with get(url + "/login", certs.ca_cert) as response:
        assert response.headers["Strict-Transport-Security"] == HSTS
        cookies = response.headers.get_all("Set-Cookie")
    assert cookies and all("; secure" in cookie.lower() for cookie in cookies), cookies


def test_plain_http_on_the_https_port_gets_no_page(https: tuple[str, DevCertificates]) -> None:
    url, _certs = https
    with pytest.raises((OSError, http.client.HTTPException)):
        with urllib.request.urlopen(url.replace("https://", "http://") + "/login", timeout=5) as response:
            assert response.status != 200


def test_login_over_https_in_the_browser(https: tuple[str, DevCertificates]) -> None:
    url, certs = https
    pin = f"--ignore-certificate-errors-spki-list={spki_hash(certs.server_cert)}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, pin])
        try:
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(60_000)
            response = page.goto(url + "/")
            assert response is not None and response.headers.get("strict-transport-security") == HSTS
            expect(page).to_have_url(f"{url}/login?next=%2F")
            page.fill("input[name=username]", "rad")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.get_by_test_id("who")).to_contain_text("rad (radiologist)")
            session = [c for c in context.cookies() if c["name"] == "dt_session"]
            assert len(session) == 1 and session[0]["secure"] and session[0]["httpOnly"]
        finally:
            browser.close()


@pytest.mark.parametrize("broken", ["missing", "mismatched", "client-ca"])
def test_bad_certificate_files_fail_the_start(tmp_path: Path, broken: str) -> None:
    certs = make_dev_certs(tmp_path / "certs")
    other = make_dev_certs(tmp_path / "other")
    cert, key = (tmp_path / "absent.pem", certs.server_key) if broken == "missing" else (
        certs.server_cert, other.server_key if broken == "mismatched" else certs.server_key)
    client_ca = ["--web-tls-client-ca", str(tmp_path / "absent-ca.pem")] if broken == "client-ca" else []
    done = subprocess.run(triage_command("web", "--data-dir", str(tmp_path / "data"), "--web-port", str(free_port()),
                                         "--web-tls-cert", str(cert), "--web-tls-key", str(key), *client_ca),
                          env=triage_environment(tmp_path / "models"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "cannot serve the web app over HTTPS" in done.stderr, done.stderr[-3000:]
    expected = {"missing": str(cert), "mismatched": "cannot be used together",
                "client-ca": f"TLS CA bundle {tmp_path / 'absent-ca.pem'} does not exist"}
    assert expected[broken] in done.stderr
