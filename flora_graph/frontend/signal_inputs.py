"""Example inputs of transformers models whose main input is not tokens: images, video, audio samples and features.

Used where a model is captured from its config alone: :func:`flora_graph.model_export.load_model` (the
``flora-graph export`` of a model folder) and the encoder of an encoder-decoder model
(:mod:`flora_graph.frontend.seq2seq_lm`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["signal_inputs"]


_VIDEO_PREFIXES = ("Vivit", "Timesformer")
"""Video models whose class name does not say so (VideoMAE's and VideoPrism's do): their ``pixel_values`` are
``[batch, frames, channels, height, width]``. X-CLIP's vision model has ``num_frames`` too, but takes frames as images."""

_VIDEO_CLASSES = ("XCLIPModel",)
"""Models whose ``pixel_values`` are videos though their class name does not say so: X-CLIP's text-and-video model
(its vision config's ``num_frames`` frames a video)."""


def _size(config: Any) -> tuple[int, int]:
    """An image model's input height and width: its config's ``image_size`` (an int, a pair or a
    ``{"height", "width"}`` dict; V-JEPA 2's ``crop_size``), its vision or backbone config's, else 224."""
    for c in (config, getattr(config, "vision_config", None), getattr(config, "backbone_config", None),
              getattr(config, "encoder", None)):  # a vision encoder-decoder's image encoder (TrOCR's, Donut's)
        size = (getattr(c, "image_size", None) or getattr(c, "crop_size", None)) if c is not None else None
        if isinstance(size, dict) and {"height", "width"} <= set(size):
            return int(size["height"]), int(size["width"])
        if isinstance(size, list | tuple) and len(size) == 2:
            return int(size[0]), int(size[1])
        if isinstance(size, int) and size > 0:
            return size, size
    return 224, 224


def signal_inputs(config: Any, arch: str, main: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, str]],
                                                             dict[str, torch.Tensor]] | None:
    """Example inputs, dynamic dims and check inputs of a transformers model whose main input ``main`` is
    not tokens: ``pixel_values`` ``[batch, channels, height, width]`` (``[batch, frames, ...]`` for a video
    model (VideoMAE, ViViT, TimeSformer: its config's ``num_frames`` or ``frames_per_clip``) at the config's image
    size; raw audio ``input_values`` ``[batch, samples]`` (samples dynamic; an audio codec's ``[batch, channels,
    samples]``: EnCodec's and Mimi's ``audio_channels``, one channel behind a DAC front end, PE-Audio's), or ``[batch,
    frames, mel bins]`` where the config fixes them (the Audio Spectrogram Transformer); ``input_features`` ``[batch, 1,
    frames, mel bins]`` (CLAP's audio tower: ``spec_size * (spec_size // num_mel_bins)`` frames), ``[batch, mel bins, 2 *
    max_source_positions]``
    (Whisper's encoder) or ``[batch, frames, features]`` (frames dynamic: Wav2Vec2-BERT's
    ``feature_projection_input_dim``, Parakeet's and LASR's ``num_mel_bins``, Speech2Text's
    ``input_feat_per_channel * input_channels``); ``pixel_values_videos`` as a
    video model's ``pixel_values`` (VideoPrism, V-JEPA 2). Batch is dynamic; the example has 2 rows, the check
    input 3 (and other samples or frames). ``None`` for any other input.
    """
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if main in ("pixel_values", "pixel_values_videos"):
        h, w = _size(config)
        channels = int(getattr(config, "num_channels", None) or getattr(getattr(config, "encoder", None), "num_channels",
                                                                        None) or 3)
        frames = next((f for c in (config, getattr(config, "vision_config", None)) for k in ("num_frames", "frames_per_clip")
                       if isinstance(f := getattr(c, k, None), int)), None)
        video = "Video" in arch or arch.startswith(_VIDEO_PREFIXES) or arch in _VIDEO_CLASSES or main == "pixel_values_videos"
        lead = (int(frames),) if isinstance(frames, int) and video else ()
        make = lambda b: {main: randn(b, *lead, channels, h, w)}  # noqa: E731
        return make(2), {main: {0: "batch"}}, make(3)
    if main == "input_values":
        mel, length = getattr(config, "num_mel_bins", None), getattr(config, "max_length", None)
        if isinstance(mel, int) and isinstance(length, int):  # spectrogram frames of a fixed count
            return {main: randn(2, length, mel)}, {main: {0: "batch"}}, {main: randn(3, length, mel)}
        channels = getattr(config, "audio_channels", None)
        if getattr(config, "dac_config", None) is not None:  # a DAC front end (PE-Audio's encoder): one channel
            channels = 1
        if isinstance(channels, int):
            # a codec, [batch, channels, samples], 0.25 s and 0.3 s at 16 kHz: whole frames of its hop (Mimi's 1920
            # samples). One without the field (DAC) reads one channel: load_model tries that where it refuses these
            return ({main: randn(2, channels, 4000)}, {main: {0: "batch", 2: "samples"}},
                    {main: randn(3, channels, 4800)})
        # raw audio: a strided convolution stack over a dynamic number of samples (0.1 s and 0.125 s at 16 kHz)
        return {main: randn(2, 1600)}, {main: {0: "batch", 1: "samples"}}, {main: randn(3, 2000)}
    if main == "input_features":
        mel, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
        spec = getattr(config, "spec_size", None)
        if isinstance(spec, int) and isinstance(mel, int) and 0 < mel <= spec and not getattr(config, "enable_fusion",
                                                                                               False):
            # CLAP's spectrograms as its Swin tower reads them, spec_size * (spec_size // mel) frames (its feature
            # extractor's 1001 are resized to those); a tower that fuses crops (four channels, is_longer) is not built
            frames = spec * (spec // mel)
            return {main: randn(2, 1, frames, mel)}, {main: {0: "batch"}}, {main: randn(3, 1, frames, mel)}
        if isinstance(mel, int) and isinstance(positions, int):
            return ({main: randn(2, mel, 2 * positions)}, {main: {0: "batch"}}, {main: randn(3, mel, 2 * positions)})
        # feature frames over a dynamic count (Wav2Vec2-BERT's stacked filterbanks, Parakeet's and LASR's mel bins)
        inner = getattr(config, "encoder_config", None) or config
        width = getattr(inner, "feature_projection_input_dim", None) or getattr(inner, "num_mel_bins", None)
        per_channel = getattr(inner, "input_feat_per_channel", None)  # Speech2Text's filterbanks per channel
        if width is None and isinstance(per_channel, int):
            width = per_channel * int(getattr(inner, "input_channels", 1) or 1)
        if isinstance(width, int):
            return {main: randn(2, 64, width)}, {main: {0: "batch", 1: "frames"}}, {main: randn(3, 80, width)}
    return None
