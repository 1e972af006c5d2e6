"""``read_wav`` against the samples written (every PCM width, several channels) and its refusals by name."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from flora_graph.serving.audio import read_wav, speech_inputs
from flora_graph.serving.errors import ServingError


def _write(path: Path, ints: np.ndarray, width: int, channels: int = 1, rate: int = 16000) -> Path:
    """Integer samples ``ints`` ``[n, channels]`` at ``width`` bytes each (8-bit unsigned, the rest signed)."""
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        v = ints.astype("<i4").reshape(-1)
        raw = np.stack([(v >> s) & 0xFF for s in (0, 8, 16)], axis=1).astype(np.uint8).tobytes()
    else:
        raw = ints.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return path


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_every_pcm_width_reads_back_to_its_values_and_channels_average(width: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(width)
    full = 2 ** (8 * width - 1)
    ints = rng.integers(-full, full, size=(50, 2))
    samples, rate = read_wav(_write(tmp_path / "a.wav", ints, width, channels=2, rate=22050))
    assert rate == 22050 and samples.dtype == np.float32 and samples.shape == (50,)
    np.testing.assert_allclose(samples, ints.mean(axis=1) / full, atol=1e-6)
    assert np.abs(samples).max() <= 1.0


def test_refusals_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_text("not audio")
    with pytest.raises(ServingError, match=r"x\.wav: not a readable PCM WAV"):
        read_wav(tmp_path / "x.wav")
    with pytest.raises(ServingError, match=r"missing\.wav"):
        read_wav(tmp_path / "missing.wav")
    with pytest.raises(ServingError, match=r"empty\.wav: no samples"):
        read_wav(_write(tmp_path / "empty.wav", np.zeros((0, 1), np.int64), 2))
    with pytest.raises(ServingError, match=r"preprocessor_config\.json"):
        speech_inputs(tmp_path, "input_features", np.zeros(10, np.float32), 16000)
