"""Forms of Hugging Face models that ``torch.export`` cannot trace, swapped for equal ones while capturing.

* **Mixture-of-experts** (Mixtral, Qwen2-MoE, ...): transformers' default experts implementation,
  ``grouped_mm``, sorts tokens by expert with ``histc`` and calls a custom op
  (``transformers.grouped_mm_fallback``) that no exporter converts. Its ``batched_mm``
  implementation computes the same outputs with batched matrix products over the selected
  experts, which torch.export traces; :func:`traceable_experts` selects it for the capture and
  restores the model's choice after. (``eager`` loops over the experts present in the batch, a
  data-dependent loop torch.export refuses.) SwitchTransformers' experts (a ``ModuleDict`` of ``expert_{i}`` fed
  one-hot ``selected_experts``) loop the same way in their own ``forward``: they run every expert on every token
  and keep each token's own, weighted, instead (what the loop adds, bit for bit, at ``num_experts`` times the
  work); its router converts its classifier with ``Module.to`` on every call, which torch.export cannot replay on
  fake tensors: the conversion is done once before, and the call left a no-op. NLLB-MoE's experts and router are
  handled alike: its experts loop over the experts ``one_hot(router_mask)`` marks, each on the (token, slot) pairs it
  marks; they run every expert on every token, each weighted by the summed probabilities of the slots that mark it
  (:func:`_dense_masked_forward`), and its router's ``_cast_classifier`` converts the classifier as Switch's does. X-MOD's language adapters
  (``lang_adapter``: each row's adapter chosen by its ``lang_ids``) take each language's rows with a bool mask
  and put the adapter's outputs back with another, a data-dependent shape; there too every adapter runs on every
  row and each row keeps its own language's (``Where``), at ``languages`` times the adapters' work. JetMoE's
  mixtures of experts and of attention heads sort their tokens by expert and split them by each expert's count,
  read into Python (``tolist``); their routers keep the counts a tensor instead, and their experts run on every
  sorted token, each keeping its own expert's product (the expert of a position: how many counts' running sums
  it has passed), at ``experts`` times the experts' work. DBRX's experts (every expert's ``w1`` / ``v1`` / ``w2``
  stacked in one parameter each) loop over the experts present in the batch as ``eager`` does; they run
  ``batched_mm``'s form instead, on each ``(token, expert)`` pair's slice of the stacked weights
  (:func:`_gathered_glu_forward`), which rule ``group-experts`` turns into one product per expert.
* **PEFT layers torch.export cannot trace adapted**: PEFT's LoRA on ``nn.MultiheadAttention`` merges the adapter
  into a plain tensor for each call, which torch.export refuses ("a fake tensor in the exported program constant's
  list"), and HRA's and SHiRA's layers do the same; BOFT's and PSOFT's solve a linear system for their orthogonal
  factor, C3A's multiply complex FFTs, PaCA's run a custom op, WaveFT's scatter by a bool mask beside other indices
  and FRoD's multiply sparse tensors, which no converter takes. :func:`merged_peft_layers` merges those layers for the
  capture (PEFT's ``merge``), so they are captured merged (their adapter baked into the base weights; the graph has
  no LoRA site for them), and puts the original parameters back, bit for bit, after.

* **Attention masks built with** ``torch.vmap``: transformers builds a mask through ``vmap`` where a model adds a
  mask function of its own (T5Gemma 2's bidirectional sliding window), which torch.export records as vmap's
  batching ops that no exporter converts. Its other path broadcasts the index ranges through the same function
  (as it does for every mask of its own); :func:`broadcast_masks` has ``sdpa_mask`` take that path while capturing.

* **A mask dropped where it masks nothing**: FSMT's ``make_padding_mask`` returns ``None`` where no token is padding,
  a branch on the data torch.export refuses; the swap (:data:`SWAPS`) always returns the mask, which masks nothing
  there, the same attention.

* **Sparse attention's top-k selection** (DeepSeek-V3.2, GLM-MoE-DSA, AXK2, Dots3 Note, HY-V4): the indexer of
  DeepSeek Sparse Attention returns the ``topk(min(index_topk, keys))`` best keys of each query, a ``min`` that
  torch.export decides from the example's length and fixes (or refuses, for a length on either side of
  ``index_topk``). While capturing it sorts every key instead (``index_topk`` made the number of keys while
  it runs) and returns the first ``index_topk`` of that order, the best key repeated where there are
  fewer keys: the same keys, the only use the attention makes of them being a mask scattered from them, where a key
  named twice is selected once. :func:`traceable_modules` swaps it in.

* **Block-sparse token selection** (Kolibri 1.1's pooled indexer, Qwen4-Exp's QSA indexer), which transformers
  computes per batch row and per query (or group of queries) in Python loops over ``nonzero`` / ``unique()``: the
  same masks for every query in one pass (:mod:`~flora_graph.frontend.pooled_indexer`,
  :mod:`~flora_graph.frontend.qsa_indexer`), swapped in by :func:`traceable_modules`.

* **Token ids in a recurrent state** (Qwen4-Exp's per-layer n-gram embeddings, which read the last tokens from an
  ``int64`` convolution state, end-of-text where none came before): the module sees float states of id + 1, 0 for
  no token, the zeros of an empty cache (:mod:`~flora_graph.frontend.token_context`), swapped in by
  :func:`traceable_modules`.

* **MiniMax's lightning attention**, a decayed linear attention that transformers loops over blocks of tokens (a
  count fixed from the example's length) or over the tokens one by one once the cache holds its state: one closed
  form for any length from any state (:mod:`~flora_graph.frontend.lightning_attention`), swapped in by
  :func:`traceable_modules`.

* **Zamba's multi-head Mamba mixers**, which branch on the number of tokens in their own ``forward`` (one token steps
  from the cached state, more scan from zeros): one scan per head from the cached state for any number
  (:func:`~flora_graph.frontend.selective_scan.multi_head_mixer_forward`), swapped in by :func:`traceable_modules`.

* **RecurrentGemma's recurrent blocks** (Griffin's), which keep their convolution's inputs and their recurrence's
  state in attributes of their own and branch on the number of tokens: the same block with both states in the cache
  for any number of tokens (:mod:`~flora_graph.frontend.recurrent_block`), swapped in by :func:`traceable_modules`.

* **RWKV and xLSTM causal LMs**, which keep their states in a list or a cache class of their own that they write in
  place, loop over positions in Python and ignore the attention mask: the forwards of
  :mod:`~flora_graph.frontend.state_forwards`, one scan (RWKV) or one closed form (xLSTM) for any number of tokens,
  with padding left out of the states, swapped in by :func:`traceable_modules`.

* **Recurrent layers' scans** that transformers writes as Python loops (Mamba-1's selective scan, a loop
  over positions; the gated delta rule of Qwen3.5, Qwen3-Next and Kimi Linear, a loop over chunks of 64
  around a 63-step forward substitution): :func:`traceable_scans` swaps the module-level functions transformers
  lets a kernel replace (:data:`SWAPS`) for ones around a custom op the trace records as one node
  (:mod:`~flora_graph.frontend.selective_scan`, :mod:`~flora_graph.frontend.delta_rule`), for the capture.
* **``len`` of a tensor** in a model's own code (RT-DETR and PP-DocLayout V3: ``batch_size = len(source_flatten)``):
  Python's ``len`` makes the dynamic batch the example's number, so the export would hold that batch alone
  (torch.onnx's file silently does). :func:`sized_len` gives those modules a ``len`` that
  returns a tensor's first size as torch keeps it, a dim where it is dynamic.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.frontend.delta_rule import (
    CHUNKED_PARAMS,
    RECURRENT_PARAMS,
    gated_delta_rule,
    recurrent_gated_delta_rule,
)
from flora_graph.frontend.feature_sizes import (
    is_detr_decoder_with_rpb,
    is_detr_encoder_with_sizes,
    recorded_sizes,
    sized_rpb,
)
from flora_graph.frontend.lightning_attention import is_lightning_attention, lightning_forward
from flora_graph.frontend.pooled_indexer import is_pooled_indexer, pooled_indexer_forward
from flora_graph.frontend.qsa_indexer import is_qsa_indexer, qsa_indexer_forward
from flora_graph.frontend.recurrent_block import is_recurrent_block, recurrent_block_forward
from flora_graph.frontend.selective_scan import (
    SCAN_FORWARD,
    SCAN_FORWARD_PARAMS,
    is_multi_head_mixer,
    multi_head_mixer_forward,
    scan_forward,
)
from flora_graph.frontend.state_forwards import state_forward
from flora_graph.frontend.token_context import is_token_context_embedding, token_context_forward
from flora_graph.frontend.windowed_attention import (
    is_padded_to_windows,
    is_windowed_attention,
    unpadded_windows,
    windowed_attention_forward,
)

__all__ = ["METHOD_SWAPS", "MODULE_SWAPS", "SWAPS", "TRACEABLE_EXPERTS", "broadcast_masks", "merged_peft_layers", "sized_len",
           "traceable_experts", "traceable_modules", "traceable_scans"]

SWAPS: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    SCAN_FORWARD: (SCAN_FORWARD_PARAMS, scan_forward),
    "torch_chunk_gated_delta_rule": (CHUNKED_PARAMS, gated_delta_rule),
    "torch_recurrent_gated_delta_rule": (RECURRENT_PARAMS, recurrent_gated_delta_rule),
    "chunk_kimi_delta_attention": (CHUNKED_PARAMS, gated_delta_rule),  # a decay per key channel
    "recurrent_kimi_delta_attention": (RECURRENT_PARAMS, recurrent_gated_delta_rule),
    "make_padding_mask": (("input_ids", "padding_idx"), lambda input_ids, padding_idx=1: input_ids.eq(padding_idx)),
}
"""Module-level function name -> (its leading parameters, the traceable function with those) for
:func:`traceable_scans`."""

TRACEABLE_EXPERTS = "batched_mm"
_UNTRACEABLE = {None, "grouped_mm", "eager"}


@contextlib.contextmanager
def traceable_experts(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every experts module of ``model`` whose implementation torch.export cannot
    trace runs ``batched_mm`` (or, for SwitchTransformers' and JetMoE's experts and X-MOD's language adapters,
    every expert densely: see the module's docstring) and every router that converts its classifier in ``forward`` has it converted already;
    yields the paths of the experts modules switched. Restored on exit."""
    experts = [(path, module.config) for path, module in model.named_modules()
               if hasattr(module, "_apply_gate") and hasattr(type(getattr(module, "config", None)), "_experts_implementation")]
    originals = {id(cfg): (cfg, getattr(cfg, "_experts_implementation_internal", None)) for _, cfg in experts}
    paths = [path for path, cfg in experts if originals[id(cfg)][1] in _UNTRACEABLE]
    changed = [(cfg, was) for cfg, was in originals.values() if was in _UNTRACEABLE]
    dense = [(path, module) for path, module in model.named_modules() if _one_hot_experts(module)]
    masked = [(path, module) for path, module in model.named_modules() if _masked_experts(module)]
    languages = [(path, module) for path, module in model.named_modules() if _language_adapters(module)]
    split = [(path, module) for path, module in model.named_modules() if _split_experts(module)]
    stacked = [(path, module) for path, module in model.named_modules() if _stacked_glu_experts(module)]
    routers = [module for module in model.modules() if _converting_router(module)]
    for cfg, _ in changed:
        cfg._experts_implementation_internal = TRACEABLE_EXPERTS
    for path, module in dense:
        module.forward = _dense_forward(module)  # an instance attribute: deleted on exit
        paths.append(path)
    for path, module in masked:
        module.forward = _dense_masked_forward(module)
        paths.append(path)
    for path, module in languages:
        module.lang_adapter = _dense_lang_adapter(module)
        paths.append(path)
    for path, module in split:
        module.router.forward = _counting_router(module.router)
        for experts in (module.input_linear, module.output_linear):
            experts.forward = _sorted_dense_forward(experts)
        paths.append(path)
    for path, module in stacked:
        module.forward = _gathered_glu_forward(module)
        paths.append(path)
    for router in routers:
        router.classifier.to(router.dtype)  # what the router's first call does (nothing where the dtype is the model's)
        router.classifier.to = _same(router.classifier)
    try:
        yield paths
    finally:
        for cfg, was in changed:
            cfg._experts_implementation_internal = was
        for _, module in [*dense, *masked]:
            del module.forward
        for _, module in languages:
            del module.lang_adapter
        for _, module in split:
            for m in (module.router, module.input_linear, module.output_linear):
                del m.forward
        for _, module in stacked:
            del module.forward
        for router in routers:
            vars(router.classifier).pop("to", None)  # (torch.export may have put the module's attributes back already)


