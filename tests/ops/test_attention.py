"""The attention family (:mod:`flora_graph.ops.attention`): ``ScaledDotProductAttention``, ``RotaryEmbedding``,
``KVCacheAttention``, ``GatedDeltaRule`` (against transformers' token-by-token gated delta rule).

Numpy reference against ``F.scaled_dot_product_attention`` (in float64) and Hugging Face's
``apply_rotary_pos_emb`` (``rotate_half``), then every backend against the reference; see
:mod:`tests.ops.harness`. Grouped-query attention (``enable_gqa``, what the ``share-kv-heads``
pass writes) against torch's ``enable_gqa``, with masks with and without a head axis; attention
broadcasting ``[b, kv, 1, T, d]`` keys over ``[b, kv, g, s, d]`` queries too. At opset 23 every
case runs through ONNX Runtime again, rank-4 attention as one ONNX ``Attention`` node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from flora_graph.ir import Op
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.reference import run

from .harness import SIZES, Case, In, assert_close, build, case_id, family_tests, feeds, op

QKV = {"q": In(("batch", 2, "seq", 4)), "k": In(("batch", 2, "kv", 4)), "v": In(("batch", 2, "kv", 5))}
SELF = {"q": In(("batch", 2, "seq", 4)), "k": In(("batch", 2, "seq", 4)), "v": In(("batch", 2, "seq", 5))}


def _sdpa_ref(**kw: Any) -> Callable[..., torch.Tensor]:
    return lambda q, k, v, *m: F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=m[0].double() if m and m[0].is_floating_point() else (m[0] if m else None), **kw
    ).float()

def _rotary_ref(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Hugging Face Llama: ``x * cos + rotate_half(x) * sin`` with ``cos = cat(c, c)``."""
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = torch.cat([c, c], -1).double(), torch.cat([s, s], -1).double()
    return (x.double() * cos + rotate_half(x.double()) * sin).float()


def _softcap_ref(cap: float, scale: float | None = None, group: int = 1) -> Callable[..., torch.Tensor]:
    """Gemma 2's eager attention in float64: ``softmax(cap * tanh(q @ k^T * scale / cap) + mask) @ v``, the key/value
    heads repeated ``group`` times."""
    def ref(q, k, v, *m):
        q, k, v = q.double(), k.double().repeat_interleave(group, -3), v.double().repeat_interleave(group, -3)
        s = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        s = torch.tanh(s / cap) * cap
        if m:
            s = s.masked_fill(~m[0], float("-inf")) if m[0].dtype == torch.bool else s + m[0].double()
        return (torch.softmax(s, -1).nan_to_num(0.0) @ v).float()  # a row with nothing kept is 0, as torch's SDPA

    return ref


def _kv_softcap_ref(cap: float) -> Callable[..., torch.Tensor]:
    def ref(q, k, v, pk, pv, *m):
        ck = torch.cat([pk, k.unflatten(-1, (2, 4)).transpose(1, 2)], 2)
        cv = torch.cat([pv, v.unflatten(-1, (2, 3)).transpose(1, 2)], 2)
        y = _softcap_ref(cap, group=2)(q.unflatten(-1, (4, 4)).transpose(1, 2), ck, cv, *m)
        return y.transpose(1, 2).flatten(-2)

    return ref


def _sinks_ref(group: int = 1) -> Callable[..., torch.Tensor]:
    """gpt-oss's eager attention in float64: the scores and each head's sink concatenated, softmax, the sink's
    column dropped (``q`` ``[b, H, L, d]``, key/value heads repeated ``group`` times, a bool mask)."""
    def ref(q, k, v, m, sinks):
        q, k, v = q.double(), k.double().repeat_interleave(group, -3), v.double().repeat_interleave(group, -3)
        s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~m, torch.finfo(torch.float64).min)
        column = sinks.double().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        logits = torch.cat([s, column], dim=-1)
        probs = torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)
        return (probs[..., :-1] @ v).float()

    return ref


def _kv_sinks_ref(q, k, v, pk, pv, m, sinks):
    ck = torch.cat([pk, k.unflatten(-1, (2, 4)).transpose(1, 2)], 2)
    cv = torch.cat([pv, v.unflatten(-1, (2, 3)).transpose(1, 2)], 2)
    y = _sinks_ref(group=2)(q.unflatten(-1, (4, 4)).transpose(1, 2), ck, cv, m, sinks)
    return y.transpose(1, 2).flatten(-2)


