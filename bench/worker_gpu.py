"""The inference worker's own decode-preprocess-predict path against the bare model, on whatever device Keras has.

    .venv/bin/python bench/worker_gpu.py [--task covid-ct] [--series 16] [--slices 32]
        [--syntax uncompressed jpeg2000] [--processes 0 1 2] [--batch-size 32] [--frames-in-flight 512]
        [--sources FILE.npz] [--bare-seconds 5] [--json OUT]
    .venv/bin/python bench/worker_gpu.py --task covid-ct --export-sources .gpu/covid-sources.npz   # for the GPU run

1. Makes ``--series`` series of ``--slices`` slices (CT in HU for covid-ct, 12-bit MR for brain-tumor:
   :mod:`dicom_io.synthesis`) from the images in ../shared/data, or from ``--sources`` (a ``.npz`` of grey images
   that ``--export-sources`` wrote: a host without the data set, such as the GPU machine, gets it that way), and
   writes them to a temporary directory in each ``--syntax`` (``uncompressed``: Explicit VR Little Endian;
   ``jpeg2000``: JPEG 2000 Lossless, pydicom's encoder on pylibjpeg-openjpeg).
2. Bare model: ``Classifier.predict_prepared`` on one prepared batch of ``--batch-size``, again and again:
   images/s of the model alone on the device (the result is copied to the host each call, as the worker does).
3. The worker, per syntax and per ``--processes`` value (0: decoding in the worker's own thread, today's
   single-process path): :class:`worker.decoding.DecodePool` (``prepare_series``: decode, regions, resize) feeding
   :class:`worker.inference.SeriesBatcher` (batches filled across series, model calls under the worker's lock),
   all series of a run given at once as one group of jobs. Images/s = frames / wall time (the pool's start-up is
   not counted: a worker starts it before it takes jobs). Latency per series = its result - the moment its decoding
   was submitted (p50, p95). Device busy = time inside model calls / wall time.

Prints one table (the bare model first), and ``--json`` writes the same figures. On the 2-core development
machines the figures are CPU-only and noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"
PATTERNS = {"brain-tumor": "brain-tumor-mri/Testing/*/*.jpg", "covid-ct": "covid-ct/*/*.png"}
#: Source images a run samples from (and ``--export-sources`` writes): enough for distinct series.
SOURCE_IMAGES = 96


def source_images(task: str, sources: Path | None) -> list[np.ndarray]:
    """Grey 8-bit images to make slices from: ``sources`` (``.npz`` of ``image_0``...) or the data set's first
    :data:`SOURCE_IMAGES` by name (a seeded sample, the same on every host)."""
    from dicom_io.synthesis import load_grey

    if sources is not None:
        with np.load(sources) as saved:
            return [saved[name] for name in sorted(saved.files, key=lambda n: int(n.split("_")[1]))]
    paths = sorted(SHARED_DATA.glob(PATTERNS[task]))
    if not paths:
        raise SystemExit(f"no images match {PATTERNS[task]} under {SHARED_DATA}; pass --sources")
    return [load_grey(path) for path in random.Random(7).sample(paths, min(SOURCE_IMAGES, len(paths)))]


def make_series(task: str, images: list[np.ndarray], count: int, slices: int, syntax: str, directory: Path
                ) -> list[list[Path]]:
    """``count`` series of ``slices`` slices in ``syntax``, each in its own folder under ``directory``."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from dicom_io.synthesis import ct_series, encode, mr_series

    uid = {"uncompressed": ExplicitVRLittleEndian, "jpeg2000": JPEG2000Lossless}[syntax]
    make = mr_series if task == "brain-tumor" else ct_series
    rng = random.Random(11)
    result = []
    for index in range(count):
        folder = directory / syntax / f"series{index:04d}"
        folder.mkdir(parents=True)
        paths = []
        for ds in make([images[rng.randrange(len(images))] for _ in range(slices)]):
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            encode(ds, uid).save_as(path, enforce_file_format=True)
            paths.append(path)
        result.append(paths)
    return result


class TimedModel:
    """Wraps a classifier's ``predict_prepared``: adds up the seconds spent in model calls (device busy)."""

    def __init__(self, classifier: Any) -> None:
        self.seconds = 0.0
        self._predict = classifier.predict_prepared
        classifier.predict_prepared = self  # the classifier's own _run calls it (no domain file) ...
        self._features = getattr(classifier, "_with_features", None)
        if self._features is not None:  # ... or its features model (a domain file): time that one instead
            inner = self._features.predict_on_batch

            def timed(batch: np.ndarray) -> Any:
                started = time.perf_counter()
                try:
                    return [np.asarray(part) for part in inner(batch)]
                finally:
                    self.seconds += time.perf_counter() - started

            self._features.predict_on_batch = timed

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self._predict(batch)
        finally:
            self.seconds += time.perf_counter() - started


def bare_model(classifier: Any, batch: np.ndarray, seconds: float) -> float:
    """Images/s of the model alone on one prepared batch (after a warm-up)."""
    for _ in range(3):
        classifier.predict_prepared(batch)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        classifier.predict_prepared(batch)
        count += len(batch)
    return count / (time.perf_counter() - started)