def _one_hot_experts(module: nn.Module) -> bool:
    """SwitchTransformers' experts: a ``ModuleDict`` of ``expert_0``, ``expert_1``, ... whose ``forward`` takes
    the tokens, their one-hot ``selected_experts`` ``[tokens, 1, experts]`` and ``routing_weights`` ``[tokens, 1]``."""
    return isinstance(module, nn.ModuleDict) and "expert_0" in module and "forward" not in vars(module) and \
        _params(type(module).forward)[1:4] == ("hidden_states", "selected_experts", "routing_weights")


def _dense_forward(module: nn.ModuleDict) -> Callable[..., torch.Tensor]:
    """``module``'s forward (see :func:`_one_hot_experts`) over every expert and every token: token ``t`` gets
    ``expert_e(x_t) * routing_weights[t]`` summed over the experts ``e`` it selects, as the loop it replaces adds
    them (an unselected expert's output is multiplied by zero)."""
    count = len(module)

    def forward(hidden_states: torch.Tensor, selected_experts: torch.Tensor,
                routing_weights: torch.Tensor) -> torch.Tensor:
        weights = selected_experts[:, 0, :].to(hidden_states.dtype) * routing_weights  # [tokens, experts]
        out = torch.zeros_like(hidden_states)
        for e in range(count):
            out = out + module[f"expert_{e}"](hidden_states) * weights[:, e, None]
        return out

    return forward


