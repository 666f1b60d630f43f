"""The model card: a JSON file beside each saved model saying what it is, how it was made and how good it is."""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.preprocessing import InputSpec
from models.tasks import get_task

CARD_FILE = "card.json"
MODEL_FILE = "model.keras"

#: Licence notes by task, recorded in every card so a model's data terms travel with it.
LICENCE_NOTES: dict[str, str] = {
    "brain-tumor": (
        "Trained on the Kaggle 'Brain Tumor MRI Dataset' (M. Nickparvar; given as CC0-1.0 by third parties, not "
        "verified), which includes Cheng et al.'s figshare brain tumour dataset (CC BY 4.0): credit it."
    ),
    "covid-ct": (
        "Trained on the SARS-CoV-2 CT-scan dataset (Soares et al., medRxiv 2020, doi:10.1101/2020.04.24.20078584), "
        "licensed CC BY-NC-SA 4.0: NonCommercial and ShareAlike. Research and testing use only; not for a "
        "commercial product without the authors' permission. This model is a derivative work under the same terms."
    ),
}


def new_model_uid() -> str:
    """A DICOM UID for a newly trained model, in the 2.25 (UUID-derived) form, so no registered root is needed."""
    return f"2.25.{uuid.uuid4().int}"


def code_version() -> str:
    """The git commit of this source tree (with ``+dirty`` if it has changes), or ``unknown`` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "models", "training"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


@dataclass
class ModelCard:
    """Everything known about one trained model. ``metrics`` is keyed by split name (``testing``,
    ``testing_dedup``, ``holdout``, ``cv5``, ...), each a dict holding at least ``accuracy``."""

    task: str
    class_names: list[str]
    architecture: str
    input_spec: InputSpec
    name: str = ""
    version: str = "1"
    uid: str = field(default_factory=new_model_uid)
    training: dict[str, Any] = field(default_factory=dict)
    dataset_manifest_sha256: str = ""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    code_version: str = field(default_factory=code_version)
    licence: str = ""
    #: How the raw softmax is turned into the reported probabilities and decisions (empty: not calibrated):
    #: ``temperature``, ``threshold`` (the operating point on the series suspicion) and how each was chosen, and
    #: ``domain`` (the feature-distance threshold of :mod:`models.domain`). Written by ``dicom-triage calibrate``.
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        task = get_task(self.task)  # raises KeyError naming the known tasks
        if tuple(self.class_names) != task.class_names:
            raise ValueError(
                f"card class names {list(self.class_names)} differ from task {task.name}'s {list(task.class_names)}"
            )
        self.class_names = list(self.class_names)
        if not self.name:
            self.name = f"{self.task}-{self.architecture}"
        if not self.licence:
            self.licence = LICENCE_NOTES.get(self.task, "")

    @property
    def split_seed(self) -> int | None:
        """The seed that drew this model's train/validation/test split: recorded apart from the training seed (a run
        may keep the split while changing that), else the training seed; ``None`` when no training is recorded."""
        return self.training.get("split_seed", self.training.get("config", {}).get("seed"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_spec"] = self.input_spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model card fields: {', '.join(sorted(unknown))}")
        values = dict(data)
        values["input_spec"] = InputSpec.from_dict(values["input_spec"])
        return cls(**values)

    def save(self, path: Path | str) -> Path:
        """Write the card to ``path`` (a file, or a model directory to hold ``card.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "ModelCard":
        """Read a card from ``path`` (a file, or a model directory holding ``card.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"model card {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"model card {path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"model card {path} is invalid: {exc}") from None
