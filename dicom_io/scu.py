"""Sending to a DICOM peer: C-STORE of datasets or files, and C-ECHO. Every association sets TCP_NODELAY.

Given an SSL context (:func:`dicom_io.tls.client_context`) the association goes over TLS or not at all: a peer whose
certificate does not verify is an :class:`AssociationError` naming OpenSSL's reason, never a plain retry.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from dicom_io.network import TCP_NODELAY_HANDLER

DEFAULT_CALLING_AE = "DICOM_TRIAGE"
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


class AssociationError(ConnectionError):
    """No association could be made, or it ended before every instance was answered."""

    def __init__(self, message: str, statuses: Sequence[int] = ()) -> None:
        super().__init__(message)
        #: Statuses of the instances answered before the failure, in order.
        self.statuses = list(statuses)


class _PeerRefusal:
    """The A-ASSOCIATE-RJ or A-ABORT PDU the peer sent while we negotiated, if any.

    pynetdicom (3.0) can lose a rejection: its reactor thread decodes the A-ASSOCIATE-RJ and closes the socket, and
    when that happens before the requesting thread checks the socket, ``associate()`` reports a failed connection
    with no primitive. The PDU event still fires, so we keep the peer's answer from it.
    """

    def __init__(self) -> None:
        self.pdu: A_ASSOCIATE_RJ | A_ABORT_RQ | None = None

    def handler(self) -> tuple[evt.NotificationEvent, object]:
        return (evt.EVT_PDU_RECV, self._record)

    def _record(self, event: Event) -> None:
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, (A_ASSOCIATE_RJ, A_ABORT_RQ)) and self.pdu is None:
            self.pdu = pdu


class _HandshakeRecord:
    """The TLS error on an association we open: pynetdicom logs it and reports only a failed or closed connection.
    The context's socket class keeps it (one context per association, so nothing is shared). With TLS 1.3 a server
    refusing our certificate says so after the handshake, on our first read: reads are watched too."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.error: str | None = None
        record = self

        class RecordingSocket(ssl.SSLSocket):
            def connect(self, address: object) -> None:  # type: ignore[override]
                try:
                    super().connect(address)  # type: ignore[arg-type]
                except OSError as exc:
                    record.note(exc)
                    raise

            def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
                try:
                    return super().recv(buflen, flags)
                except ssl.SSLError as exc:
                    record.note(exc)
                    raise

        context.sslsocket_class = RecordingSocket

    def note(self, exc: OSError) -> None:
        if self.error is not None:
            return
        if isinstance(exc, ssl.SSLCertVerificationError):
            self.error = f"TLS handshake failed: {exc.verify_message or exc.reason}"
        elif isinstance(exc, ssl.SSLError):
            self.error = f"TLS handshake failed: {exc.reason or exc}"
        else:
            self.error = f"TLS connection failed: {exc}"


def describe_failure(assoc: Association, refusal: _PeerRefusal, handshake: _HandshakeRecord | None = None) -> str:
    """Why an association from :func:`associate` failed or ended, in words (for the ``AssociationError``)."""
    if handshake is not None and handshake.error is not None:
        return handshake.error
    if isinstance(refusal.pdu, A_ASSOCIATE_RJ):
        answer = refusal.pdu.to_primitive()  # the primitive's wording, as when pynetdicom itself reports it
        return f"association rejected ({answer.result_str}, {answer.source_str}: {answer.reason_str})"
    if assoc.rejected_contexts and not assoc.accepted_contexts:  # pynetdicom aborts such an association itself
        refused = ", ".join(sorted({str(c.abstract_syntax.name) for c in assoc.rejected_contexts}))
        return f"association aborted: the peer accepted no presentation context (refused {refused})"
    if isinstance(refusal.pdu, A_ABORT_RQ):
        return f"association aborted by the peer ({refusal.pdu.source_str}: {refusal.pdu.reason_str})"
    if assoc.acceptor.primitive is None:  # the peer never answered our A-ASSOCIATE-RQ
        return "no association (connection refused, timed out or aborted)"
    return "association aborted"


def associate(ae: AE, host: str, port: int, called_ae: str, tls: ssl.SSLContext | None,
              ext_neg: Sequence[object] = (), evt_handlers: Sequence[tuple[object, object]] = ()) \
        -> tuple[Association, _PeerRefusal, _HandshakeRecord | None]:
    """Request an association of ``ae`` (from :func:`new_ae`, its contexts added) with TCP_NODELAY, over TLS when
    ``tls`` is given (never falling back to plain TCP); the refusal and handshake records feed
    :func:`describe_failure`. Every SCU of this package (storage, echo, query/retrieve) opens its associations so.
    ``ext_neg`` (e.g. SCP/SCU role selection for C-GET) and ``evt_handlers`` go to pynetdicom as they are."""
    refusal = _PeerRefusal()
    handshake = _HandshakeRecord(tls) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae,
                         evt_handlers=[TCP_NODELAY_HANDLER, refusal.handler(), *evt_handlers],
                         ext_neg=list(ext_neg) or None, tls_args=(tls, host) if tls is not None else None)
    _leave_responses_to_their_request(assoc)
    return assoc, refusal, handshake


