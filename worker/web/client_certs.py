"""The verified TLS client certificate of a request, for the DICOMweb endpoints' certificate auth.

uvicorn (0.55) does not yet put the peer certificate in the ASGI scope (its ASGI TLS extension work is pending:
Kludex/uvicorn#1119, #3132), so :class:`ClientCertificateProtocol`, uvicorn's h11 protocol, adds it once per
connection, after the handshake, as ``scope["extensions"]["tls"]`` in the shape of the ASGI TLS extension
(``client_cert_chain``: the leaf certificate, PEM) plus ``client_cert_subject``: the subject as
:func:`dicom_io.tls.certificate_subject` writes it (the form admins bind). The TLS layer has verified the
certificate against ``web_tls_client_ca`` by then: one signed by another CA never completes the handshake, so a
certificate present here is a verified one. Delete this module once uvicorn fills the extension itself.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from dicom_io.tls import certificate_subject


class ClientCertificateProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with the client certificate of a TLS connection in each request's scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return
        tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)], "client_cert_name": None,
               "client_cert_error": None, "server_cert": None, "tls_version": None, "cipher_suite": None,
               "client_cert_subject": certificate_subject(ssl_object.getpeercert())}
        app = self.app

        async def with_certificate(scope: Any, receive: Any, send: Any) -> None:
            scope["extensions"] = {**scope.get("extensions", {}), "tls": tls}
            await app(scope, receive, send)

        self.app = with_certificate  # uvicorn calls self.app for each request of this connection


def client_certificate_subject(scope: Any) -> str | None:
    """The verified client certificate's subject of the request whose ASGI scope this is, or None."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    subject = tls.get("client_cert_subject")
    return subject if isinstance(subject, str) else None


__all__ = ["ClientCertificateProtocol", "client_certificate_subject"]
