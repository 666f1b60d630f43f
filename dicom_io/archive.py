"""The durable instance archive: one DICOM file per SOP Instance UID.

Layout: ``root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. A file appears there only complete
and on disk: it is written to a temporary file in the same directory, fsynced (``fdatasync``: data and size),
linked into place and the directory fsynced, so an acknowledged instance survives a crash or power loss. Stores
into one directory from several threads share directory fsyncs: one that starts after a link covers it.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread, dcmwrite

from dicom_io.validation import element_text, is_valid_uid

_SUFFIX = ".dcm"
#: This machine's name as a file-name part (temporary names; see Archive.store).
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:64]


def temporary_path(directory: Path) -> Path:
    """Where the calling thread writes an instance before linking it into ``directory`` under its final name.

    No other store uses the name meanwhile: a thread stores one instance at a time, and host and pid tell listener
    processes apart, also on an archive shared by several machines. Cheaper than mkstemp's random names.
    """
    return directory / f".incoming-{_HOST}-{os.getpid()}-{threading.get_ident()}.tmp"


def _create_exclusive(path: Path) -> int:
    """Open ``path`` as a new, empty file. One left by a crash is unlinked first, never truncated: a crash between
    link() and unlink() leaves it a second name of an archived instance (pids and thread ids repeat after a
    restart, in a container nearly always), and truncating it would empty that acknowledged file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, 0o600)


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance lies in the archive and what it is."""

    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size_bytes: int
    #: True when a file for this SOP Instance UID was already there (a repeated send); it was left unchanged.
    duplicate: bool


def _uid(ds: Dataset, keyword: str) -> str:
    value = (element_text(ds, keyword) or "").rstrip("\x00 ")
    if not is_valid_uid(value):
        raise ValueError(f"{keyword} {value[:80]!r} is not a valid UID; refusing to use it in an archive path")
    return value


def _subdirectories(path: Path) -> list[Path]:
    with os.scandir(path) as entries:
        return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory's: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirectorySync:
    """Group fsync of one directory: a caller returns once an fsync that began after its link has ended."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards the counters
        self.syncing = threading.Lock()  # one fsync of the directory at a time
        self.linked = 0  # links made in the directory so far
        self.synced = 0  # links covered by a finished fsync

    def sync(self, directory: Path) -> None:
        with self.lock:
            self.linked += 1
            mine = self.linked
        with self.syncing:
            with self.lock:
                if self.synced >= mine:  # an fsync that began after our link has finished meanwhile
                    return
                covered = self.linked  # every link counted so far happened before the fsync below begins
            fsync_path(directory)
            with self.lock:
                self.synced = max(self.synced, covered)


#: Directories whose group-fsync state is kept; beyond this the oldest is forgotten (a series is written in bursts).
_DIRECTORY_SYNCS_KEPT = 256


