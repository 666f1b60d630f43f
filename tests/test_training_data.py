"""training.data: bad input is named, nothing is skipped silently, duplicate groups never straddle a split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.tasks import BRAIN_TUMOR, COVID_CT
from training.data import (
    DataError,
    cross_validation_parts,
    duplicate_groups,
    load_and_split,
    load_and_split_sources,
    load_image_folder,
    split_groups,
    split_pool,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")


def covid_pool(root: Path, per_class: int = 12) -> Path:
    for name in COVID_CT.class_names:
        (root / name).mkdir(parents=True)
        prefix = "Covid" if name == "COVID" else "Non-Covid"
        for number in range(1, per_class + 1):
            shutil.copy(DATA / "covid-ct" / name / f"{prefix} ({number + 200}).png", root / name)
    return root


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"--data .*nowhere: does not exist"):
        load_image_folder(tmp_path / "nowhere", COVID_CT)


def test_class_folders_that_do_not_match_the_task(tmp_path):
    root = covid_pool(tmp_path / "pool", 2)
    (root / "pneumonia").mkdir()
    with pytest.raises(DataError, match="unexpected folder\\(s\\) pneumonia"):
        load_image_folder(root, COVID_CT)
    with pytest.raises(DataError, match="missing folder\\(s\\) glioma, meningioma, notumor, pituitary"):
        load_image_folder(root, BRAIN_TUMOR)


def test_empty_class_folder_is_named(tmp_path):
    root = covid_pool(tmp_path / "pool", 2)
    for path in (root / "non-COVID").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="non-COVID: no readable images in class folder 'non-COVID'"):
        load_image_folder(root, COVID_CT)


def test_unreadable_files_are_skipped_counted_and_listed(tmp_path):
    root = covid_pool(tmp_path / "pool", 3)
    good = next((root / "COVID").iterdir())
    truncated = root / "COVID" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    (root / "COVID" / "notes.txt").write_text("not an image")
    (root / "non-COVID" / "garbage.jpg").write_bytes(b"\x00" * 100)
    images = load_image_folder(root, COVID_CT, progress=False)
    assert len(images) == 6
    skipped = {path.name: reason for path, reason in images.skipped}
    assert set(skipped) == {"truncated.png", "notes.txt", "garbage.jpg"}
    assert "not an image file" in skipped["notes.txt"]
    report = images.report()
    assert "skipped 3 file(s)" in report and "truncated.png" in report


def test_mixed_grey_rgb_rgba_files_become_grey(tmp_path):
    root = covid_pool(tmp_path / "pool", 2)
    source = next((root / "COVID").iterdir())
    grey = np.asarray(Image.open(source).convert("L"))
    Image.fromarray(np.stack([grey] * 3, -1)).save(root / "COVID" / "rgb.png")
    Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)])).save(root / "COVID" / "rgba.png")
    images = load_image_folder(root, COVID_CT, progress=False)
    assert images.modes["RGB"] == 1 and images.modes["RGBA"] == 1 and images.modes["L"] == 4
    by_name = {p.name: im for p, im in zip(images.paths, images.images)}
    np.testing.assert_array_equal(by_name["rgb.png"], grey)
    np.testing.assert_array_equal(by_name["rgba.png"], grey)
    assert "RGB: 1" in images.report()


def test_exact_and_near_duplicates_share_a_group_and_never_straddle(tmp_path):
    root = covid_pool(tmp_path / "pool", 12)
    source = root / "COVID" / "Covid (201).png"
    shutil.copy(source, root / "COVID" / "exact-copy.png")
    with Image.open(source) as image:  # a re-encoded, slightly resized copy: near, not exact
        image.convert("L").resize((image.width - 6, image.height - 4)).save(root / "COVID" / "near-copy.jpg", quality=90)
    images = load_image_folder(root, COVID_CT, progress=False)
    groups = duplicate_groups(images)
    index = {p.name: i for i, p in enumerate(images.paths)}
    assert groups[index["exact-copy.png"]] == groups[index["Covid (201).png"]] == groups[index["near-copy.jpg"]]
    assert len(set(groups.tolist())) == len(images) - 2  # and nothing else was merged
    for seed in range(5):
        parts = split_groups(images.label_array, groups, (0.7, 0.2, 0.1), seed)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(images)))
        owners = [{int(groups[i]) for i in part} for part in parts]
        assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])


def test_pool_split_is_stratified_and_seeded(tmp_path):
    root = covid_pool(tmp_path / "pool", 20)
    first = load_and_split(root, COVID_CT, seed=0, validation_fraction=0.15, progress=False)
    again = load_and_split(root, COVID_CT, seed=0, validation_fraction=0.15, progress=False)
    np.testing.assert_array_equal(first.test, again.test)
    assert (len(first.train), len(first.validation), len(first.test)) == (28, 8, 4)
    assert np.bincount(first.images.label_array[first.test]).tolist() == [2, 2]


def test_pool_validation_fraction_moves_validation_images_to_train_never_test_images():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 200)
    groups = rng.integers(0, 150, 400)
    groups[labels == 1] += 1000
    train, validation, test = split_pool(labels, groups, seed=0)
    for fraction in (0.05, 0.3):
        fit, val, same_test = split_pool(labels, groups, seed=0, validation_fraction=fraction)
        np.testing.assert_array_equal(same_test, test)  # one holdout, whatever the validation share
        assert sorted(np.concatenate([fit, val]).tolist()) == sorted(np.concatenate([train, validation]).tolist())
        assert abs(len(val) / (len(fit) + len(val)) - fraction) < 0.03
        assert not set(groups[fit]) & set(groups[val])
        assert np.bincount(labels[val]).min() > 0  # stratified: both classes validate


def test_cross_validation_folds_partition_and_respect_groups():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    groups = rng.integers(0, 40, 100)
    groups[labels == 1] += 100  # groups within a class
    tests = []
    for train, validation, test in cross_validation_parts(labels, groups, 5, seed=0, validation_fraction=0.15):
        assert not set(groups[train]) & set(groups[test]) and not set(groups[validation]) & set(groups[test])
        assert not set(groups[train]) & set(groups[validation])
        tests.append(test)
    assert sorted(np.concatenate(tests).tolist()) == list(range(100))


def test_official_split_dedup_removes_testing_copies_of_training(tmp_path):
    root = tmp_path / "brain"
    for split, count in (("Training", 6), ("Testing", 3)):
        for name in BRAIN_TUMOR.class_names:
            (root / split / name).mkdir(parents=True)
            for path in sorted((DATA / "brain-tumor-mri" / split / name).iterdir())[:count]:
                shutil.copy(path, root / split / name)
    leaked = sorted((root / "Training" / "glioma").iterdir())[0]
    shutil.copy(leaked, root / "Testing" / "glioma" / "leaked.jpg")
    splits = load_and_split(root, BRAIN_TUMOR, seed=0, validation_fraction=0.25, progress=False)
    names = {splits.images.paths[i].name for i in splits.test_dedup}
    assert "leaked.jpg" not in names and len(splits.test) == 13 and len(splits.test_dedup) <= 12
    # Validation is carved group-aware from Training only.
    assert set(splits.train.tolist() + splits.validation.tolist()) == set(range(24))


def _brain_official(root: Path, offset: int, training: int, testing: int) -> Path:
    for split, count in (("Training", training), ("Testing", testing)):
        for name in BRAIN_TUMOR.class_names:
            (root / split / name).mkdir(parents=True)
            for path in sorted((DATA / "brain-tumor-mri" / split / name).iterdir())[offset:offset + count]:
                shutil.copy(path, root / split / name)
    return root


@pytest.mark.parametrize("layout", ["official", "pool"])
def test_the_first_source_is_split_as_it_is_alone(tmp_path, layout):
    """A model fine-tuned from one trained on the first source alone must be validated on images it never saw:
    adding a second source (an export of real series) leaves the first source's train, validation and test parts
    exactly as they are without it."""
    if layout == "official":
        task, first = BRAIN_TUMOR, _brain_official(tmp_path / "curated", 0, 12, 3)
        second = _brain_official(tmp_path / "export", 40, 5, 2)
    else:
        task, first = COVID_CT, covid_pool(tmp_path / "curated", per_class=30)
        second = tmp_path / "export"
        for split in ("Training", "Testing"):
            for name in COVID_CT.class_names:
                (second / split / name).mkdir(parents=True)
                prefix = "Covid" if name == "COVID" else "Non-Covid"
                for number in range(5 if split == "Training" else 2):
                    shutil.copy(DATA / "covid-ct" / name / f"{prefix} ({number + 400 + 10 * len(split)}).png",
                                second / split / name)
    alone = load_and_split(first, task, seed=3, validation_fraction=0.2, progress=False)
    both = load_and_split_sources([first, second], task, seed=3, validation_fraction=0.2, progress=False)

    def names(splits, indices, root):
        return sorted(splits.images.paths[i].relative_to(root).as_posix() for i in indices
                      if splits.images.paths[i].is_relative_to(root))

    for part in ("train", "validation", "test"):
        expected = names(alone, getattr(alone, part), first)
        assert expected and names(both, getattr(both, part), first) == expected, part
    # The second source lands in every part it has images for, and nowhere twice.
    export_parts = [names(both, getattr(both, part), second) for part in ("train", "validation", "test")]
    assert all(export_parts[:1]) and export_parts[2]
    assert sum(len(p) for p in export_parts) == len(set(sum(export_parts, []))) == (28 if layout == "official"
                                                                                    else 14)
