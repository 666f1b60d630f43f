"""DICOM over TLS (issue 18): dcmtk's storescu with the dev certificates against our listener's TLS port, our SCU
against it, and the bad inputs of a TLS port (plain DICOM, a port scanner, a stalled handshake, a foreign client
certificate, missing or mismatched files)."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from dicom_factory import LISTENER_AE, brain_images, running_listener, storescu, write_files
from dicom_io import synthesis
from dicom_io.scu import AssociationError, echo, send_datasets
from dicom_io.tls import DevCertificates, TLSConfigError, client_context, make_dev_certs, server_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    """Certificates of another CA, which ours does not trust."""
    return make_dev_certs(tmp_path_factory.mktemp("foreign"), organization="someone else's CA")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_files(synthesis.mr_series(brain_images(3), series_description="AX T1 TLS"),
                       tmp_path_factory.mktemp("series"))


def tls_options(certs: DevCertificates, client: DevCertificates | None = None) -> list[str]:
    """storescu's arguments for TLS with ``client``'s certificate (ours by default), trusting our CA."""
    client = client or certs
    return ["+tls", str(client.client_key), str(client.client_cert), "+cf", str(certs.ca_cert)]


def wait_for(predicate, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_storescu_stores_a_series_over_tls(tmp_path: Path, certs: DevCertificates, series: list[Path]) -> None:
    context = server_context(certs.server_cert, certs.server_key, certs.ca_cert, require_client_certificate=True)
    with running_listener(tmp_path, ssl_context=context) as (listener, sink):
        result = storescu(listener.port, series, *tls_options(certs))
        assert result.returncode == 0, result.output
        assert result.statuses == [0x0000] * len(series)
        assert len(sink.stored) == len(series)


def test_plain_storescu_on_the_tls_port_fails_cleanly_and_listener_goes_on(
        tmp_path: Path, certs: DevCertificates, series: list[Path]) -> None:
    context = server_context(certs.server_cert, certs.server_key, certs.ca_cert)
    with running_listener(tmp_path, ssl_context=context, acse_timeout=5) as (listener, sink):
        plain = storescu(listener.port, series[:1], timeout=30)
        assert plain.returncode != 0
        assert plain.statuses == []
        assert wait_for(lambda: any("TLS handshake failed" in r.reason for r in sink.rejections))
        # The next, proper client is served.
        assert storescu(listener.port, series[:1], *tls_options(certs)).statuses == [0x0000]
        assert len(sink.stored) == 1


def test_client_certificate_of_another_ca_is_refused(tmp_path: Path, certs: DevCertificates,
                                                      foreign: DevCertificates, series: list[Path]) -> None:
    context = server_context(certs.server_cert, certs.server_key, certs.ca_cert, require_client_certificate=True)
    with running_listener(tmp_path, ssl_context=context) as (listener, sink):
        result = storescu(listener.port, series[:1], *tls_options(certs, client=foreign))
        assert result.returncode != 0
        assert result.statuses == []
        assert sink.stored == []
        assert wait_for(lambda: any("certificate" in r.reason.lower() for r in sink.rejections))


def test_missing_client_certificate_is_refused_when_required(tmp_path: Path, certs: DevCertificates) -> None:
    context = server_context(certs.server_cert, certs.server_key, certs.ca_cert, require_client_certificate=True)
    with running_listener(tmp_path, ssl_context=context) as (listener, _sink):
        with pytest.raises(AssociationError, match="TLS"):
            echo("127.0.0.1", listener.port, LISTENER_AE, tls=client_context(certs.ca_cert))
        assert echo("127.0.0.1", listener.port, LISTENER_AE,
                    tls=client_context(certs.ca_cert, certs.client_cert, certs.client_key)) == 0x0000


def test_plain_and_tls_listeners_side_by_side(tmp_path: Path, certs: DevCertificates, series: list[Path]) -> None:
    context = server_context(certs.server_cert, certs.server_key, certs.ca_cert)
    with running_listener(tmp_path / "plain") as (plain, plain_sink), \
            running_listener(tmp_path / "tls", ssl_context=context) as (secure, secure_sink):
        assert storescu(plain.port, series).statuses == [0x0000] * len(series)
        assert storescu(secure.port, series, *tls_options(certs)).statuses == [0x0000] * len(series)
        assert send_datasets(series[:1], "127.0.0.1", secure.port, LISTENER_AE,
                             tls=client_context(certs.ca_cert)) == [0x0000]
        assert (len(plain_sink.stored), len(secure_sink.stored)) == (len(series), len(series) + 1)


def test_our_scu_refuses_a_listener_with_an_untrusted_certificate(tmp_path: Path, certs: DevCertificates,
                                                                 foreign: DevCertificates) -> None:
    context = server_context(foreign.server_cert, foreign.server_key)
    with running_listener(tmp_path, ssl_context=context) as (listener, sink):
        with pytest.raises(AssociationError, match="certificate verify failed|unable to get local issuer"):
            echo("127.0.0.1", listener.port, LISTENER_AE, tls=client_context(certs.ca_cert))
        assert sink.stored == []


def test_stalled_handshake_is_dropped_and_does_not_block_others(tmp_path: Path, certs: DevCertificates) -> None:
    context = server_context(certs.server_cert, certs.server_key, certs.ca_cert)
    with running_listener(tmp_path, ssl_context=context, acse_timeout=2, max_associations=1) as (listener, sink):
        with socket.create_connection(("127.0.0.1", listener.port)) as stalled:
            # While it holds its connection without a ClientHello, another client is served at once.
            started = time.monotonic()
            assert echo("127.0.0.1", listener.port, LISTENER_AE, tls=client_context(certs.ca_cert)) == 0x0000
            assert time.monotonic() - started < 2
            assert wait_for(lambda: any("no TLS handshake within 2 s" in r.reason for r in sink.rejections))
            stalled.settimeout(5)
            assert stalled.recv(1) == b""  # the listener closed it


def test_port_scanner_and_http_on_the_tls_port(tmp_path: Path, certs: DevCertificates) -> None:
    context = server_context(certs.server_cert, certs.server_key, certs.ca_cert)
    with running_listener(tmp_path, ssl_context=context) as (listener, sink):
        with socket.create_connection(("127.0.0.1", listener.port)):
            pass  # connect and close at once, as a port scanner does
        with socket.create_connection(("127.0.0.1", listener.port)) as http:
            http.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            http.settimeout(5)
            assert http.recv(1024) == b""
        assert wait_for(lambda: len(sink.rejections) >= 2)
        assert echo("127.0.0.1", listener.port, LISTENER_AE, tls=client_context(certs.ca_cert)) == 0x0000


def test_missing_and_mismatched_files_are_named(tmp_path: Path, certs: DevCertificates,
                                                foreign: DevCertificates) -> None:
    with pytest.raises(TLSConfigError, match=f"certificate {tmp_path / 'absent.pem'} does not exist"):
        server_context(tmp_path / "absent.pem", certs.server_key)
    with pytest.raises(TLSConfigError, match="cannot be used together"):
        server_context(certs.server_cert, foreign.server_key)
    with pytest.raises(TLSConfigError, match="CA bundle"):
        client_context(tmp_path / "absent-ca.pem")
    with pytest.raises(TLSConfigError, match="needs a CA bundle"):
        server_context(certs.server_cert, certs.server_key, require_client_certificate=True)


def test_calling_ae_bound_to_a_certificate_subject(tmp_path: Path, certs: DevCertificates,
                                                   series: list[Path]) -> None:
    context = server_context(certs.server_cert, certs.server_key, certs.ca_cert)
    subject = "O=dicom-triage development CA,CN=dicom-triage-client"
    with running_listener(tmp_path / "tls", ssl_context=context, required_subjects={"MODALITY": subject}) \
            as (listener, sink):
        with_cert = storescu(listener.port, series[:1], *tls_options(certs), calling_ae="MODALITY")
        assert with_cert.statuses == [0x0000], with_cert.output
        anonymous = storescu(listener.port, series[:1], "+tla", "+cf", str(certs.ca_cert), calling_ae="MODALITY")
        assert anonymous.statuses == []
        assert wait_for(lambda: any("must present the client certificate" in r.reason for r in sink.rejections))
    with running_listener(tmp_path / "plain", required_subjects={"MODALITY": subject}) as (plain, plain_sink):
        assert storescu(plain.port, series[:1], calling_ae="MODALITY").statuses == []
        assert plain_sink.stored == []


def test_expired_and_self_signed_certificates_are_refused(tmp_path: Path, certs: DevCertificates,
                                                          foreign: DevCertificates, series: list[Path]) -> None:
    expired = make_dev_certs(tmp_path / "expired", days=0)  # its CA, server and client certificates all expired
    # An expired server certificate from a CA we trust: our SCU refuses it.
    with running_listener(tmp_path / "a", ssl_context=server_context(expired.server_cert, expired.server_key)) \
            as (listener, _sink):
        with pytest.raises(AssociationError, match="certificate has expired"):
            echo("127.0.0.1", listener.port, LISTENER_AE, tls=client_context(expired.ca_cert))
    # A self-signed server certificate (another CA's own): refused too.
    with running_listener(tmp_path / "b", ssl_context=server_context(foreign.ca_cert, foreign.ca_key)) \
            as (listener, _sink):
        with pytest.raises(AssociationError, match="self.signed certificate"):
            echo("127.0.0.1", listener.port, LISTENER_AE, tls=client_context(certs.ca_cert))
    # An expired client certificate is refused by a listener that trusts its CA and requires one.
    context = server_context(certs.server_cert, certs.server_key, expired.ca_cert, require_client_certificate=True)
    with running_listener(tmp_path / "c", ssl_context=context) as (listener, sink):
        result = storescu(listener.port, series[:1], "+tls", str(expired.client_key), str(expired.client_cert),
                          "+cf", str(certs.ca_cert))
        assert result.statuses == [] and result.returncode != 0
        assert wait_for(lambda: any("expired" in r.reason for r in sink.rejections)), sink.rejections
        assert sink.stored == []
