"""dicom_io.archive: layout, durability protocol, idempotence, transfer syntax kept, unsafe UIDs refused.

The storing tests run twice: through unnamed files (O_TMPFILE, what this machine's ext4 has) and through named
temporary files (what a file system without O_TMPFILE gets; the switch is the archive's own, as on EOPNOTSUPP).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import JPEGLSLossless, generate_uid

from dicom_factory import brain_images
from dicom_io import synthesis
from dicom_io.archive import INCOMING, Archive, free_bytes, process_running, temporary_path


@pytest.fixture(scope="module")
def mr() -> list[Dataset]:
    return synthesis.mr_series(brain_images(2, seed=7))


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix != ".dcm"]


def _named(archive: Archive) -> Archive:
    """``archive`` switched to named temporary files, as it switches itself where open(O_TMPFILE) fails."""
    archive._no_unnamed_files(OSError(errno.EOPNOTSUPP, "no O_TMPFILE on this file system"))
    return archive


MakeArchive = Callable[[Path], Archive]


@pytest.fixture(params=["unnamed", "named"])
def make_archive(request: pytest.FixtureRequest) -> MakeArchive:
    def make(root: Path) -> Archive:
        archive = Archive(root, files_ahead=2)
        request.addfinalizer(archive.close)
        return _named(archive) if request.param == "named" else archive

    return make


def test_store_writes_one_file_per_instance_in_its_transfer_syntax(
    tmp_path: Path, mr: list[Dataset], make_archive: MakeArchive
) -> None:
    archive = make_archive(tmp_path)
    compressed = synthesis.encode(mr[0], JPEGLSLossless)
    stored = archive.store(compressed)
    assert stored.path == tmp_path / mr[0].StudyInstanceUID / mr[0].SeriesInstanceUID / f"{mr[0].SOPInstanceUID}.dcm"
    assert stored.path == archive.path_for(mr[0].StudyInstanceUID, mr[0].SeriesInstanceUID, mr[0].SOPInstanceUID)
    assert not stored.duplicate
    assert stored.transfer_syntax_uid == JPEGLSLossless
    assert stored.size_bytes == stored.path.stat().st_size
    back = dcmread(stored.path)
    assert back.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert back.PixelData == compressed.PixelData
    assert (back.pixel_array == mr[0].pixel_array).all()
    assert _leftovers(tmp_path) == []


def test_repeated_sop_instance_uid_keeps_the_first_file(
    tmp_path: Path, mr: list[Dataset], make_archive: MakeArchive
) -> None:
    archive = make_archive(tmp_path)
    first = archive.store(mr[0])
    content = first.path.read_bytes()
    changed = synthesis.encode(mr[0], mr[0].file_meta.TransferSyntaxUID)
    changed.PatientName = "Changed^Name"
    again = archive.store(changed)
    assert again.duplicate and again.path == first.path
    assert first.path.read_bytes() == content
    assert len(list(tmp_path.rglob("*.dcm"))) == 1


def test_concurrent_stores_of_one_instance_make_one_file(
    tmp_path: Path, mr: list[Dataset], make_archive: MakeArchive
) -> None:
    archive = make_archive(tmp_path)
    results = []
    barrier = threading.Barrier(8)

    def store() -> None:
        barrier.wait()
        results.append(archive.store(mr[1]))

    threads = [threading.Thread(target=store) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 8, f"{8 - len(results)} of the concurrent stores did not return"
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.path for r in results}) == 1
    assert len(list(tmp_path.rglob("*.dcm"))) == 1
    assert _leftovers(tmp_path) == []
    assert (dcmread(results[0].path).pixel_array == mr[1].pixel_array).all()


@pytest.mark.parametrize("bad", ["../../etc", "1.2.3/4", "", "1..2", "1.2.3" + ".4" * 40, "1.2.a"])
def test_unsafe_uids_never_reach_a_path(tmp_path: Path, mr: list[Dataset], bad: str) -> None:
    archive = Archive(tmp_path / "archive")
    ds = synthesis.encode(mr[0], mr[0].file_meta.TransferSyntaxUID)
    ds.SeriesInstanceUID = bad
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        archive.store(ds)
    with pytest.raises(ValueError):
        archive.path_for(ds.StudyInstanceUID, bad, ds.SOPInstanceUID)
    assert list(tmp_path.rglob("*")) == [tmp_path / "archive"]


def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, mr: list[Dataset], make_archive: MakeArchive
) -> None:
    archive = make_archive(tmp_path)
    ds = synthesis.encode(mr[0], mr[0].file_meta.TransferSyntaxUID)
    ds.SOPInstanceUID = generate_uid()
    ds.add_new(0x00091001, "US", "not a number")  # cannot be encoded: dcmwrite fails half way
    with pytest.raises(Exception):
        archive.store(ds)
    assert not archive.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).exists()
    assert _leftovers(tmp_path) == []


def test_missing_transfer_syntax_is_a_clear_error(tmp_path: Path, mr: list[Dataset]) -> None:
    ds = synthesis.encode(mr[0], mr[0].file_meta.TransferSyntaxUID)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(ValueError, match="Transfer Syntax"):
        Archive(tmp_path).store(ds)


def test_free_bytes_is_the_file_systems_free_space(tmp_path: Path) -> None:
    free = Archive(tmp_path).free_bytes()
    assert abs(free - shutil.disk_usage(tmp_path).free) < 64 * 2**20


def test_free_bytes_of_an_archive_not_yet_made_is_its_parents_and_makes_nothing(tmp_path: Path) -> None:
    # status and /metrics ask before the first instance has made the archive folder.
    root = tmp_path / "data" / "archive"
    assert abs(free_bytes(root) - shutil.disk_usage(tmp_path).free) < 64 * 2**20
    assert not (tmp_path / "data").exists()


def test_store_writes_the_given_encoding_as_is(tmp_path: Path, mr: list[Dataset]) -> None:
    from io import BytesIO

    buffer = BytesIO()
    mr[0].save_as(buffer, enforce_file_format=True)
    encoded = buffer.getvalue()
    stored = Archive(tmp_path).store(dcmread(BytesIO(encoded)), encoded=encoded)
    assert stored.path.read_bytes() == encoded
    with pytest.raises(ValueError, match="Part 10"):
        Archive(tmp_path / "other").store(mr[1], encoded=b"not dicom" * 20)
    assert not (tmp_path / "other" / mr[1].StudyInstanceUID).exists()


def test_a_temporary_name_left_by_a_crash_after_link_does_not_empty_the_archived_file(
    tmp_path: Path, mr: list[Dataset]
) -> None:
    # A crash between link() and unlink() leaves the temporary name as a second link to the archived file; after a
    # restart the same pid and thread id (usual in a container) give the same temporary name again.
    archive = _named(Archive(tmp_path))
    first = archive.store(mr[0])
    content = first.path.read_bytes()
    os.link(first.path, temporary_path(tmp_path))
    second = archive.store(mr[1])  # same series directory, same thread
    assert first.path.read_bytes() == content
    assert dcmread(second.path).SOPInstanceUID == mr[1].SOPInstanceUID
    assert _leftovers(tmp_path) == []


def test_temporaries_that_ended_processes_of_this_host_left_are_removed_at_open(
    tmp_path: Path, mr: list[Dataset]
) -> None:
    archive = _named(Archive(tmp_path))
    kept = archive.store(mr[0])  # a store in progress, from this (live) process
    host = temporary_path(tmp_path).name.rsplit("-", 2)[0]
    gone = 2**22 + 1  # above the kernel's largest pid: no such process
    abandoned = tmp_path / INCOMING / f"{host}-{gone}-7.tmp"
    os.link(kept.path, abandoned)  # as a crash between link() and unlink() leaves it
    others = [tmp_path / INCOMING / f"{host}-{os.getpid()}-7.tmp", tmp_path / INCOMING / f"elsewhere-{gone}-7.tmp"]
    for path in others:
        path.write_bytes(b"being written")
    Archive(tmp_path)
    assert not abandoned.exists() and all(path.exists() for path in others)
    assert dcmread(kept.path).SOPInstanceUID == mr[0].SOPInstanceUID  # the archived name is untouched


def test_a_zombie_is_no_running_process() -> None:
    # An orphan that ended stays a zombie for good under an init that does not reap (a container's first process
    # often): its markers and temporaries must count as left by an ended process.
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while process_running(child.pid):
            assert time.monotonic() < deadline, "an ended child (not yet waited for) counts as running"
            time.sleep(0.01)
        assert Path(f"/proc/{child.pid}").exists()  # not reaped: a zombie
    finally:
        child.wait()
    assert process_running(os.getpid())
    assert not process_running(child.pid)


def _wait_for_unnamed_files(root: Path, count: int, timeout: float = 10.0) -> None:
    """Until this process holds ``count`` unnamed (O_TMPFILE) files under ``root``, as /proc shows them."""
    deadline = time.monotonic() + timeout
    while True:
        held = 0
        for fd in Path("/proc/self/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            held += target.startswith(str(root.resolve())) and "/#" in target and target.endswith("(deleted)")
        if held >= count:
            return
        assert time.monotonic() < deadline, f"{held} of {count} files made ahead after {timeout} s"
        time.sleep(0.01)


def test_files_made_ahead_are_not_shared_with_a_forked_child(tmp_path: Path, mr: list[Dataset]) -> None:
    # A child inherits the parent's open files: were both to write into one file made ahead, each would append to
    # the other's instance.
    archive = Archive(tmp_path, files_ahead=2)
    try:
        archive.store(mr[0])
        _wait_for_unnamed_files(tmp_path, 2)  # the background thread makes the next files
        series = [synthesis.encode(ds, ds.file_meta.TransferSyntaxUID)
                  for ds in synthesis.mr_series(brain_images(2, seed=8))]
        pid = os.fork()
        if pid == 0:  # the child stores one instance and leaves without any cleanup
            try:
                archive.store(series[0])
            finally:
                os._exit(0)
        archive.store(series[1])
        assert os.waitpid(pid, 0)[1] == 0
        for ds in series:
            path = archive.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            back = dcmread(path)
            assert back.SOPInstanceUID == ds.SOPInstanceUID
            assert (back.pixel_array == ds.pixel_array).all()
    finally:
        archive.close()
    assert _leftovers(tmp_path) == []
