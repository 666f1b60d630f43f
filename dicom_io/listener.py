"""The Storage SCP: receives instances from a PACS, validates them and hands them to an :class:`InstanceSink`.

The sink (the worker) archives each instance and commits its row before returning success, so a success status
on the wire means the instance is durable. Pixel data is not decoded here: validation only compares what the
header declares with what arrived (see :mod:`dicom_io.validation`).

Handlers run on pynetdicom's per-association threads, so ``InstanceSink`` implementations must be thread-safe.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.archive import free_bytes
from dicom_io.network import TCP_NODELAY_HANDLER
from dicom_io.reactor import EventDrivenRequestHandler
from dicom_io.reading import read_received
from dicom_io.tls import peer_subject
from dicom_io.validation import STATUS_CANNOT_UNDERSTAND, InvalidInstance, validate_instance

LOGGER = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
#: "Processing failure": the sink could not store an instance for a reason other than the data or the disk.
STATUS_PROCESSING_FAILURE = 0x0110

#: Transfer syntaxes pydicom can decode with pylibjpeg, openjpeg and pyjpegls, uncompressed ones first.
NATIVE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)
COMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

#: Storage SOP classes we accept whose instances must carry Pixel Data.
IMAGE_STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}
#: Structured Report SOP classes we accept (round trips of our own results).
SR_STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
}


# The received bytes of each dataset while its sink.accept() runs, by id(): see received_file().
_RECEIVED: dict[int, tuple[Dataset, bytes]] = {}


def validate_file_instance(ds: Dataset) -> None:
    """Raise :class:`InvalidInstance` unless an instance that came as a Part 10 file (a STOW-RS part, a WADO-RS
    response) meets the rules a C-STORE's does: its own SOP Class and Instance UIDs stand for the request's, its
    File Meta Information's Transfer Syntax for the presentation context's."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not syntax:
        raise InvalidInstance(STATUS_CANNOT_UNDERSTAND, "no File Meta Information Transfer Syntax UID")
    sop_class = str(ds.get("SOPClassUID", ""))
    validate_instance(ds, sop_class_uid=sop_class, sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                      transfer_syntax=UID(syntax), is_image=sop_class in IMAGE_STORAGE_SOP_CLASSES)


def received_file(ds: Dataset) -> bytes | None:
    """The Part 10 file of ``ds`` exactly as received (our file meta, then the peer's encoded data set).

    Available while the sink's ``accept(ds, ...)`` runs, for ``Archive.store(ds, encoded=received_file(ds))``:
    writing these bytes costs a fraction of re-encoding ``ds``. None for any other dataset; a sink that changes
    ``ds`` before storing it must not pass them.
    """
    entry = _RECEIVED.get(id(ds))
    return entry[1] if entry is not None and entry[0] is ds else None


def _element(group_element: int, vr: bytes, value: bytes) -> bytes:
    # Explicit VR Little Endian; OB has a reserved word and a 4-byte length, the short VRs a 2-byte length.
    tag = struct.pack("<HH", group_element >> 16, group_element & 0xFFFF)
    if vr == b"OB":
        return tag + vr + struct.pack("<HI", 0, len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _even(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii", "replace")
    return value + pad if len(value) % 2 else value


_IMPLEMENTATION = _element(0x00020012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")) + _element(
    0x00020013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")
)


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """The Part 10 preamble, prefix and File Meta Information of a received instance.

    The same elements as pynetdicom's ``event.file_meta`` plus Source Application Entity Title, encoded directly:
    building and writing a pydicom ``FileMetaDataset`` cost more than half a millisecond per instance.
    """
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _even(sop_class_uid, b"\x00")),
            _element(0x00020003, b"UI", _even(sop_instance_uid, b"\x00")),
            _element(0x00020010, b"UI", _even(transfer_syntax, b"\x00")),
            _IMPLEMENTATION,
            _element(0x00020016, b"AE", _even(source_ae, b" ")),
        )
    )
    return b"\x00" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


