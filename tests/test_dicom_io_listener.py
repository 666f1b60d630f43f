"""dicom_io.listener + scu: dcmtk's storescu and pynetdicom push real and malformed instances to a live listener.

Every bad input of issue 3 that concerns the listener gets a clear DIMSE status (or association refusal), a
recorded rejection, and the listener keeps serving; what was acknowledged is in the archive.
"""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path

import pynetdicom
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
    UltrasoundImageStorage,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from dicom_factory import (
    LISTENER_AE,
    RecordingSink,
    brain_images,
    ct_images,
    nested_sequence,
    running_listener,
    storescu,
    write_files,
)
from dicom_io import synthesis
from dicom_io.archive import Archive
from dicom_io.listener import StorageListener
from dicom_io.network import TCP_NODELAY_HANDLER
from dicom_io.scu import AssociationError, echo, send_datasets
from processes import ROOT, NetworkNamespace
from test_sr_delivery import start_storescp

#: storescu's option that proposes each transfer syntax (JPEG Lossless Process 14 non-SV1 has none: pynetdicom).
STORESCU_PROPOSAL = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}


@pytest.fixture(scope="module")
def mr() -> list[Dataset]:
    return synthesis.mr_series(brain_images(3), series_description="AX T1 POST")


@pytest.fixture(scope="module")
def ct() -> list[Dataset]:
    return synthesis.ct_series(ct_images(2))


def _pixel_bytes(path: Path) -> bytes:
    return dcmread(path)["PixelData"].value


def _assert_still_serving(listener: StorageListener) -> None:
    # A released association's server thread ends just after the A-RELEASE-RP; until then it still counts against
    # max_associations, so a transient "local limit" rejection right after a release is retried briefly.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert echo("127.0.0.1", listener.port, LISTENER_AE) == 0x0000
            return
        except AssociationError as error:
            if "Local limit exceeded" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Accepting good instances.


def test_echo_from_dcmtk_and_pynetdicom(tmp_path: Path) -> None:
    with running_listener(tmp_path) as (listener, _):
        assert echo("127.0.0.1", listener.port, LISTENER_AE) == 0x0000
        done = subprocess.run(
            ["/usr/bin/echoscu", "-aec", LISTENER_AE, "127.0.0.1", str(listener.port)], capture_output=True
        )
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("syntax", list(STORESCU_PROPOSAL), ids=lambda uid: uid.name)
def test_storescu_in_every_transfer_syntax_is_archived_as_received(
    tmp_path: Path, mr: list[Dataset], ct: list[Dataset], syntax: str
) -> None:
    sent = [synthesis.encode(ds, syntax) for ds in (mr[0], ct[0])]
    files = write_files(sent, tmp_path / "out")
    with running_listener(tmp_path) as (listener, sink):
        result = storescu(listener.port, files, STORESCU_PROPOSAL[syntax])
        assert result.statuses == [0x0000, 0x0000], result.output[-2000:]
    assert sink.rejections == []
    for ds, path in zip(sent, files):
        stored = sink.archive.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        archived = dcmread(stored)
        assert archived.file_meta.TransferSyntaxUID == syntax
        assert archived.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert _pixel_bytes(stored) == _pixel_bytes(path)  # not decoded, not re-encoded
        assert archived.PatientID == ds.PatientID


def test_pynetdicom_scu_sends_jpeg_lossless_multiframe_and_sr(tmp_path: Path, mr: list[Dataset]) -> None:
    lossless = synthesis.encode(mr[0], JPEGLossless)
    multiframe = synthesis.multiframe_mr(mr)
    report = dcmread(get_testdata_file("test-SR.dcm"))
    with running_listener(tmp_path) as (listener, sink):
        statuses = send_datasets([lossless, multiframe, report], "127.0.0.1", listener.port, LISTENER_AE)
    assert statuses == [0x0000] * 3
    assert [s.sop_instance_uid for s in sink.stored] == [
        lossless.SOPInstanceUID,
        multiframe.SOPInstanceUID,
        report.SOPInstanceUID,
    ]
    assert sink.stored[0].transfer_syntax_uid == JPEGLossless
    assert int(dcmread(sink.stored[1].path).NumberOfFrames) == len(mr)


def test_send_datasets_accepts_paths_and_reports_a_refused_association(tmp_path: Path, mr: list[Dataset]) -> None:
    files = write_files(mr, tmp_path / "out")
    with running_listener(tmp_path) as (listener, sink):
        assert send_datasets(files, "127.0.0.1", listener.port, LISTENER_AE) == [0x0000] * len(mr)
        port = listener.port
    assert len(list(sink.archive.root.rglob("*.dcm"))) == len(mr)
    with pytest.raises(AssociationError, match="no association"):
        send_datasets(files, "127.0.0.1", port, LISTENER_AE)