class Archive:
    """Durable, idempotent storage of DICOM instances under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._syncs: dict[Path, _DirectorySync] = {}
        self._syncs_lock = threading.Lock()

    def path_for(self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> Path:
        """The file that holds (or would hold) an instance. Raises ``ValueError`` for a UID unsafe in a path."""
        for name, value in (
            ("StudyInstanceUID", study_instance_uid),
            ("SeriesInstanceUID", series_instance_uid),
            ("SOPInstanceUID", sop_instance_uid),
        ):
            if not is_valid_uid(value):
                raise ValueError(f"{name} {str(value)[:80]!r} is not a valid UID")
        return self.root / study_instance_uid / series_instance_uid / f"{sop_instance_uid}{_SUFFIX}"

    def free_bytes(self) -> int:
        """Bytes free for an unprivileged writer on the archive's file system."""
        return shutil.disk_usage(self.root).free

    def store(self, ds: Dataset, encoded: bytes | None = None) -> StoredInstance:
        """Write ``ds`` durably in its own transfer syntax (``ds.file_meta.TransferSyntaxUID``).

        ``encoded``, when given, must be the complete Part 10 file of ``ds`` (as
        :func:`dicom_io.listener.received_file` gives it); it is written as is, which saves re-encoding ``ds``.
        A second store of the same SOP Instance UID keeps the first file and returns it with ``duplicate=True``.
        Raises ``ValueError`` for missing or unsafe UIDs or a missing transfer syntax, ``OSError`` when the disk
        fails (for example ``ENOSPC``); a failed store leaves no file behind.
        """
        study = _uid(ds, "StudyInstanceUID")
        series = _uid(ds, "SeriesInstanceUID")
        sop_instance = _uid(ds, "SOPInstanceUID")
        sop_class = _uid(ds, "SOPClassUID")
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        if not transfer_syntax:
            raise ValueError(f"instance {sop_instance} has no file meta Transfer Syntax UID")
        if encoded is not None and encoded[128:132] != b"DICM":
            raise ValueError(f"instance {sop_instance}: the encoded bytes given are not a DICOM Part 10 file")
        target = self.path_for(study, series, sop_instance)

        def stored(size: int, duplicate: bool) -> StoredInstance:
            return StoredInstance(target, study, series, sop_instance, sop_class, transfer_syntax, size, duplicate)

        # No exists() check first: a repeat (rare) is found by link() below, and a stat per instance is not free.
        temp = temporary_path(target.parent)
        try:
            fd = _create_exclusive(temp)
        except FileNotFoundError:  # the series' first instance
            self._make_directories(target.parent)
            fd = _create_exclusive(temp)
        try:
            try:
                if encoded is None:
                    with open(fd, "wb", closefd=False) as handle:
                        dcmwrite(handle, ds, enforce_file_format=True)
                else:
                    data = memoryview(encoded)
                    written = 0
                    while written < len(data):
                        written += os.write(fd, data[written:])
                size = os.lseek(fd, 0, os.SEEK_CUR)
                os.fdatasync(fd)  # data and size: all that reading the file back needs
            finally:
                os.close(fd)
            try:
                # link() never replaces: when two associations race on one SOP Instance UID, the first wins.
                os.link(temp, target)
            except FileExistsError:
                return stored(target.stat().st_size, duplicate=True)
        finally:
            os.unlink(temp)
        self._directory_sync(target.parent).sync(target.parent)
        return stored(size, duplicate=False)

    def _directory_sync(self, directory: Path) -> _DirectorySync:
        with self._syncs_lock:
            state = self._syncs.pop(directory, None) or _DirectorySync()
            self._syncs[directory] = state  # most recently used last
            if len(self._syncs) > _DIRECTORY_SYNCS_KEPT:
                del self._syncs[next(iter(self._syncs))]
            return state

    def series_directories(self, modified_since: float = 0.0) -> Iterator[Path]:
        """Every series directory whose entries last changed at or after ``modified_since`` (a ``time.time()``).

        A link into a directory sets its modification time, so this finds every series that got a file since.
        Costs one ``stat`` per series directory.
        """
        for study in _subdirectories(self.root):
            for series in _subdirectories(study):
                if series.stat().st_mtime >= modified_since:
                    yield series

    def files_in(self, series_directory: Path) -> list[Path]:
        """The instance files in a series directory (temporary files of unfinished stores left out)."""
        with os.scandir(series_directory) as entries:
            return [
                Path(entry.path)
                for entry in entries
                if entry.name.endswith(_SUFFIX) and not entry.name.startswith(".") and entry.is_file()
            ]

    def read_stored(self, path: Path) -> tuple[Dataset, StoredInstance]:
        """An archived file's header (no pixel data) and its :class:`StoredInstance`; ``ValueError`` if the file
        does not belong at ``path``."""
        ds = dcmread(path, stop_before_pixels=True)
        study = _uid(ds, "StudyInstanceUID")
        series = _uid(ds, "SeriesInstanceUID")
        sop_instance = _uid(ds, "SOPInstanceUID")
        if self.path_for(study, series, sop_instance) != path:
            raise ValueError(f"{path} holds instance {sop_instance} of series {series}, which belongs elsewhere")
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        size = path.stat().st_size
        return ds, StoredInstance(
            path, study, series, sop_instance, _uid(ds, "SOPClassUID"), transfer_syntax, size, duplicate=False
        )

    def _make_directories(self, directory: Path) -> None:
        # Create study/series directories, fsyncing each parent whose entries changed.
        missing = []
        current = directory
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            fsync_path(path.parent)