class InstanceSink(Protocol):
    """What the listener hands received instances to (implemented by the worker). Must be thread-safe."""

    def accept(self, ds: Dataset, calling_ae: str) -> int:
        """Store ``ds`` durably (archive and database row) and return the DIMSE status to answer.

        ``ds.file_meta`` holds the transfer syntax the instance arrived in and :func:`received_file` its bytes
        as received. Return ``0x0000`` only once the
        instance is committed. May raise ``OSError`` (``ENOSPC`` answers 0xA700) or any other exception (0x0110).
        """
        ...

    def reject(self, calling_ae: str, sop_instance_uid: str | None, reason: str) -> None:
        """Record that an instance (or, with ``sop_instance_uid`` None, an association) was refused."""
        ...


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO: at most 64 characters
    return status


class StoreHandler:
    """Answers C-STORE requests: validates each instance, watches the archive's free space and hands it to the
    sink, which stores it durably before the success status goes back.

    The :class:`StorageListener`'s handler, and the one a C-GET's association uses for the instances its peer
    sends back (:func:`dicom_io.retrieve.get_series`): both ingest paths are this one. ``only_series``, where given,
    refuses (0x0110, recorded with the sink) a valid instance of any other series: a peer answering a C-GET with
    instances nobody asked for.
    """

    def __init__(self, sink: InstanceSink, min_free_bytes: int = 0, archive_root: Path | None = None) -> None:
        if min_free_bytes > 0 and archive_root is None:
            raise ValueError("min_free_bytes needs archive_root: the file system whose free space is watched")
        self.sink = sink
        self.min_free_bytes = min_free_bytes
        self.archive_root = archive_root

    def refuse(self, calling_ae: str, sop_instance_uid: str | None, code: int, reason: str) -> Dataset:
        """Record the refusal with the sink and return the status to answer."""
        LOGGER.warning("refused %s from %s: 0x%04X %s", sop_instance_uid or "instance", calling_ae, code, reason)
        try:
            self.sink.reject(calling_ae, sop_instance_uid, reason)
        except Exception:  # the refusal itself must still reach the peer
            LOGGER.exception("sink could not record the rejection of %s from %s", sop_instance_uid, calling_ae)
        return _status(code, reason)

    def __call__(self, event: Event, calling_ae: str, only_series: str | None = None,
                 strays: list[str] | None = None) -> Dataset | int:
        """The status answering the C-STORE request of ``event``, sent by ``calling_ae``; an instance refused for
        not being of ``only_series`` has its SOP Instance UID added to ``strays``."""
        request = event.request
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "") or None
        transfer_syntax = UID(event.context.transfer_syntax)
        try:
            meta = encode_file_meta(sop_class, sop_instance or "", transfer_syntax, calling_ae)
            received = meta + event.encoded_dataset(False)
            # Elements stay raw (undecoded) until something reads them; sequence depth is checked on the way.
            ds = read_received(received, transfer_syntax)
            validate_instance(
                ds,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance or "",
                transfer_syntax=transfer_syntax,
                is_image=sop_class in IMAGE_STORAGE_SOP_CLASSES,
            )
        except InvalidInstance as exc:
            return self.refuse(calling_ae, sop_instance, exc.status, exc.reason)
        except Exception as exc:  # pydicom raises many types for malformed streams
            reason = f"cannot parse dataset: {type(exc).__name__}: {exc}"
            return self.refuse(calling_ae, sop_instance, STATUS_CANNOT_UNDERSTAND, reason)

        if only_series is not None and str(ds.get("SeriesInstanceUID", "")) != only_series:
            reason = (f"instance of series {ds.get('SeriesInstanceUID', '')}, not of the series asked for "
                      f"({only_series})")
            if strays is not None:
                strays.append(sop_instance or "")
            return self.refuse(calling_ae, sop_instance, STATUS_PROCESSING_FAILURE, reason)

        if self.archive_root is not None and self.min_free_bytes > 0:
            free = free_bytes(self.archive_root)
            if free < self.min_free_bytes:
                reason = f"archive disk has {free} bytes free, below the {self.min_free_bytes} byte watermark"
                return self.refuse(calling_ae, sop_instance, STATUS_OUT_OF_RESOURCES, reason)

        _RECEIVED[id(ds)] = (ds, received)
        try:
            return self.sink.accept(ds, calling_ae)
        except OSError as exc:
            code = STATUS_OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else STATUS_PROCESSING_FAILURE
            return self.refuse(calling_ae, sop_instance, code, f"cannot store: {exc}")
        except Exception as exc:
            LOGGER.exception("sink failed on %s from %s", sop_instance, calling_ae)
            return self.refuse(calling_ae, sop_instance, STATUS_PROCESSING_FAILURE, f"cannot store: {exc}")
        finally:
            del _RECEIVED[id(ds)]