_ECHO_EVERY_TIME = """
import collections, sys
from dicom_io.scu import AssociationError, echo
answers = collections.Counter()
for _ in range(int(sys.argv[2])):
    try:
        echo("127.0.0.1", int(sys.argv[1]), "REFUSE")
    except AssociationError as exc:
        answers[str(exc)] += 1
for answer, count in answers.items():
    print(count, answer)
"""


def test_a_rejection_is_reported_as_one_every_time(tmp_path: Path) -> None:
    # dcmtk's storescp answers A-ASSOCIATE-RJ and closes at once: pynetdicom's reactor may close its socket before
    # the requesting thread looks (about one association in five here), and the reason must survive that race.
    netns = NetworkNamespace()
    refusing = None
    try:
        refusing = start_storescp(netns, 11300, tmp_path, "--refuse", ae_title="REFUSE")
        run = netns.run([sys.executable, "-c", _ECHO_EVERY_TIME, "11300", "60"], cwd=ROOT)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.splitlines() == [
            "60 REFUSE@127.0.0.1:11300: association rejected (Rejected Permanent, Service User: No reason given)"
        ]
    finally:
        if refusing is not None:
            refusing.stop()
        netns.close()


# Bad input: data.


def _send_raw(port: int, tmp_path: Path, sop_class: str, sop_instance: str, body: bytes, syntax: str) -> int:
    """C-STORE ``body`` as the dataset bytes, unparsed (pynetdicom streams the file after its meta)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.3.4"
    path = tmp_path / f"raw-{sop_instance}.dcm"
    with path.open("wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(handle, meta, enforce_standard=True)
        handle.write(body)
    ae = AE(ae_title="RAWSCU")
    ae.requested_contexts = [build_context(sop_class, [syntax])]
    previous = pynetdicom._config.STORE_SEND_CHUNKED_DATASET
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
        assert assoc.is_established
        response = assoc.send_c_store(path)
        assoc.release()
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = previous
    return int(response.Status)


def _dataset_bytes(ds: Dataset) -> bytes:
    """The dataset part of ds's file encoding (after preamble and file meta)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    meta_length = struct.unpack("<I", raw[140:144])[0]
    return raw[144 + meta_length :]


def _assert_refused(sink: RecordingSink, sop_instance_uid: str | None, fragment: str) -> None:
    matching = [r for r in sink.rejections if r.sop_instance_uid == sop_instance_uid]
    assert matching, f"no rejection recorded for {sop_instance_uid}: {sink.rejections}"
    assert fragment.lower() in matching[-1].reason.lower(), matching[-1].reason


def test_bytes_that_are_not_dicom(tmp_path: Path) -> None:
    uid = generate_uid()
    garbage = bytes(range(256)) * 64
    with running_listener(tmp_path) as (listener, sink):
        status = _send_raw(listener.port, tmp_path, MRImageStorage, uid, garbage, ExplicitVRLittleEndian)
        assert 0xC000 <= status <= 0xCFFF
        _assert_still_serving(listener)
    assert sink.stored == []
    assert [r.sop_instance_uid for r in sink.rejections] == [uid]


def test_truncated_pixel_data(tmp_path: Path, mr: list[Dataset]) -> None:
    body = _dataset_bytes(mr[0])[:-5000]  # the Pixel Data element's declared length now overruns the stream
    with running_listener(tmp_path) as (listener, sink):
        status = _send_raw(listener.port, tmp_path, MRImageStorage, mr[0].SOPInstanceUID, body, ExplicitVRLittleEndian)
        assert 0xC000 <= status <= 0xCFFF
        _assert_still_serving(listener)
    assert sink.stored == []
    _assert_refused(sink, mr[0].SOPInstanceUID, "pixel data")


def _variant(ds: Dataset, **changes: object) -> Dataset:
    out = synthesis.encode(ds, ExplicitVRLittleEndian)  # a deep copy
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(out, keyword)
        else:
            setattr(out, keyword, value)
    return out


