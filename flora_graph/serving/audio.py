"""Audio in for a speech model's encoder-decoder package: WAV files read and turned into its encoder's inputs.

:func:`read_wav` reads a PCM WAV file with the standard library (8-, 16-, 24- or 32-bit integer samples, the
channels averaged) into float32 samples in ``[-1, 1]``. :func:`speech_inputs` runs the feature extractor the
package carries (``preprocessor_config.json``, copied from the model folder by the export: Whisper's log-mel
frames, Speech2Text's filterbanks, Moonshine's normalized samples) over one file's samples, which must be at the
extractor's sampling rate (nothing is resampled: a file at another rate is refused, naming both).
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np

from flora_graph.serving.errors import ServingError

__all__ = ["PREPROCESSOR_FILE", "package_preprocessor", "read_wav", "speech_inputs"]

PREPROCESSOR_FILE = "preprocessor_config.json"
"""The feature extractor's settings in a package (as transformers saves them)."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: the file's samples as float32 ``[n]`` in ``[-1, 1]`` (channels averaged) and its sampling
    rate. Raises :class:`ServingError` naming the file for one that is missing, not a WAV file, or not integer PCM."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate, count = f.getsampwidth(), f.getnchannels(), f.getframerate(), f.getnframes()
            raw = f.readframes(count)
    except (OSError, EOFError, wave.Error) as exc:
        raise ServingError(f"{path}: not a readable PCM WAV file ({type(exc).__name__}: {exc})") from None
    if width == 1:  # unsigned 8-bit
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit little-endian: widened to 32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        wide = (b[:, 0].astype(np.int32) << 8) | (b[:, 1].astype(np.int32) << 16) | (b[:, 2].astype(np.int32) << 24)
        samples = wide.astype(np.float32) / 2.0**31
    elif width in (2, 4):
        kind = np.dtype(f"<i{width}")
        samples = np.frombuffer(raw, kind).astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ServingError(f"{path}: {8 * width}-bit samples; expected 8-, 16-, 24- or 32-bit integer PCM")
    if channels > 1:
        samples = samples[: len(samples) // channels * channels].reshape(-1, channels).mean(axis=1)
    if not len(samples):
        raise ServingError(f"{path}: no samples")
    return np.ascontiguousarray(samples, np.float32), int(rate)


def package_preprocessor(package: Path, auto: Any, what: str, inputs: str) -> Any:
    """The preprocessor ``package`` carries (``preprocessor_config.json``), loaded by ``auto`` (transformers'
    ``AutoFeatureExtractor`` or ``AutoImageProcessor``; ``what`` names it, ``inputs`` what it reads). Raises
    :class:`ServingError` for a package without one, or with settings ``auto`` cannot load."""
    if not (package / PREPROCESSOR_FILE).is_file():
        raise ServingError(f"{package} has no {PREPROCESSOR_FILE} (the model folder's {what} settings), so {inputs} "
                           "cannot be turned into its encoder's inputs; export from a folder that has it")
    try:
        return auto.from_pretrained(package, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServingError(f"{package / PREPROCESSOR_FILE}: not {what} settings ({exc})") from None


def speech_inputs(package: str | Path, main_input: str, samples: np.ndarray, rate: int, *, what: str = "audio"
                  ) -> np.ndarray:
    """The encoder input ``main_input`` (``input_features`` or ``input_values``) of one recording, ``[1, ...]``, by
    the feature extractor of ``package``. Raises :class:`ServingError` for a package without one, or a recording
    (``what`` names it) at another sampling rate than the extractor's."""
    from transformers import AutoFeatureExtractor

    package = Path(package)
    extractor = package_preprocessor(package, AutoFeatureExtractor, "feature extractor", "audio")
    want = int(getattr(extractor, "sampling_rate", rate))
    if rate != want:
        raise ServingError(f"{what}: sampled at {rate} Hz; {package}'s feature extractor takes {want} Hz "
                           "(resample it first)")
    out = extractor(samples, sampling_rate=rate, return_tensors="np")
    if main_input not in out:
        raise ServingError(f"{package}'s feature extractor gives {sorted(out)}, not the encoder's {main_input!r}")
    return np.ascontiguousarray(np.asarray(out[main_input], np.float32))
