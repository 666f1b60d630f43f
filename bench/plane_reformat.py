"""The brain model on one volume in three planes: is its answer about the brain or about the plane it is cut in?

The brain training set's classes differ in plane: ``notumor`` is almost all axial, the tumour classes mostly
coronal or sagittal (docs/results.md). This script takes every 3D MR volume of labelled trees (``dicom-triage
evaluate --dicom``'s tree and labels format), reformats it into axial, coronal and sagittal slices, writes each
reformat as a DICOM series under ``--dest`` (outside the repository: these are patient images) and prints, side by
side, the worker's own path (:func:`worker.evaluation.evaluate_series`) on the series as sent, and the same path on
the three reformats as cut, with the worker's own axial reformat (:mod:`dicom_io.reformat`) switched off for them.

A volume qualifies when it is MR, has at least ``--min-slices`` slices, and its voxels are nearly isotropic (largest
spacing at most ``--max-anisotropy`` times the smallest): a 2D series of thick slices has no usable reformat.
Reformats follow each volume axis' dominant patient axis (no oblique resampling: an oblique volume's reformats are
tilted as it is) and are resampled in plane to square pixels (bilinear), stored values kept.

    .venv/bin/python bench/plane_reformat.py --dicom ../shared/data/real-dicom-dev \
        --labels bench/real-dicom-dev.labels.tsv --dicom /work/extra-dicom --labels /work/extra-dicom/labels.tsv \
        --dicom /work/volunteers --labels /work/volunteers/labels.tsv --dest /tmp/planes
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import MRImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from config import DEFAULT_ROUTING_RULES
from dicom_io.imaging import frame_planes
from models.inference import Classifier, default_model_dir
from models.tasks import TASKS, Task
from worker.evaluation import (LabelledSeries, SeriesOutcome, evaluate_series, find_series, read_labels,
                               series_facts)
from worker.routing import route

PLANES = ("axial", "coronal", "sagittal")
#: Patient axis (0 x right-left, 1 y anterior-posterior, 2 z inferior-superior) across which each plane's slices
#: are stacked, and along its rows and columns.
PLANE_AXES = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}
#: Image Orientation (Patient) of each plane's slices: rows of coronal and sagittal images run superior to inferior.
ORIENTATION = {"axial": [1, 0, 0, 0, 1, 0], "coronal": [1, 0, 0, 0, 0, -1], "sagittal": [0, 1, 0, 0, 0, -1]}
#: Attributes every reformatted instance copies from the source (what routing and display read, and the study).
COPIED = ("PatientID", "PatientName", "StudyInstanceUID", "StudyDescription", "StudyDate", "Modality",
          "Manufacturer", "BodyPartExamined", "MRAcquisitionType", "ImageType", "PhotometricInterpretation",
          "RescaleSlope", "RescaleIntercept")


@dataclass
class Volume:
    """Stored values ``(slices, rows, columns)`` with each axis' direction in patient space and spacing (mm)."""

    values: np.ndarray
    directions: np.ndarray  # (3, 3): slice normal, column direction (down the rows), row direction (along a row)
    spacing: tuple[float, float, float]
    header: Dataset

    @property
    def plane(self) -> str:
        axis = int(np.argmax(np.abs(self.directions[0])))
        return ("sagittal", "coronal", "axial")[axis]


