"""Image files (PNG, JPEG, ...) -> 2-D grey uint8 arrays, with a clear error for anything unreadable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: File name suffixes read as images (lower case).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class ImageFileError(ValueError):
    """An image file cannot be read; the message names the file and why."""


def read_grey_image(path: Path | str) -> np.ndarray:
    """Decode ``path`` fully and return it as a 2-D uint8 grey array.

    RGB and RGBA files are converted with ITU-R 601 luma (PIL's ``L`` mode), since the worker only ever sees grey
    DICOM; transparency is dropped (the datasets' alpha is opaque).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later inside a pipeline
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise ImageFileError(f"{path}: {image.mode} images are not supported (8-bit grey or colour only)")
            if image.mode == "P" or image.mode == "PA":
                image = image.convert("RGBA")
            grey = image.convert("L")
            array = np.asarray(grey, dtype=np.uint8)
    except ImageFileError:
        raise
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageFileError(f"{path}: not a readable image ({exc})") from None
    if array.ndim != 2 or min(array.shape) < 8:
        raise ImageFileError(f"{path}: image of size {array.shape} is too small (at least 8x8)")
    return array