GQA = {"q": In(("batch", 4, "seq", 4)), "k": In(("batch", 2, "kv", 4)), "v": In(("batch", 2, "kv", 5))}
ROTARY = {"x": In(("batch", 3, "seq", 8)), "c": In(("batch", 1, "seq", 4)), "s": In(("batch", 1, "seq", 4))}
PACKED = {"x": In(("batch", "seq", 24)), "c": In(("batch", "seq", 4)), "s": In(("batch", "seq", 4))}


def _packed_rotary_ref(x, c, s):
    """Three heads of 8 side by side in the last dim, each rotated like :func:`_rotary_ref`."""
    heads = x.unflatten(-1, (3, 8)).transpose(1, 2)
    return _rotary_ref(heads, c.unsqueeze(1), s.unsqueeze(1)).transpose(1, 2).flatten(-2)


# KVCacheAttention: 4 query heads of 4 over 2 key/value heads (values of 3), a past of "kv" steps
KV = {"q": In(("batch", "seq", 16)), "k": In(("batch", "seq", 8)), "v": In(("batch", "seq", 6)),
      "pk": In(("batch", 2, "kv", 4)), "pv": In(("batch", 2, "kv", 3))}


def _kv_ref(output: int, **kw: Any) -> Callable[..., torch.Tensor]:
    def ref(q, k, v, pk, pv, *m):
        ck = torch.cat([pk, k.unflatten(-1, (2, 4)).transpose(1, 2)], 2).double()
        cv = torch.cat([pv, v.unflatten(-1, (2, 3)).transpose(1, 2)], 2).double()
        if output:
            return (ck if output == 1 else cv).float()
        y = F.scaled_dot_product_attention(q.unflatten(-1, (4, 4)).transpose(1, 2).double(), ck, cv,
                                           attn_mask=m[0] if m else None, enable_gqa=True, **kw)
        return y.transpose(1, 2).flatten(-2).float()

    return ref


def _kv(*names: str, output: int = 0, **attrs: Any):
    return op(Op.KV_ATTENTION, *names, q_heads=4, kv_heads=2, output=output, **attrs)


def _grouped_ref(q, k, v, m):
    """Attention of 4 query heads on 2 key/value heads repeated (repeat_kv), then regrouped."""
    b, s = q.shape[0], q.shape[3]
    wide = [t.expand(-1, -1, 2, -1, -1).reshape(t.shape[0], 4, t.shape[3], t.shape[4]) for t in (k, v)]
    out = F.scaled_dot_product_attention(q.reshape(b, 4, s, 4).double(), wide[0].double(), wide[1].double(),
                                         attn_mask=m[:, 0])
    return out.float().reshape(b, 2, 2, s, 5)


DELTA = {"q": In(("batch", 2, "seq", 4)), "k": In(("batch", 2, "seq", 4)), "v": In(("batch", 2, "seq", 3)),
         "g": In(("batch", 2, "seq")), "beta": In(("batch", 2, "seq"), kind="positive"), "h0": In(("batch", 2, 4, 3))}


def _delta_ref(q, k, v, g, beta, h0):
    """transformers' token-by-token gated delta rule (Qwen3.5's), its l2 norm off and its 1/sqrt(dk) on q undone;
    its outputs and final state concatenated along axis 2."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    def t(x):
        return x.transpose(1, 2).contiguous()

    out, state = torch_recurrent_gated_delta_rule(t(q * q.shape[-1] ** 0.5), t(k), t(v), t(g), t(beta),
                                                  initial_state=h0, output_final_state=True)
    return torch.cat([t(out), state], 2)


def _kimi_ref(q, k, v, g, beta, h0):
    """transformers' token-by-token Kimi delta attention (a decay per key channel), as :func:`_delta_ref`."""
    from transformers.models.kimi_linear.modeling_kimi_linear import recurrent_kimi_delta_attention

    def t(x):
        return x.transpose(1, 2).contiguous()

    out, state = recurrent_kimi_delta_attention(t(q * q.shape[-1] ** 0.5), t(k), t(v), t(g), t(beta), h0, True)
    return torch.cat([t(out), state], 2)


def _delta_apart(g, x, rng):
    """The outputs and the final state read apart, as a captured layer reads them."""
    both = g.add(Op.GATED_DELTA_RULE, [x[n] for n in DELTA])
    return {"out": g.add(Op.SLICE, [both], {"axes": (2,), "starts": (0,), "ends": ("seq",)}),
            "state": g.add(Op.SLICE, [both], {"axes": (2,), "starts": ("seq",), "ends": (2**62,)})}


def _delta_op(q, k, v, g, beta, h0):
    """The custom op a Qwen3.5 layer calls while capturing (``flora_graph.frontend.delta_rule``)."""
    from flora_graph.frontend.delta_rule import delta_rule

    return delta_rule(q, k, v, g, beta, h0)