def read_volume(paths: tuple[Path, ...], min_slices: int, max_anisotropy: float) -> Volume | str:
    """The series as a volume, or why it does not qualify."""
    datasets = [dcmread(path) for path in paths]
    if str(datasets[0].get("Modality", "")).upper() != "MR":
        return "not MR"
    frames: list[tuple[np.ndarray, np.ndarray, tuple[float, float], np.ndarray]] = []
    for ds in datasets:
        if "PixelData" not in ds:
            continue
        pixels = ds.pixel_array
        pixels = pixels[None] if pixels.ndim == 2 else pixels
        if pixels.ndim != 3:
            return "not greyscale"
        planes = frame_planes(ds, len(pixels))
        if planes is None:
            return "no plane geometry"
        frames += [(o, p, s, image) for (p, o, s), image in zip(planes, pixels)]
    if len(frames) < min_slices:
        return f"{len(frames)} slices"
    orientation, _, pixel_spacing, _ = frames[0]
    if any(not np.allclose(o, orientation, atol=1e-3) or image.shape != frames[0][3].shape
           for o, _, _, image in frames):
        return "frames differ in orientation or size"
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    frames.sort(key=lambda frame: float(np.dot(normal, frame[1])))
    steps = np.diff([float(np.dot(normal, frame[1])) for frame in frames])
    if not len(steps) or np.min(steps) <= 0 or np.ptp(steps) > 0.01 * np.median(steps) + 1e-3:
        return "slices not evenly spaced"
    spacing = (float(np.median(steps)), pixel_spacing[0], pixel_spacing[1])
    if max(spacing) > max_anisotropy * min(spacing):
        return "voxels {:.2f} x {:.2f} x {:.2f} mm".format(*spacing)
    values = np.stack([frame[3] for frame in frames])
    return Volume(values, np.stack([normal, column, row]), spacing, datasets[len(datasets) // 2])


def reformat(volume: Volume, plane: str) -> tuple[np.ndarray, float, float]:
    """``(slices, slice spacing, pixel spacing)`` of ``volume`` cut in ``plane``: slices from the patient's right,
    front or foot; axial rows front to back and columns right to left, the others' rows head to foot."""
    axes = PLANE_AXES[plane]
    order = [int(np.argmax(np.abs(volume.directions[:, axis]))) for axis in axes]
    if len(set(order)) != 3:
        raise ValueError("oblique: two volume axes share a patient axis")
    values = np.transpose(volume.values, order)
    for index, (axis, source) in enumerate(zip(axes, order)):
        if volume.directions[source, axis] < 0:
            values = np.flip(values, axis=index)
    if plane != "axial":
        values = values[:, ::-1]
    spacing = [volume.spacing[source] for source in order]
    zoom = (1.0, spacing[1] / spacing[2]) if spacing[1] > spacing[2] else (spacing[2] / spacing[1], 1.0)
    pixel = min(spacing[1], spacing[2])
    slices = np.stack([ndimage.zoom(image.astype(np.float32), zoom, order=1) for image in values])
    return np.rint(slices).astype(volume.values.dtype), spacing[0], pixel


def write_series(volume: Volume, plane: str, folder: Path) -> None:
    """The reformat as a classic MR series in ``folder`` (UIDs derived from the source's, so reruns agree)."""
    slices, step, pixel = reformat(volume, plane)
    source_uid = str(volume.header.SeriesInstanceUID)
    series_uid = generate_uid(entropy_srcs=[source_uid, plane])
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(ORIENTATION[plane][:3], ORIENTATION[plane][3:])
    for index, image in enumerate(slices):
        ds = Dataset()
        for keyword in COPIED:
            if keyword in volume.header:
                ds[keyword] = volume.header[keyword]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[source_uid, plane, str(index)])
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 900 + PLANES.index(plane)
        ds.SeriesDescription = f"{plane} reformat"
        ds.InstanceNumber = index + 1
        ds.ImageOrientationPatient = ORIENTATION[plane]
        position = np.abs(normal) * index * step
        ds.ImagePositionPatient = [float(value) for value in position]
        ds.PixelSpacing = [pixel, pixel]
        ds.SliceThickness = step
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel = 1
        ds.BitsAllocated = ds.BitsStored = 8 * image.dtype.itemsize
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(image.dtype.kind == "i")
        ds.PixelData = np.ascontiguousarray(image).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{index:04d}.dcm", enforce_file_format=True)


def _as_cut(series: list[LabelledSeries], task: Task, classifier: Classifier) -> list[SeriesOutcome]:
    """The worker's path on ``series`` with its axial reformat off, so that each plane is read as it was cut (the
    decoding looks the task up by name, so the registry entry is swapped for the call)."""
    TASKS[task.name] = replace(task, axial_reformat=False)
    try:
        return evaluate_series(series, task, classifier, DEFAULT_ROUTING_RULES)
    finally:
        TASKS[task.name] = task


def _cell(outcome: SeriesOutcome) -> str:
    value = "-" if outcome.suspicion is None else f"{outcome.suspicion:.3f}"
    return f"{outcome.result:13} {value:>6} {outcome.slices_read:>4}/{outcome.slices:<4}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom", type=Path, required=True, action="append", help="a labelled tree (repeatable)")
    parser.add_argument("--labels", type=Path, action="append", help="its labels file (one per --dicom, in order)")
    parser.add_argument("--dest", type=Path, required=True, help="new or empty folder for the reformats")
    parser.add_argument("--min-slices", type=int, default=64)
    parser.add_argument("--max-anisotropy", type=float, default=2.5,
                        help="3D volumes often have twice the resolution in plane (0.45 x 0.45 x 0.9 mm); 2D series "
                             "of thick slices are 4-5 times coarser across")
    args = parser.parse_args()
    if args.labels and len(args.labels) != len(args.dicom):
        parser.error("give one --labels per --dicom, or none")
    if args.dest.exists() and any(args.dest.iterdir()):
        parser.error(f"{args.dest} is not empty")
    # Some sources' UIDs are not DICOM UIDs; they only seed the reformats' UIDs here.
    warnings.filterwarnings("ignore", message="Invalid value for VR UI")
    task = TASKS["brain-tumor"]
    classifier = Classifier.load(default_model_dir(task.name))
    header = f"{'series':64} {'label':9} {'acquired':8} " + " ".join(f"{name:26}" for name in ("worker",) + PLANES)
    print(header)
    rows: list[tuple[str, list[SeriesOutcome]]] = []
    left_out: list[str] = []
    for tree, root in enumerate(args.dicom):
        labels = read_labels(args.labels[tree]) if args.labels else None
        for item in find_series(root, labels, task):
            if item.label not in task.class_names or route(series_facts(item.paths),
                                                           DEFAULT_ROUTING_RULES).task != task.name:
                continue
            volume = read_volume(item.paths, args.min_slices, args.max_anisotropy)
            if isinstance(volume, str):
                if len(item.paths) >= args.min_slices:
                    left_out.append(f"{item.name}: {volume}")
                continue
            planes = []
            for plane in PLANES:
                folder = args.dest / str(tree) / plane / item.name.replace(" ", "_")
                write_series(volume, plane, folder)
                planes.append(LabelledSeries(f"{plane}/{item.name}", item.label, tuple(sorted(folder.iterdir()))))
            outcomes = evaluate_series([item], task, classifier, DEFAULT_ROUTING_RULES)
            outcomes += _as_cut(planes, task, classifier)
            rows.append((volume.plane, outcomes))
            print(f"{item.name[-64:]:64} {item.label:9} {volume.plane:8} " + " ".join(_cell(o) for o in outcomes),
                  flush=True)
    print("\nnot reformatted (files >= --min-slices):", *left_out, sep="\n  ")
    print("\nper plane (series given a class): healthy volumes' largest suspicion, tumour volumes called a tumour,"
          " tumour type right")
    for column, name in enumerate(("worker",) + PLANES):
        outcomes = [row[column] for _, row in rows]
        healthy = [o.suspicion for o in outcomes if o.expected == "notumor" and o.result in task.labels]
        tumours = [o for o in outcomes if o.expected != "notumor"]
        found = sum(task.is_finding(o.result) for o in tumours)
        typed = sum(o.result == o.expected for o in tumours)
        largest = f"{max(healthy):.3f}" if healthy else "-"
        print(f"  {name:8} healthy {len(healthy)} classified, largest {largest}; tumour {found}/{len(tumours)} found,"
              f" type right {typed}/{len(tumours)}")


if __name__ == "__main__":
    main()
