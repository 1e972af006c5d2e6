"""Images in for a vision encoder-decoder's package (TrOCR's, Donut's): image files turned into its encoder's inputs.

:func:`image_inputs` opens one file with Pillow (any format it reads, converted to RGB) and runs the image processor
the package carries (``preprocessor_config.json``, copied from the model folder by the export: its resizing,
rescaling and normalization) over it, giving the encoder's ``pixel_values`` ``[1, channels, height, width]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flora_graph.serving.audio import package_preprocessor
from flora_graph.serving.errors import ServingError

__all__ = ["image_inputs"]


def image_inputs(package: str | Path, main_input: str, path: str | Path) -> np.ndarray:
    """The encoder input ``main_input`` (``pixel_values``) of the image file ``path``, ``[1, ...]``, by the image
    processor of ``package``. Raises :class:`ServingError` for a package without one, or a file (named) that is
    missing or no image Pillow reads."""
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoImageProcessor

    package, path = Path(package), Path(path)
    processor = package_preprocessor(package, AutoImageProcessor, "image processor", "images")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ServingError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    out = processor(images=image, return_tensors="np")
    if main_input not in out:
        raise ServingError(f"{package}'s image processor gives {sorted(out)}, not the encoder's {main_input!r}")
    return np.ascontiguousarray(np.asarray(out[main_input], np.float32))
