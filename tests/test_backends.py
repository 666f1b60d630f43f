"""The worker's backends: the shipped ``model.keras`` and the same preprocessing give the same probabilities on
TensorFlow (the default) and on JAX (``KERAS_BACKEND=jax``, what a GPU host without TensorFlow's GPU build runs).

Each backend runs in its own child process (a process has one Keras backend), once for both tasks; the JAX one cannot
import TensorFlow (tests/backend_probe.py), so the test also fails if the inference path comes to need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROBE = Path(__file__).resolve().parent / "backend_probe.py"
#: The issue's bound: a probability may differ by float rounding across backends, no more.
SAME_PROBABILITY = 1e-4
#: Per task: the dataset's class folders (a few images of each, the first by name).
CASES = {
    "covid-ct": [DATA / "covid-ct" / "COVID", DATA / "covid-ct" / "non-COVID"],
    "brain-tumor": [DATA / "brain-tumor-mri" / "Testing" / name
                    for name in ("glioma", "meningioma", "notumor", "pituitary")],
}


def _probe(backend: str, cases: dict[str, list[Path]], out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every task's results on ``backend``, from one child process."""
    out.mkdir()
    (out / "cases.json").write_text(json.dumps({task: list(map(str, images)) for task, images in cases.items()}))
    env = {**os.environ, "KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(PROBE), str(out), str(out / "cases.json")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{backend} probe failed:\n{done.stderr[-3000:]}"
    probed = {}
    for task in cases:
        with np.load(out / f"{task}.npz") as saved:
            probed[task] = {name: saved[name] for name in saved.files}
    return probed


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Per backend, per task: the probe's results on a few images of each class (the first by name)."""
    if not all(folder.is_dir() for folders in CASES.values() for folder in folders):
        pytest.skip("../shared/data is not present")
    cases = {task: [path for folder in folders for path in sorted(folder.iterdir())[:6]]
             for task, folders in CASES.items()}
    out = tmp_path_factory.mktemp("backends")
    return {backend: _probe(backend, cases, out / backend) for backend in ("tensorflow", "jax")}


@pytest.mark.parametrize("task", sorted(CASES))
def test_shipped_model_gives_the_same_probabilities_on_tensorflow_and_jax(
    task: str, probed: dict[str, dict[str, dict[str, np.ndarray]]]
) -> None:
    folders = CASES[task]
    images = [path for folder in folders for path in sorted(folder.iterdir())[:6]]
    tf, jax = probed["tensorflow"][task], probed["jax"][task]
    assert (str(tf["backend"]), str(jax["backend"])) == ("tensorflow", "jax")
    assert tf["probabilities"].shape == (len(images), len(folders))
    np.testing.assert_allclose(jax["probabilities"], tf["probabilities"], rtol=0, atol=SAME_PROBABILITY)
    # The domain check's feature distances come from the same pass: equal to float rounding as well.
    np.testing.assert_allclose(jax["distances"], tf["distances"], rtol=1e-4, atol=1e-3)
