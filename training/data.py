"""Image-folder datasets: discovery, validation of bad input, duplicate groups and duplicate-aware splits.

Layouts: ``DIR/<class>/*`` (one pool, e.g. COVID CT) or ``DIR/Training/<class>/*`` + ``DIR/Testing/<class>/*``
(an official split, e.g. the brain-tumour set). Every file is decoded exactly once, here, to a grey uint8 array;
unreadable files are skipped, counted and listed, never silently.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from models.imagefiles import IMAGE_SUFFIXES, ImageFileError, read_grey_image
from models.tasks import Task

#: Official split folder names, in the brain-tumour set's spelling.
TRAIN_FOLDER, TEST_FOLDER = "Training", "Testing"
#: Perceptual hash: a 16x16 difference hash (256 bits) of the grey image.
HASH_SIZE = 16
#: Two images whose hashes differ in at most this many of 256 bits count as near-duplicates. Measured on the
#: brain-tumour set: Testing's distance to its nearest Training image has a trough at 10-16 bits between re-encoded
#: copies (0-8) and distinct slices (mostly 20+).
NEAR_DUPLICATE_BITS = 10


class DataError(ValueError):
    """The ``--data`` folder cannot be used; the message names the file or folder and what is wrong."""


@dataclass
class ImageSet:
    """Decoded images of one folder tree, with labels, content hashes and what was skipped."""

    root: Path
    paths: list[Path] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    dhash: list[bytes] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def label_array(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.int64)

    def relative(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def subset(self, indices: Iterable[int]) -> "ImageSet":
        indices = list(indices)
        return ImageSet(
            root=self.root,
            paths=[self.paths[i] for i in indices],
            images=[self.images[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            sha256=[self.sha256[i] for i in indices],
            dhash=[self.dhash[i] for i in indices],
        )

    def manifest_sha256(self) -> str:
        """A hash of (relative path, content sha256) of every image: names the exact data a model saw."""
        lines = sorted(f"{self.relative(i)}\t{self.sha256[i]}" for i in range(len(self)))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def report(self) -> str:
        """What was read: counts per class, colour modes converted, and every skipped file with its reason."""
        counts = Counter(self.labels)
        parts = [f"{self.root}: {len(self)} images ({', '.join(f'{k}: {v}' for k, v in sorted(self.modes.items()))})"]
        if self.skipped:
            parts.append(f"  skipped {len(self.skipped)} file(s):")
            parts.extend(f"    {path}: {reason}" for path, reason in self.skipped)
        parts.append("  per class: " + ", ".join(f"{label}={counts[label]}" for label in sorted(counts)))
        return "\n".join(parts)


def is_official_split(data_dir: Path) -> bool:
    return (data_dir / TRAIN_FOLDER).is_dir() and (data_dir / TEST_FOLDER).is_dir()


def check_data_dir(data_dir: Path | str) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"--data {data_dir}: does not exist")
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: is not a folder")
    return data_dir


def _class_folders(folder: Path, task: Task) -> list[Path]:
    """The class folders of ``folder``, in the task's class order; errors name every mismatch."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    expected = list(task.class_names)
    unknown = [name for name in found if name not in expected]
    missing = [name for name in expected if name not in found]
    if unknown or missing:
        detail = []
        if unknown:
            detail.append(f"unexpected folder(s) {', '.join(unknown)}")
        if missing:
            detail.append(f"missing folder(s) {', '.join(missing)}")
        raise DataError(
            f"{folder}: class folders do not match task {task.name} ({'; '.join(detail)}); "
            f"expected exactly: {', '.join(expected)}"
        )
    return [folder / name for name in expected]


def load_image_folder(folder: Path | str, task: Task, progress: bool = True, allow_empty: bool = False) -> ImageSet:
    """Decode every image under ``folder/<class>/`` (recursively, hidden folders and files excluded).

    Raises :class:`DataError` for a missing folder, class folders that do not match ``task`` or (unless
    ``allow_empty``: one of several sources) a class folder with no readable image. Unreadable, truncated and
    non-image files are skipped and listed in ``skipped``.
    """
    import imagehash  # here, not at the top: split helpers below also run on hosts without it

    folder = check_data_dir(folder)
    result = ImageSet(root=folder)
    for label, class_dir in enumerate(_class_folders(folder, task)):
        files = sorted(
            p for p in class_dir.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
        )
        readable = 0
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                result.skipped.append((path, f"not an image file (suffix {path.suffix or 'none'})"))
                continue
            try:
                data = path.read_bytes()
                with Image.open(path) as probe:
                    mode = probe.mode
                grey = read_grey_image(path)
            except (ImageFileError, OSError) as exc:
                result.skipped.append((path, str(exc).removeprefix(f"{path}: ")))
                continue
            result.paths.append(path)
            result.images.append(grey)
            result.labels.append(label)
            result.sha256.append(hashlib.sha256(data).hexdigest())
            result.dhash.append(np.packbits(imagehash.dhash(Image.fromarray(grey), HASH_SIZE).hash).tobytes())
            result.modes[mode] += 1
            readable += 1
            if progress and len(result) % 1000 == 0:
                print(f"  read {len(result)} images ...", file=sys.stderr, flush=True)
        if readable == 0 and not allow_empty:
            raise DataError(f"{class_dir}: no readable images in class folder '{class_dir.name}'")
    return result


