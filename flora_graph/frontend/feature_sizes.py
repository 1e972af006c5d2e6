"""Feature sizes a model keeps in a tensor and reads back as sizes, kept as the numbers they were while capturing.

SAM 3's DETR encoder (``Sam3DetrEncoder``, and SAM 3 LiteText's) returns its feature maps' ``(height, width)`` as a
``torch.tensor`` (``spatial_shapes``); its decoder reads the first back (``spatial_shapes[0, 0]``) as the size of the
coordinate grids of its box relative position bias (``_get_rpb_matrix``). Read from a tensor, a size is a value
torch.export cannot know while tracing (``GuardOnDataDependentSymNode``), and ``torch.onnx.export`` fails there too.
The sizes are the feature maps' own shape, which the trace knows: the encoder's ``_prepare_multilevel_features``
records them beside the tensor (:func:`recorded_sizes`), and the decoder's ``_get_rpb_matrix`` takes them from there
(:func:`sized_rpb`), per model (the encoder and decoder under one parent module). Used as method swaps of
:func:`~flora_graph.frontend.traceable.traceable_modules`, for the capture only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["is_detr_decoder_with_rpb", "is_detr_encoder_with_sizes", "recorded_sizes", "sized_rpb"]

_SIZES: dict[str, tuple[Any, Any]] = {}
"""The last ``(height, width)`` of the first feature level each model's encoder saw, by the models' parent path."""


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def is_detr_encoder_with_sizes(module: nn.Module) -> bool:
    """Whether ``module`` is a SAM 3 DETR encoder (its class name ends with ``DetrEncoder``, it has
    ``_prepare_multilevel_features``, and a sibling decoder reads the sizes back)."""
    return type(module).__name__.startswith("Sam3") and type(module).__name__.endswith("DetrEncoder") \
        and callable(getattr(module, "_prepare_multilevel_features", None))


def is_detr_decoder_with_rpb(module: nn.Module) -> bool:
    """Whether ``module`` is a SAM 3 DETR decoder computing a box relative position bias (``_get_rpb_matrix``)."""
    return type(module).__name__.startswith("Sam3") and type(module).__name__.endswith("DetrDecoder") \
        and callable(getattr(module, "_get_rpb_matrix", None))


def recorded_sizes(module: nn.Module, path: str) -> Callable[..., Any]:
    """The encoder's ``_prepare_multilevel_features`` (the class's), recording the first level's ``(height, width)``
    as the feature map's shape gives them (numbers, or the trace's symbolic sizes) for the decoder beside it."""
    own = type(module)._prepare_multilevel_features

    def prepare(vision_features: Any, *args: Any, **kwargs: Any) -> Any:
        _SIZES[_parent(path)] = tuple(vision_features[0].shape[-2:])
        return own(module, vision_features, *args, **kwargs)

    return prepare


def sized_rpb(module: nn.Module, path: str) -> Callable[..., Any]:
    """The decoder's ``_get_rpb_matrix`` (the class's) on the sizes the encoder beside it recorded, in place of the
    tensor values it is given (the same numbers)."""
    own = type(module)._get_rpb_matrix

    def rpb(reference_boxes: Any, spatial_shape: Any) -> Any:
        return own(module, reference_boxes, _SIZES.get(_parent(path), spatial_shape))

    return rpb