_EXPERT_MASK = "expert_mask = torch.nn.functional.one_hot(router_mask, num_classes=self.num_experts).permute(2, 1, 0)"
"""The statement of NLLB-MoE's experts' ``forward`` that :func:`_masked_experts` recognizes them by."""


def _masked_experts(module: nn.Module) -> bool:
    """NLLB-MoE's experts: a ``ModuleDict`` of ``expert_0``, ``expert_1``, ... (``num_experts`` of them) whose ``forward``
    takes the tokens, a ``router_mask`` and ``router_probs`` (``[tokens, experts]`` each) and loops over the experts
    ``one_hot(router_mask).permute(2, 1, 0)`` marks (the statement :data:`_EXPERT_MASK`): expert ``v`` runs on each
    token ``t`` once per slot ``e`` with ``router_mask[t, e] == v``, weighted by ``router_probs[t, e]``."""
    if not (isinstance(module, nn.ModuleDict) and "expert_0" in module and "forward" not in vars(module)
            and isinstance(getattr(module, "num_experts", None), int)
            and _params(type(module).forward)[1:4] == ("hidden_states", "router_mask", "router_probs")):
        return False
    try:
        return _EXPERT_MASK in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def _dense_masked_forward(module: nn.ModuleDict) -> Callable[..., torch.Tensor]:
    """``module``'s forward (see :func:`_masked_experts`) over every expert and every token: expert ``v``'s output on
    token ``t`` weighted by the sum of ``router_probs[t, e]`` over the slots ``e`` that mark it, as the loop adds one
    product per such slot (an expert no slot marks is multiplied by zero), then scaled as the loop scales it for its
    token dropout, at ``num_experts`` times the experts' work."""
    count = module.num_experts

    def forward(hidden_states: torch.Tensor, router_mask: torch.Tensor, router_probs: torch.Tensor) -> torch.Tensor:
        marks = torch.nn.functional.one_hot(router_mask, num_classes=count).permute(2, 1, 0)  # [experts, slots, tokens]
        weights = (marks.to(router_probs.dtype) * router_probs.T[None]).sum(1)  # [experts, tokens]
        out = torch.zeros_like(hidden_states)
        for v in range(count):
            y = module[f"expert_{v}"](hidden_states) * weights[v, :, None]
            if module.moe_token_dropout > 0:
                y = module.token_dropout(y) if module.training else y * (1 - module.moe_token_dropout)
            out = out + y.to(hidden_states.dtype)
        return out

    return forward