def worker_run(classifier: Any, timed: TimedModel, series: list[list[Path]], processes: int, batch_size: int,
               frames_in_flight: int) -> dict[str, Any]:
    """The worker's path over every series as one group; images/s, latency per series, device busy fraction."""
    from worker.decoding import DecodePool
    from worker.inference import SeriesBatcher

    pool: DecodePool[int] = DecodePool(processes, frames_in_flight)
    pool.start()
    try:
        submitted: dict[int, float] = {}
        finished: dict[int, float] = {}

        def jobs() -> Iterator[tuple[int, list[Path], int]]:
            for key, paths in enumerate(series):
                submitted[key] = time.perf_counter()
                yield key, paths, len(paths)

        batcher: SeriesBatcher[int] = SeriesBatcher(classifier, batch_size)
        busy_before, frames, started = timed.seconds, 0, time.perf_counter()
        for key, prepared in pool.prepare_all(jobs(), classifier.task.name, classifier.card.input_spec):
            if isinstance(prepared, BaseException):
                raise prepared
            frames += len(prepared)
            for done, _ in batcher.add(key, prepared):
                finished[done] = time.perf_counter()
        for done, _ in batcher.flush():
            finished[done] = time.perf_counter()
        wall = time.perf_counter() - started
    finally:
        pool.close()
    latencies = sorted(finished[key] - submitted[key] for key in finished)
    return {
        "processes": processes,
        "images_per_s": frames / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
        "device_busy": (timed.seconds - busy_before) / wall,
        "frames": frames,
        "wall_s": wall,
    }


def device_name() -> str:
    import keras

    from models.inference import gpu_count

    backend = keras.backend.backend()
    gpus = gpu_count()
    return f"{backend}, {'%d GPU(s)' % gpus if gpus else 'CPU only'}, {os.cpu_count()} cores, {platform.node()}"


def main() -> None:
    from worker.decoding import available_cores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="covid-ct", choices=sorted(PATTERNS))
    parser.add_argument("--series", type=int, default=16)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--syntax", nargs="+", default=["uncompressed", "jpeg2000"], choices=("uncompressed", "jpeg2000"))
    parser.add_argument("--processes", type=int, nargs="+",
                        help="decode process counts to run (default: 0, 1, 2, 4, ... up to the cores)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frames-in-flight", type=int, default=512)
    parser.add_argument("--bare-seconds", type=float, default=5.0)
    parser.add_argument("--model-dir", type=Path, help="default: the task's shipped model")
    parser.add_argument("--sources", type=Path, help=".npz of grey source images (from --export-sources)")
    parser.add_argument("--export-sources", type=Path, help="write the source images to this .npz and stop")
    parser.add_argument("--work-dir", type=Path, help="write the series here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.series < 1 or args.slices < 1 or args.batch_size < 1:
        parser.error("--series, --slices and --batch-size must be at least 1")

    images = source_images(args.task, args.sources)
    if args.export_sources:
        args.export_sources.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.export_sources, **{f"image_{i}": image for i, image in enumerate(images)})
        print(f"wrote {len(images)} source images to {args.export_sources}")
        return
    counts = args.processes
    if counts is None:
        cores = available_cores()
        counts = [0, *sorted({n for n in (1, 2, 4, 8, 12, 15, cores - 1) if 1 <= n < max(2, cores)})]

    from models.inference import Classifier, default_model_dir
    from models.preprocessing import prepare_batch

    classifier = Classifier.load(args.model_dir or default_model_dir(args.task))
    classifier.warm_up(args.batch_size)
    timed = TimedModel(classifier)
    spec = classifier.card.input_spec
    batch = prepare_batch([images[i % len(images)] for i in range(args.batch_size)], spec)
    figures: dict[str, Any] = {"device": device_name(), "task": args.task, "series": args.series,
                               "slices": args.slices, "batch_size": args.batch_size,
                               "input": list(spec.shape), "runs": []}
    print(f"device: {figures['device']}; {args.task}, input {spec.shape}, batch {args.batch_size}", flush=True)
    figures["bare_images_per_s"] = bare_model(classifier, batch, args.bare_seconds)
    print(f"bare model(batch): {figures['bare_images_per_s']:.0f} images/s", flush=True)

    with tempfile.TemporaryDirectory(prefix="worker-gpu-") as scratch:
        work = args.work_dir or Path(scratch)
        for syntax in args.syntax:
            started = time.perf_counter()
            series = make_series(args.task, images, args.series, args.slices, syntax, work)
            size = sum(path.stat().st_size for paths in series for path in paths)
            print(f"\n{syntax}: {args.series} series x {args.slices} slices, {size / 2**20:.0f} MiB "
                  f"(made in {time.perf_counter() - started:.0f} s)", flush=True)
            print(f"{'decode processes':>16} {'images/s':>9} {'x bare':>7} {'p50 s':>7} {'p95 s':>7} {'busy':>6}")
            for processes in counts:
                run = worker_run(classifier, timed, series, processes, args.batch_size, args.frames_in_flight)
                run.update(syntax=syntax, ratio_to_bare=run["images_per_s"] / figures["bare_images_per_s"])
                figures["runs"].append(run)
                print(f"{processes:>16} {run['images_per_s']:>9.0f} {run['ratio_to_bare']:>7.2f} "
                      f"{run['latency_p50_s']:>7.2f} {run['latency_p95_s']:>7.2f} {run['device_busy']:>6.0%}",
                      flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