CASES = [
    Case("sdpa_plain", QKV, op(Op.SDPA, "q", "k", "v"), _sdpa_ref()),
    Case("sdpa_scale", QKV, op(Op.SDPA, "q", "k", "v", scale=0.3), _sdpa_ref(scale=0.3)),
    Case("sdpa_causal", SELF, op(Op.SDPA, "q", "k", "v", is_causal=1), _sdpa_ref(is_causal=True)),
    Case("sdpa_causal_cross_lengths", QKV, op(Op.SDPA, "q", "k", "v", is_causal=1), _sdpa_ref(is_causal=True)),
    Case("sdpa_bool_mask", {**QKV, "m": In(("batch", 1, "seq", "kv"), "bool", "bool")}, op(Op.SDPA, "q", "k", "v", "m"),
         _sdpa_ref()),
    Case("sdpa_float_mask", {**QKV, "m": In(("seq", "kv"))}, op(Op.SDPA, "q", "k", "v", "m"), _sdpa_ref()),
    Case("sdpa_3d", {"q": In(("batch", "seq", 4)), "k": In(("batch", "kv", 4)), "v": In(("batch", "kv", 4))},
         op(Op.SDPA, "q", "k", "v"), _sdpa_ref()),
    Case("sdpa_grouped_heads_broadcast",
         {"q": In(("batch", 2, 2, "seq", 4)), "k": In(("batch", 2, 1, "kv", 4)), "v": In(("batch", 2, 1, "kv", 5)),
          "m": In(("batch", 1, 1, "seq", "kv"), "bool", "bool")},
         op(Op.SDPA, "q", "k", "v", "m"), _grouped_ref),
    Case("sdpa_gqa", GQA, op(Op.SDPA, "q", "k", "v", enable_gqa=1), _sdpa_ref(enable_gqa=True)),
    Case("sdpa_gqa_bool_mask", {**GQA, "m": In(("batch", 1, "seq", "kv"), "bool", "bool")},
         op(Op.SDPA, "q", "k", "v", "m", enable_gqa=1), _sdpa_ref(enable_gqa=True)),
    Case("sdpa_gqa_mask_per_head", {**GQA, "m": In(("batch", 4, "seq", "kv"), "bool", "bool")},
         op(Op.SDPA, "q", "k", "v", "m", enable_gqa=1), _sdpa_ref(enable_gqa=True)),
    Case("sdpa_gqa_2d_mask", {**GQA, "m": In(("seq", "kv"), "bool", "bool")},
         op(Op.SDPA, "q", "k", "v", "m", enable_gqa=1), _sdpa_ref(enable_gqa=True)),
    Case("sdpa_gqa_causal", {**GQA, "k": In(("batch", 2, "seq", 4)), "v": In(("batch", 2, "seq", 5))},
         op(Op.SDPA, "q", "k", "v", is_causal=1, enable_gqa=1), _sdpa_ref(is_causal=True, enable_gqa=True)),
    Case("sdpa_gqa_3d", {"q": In((4, "seq", 4)), "k": In((2, "kv", 4)), "v": In((2, "kv", 5))},
         op(Op.SDPA, "q", "k", "v", enable_gqa=1), _sdpa_ref(enable_gqa=True)),
    # soft-capped scores (Gemma 2): cap * tanh(scores / cap), before the mask
    Case("sdpa_softcap", QKV, op(Op.SDPA, "q", "k", "v", softcap=0.5), _softcap_ref(0.5)),
    Case("sdpa_softcap_gqa_bool_mask_scale", {**GQA, "m": In(("batch", 1, "seq", "kv"), "bool", "bool")},
         op(Op.SDPA, "q", "k", "v", "m", enable_gqa=1, softcap=0.7, scale=0.3), _softcap_ref(0.7, 0.3, group=2)),
    Case("sdpa_softcap_float_mask", {**QKV, "m": In(("seq", "kv"))}, op(Op.SDPA, "q", "k", "v", "m", softcap=0.5),
         _softcap_ref(0.5)),
    # sinks (gpt-oss): one logit per query head joining each row's softmax, reading no value
    Case("sdpa_sinks_gqa_bool_mask", {**GQA, "m": In(("batch", 1, "seq", "kv"), "bool", "bool"), "sk": In((4,))},
         op(Op.SDPA, "q", "k", "v", "m", "sk", enable_gqa=1), _sinks_ref(group=2)),
    Case("sdpa_sinks_bool_mask", {**QKV, "m": In(("batch", 2, "seq", "kv"), "bool", "bool"), "sk": In((2,))},
         op(Op.SDPA, "q", "k", "v", "m", "sk"), _sinks_ref()),
    # ------------------------------------------------------------------ RotaryEmbedding
    Case("rotary", ROTARY, op(Op.ROTARY_EMBEDDING, "x", "c", "s"), _rotary_ref),
    Case("rotary_packed_heads", PACKED, op(Op.ROTARY_EMBEDDING, "x", "c", "s", num_heads=3), _packed_rotary_ref),
    # ------------------------------------------------------------------ KVCacheAttention
    Case("kv_attention", KV, _kv("q", "k", "v", "pk", "pv"), _kv_ref(0)),
    Case("kv_attention_key_cache", KV, _kv("q", "k", "v", "pk", "pv", output=1), _kv_ref(1)),
    Case("kv_attention_value_cache", KV, _kv("q", "k", "v", "pk", "pv", output=2), _kv_ref(2)),
    Case("kv_attention_mask_scale", {**KV, "m": In(("batch", 1, "seq", "kv+seq"), "bool", "bool")},
         _kv("q", "k", "v", "pk", "pv", "m", scale=0.3), _kv_ref(0, scale=0.3)),
    Case("kv_attention_mask_per_head", {**KV, "m": In(("batch", 4, "seq", "kv+seq"), "bool", "bool")},
         _kv("q", "k", "v", "pk", "pv", "m"), _kv_ref(0)),
    Case("kv_attention_2d_mask", {**KV, "m": In(("seq", "kv+seq"), "bool", "bool")},
         _kv("q", "k", "v", "pk", "pv", "m"), _kv_ref(0)),
    Case("kv_attention_softcap", {**KV, "m": In(("batch", 1, "seq", "kv+seq"), "bool", "bool")},
         _kv("q", "k", "v", "pk", "pv", "m", softcap=0.6), _kv_softcap_ref(0.6)),
    Case("kv_attention_sinks", {**KV, "m": In(("batch", 1, "seq", "kv+seq"), "bool", "bool"), "sk": In((4,))},
         _kv("q", "k", "v", "pk", "pv", "m", "sk"), _kv_sinks_ref),
    Case("rotary_shared_positions", {**ROTARY, "c": In(("seq", 4)), "s": In(("seq", 4))},
         op(Op.ROTARY_EMBEDDING, "x", "c", "s"), _rotary_ref),
    Case("gated_delta_rule", DELTA, op(Op.GATED_DELTA_RULE, "q", "k", "v", "g", "beta", "h0"), _delta_ref, tol=1e-4),
    Case("gated_delta_rule_per_key_channel", {**DELTA, "g": In(("batch", 2, "seq", 4))},
         op(Op.GATED_DELTA_RULE, "q", "k", "v", "g", "beta", "h0"), _kimi_ref, tol=1e-4),
    Case("gated_delta_rule_captured", DELTA, _delta_apart, _delta_op, tol=1e-4, capture=("flora_graph::delta_rule.default",)),
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)