class _HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved from the accepting thread to the connection's own.

    pynetdicom completes the handshake inside ``accept``: one client that connects and then stalls (a port scanner,
    a half-open connection) would hold every other connection up. Here the accepting thread only wraps the socket;
    the connection's thread shakes hands within ``handshake_timeout`` seconds and drops a client that fails (plain
    DICOM or HTTP on the TLS port, an untrusted or missing client certificate), reporting it through
    ``on_handshake_failure(address, reason)``.
    """

    handshake_timeout: float = 30.0
    on_handshake_failure: Any = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = self.socket.accept()
        if self.ssl_context is not None:
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True,
                                                         do_handshake_on_connect=False)
        return client_socket, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            timeout = request.gettimeout()
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                request.settimeout(timeout)
            except (OSError, ValueError) as exc:  # ssl.SSLError, socket.timeout, a reset connection
                if isinstance(exc, TimeoutError):
                    reason = f"no TLS handshake within {self.handshake_timeout:g} s"
                elif isinstance(exc, ssl.SSLCertVerificationError):  # the client's certificate: say what is wrong
                    reason = f"TLS handshake failed: client certificate: {exc.verify_message or exc.reason}"
                else:
                    reason = f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
                if self.on_handshake_failure is not None:
                    self.on_handshake_failure(client_address, reason)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class _SharedSocketServer(_HandshakeInThreadServer):
    """pynetdicom's threaded server accepting on a listening socket it is given, which other processes (listeners
    started by one supervisor) accept on too: whichever is free takes the next connection. SO_REUSEPORT instead
    hands each connection to one process by a hash of the peer's port, regardless of load, so 8 associations landed
    6 to 2 in some runs (and those hashed to a stopped process waited on it)."""

    def __init__(self, *args: Any, listening_socket: socket.socket, **kwargs: Any) -> None:
        self._listening_socket = listening_socket
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.close()  # the one TCPServer made for us
        self.socket = self._listening_socket
        # Every process's select() wakes for a connection and all but one find it taken: a blocking accept() would
        # then wait for the next connection and hold shutdown() up until it came.
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # it listens already

    def server_close(self) -> None:
        # Only our descriptor: shutdown() would stop the socket listening for every process that shares it.
        self.socket.close()


class StorageListener:
    """A Verification and Storage SCP on ``host:port`` (``port`` 0 picks a free port).

    ``allowed_calling_aes`` empty accepts any caller; otherwise others get A-ASSOCIATE-RJ (permanent,
    calling AE title not recognised). More than ``max_associations`` at once get A-ASSOCIATE-RJ (transient,
    local limit exceeded). When the archive's file system has less than ``min_free_bytes`` free, stores answer
    0xA700 (out of resources) and nothing is handed to the sink. ``listening_socket``, a bound and listening TCP
    socket (``host`` and ``port`` are then its own), is accepted on instead of binding one: processes given the
    same socket share the port, each connection going to a process that is free to accept it.

    With ``ssl_context`` (:func:`dicom_io.tls.server_context`) every connection must complete a TLS handshake within
    ``acse_timeout`` seconds; one that does not is dropped and reported to the sink as a refused association, and
    the others go on. ``required_subjects`` maps calling AE titles to the client certificate subject each must
    present (as :func:`dicom_io.tls.peer_subject` writes it): such an AE coming without that certificate, or over
    plain TCP, is refused.
    """

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        sink: InstanceSink,
        allowed_calling_aes: Iterable[str] = (),
        max_associations: int = 10,
        min_free_bytes: int = 0,
        archive_root: Path | str | None = None,
        max_pdu_size: int = 0,
        acse_timeout: float = 30,
        listening_socket: socket.socket | None = None,
        ssl_context: ssl.SSLContext | None = None,
        required_subjects: dict[str, str] | None = None,
    ) -> None:
        if min_free_bytes > 0 and archive_root is None:
            raise ValueError("min_free_bytes needs archive_root: the file system whose free space is watched")
        self.ae_title = ae_title
        self.host = host
        self.sink = sink
        self.allowed_calling_aes = tuple(a.strip() for a in allowed_calling_aes)
        self.min_free_bytes = min_free_bytes
        self.archive_root = Path(archive_root) if archive_root is not None else None
        self._requested_port = port
        self._listening_socket = listening_socket
        self.ssl_context = ssl_context
        self.required_subjects = {ae.strip(): subject for ae, subject in (required_subjects or {}).items()}
        self._acse_timeout = acse_timeout
        self._server: ThreadedAssociationServer | None = None
        self._stopped = threading.Event()
        #: Accepted associations not yet closed (by id), so that each one's end is reported once.
        self._open: set[int] = set()
        self._open_lock = threading.Lock()
        self._ae = self._build_ae(max_associations, max_pdu_size, acse_timeout)
        self._store = StoreHandler(sink, min_free_bytes, self.archive_root)

    def _build_ae(self, max_associations: int, max_pdu_size: int, acse_timeout: float) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = max_associations
        # 0 = no limit: fewer, larger PDUs mean less per-PDU Python work; the sender still caps its own PDUs.
        ae.maximum_pdu_size = max_pdu_size
        # A connection that never sends a valid A-ASSOCIATE-RQ (a port scanner, HTTP) is closed after this long.
        ae.acse_timeout = acse_timeout
        ae.dimse_timeout = 120
        ae.network_timeout = 120
        ae.require_calling_aet = list(self.allowed_calling_aes)
        ae.add_supported_context(Verification)
        all_syntaxes = list(NATIVE_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES)
        for uid in IMAGE_STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, all_syntaxes)
        for uid in SR_STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, list(NATIVE_TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        """The port listened on (the one picked when constructed with 0); the requested one before start()."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def serving(self) -> bool:
        """Started and not stopped (for readiness checks)."""
        return self._server is not None

    def start(self) -> None:
        """Start serving on background threads and return at once."""
        if self._server is not None:
            raise RuntimeError("listener already started")
        handlers = [
            TCP_NODELAY_HANDLER,
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        self._stopped.clear()
        # make_server's server_class and request_handler are pynetdicom's hooks for custom servers and associations;
        # what start_server does after it (serve on a daemon thread, register the server with its AE, which
        # shutdown() expects) is done here.
        if self._listening_socket is None:
            server = self._ae.make_server((self.host, self._requested_port), evt_handlers=handlers,
                                          ssl_context=self.ssl_context, server_class=_HandshakeInThreadServer,
                                          request_handler=EventDrivenRequestHandler)
        else:
            self.host, port = self._listening_socket.getsockname()[:2]
            server = self._ae.make_server((self.host, port), evt_handlers=handlers, server_class=_SharedSocketServer,
                                          ssl_context=self.ssl_context, request_handler=EventDrivenRequestHandler,
                                          listening_socket=self._listening_socket)
        assert isinstance(server, _HandshakeInThreadServer)
        server.handshake_timeout = self._acse_timeout
        server.on_handshake_failure = self._on_handshake_failure
        threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
        self._ae._servers.append(server)
        self._server = server
        LOGGER.info("listening as %s on %s:%d%s", self.ae_title, self.host, self.port,
                    " (TLS)" if self.ssl_context is not None else "")

    def stop(self) -> None:
        """Stop accepting, end open associations and release the port."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()  # accepts no more; the associations already open would go on until the process ends
            for assoc in server.active_associations:
                # A-ABORT: the peer learns now that what it has not had a success status for must be sent again,
                # and no new store starts while the sink is being closed.
                assoc.abort()
        self._stopped.set()

    def serve_forever(self) -> None:
        """Start (if needed) and block until :meth:`stop` is called from another thread or Ctrl-C."""
        if self._server is None:
            self.start()
        try:
            self._stopped.wait()
        finally:
            self.stop()

    def __enter__(self) -> "StorageListener":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Event handlers (pynetdicom association threads).

    def _report_reject(self, calling_ae: str, sop_instance_uid: str | None, reason: str) -> None:
        try:
            self.sink.reject(calling_ae, sop_instance_uid, reason)
        except Exception:  # the refusal itself must still reach the peer
            LOGGER.exception("sink could not record the rejection of %s from %s", sop_instance_uid, calling_ae)

    def _on_store(self, event: Event) -> Dataset | int:
        return self._store(event, event.assoc.requestor.ae_title)

    def _on_rejected(self, event: Event) -> None:
        calling_ae = event.assoc.requestor.ae_title
        if self.allowed_calling_aes and calling_ae not in self.allowed_calling_aes:
            reason = f"association rejected: calling AE title {calling_ae!r} is not allowed"
        else:
            reason = f"association rejected: more than {self._ae.maximum_associations} concurrent associations"
        LOGGER.warning("%s (from %s)", reason, event.assoc.requestor.address)
        self._report_reject(calling_ae, None, reason)

    def _on_handshake_failure(self, address: Any, reason: str) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        LOGGER.warning("connection from %s dropped: %s", host, reason)
        self._report_reject("", None, f"connection from {host} dropped: {reason}")

    def _subject_refusal(self, event: Event) -> str | None:
        """Why the association's calling AE may not use this connection (its bound certificate is missing)."""
        calling_ae = event.assoc.requestor.ae_title
        required = self.required_subjects.get(calling_ae)
        if required is None:
            return None
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        presented = peer_subject(sock)
        if presented == required:
            return None
        return (f"association aborted: calling AE title {calling_ae!r} must present the client certificate "
                f"{required!r} (presented {presented or 'none'})")

    def _on_accepted(self, event: Event) -> None:
        if (refusal := self._subject_refusal(event)) is not None:
            LOGGER.warning("%s (from %s)", refusal, event.assoc.requestor.address)
            self._report_reject(event.assoc.requestor.ae_title, None, refusal)
            event.assoc.abort()
            return
        # Optional on a sink (not part of InstanceSink): the worker's counts associations for its metrics.
        counted = getattr(self.sink, "association_accepted", None)
        with self._open_lock:
            self._open.add(id(event.assoc))
        if counted is not None:
            counted(event.assoc.requestor.ae_title)
        accepted = {cx.abstract_syntax for cx in event.assoc.accepted_contexts}
        refused = {cx.abstract_syntax for cx in event.assoc.rejected_contexts} - accepted
        if refused:
            # Logged, not recorded: many PACS propose every storage class they know on each association.
            LOGGER.info(
                "from %s: no presentation context for %s", event.assoc.requestor.ae_title, ", ".join(sorted(refused))
            )

    def _on_closed(self, event: Event) -> None:
        # Every association's connection closes (release, abort, time-out), rejected ones too: only the accepted
        # ones were counted open. Optional on a sink, as association_accepted is.
        with self._open_lock:
            if id(event.assoc) not in self._open:
                return
            self._open.discard(id(event.assoc))
        ended = getattr(self.sink, "association_ended", None)
        if ended is not None:
            ended()

    def _on_aborted(self, event: Event) -> None:
        LOGGER.warning(
            "association from %s aborted; instances acknowledged before the abort are kept",
            event.assoc.requestor.ae_title,
        )