@pytest.mark.parametrize(
    ("changes", "status", "reason"),
    [
        ({"Rows": None}, 0xC001, "Rows is missing"),
        ({"PixelData": None}, 0xC001, "Pixel Data is missing"),
        ({"Rows": 65535, "Columns": 65535, "PixelData": b"\x00" * 8}, 0xC002, "needs"),
        ({"Rows": 300}, 0xC002, "needs"),
        ({"StudyInstanceUID": None}, 0xC001, "StudyInstanceUID is missing"),
    ],
    ids=["rows-missing", "no-pixel-data", "65535x65535-over-8-bytes", "rows-disagree-with-length", "no-study-uid"],
)
def test_invalid_instances_from_storescu_are_refused_and_the_rest_archived(
    tmp_path: Path, mr: list[Dataset], changes: dict[str, object], status: int, reason: str
) -> None:
    bad = _variant(mr[0], **changes)
    files = write_files([mr[1], bad, mr[2]], tmp_path / "out")
    with running_listener(tmp_path) as (listener, sink):
        result = storescu(listener.port, files)
        assert result.statuses == [0x0000, status, 0x0000], result.output[-2000:]
        assert "ErrorComment" in result.output  # the peer is told why, not just the status
        _assert_still_serving(listener)
    assert [s.sop_instance_uid for s in sink.stored] == [mr[1].SOPInstanceUID, mr[2].SOPInstanceUID]
    _assert_refused(sink, bad.SOPInstanceUID, reason)


def test_deeply_nested_sequence(tmp_path: Path, mr: list[Dataset]) -> None:
    bad = _variant(mr[0])
    bad.ContentSequence = nested_sequence(40)
    files = write_files([bad], tmp_path / "out")
    with running_listener(tmp_path) as (listener, sink):
        result = storescu(listener.port, files)
        assert result.statuses == [0xC003], result.output[-2000:]
        _assert_still_serving(listener)
    assert sink.stored == []
    _assert_refused(sink, bad.SOPInstanceUID, "nest deeper")


def test_sequence_nested_beyond_the_parsers_recursion_limit(tmp_path: Path) -> None:
    # 5,000 undefined-length levels, written by hand: pydicom itself cannot write (or read) this deep.
    item_start, item_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    sequence_start, sequence_end = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    depth = 5000
    body = (sequence_start + item_start) * depth + (item_end + sequence_end) * depth
    uid = generate_uid()
    with running_listener(tmp_path) as (listener, sink):
        status = _send_raw(listener.port, tmp_path, MRImageStorage, uid, body, ExplicitVRLittleEndian)
        assert 0xC000 <= status <= 0xCFFF
        _assert_still_serving(listener)
    assert sink.stored == []
    assert [r.sop_instance_uid for r in sink.rejections] == [uid]


def test_unsupported_sop_class_is_refused_at_association(tmp_path: Path, mr: list[Dataset]) -> None:
    ultrasound = _variant(mr[0], SOPClassUID=UltrasoundImageStorage, Modality="US")
    ultrasound.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    files = write_files([ultrasound, mr[1]], tmp_path / "out")
    with running_listener(tmp_path) as (listener, sink):
        result = storescu(listener.port, files, "-R")
        assert "no presentation context" in result.output.lower(), result.output[-2000:]
        assert result.statuses == [0x0000]  # the MR instance after it still went through
        _assert_still_serving(listener)
    assert [s.sop_instance_uid for s in sink.stored] == [mr[1].SOPInstanceUID]


def test_duplicate_sop_instance_uid_is_idempotent(tmp_path: Path, mr: list[Dataset]) -> None:
    files = write_files([mr[0]], tmp_path / "out")
    with running_listener(tmp_path) as (listener, sink):
        assert storescu(listener.port, files).statuses == [0x0000]
        first = sink.stored[0].path.read_bytes()
        assert storescu(listener.port, files).statuses == [0x0000]
    assert [s.duplicate for s in sink.stored] == [False, True]
    assert sink.stored[1].path == sink.stored[0].path
    assert sink.stored[0].path.read_bytes() == first
    assert len(list(sink.archive.root.rglob("*"))) == 3  # study dir, series dir, one file; no temp files


def test_association_aborted_mid_series_keeps_what_was_acknowledged(tmp_path: Path, mr: list[Dataset]) -> None:
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 16384  # the unfinished instance spans several PDUs
    with running_listener(tmp_path) as (listener, sink):
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE)
        assert assoc.is_established
        assert [int(assoc.send_c_store(ds).Status) for ds in mr[:2]] == [0x0000, 0x0000]
        # Send the command and only the first P-DATA PDUs of the third instance, then abort.
        request = C_STORE()
        request.MessageID = 3
        request.AffectedSOPClassUID = MRImageStorage
        request.AffectedSOPInstanceUID = mr[2].SOPInstanceUID
        request.Priority = 2
        request.DataSet = BytesIO(_dataset_bytes(mr[2]))
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        context_id = assoc.accepted_contexts[0].context_id
        pdus = list(message.encode_msg(context_id, 16384))
        assert len(pdus) > 3
        for pdu in pdus[:3]:
            assoc.dul.send_pdu(pdu)
        assoc.abort()
        _assert_still_serving(listener)
    assert [s.sop_instance_uid for s in sink.stored] == [mr[0].SOPInstanceUID, mr[1].SOPInstanceUID]
    for stored in sink.stored:
        assert dcmread(stored.path).pixel_array.shape == (224, 224)
    assert len(list(sink.archive.root.rglob("*.dcm"))) == 2