def _one_attention_node(case: Case) -> bool:
    """Whether opset 23 writes the case as one ONNX ``Attention``: rank 4, no float mask."""
    q = case.inputs["q"]
    mask = case.inputs.get("m")
    return len(q.shape) == 4 and (mask is None or mask.dtype == "bool")


@pytest.mark.parametrize("case", [c for c in CASES if c.id.startswith(("sdpa", "kv_", "rotary"))], ids=case_id)
def test_opset_23_matches_reference(case: Case) -> None:
    """ONNX ``Attention`` / ``RotaryEmbedding`` (opset 23) where they fit, the decomposition elsewhere, against numpy."""
    g = build(case)
    proto = to_onnx(g, 23)
    ops = [n.op_type for n in proto.graph.node]
    if case.id.startswith("rotary"):  # cos/sin per position only ([seq, d/2]): the halves spelled out
        fits = case.id != "rotary_shared_positions"
        assert (ops.count("RotaryEmbedding") == 1) == fits and ("Split" in ops) != fits, ops
    elif "sinks" in case.id:  # ONNX Attention takes no sinks: spelled out, the sinks' column concatenated
        assert "Attention" not in ops and "Softmax" in ops and "Slice" in ops, ops
    elif case.id.startswith("kv_"):
        assert ops.count("Attention") == 1 and "Softmax" not in ops and "Concat" not in ops, ops
    elif _one_attention_node(case):
        assert ops.count("Attention") == 1 and "Softmax" not in ops and "Expand" not in ops, ops
    else:
        assert "Attention" not in ops and "Softmax" in ops, ops
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for k, sizes in enumerate(SIZES):
        x = feeds(case, sizes, k)
        (got,) = sess.run(None, x)
        assert_close(got, run(g, x)["out"], case.tol, f"{case.id} at opset 23 at {sizes}")