def _hamming_pairs(a: Sequence[bytes], b: Sequence[bytes], max_bits: int) -> Iterable[tuple[int, int]]:
    """Index pairs (i, j) whose hashes differ in at most ``max_bits`` bits, in row chunks to bound memory."""
    left = np.frombuffer(b"".join(a), dtype=np.uint64).reshape(len(a), -1)
    right = np.frombuffer(b"".join(b), dtype=np.uint64).reshape(len(b), -1)
    for start in range(0, len(left), 256):
        chunk = left[start:start + 256]
        block = np.zeros((len(chunk), len(right)), dtype=np.int32)
        for word in range(left.shape[1]):
            block += np.bitwise_count(chunk[:, word, None] ^ right[None, :, word])
        rows, cols = np.nonzero(block <= max_bits)
        yield from zip((rows + start).tolist(), cols.tolist())


def duplicate_groups(images: ImageSet, max_bits: int = NEAR_DUPLICATE_BITS,
                     links: Iterable[tuple[int, int]] = ()) -> np.ndarray:
    """Group id per image: images that are byte-identical or perceptually near (transitively) share a group, and
    so do the index pairs in ``links`` (e.g. :func:`patient_links`)."""
    parent = list(range(len(images)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first_by_sha: dict[str, int] = {}
    for index, digest in enumerate(images.sha256):
        union(index, first_by_sha.setdefault(digest, index))
    for i, j in _hamming_pairs(images.dhash, images.dhash, max_bits):
        if i < j:
            union(i, j)
    for i, j in links:
        union(i, j)
    roots = [find(i) for i in range(len(images))]
    _, group_ids = np.unique(roots, return_inverse=True)
    return group_ids.astype(np.int64)


#: An optional file in a ``--data`` folder naming each image's patient: CSV with columns ``file`` (relative to the
#: folder) and ``patient``. Images of one patient are grouped like duplicates, so no patient straddles train,
#: validation and test. ``dicom-triage dataset export`` writes it.
PATIENT_MANIFEST = "manifest.csv"


def patient_links(images: ImageSet, folders: Iterable[Path]) -> list[tuple[int, int]]:
    """Index pairs of images of the same patient, by each folder's :data:`PATIENT_MANIFEST` (if it has one)."""
    index = {path.absolute(): i for i, path in enumerate(images.paths)}
    pairs = []
    for folder in folders:
        manifest = folder / PATIENT_MANIFEST
        if not manifest.is_file():
            continue
        first: dict[str, int] = {}
        with manifest.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"file", "patient"} <= set(reader.fieldnames or ()):
                raise DataError(f"{manifest}: a patient manifest needs the columns file and patient")
            for row in reader:
                i = index.get((folder / row["file"]).absolute())
                if i is not None:
                    pairs.append((first.setdefault(row["patient"], i), i))
    return pairs


def near_duplicates_of(candidates: ImageSet, reference: ImageSet, max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Boolean mask over ``candidates``: True where an image is exactly or nearly also in ``reference``."""
    mask = np.zeros(len(candidates), dtype=bool)
    reference_sha = set(reference.sha256)
    for index, digest in enumerate(candidates.sha256):
        mask[index] = digest in reference_sha
    for i, _ in _hamming_pairs(candidates.dhash, reference.dhash, max_bits):
        mask[i] = True
    return mask


def split_groups(
    labels: np.ndarray, groups: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices into ``len(fractions)`` parts, stratified by class, never cutting a duplicate group.

    Each group goes whole to one part; a group's class is its members' most common label. Parts are filled per class
    in a seeded random group order, each group to the part furthest below its target.
    """
    fractions = np.asarray(fractions, dtype=float)
    if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions {fractions.tolist()} must be non-negative and sum to 1")
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(index)
    group_class = {g: Counter(labels[idx].tolist()).most_common(1)[0][0] for g, idx in members.items()}
    parts: list[list[int]] = [[] for _ in fractions]
    for cls in sorted(set(group_class.values())):
        cls_groups = [g for g in sorted(members) if group_class[g] == cls]
        rng.shuffle(cls_groups)
        total = sum(len(members[g]) for g in cls_groups)
        filled = np.zeros(len(fractions))
        for g in cls_groups:
            deficit = fractions * total - filled
            part = int(np.argmax(deficit))
            parts[part].extend(members[g])
            filled[part] += len(members[g])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_off_validation(indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) parts of ``indices`` (into ``labels``/``groups``): :func:`split_groups` with
    ``(1 - fraction, fraction)``."""
    fit_part, val_part = split_groups(labels[indices], groups[indices], (1 - fraction, fraction), seed)
    return indices[fit_part], indices[val_part]


def fold_ids(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number (0..folds-1) per image for group-aware, class-stratified cross-validation."""
    parts = split_groups(labels, groups, [1.0 / folds] * folds, seed)
    out = np.empty(len(labels), dtype=np.int64)
    for fold, indices in enumerate(parts):
        out[indices] = fold
    return out


#: The seeded train/validation/test fractions of a pool without an official split (the study's 70/20/10).
POOL_FRACTIONS = (0.7, 0.2, 0.1)


def split_pool(labels: np.ndarray, groups: np.ndarray, seed: int,
               validation_fraction: float | None = None) -> list[np.ndarray]:
    """(train, validation, test) of a pool: the seeded :data:`POOL_FRACTIONS` split; with ``validation_fraction``,
    its train and validation parts together are split again, group-aware, into (1 - fraction, fraction). The test
    part never depends on ``validation_fraction``."""
    train, validation, test = split_groups(labels, groups, POOL_FRACTIONS, seed)
    if validation_fraction is None:
        return [train, validation, test]
    fit, held = split_off_validation(np.sort(np.concatenate([train, validation])), labels, groups,
                                     validation_fraction, seed)
    return [fit, held, test]


@dataclass
class Splits:
    """Index sets into ``images`` (all decoded images of the task): train, validation and test parts.

    ``test_dedup`` (official splits only) is ``test`` minus every image exactly or nearly also in the training
    folder. ``groups`` are the duplicate groups over all images; no group has members in two of train/val/test
    unless an official split put them there (then ``test_dedup`` removes them).
    """

    images: ImageSet
    groups: np.ndarray
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    test_dedup: np.ndarray | None
    official: bool

    def describe(self) -> str:
        text = f"split: train {len(self.train)}, validation {len(self.validation)}, test {len(self.test)}"
        if self.test_dedup is not None:
            text += f" (de-duplicated test {len(self.test_dedup)})"
        return text


def _concatenate(first: ImageSet, second: ImageSet, root: Path) -> ImageSet:
    merged = ImageSet(root=root)
    for part in (first, second):
        merged.paths += part.paths
        merged.images += part.images
        merged.labels += part.labels
        merged.sha256 += part.sha256
        merged.dhash += part.dhash
        merged.modes.update(part.modes)
        merged.skipped += part.skipped
    return merged


def load_and_split(data_dir: Path | str, task: Task, seed: int, validation_fraction: float,
                   progress: bool = True, pool_validation_fraction: float | None = None) -> Splits:
    """Decode ``data_dir`` and split it, duplicate-aware.

    Official split (``Training``/``Testing``): validation is a group-aware ``validation_fraction`` of Training; test
    is Testing. Pool: :func:`split_pool` with ``pool_validation_fraction``.
    """
    data_dir = check_data_dir(data_dir)
    if is_official_split(data_dir):
        training = load_image_folder(data_dir / TRAIN_FOLDER, task, progress)
        testing = load_image_folder(data_dir / TEST_FOLDER, task, progress)
        images = _concatenate(training, testing, data_dir)
        groups = duplicate_groups(images, links=patient_links(images, [data_dir]))
        n_train = len(training)
        train, validation = split_off_validation(np.arange(n_train), images.label_array, groups,
                                                 validation_fraction, seed)
        test = np.arange(n_train, len(images))
        dedup = test[~near_duplicates_of(testing, training)]
        return Splits(images, groups, train, validation, test, dedup, official=True)
    images = load_image_folder(data_dir, task, progress)
    groups = duplicate_groups(images, links=patient_links(images, [data_dir]))
    train, validation, test = split_pool(images.label_array, groups, seed, pool_validation_fraction)
    return Splits(images, groups, train, validation, test, None, official=False)


def cross_validation_parts(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int,
                           validation_fraction: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, validation, test) indices per fold: each fold's test part is one group-aware fold; the
    validation part (for early stopping) is a group-aware ``validation_fraction`` of the rest."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {folds}")
    assignment = fold_ids(labels, groups, folds, seed)
    parts = []
    for fold in range(folds):
        test = np.flatnonzero(assignment == fold)
        rest = np.flatnonzero(assignment != fold)
        parts.append((*split_off_validation(rest, labels, groups, validation_fraction, seed + fold + 1), test))
    return parts


def load_and_split_sources(data_dirs: Sequence[Path | str], task: Task, seed: int, validation_fraction: float,
                           progress: bool = True, pool_validation_fraction: float | None = None) -> Splits:
    """Several ``--data`` folders as one dataset (e.g. an archive export plus an external labelled set).

    Each source keeps its own layout: an official split's ``Testing`` images are test images, its ``Training``
    images are split group-aware into train and validation; a pool is split by :func:`split_pool`. Each source is
    split on its own, so the first gets exactly the split it gets alone. Duplicate
    groups span all sources, and a pool image that duplicates a test image goes to test too. A source may lack
    images of a class (a small export); the training part of all of them together must have every class.
    """
    if len(data_dirs) == 1:
        return load_and_split(data_dirs[0], task, seed, validation_fraction, progress, pool_validation_fraction)
    if not data_dirs:
        raise DataError("no --data folder given")
    dirs = [check_data_dir(d).resolve() for d in data_dirs]
    if len(set(dirs)) != len(dirs):
        raise DataError("the same --data folder is given twice")
    parts: list[tuple[ImageSet, str, int]] = []  # (images, role, source): role is "train", "test" or "pool"
    for number, folder in enumerate(dirs):
        if is_official_split(folder):
            parts.append((load_image_folder(folder / TRAIN_FOLDER, task, progress, allow_empty=True), "train", number))
            parts.append((load_image_folder(folder / TEST_FOLDER, task, progress, allow_empty=True), "test", number))
        else:
            parts.append((load_image_folder(folder, task, progress, allow_empty=True), "pool", number))
    images = ImageSet(root=Path(os.path.commonpath(dirs)))
    roles: list[str] = []
    sources: list[int] = []
    for part, role, number in parts:
        images = _concatenate(images, part, images.root)
        roles += [role] * len(part)
        sources += [number] * len(part)
    if len(images) == 0:
        raise DataError(f"no readable images in any of the --data folders {', '.join(map(str, dirs))}")
    role_array = np.asarray(roles)
    groups = duplicate_groups(images, links=patient_links(images, dirs))
    labels = images.label_array
    test_groups = set(groups[role_array == "test"].tolist())
    pool = np.flatnonzero(role_array == "pool")
    pool_to_test = pool[np.isin(groups[pool], list(test_groups))]
    pool = np.setdiff1d(pool, pool_to_test)
    # Each official source's validation part is drawn from its own Training images alone, so the first source's
    # split is exactly the one it gets on its own: a model fine-tuned from one trained on that source alone is then
    # validated (and calibrated) on images it never trained on.
    source_array = np.asarray(sources)
    official_fit, official_val = [], []
    for number in range(len(dirs)):
        official_train = np.flatnonzero((role_array == "train") & (source_array == number))
        if len(official_train):
            fit, held = split_off_validation(official_train, labels, groups, validation_fraction, seed)
            official_fit.append(fit)
            official_val.append(held)
    pool_parts: list[list[np.ndarray]] = [[], [], []]  # train, validation, test; each pool split on its own too
    for number in range(len(dirs)):
        members = pool[source_array[pool] == number]
        if len(members):
            for bucket, part in zip(pool_parts, split_pool(labels[members], groups[members], seed,
                                                           pool_validation_fraction)):
                bucket.append(members[part])
    train = np.sort(np.concatenate([*official_fit, *pool_parts[0]]).astype(np.int64))
    validation = np.sort(np.concatenate([*official_val, *pool_parts[1]]).astype(np.int64))
    test = np.sort(np.concatenate([np.flatnonzero(role_array == "test"), pool_to_test, *pool_parts[2]])
                   .astype(np.int64))
    missing = [name for label, name in enumerate(task.class_names) if not np.any(labels[train] == label)]
    if missing:
        raise DataError(f"no training images of class(es) {', '.join(missing)} in any of the --data folders")
    if len(test) == 0:
        raise DataError("the --data folders give no test images (add a Testing folder or a pool)")
    seen = images.subset(np.concatenate([train, validation]))
    dedup = test[~near_duplicates_of(images.subset(test), seen)]
    return Splits(images, groups, train, validation, test, dedup, official=True)
