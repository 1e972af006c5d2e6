"""Inputs a token model reads beside its ids: a document model's word boxes, a web page model's XPaths, a table
model's cell coordinates, a vision-and-language model's region features, a long-document model's global tokens, a
contrastive text-and-image (audio, video) model's images.

Used where a model is captured from its config alone (:func:`flora_graph.model_export.load_model`, the ``flora-graph
export`` of a model folder): each input is given where the model's ``forward`` takes it by its transformers name,
built from the config's sizes, so that the exported file takes it too (as Optimum's exports of these models do):

* ``bbox`` ``[batch, seq, 4]``: each token's word box ``(x0, y0, x1, y1)``, ``x0 <= x1`` and ``y0 <= y1``; integer
  coordinates below ``max_2d_position_embeddings`` (at most 1000, the scale the processors normalize to) where the
  config has that table (LayoutLM, LayoutLMv2/v3, LiLT), else fractions of the page in ``[0, 1]`` (BROS);
* ``xpath_tags_seq`` / ``xpath_subs_seq`` ``[batch, seq, max_depth]`` (MarkupLM): tag and subscript ids below the
  config's ``max_xpath_tag_unit_embeddings`` / ``max_xpath_subs_unit_embeddings``;
* ``global_attention_mask`` ``[batch, seq]`` (Longformer: 1 where a token attends and is attended by every token,
  the first token of each row and another in every other row, so that rows hold different counts);
* ``pixel_values`` ``[batch, channels, input_size, input_size]`` where the config embeds the page image beside the
  words (LayoutLMv3's ``visual_embed``: the image's patches join the sequence);
* ``token_type_ids`` ``[batch, seq, len(type_vocab_sizes)]`` (TAPAS: segment, column, row, ranks ...), each below its
  own ``type_vocab_sizes`` entry;
* ``visual_feats`` ``[batch, boxes, visual_feat_dim]`` and ``visual_pos`` ``[batch, boxes, visual_pos_dim]``
  (LXMERT: detected regions' features and boxes), the regions a dim of their own, ``"boxes"``;
* the images, videos or audio of a contrastive model, one that scores every text against every image (its
  ``forward`` takes ``return_loss``: CLIP, SigLIP, ALIGN, AltCLIP, Chinese-CLIP, BLIP, CLIPSeg, GroupViT, MetaCLIP 2,
  OWL-ViT, X-CLIP, VideoPrism's CLIP, ...; or one whose main input is its signal and which requires ``input_ids`` too,
  BLIP-2's image-text retrieval): ``pixel_values`` (``pixel_values_videos``, ``input_features``, ``input_values``) as
  :func:`~flora_graph.frontend.signal_inputs.signal_inputs` builds them from the config's ``vision_config``
  (``video_config``, ``audio_config``), their count a dim of their own (``"images"``, ``"videos"``, ``"audio"``; X-CLIP's
  ``pixel_values`` are videos, ``"videos"``; PE-Audio's ``input_values`` are ``[audio, 1, samples]``, its DAC front end
  reading one channel; CLAP's ``input_features`` spectrograms ``[audio, 1, frames, mel bins]``), other than the texts'
  (``logits_per_image`` is ``[images, batch]``), as Optimum's exports of
  these models take them;
* the images of a head that finds or segments what its texts name (OWL-ViT's detection, CLIPSeg's segmentation,
  Grounding DINO, whose images a detector's own config sizes): built so too, the texts then laid out by
  :func:`paired_layout` as the model reads them (each image's queries, or one text each) where it refuses them apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from flora_graph.frontend.signal_inputs import signal_inputs

__all__ = ["PAIRINGS", "paired_layout", "takes_paired_signals", "token_extras"]

_PAIRED = {"pixel_values": (("vision_config",), "images"),
           "pixel_values_videos": (("video_config", "vision_config"), "videos"),
           "input_features": (("audio_config",), "audio"), "input_values": (("audio_config",), "audio")}
"""A contrastive model's signal inputs: ``{input: (the configs of its tower, the first found taken; the dim of their
count)}``."""

_BOX_SCALE = 1000
"""The coordinate scale document processors (LayoutLM's, LayoutLMv3's, LiLT's) normalize word boxes to."""


def _boxes(gen: torch.Generator, batch: int, seq: int, top: int | None) -> torch.Tensor:
    """``[batch, seq, 4]`` boxes ``(x0, y0, x1, y1)`` with ``x0 <= x1``, ``y0 <= y1``: integers in ``[0, top]``, or
    fractions in ``[0, 1]`` where ``top`` is ``None``."""
    corners = torch.rand(batch, seq, 2, 2, generator=gen)  # two corners, each (x, y)
    lo, hi = corners.min(dim=2).values, corners.max(dim=2).values
    box = torch.cat([lo, hi], dim=-1)
    return box if top is None else (box * top).round().to(torch.int64)


def token_extras(model: Any, batch: int, seq: int, seed: int) -> tuple[dict[str, torch.Tensor],
                                                                       dict[str, dict[int, str]]]:
    """The inputs beside ``input_ids`` (``[batch, seq]``) that ``model``'s ``forward`` takes by name and its config
    sizes (see the module's docstring), seeded with ``seed``, and their dynamic dims; ``({}, {})`` for a model that
    takes none. ``token_type_ids`` is given here only in TAPAS' form (a config with ``type_vocab_sizes``)."""
    params = inspect.signature(model.forward).parameters
    config = model.config
    gen = torch.Generator().manual_seed(1000 + seed)
    out: dict[str, torch.Tensor] = {}
    dims: dict[str, dict[int, str]] = {}
    if "bbox" in params:
        table = getattr(config, "max_2d_position_embeddings", None)
        top = min(_BOX_SCALE, int(table) - 1) if isinstance(table, int) else None
        out["bbox"], dims["bbox"] = _boxes(gen, batch, seq, top), {0: "batch", 1: "seq"}
    depth = getattr(config, "max_depth", None)
    for name, size in (("xpath_tags_seq", "max_xpath_tag_unit_embeddings"),
                       ("xpath_subs_seq", "max_xpath_subs_unit_embeddings")):
        if name in params and isinstance(depth, int) and isinstance(getattr(config, size, None), int):
            out[name] = torch.randint(0, int(getattr(config, size)), (batch, seq, depth), generator=gen)
            dims[name] = {0: "batch", 1: "seq"}
    sizes = getattr(config, "type_vocab_sizes", None)
    if "token_type_ids" in params and isinstance(sizes, list | tuple) and sizes:
        out["token_type_ids"] = torch.stack([torch.randint(0, int(n), (batch, seq), generator=gen) for n in sizes], -1)
        dims["token_type_ids"] = {0: "batch", 1: "seq"}
    if "global_attention_mask" in params:  # Longformer's: its first token global, a second in every other row
        glob = torch.zeros(batch, seq, dtype=torch.int64)
        glob[:, 0] = 1
        if seq > 1:
            glob[::2, int(torch.randint(1, seq, (1,), generator=gen))] = 1
        out["global_attention_mask"], dims["global_attention_mask"] = glob, {0: "batch", 1: "seq"}
    size = getattr(config, "input_size", None)
    if "pixel_values" in params and getattr(config, "visual_embed", False) is True and isinstance(size, int):
        channels = int(getattr(config, "num_channels", 3))
        out["pixel_values"], dims["pixel_values"] = torch.randn(batch, channels, size, size, generator=gen), {0: "batch"}
    feat, pos = getattr(config, "visual_feat_dim", None), getattr(config, "visual_pos_dim", None)
    if {"visual_feats", "visual_pos"} <= set(params) and isinstance(feat, int) and isinstance(pos, int):
        boxes = 3 + seed  # a region count other than the check's
        out["visual_feats"] = torch.randn(batch, boxes, feat, generator=gen)
        out["visual_pos"] = torch.rand(batch, boxes, pos, generator=gen)
        dims["visual_feats"] = dims["visual_pos"] = {0: "batch", 1: "boxes"}
    if takes_paired_signals(model):
        # a contrastive model, one whose main input is the signal it scores the texts against (BLIP-2's retrieval), or
        # a text-prompted detection or segmentation head
        for name, (tensor, named) in _paired_signals(model, params, batch).items():
            out[name], dims[name] = tensor, named
    return out, dims


def takes_paired_signals(model: Any) -> bool:
    """Whether ``model`` reads texts beside images (videos, audio) that :func:`token_extras` builds: its ``forward``
    takes ``return_loss`` (a contrastive model), its main input is the signal, it requires the signal (OWL-ViT's
    detection), or it is a detection or segmentation head taking texts (CLIPSeg's segmentation)."""
    params = inspect.signature(model.forward).parameters
    signals = [n for n in _PAIRED if n in params]
    head = type(model).__name__.endswith(_PROMPTED_HEADS) and "input_ids" in params
    return "return_loss" in params or getattr(model, "main_input_name", None) in _PAIRED or (bool(signals) and (
        head or any(params[n].default is inspect.Parameter.empty for n in signals)))


_PROMPTED_HEADS = ("ForObjectDetection", "ForImageSegmentation")
"""The class name endings of heads that find or segment what their texts name in their images."""

_PER_SIGNAL = {"queries": (2, 4), "one each": (1, 1)}
"""The texts for each signal of :func:`paired_layout`'s pairings, in the example and in the check."""

PAIRINGS = tuple(_PER_SIGNAL)
"""How :func:`paired_layout` may count a paired model's texts against its signals where they are not apart (a
contrastive model scores every text against every signal: :func:`token_extras`' layout), in the order to try them:
``queries`` texts for each signal (OWL-ViT's detection: ``[images*queries, seq]``), or one text for each (CLIPSeg's
segmentation, Grounding DINO)."""


def paired_layout(pairing: str, example: dict[str, torch.Tensor], check: dict[str, torch.Tensor],
                  dims: dict[str, dict[int, str]], texts: Callable[[int, int], dict[str, torch.Tensor]]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, dict[int, str]]] | None:
    """The example, check and dims of a paired model (:func:`token_extras`' inputs: its texts counted apart from its
    signals) laid out as ``pairing`` (one of :data:`PAIRINGS`): the texts built anew by
    ``texts(count, seed)`` (the example's seed 0, the check's 1) at 2 queries for each of the example's signals and 4
    for each of the check's, or at one each; ``None`` where the inputs hold no paired signal."""
    signals = {n: d[0] for n, d in dims.items() if n in _PAIRED and d.get(0) in _COUNTS}
    if not signals:
        return None
    count = next(iter(signals.values()))
    per = _PER_SIGNAL[pairing]
    named = f"{count}*queries" if pairing == "queries" else "batch"
    out_dims = {n: ({**d, 0: named} if d.get(0) == "batch" else dict(d)) for n, d in dims.items()}
    if pairing == "one each":
        out_dims.update({n: {**out_dims[n], 0: "batch"} for n in signals})
    built = []
    for inputs, seed, k in ((example, 0, per[0]), (check, 1, per[1])):
        n_signals = int(inputs[next(iter(signals))].shape[0])
        built.append({**{n: t for n, t in inputs.items() if n in signals}, **texts(n_signals * k, seed)})
    return built[0], built[1], out_dims