def test_the_three_results_of_one_kv_attention_are_one_onnx_node() -> None:
    """The attention and both caches of the same inputs: one ``Attention`` at opset 23, one
    spelled-out computation before it, and each result equal to the reference."""
    from flora_graph.ir import Graph, verify

    g = Graph("kv3")
    ins = {n: g.input(n, spec.shape, spec.dtype) for n, spec in KV.items()}
    for i, name in enumerate(("y", "present_k", "present_v")):
        g.set_output(name, g.add(Op.KV_ATTENTION, list(ins.values()), {"q_heads": 4, "kv_heads": 2, "output": i}))
    verify(g)
    x = feeds(Case("kv3", KV, None, None), SIZES[1], 3)
    want = run(g, x)
    for opset, count in ((23, {"Attention": 1}), (18, {"Softmax": 1, "Concat": 2})):
        proto = to_onnx(g, opset)
        ops = [n.op_type for n in proto.graph.node]
        assert all(ops.count(o) == c for o, c in count.items()), (opset, ops)
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
        for name, value in zip(("y", "present_k", "present_v"), got, strict=True):
            assert_close(value, want[name], 1e-5, f"{name} at opset {opset}")


def test_grouped_attention_with_a_row_that_keeps_nothing_is_zero_there() -> None:
    """A left-padded row's pad queries keep no key: ONNX ``Attention`` gives 0 there, as torch."""
    case = next(c for c in CASES if c.id == "sdpa_gqa_bool_mask")
    g = build(case)
    x = feeds(case, {"batch": 2, "seq": 3, "kv": 3}, 0)
    x["m"] = np.broadcast_to(np.tril(np.ones((3, 3), bool)), (2, 1, 3, 3)).copy()
    x["m"][1, :, :, :2] = False  # row 1: two pad positions, queries 0 and 1 keep nothing
    want = run(g, x)["out"]
    assert np.all(want[1, :, :2] == 0) and np.all(np.abs(want[1, :, 2]) > 0)
    for opset in (18, 23):
        (got,) = ort.InferenceSession(to_onnx(g, opset).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
        assert_close(got, want, case.tol, f"opset {opset}")


@pytest.mark.parametrize(("change", "why"), [
    ({"attrs": {"q_heads": 3, "kv_heads": 2}}, "kv_heads 2 must divide q_heads 3"),
    ({"pk": (1, 2, "kv", 4)}, "need one batch dim"),
    ({"pv": ("batch", 2, "kv", 5)}, "past_v"),
    ({"v": ("batch", "seq", 7)}, "static multiples of their head counts"),
])
def test_a_kv_attention_that_does_not_fit_is_refused_by_name(change, why) -> None:
    from flora_graph.errors import ShapeError
    from flora_graph.ir import Graph

    g = Graph("bad")
    ins = [g.input(n, change.get(n, spec.shape)) for n, spec in KV.items()]
    attrs = {"q_heads": 4, "kv_heads": 2, **change.get("attrs", {})}
    with pytest.raises(ShapeError, match=why) as info:
        g.add(Op.KV_ATTENTION, ins, attrs, name="att")
    assert "'att'" in str(info.value)


@pytest.mark.parametrize("case_name", ["gated_delta_rule", "gated_delta_rule_per_key_channel"])
def test_gated_delta_rule_runs_as_onnx_runtime_s_linear_attention_with_contrib_ops(case_name: str) -> None:
    """With contrib ops the rule is one ``com.microsoft.LinearAttention`` (no ``Scan``); both forms equal the numpy
    reference at every size, a decaying ``g`` (per head, or per key channel) and ``beta`` in (0, 3)."""
    case = next(c for c in CASES if c.id == case_name)
    g = build(case)
    for contrib, op_type in ((False, "Scan"), (True, "LinearAttention")):
        model = to_onnx(g, contrib=contrib)
        assert op_type in [n.op_type for n in model.graph.node]
        assert ("LinearAttention" in [n.op_type for n in model.graph.node]) == contrib
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        for k, sizes in enumerate(SIZES):
            x = feeds(case, sizes, k)
            x["g"] = -np.abs(x["g"])
            got = sess.run(None, x)[0]
            assert_close(got, run(g, x)["out"], case.tol, f"contrib={contrib} at {sizes}")
