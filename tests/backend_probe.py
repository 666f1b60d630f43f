"""Run by tests/test_backends.py in a child process: the shipped models' probabilities on the backend that
``KERAS_BACKEND`` names, one ``.npz`` per task.

``python tests/backend_probe.py OUT_DIR CASES.json``, where CASES.json maps each task to its image files; writes
``OUT_DIR/TASK.npz``. One process does every task: starting Keras and its backend is most of a probe's time.
On a backend other than TensorFlow, TensorFlow is made
unimportable first: the GPU hosts that run the worker on JAX or PyTorch have no TensorFlow, so nothing on the
inference path may need it.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
from pathlib import Path


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    """Makes ``import tensorflow`` fail as on a host without it. (Not ``sys.modules["tensorflow"] = None``: Keras
    asks whether ``"tensorflow" in sys.modules`` to tell a TensorFlow graph, and would then need it.)"""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/backend_probe.py)", name=name)
        return None


def main(out_dir: Path, cases: dict[str, list[str]]) -> None:
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        sys.meta_path.insert(0, _NoTensorFlow())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import keras
    import numpy as np

    from models.imagefiles import read_grey_image
    from models.inference import Classifier, default_model_dir

    for task, images in cases.items():
        classifier = Classifier.load(default_model_dir(task))
        probabilities, distances = classifier.classify([read_grey_image(Path(path)) for path in images], batch_size=8)
        np.savez(out_dir / f"{task}.npz", backend=keras.backend.backend(), probabilities=probabilities,
                 distances=np.full(len(images), np.nan) if distances is None else distances)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