def _leave_responses_to_their_request(assoc: Association) -> None:
    """Keep the association's reactor from taking a DIMSE response off the queue: only a ``send_*`` call waits for
    a response, and the reactor, which serves requests, drops any other message ("Received unexpected C-STORE
    service message").

    pynetdicom 3.0 pauses its reactor around each ``send_*``, but a second call made right after the first can find
    the reactor still marked paused from the first (it has been let go and not yet run), send its request, and lose
    the response to the reactor when it does run: the call then waits out the DIMSE timeout (120 s) and the
    association is aborted. CI caught it on a loaded 2-core machine, two C-STOREs refused at once by our listener.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False):  # type: ignore[no-untyped-def]
        if not block:  # the reactor's poll; a send_* call blocks
            _, message = dimse.peek_msg()
            if message is None or not message.is_valid_request:
                return None, None
        return take(block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


def _contexts_for(items: Sequence[tuple[str, str]]) -> list[PresentationContext]:
    """One context per SOP class and transfer syntax; native syntaxes also offer the other native ones."""
    wanted: dict[str, list[str]] = {}
    for sop_class, syntax in items:
        syntaxes = wanted.setdefault(sop_class, [])
        for candidate in (syntax, *(_NATIVE_SYNTAXES if syntax in _NATIVE_SYNTAXES else ())):
            if candidate not in syntaxes:
                syntaxes.append(candidate)
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntaxes in wanted.items() for syntax in syntaxes]
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} SOP class/transfer syntax pairs exceed the {_MAX_CONTEXTS} contexts allowed")
    return contexts


def _identify(item: Dataset | Path) -> tuple[str, str]:
    ds = item if isinstance(item, Dataset) else dcmread(item, stop_before_pixels=True)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not syntax:
        raise ValueError(f"{'dataset' if isinstance(item, Dataset) else item}: no file meta Transfer Syntax UID")
    return str(ds.SOPClassUID), str(syntax)


def new_ae(calling_ae: str) -> AE:
    """An application entity for one outgoing association, with our time-outs."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = 30  # a peer that never answers the TCP handshake must not hold us for minutes
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    return ae


def send_datasets(
    datasets_or_paths: Iterable[Dataset | Path | str],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = DEFAULT_CALLING_AE,
    max_pdu_size: int = 0,
    tls: ssl.SSLContext | None = None,
) -> list[int]:
    """C-STORE every dataset or file on one association and return each response's status, in order.

    With ``tls`` (a context used for this association only) the association is made over TLS.

    Raises :class:`AssociationError` when the association cannot be made or breaks before all are answered
    (its ``statuses`` hold the answers received so far).
    """
    items = [item if isinstance(item, Dataset) else Path(item) for item in datasets_or_paths]
    if not items:
        return []
    ae = new_ae(calling_ae)
    ae.maximum_pdu_size = max_pdu_size
    ae.requested_contexts = _contexts_for([_identify(item) for item in items])
    assoc, refusal, handshake = associate(ae, host, port, called_ae, tls)
    if not assoc.is_established:
        raise AssociationError(f"{called_ae}@{host}:{port}: {describe_failure(assoc, refusal, handshake)}")
    statuses: list[int] = []
    try:
        for item in items:
            response = assoc.send_c_store(item)
            if "Status" not in response:
                raise AssociationError(
                    f"{called_ae}@{host}:{port}: no response to instance {len(statuses) + 1} of {len(items)} "
                    f"({describe_failure(assoc, refusal)})",
                    statuses,
                )
            statuses.append(int(response.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def echo(host: str, port: int, called_ae: str, calling_ae: str = DEFAULT_CALLING_AE,
         tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO the peer (over TLS with ``tls``) and return its status; raises :class:`AssociationError` when it
    cannot be reached."""
    ae = new_ae(calling_ae)
    ae.add_requested_context(Verification)
    assoc, refusal, handshake = associate(ae, host, port, called_ae, tls)
    if not assoc.is_established:
        raise AssociationError(f"{called_ae}@{host}:{port}: {describe_failure(assoc, refusal, handshake)}")
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        raise AssociationError(f"{called_ae}@{host}:{port}: no response to C-ECHO")
    return int(response.Status)
