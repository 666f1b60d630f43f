"""Compile and fit a model: optimizer, loss, callbacks and class weights in one place.

Imports Keras only (no TensorFlow), so the same code trains on a Keras-JAX GPU host from numpy arrays and here
from ``tf.data`` pipelines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from models.architectures import Augmentation, with_augmentation


@dataclass
class TrainConfig:
    """Every training choice; recorded in the model card."""

    epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 1e-3
    early_stopping_patience: int = 12
    reduce_lr_patience: int = 4
    min_learning_rate: float = 1e-5
    #: ``plateau``: ReduceLROnPlateau (x0.5) on val_loss. ``cosine``: linear warm-up over ``warmup_epochs``, then
    #: cosine decay to ``min_learning_rate`` at the last epoch; the end of a decayed run is stable, where a plateau
    #: schedule on a noisy val_loss cuts the rate on noise (measured: val accuracy swinging 51-88% between epochs).
    lr_schedule: str = "plateau"
    warmup_epochs: int = 3
    label_smoothing: float = 0.0
    #: Exponential moving average of the weights (Adam's ``use_ema``), e.g. 0.999; ``None``: off. Validation,
    #: best-epoch selection and the saved model then all use the averaged weights (SwapEMAWeights).
    ema_momentum: float | None = None
    #: Keras dtype policy while training: ``mixed_bfloat16`` computes in bfloat16 with float32 weights, for GPUs with
    #: bfloat16 units. On an AVX-512 BF16 CPU a bare training step was 1.34x faster, but whole 140-epoch runs were not
    #: (20.0 against 19.9 s per epoch). The saved model is float32 either way (:func:`build_trainable`).
    precision: str = "float32"
    #: Wall-clock minutes one model (each CV fold too) may train for; ``None``: no limit. ``epochs`` stays the cap.
    #: Training stops at the last epoch boundary that fits, and a cosine schedule is re-planned after every epoch to
    #: end in that epoch, so the rate reaches its floor however fast the machine is (a stop mid-schedule would keep a
    #: high-rate model).
    time_budget_minutes: float | None = None
    class_weights: bool = True
    validation_fraction: float = 0.15
    #: A pool (no official split): the group-aware share of its non-test images held for validation; ``None``: the
    #: study's 70/20/10. The test part is the study's 10% either way, so every model is scored on the same holdout;
    #: a smaller share trains on more of each patient's slices (the pool has no patient IDs).
    pool_validation_fraction: float | None = None
    seed: int = 0
    dropout: float | None = None
    batch_norm: bool = True
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.ema_momentum is not None and not 0.0 < self.ema_momentum < 1.0:
            raise ValueError(f"EMA momentum {self.ema_momentum}: give a number between 0 and 1, e.g. 0.999")
        if self.pool_validation_fraction is not None and not 0.0 < self.pool_validation_fraction < 1.0:
            raise ValueError(f"pool validation fraction {self.pool_validation_fraction}: give a number between 0 and "
                             "1, e.g. 0.1")
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            raise ValueError(f"time budget {self.time_budget_minutes} minutes: give a positive number, e.g. 55")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["augmentation"] = self.augmentation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        values["augmentation"] = Augmentation(**values.get("augmentation", {}))
        return cls(**values)


#: No float16: it needs loss scaling, which Keras adds only when the compiled model itself (here the augmentation
#: wrapper, built in float32) has that policy; bfloat16 has float32's range and needs none.
PRECISIONS = ("float32", "mixed_bfloat16")


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``name`` for the layers built meanwhile, then restored."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_trainable(build: Callable[[], keras.Model], config: TrainConfig) -> tuple[keras.Model, Callable[[], keras.Model]]:
    """``build()`` under the training precision, and a function that returns the trained weights in a float32 model.

    Layers keep their dtype policy in the saved file, so a model trained under a mixed policy would also predict in
    reduced precision (slow where the CPU lacks bfloat16, and not what evaluation measured); the weights themselves
    are float32 under every policy and move over unchanged.
    """
    if config.precision == "float32":
        model = build()
        return model, lambda: model
    with dtype_policy(config.precision):
        model = build()

    def as_float32() -> keras.Model:
        with dtype_policy("float32"):
            saved = build()
        saved.set_weights(model.get_weights())
        return saved

    return model, as_float32


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """``n / (k * count)`` per class, so each class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return {c: float(len(labels) / (num_classes * counts[c])) if counts[c] else 0.0 for c in range(num_classes)}


