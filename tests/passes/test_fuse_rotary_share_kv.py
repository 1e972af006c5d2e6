"""fuse-rotary and share-kv-heads on a Hugging Face Llama with a KV cache (grouped-query attention).

The captured decoder (4 query heads on 2 key/value heads, rotary embeddings, a left-padded row,
a past) is optimized with each pass and with the ``fused`` preset: every rotary becomes one
``RotaryEmbedding``, every attention reads the un-widened cache, and the numbers stay the
reference interpreter's and eager transformers' (with its cache). ONNX at opset 23 carries the
rotary as ONNX's ``RotaryEmbedding`` and the attention as one ``Attention`` each, and ONNX Runtime
agrees. Hand-built graphs cover the refusals and every mask rank.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

from flora_graph.frontend.causal_lm import cache_layout, capture_causal_lm, example_inputs, past_names
from flora_graph.ir import Graph, Op, verify
from flora_graph.passes import optimize
from flora_graph.passes.fuse_kv_attention import fuse_kv_attention
from flora_graph.passes.fuse_rotary import fuse_rotary
from flora_graph.passes.share_kv_heads import share_kv_heads
from flora_graph.passes.simplify import simplify
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.reference import run

LAYERS = 2


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, capture_causal_lm(model)


def _feeds(model, batch: int, seq: int, past: int, seed: int) -> dict[str, np.ndarray]:
    x = example_inputs(cache_layout(model), 100, batch, seq, past, seed=seed, left_pad=2)
    feed = {k: v.numpy() for k, v in x.items() if k != "past_key_values"}
    feed.update({n: t.numpy() for n, t in zip(past_names(LAYERS), x["past_key_values"], strict=True)})
    return feed


def _ops(g: Graph) -> collections.Counter:
    return collections.Counter(n.op for n in g.nodes)


def _same(a: Graph, b: Graph, model, tol: float = 1e-5) -> None:
    for k, (batch, seq, past) in enumerate(((1, 1, 5), (3, 4, 0), (2, 1, 6))):
        x = _feeds(model, batch, seq, past, k)
        want, got = run(a, x), run(b, x)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=tol, rtol=tol, err_msg=f"{name} at {batch, seq, past}")


def test_rotary_embeddings_become_one_node_each(llama) -> None:
    model, g = llama
    res = fuse_rotary(g.copy())
    after = verify(res.graph)
    assert res.stats["fired"] == {"fuse-rotary": 2 * LAYERS} and res.stats["refused"] == {}
    assert _ops(after)[Op.ROTARY_EMBEDDING] == 2 * LAYERS and Op.NEG not in _ops(after)
    _same(g, after, model)


def test_attention_reads_the_cache_without_widening_it(llama) -> None:
    model, g = llama
    res = share_kv_heads(g.copy())
    after = verify(res.graph)
    assert res.stats["fired"] == {"share-kv-heads": LAYERS} and res.stats["refused"] == {}
    for att in (n for n in after.nodes if n.op is Op.SDPA):
        q, k, v = att.inputs[:3]
        assert att.attrs["enable_gqa"] == 1 and q.shape[1] == 4 and k.shape[1] == 2 and v.shape[1] == 2
        assert k.op is Op.CONCAT and v.op is Op.CONCAT  # the cache itself (past + new), not an Expand of it
    assert Op.EXPAND not in _ops(after) or all(n.shape[-1] != 8 for n in after.nodes if n.op is Op.EXPAND)
    _same(g, after, model)


def test_fused_preset_matches_eager_with_cache_and_onnx_opset_23(llama) -> None:
    model, g = llama
    fused = optimize(g, "fused")
    c = _ops(fused)
    assert c[Op.ROTARY_EMBEDDING] == 2 * LAYERS and c[Op.KV_ATTENTION] == 3 * LAYERS and c[Op.SDPA] == 0
    _same(g, fused, model)
    x = _feeds(model, 2, 3, 4, 7)
    with torch.no_grad():
        past = transformers.DynamicCache()
        for i in range(LAYERS):
            past.update(torch.from_numpy(x[f"past_key_values.{i}.key"]), torch.from_numpy(x[f"past_key_values.{i}.value"]), i)
        eager = model(input_ids=torch.from_numpy(x["input_ids"]), attention_mask=torch.from_numpy(x["attention_mask"]),
                      position_ids=torch.from_numpy(x["position_ids"]), past_key_values=past, use_cache=True)
    valid = x["attention_mask"][:, -3:].astype(bool)  # the left-padded row's pad queries are not compared
    got = run(fused, x)
    np.testing.assert_allclose(got["logits"][valid], eager.logits.numpy()[valid], atol=1e-4, rtol=1e-4)
    model_proto = to_onnx(fused, 23)
    assert sum(n.op_type == "RotaryEmbedding" and n.domain == "" for n in model_proto.graph.node) == 2 * LAYERS
    assert sum(n.op_type == "Attention" and n.domain == "" for n in model_proto.graph.node) == LAYERS
    assert not {"Transpose", "Softmax"} & {n.op_type for n in model_proto.graph.node}
    assert model_proto.opset_import[0].version == 23
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for name, value in zip(names, sess.run(None, {i.name: x[i.name] for i in sess.get_inputs()}), strict=True):
        np.testing.assert_allclose(value, got[name], atol=1e-5, rtol=1e-5, err_msg=name)
    onnx.checker.check_model(model_proto)


def test_each_layer_attention_on_its_cache_becomes_one_kv_attention(llama) -> None:
    model, g = llama
    before = share_kv_heads(fuse_rotary(simplify(g.copy()).graph).graph).graph  # as the presets run them
    res = fuse_kv_attention(before.copy())
    after = verify(res.graph)
    assert res.stats["fired"] == {"fuse-kv-attention": LAYERS} and res.stats["refused"] == {}
    c = _ops(after)
    assert c[Op.KV_ATTENTION] == 3 * LAYERS and c[Op.SDPA] == 0 and c[Op.TRANSPOSE] == 0
    for i in range(LAYERS):  # the caches are the fused node's results, not a Concat
        for kind, output in (("key", 1), ("value", 2)):
            node = after.outputs[f"present.{i}.{kind}"]
            assert node.op is Op.KV_ATTENTION and node.attrs["output"] == output
    _same(g, after, model)


def _cache_attention(*, mask_dtype: str = "bool", extra_reader: bool = False, causal: int = 0) -> Graph:
    """A GPT-2-like attention (2 heads of 4, no rotary) on a cache, hand-built; options break it."""
    g = Graph("cache")
    x = {n: g.input(n, ("batch", "seq", 8)) for n in ("q", "k", "v")}
    past = {n: g.input(f"past_{n}", ("batch", 2, "past", 4)) for n in ("k", "v")}

    def heads(t):
        return g.add(Op.TRANSPOSE, [g.add(Op.RESHAPE, [t], {"shape": (0, 0, 2, 4)})], {"perm": (0, 2, 1, 3)})

    ck = g.add(Op.CONCAT, [past["k"], heads(x["k"])], {"axis": 2})
    cv = g.add(Op.CONCAT, [past["v"], heads(x["v"])], {"axis": 2})
    ins = [heads(x["q"]), ck, cv]
    if not causal:
        ins.append(g.input("mask", ("batch", 1, "seq", "past+seq"), mask_dtype))
    att = g.add(Op.SDPA, ins, {"is_causal": causal}, name="att")
    out = g.add(Op.RESHAPE, [g.add(Op.TRANSPOSE, [att], {"perm": (0, 2, 1, 3)})], {"shape": (0, 0, -1)}, name="y")
    g.set_output("y", out)
    g.set_output("present_k", ck)
    g.set_output("present_v", cv)
    if extra_reader:
        g.set_output("scores", g.add(Op.MUL, [att, g.const("two", np.float32(2))]))
    return verify(g)


def _cache_feeds(mask_dtype: str = "bool") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    x = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n in ("q", "k", "v")}
    x.update({f"past_{n}": rng.standard_normal((2, 2, 5, 4)).astype(np.float32) for n in ("k", "v")})
    keep = np.tril(np.ones((3, 8), bool), k=5)[None, None].repeat(2, 0)
    keep[1, :, :, :2] = False  # a left-padded row
    x["mask"] = keep if mask_dtype == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
    return x


def test_a_cache_attention_without_rotary_fuses_and_onnx_agrees() -> None:
    g = _cache_attention()
    res = fuse_kv_attention(g.copy())
    assert res.stats["fired"] == {"fuse-kv-attention": 1}
    x = _cache_feeds()
    want = run(g, x)
    got = run(res.graph, x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
    for opset in (18, 23):
        sess = ort.InferenceSession(to_onnx(res.graph, opset).SerializeToString(), providers=["CPUExecutionProvider"])
        for o, value in zip(sess.get_outputs(), sess.run(None, x), strict=True):
            np.testing.assert_allclose(value, want[o.name], atol=1e-5, rtol=1e-5, err_msg=f"{o.name} at opset {opset}")


@pytest.mark.parametrize(("options", "why"), [
    ({"mask_dtype": "float32"}, "not a boolean mask"),
    ({"extra_reader": True}, "is also read by"),
    ({"causal": 1}, "a causal attention"),
])
def test_a_cache_attention_that_does_not_fit_is_refused(options, why) -> None:
    res = fuse_kv_attention(_cache_attention(**options))
    assert not res.changed and why in res.stats["refused"]["y"], res.stats


def _rotary_graph(*, cos_from_input: bool = False, halves=(4, 4)) -> Graph:
    """``x * cos + rotate_half(x) * sin`` over ``x [batch, 2, seq, 8]``; options break the proof or the halves."""
    g = Graph("rot")
    x = g.input("x", ("batch", 2, "seq", 8))
    f = g.input("f", ("batch", "seq", 4))
    if cos_from_input:
        cos4 = g.add(Op.UNSQUEEZE, [g.input("cos", ("batch", "seq", 8))], {"axes": (1,)})
    else:
        cos4 = g.add(Op.UNSQUEEZE, [g.add(Op.COS, [g.add(Op.CONCAT, [f, f], {"axis": -1})])], {"axes": (1,)})
    sin4 = g.add(Op.UNSQUEEZE, [g.add(Op.SIN, [g.add(Op.CONCAT, [f, f], {"axis": -1})])], {"axes": (1,)})
    lo = g.add(Op.SLICE, [x], {"axes": (3,), "starts": (0,), "ends": (halves[0],), "steps": (1,)})
    hi = g.add(Op.SLICE, [x], {"axes": (3,), "starts": (halves[1],), "ends": (8,), "steps": (1,)})
    rot = g.add(Op.CONCAT, [g.add(Op.NEG, [hi]), lo], {"axis": -1}) if halves == (4, 4) else None
    if rot is None:  # uneven halves: the same node shapes cannot concatenate to 8, so slice 3:8 and 0:3
        rot = g.add(Op.CONCAT, [g.add(Op.NEG, [hi]), lo], {"axis": -1})
    out = g.add(Op.ADD, [g.add(Op.MUL, [x, cos4]), g.add(Op.MUL, [rot, sin4])], name="out")
    g.set_output("y", out)
    return verify(g)


def test_rotary_forms_fuse_and_refusals_are_recorded() -> None:
    ok = fuse_rotary(_rotary_graph())
    assert ok.stats["fired"] == {"fuse-rotary": 1}
    rng = np.random.default_rng(0)
    x = {"x": rng.standard_normal((2, 2, 5, 8)).astype(np.float32), "f": rng.standard_normal((2, 5, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(ok.graph, x)["y"], run(_rotary_graph(), x)["y"], atol=1e-6)
    bad = fuse_rotary(_rotary_graph(cos_from_input=True))
    assert not bad.changed and "not provably two equal halves" in bad.stats["refused"]["out"]
    uneven = fuse_rotary(_rotary_graph(halves=(3, 3)))
    assert not uneven.changed and "are not the halves" in uneven.stats["refused"]["out"]


@pytest.mark.parametrize("mask_shape", [None, ("batch", 1, "seq", "kv"), (1, "seq", "kv"), ("seq", "kv"),
                                        ("batch", 4, "seq", "kv"), (4, "seq", "kv")])
def test_grouped_attention_equals_the_widened_one_for_every_mask_rank(mask_shape) -> None:
    g = Graph("gqa")
    q = g.input("q", ("batch", 4, "seq", 8))
    k, v = g.input("k", ("batch", 2, "kv", 8)), g.input("v", ("batch", 2, "kv", 6))
    inputs = [q]
    for t, d in ((k, 8), (v, 6)):
        u = g.add(Op.UNSQUEEZE, [t], {"axes": (2,)})
        e = g.add(Op.EXPAND, [u], {"shape": ("batch", 2, 2, "kv", d)})
        inputs.append(g.add(Op.RESHAPE, [e], {"shape": ("batch", 4, "kv", d)}))
    if mask_shape is not None:
        inputs.append(g.input("m", mask_shape, "bool"))
    g.set_output("y", g.add(Op.SDPA, inputs, name="att"))
    verify(g)
    res = share_kv_heads(g.copy())
    assert res.stats["fired"] == {"share-kv-heads": 1}, res.stats
    rng = np.random.default_rng(1)
    x = {"q": rng.standard_normal((3, 4, 5, 8)), "k": rng.standard_normal((3, 2, 7, 8)), "v": rng.standard_normal((3, 2, 7, 6))}
    x = {n: a.astype(np.float32) for n, a in x.items()}
    if mask_shape is not None:
        sizes = {"batch": 3, "seq": 5, "kv": 7}
        x["m"] = rng.random([sizes.get(d, d) for d in mask_shape]) < 0.7
    want = run(g, x)["y"]
    np.testing.assert_allclose(run(res.graph, x)["y"], want, atol=1e-6)
    for opset in (18, 23):  # grouped (or widened, for a mask per head) in the decomposition; one Attention at 23
        proto = to_onnx(res.graph, opset)
        (got,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"opset {opset}")