# Bad input: association and resources.


def test_calling_ae_not_on_the_list_is_rejected(tmp_path: Path, mr: list[Dataset]) -> None:
    files = write_files([mr[0]], tmp_path / "out")
    with running_listener(tmp_path, allowed_calling_aes=("PACS1", "PACS2")) as (listener, sink):
        refused = storescu(listener.port, files, calling_ae="INTRUDER")
        assert "Association Rejected" in refused.output, refused.output[-2000:]
        assert "Calling AE Title Not Recognized" in refused.output
        assert refused.statuses == []
        with pytest.raises(AssociationError, match="rejected"):
            echo("127.0.0.1", listener.port, LISTENER_AE, calling_ae="INTRUDER")
        assert storescu(listener.port, files, calling_ae="PACS2").statuses == [0x0000]
    assert [s.sop_instance_uid for s in sink.stored] == [mr[0].SOPInstanceUID]
    assert sink.rejections[0].calling_ae == "INTRUDER"
    assert "not allowed" in sink.rejections[0].reason


def test_more_than_max_associations_are_rejected_then_served(tmp_path: Path) -> None:
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    with running_listener(tmp_path, max_associations=2) as (listener, sink):
        held = [ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE) for _ in range(2)]
        assert all(a.is_established for a in held)
        with pytest.raises(AssociationError, match="Local limit exceeded"):
            echo("127.0.0.1", listener.port, LISTENER_AE)
        for assoc in held:
            assoc.release()
        _assert_still_serving(listener)
    assert "more than 2 concurrent associations" in sink.rejections[0].reason


def test_connections_cut_without_release_or_abort_free_their_slots(tmp_path: Path) -> None:
    """A sender that vanishes (crash, cable) sends no A-ABORT: the closed socket alone must end its association."""
    ae = AE(ae_title="VANISHER")
    ae.add_requested_context("1.2.840.10008.1.1")
    with running_listener(tmp_path, max_associations=2) as (listener, sink):
        for assoc in [ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE) for _ in range(2)]:
            assert assoc.is_established
            assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # the TCP connection ends, nothing more is said
            assoc.dul.socket.close()
        # Keep each association that gets in and retry only for the rest: aborting a half-won pair and retrying
        # both can keep colliding with the slot the abort has not yet freed on a loaded machine.
        deadline = time.monotonic() + 20  # well under the 120 s network timeout the slots would otherwise wait for
        held = []
        while len(held) < 2 and time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE)
            if assoc.is_established:
                held.append(assoc)
            else:
                time.sleep(0.1)
        assert len(held) == 2, "the vanished senders' slots were not freed"
        for assoc in held:
            assoc.release()
        _assert_still_serving(listener)


def test_free_disk_below_watermark_answers_out_of_resources(tmp_path: Path, mr: list[Dataset]) -> None:
    files = write_files([mr[0]], tmp_path / "out")
    free = Archive(tmp_path / "archive").free_bytes()
    with running_listener(tmp_path, min_free_bytes=free + 2**40) as (listener, sink):
        result = storescu(listener.port, files)
        assert result.statuses == [0xA700], result.output[-2000:]
        _assert_still_serving(listener)
    assert sink.stored == []
    _assert_refused(sink, mr[0].SOPInstanceUID, "watermark")


class _FailingSink(RecordingSink):
    def __init__(self, archive: Archive, error: Exception) -> None:
        super().__init__(archive)
        self.error = error

    def accept(self, ds: Dataset, calling_ae: str) -> int:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [(OSError(errno.ENOSPC, "No space left on device"), 0xA700), (RuntimeError("database is down"), 0x0110)],
    ids=["disk-full-while-writing", "sink-fails"],
)
def test_sink_failure_is_a_failure_status_not_a_crash(
    tmp_path: Path, mr: list[Dataset], error: Exception, status: int
) -> None:
    sink = _FailingSink(Archive(tmp_path / "archive"), error)
    listener = StorageListener(LISTENER_AE, "127.0.0.1", 0, sink)
    with listener:
        assert send_datasets(mr[:2], "127.0.0.1", listener.port, LISTENER_AE) == [status, status]
        _assert_still_serving(listener)
    assert len(sink.rejections) == 2


