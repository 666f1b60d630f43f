"""Auth of a sending system on the DICOMweb endpoints (STOW-RS, QIDO-RS, WADO-RS), by API token or by client
certificate, both set up by an admin (:mod:`worker.db.tokens`):

- ``Authorization: Bearer TOKEN``, a token made by ``dicom-triage tokens add NAME``: the request is NAME's. A
  request that bears an Authorization header is judged by it alone: an unknown token is 401 even with a
  certificate.
- Without that header, over HTTPS with ``web_tls_client_ca``: a client certificate verified against that CA
  (:mod:`worker.web.client_certs`) whose subject ``tokens add-certificate NAME --subject ...`` bound is NAME's; a
  verified certificate whose subject is bound to no system: 403, the reason naming the subject.
- Neither: 401.
"""

from __future__ import annotations

import logging

from fastapi import HTTPException, Request

from worker.db.tokens import certificate_owner, token_owner
from worker.web.client_certs import client_certificate_subject

log = logging.getLogger(__name__)

_AUTH = {"WWW-Authenticate": 'Bearer realm="dicomweb"'}


def require_sending_system(request: Request) -> str:
    """The name of the sending system the request comes from; 401 or 403 otherwise (see the module's note)."""
    header = request.headers.get("authorization")
    subject = client_certificate_subject(request.scope)
    if header is None and subject is not None:
        with request.app.state.web.database.read_session() as session:
            name = certificate_owner(session, subject)
        if name is None:
            log.warning("DICOMweb: refused the client certificate %r: bound to no sending system", subject)
            raise HTTPException(403, f"the client certificate {subject!r} is bound to no sending system "
                                     f"(dicom-triage tokens add-certificate NAME --subject '{subject}')")
        return name
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "a bearer token or a client certificate is required (dicom-triage tokens add NAME)",
                            headers=_AUTH)
    with request.app.state.web.database.read_session() as session:
        name = token_owner(session, token.strip())
    if name is None:
        raise HTTPException(401, "unknown token", headers=_AUTH)
    return name


__all__ = ["require_sending_system"]
