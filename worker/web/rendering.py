"""Images for the study page, rendered once and cached on disk under ``data_dir/web-cache``.

* Thumbnails: a frame's display image (:func:`dicom_io.imaging.display_frames`: modality LUT and windowing),
  shrunk to fit 256 px, as PNG.
* Axial slices: a volume the model read as axial slices cut from it (:func:`worker.decoding.decode_series`, the
  worker's own path) shown as the model saw them, before the crop. The first request cuts the volume and writes
  every slice's thumbnail (cutting takes seconds; the page asks for dozens of slices at once).
* Heat maps: the frame at the model's input, with the Grad-CAM map (:func:`models.explain.grad_cam`) of the
  result's label blended over it. Only the model that made the result may explain it (found by its uid); when
  its files are gone the heat map is refused rather than drawn by a different model. An indeterminate result names
  no class, so it has no heat map (the route answers 422 saying so; a class' map would explain a decision the
  model did not make).

Cache files are written to a temporary name and renamed, so concurrent requests never see half a PNG. Their names
are derived from SOP Instance UIDs and model uids, which do not change when a database is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

THUMBNAIL_SIZE = 256
_SAFE_NAME = re.compile(r"^[0-9A-Za-z._-]{1,64}$")
_gradcam_lock = threading.Lock()  # one Grad-CAM at a time: TF already uses every core for one
_reformat_lock = threading.Lock()  # one volume cut at a time: the page's requests for its slices arrive together
_LOADED_MODELS = 4  # classifiers kept in memory, by model uid


class RenderError(Exception):
    """A picture cannot be made (undecodable pixel data, missing model...); the message is safe to show."""


def _safe(name: str) -> str:
    # UIDs are digits and dots; anything else (a broken header) is hashed rather than trusted as a file name.
    return name if _SAFE_NAME.match(name) and name not in (".", "..") else hashlib.sha256(name.encode()).hexdigest()


def _cached_png(path: Path, render: Callable[[], Image.Image]) -> Path:
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    image = render()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def display_frame(archive_path: Path, frame: int) -> np.ndarray:
    """Frame ``frame`` (1-based) of the archived instance as a grey display image 0..255."""
    from dicom_io.imaging import ImagingError, display_frames

    try:
        frames = display_frames(dcmread(archive_path))
    except (ImagingError, InvalidDicomError, OSError, ValueError, AttributeError) as exc:
        raise RenderError(f"the image cannot be decoded: {type(exc).__name__}") from exc
    if not 1 <= frame <= len(frames):
        raise RenderError(f"the instance has {len(frames)} frame(s), not frame {frame}")
    return frames[frame - 1]


def _grey_image(pixels: np.ndarray, size: int) -> Image.Image:
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def _jet(values: np.ndarray) -> np.ndarray:
    """The classic blue-cyan-yellow-red heat colour map for values 0..1, as uint8 RGB (no matplotlib import)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


class ImageCache:
    """Thumbnails and heat maps of archived frames, cached under ``root``."""

    def __init__(self, root: Path, model_dir_for: Callable[[str, str], Path]) -> None:
        self.root = root
        #: ``(task, model uid) -> folder`` where that model should be (``model.keras`` + ``card.json``).
        self._model_dir_for = model_dir_for
        self._classifiers: OrderedDict[str, object] = OrderedDict()
        self._classifiers_lock = threading.Lock()

    def _classifier(self, task: str, model_uid: str) -> object:
        from models.inference import Classifier

        with self._classifiers_lock:
            if model_uid in self._classifiers:
                self._classifiers.move_to_end(model_uid)
                return self._classifiers[model_uid]
            try:
                classifier = Classifier.load(self._model_dir_for(task, model_uid))
            except (OSError, ValueError, KeyError) as exc:
                raise RenderError(f"the model that made this result cannot be loaded: {exc}") from exc
            if classifier.card.uid != model_uid:
                raise RenderError("the model that made this result is no longer installed")
            self._classifiers[model_uid] = classifier
            while len(self._classifiers) > _LOADED_MODELS:
                self._classifiers.popitem(last=False)
            return classifier

    def thumbnail(self, sop_instance_uid: str, archive_path: Path, frame: int) -> Path:
        path = self.root / "thumbnails" / _safe(sop_instance_uid) / f"{frame}.png"
        return _cached_png(path, lambda: _grey_image(display_frame(archive_path, frame), THUMBNAIL_SIZE))

    def axial_slice(self, volume_key: str, task: str, archive_paths: list[Path], number: int) -> Path:
        """Axial slice ``number`` (from 1, foot to head) cut from the volume of ``archive_paths`` as ``task``'s model
        reads it. ``volume_key`` names the volume in the cache (it must change when the series' instances do)."""
        folder = self.root / "axial" / _safe(volume_key)
        path = folder / f"{number}.png"
        if path.is_file():
            return path
        with _reformat_lock:
            if not path.is_file():
                self._cut(folder, task, archive_paths)
        if not path.is_file():
            slices = len(list(folder.glob("*.png")))
            raise RenderError(f"the volume was cut into {slices} axial slices, not slice {number}")
        return path

    def _cut(self, folder: Path, task: str, archive_paths: list[Path]) -> None:
        from dicom_io.imaging import ImagingError
        from models.tasks import get_task
        from worker.decoding import decode_series

        try:
            frames = decode_series(archive_paths, get_task(task))
        except (ImagingError, InvalidDicomError, OSError, ValueError, KeyError) as exc:
            raise RenderError(f"the volume cannot be cut: {type(exc).__name__}") from exc
        if not frames[0].reformatted:
            raise RenderError("the series is not read as axial slices cut from a volume")
        for frame in frames:
            _cached_png(folder / f"{frame.frame_number}.png",
                        lambda image=frame.image: _grey_image(image, THUMBNAIL_SIZE))

    def heatmap(
        self, model_uid: str, task: str, label: str, sop_instance_uid: str, archive_path: Path, frame: int
    ) -> Path:
        path = self.root / "heatmaps" / _safe(model_uid) / _safe(label) / _safe(sop_instance_uid) / f"{frame}.png"
        return _cached_png(path, lambda: self._render_heatmap(model_uid, task, label, archive_path, frame))

    def _render_heatmap(self, model_uid: str, task: str, label: str, archive_path: Path, frame: int) -> Image.Image:
        from models.explain import grad_cam
        from models.preprocessing import prepare_batch

        classifier = self._classifier(task, model_uid)
        card = classifier.card  # type: ignore[attr-defined]
        if label not in card.class_names:
            raise RenderError(f"the model has no class {label!r}")
        image = display_frame(archive_path, frame)
        batch = prepare_batch([image], card.input_spec)
        try:
            with _gradcam_lock:
                heat = grad_cam(classifier.model, batch, list(card.class_names).index(label))[0]  # type: ignore[attr-defined]
        except ValueError as exc:
            raise RenderError(str(exc)) from exc
        grey = np.repeat(batch[0, :, :, :1], 3, axis=-1)
        # Weight the colour by the heat itself so that cold regions keep showing the anatomy.
        alpha = 0.6 * heat[..., None]
        blended = (1.0 - alpha) * grey + alpha * _jet(heat)
        out = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), mode="RGB")
        out.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        if out.width < THUMBNAIL_SIZE // 2:
            out = out.resize((out.width * 2, out.height * 2), Image.Resampling.BILINEAR)
        return out