def test_watermark_needs_an_archive_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="archive_root"):
        StorageListener(LISTENER_AE, "127.0.0.1", 0, RecordingSink(Archive(tmp_path)), min_free_bytes=1)


def test_concurrent_associations_all_land(tmp_path: Path, mr: list[Dataset]) -> None:
    series = [synthesis.mr_series(brain_images(2, seed=seed)) for seed in range(4)]
    with running_listener(tmp_path, max_associations=4) as (listener, sink):
        results: list[list[int]] = [[] for _ in series]

        def push(index: int) -> None:
            results[index] = send_datasets(series[index], "127.0.0.1", listener.port, LISTENER_AE)

        threads = [threading.Thread(target=push, args=(i,)) for i in range(len(series))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert results == [[0x0000, 0x0000]] * len(series)
    assert len(list(sink.archive.root.rglob("*.dcm"))) == 8


def test_tcp_nodelay_is_set_on_both_ends(tmp_path: Path) -> None:

    ae = AE(ae_title="NODELAY")
    ae.add_requested_context("1.2.840.10008.1.1")
    with running_listener(tmp_path) as (listener, _):
        plain = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE)
        assert plain.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # the default
        plain.release()
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE, evt_handlers=[TCP_NODELAY_HANDLER])
        assert assoc.is_established
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        # The acceptor's side is established in its own thread, which a loaded machine may run a moment after the
        # requestor's (CI at d6edd12, seed 601053850: none yet).
        deadline = time.monotonic() + 10
        accepted = [a for a in listener._ae.active_associations if a.is_established]
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.05)
            accepted = [a for a in listener._ae.active_associations if a.is_established]
        assert accepted and all(
            a.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1 for a in accepted
        )
        assoc.release()


def test_a_connection_that_speaks_no_dicom_is_dropped(tmp_path: Path) -> None:
    with running_listener(tmp_path, acse_timeout=2) as (listener, sink):
        with socket.create_connection(("127.0.0.1", listener.port), timeout=15) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n")
            _assert_still_serving(listener)  # while the junk connection is open
            started = time.monotonic()
            while client.recv(4096):  # the listener drops it at once (at worst after the ACSE timeout)
                pass
            assert time.monotonic() - started < 10
        with socket.create_connection(("127.0.0.1", listener.port), timeout=15) as silent:
            started = time.monotonic()
            assert silent.recv(4096) == b""  # says nothing: closed after the 2 s ACSE timeout
            assert 1.5 < time.monotonic() - started < 10
        _assert_still_serving(listener)
    assert sink.stored == []


def test_the_reactor_leaves_a_response_to_the_request_waiting_for_it(tmp_path: Path) -> None:
    # pynetdicom's reactor may run between two send_c_store calls and take the second response off the queue, which
    # it then drops: the call waits out the DIMSE timeout (CI, two refusals in a row). On our associations the
    # reactor takes only requests; a response stays for the send_* call that blocks for it.
    from pynetdicom.dimse_primitives import C_ECHO

    from dicom_io.scu import associate, new_ae

    with running_listener(tmp_path) as (listener, _):
        ae = new_ae("SCU")
        ae.add_requested_context(MRImageStorage)
        assoc, _, _ = associate(ae, "127.0.0.1", listener.port, LISTENER_AE, None)
        assert assoc.is_established
        assoc.dimse_timeout = 2
        try:
            response = C_STORE()
            response.MessageIDBeingRespondedTo, response.Status = 7, 0x0000
            # The reactor runs (it polls every millisecond) while the response waits on the queue.
            assoc.dimse.msg_queue.put((1, response))
            time.sleep(0.2)
            assert assoc.dimse.get_msg(block=True) == (1, response)
            # Paused, as pynetdicom pauses it for a send_*: its poll would leave a response, take a request.
            assoc._reactor_checkpoint.clear()
            while not assoc._is_paused:
                time.sleep(0.001)
            request = C_ECHO()
            request.MessageID, request.AffectedSOPClassUID = 8, "1.2.840.10008.1.1"
            assoc.dimse.msg_queue.put((1, response))
            assert assoc.dimse.get_msg(block=False) == (None, None)
            assert assoc.dimse.get_msg(block=True) == (1, response)
            assoc.dimse.msg_queue.put((1, request))
            assert assoc.dimse.get_msg(block=False) == (1, request)
            assoc._reactor_checkpoint.set()
        finally:
            assoc.release()
