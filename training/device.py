"""What a model is trained on, in words for its card and for benchmark reports."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown processor"


def training_device() -> str:
    """The GPUs TensorFlow trains on (``GPU: <name>, ...``), else ``CPU: <processor>, <n> cores``; the card keeps it
    so that a training time can be read against the machine that took it."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
        return "GPU: " + ", ".join(names)
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores"
