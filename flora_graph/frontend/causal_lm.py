"""Capture a Hugging Face causal LM with its key/value cache, named as ONNX Runtime GenAI and Optimum name it.

One graph serves prefill (``past_seq = 0``) and decode:

* inputs ``input_ids [batch, seq]``, ``attention_mask [batch, past_seq+seq]`` (1 for a real
  token, 0 for padding, over the cache and the new tokens), ``position_ids [batch, seq]``
  where the architecture takes them, and per layer ``past_key_values.{i}.key`` /
  ``.value [batch, kv_heads, past_seq, head_dim]``;
* outputs ``logits [batch, seq, vocab]`` and ``present.{i}.key`` / ``.value
  [batch, kv_heads, past_seq+seq, head_dim]``; ``kv_heads`` and the widths may differ from layer to
  layer (Gemma 4, MiMo-V2: :attr:`CacheLayout.per_layer`, read off one eager step's cache).

Recurrent layers (Mamba-2 in Bamba, Granite 4, Falcon-H1, Nemotron-H; Mamba-1; the gated delta rule
of Qwen3.5, Qwen3-Next, Kimi Linear; LFM2's short convolutions; MiniMax's lightning attention, whose own cache class
keeps its states apart, :attr:`CacheLayout.cache_type`) keep fixed-size states instead: ``past.{i}.conv`` ``[batch, channels, kernel]`` and
``past.{i}.recurrent`` ``[batch, heads, head_dim, state]`` in, ``present.{i}.conv`` / ``.recurrent``
out (ONNX Runtime GenAI's names), zeros for an empty cache (:class:`CacheState`, read off the model's
own cache after one eager step). The layer takes them as its previous state at any length, so the
same graph prefills and decodes.

The sparse attention of DeepSeek-V3.2 (GLM-MoE-DSA, AXK2, Dots3 Note, HY-V4: "DeepSeek Sparse Attention") keeps,
beside its keys and values, the keys of its indexer (one head, ``index_head_dim`` wide), which grow with them:
``past_key_values.{i}.indexer_key`` ``[batch, 1, past_seq, index_head_dim]`` in and ``present.{i}.indexer_key`` out,
one head of keys as far as a runtime is concerned (:attr:`CacheLayout.indexed`). Qwen4-Exp's QSA indexer also
rotates its blocks of keys at their positions, which its cache keeps beside the indexer keys; the wrapper rebuilds
that history from the attention mask (:attr:`CacheLayout.indexer_positions`), so the runtime carries nothing more.

``past_seq + seq`` is a sum dim of the IR, so every backend checks that the mask covers the
cache and the new tokens. The model runs through a small wrapper that builds a
``DynamicCache`` from the flat past tensors and returns the cache flat again; the rest is
:func:`~flora_graph.frontend.capture`, so PEFT LoRA layers come out tagged as usual and the
passes (``fused``, ``merged``, adapter slots) apply unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flora_graph.errors import GraphError
from flora_graph.frontend.capture import capture
from flora_graph.frontend.layer_stamp import capture_stamped, check_by_value, stamped_or_none
from flora_graph.frontend.state_forwards import state_forward
from flora_graph.ir import Graph

__all__ = ["GROWING", "INDEXER_KEY", "SCAN_CHUNK_KEYS", "CacheLayout", "CacheState", "CausalLMWithPast", "cache_layout",
           "capture_causal_lm", "dynamic_ntk_per_row", "longrope_per_row", "past_names", "present_names", "scan_chunk",
           "state_slot"]


@dataclass(frozen=True)
class CacheState:
    """A fixed-size state a recurrent layer keeps in the cache instead of keys and values: ``kind`` ``"conv"``
    (the last inputs of its causal convolution, ``[channels, kernel]``) or ``"recurrent"`` (its state-space
    state, ``[heads, head_dim, state]``), ``"conv.1"``, ``"conv.2"``, ... for a layer's further states of the kind
    (Inkling's several short convolutions a layer: :func:`state_slot`); ``shape`` without the batch dim."""

    layer: int
    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CacheLayout:
    """The key/value cache of a decoder: ``layers`` pairs of ``[batch, kv_heads, past_seq, head_dim]``.

    ``shared``: ``(layer, source)`` for each layer that attends to another layer's keys and values instead of
    its own (:func:`kv_shared_layers`); its present is the source's, so every layer's cache grows alike.
    ``value_dim``: the values' last dim where it is not ``head_dim``: multi-head latent attention (DeepSeek
    V2/V3, Kimi, GLM-4 MoE lite, MiniCPM3) caches one head of its compressed keys and values
    (``kv_lora_rank`` wide) as the "key" and the rotary part of its keys (``qk_rope_head_dim``) as the "value".
    ``per_layer``: ``(kv_heads, key dim, value dim)`` of every layer where they vary from layer to layer (Gemma 4's
    full attention layers: wider heads, fewer of them; MiMo-V2's windowed layers: twice the heads), empty where every
    layer has ``kv_heads`` and :attr:`dims` (:meth:`layer_kv` reads either).
    ``indexed``: ``(layer, index_head_dim)`` of each layer whose sparse attention caches its indexer's keys too
    (``[batch, 1, past_seq, index_head_dim]``, after the layer's keys and values).
    ``indexer_positions``: ``(layer, position dims)`` of each layer whose cache keeps the positions of its indexer's
    keys (``indexer_position_ids``, ``[dims, batch, past_seq]``: Qwen4-Exp's, three for its multimodal rotary),
    which the model reads for the whole sequence: the flat forward rebuilds them from the attention mask.
    ``kv_layers``: the layers with keys and values where not every layer has them, else ``None``: a recurrent layer
    keeps :attr:`states` instead; a layer an eager text-only step leaves empty keeps nothing (Mllama's cross-attention
    layers, which its text decoder skips without an image).
    ``layers`` counts the cache's layers, which may be more than the model's: a model that runs a section of its
    layers several times (Dory's recurrent loops) caches each pass apart, in layers after its own.
    ``cache_type``: the cache class the model requires where it is its own (MiniMax's, which keeps its lightning
    attention's states in ``linear_cache`` beside a ``DynamicCache``'s layers), else ``None``.
    ``repeats``: for each cache layer past the model's own, one of the model's layers whose kind of cache layer it
    is (Inkling 2 Loop's later passes keep states and a window, as the layers they run again), where the cache
    laid out from the config has a layer object per kind; empty otherwise."""

    layers: int
    kv_heads: int
    head_dim: int
    takes_position_ids: bool
    shared: tuple[tuple[int, int], ...] = ()
    value_dim: int | None = None
    kv_layers: tuple[int, ...] | None = None
    states: tuple[CacheState, ...] = ()
    per_layer: tuple[tuple[int, int, int], ...] = ()
    indexed: tuple[tuple[int, int], ...] = ()
    indexer_positions: tuple[tuple[int, int], ...] = ()
    cache_type: type | None = field(default=None, compare=False)
    repeats: tuple[int, ...] = ()

    @property
    def dims(self) -> tuple[int, int]:
        """The last dim of a layer's ``(key, value)`` (every layer's unless :attr:`per_layer` says otherwise)."""
        return self.head_dim, self.head_dim if self.value_dim is None else self.value_dim

    def layer_kv(self, layer: int) -> tuple[int, int, int]:
        """``(kv_heads, key dim, value dim)`` of ``layer``'s keys and values."""
        if self.per_layer:
            return self.per_layer[layer]
        return self.kv_heads, *self.dims

    def entries(self) -> list[tuple[int, str]]:
        """``(layer, kind)`` of each cache tensor, in input order: per layer, ``"key"`` and ``"value"`` where it
        attends (every layer unless ``kv_layers`` says which), then its indexer's keys (``"indexer_key"``, where
        :attr:`indexed` names it), then its ``states`` (``"conv"``, ``"recurrent"``)."""
        kv = set(range(self.layers) if self.kv_layers is None else self.kv_layers)
        indexed = dict(self.indexed)
        out: list[tuple[int, str]] = []
        for i in range(self.layers):
            out += [(i, "key"), (i, "value")] if i in kv else []
            out += [(i, INDEXER_KEY)] if i in indexed else []
            out += [(i, st.kind) for st in self.states if st.layer == i]
        return out

    def past_names(self) -> list[str]:
        """The cache inputs, in order: ``past_key_values.{i}.key`` / ``.value`` / ``.indexer_key``, and a recurrent
        layer's ``past.{i}.conv`` / ``past.{i}.recurrent`` (ONNX Runtime GenAI's names)."""
        return [f"past_key_values.{i}.{k}" if k in GROWING else f"past.{i}.{k}" for i, k in self.entries()]

    def present_names(self) -> list[str]:
        """The cache outputs, in order: ``present.{i}.key`` / ``.value`` / ``.indexer_key`` / ``.conv`` /
        ``.recurrent``."""
        return [f"present.{i}.{k}" for i, k in self.entries()]

    def uncached_layers(self) -> list[int]:
        """The layers that keep nothing in the cache, neither keys and values nor states (Mllama's cross-attention
        layers, which its text decoder skips without an image)."""
        held = {i for i, _ in self.entries()}
        return [i for i in range(self.layers) if i not in held]

    def state_shape(self, layer: int, kind: str) -> tuple[int, ...]:
        """The shape (without batch) of ``layer``'s ``kind`` state."""
        return next(st.shape for st in self.states if st.layer == layer and st.kind == kind)

    def growing_shape(self, layer: int, kind: str, past: int) -> tuple[int, int, int]:
        """``[heads, past, dim]`` of ``layer``'s ``kind`` of :data:`GROWING` at ``past`` positions."""
        if kind == INDEXER_KEY:
            return 1, past, dict(self.indexed)[layer]
        heads, key, value = self.layer_kv(layer)
        return heads, past, key if kind == "key" else value


INDEXER_KEY = "indexer_key"
"""The cache entry of a sparse attention layer's indexer keys (see :attr:`CacheLayout.indexed`)."""

GROWING = ("key", "value", INDEXER_KEY)
"""The cache entries that grow by the new tokens, ``[batch, heads, past_seq, dim]``; the others are fixed-size
states."""

SCAN_CHUNK_KEYS = ("mamba_chunk_size", "chunk_size")
"""Config keys of a state-space layer's scan chunk (Bamba, Granite 4, Falcon-H1; Nemotron-H)."""


def scan_chunk(config: Any) -> int | None:
    """The scan chunk of a state-space model's ``config`` (a chunk over 1 under :data:`SCAN_CHUNK_KEYS`), or ``None``.
    An example traced over one chunk would have torch.export fix the scan to one chunk: examples span two."""
    return next((int(v) for k in SCAN_CHUNK_KEYS if isinstance(v := getattr(config, k, None), int) and v > 1), None)


def past_names(layers: int) -> list[str]:
    """``past_key_values.{i}.key`` / ``.value`` for each layer, in order."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """``present.{i}.key`` / ``.value`` for each layer, in order."""
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _base(model: nn.Module) -> nn.Module:
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def cache_layout(model: nn.Module) -> CacheLayout:
    """The cache layout of a transformers causal LM, read off its config and the cache of one eager step on two
    tokens (each layer's keys and values as the model caches them, where they differ from what the config says: MiMo-V2's
    values narrower than its keys, its windowed layers with twice the heads; a recurrent layer's states).

    Raises :class:`GraphError` naming the model when its config has no layer count or heads.
    """
    base = _base(model)
    cfg = getattr(base, "config", None)
    layer_cfgs = list(cfg.per_layer_config) if getattr(cfg, "is_heterogeneous", False) is True else []

    def get(*keys: str, source: Any = cfg) -> int | None:
        for k in keys:
            try:
                v = getattr(source, k, None)
            except RuntimeError:  # an attribute a heterogeneous config (Gemma 4) sets per layer: the first layer's
                if not layer_cfgs:
                    raise
                v = getattr(layer_cfgs[0], k, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    # a sequence-to-sequence model's decoder as a causal LM (BART, Marian, Blenderbot, Whisper, ...): its config maps
    # num_hidden_layers / num_attention_heads to the encoder's, and a distilled one's decoder differs (Blenderbot's)
    layers = get("decoder_layers", "num_hidden_layers", "n_layer", "num_layers")
    heads = get("decoder_attention_heads", "num_attention_heads", "n_head")
    hidden = get("hidden_size", "n_embd")
    try:
        cache, failed = _eager_cache(base), None
    except Exception as exc:  # a model that takes more than input_ids: the config alone, unless it has recurrent layers
        cache, failed = None, exc
    if cfg is not None and layers is not None and hidden is not None and heads is None:
        kv_layers, states = _recurrent_layers(base, cache, failed)
        if kv_layers == () and states:  # state-space layers alone (Mamba-2): no keys or values
            takes = "position_ids" in inspect.signature(base.forward).parameters
            return CacheLayout(int(layers), 0, 0, takes, kv_layers=kv_layers, states=states)
    if cfg is None or layers is None or heads is None or hidden is None:
        raise GraphError(f"{type(base).__name__}: not a transformers causal LM with a config "
                         "(num_hidden_layers, num_attention_heads, hidden_size)")
    kv_heads = heads if get("decoder_attention_heads") else get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    takes = "position_ids" in inspect.signature(base.forward).parameters
    latent, rope = get("kv_lora_rank"), get("qk_rope_head_dim")
    kv_layers, states = _recurrent_layers(base, cache, failed)
    shared = kv_shared_layers(base)
    indexed = _indexed_layers(cache)
    positions = _indexer_positions(cache)
    own = type(cache) if _linear_cache(cache) is not None else None  # MiniMax's cache class, which its forward requires
    if latent and rope:  # multi-head latent attention: the compressed keys/values and the keys' rotary part
        return CacheLayout(int(layers), 1, int(latent), takes, shared, int(rope),
                           kv_layers=kv_layers, states=states,  # beside Kimi Linear's delta attention layers
                           indexed=indexed, indexer_positions=positions,  # DeepSeek-V3.2's sparse attention
                           cache_type=own)
    # each layer's geometry: as cached, else as the config has it (Gemma 4's full attention layers: wider, fewer)
    geometry = [(get("num_key_value_heads", source=c) or heads, get("head_dim", source=c) or hidden // heads)
                for c in layer_cfgs] or [(kv_heads, head_dim)] * int(layers)
    per_layer = [(h, d, d) for h, d in geometry]
    seen = _cached_kv(cache, dict(shared)) if cache is not None else {}
    own_layers = int(layers)
    if seen and max(seen) >= int(layers):  # cache layers past the model's own: a looped section's later passes (Dory)
        per_layer += [(kv_heads, head_dim, head_dim)] * (max(seen) + 1 - int(layers))
        layers = max(seen) + 1
    per_layer = [seen.get(i, g) for i, g in enumerate(per_layer)]
    if kv_layers is None and seen and len(seen) < int(layers):  # layers the step left empty keep no cache: Mllama's
        kv_layers = tuple(sorted(seen))  # cross-attention layers, which a text-only step skips
    first = per_layer[min(seen) if seen else 0]
    if kv_layers is not None:  # a recurrent layer has no keys or values: the first attention layer's stand in
        per_layer = [g if i in kv_layers else first for i, g in enumerate(per_layer)]
    return CacheLayout(int(layers), first[0], first[1], takes, shared, None if first[2] == first[1] else first[2],
                       kv_layers=kv_layers, states=states,
                       per_layer=tuple(per_layer) if len(set(per_layer)) > 1 else (), indexed=indexed,
                       indexer_positions=positions,
                       cache_type=own, repeats=_repeated_layers(cache, own_layers) if states else ())


def _repeated_layers(cache: Any, own: int) -> tuple[int, ...]:
    """For each layer of the eager ``cache`` past the model's ``own`` layers, the first of the model's layers that is
    the same kind of cache layer (its class and window): the later passes of a looped section copy those."""
    layers = list(getattr(cache, "layers", []))

    def kind(layer: Any) -> tuple[Any, ...]:
        return type(layer), getattr(layer, "sliding_window", None), getattr(layer, "number_of_states", None)

    out = []
    for i in range(own, len(layers)):
        j = next((j for j in range(own) if kind(layers[j]) == kind(layers[i])), None)
        if j is None:
            raise GraphError(f"cache layer {i} (a {type(layers[i]).__name__}) repeats none of the model's {own} layers")
        out.append(j)
    return tuple(out)


def _eager_cache(model: nn.Module) -> Any:
    """The transformers cache of one eager step of ``model`` on two tokens, or ``None`` where it returns none. The
    step runs with the capture's module swaps (:func:`~flora_graph.frontend.traceable.traceable_modules`), so the cache
    holds what the captured graph keeps (RecurrentGemma's recurrent blocks keep their states in attributes of their
    own, the swapped ones in the cache; RWKV's and xLSTM's forwards keep states of their own, the swapped ones a
    cache)."""
    from flora_graph.frontend.traceable import traceable_modules

    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad(), traceable_modules(model):
        cache = getattr(model(input_ids=ids, use_cache=True), "past_key_values", None)
        given = _recurrent_cache(model) if cache is None else None
        if given is not None:  # a model that returns no cache but fills the one it is given (RecurrentGemma)
            model(input_ids=ids, use_cache=True, **{_cache_arg(model): given})
            cache = given
    return cache if cache is not None and hasattr(cache, "layers") else None


def _recurrent_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` laid out for ``model``'s config where it has recurrent (linear attention) layers,
    else ``None``."""
    own = state_forward(model)
    if own is not None:  # no layer types in its config (RWKV, xLSTM): every layer recurrent
        return own.cache(model)
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    except Exception:  # a config the generic cache cannot lay out
        return None
    return cache if any("LinearAttention" in type(layer).__name__ for layer in cache.layers) else None


def _linear_cache(cache: Any) -> list[Any] | None:
    """MiniMax's ``linear_cache`` (a list over the layers: a lightning attention layer's state ``[batch, heads,
    head_dim, head_dim]``, ``[]`` for the others) of ``cache``, where it is such a cache, else ``None``."""
    linear = getattr(cache, "linear_cache", None)
    ok = isinstance(linear, list) and callable(getattr(cache, "set_linear_cache", None))
    return linear if ok and any(isinstance(t, torch.Tensor) for t in linear) else None


def _indexed_layers(cache: Any) -> tuple[tuple[int, int], ...]:
    """``(layer, index_head_dim)`` of each layer of ``cache`` (one eager step's, or ``None``) that holds its indexer's
    keys (transformers' ``DynamicIndexedLayer``: ``indexer_keys`` ``[batch, seq, index_head_dim]``)."""
    out = []
    for i, layer in enumerate(getattr(cache, "layers", None) or []):
        keys = getattr(layer, "indexer_keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 3:
            out.append((i, int(keys.shape[-1])))
    return tuple(out)


def _indexer_positions(cache: Any) -> tuple[tuple[int, int], ...]:
    """``(layer, position dims)`` of each layer of ``cache`` (one eager step's, or ``None``) that keeps its indexer
    keys' positions (``indexer_position_ids``, ``[dims, batch, seq]``)."""
    out = []
    for i, layer in enumerate(getattr(cache, "layers", None) or []):
        held = getattr(layer, "indexer_position_ids", None)
        if isinstance(held, torch.Tensor) and held.dim() == 3:
            out.append((i, int(held.shape[0])))
    return tuple(out)


def _cached_kv(cache: Any, source: dict[int, int]) -> dict[int, tuple[int, int, int]]:
    """``(kv_heads, key dim, value dim)`` of each layer with keys and values in ``cache`` (``[batch, heads, seq,
    dim]``); a layer reading another's (``source``) has that layer's."""
    out: dict[int, tuple[int, int, int]] = {}
    for i, layer in enumerate(cache.layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == v.dim() == 4 and k.numel():
            out[i] = (int(k.shape[1]), int(k.shape[3]), int(v.shape[3]))
    out.update({i: out[j] for i, j in source.items() if j in out})
    return out


def _recurrent_layers(model: nn.Module, cache: Any, failed: Exception | None) -> tuple[tuple[int, ...] | None,
                                                                                    tuple[CacheState, ...]]:
    """For a model whose transformers cache has recurrent layers (state-space, delta-rule or convolution layers:
    Bamba, Mamba, Qwen3.5, Kimi Linear, LFM2, ...): the layers with keys and values and the recurrent layers' states,
    read off ``cache``, that of one eager step on two tokens (``failed``: why there is none); ``(None, ())`` for a
    model with attention layers only.

    Raises :class:`GraphError` for a layer that keeps more than one state of a kind, and ``failed`` where the model
    has recurrent layers."""
    if _recurrent_cache(model) is None:  # attention layers only (or a config the generic cache cannot lay out)
        return None, ()
    if failed is not None:
        raise failed
    if cache is None:  # no cache returned: nothing to read the states off
        return None, ()
    kv, states = [], []
    linear = _linear_cache(cache) or []
    for i, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            kv.append(i)
        if i < len(linear) and isinstance(linear[i], torch.Tensor):  # MiniMax's lightning attention: one state a layer
            states.append(CacheState(i, "recurrent", tuple(int(d) for d in linear[i].shape[1:])))
            continue
        for kind in ("conv", "recurrent"):
            held = {k: v for k, v in (getattr(layer, f"{kind}_states", None) or {}).items() if v is not None}
            if not all(isinstance(k, int) and isinstance(v, torch.Tensor) for k, v in held.items()):
                raise GraphError(f"{type(model).__name__}: layer {i} keeps {kind} states that are not tensors by index")
            states += [CacheState(i, f"{kind}.{j}" if j else kind, tuple(int(d) for d in held[j].shape[1:]))
                       for j in sorted(held)]
    return tuple(kv), tuple(states)


def state_slot(kind: str) -> tuple[str, int]:
    """``(kind, index)`` of a :class:`CacheState` kind among its layer's states of that kind: ``"conv"`` is
    ``("conv", 0)``, ``"conv.2"`` ``("conv", 2)``."""
    base, _, index = kind.partition(".")
    return base, int(index or 0)


def kv_shared_layers(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """``(layer, source)`` for each attention layer of a transformers model that reads another layer's keys and
    values (``is_kv_shared_layer``: Gemma 3n's last layers, whose own cache transformers leaves empty); the
    source is the layer of its attention type that stores them (``store_full_length_kv``).

    Raises :class:`GraphError` for a shared layer whose type no layer stores."""
    attns = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and isinstance(getattr(m, "is_kv_shared_layer", None), bool)]
    store = {getattr(a, "layer_type", None): a.layer_idx for a in attns if getattr(a, "store_full_length_kv", False)}
    pairs = []
    for a in attns:
        if a.is_kv_shared_layer:
            kind = getattr(a, "layer_type", None)
            if kind not in store:
                raise GraphError(f"{type(model).__name__}: layer {a.layer_idx} reads another layer's keys and values, "
                                 f"but no layer of its type {kind!r} stores them")
            pairs.append((a.layer_idx, store[kind]))
    return tuple(sorted(pairs))


@functools.cache
def _whole_sliding_layer(linear: bool = False) -> type:
    """A transformers ``DynamicLayer`` that keeps every position yet counts as a sliding-window layer: the mask
    applies the window, and transformers builds a hybrid model's sliding-window mask from the first layer that says
    it slides (its query offset that layer's length). Without the flag that mask read a linear-attention layer's
    token count, which the flat cache does not carry, and decoded every query at position 0. ``linear``: the same
    for a layer that also keeps a recurrent layer's states (``LinearAttentionAndFullAttentionLayer``, standing in
    for Inkling's ``LinearAttentionAndSlidingWindowAttentionLayer``)."""
    from transformers import cache_utils

    base = cache_utils.LinearAttentionAndFullAttentionLayer if linear else cache_utils.DynamicLayer
    return type(f"_WholeSliding{base.__name__}", (base,), {"is_sliding": True})


def _keeping_every_position(layer: Any) -> Any:
    """``layer`` (a fresh cache layer) or, for a sliding-window one, one that keeps every position
    (:func:`_whole_sliding_layer`): the mask applies the window over the flat cache's keys."""
    kind = type(layer).__name__
    if kind == "DynamicSlidingWindowLayer":
        return _whole_sliding_layer()()
    if kind == "LinearAttentionAndSlidingWindowAttentionLayer":
        return _whole_sliding_layer(linear=True)(number_of_states=layer.number_of_states)
    return layer


def _cache_of(layout: CacheLayout, past: list[torch.Tensor], config: Any) -> Any:
    """A transformers ``DynamicCache`` holding the flat ``past`` (in :meth:`CacheLayout.entries` order). A recurrent
    layer's states are copies (the layer updates them in place) that it takes as its previous state: zeros are
    the state of an empty cache, so one graph serves prefill and decode."""
    from transformers import DynamicCache

    if layout.cache_type is not None:  # MiniMax's: keys and values as a DynamicCache's, the states in its linear_cache
        cache = layout.cache_type()
        keys: dict[int, torch.Tensor] = {}
        positions: torch.Tensor | None = None  # one-wide keys over the cached positions
        for (i, kind), t in zip(layout.entries(), past, strict=True):
            if kind == "key":
                keys[i] = t
            elif kind == "value":
                cache.update(keys.pop(i), t, i)
                positions = t[..., :1] if positions is None else positions
            else:
                cache.set_linear_cache(i, t.clone())
        # the causal mask reads the cache's length off its first layer, a lightning attention layer whose keys the
        # cache never holds: without positions there it would cover the new tokens alone (eager decoding skips the
        # mask where nothing is padded). Each such layer holds keys one wide over the cached positions instead.
        for st in layout.states if positions is not None else ():
            cache.update(positions, positions, st.layer)
        return cache
    if not layout.states and not layout.indexed:
        cache = DynamicCache()  # full layers: a sliding window is the mask's business, the cache keeps every position
        kv = [i for i, kind in layout.entries() if kind == "key"]  # a layer without (Mllama's cross-attention) is empty
        for n, i in enumerate(kv):
            cache.update(past[2 * n], past[2 * n + 1], i)
        return cache
    cache = DynamicCache(config=config)
    cache.layers += [DynamicCache(config=config).layers[j] for j in layout.repeats]  # a looped section's later passes
    keys: dict[int, torch.Tensor] = {}
    for (i, kind), t in zip(layout.entries(), past, strict=True):
        layer = cache.layers[i]
        if kind == "key":
            keys[i] = t
        elif kind == "value":
            cache.layers[i] = _keeping_every_position(layer)
            cache.update(keys.pop(i), t, i)
        elif kind == INDEXER_KEY:  # [batch, 1, past, dim] as the graph carries them, [batch, past, dim] as the layer
            layer.lazy_initialization_indexer(t[:, 0])
            layer.indexer_keys = t[:, 0]
        else:
            base, j = state_slot(kind)
            if not hasattr(layer, f"{base}_states"):  # a recurrent layer the config does not name (RWKV's, xLSTM's)
                from transformers.cache_utils import LinearAttentionLayer

                count = 1 + max(state_slot(st.kind)[1] for st in layout.states if st.layer == i)
                layer = cache.layers[i] = LinearAttentionLayer(number_of_states=count)
            getattr(layer, f"{base}_states")[j] = t.clone()
            getattr(layer, f"is_{base}_states_initialized")[j] = True
            layer.has_previous_state[j] = True
            layer.dtype, layer.device = t.dtype, t.device
            if base == "conv":
                layer.conv_kernel_size[j] = t.shape[-1]
    return cache


def flat_forward(forward: Callable[..., Any], layout: CacheLayout, cache_arg: str,
                 config: Any = None) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``forward`` (a causal LM's, whose config is ``config``) with flat cache tensors in and out:
    ``f(input_ids, attention_mask, [position_ids,] past_key_values=[k0, v0, k1, v1, ...])`` returns
    ``(logits, k0', v0', ...)``, in :meth:`CacheLayout.entries` order (a recurrent layer's states among them)."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
            past_key_values: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        cache = _cache_of(layout, list(past_key_values or []), config)
        if layout.indexer_positions:  # the past positions, as the eager steps before would have kept them
            history = positions_from_mask(attention_mask)[:, : attention_mask.shape[1] - input_ids.shape[1]]
            for i, dims in layout.indexer_positions:
                cache.layers[i].indexer_position_ids = history[None].expand(dims, -1, -1)
        if layout.states and not layout.kv_layers:  # recurrent layers alone read the new tokens' part of the mask
            attention_mask = attention_mask[:, -input_ids.shape[1]:]  # (Mamba-1's layers multiply by it as given)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True,
                                  cache_arg: cache}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = forward(**kwargs)
        flat: list[torch.Tensor] = [out.logits]
        source = dict(layout.shared)  # a layer reading another's keys and values presents the other's cache
        returned = getattr(out, "past_key_values", None)
        returned = cache if returned is None else returned
        for i, kind in layout.entries():
            if layout.cache_type is not None and kind not in GROWING:  # MiniMax's lightning attention state
                flat.append(returned.linear_cache[i])
                continue
            layer = returned.layers[source.get(i, i)]
            if kind == INDEXER_KEY:
                flat.append(layer.indexer_keys[:, None])
            elif kind in ("key", "value"):
                flat.append(getattr(layer, f"{kind}s"))
            else:
                base, j = state_slot(kind)
                flat.append(getattr(layer, f"{base}_states")[j])
        return tuple(flat)

    return run


def _cache_method_missing(exc: GraphError, model: nn.Module) -> tuple[str, str] | None:
    """``(method, "class(es) ...")`` where the export failed on a method the model calls on a cache layer of the flat
    cache (``'DynamicLayer' object has no attribute ...``) that its eager cache's own layer classes have, else
    ``None``."""
    found = re.search(r"'(\w*Layer)' object has no attribute '(\w+)'", str(exc))
    if found is None:
        return None
    try:
        cache = _eager_cache(_base(model))
    except Exception:  # the eager step itself fails: nothing to name
        return None
    owners = sorted({type(layer).__name__ for layer in getattr(cache, "layers", None) or []
                     if callable(getattr(layer, found.group(2), None))})
    if not owners:
        return None
    return found.group(2), ("class " if len(owners) == 1 else "classes ") + ", ".join(owners)


def _cache_arg(model: nn.Module) -> str:
    params = inspect.signature(_base(model).forward).parameters
    own = state_forward(_base(model)) is not None  # the forward called in place of the class's takes either
    return "past_key_values" if "past_key_values" in params or own else "cache"


def _lm_forward(model: nn.Module, bound: Callable[..., Any]) -> Callable[..., Any]:
    """``bound`` (``model``'s forward), or the forward that keeps the model's states in a cache where its own
    keeps them elsewhere (RWKV, xLSTM: :mod:`~flora_graph.frontend.state_forwards`)."""
    base = _base(model)
    own = state_forward(base)
    return bound if own is None else own.forward(base)


class CausalLMWithPast(nn.Module):
    """``model`` with flat cache tensors in and out (see :func:`flat_forward`): the eager reference
    of what :func:`capture_causal_lm` captures."""

    def __init__(self, model: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.model = model
        self._run = flat_forward(_lm_forward(model, model), layout, _cache_arg(model), _base(model).config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                past_key_values: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        return self._run(input_ids, attention_mask, position_ids, past_key_values)


@contextlib.contextmanager
def _forward_with_past(model: nn.Module, layout: CacheLayout) -> Iterator[None]:
    """Give the model itself the flat forward for the block, so module paths (and the adapter
    slots named after them) stay the model's own, with no wrapper prefix."""
    base = _base(model)
    base.forward = flat_forward(_lm_forward(base, type(base).forward.__get__(base)), layout, _cache_arg(base),
                                base.config)
    try:
        yield
    finally:
        del base.forward


def example_inputs(layout: CacheLayout, vocab: int, batch: int, seq: int, past: int, *,
                   seed: int = 0, left_pad: int = 0) -> dict[str, Any]:
    """Random inputs in the graph's layout: ``left_pad`` padding positions at the start of row 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    mask[0, :left_pad] = 0
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if layout.takes_position_ids:
        out["position_ids"] = positions_from_mask(mask)[:, past:].contiguous()  # a view would tie seq to its stride
    def shape(i: int, kind: str) -> tuple[int, ...]:
        return layout.growing_shape(i, kind, past) if kind in GROWING else layout.state_shape(i, kind)

    out["past_key_values"] = [torch.randn(batch, *shape(i, kind), generator=gen) for i, kind in layout.entries()]
    return out


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask: ``cumsum(mask) - 1``, padding at 1 (as transformers' generate does)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _per_row_forward(module: nn.Module, inv_freq_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """``module``'s rotary forward with frequencies ``inv_freq_of(last)`` (``[batch, 1, dim / 2]``) from each row's
    own ``last = max(position_ids) + 1`` (``[batch, 1, 1]``), where transformers takes the batch's."""
    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = position_ids.amax(dim=-1, keepdim=True)[..., None] + 1  # [batch, 1, 1]
        freqs = position_ids[..., None].float() * inv_freq_of(last).to(x.device).float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * module.attention_scaling, emb.sin() * module.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    return forward


_RotarySetup = Callable[[nn.Module], tuple[int, Callable[[torch.Tensor], torch.Tensor], Callable[[], Any]] | None]
"""``module -> (limit, inv_freq_of, reset)``, or ``None`` for a module to leave as it is."""


@contextlib.contextmanager
def _rotaries_per_row(model: nn.Module, rope_type: str, setup: _RotarySetup) -> Iterator[list[str]]:
    """Within the block, each rotary of ``model`` of ``rope_type`` whose ``setup(module)`` gives ``(limit,
    inv_freq_of, reset)`` runs :func:`_per_row_forward` of ``inv_freq_of``, once that forward equals the module's
    own bit for bit on one row below and one past ``limit``, each from a state ``reset()`` makes as a fresh
    module's (and left so); the others keep their forward. Yields the paths switched."""
    switched = []
    for path, module in model.named_modules():
        if getattr(module, "rope_type", None) != rope_type \
                or not isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            continue
        made = setup(module)
        if made is None:
            continue
        limit, inv_freq_of, reset = made
        forward = _per_row_forward(module, inv_freq_of)
        x = torch.zeros(1, 1, dtype=torch.float32)
        same = True
        with torch.no_grad():
            for n in (limit - 3, limit + 5):
                reset()
                same &= all(torch.equal(a, b) for a, b in zip(module(x, torch.arange(n)[None]),
                                                              forward(x, torch.arange(n)[None]), strict=True))
            reset()  # the check's calls changed its state: as it was
        if same:
            switched.append((path, module, forward))
    for _, module, forward in switched:
        module.forward = forward
    try:
        yield [p for p, _, _ in switched]
    finally:
        for _, module, _ in switched:
            del module.forward  # the class's forward again


def _longrope_setup(module: nn.Module):
    """Per row, the long frequency set where the row's largest position reaches the original length
    (transformers' test, ``max(position_ids) + 1 > limit``), the short one below it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(getattr(module, "config", None), "rope_parameters", None)
    limit = params.get("original_max_position_embeddings") if isinstance(params, dict) else None
    if not isinstance(limit, int) or limit < 1:
        return None
    short = module.original_inv_freq.detach().clone()
    long = ROPE_INIT_FUNCTIONS["longrope"](module.config, short.device, seq_len=limit + 1)[0].detach().clone()
    return (limit, lambda last: torch.where(last > limit, long.to(last.device), short.to(last.device)),
            lambda: module.inv_freq.copy_(module.original_inv_freq))


def longrope_per_row(model: nn.Module) -> contextlib.AbstractContextManager[list[str]]:
    """Within the block, each transformers ``longrope`` rotary of ``model`` (Phi-3 128k, Phi-3.5, Phi-4-mini)
    picks its frequency set per row, from that row's largest position, where transformers picks one for the
    whole batch from the batch's largest: the same for one row, and the rows of a batch stay independent, as
    the Generator serves them. Each module is checked against its own forward on one row below and one past
    the switch, bit for bit; one that does not match keeps its forward. Yields the paths switched."""
    return _rotaries_per_row(model, "longrope", _longrope_setup)


def _reset_dynamic(module: nn.Module) -> None:
    """A ``dynamic`` rotary's state back to a fresh one's (its frequencies at the original length)."""
    module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
    module.max_seq_len_cached = module.original_max_seq_len


def _dynamic_setup(module: nn.Module):
    """Per row, transformers' own ``_compute_dynamic_ntk_parameters`` at the row's ``max(position_ids) + 1`` (at
    least the original length); no state kept between calls."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    limit = getattr(module, "original_max_seq_len", None)
    if not isinstance(limit, int) or limit < 1:
        return None
    init = ROPE_INIT_FUNCTIONS[module.rope_type]
    return limit, lambda last: init(module.config, last.device, seq_len=last)[0], lambda: _reset_dynamic(module)


def dynamic_ntk_per_row(model: nn.Module) -> contextlib.AbstractContextManager[list[str]]:
    """Within the block, each transformers ``dynamic`` (NTK) rotary of ``model`` computes its frequencies in the
    graph, per row, from that row's largest position, where transformers' forward keeps them as state between
    calls and grows them past the original length behind a Python ``if`` (which torch.export, and so
    torch.onnx.export, cannot trace). The same as a fresh model for one row decoding forward, and the rows of a
    batch stay independent, as the Generator serves them. Each module is checked against its own forward
    (fresh) on one row below and one past the original length, bit for bit; one that does not match keeps
    its forward. Yields the paths switched."""
    return _rotaries_per_row(model, "dynamic", _dynamic_setup)


def _check_stamped(graph: Graph, base: nn.Module, layout: CacheLayout, vocab: int, out_names: list[str]) -> None:
    """Raise :class:`StampError` unless ``graph`` (stamped) computes, in the numpy reference backend, the logits
    and every layer's keys and values that ``base`` (its flat forward on) computes eagerly on a short decode step:
    the stamped layers past those traced are checked by value too."""
    x = example_inputs(layout, vocab, 1, 2, 2, seed=7)
    feeds = {k: v.numpy() for k, v in x.items() if k != "past_key_values"}
    feeds.update({n: t.numpy() for n, t in zip(layout.past_names(), x["past_key_values"], strict=True)})
    check_by_value(graph, feeds, lambda: base(**x), out_names, "the stamped graph")


def capture_causal_lm(model: nn.Module, *, name: str | None = None, dim_max: dict[str, int] | None = None,
                      share_weights: bool = False, layout: CacheLayout | None = None,
                      stamp_layers: bool = True) -> Graph:
    """Capture ``model`` (a transformers causal LM, or a PeftModel of one) with its key/value cache.

    The graph's inputs and outputs are named as in the module docstring (:meth:`CacheLayout.past_names`,
    :meth:`CacheLayout.present_names`); a state-space model is traced over two chunks of its scan
    (:func:`scan_chunk`); ``batch``, ``seq`` and ``past_seq`` are dynamic (``dim_max`` may bound them, e.g.
    ``{"seq": 4096}``). A ``longrope`` rotary takes its frequency set row by row (:func:`longrope_per_row`), a
    ``dynamic`` (NTK) one its frequencies (:func:`dynamic_ntk_per_row`); a sliding window counts token
    positions (:func:`~flora_graph.frontend.sliding_window.windows_by_position`). ``share_weights``: the graph's
    weights are views of the model's (see :func:`~flora_graph.frontend.capture`). ``layout``: the model's
    :func:`cache_layout`, where the caller has it (a hybrid's is read off an eager step). ``stamp_layers``: trace the
    first layers, up to a template of each kind of layer (three where the layers past the first are alike), and
    copy each template's program for the later layers of its kind (:mod:`~flora_graph.frontend.layer_stamp`: the
    same graph, checked op by op against a traced layer and by value against eager, in a fraction of the time on a
    deep model); ``False``, or where that cannot be done exactly, every layer is traced.

    Raises:
        GraphError: the model is not a causal LM with a config, or torch.export fails on it.
        UnsupportedOpError: as :func:`~flora_graph.frontend.capture` does.
    """
    layout = cache_layout(model) if layout is None else layout
    base = _base(model)
    vocab = int(getattr(base.config, "vocab_size", 256))
    chunk = scan_chunk(base.config) if layout.states else None
    seq = 3 if chunk is None else min(2 * chunk + 1, (dim_max or {}).get("seq", 2 * chunk + 1))
    inputs = example_inputs(layout, vocab, 2, seq, 5)  # on fake tensors: a long example costs nothing
    dims: dict[str, Any] = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "past_seq+seq"}}
    if layout.takes_position_ids:
        dims["position_ids"] = {0: "batch", 1: "seq"}
    else:
        inputs.pop("position_ids", None)
    dims["past_key_values"] = [{0: "batch", 2: "past_seq"} if kind in GROWING else {0: "batch"}
                               for _, kind in layout.entries()]
    in_names = [*dims][:-1] + layout.past_names()
    out_names = ["logits", *layout.present_names()]
    graph = None
    try:
        with _forward_with_past(model, layout), longrope_per_row(model), dynamic_ntk_per_row(model):
            if stamp_layers:  # the first layers traced, the others stamped from them where that is exact
                graph = stamped_or_none(
                    lambda: capture_stamped(model, inputs, dims, layout, name=name or type(base).__name__,
                                            input_names=in_names, output_names=out_names, dim_max=dim_max,
                                            share_weights=share_weights),
                    lambda g: _check_stamped(g, base, layout, vocab, out_names), type(base).__name__)
            # a Python loop over a scan's chunks that no swap makes one op comes out bounded to one chunk a call, the
            # cache carrying the state from piece to piece: the Generator prefills long prompts in pieces
            if graph is None:
                graph = capture(model, inputs, dims, name=name or type(base).__name__, dim_max=dim_max,
                                input_names=in_names, output_names=out_names, share_weights=share_weights)
    except GraphError as exc:  # the model's own forward again here, for an eager step that names its cache's class
        if re.search(r"(conv|recurrent) state|cache of its own", str(exc)):
            raise GraphError(f"{type(base).__name__}: its state-space or linear-attention layers keep a state "
                             "this export does not carry (only one convolution and one recurrent state a layer, "
                             "as Mamba-2 and LFM2 keep them, are carried); capture it without the cache "
                             "(flora_graph.frontend.capture, or flora-graph export without --task "
                             f"text-generation-with-past) ({exc})") from exc
        if (own := _cache_method_missing(exc, model)) is not None:
            raise GraphError(f"{type(base).__name__}: its forward calls {own[0]!r} on its cache layers, a method of "
                             f"its own cache layer {own[1]}, which keep state beyond keys, values and fixed-size "
                             "states (a compressor's buffered tokens and counts) that this export's flat cache cannot "
                             f"carry ({exc})") from exc
        raise
    from flora_graph.frontend.sliding_window import windows_by_position

    windows_by_position(graph)  # counted in tokens: right-padded batches (GenAI's) keep each row's window
    return graph
