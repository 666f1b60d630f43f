"""Series inference: batch shapes, and a real series through a real (tiny) model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dicom_factory import brain_images, write_files
from dicom_io.synthesis import encode, mr_series
from models.architectures import build_model, default_input_spec
from models.card import ModelCard
from models.inference import Classifier
from models.preprocessing import prepare_batch
from models.tasks import BRAIN_TUMOR, COVID_CT
from worker.decoding import DecodePool, PreparedSeries, default_decode_processes
from worker.inference import (
    ModelCache,
    SeriesBatcher,
    classify_series_files,
    predict_in_batches,
    prepare_for,
)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    folder = tmp_path_factory.mktemp("models") / "brain-tumor"
    folder.mkdir()
    spec = default_input_spec("triage-cnn", BRAIN_TUMOR)
    build_model("triage-cnn", BRAIN_TUMOR, spec, widths=(4, 8), blocks=(1, 1)).save(folder / "model.keras")
    ModelCard(task="brain-tumor", class_names=list(BRAIN_TUMOR.class_names), architecture="triage-cnn",
              input_spec=spec, name="tiny").save(folder)
    return ModelCache(folder.parent).get("brain-tumor")


def test_batches_do_not_change_predictions(classifier: Classifier) -> None:
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, (100, 120)).astype(np.float32) for _ in range(5)]
    batched, distances = predict_in_batches(classifier, prepare_batch(images, classifier.card.input_spec), 4)  # 4+1
    assert distances is None  # the tiny model has no domain file
    assert batched.shape == (5, len(BRAIN_TUMOR.class_names))
    np.testing.assert_allclose(batched, classifier.predict(images, batch_size=5), rtol=1e-5, atol=1e-6)


def test_classify_a_compressed_series(classifier: Classifier, tmp_path: Path) -> None:
    from pydicom.uid import RLELossless

    # Not a post-contrast series: the tiny model's likeliest class is chance, and pituitary there is reported
    # indeterminate (worker.decoding.finding_caveats), which is not what this test is about.
    series = [encode(ds, RLELossless) for ds in mr_series(brain_images(3), series_description="AX T1")]
    paths = write_files(series, tmp_path)
    result = classify_series_files(list(reversed(paths)), classifier, batch_size=32)
    assert result.label in BRAIN_TUMOR.class_names
    assert abs(sum(result.probabilities.values()) - 1) < 1e-4
    # Slices come back in spatial order with their SOP Instance UIDs, whatever order the files were given in.
    assert [s["sop_instance_uid"] for s in result.slice_probabilities] == [ds.SOPInstanceUID for ds in series]
    assert all(len(s["probabilities"]) == 4 and s["frame"] == 1 for s in result.slice_probabilities)


def test_a_file_without_pixel_data_is_a_clear_error(classifier: Classifier, tmp_path: Path) -> None:
    [ds] = mr_series(brain_images(1))
    del ds.PixelData
    with pytest.raises(ValueError, match="no Pixel Data"):
        classify_series_files(write_files([ds], tmp_path), classifier, batch_size=8)


def test_batcher_fills_batches_across_series(classifier: Classifier, tmp_path: Path) -> None:
    # Three series of three slices, batches of four: the first batch takes all of series 0 and one slice of
    # series 1, and each series' result comes as soon as its last slice is predicted.
    paths = [write_files(mr_series(brain_images(3, seed=seed)), tmp_path / str(seed)) for seed in (1, 2, 3)]
    shapes: list[int] = []
    predict = classifier.predict_prepared

    def recording(batch: np.ndarray) -> np.ndarray:
        shapes.append(len(batch))
        return predict(batch)

    batcher: SeriesBatcher[int] = SeriesBatcher(classifier, batch_size=4)
    classifier.predict_prepared = recording  # type: ignore[method-assign]
    try:
        done = [[key for key, _ in batcher.add(index, prepare_for(classifier, p))] for index, p in enumerate(paths)]
        flushed = batcher.flush()
    finally:
        del classifier.predict_prepared
    assert done == [[], [0], [1]] and [key for key, _ in flushed] == [2]
    assert shapes == [4, 4, 1]
    batcher = SeriesBatcher(classifier, batch_size=4)
    results = {key: c for index, p in enumerate(paths) for key, c in batcher.add(index, prepare_for(classifier, p))}
    results.update(batcher.flush())
    for index, p in enumerate(paths):  # the same as classifying each series alone
        alone = classify_series_files(p, classifier, batch_size=32)
        assert results[index].label == alone.label
        for a, b in zip(results[index].slice_probabilities, alone.slice_probabilities):
            assert a["sop_instance_uid"] == b["sop_instance_uid"]
            np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5)


def test_decode_pool_gives_what_the_worker_thread_gives_in_order_and_errors_stay_per_series(
        classifier: Classifier, tmp_path: Path) -> None:
    paths = [write_files(mr_series(brain_images(3, seed=seed)), tmp_path / str(seed)) for seed in (4, 5, 6)]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM at all")
    series = [(0, paths[0], 3), (1, [broken], 1), (2, paths[1], 3), (3, paths[2], 3)]
    task, spec = classifier.task.name, classifier.card.input_spec
    inline = list(DecodePool[int](0, 4).prepare_all(series, task, spec))
    pool: DecodePool[int] = DecodePool(2, max_frames_in_flight=4)  # at most two 3-slice series ahead: the cap
    try:
        pooled = list(pool.prepare_all(series, task, spec))
    finally:
        pool.close()
    assert [key for key, _ in pooled] == [0, 1, 2, 3] == [key for key, _ in inline]
    assert isinstance(pooled[1][1], Exception) and isinstance(inline[1][1], Exception)
    for (_, a), (_, b) in zip(pooled, inline):
        if isinstance(a, PreparedSeries) and isinstance(b, PreparedSeries):
            assert a.keys == b.keys and a.regions == b.regions
            np.testing.assert_array_equal(a.inputs, b.inputs)


@pytest.mark.parametrize(("cores", "processes"), [(1, 0), (2, 0), (3, 0), (4, 3), (16, 15)])
def test_decode_processes_default_to_the_cores_but_one_from_four_cores(cores: int, processes: int) -> None:
    assert default_decode_processes(cores) == processes


@pytest.mark.parametrize(("processes", "frames"), [(-1, 8), (1, 0)])
def test_a_decode_pool_refuses_a_nonsense_size(processes: int, frames: int) -> None:
    with pytest.raises(ValueError, match="decode processes|frames in flight"):
        DecodePool(processes, frames)


def test_a_decode_pool_keeps_to_its_frames_in_flight(classifier: Classifier, tmp_path: Path) -> None:
    paths = write_files(mr_series(brain_images(3, seed=7)), tmp_path)
    pulled: list[int] = []

    def series() -> Iterator[tuple[int, list[Path], int]]:
        for key in range(6):
            pulled.append(key)
            yield key, paths, 3

    pool: DecodePool[int] = DecodePool(1, max_frames_in_flight=4)
    ahead = []
    try:
        for received, (key, prepared) in enumerate(pool.prepare_all(series(), classifier.task.name,
                                                                    classifier.card.input_spec)):
            assert key == received and isinstance(prepared, PreparedSeries)
            ahead.append(3 * (len(pulled) - received - 1))  # frames taken from the queue and not yet received
    finally:
        pool.close()
    # At most the cap plus the series that asked for room (3 frames); without a cap all 15 others would be ahead.
    assert max(ahead) <= 4 + 3 and len(ahead) == 6
