"""The durable instance archive: one DICOM file per SOP Instance UID.

Layout: ``root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. A file appears there only complete
and on disk: it is written to a file without a name (``O_TMPFILE``), fsynced (``fdatasync``: data and size), linked
into place and the directory fsynced, so an acknowledged instance survives a crash or power loss, and a crash
leaves no partial file or temporary name behind. Where the file system or the kernel has no ``O_TMPFILE`` (or
``/proc`` is missing: NFS, other platforms), a named temporary file in ``root/.incoming`` takes its place; one that
a crashed process of this host left there is removed when the archive is next opened. Stores into one directory
from several threads share directory fsyncs: one that starts after a link covers it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread, dcmwrite

from dicom_io.validation import element_text, is_valid_uid

LOGGER = logging.getLogger(__name__)

_SUFFIX = ".dcm"
#: This machine's name as a file-name part (temporary names; see Archive.store).
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:64]


#: Where named temporary files are written (only without unnamed files), in the archive root.
INCOMING = ".incoming"


def temporary_path(root: Path) -> Path:
    """Where the calling thread writes an instance before linking it into its series directory under its final name.

    No other store uses the name meanwhile: a thread stores one instance at a time, and host and pid tell listener
    processes apart, also on an archive shared by several machines. Cheaper than mkstemp's random names. One folder
    for them all, so that those a crash left are found without walking the archive.
    """
    return root / INCOMING / f"{_HOST}-{os.getpid()}-{threading.get_ident()}.tmp"


def process_running(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host (this one, or another user's, included). A zombie does not:
    it has ended, and stays listed only until its parent reads its status, which for an orphan under an init that
    does not reap (a container's first process often) is never."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # it ended just now, or there is no /proc (not Linux) to say more than kill() did
        return not Path("/proc/self").is_dir()
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")


def remove_abandoned_temporaries(root: Path) -> list[Path]:
    """Remove the named temporary files that processes of this host which have ended left in ``root``'s
    :data:`INCOMING` folder (a crash between open and unlink); return them. Other hosts' files, and those of a pid
    that runs now (possibly reused), are left: removing one still being written would only fail that store."""
    removed = []
    try:
        entries = list(os.scandir(root / INCOMING))
    except FileNotFoundError:
        return removed
    for entry in entries:
        parts = entry.name.removesuffix(".tmp").rsplit("-", 2)  # host (may hold "-"), pid, thread
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit() or process_running(int(parts[1])):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
    if removed:
        LOGGER.warning("removed %d temporary file(s) that ended processes left in %s", len(removed), root / INCOMING)
    return removed


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


#: What open(O_TMPFILE) raises where the file system (EOPNOTSUPP) or the kernel (EISDIR, EINVAL) has no unnamed
#: files, and what linking one through /proc raises without /proc (ENOENT) or across file systems (EXDEV).
_NO_UNNAMED_OPEN = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})
_NO_UNNAMED_LINK = frozenset({errno.ENOENT, errno.EXDEV})


class _UnnamedFiles:
    """Empty files without a name (``O_TMPFILE``) in one directory, some made ahead of need by a background thread.

    Creating an inode cost 0.3 to 1.5 ms per store on the ext4 volume measured (the allocator passes over recently
    freed inodes); made ahead, while the listener waits for the network, it is off the time a sender waits for each
    response. ``ahead`` 0 makes each file when it is taken.
    """

    def __init__(self, directory: Path, ahead: int) -> None:
        self.directory = directory
        self.ahead = ahead
        self._lock = threading.Lock()
        self._ready: list[int] = []
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False

    def make(self) -> int:
        """A new unnamed file, open for writing. Raises ``OSError`` (errno in ``_NO_UNNAMED_OPEN``: unsupported)."""
        return os.open(self.directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)

    def take(self) -> int:
        """An unnamed file made ahead if there is one, else a new one; the caller closes it."""
        fd = None
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's files are not ours to write into
                for inherited in self._ready:
                    os.close(inherited)
                self._ready, self._thread, self._pid = [], None, os.getpid()
            if self._ready:
                fd = self._ready.pop()
            if self.ahead and self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._make_ahead, name="archive-files", daemon=True)
                self._thread.start()
        if self.ahead:
            self._wanted.set()
        return fd if fd is not None else self.make()

    def _make_ahead(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if len(self._ready) >= self.ahead:
                        break
                try:
                    fd = self.make()
                except OSError as exc:  # take() makes its own, and a store reports the error
                    LOGGER.debug("cannot make an unnamed file ahead in %s: %s", self.directory, exc)
                    break
                with self._lock:
                    if self._closed:
                        os.close(fd)
                        return
                    self._ready.append(fd)

    def close(self) -> None:
        """Close the files made ahead (never written: they vanish) and stop making more."""
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        self._wanted.set()
        for fd in ready:
            os.close(fd)


def _link_unnamed(fd: int, directory_fd: int, name: str) -> None:
    """Give the unnamed file ``fd`` the name ``name`` in the directory ``directory_fd``.

    ``linkat(AT_SYMLINK_FOLLOW)`` on ``/proc/self/fd/N`` is the unprivileged way (``AT_EMPTY_PATH`` needs
    CAP_DAC_READ_SEARCH); a ``dst_dir_fd`` makes Python call linkat with that flag rather than link(), which would
    link the /proc symlink itself and fail with EXDEV.
    """
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=directory_fd, follow_symlinks=True)


def _write_all(fd: int, ds: Dataset, encoded: bytes | None) -> int:
    """Write the instance to ``fd`` (``encoded`` as is, else ``ds`` encoded) and make it durable; its size."""
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
    return size


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

    def sync(self, directory: Path, directory_fd: int | None = None) -> None:
        """Return once ``directory`` (open as ``directory_fd``, if given) was fsynced after this call began."""
        with self.lock:
            self.linked += 1
            mine = self.linked
        with self.syncing:
            with self.lock:
                if self.synced >= mine:  # an fsync that began after our link has finished meanwhile
                    return
                covered = self.linked  # every link counted so far happened before the fsync below begins
            if directory_fd is None:
                fsync_path(directory)
            else:
                os.fsync(directory_fd)
            with self.lock:
                self.synced = max(self.synced, covered)


#: Directories whose group-fsync state is kept; beyond this the oldest is forgotten (a series is written in bursts).
_DIRECTORY_SYNCS_KEPT = 256


def free_bytes(root: Path) -> int:
    """Bytes free for an unprivileged writer on the file system that holds ``root``, or would hold it: the archive
    folder appears with the first instance, so a missing one is measured at its nearest existing parent."""
    while not root.exists() and root.parent != root:
        root = root.parent
    return shutil.disk_usage(root).free


class Archive:
    """Durable, idempotent storage of DICOM instances under ``root``.

    ``files_ahead`` unnamed files are kept ready by a background thread for the next stores (the listener's archive
    wants them; readers need none); :meth:`close` releases them.
    """

    def __init__(self, root: Path | str, files_ahead: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._syncs: dict[Path, _DirectorySync] = {}
        self._syncs_lock = threading.Lock()
        # None without O_TMPFILE (a platform other than Linux), or once the file system turned out to have no
        # unnamed files: named temporary files from then on.
        self._unnamed = _UnnamedFiles(self.root, files_ahead) if hasattr(os, "O_TMPFILE") else None
        remove_abandoned_temporaries(self.root)

    def close(self) -> None:
        """Release the files made ahead; later stores still work, making each file when needed."""
        if self._unnamed is not None:
            self._unnamed.close()

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
        return free_bytes(self.root)

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

        unnamed = self._unnamed
        if unnamed is not None:
            result = self._store_unnamed(unnamed, target, ds, encoded)
            if result is not None:
                size, duplicate = result
                return stored(size, duplicate)
        size, duplicate = self._store_named(target, ds, encoded)
        return stored(size, duplicate)

    def _store_unnamed(
        self, unnamed: _UnnamedFiles, target: Path, ds: Dataset, encoded: bytes | None
    ) -> tuple[int, bool] | None:
        """Store through an unnamed file: (size, duplicate), or None where unnamed files turned out unsupported."""
        directory_fd = self._open_directory(target.parent)
        try:
            try:
                fd = unnamed.take()
            except OSError as exc:
                if exc.errno not in _NO_UNNAMED_OPEN:
                    raise
                self._no_unnamed_files(exc)
                return None
            try:
                size = _write_all(fd, ds, encoded)
                try:
                    # link() never replaces: when two associations race on one SOP Instance UID, the first wins.
                    _link_unnamed(fd, directory_fd, target.name)
                except FileExistsError:
                    return target.stat().st_size, True
                except OSError as exc:
                    if exc.errno not in _NO_UNNAMED_LINK:
                        raise
                    self._no_unnamed_files(exc)
                    return None
            finally:
                os.close(fd)
            self._directory_sync(target.parent).sync(target.parent, directory_fd)
            return size, False
        finally:
            os.close(directory_fd)

    def _open_directory(self, directory: Path) -> int:
        """An fd of a series directory, made (with its study directory) when missing."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            return os.open(directory, flags)
        except FileNotFoundError:  # the series' first instance
            self._make_directories(directory)
            return os.open(directory, flags)

    def _no_unnamed_files(self, error: OSError) -> None:
        unnamed, self._unnamed = self._unnamed, None
        if unnamed is not None:
            LOGGER.warning("no unnamed files in %s (%s): named temporary files from now on", self.root, error)
            unnamed.close()

    def _store_named(self, target: Path, ds: Dataset, encoded: bytes | None) -> tuple[int, bool]:
        """Store through a named temporary file in :data:`INCOMING`: (size, duplicate)."""
        # No exists() check first: a repeat (rare) is found by link() below, and a stat per instance is not free.
        directory_fd = self._open_directory(target.parent)
        try:
            temp = temporary_path(self.root)
            try:
                fd = _create_exclusive(temp)
            except FileNotFoundError:  # the first named store into this archive
                temp.parent.mkdir(exist_ok=True)
                fd = _create_exclusive(temp)
            try:
                try:
                    size = _write_all(fd, ds, encoded)
                finally:
                    os.close(fd)
                try:
                    # link() never replaces: when two associations race on one SOP Instance UID, the first wins.
                    os.link(temp, target)
                except FileExistsError:
                    return target.stat().st_size, True
            finally:
                os.unlink(temp)
            self._directory_sync(target.parent).sync(target.parent, directory_fd)
            return size, False
        finally:
            os.close(directory_fd)

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