_LANGUAGE_ADAPTER_ATTRS = ("adapter_modules", "ln_before_adapter", "adapter_layer_norm", "adapter_reuse_layer_norm",
                           "LayerNorm", "dropout")


def _language_adapters(module: nn.Module) -> bool:
    """X-MOD's output layer: ``lang_adapter(lang_ids, hidden_states)`` over a ``ModuleDict`` of ``adapter_modules``,
    one per language, with the layer norm and residual settings :func:`_dense_lang_adapter` reads."""
    return all(hasattr(module, a) for a in _LANGUAGE_ADAPTER_ATTRS) and "lang_adapter" not in vars(module) and \
        isinstance(module.adapter_modules, nn.ModuleDict) and \
        _params(getattr(type(module), "lang_adapter", None))[1:3] == ("lang_ids", "hidden_states")


def _dense_lang_adapter(module: nn.Module) -> Callable[..., torch.Tensor]:
    """``module``'s ``lang_adapter`` (see :func:`_language_adapters`) with every language's adapter run on every row:
    row ``i`` keeps the output of adapter ``lang_ids[i]`` (zeros where no adapter has that index, as the masked
    puts leave them), then the dropout and the residual as transformers' method adds them."""

    def lang_adapter(lang_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if not module.ln_before_adapter:
            residual = hidden_states
        if module.adapter_layer_norm is not None:
            hidden_states = module.adapter_layer_norm(hidden_states)
        elif module.adapter_reuse_layer_norm:
            hidden_states = module.LayerNorm(hidden_states)
        if module.ln_before_adapter:
            residual = hidden_states
        rows = lang_ids.reshape(-1, *(1,) * (hidden_states.dim() - 1))
        out = torch.zeros_like(hidden_states)
        for index, key in enumerate(module.adapter_modules.keys()):
            out = torch.where(rows == index, module.adapter_modules[key](hidden_states), out)
        return module.dropout(out) + residual

    return lang_adapter


def _split_experts(module: nn.Module) -> bool:
    """JetMoE's mixture of experts or of attention: a ``router`` (``forward(hidden_states)``, a linear ``layer``
    to its ``num_experts``, ``top_k``) and ``input_linear`` / ``output_linear`` experts (``forward(inputs,
    expert_size)`` over a ``[experts, out, in]`` ``weight``) fed tokens sorted by expert."""
    router = getattr(module, "router", None)
    experts = [getattr(module, n, None) for n in ("input_linear", "output_linear")]
    return isinstance(router, nn.Module) and isinstance(getattr(router, "layer", None), nn.Module) and \
        isinstance(getattr(router, "top_k", None), int) and "forward" not in vars(router) and \
        _params(type(router).forward)[1:] == ("hidden_states",) and all(
            isinstance(e, nn.Module) and "forward" not in vars(e) and _params(type(e).forward)[1:3] == (
                "inputs", "expert_size") and isinstance(getattr(e, "weight", None), torch.Tensor) and e.weight.dim() == 3
            for e in experts)


def _counting_router(router: nn.Module) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``router``'s forward (see :func:`_split_experts`) with the tokens per expert a tensor, not a list: the top
    ``top_k`` experts of each token, their softmax gates, the token positions sorted by expert."""

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = router.layer(hidden_states).float()
        top_logits, top_indices = logits.topk(router.top_k, dim=1)
        top_gates = torch.softmax(top_logits, dim=1).type_as(hidden_states)
        counts = torch.zeros_like(logits, dtype=torch.long).scatter(1, top_indices, 1).sum(0)
        _, sorted_positions = top_indices.flatten().sort(0)
        return (sorted_positions, sorted_positions.div(router.top_k, rounding_mode="trunc"),
                top_gates.flatten()[sorted_positions], counts, logits)

    return forward


def _sorted_dense_forward(experts: nn.Module) -> Callable[..., torch.Tensor]:
    """``experts``' forward (see :func:`_split_experts`) over tokens sorted by expert with ``expert_size`` a tensor of
    counts: every expert on every token, a token keeping the product of the expert whose run it falls in."""

    def forward(inputs: torch.Tensor, expert_size: torch.Tensor) -> torch.Tensor:
        ends = expert_size.cumsum(0)
        owner = (torch.arange(inputs.shape[0], device=inputs.device)[:, None] >= ends[None, :]).sum(1)[:, None]
        out = inputs.new_zeros(inputs.shape[0], experts.weight.shape[1])
        for e in range(experts.weight.shape[0]):
            out = torch.where(owner == e, F.linear(inputs, experts.weight[e]), out)
        return out

    return forward


def _stacked_glu_experts(module: nn.Module) -> bool:
    """DBRX's experts: an ``mlp`` whose ``w1``, ``v1`` and ``w2`` stack every expert's ``[ffn, hidden]`` matrix
    (``[experts * ffn, hidden]``), ``num_experts``, and a ``forward(hidden_states, top_k_index, top_k_weights)`` that
    loops over the experts the batch selects."""
    mlp = getattr(module, "mlp", None)
    return "forward" not in vars(module) and isinstance(getattr(module, "num_experts", None), int) and \
        all(isinstance(getattr(mlp, n, None), torch.Tensor) and getattr(mlp, n).ndim == 2 for n in ("w1", "v1", "w2")) \
        and callable(getattr(mlp, "activation_fn", None)) and \
        _params(type(module).forward)[1:4] == ("hidden_states", "top_k_index", "top_k_weights")


def _gathered_glu_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """``module``'s forward (see :func:`_stacked_glu_experts`) as ``batched_mm`` computes experts: each token repeated
    once per expert it selects, each ``(token, expert)`` pair times its expert's slice of ``w1`` and ``v1`` (one
    product, the two side by side) and, gated, of ``w2``, weighted, and a token's pairs summed. The same products as the loop over experts, which adds a token's
    weighted outputs in expert order (equal for two experts a token; rounding apart for more)."""
    mlp, count = module.mlp, module.num_experts

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        batch, width = hidden_states.shape[0], hidden_states.shape[-1]
        k = top_k_index.shape[-1]
        ids = top_k_index.reshape(-1)
        pairs = hidden_states.reshape(-1, width).repeat_interleave(k, dim=0)
        split = (count, -1, width)
        gate_up = torch.cat([mlp.w1.view(split), mlp.v1.view(split)], dim=1)  # [experts, 2 * ffn, hidden]
        gate, up = torch.matmul(gate_up[ids], pairs.unsqueeze(2)).squeeze(2).chunk(2, dim=-1)
        down = torch.matmul((mlp.activation_fn(gate) * up).unsqueeze(1), mlp.w2.view(split)[ids]).squeeze(1)
        weighted = down * top_k_weights.reshape(-1, 1).to(down.dtype)
        return weighted.view(-1, k, width).sum(dim=1).view(batch, -1, width)

    return forward


def _converting_router(module: nn.Module) -> bool:
    """A SwitchTransformers router (or NLLB-MoE's, through its ``_cast_classifier``): it assigns ``self.classifier =
    self.classifier.to(self.dtype)`` on every call."""
    return isinstance(getattr(module, "classifier", None), nn.Module) and isinstance(getattr(module, "dtype", None),
                                                                                    torch.dtype) \
        and (hasattr(module, "jitter_noise") or callable(getattr(module, "_cast_classifier", None))) \
        and hasattr(module, "expert_capacity")  # classifier: PEFT's LoRA too


def _same(module: nn.Module) -> Callable[..., nn.Module]:
    """A ``to`` for ``module`` that returns it unchanged (its parameters were converted already)."""
    return lambda *args, **kwargs: module


_INDEXER_TOPK = "topk = min(self.index_topk, index_scores.shape[-1])"
"""The statement of DeepSeek-V3.2's indexer (and of the families that copy it) that :func:`traceable_modules`
makes traceable."""


def _top_k_indexer(module: nn.Module) -> bool:
    """A DeepSeek Sparse Attention indexer: an int ``index_topk`` and a ``forward`` that returns the indices of the
    ``min(index_topk, keys)`` best keys of each query (the statement :data:`_INDEXER_TOPK`)."""
    if not isinstance(getattr(module, "index_topk", None), int) or "forward" in vars(module):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return _INDEXER_TOPK in source


def _padded_top_k(module: nn.Module, path: str = "") -> Callable[..., torch.Tensor]:
    """``module``'s forward (see :func:`_top_k_indexer`) returning ``[..., index_topk]`` indices for any number of
    keys: its own order of every key, the first ``index_topk`` of it, the best key repeated past the last key.
    The keys are counted by the last dim of its ``attention_mask`` (``[batch, queries, keys]``)."""
    forward, k = type(module).forward, module.index_topk
    signature = inspect.signature(forward)

    def top_k(*args: Any, **kwargs: Any) -> torch.Tensor:
        mask = signature.bind(module, *args, **kwargs).arguments.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{type(module).__name__}: an indexer without an attention mask to count the keys by")
        module.index_topk = mask.shape[-1]  # min(index_topk, keys) is every key: a sort, of any length
        try:
            order = forward(module, *args, **kwargs)
        finally:
            module.index_topk = k
        best = order[..., :1].expand(*order.shape[:-1], k)
        return torch.cat([order, best], dim=-1)[..., :k]

    return top_k


MODULE_SWAPS: tuple[tuple[Callable[[nn.Module], bool], Callable[[nn.Module, str], Callable[..., Any]]], ...] = (
    (_top_k_indexer, _padded_top_k),
    (is_pooled_indexer, pooled_indexer_forward),
    (is_qsa_indexer, qsa_indexer_forward),
    (is_token_context_embedding, token_context_forward),
    (is_lightning_attention, lightning_forward),
    (is_multi_head_mixer, multi_head_mixer_forward),
    (is_recurrent_block, recurrent_block_forward),
    (lambda module: "forward" not in vars(module) and state_forward(module) is not None,
     lambda module, path: state_forward(module).forward(module)),
    (is_windowed_attention, windowed_attention_forward),
)
"""(which modules, the forward they take instead, made from the module and its path in the model) for
:func:`traceable_modules`: DeepSeek Sparse Attention's indexers, Kolibri 1.1's pooled indexers, Qwen4-Exp's QSA
indexers and n-gram embeddings, MiniMax's lightning attention, Zamba's multi-head
Mamba mixers, RecurrentGemma's recurrent blocks, RWKV and xLSTM causal LMs (one whose forward the cache export has
given it already keeps that one), Longformer's and LED's windowed attention."""

METHOD_SWAPS: tuple[tuple[Callable[[nn.Module], bool], str, Callable[[nn.Module, str], Callable[..., Any]]], ...] = (
    (is_padded_to_windows, "_pad_to_window_size", unpadded_windows),
    (is_detr_encoder_with_sizes, "_prepare_multilevel_features", recorded_sizes),
    (is_detr_decoder_with_rpb, "_get_rpb_matrix", sized_rpb),
)
"""(which modules, the method swapped, the method they take instead) for :func:`traceable_modules`: Longformer's and
LED's padding to whole windows, which the masked form of their attention does not need; SAM 3's DETR decoder reading
its feature sizes back from a tensor (:mod:`~flora_graph.frontend.feature_sizes`)."""


@contextlib.contextmanager
def traceable_modules(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every module of ``model`` that a predicate of :data:`MODULE_SWAPS` picks runs that entry's
    forward, and one that :data:`METHOD_SWAPS` picks that entry's method (see the module's docstring); yields their
    paths. Restored on exit."""
    swapped = []
    for path, module in model.named_modules():
        for picks, forward in MODULE_SWAPS:
            if picks(module):
                module.forward = forward(module, path)  # an instance attribute: deleted on exit
                swapped.append((path, module, "forward"))
                break
        for picks, name, method in METHOD_SWAPS:
            if picks(module):
                setattr(module, name, method(module, path))
                swapped.append((path, module, name))
    try:
        yield list(dict.fromkeys(path for path, _, _ in swapped))
    finally:
        for _, module, name in swapped:
            delattr(module, name)


