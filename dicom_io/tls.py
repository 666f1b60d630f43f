"""DICOM over TLS (PS3.15 Annex B, the BCP 195 profiles): the SSL contexts of our listener and of the associations
we open, and a throw-away certificate authority for trying it out.

Both sides speak TLS 1.2 or later only. A server context presents our certificate and, given a CA bundle, asks for
(or requires) a client certificate signed by it; a client context always verifies the peer against its CA bundle:
an outgoing association never falls back to plain TCP or to an unverified peer. Host names are not checked (PS3.15
identifies DICOM nodes by certificate, and PACS certificates seldom name the address we were configured with); the
chain to the configured CA is.

:func:`make_dev_certs` writes a CA, a server and a client certificate for a local trial. **Not for production**:
their keys are written unencrypted and the CA signs whatever this function is asked to.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSConfigError(ValueError):
    """A certificate, key or CA file is missing, unreadable or does not match; the message names the file."""


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise TLSConfigError(f"TLS {what} {path} does not exist")
    return path


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    _check_file(cert, "certificate")
    _check_file(key, "private key")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        # OpenSSL's reason: KEY_VALUES_MISMATCH, or a PEM it cannot read.
        raise TLSConfigError(f"TLS certificate {cert} and key {key} cannot be used together: {exc.reason or exc}") \
            from None
    except OSError as exc:
        raise TLSConfigError(f"TLS certificate {cert} or key {key} cannot be read: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    _check_file(ca, "CA bundle")
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"TLS CA bundle {ca} cannot be read: {exc}") from None


def server_context(cert: Path, key: Path, ca: Path | None = None, require_client_certificate: bool = False) \
        -> ssl.SSLContext:
    """The context our listener wraps accepted connections in.

    With ``ca`` a client certificate is asked for and, when given, must chain to it; with
    ``require_client_certificate`` (which needs ``ca``) a client without one is refused during the handshake.
    Raises :class:`TLSConfigError` for a missing or mismatched file.
    """
    if require_client_certificate and ca is None:
        raise TLSConfigError("requiring client certificates needs a CA bundle to check them against")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, Path(cert), Path(key))
    if ca is not None:
        _load_ca(context, Path(ca))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """The context of an association we open: the peer must present a certificate chaining to ``ca``; ``cert``
    and ``key`` (both or neither) are ours for peers that require one."""
    if (cert is None) != (key is None):
        raise TLSConfigError("a client certificate needs both its certificate and its key file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_VERSION
    context.check_hostname = False  # see the module's note; verify_mode stays CERT_REQUIRED
    context.verify_mode = ssl.CERT_REQUIRED
    _load_ca(context, Path(ca))
    if cert is not None and key is not None:
        _load_chain(context, Path(cert), Path(key))
    return context


def peer_subject(sock: object) -> str | None:
    """The verified client certificate's subject as ``O=...,CN=...`` (its attributes in the certificate's order),
    or ``None`` for a plain connection or a client that sent none."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    return certificate_subject(sock.getpeercert())


def certificate_subject(cert: Any) -> str | None:
    """A certificate's subject as ``O=...,CN=...`` (its attributes in the certificate's order), from the dict
    :meth:`ssl.SSLSocket.getpeercert` (or :meth:`ssl.SSLObject.getpeercert`) returns; ``None`` for no certificate.
    The one form every binding of a subject is written in (``dicom_tls_subjects``, ``tokens add-certificate``)."""
    if not cert:
        return None
    parts = [f"{_SHORT_NAMES.get(name, name)}={value}" for rdn in cert.get("subject", ()) for name, value in rdn]
    return ",".join(parts) or None


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                "localityName": "L", "stateOrProvinceName": "ST"}


@dataclass(frozen=True)
class DevCertificates:
    """The files :func:`make_dev_certs` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_dev_certs(directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                   organization: str = "dicom-triage development CA", days: int = 365) -> DevCertificates:
    """Write a local CA and a server and a client certificate signed by it (RSA 2048, PEM) into ``directory``.

    For trying TLS out, not for production (see the module's note). The server certificate names ``hosts``; the
    client certificate's subject is ``CN=dicom-triage-client``. Existing files are replaced. The certificates are
    valid from five minutes ago for ``days`` days: ``days=0`` makes them expired at once (for tests of expiry).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = _new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.COMMON_NAME, "dicom-triage dev CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            server_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            server_names.append(x509.DNSName(host))
    server_pem, server_key_pem = _sign_leaf(ca_cert, ca_key, "dicom-triage-server", ExtendedKeyUsageOID.SERVER_AUTH,
                                            server_names, days)
    client_pem, client_key_pem = _sign_leaf(ca_cert, ca_key, "dicom-triage-client", ExtendedKeyUsageOID.CLIENT_AUTH,
                                            [], days)
    return DevCertificates(
        ca_cert=_write(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
        ca_key=_write(directory / "ca.key", _key_pem(ca_key), private=True),
        server_cert=_write(directory / "server.pem", server_pem),
        server_key=_write(directory / "server.key", server_key_pem, private=True),
        client_cert=_write(directory / "client.pem", client_pem),
        client_key=_write(directory / "client.key", client_key_pem, private=True),
    )


def make_client_cert(certs: DevCertificates, common_name: str, days: int = 365) -> tuple[Path, Path]:
    """Sign another client certificate with the dev CA of ``certs``: subject ``O=<the CA's O>,CN=common_name``;
    written beside the CA as ``client-<common_name>.pem`` and ``.key``, whose paths are returned. Not for
    production (see the module's note)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    cert_pem, key_pem = _sign_leaf(ca_cert, ca_key, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [], days)
    stem = certs.ca_cert.parent / f"client-{common_name}"
    return (_write(stem.with_suffix(".pem"), cert_pem),
            _write(stem.with_suffix(".key"), key_pem, private=True))


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _sign_leaf(ca_cert: Any, ca_key: Any, common_name: str, usage: Any, san: list[Any], days: int) \
        -> tuple[bytes, bytes]:
    """A new key and a certificate for it signed by the CA, subject the CA's organization and ``common_name``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    organization = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


__all__ = ["DevCertificates", "TLSConfigError", "certificate_subject", "client_context", "make_client_cert",
           "make_dev_certs", "peer_subject", "server_context"]
