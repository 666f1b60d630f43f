"""Prepare compact training data for the GPU host (bench/train_gpu.py), which has Keras-JAX but no TensorFlow.

Decodes and splits each dataset here with the production code (training.data), passes every image through the
production preprocessing (models.preprocessing.prepare_batch) at each needed input size, and writes
``.gpu/<task>-<H>x<W>.npz``: grey inputs rounded to uint8 (a <= 0.5 grey-level change, so the arrays compress),
labels, the split and cross-validation indices, and the manifest hashes the model card records. Images are stored
as concatenated image files (``png`` bytes + ``offsets``): PNG (lossless), or with ``--codec jpeg|webp --quality
N`` a lossy copy, whose mean error of 1-2 grey levels acts as mild noise in training and lets both tasks fit one
64 MiB device call (WebP: about 0.65x JPEG's bytes at equal quality; the shipped models are evaluated here on the
original files either way).

    .venv/bin/python bench/train_gpu_data.py --data ../shared/data --out .gpu --size brain-tumor=128 --size covid-ct=160
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.preprocessing import InputSpec, prepare_batch
from models.tasks import get_task
from training.data import cross_validation_parts, load_and_split

DATA_FOLDERS = {"brain-tumor": "brain-tumor-mri", "covid-ct": "covid-ct"}
SEED, VALIDATION_FRACTION, CV_FOLDS = 0, 0.15, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding brain-tumor-mri/ and covid-ct/")
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--codec", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--quality", type=int, default=90, help="jpeg/webp quality")
    parser.add_argument("--size", action="append", required=True, help="TASK=SIDE[,SIDE...], e.g. covid-ct=160,64")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for item in args.size:
        task_name, sides = item.split("=")
        task = get_task(task_name)
        splits = load_and_split(args.data / DATA_FOLDERS[task.name], task, SEED, VALIDATION_FRACTION, progress=False)
        labels = splits.images.label_array
        arrays: dict[str, np.ndarray] = {"labels": labels, "train": splits.train, "validation": splits.validation,
                                         "test": splits.test}
        if splits.test_dedup is not None:
            arrays["test_dedup"] = splits.test_dedup
        else:
            for fold, (train, validation, test) in enumerate(
                    cross_validation_parts(labels, splits.groups, CV_FOLDS, SEED, VALIDATION_FRACTION)):
                arrays.update({f"cv{fold}_train": train, f"cv{fold}_validation": validation, f"cv{fold}_test": test})
        meta = {
            "task": task.name, "seed": SEED, "validation_fraction": VALIDATION_FRACTION, "official": splits.official,
            "split": splits.describe(), "dataset_manifest_sha256": splits.images.manifest_sha256(),
            "test_manifest_sha256": splits.images.subset(splits.test).manifest_sha256(),
            "skipped_files": [str(p) for p, _ in splits.images.skipped],
            "codec": args.codec if args.codec == "png" else f"{args.codec} quality {args.quality}",
        }
        for side in sides.split(","):
            spec = InputSpec(int(side), int(side), 1)
            x = np.concatenate([prepare_batch(splits.images.images[i:i + 256], spec)
                                for i in range(0, len(labels), 256)])
            path = args.out / f"{task.name}-{side}x{side}.npz"
            blobs = []
            for image in np.round(x[..., 0]).astype(np.uint8):
                buffer = io.BytesIO()
                if args.codec == "png":
                    Image.fromarray(image).save(buffer, "PNG", optimize=True)
                else:
                    Image.fromarray(image).save(buffer, args.codec.upper(), quality=args.quality)
                blobs.append(buffer.getvalue())
            offsets = np.cumsum([0] + [len(b) for b in blobs])
            np.savez(path, png=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, meta=json.dumps(meta),
                     **arrays)
            print(f"{path}: {x.shape} {path.stat().st_size / 2**20:.1f} MiB; {splits.describe()}")


if __name__ == "__main__":
    main()
