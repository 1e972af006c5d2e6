"""The ATen -> IR converters, one module per op family (mirroring :mod:`flora_graph.ops`).

:mod:`~flora_graph.frontend.aten.registry` holds :data:`ATEN_TABLE` (ATen overload ->
converter), the :func:`register` decorator, :class:`SymDim` and the helpers every family
shares. Each family module registers the converters of the ATen ops whose IR it mainly
emits: :mod:`~flora_graph.frontend.aten.linear` (linear, matmul, addmm, conv),
:mod:`~flora_graph.frontend.aten.elementwise` (arithmetic, activations, float math,
comparisons, logic, where, masked_fill, triu/tril, diff, casts),
:mod:`~flora_graph.frontend.aten.reduce` (mean, sum, cumsum, cdist, pdist),
:mod:`~flora_graph.frontend.aten.einsum` (einsum of one or two operands),
:mod:`~flora_graph.frontend.aten.normalization` (softmax, log_softmax, layer_norm, rms_norm,
batch_norm, group_norm, instance_norm), :mod:`~flora_graph.frontend.aten.pooling` (max/avg/adaptive
pooling in 2-D and 3-D, upsampling, grid sampling),
:mod:`~flora_graph.frontend.aten.attention` (scaled-dot-product attention),
:mod:`~flora_graph.frontend.aten.movement` (views, reshapes, transposes, cat, split,
slice, squeeze, expand, flip, stack, unflatten, repeat_interleave, copy, as_strided),
:mod:`~flora_graph.frontend.aten.padding` (constant_pad_nd, pad, reflection/replication
pads, repeat), :mod:`~flora_graph.frontend.aten.indexing` (embedding, index_select, select,
unbind, gather, index, diagonal, slice/select_scatter, index_put, scatter, scatter_add,
scatter_reduce, masked_scatter, embedding_bag, col2im), :mod:`~flora_graph.frontend.aten.creation`
(arange, the full/ones/zeros and empty families), :mod:`~flora_graph.frontend.aten.aliases`
(clone/detach/contiguous, eval-mode dropout, getitem) and :mod:`~flora_graph.frontend.aten.complex` (complex
values as real pairs: ``polar``, ``view_as_complex``/``view_as_real``, and the ops of its own table that read them),
:mod:`~flora_graph.frontend.aten.spectral` (``torch.fft``'s transforms as products with cos/sin matrices, and casts
to and from complex values). Importing this package registers
them all. :mod:`~flora_graph.frontend.aten.refused` holds :data:`REFUSED`, the one list of the
ops capture refuses on purpose (with Core ATen coverage, see ``docs/ARCHITECTURE.md``). The capture-time LoRA Linear op registers its converter from
:mod:`flora_graph.frontend.lora_op`, which :mod:`flora_graph.frontend.capture` imports.
"""

from __future__ import annotations

from flora_graph.frontend.aten import (  # noqa: F401  (each family registers its converters on import)
    aliases,
    attention,
    complex,
    creation,
    einsum,
    elementwise,
    indexing,
    linear,
    movement,
    normalization,
    padding,
    pooling,
    reduce,
    spectral,
)
from flora_graph.frontend.aten.refused import REFUSED, refusal_of
from flora_graph.frontend.aten.registry import (
    ATEN_TABLE,
    NO_TENSOR_OPS,
    SIZE_OPS,
    Converter,
    SymDim,
    as_dtype,
    aten_name,
    compute_dtype,
    dim_of,
    operand,
    out_dtype,
    refuse,
    register,
)

__all__ = [
    "ATEN_TABLE", "FAMILIES", "NO_TENSOR_OPS", "REFUSED", "SIZE_OPS", "Converter", "SymDim", "as_dtype", "aten_name",
    "compute_dtype", "dim_of", "operand", "out_dtype", "refusal_of", "refuse", "register",
]

FAMILIES = ("linear", "elementwise", "reduce", "normalization", "pooling", "attention",
            "movement", "padding", "indexing", "creation", "aliases", "complex", "spectral")
"""The family modules, in the order they are documented."""