@contextlib.contextmanager
def broadcast_masks() -> Iterator[bool]:
    """Within the block, transformers' ``sdpa_mask`` (and the ``eager_mask`` over it) builds every mask by
    broadcasting its index ranges through the mask function, never by ``torch.vmap``; yields whether transformers
    is there to patch. Its mask functions compare and index tensors of indices, so both paths give the same mask
    (the captured graph is checked against eager by every export). Restored on exit."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield False
        return
    own = masking_utils.sdpa_mask
    mapping = masking_utils.AttentionMaskInterface._global_mapping

    def sdpa_mask(*args: Any, **kwargs: Any) -> Any:
        return own(*args, **{**kwargs, "use_vmap": False})

    registered = mapping.get("sdpa") is own
    masking_utils.sdpa_mask = sdpa_mask
    if registered:
        mapping["sdpa"] = sdpa_mask
    try:
        yield True
    finally:
        masking_utils.sdpa_mask = own
        if registered:
            mapping["sdpa"] = own


_MERGED_TUNERS = ("peft.tuners.hra.", "peft.tuners.shira.", "peft.tuners.boft.", "peft.tuners.c3a.", "peft.tuners.psoft.",
                  "peft.tuners.paca.", "peft.tuners.waveft.", "peft.tuners.frod.")
"""PEFT tuners whose layers build their adapted weight with ops that torch.export, or the ATen table after it, cannot
take (HRA's and SHiRA's a tensor made in ``forward``, a "fake tensor in the constants"; BOFT's and PSOFT's a
``linalg.solve`` of a Cayley transform; C3A's complex FFT products; PaCA's custom op; WaveFT's bool-mask scatter
beside other indices; FRoD's sparse tensors): :func:`merged_peft_layers` merges them for the capture."""


def _merged_for_capture(module: nn.Module) -> bool:
    """Whether :func:`merged_peft_layers` merges ``module``: a PEFT LoRA ``MultiheadAttention`` or a layer of
    :data:`_MERGED_TUNERS`, not merged already."""
    if getattr(module, "merged", True) is not False or not callable(getattr(module, "merge", None)):
        return False
    if type(module).__name__ == "MultiheadAttention":
        return hasattr(module, "lora_A")
    return type(module).__module__.startswith(_MERGED_TUNERS) and callable(getattr(module, "get_base_layer", None))


@contextlib.contextmanager
def merged_peft_layers(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every PEFT layer of ``model`` that torch.export cannot trace adapted is merged (PEFT's own
    ``merge``): LoRA on ``nn.MultiheadAttention`` and the layers of :data:`_MERGED_TUNERS`; yields their paths. The
    merge writes into copies of their base layers' parameters, which the exported program keeps (its weights are read
    after the block); on exit the original parameters go back, untouched, and PEFT's record of the merge is cleared
    (no ``unmerge``, which would write into the copies)."""
    saved = []
    for path, module in model.named_modules():
        if _merged_for_capture(module):
            params = [(owner, name, p) for owner in module.get_base_layer().modules()
                      for name, p in owner.named_parameters(recurse=False)]
            saved.append((path, module, params))
    try:
        for _, module, params in saved:
            for owner, name, p in params:  # merged into copies, whatever PEFT writes in place
                owner._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            module.merge()
        yield [path for path, _, _ in saved]
    finally:  # no unmerge, which would write into the copies the exported program holds: the originals go back,
        for _, module, params in saved:  # and PEFT's record of the merge is cleared
            for owner, name, p in params:
                owner._parameters.pop(name, None)
                if hasattr(owner, name):  # a plain tensor a merge left in the parameter's place
                    delattr(owner, name)
                owner.register_parameter(name, p)
            for layer in module.modules():  # the layer's and those within it (the attention's adapted out_proj)
                if isinstance(getattr(layer, "merged_adapters", None), list):
                    layer.merged_adapters.clear()


def _params(fn: Any) -> tuple[str, ...]:
    """The parameter names of a function or of the module the ``kernels`` package wraps it in (``()`` if none)."""
    try:
        return tuple(inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters)
    except (TypeError, ValueError):
        return ()


@contextlib.contextmanager
def traceable_scans(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, each modeling module of ``model``'s layers that defines a function of :data:`SWAPS`
    with the expected leading parameters has it swapped for the traceable one; yields ``"module.function"``
    for each swap. Their own functions are put back on exit.

    The swap is of a module-level function, so it holds for every model of those classes while the block
    runs (capture runs ``torch.export`` inside it, nothing else).
    """
    swapped = []
    for mod in _modeling_modules(model):
        for name, (params, fn) in SWAPS.items():
            own = getattr(mod, name, None)
            if own is not None and own is not fn and _params(own)[:len(params)] == params:
                swapped.append((mod, name, own))
                setattr(mod, name, fn)
    try:
        yield [f"{mod.__name__}.{name}" for mod, name, _ in swapped]
    finally:
        for mod, name, own in swapped:
            setattr(mod, name, own)


def _modeling_modules(model: nn.Module) -> list[ModuleType]:
    """The Python modules that define the classes of ``model``'s layers, each once."""
    modules: dict[str, ModuleType] = {}
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is not None:
            modules.setdefault(mod.__name__, mod)
    return list(modules.values())


def _size_len(x: Any) -> Any:
    """``len(x)``, a tensor's first size as torch keeps it (a ``SymInt`` where it is dynamic)."""
    return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else builtins.len(x)


@contextlib.contextmanager
def sized_len(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, ``len`` in each modeling module of ``model``'s layers (torch's own aside) is
    :func:`_size_len`: Python's ``len`` of a tensor turns its dynamic first size into the example's number, which
    fixes RT-DETR's batch (``batch_size = len(source_flatten)``), where its first size keeps the dim. Yields the modules patched; a module's own ``len`` is left alone, and every patch is removed on exit."""
    patched = [mod for mod in _modeling_modules(model)
               if not mod.__name__.startswith("torch.") and "len" not in vars(mod)]
    for mod in patched:
        mod.len = _size_len  # type: ignore[attr-defined]
    try:
        yield [mod.__name__ for mod in patched]
    finally:
        for mod in patched:
            del mod.len
