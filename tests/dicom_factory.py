"""Helpers for tests that need DICOM: test images, series on disk, a recording sink, a running listener, storescu.

DICOM is made at test time from the real images in ../shared/data (never committed); see dicom_io.synthesis.
"""

from __future__ import annotations

import random
import re
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_io.archive import Archive, StoredInstance
from dicom_io.listener import StorageListener, received_file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORESCU = "/usr/bin/storescu"
LISTENER_AE = "TRIAGE_TEST"


def sample_images(pattern: str, count: int, seed: int = 1234) -> list[Path]:
    """``count`` images under ../shared/data matching ``pattern`` (a glob), the same ones on every run."""
    files = sorted(SHARED_DATA.glob(pattern))
    if len(files) < count:
        pytest.skip(f"fewer than {count} images match {pattern} under {SHARED_DATA}")
    return random.Random(seed).sample(files, count)


def brain_images(count: int, seed: int = 1234) -> list[Path]:
    """Brain MRI test images (224x224 JPEG)."""
    return sample_images("brain-tumor-mri/Testing/*/*.jpg", count, seed)


def ct_images(count: int, seed: int = 1234) -> list[Path]:
    """Lung CT slices (PNG, lung-window display images of various sizes)."""
    return sample_images("covid-ct/*/*.png", count, seed)


def nested_sequence(depth: int) -> DicomSequence:
    """A ContentSequence nested ``depth`` levels deep (the innermost item holds a CodeMeaning)."""
    item = Dataset()
    item.CodeMeaning = "innermost"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = DicomSequence([item])
        item = outer
    return item.ContentSequence


def write_files(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each dataset as a DICOM file named after its SOP Instance UID; return the paths in order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Rejection:
    calling_ae: str
    sop_instance_uid: str | None
    reason: str


class RecordingSink:
    """An InstanceSink for tests: archives what it accepts and records rejections (thread-safe)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.stored: list[StoredInstance] = []
        self.rejections: list[Rejection] = []
        self._lock = threading.Lock()

    def accept(self, ds: Dataset, calling_ae: str) -> int:
        stored = self.archive.store(ds, encoded=received_file(ds))
        with self._lock:
            self.stored.append(stored)
        return 0x0000

    def reject(self, calling_ae: str, sop_instance_uid: str | None, reason: str) -> None:
        with self._lock:
            self.rejections.append(Rejection(calling_ae, sop_instance_uid, reason))


@contextmanager
def running_listener(root: Path, **options: object) -> Iterator[tuple[StorageListener, RecordingSink]]:
    """A StorageListener on 127.0.0.1 (free port) archiving under ``root/archive`` with a RecordingSink."""
    archive = Archive(root / "archive")
    sink = RecordingSink(archive)
    options.setdefault("archive_root", archive.root)
    listener = StorageListener(LISTENER_AE, "127.0.0.1", 0, sink, **options)  # type: ignore[arg-type]
    listener.start()
    try:
        yield listener, sink
    finally:
        listener.stop()


@dataclass(frozen=True)
class StorescuResult:
    returncode: int
    #: DIMSE status of each C-STORE response, in order.
    statuses: list[int]
    output: str


_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")


def storescu(
    port: int,
    files: Sequence[Path],
    *extra: str,
    calling_ae: str = "STORESCU",
    called_ae: str = LISTENER_AE,
    timeout: float = 60,
) -> StorescuResult:
    """Send ``files`` with dcmtk's storescu (TCP_NODELAY on) and parse the response statuses from its log."""
    command = [STORESCU, "-d", "-nh", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port)]
    completed = subprocess.run(
        [*command, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    output = completed.stdout + completed.stderr
    statuses = [int(m.group(1), 16) for m in _STATUS_RE.finditer(output)]
    return StorescuResult(completed.returncode, statuses, output)