_COUNTS = frozenset(count for _, count in _PAIRED.values())
"""The dims that count a paired model's signals."""


def _paired_signals(model: Any, params: Any, batch: int) -> dict[str, tuple[torch.Tensor, dict[int, str]]]:
    """A contrastive model's signal inputs (see the module's docstring) beside ``batch`` texts: ``{input: (tensor,
    dims)}``, a count of signals other than ``batch`` (2 beside 3 texts, else 3), so that an export cannot take the
    two counts for one."""
    config, arch = model.config, type(model).__name__
    found: dict[str, tuple[torch.Tensor, dict[int, str]]] = {}
    for name, (parts, count) in _PAIRED.items():
        sub = next((c for part in parts if (c := getattr(config, part, None)) is not None), None)
        if sub is None and name == "pixel_values" and arch.endswith(_PROMPTED_HEADS):
            sub = config  # a detector's own config sizes its images (Grounding DINO's backbone)
        if name not in params or sub is None:
            continue
        built = signal_inputs(sub, arch, name)
        if built is None:
            continue
        two, dims, three = built  # 2 signals and 3
        tensor, named = (two if batch == 3 else three)[name], {**dims[name], 0: count}
        if name == "pixel_values" and tensor.dim() == 5:  # X-CLIP's: videos [count, frames, channels, height, width]
            named[0] = "videos"
        found[name] = tensor, named
    return found
