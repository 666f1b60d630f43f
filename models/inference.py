"""Load a saved classifier once and predict class probabilities for display images.

A calibrated model (its card's ``calibration``, written by ``dicom-triage calibrate``) reports temperature-scaled
probabilities (:mod:`models.calibration`) and, with its ``domain.npz``, each image's feature distance to the
training images (:mod:`models.domain`); both come out of the one model call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.calibration import apply_temperature
from models.card import CARD_FILE, MODEL_FILE, ModelCard
from models.domain import DomainModel
from models.preprocessing import prepare_batch
from models.tasks import Task, get_task

_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_gpu_configured = threading.Lock()
_gpu_done = False


def default_model_dir(task_name: str) -> Path:
    """The shipped model of a task: ``models/weights/<task>/`` (holding ``model.keras`` and ``card.json``)."""
    return _WEIGHTS_DIR / get_task(task_name).name


def _configure_gpus() -> None:
    """Turn on memory growth on every GPU (once per process), so a worker does not claim a whole card."""
    global _gpu_done
    with _gpu_configured:
        if _gpu_done:
            return
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass  # already initialised by someone else in this process; its setting stands
        _gpu_done = True


def gpu_count() -> int:
    """The GPUs that Keras's backend (TensorFlow, or ``KERAS_BACKEND``: JAX, PyTorch) can run on; 0 when none or when
    the backend cannot be loaded."""
    try:
        import keras

        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            return sum(1 for device in jax.devices() if device.platform == "gpu")
        if backend == "torch":
            import torch

            return torch.cuda.device_count()
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    except Exception:  # no backend that works: no GPU to use either
        return 0


class Classifier:
    """A trained model with its card. Build with :meth:`load`; :meth:`predict` is safe to call repeatedly."""

    def __init__(self, model: "object", card: ModelCard, model_dir: Path, domain: DomainModel | None = None) -> None:
        self._model = model
        self.card = card
        self.model_dir = model_dir
        self.domain = domain
        self.temperature = float(card.calibration.get("temperature", 1.0))
        self._with_features = _with_features(model) if domain is not None else None
        import keras

        #: Whether short batches are padded to the batch size (backends that compile each batch shape anew).
        self._pad_batches = keras.backend.backend() != "tensorflow"

    @classmethod
    def load(cls, model_dir: Path | str) -> "Classifier":
        """Load ``model_dir/model.keras`` and ``model_dir/card.json``; raise a clear error if either is bad."""
        model_dir = Path(model_dir)
        model_file = model_dir / MODEL_FILE
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        if not model_file.is_file():
            raise FileNotFoundError(f"model directory {model_dir} has no {MODEL_FILE}")
        card = ModelCard.load(model_dir / CARD_FILE)
        import keras

        if keras.backend.backend() == "tensorflow":  # on JAX or PyTorch (KERAS_BACKEND) TensorFlow is not needed
            _configure_gpus()

        import models.architectures  # noqa: F401  (registers the custom layers the saved models use)

        try:
            model = keras.saving.load_model(model_file, compile=False)
        except Exception as exc:  # Keras raises many types for a corrupt archive; name the file either way
            raise ValueError(f"{model_file} cannot be loaded as a Keras model: {exc}") from exc
        expected = (None, *card.input_spec.shape)
        if tuple(model.input_shape) != expected or model.output_shape[-1] != len(card.class_names):
            raise ValueError(
                f"{model_file}: input {model.input_shape} / output {model.output_shape} do not match its card "
                f"({expected}, {len(card.class_names)} classes)"
            )
        return cls(model, card, model_dir, DomainModel.load(model_dir))

    @property
    def model(self) -> "object":
        """The loaded ``keras.Model`` (for explanations such as :func:`models.explain.grad_cam`)."""
        return self._model

    @property
    def task(self) -> Task:
        return get_task(self.card.task)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.card.class_names)

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Display images (2-D grey 0..255, any size) -> ``(N, num_classes)`` calibrated probabilities, in class
        order."""
        return self.classify(images, batch_size)[0]

    def classify(self, images: Sequence[np.ndarray], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Display images -> (``(N, num_classes)`` calibrated probabilities, ``(N,)`` feature distances to the
        training images, or ``None`` for a model without a domain file)."""
        if len(images) == 0:
            return self.classify_prepared(np.zeros((0, *self.card.input_spec.shape), np.float32), batch_size)
        return self.classify_prepared(prepare_batch(images, self.card.input_spec), batch_size)

    def classify_prepared(self, inputs: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`classify` for model inputs already prepared (``(N, H, W, C)`` from :func:`prepare_batch`, e.g. by
        the worker's decoding processes), ``batch_size`` rows per model call."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if len(inputs) == 0:
            num_classes = len(self.card.class_names)
            return np.zeros((0, num_classes), dtype=np.float32), None if self.domain is None else np.zeros(0)
        outputs = []
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            if self._pad_batches and len(batch) < batch_size:
                # JAX and PyTorch compile one graph per batch shape (TensorFlow relaxes the shape once, see
                # warm_up): a short last batch is padded to the full size rather than compiled again mid-job.
                padding = np.zeros((batch_size - len(batch), *batch.shape[1:]), dtype=batch.dtype)
                probabilities, distances = self._run(np.concatenate([batch, padding]))
                outputs.append((probabilities[:len(batch)], None if distances is None else distances[:len(batch)]))
            else:
                outputs.append(self._run(batch))
        return _joined(outputs)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self._with_features is None or self.domain is None:
            return self.predict_prepared(batch), None
        features, raw = self._with_features.predict_on_batch(batch)  # type: ignore[attr-defined]
        return apply_temperature(np.asarray(raw), self.temperature), self.domain.distance(np.asarray(features))

    def features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model input -> (penultimate features ``(N, D)``, raw uncalibrated probabilities): what calibration fits."""
        model = self._with_features or _with_features(self._model)
        features, raw = model.predict_on_batch(batch)
        return np.asarray(features, dtype=np.float32), np.asarray(raw, dtype=np.float32)

    def warm_up(self, batch_size: int) -> None:
        """Trace the model now rather than in the first request: Keras compiles a graph for the first batch shape and
        a second one, shape-relaxed, for the next different shape (half a second each on a CPU); every later batch
        size reuses the relaxed one."""
        sizes = (batch_size,) if self._pad_batches else (batch_size, max(1, batch_size // 2))
        for size in dict.fromkeys(sizes):
            self._run(np.zeros((size, *self.card.input_spec.shape), dtype=np.float32))

    def predict_prepared(self, batch: np.ndarray) -> np.ndarray:
        """Model input ``(N, H, W, C)`` float32 0..255 (from :func:`prepare_batch`) -> probabilities."""
        # predict_on_batch runs a compiled graph without predict()'s per-call dataset set-up: 2.5x an eager call.
        return apply_temperature(np.asarray(self._model.predict_on_batch(batch)), self.temperature)


def _joined(outputs: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-batch (probabilities, distances) -> all rows of each, in order (``None`` distances stay ``None``)."""
    probabilities = np.concatenate([p for p, _ in outputs])
    distances = [d for _, d in outputs if d is not None]
    return probabilities, np.concatenate(distances) if distances else None


def _with_features(model: "object") -> "object":
    """The model with a second output: the input of its softmax layer (``probabilities``), from the same pass."""
    import keras

    layer = model.get_layer("probabilities")  # type: ignore[attr-defined]
    return keras.Model(model.inputs, [layer.input, model.output])  # type: ignore[attr-defined]