LR_SCHEDULES = ("plateau", "cosine")


def cosine_schedule(config: TrainConfig, steps_per_epoch: int, epochs: int | None = None
                    ) -> keras.optimizers.schedules.CosineDecay:
    """Linear warm-up over ``warmup_epochs`` to ``learning_rate``, then cosine decay to ``min_learning_rate`` at the
    end of epoch ``epochs`` (default: ``config.epochs``)."""
    epochs = config.epochs if epochs is None else epochs
    warmup = min(config.warmup_epochs, max(epochs - 1, 0)) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 10, warmup_target=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(epochs * steps_per_epoch - warmup, 1),
        alpha=config.min_learning_rate / config.learning_rate,
    )


def learning_rate(config: TrainConfig, steps_per_epoch: int | None) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Adam's learning rate: a number (``plateau``; the callback lowers it; a time-budgeted ``cosine``, which
    :class:`TimeBudget` sets step by step) or the warm-up + cosine schedule."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"learning-rate schedule {config.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if not steps_per_epoch and config.lr_schedule == "cosine":
        raise ValueError("the cosine schedule needs the number of training steps per epoch")
    if config.lr_schedule == "plateau":
        return config.learning_rate
    if config.time_budget_minutes is not None:
        return float(cosine_schedule(config, steps_per_epoch)(0))
    return cosine_schedule(config, steps_per_epoch)


def compile_for_training(model: keras.Model, config: TrainConfig, steps_per_epoch: int | None = None) -> keras.Model:
    """The model to fit: ``model`` behind its augmentation, compiled with Adam and categorical cross-entropy."""
    keras.utils.set_random_seed(config.seed)
    trainable = with_augmentation(model, config.augmentation, seed=config.seed)
    if keras.backend.backend() == "jax":
        # Keras marks its geometric augmentation layers not XLA-safe (a TensorFlow limit), so on JAX every training
        # step would run op by op (measured: ~100x slower on a GPU). On JAX they compile fine.
        for layer in trainable._flatten_layers():
            layer.supports_jit = True
    trainable.compile(
        optimizer=keras.optimizers.Adam(learning_rate(config, steps_per_epoch), use_ema=config.ema_momentum is not None,
                                        ema_momentum=config.ema_momentum or 0.99),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    return trainable


class _EpochLog(keras.callbacks.Callback):
    """One line per epoch (so progress shows in logs without Keras' progress bar), flushed at once."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.epoch_started = time.time()

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs if logs is not None else {}
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items()) if k != "learning_rate")
        print(f"{self.prefix}epoch {epoch + 1}: {shown} lr={lr:.2e} ({time.time() - self.epoch_started:.1f} s)",
              flush=True)
        logs["learning_rate"] = lr  # into the history (and the card) whichever schedule set it


def epochs_that_fit(done: int, elapsed: float, recent_epoch_seconds: list[float], budget: float, cap: int) -> int:
    """How many epochs in all a run may have: the ``done`` ones and as many more as the rest of ``budget`` holds at
    the recent epochs' mean length (recent, so a machine that slows down shortens the plan), at most ``cap``."""
    if not recent_epoch_seconds:
        return cap
    per_epoch = sum(recent_epoch_seconds) / len(recent_epoch_seconds)
    return min(cap, done + max(int((budget - elapsed) // per_epoch), 0))


class TimeBudget(keras.callbacks.Callback):
    """Ends training at the last epoch boundary within ``seconds`` (EarlyStopping then restores the best epoch), and
    says so in a line whenever the planned last epoch changes (retraining's progress reads it).

    With the cosine schedule (and ``steps_per_epoch``) it also drives the rate: after each epoch the plan shrinks to
    the epochs that still fit, and the rate of every step is :func:`cosine_schedule` over the planned epochs.
    """

    def __init__(self, seconds: float, config: TrainConfig, steps_per_epoch: int | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.seconds, self.config, self.steps_per_epoch, self.prefix = seconds, config, steps_per_epoch, prefix
        self.planned = config.epochs
        drives_rate = config.lr_schedule == "cosine" and steps_per_epoch
        self.schedule = cosine_schedule(config, steps_per_epoch) if drives_rate else None
        self.started = self.epoch_started = time.time()
        self.epoch = 0
        self.epoch_seconds: list[float] = []
        self.second_step_started: float | None = None

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        self.started = time.time()

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.epoch, self.epoch_started = epoch, time.time()

    def on_train_batch_begin(self, batch: int, logs: dict[str, float] | None = None) -> None:
        if self.epoch == 0 and batch == 1:
            self.second_step_started = time.time()
        if self.schedule is not None:  # the step counted here: reading the optimizer's would wait for the device
            step = self.epoch * self.steps_per_epoch + batch
            self.model.optimizer.learning_rate = float(keras.ops.convert_to_numpy(self.schedule(step)))

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        now = time.time()
        if epoch == 0 and self.second_step_started is not None and self.steps_per_epoch:
            # The first step traces the training graph (seconds, on a small set most of the epoch): the first
            # epoch's pace is that of the steps after it.
            pace = (now - self.second_step_started) * self.steps_per_epoch / (self.steps_per_epoch - 1)
            self.epoch_seconds.append(min(pace, now - self.epoch_started))
        else:
            self.epoch_seconds.append(now - self.epoch_started)
        if epoch + 1 >= self.config.epochs:
            return  # the cap ends the run anyway
        # Ten epochs: a shared host's epochs alternated between 24 and 41 s, and three made the plan swing 82-117.
        recent = self.epoch_seconds[-10:]
        planned = epochs_that_fit(epoch + 1, now - self.started, recent, self.seconds, self.config.epochs)
        if planned <= epoch + 1:
            print(f"{self.prefix}time budget of {self.seconds / 60:g} min: stopping after epoch {epoch + 1}",
                  flush=True)
            self.model.stop_training = True
        elif planned != self.planned:
            if self.schedule is not None:
                self.schedule = cosine_schedule(self.config, self.steps_per_epoch, planned)
            print(f"{self.prefix}time budget of {self.seconds / 60:g} min: training now ends at epoch {planned}",
                  flush=True)
        self.planned = planned


def training_callbacks(config: TrainConfig, checkpoint_dir: Path | None, prefix: str = "",
                       steps_per_epoch: int | None = None) -> list[Any]:
    """EarlyStopping on val_loss restoring the best weights, best-epoch checkpoint, ReduceLROnPlateau (x0.5) unless
    a cosine schedule sets the rate, and the config's wall-clock budget when it has one.
    With EMA, the averaged weights are swapped in
    before every epoch-end callback, so the best epoch is chosen, checkpointed and restored by its averaged weights."""
    callbacks: list[Any] = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
        ),
        _EpochLog(prefix),
    ]
    if config.time_budget_minutes is not None:
        # After the epoch log, so its line comes before the budget's word on the plan.
        callbacks.append(TimeBudget(config.time_budget_minutes * 60, config, steps_per_epoch, prefix))
    if config.lr_schedule == "plateau":
        callbacks.insert(1, keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=config.reduce_lr_patience, min_lr=config.min_learning_rate
        ))
    if config.ema_momentum is not None:
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        callbacks.append(keras.callbacks.ModelCheckpoint(
            str(checkpoint_dir / "best.weights.h5"), monitor="val_loss", save_best_only=True, save_weights_only=True
        ))
    return callbacks


def fit(
    model: keras.Model,
    train: Any,
    validation: Any,
    train_labels: np.ndarray,
    config: TrainConfig,
    checkpoint_dir: Path | None = None,
    prefix: str = "",
) -> dict[str, list[float]]:
    """Train ``model`` in place; return the per-epoch history.

    ``train``/``validation`` are batched ``tf.data`` datasets of (image, one-hot) or ``(x, y_onehot)`` numpy pairs.
    ``train_labels`` (integers) give the class weights.
    """
    if isinstance(train, tuple):
        steps_per_epoch = -(-len(train[0]) // config.batch_size)
    else:
        cardinality = int(train.cardinality())  # tf.data; negative when unknown
        steps_per_epoch = cardinality if cardinality > 0 else None
    trainable = compile_for_training(model, config, steps_per_epoch)
    num_classes = model.output_shape[-1]
    weights = balanced_class_weights(train_labels, num_classes) if config.class_weights else None
    arguments: dict[str, Any] = dict(
        epochs=config.epochs, validation_data=validation, class_weight=weights, verbose=0,
        callbacks=training_callbacks(config, checkpoint_dir, prefix, steps_per_epoch),
    )
    if isinstance(train, tuple):
        history = trainable.fit(train[0], train[1], batch_size=config.batch_size, shuffle=True, **arguments)
    else:
        history = trainable.fit(train, shuffle=False, **arguments)  # the dataset shuffles itself
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]
