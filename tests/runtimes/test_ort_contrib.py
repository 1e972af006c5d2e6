"""ONNX Runtime contrib lowering (``to_onnx(..., contrib=True)``): residual ``Add`` + ``RMSNormalization``
becomes ``SkipSimplifiedLayerNormalization``; values equal the standard lowering's and the numpy
reference's, and what the kernel cannot take stays standard."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import run
from flora_graph.runtimes.onnx_lowering import to_onnx
from flora_graph.runtimes.ort_contrib import CONTRIB_DOMAIN

RNG = np.random.default_rng(0)
H = 8


def _linear(g: Graph, x, name: str):
    return g.add(Op.LINEAR, [x, g.const(f"{name}.weight", RNG.standard_normal((H, H)).astype(np.float32) / 3)], name=name)


def _decoder(broadcast_add: bool = False) -> Graph:
    """Two pre-norm residual blocks (as a decoder's layers), the residual stream also an output;
    ``broadcast_add``: the second residual adds a ``[1, seq, H]`` value, which the kernel cannot take."""
    g = Graph("blocks")
    x = g.input("x", ("batch", "seq", H))
    side = g.input("side", (1, "seq", H))
    eps = {"axis": -1, "epsilon": 1e-6}
    n0 = g.add(Op.RMS_NORM, [x, g.const("n0.scale", RNG.uniform(0.5, 1.5, H).astype(np.float32))], eps, name="n0")
    r1 = g.add(Op.ADD, [x, _linear(g, n0, "l1")], name="r1")
    n1 = g.add(Op.RMS_NORM, [r1, g.const("n1.scale", RNG.uniform(0.5, 1.5, H).astype(np.float32))], eps, name="n1")
    r2 = g.add(Op.ADD, [side if broadcast_add else r1, _linear(g, n1, "l2")], name="r2")
    n2 = g.add(Op.RMS_NORM, [r2, g.const("n2.scale", RNG.uniform(0.5, 1.5, H).astype(np.float32))], eps, name="n2")
    g.set_output("y", _linear(g, n2, "head"))
    g.set_output("residual", r2)
    return verify(g)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


@pytest.mark.parametrize("broadcast_add", [False, True])
def test_residual_add_and_rms_norm_become_one_skip_norm(broadcast_add) -> None:
    g = _decoder(broadcast_add)
    plain, fused = to_onnx(g, 23), to_onnx(g, 23, contrib=True)
    assert _ops(plain)[f"{CONTRIB_DOMAIN}:SkipSimplifiedLayerNormalization"] == 0
    want_fused = 1 if broadcast_add else 2  # the first norm reads an input, not an Add
    ops = _ops(fused)
    assert ops[f"{CONTRIB_DOMAIN}:SkipSimplifiedLayerNormalization"] == want_fused
    assert ops["RMSNormalization"] == 3 - want_fused and ops["Add"] == 2 - want_fused
    assert any(o.domain == CONTRIB_DOMAIN for o in fused.opset_import)
    feeds = {"x": RNG.standard_normal((3, 5, H)).astype(np.float32), "side": RNG.standard_normal((1, 5, H)).astype(np.float32)}
    want = run(g, feeds)
    for got in (_ort(plain, feeds), _ort(fused, feeds)):
        for name in ("y", "residual"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(_ort(fused, feeds)["residual"], _ort(plain, feeds)["residual"])


def test_without_contrib_nothing_changes_and_no_domain_is_imported() -> None:
    model = to_onnx(_decoder(), 23)
    assert [o.domain for o in model.opset_import] == [""]


# ---------------------------------------------------------------- GroupQueryAttention
def _captured(arch: str, **config):
    """A tiny ``arch`` (``config`` overriding its settings) captured with its cache and optimized as the
    GenAI export does; its cache layout."""
    import warnings

    pytest.importorskip("transformers")
    from flora_graph.frontend.causal_lm import cache_layout, capture_causal_lm
    from flora_graph.passes import optimize
    from tests.frontend.test_causal_lm import tiny_causal_lm

    model = tiny_causal_lm(arch)
    if config:
        import torch

        model.config.update(config)
        torch.manual_seed(0)
        model = type(model)(model.config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize(capture_causal_lm(model), "fused", backend="onnxruntime"), cache_layout(model)


def _step(model: onnx.ModelProto, layout, ids: list[list[int]], mask: np.ndarray, past: list[np.ndarray],
          positions: np.ndarray) -> dict[str, np.ndarray]:
    from flora_graph.frontend.causal_lm import past_names

    takes = {i.name for i in model.graph.input}
    feeds = {"input_ids": np.array(ids, np.int64), "attention_mask": mask.astype(np.int64)}
    if "position_ids" in takes:
        feeds["position_ids"] = positions.astype(np.int64)
    feeds.update(zip(past_names(layout.layers), past, strict=True))
    return _ort(model, feeds)


def _equal_at_prefill_and_decode(plain: onnx.ModelProto, fused: onnx.ModelProto, layout, prompt: list[int],
                                 tokens: tuple[int, ...] = (4,)) -> list[dict[str, np.ndarray]]:
    """Run one unpadded row through both models: the prompt, then ``tokens`` one by one, each fed the
    standard model's caches; assert logits (and the prefill's caches) equal; the standard model's outputs."""
    from flora_graph.frontend.causal_lm import present_names

    past = [np.zeros((1, layout.layer_kv(i)[0], 0, layout.layer_kv(i)[1 if kind == "key" else 2]), np.float32)
            for i, kind in layout.entries()]  # a cache shape per layer (Gemma 4)
    n, ids, outs = 0, prompt, []
    for step, _ in enumerate((None, *tokens)):
        total = n + len(ids)
        args = ([ids], np.ones((1, total)), past, np.arange(n, total)[None])
        want, got = _step(plain, layout, *args), _step(fused, layout, *args)
        for k in ("logits", *(present_names(layout.layers) if step == 0 else ())):
            np.testing.assert_allclose(got[k], want[k], atol=2e-5, rtol=1e-4, err_msg=f"step {step} {k}")
        outs.append(want)
        past, n = [want[k] for k in present_names(layout.layers)], total
        ids = [tokens[step]] if step < len(tokens) else []
    return outs


@pytest.mark.parametrize("max_positions", [256, None])
def test_decoder_attention_becomes_group_query_attention_on_right_padded_caches(max_positions) -> None:
    """Every attention of a captured Llama becomes one GroupQueryAttention (rotary inside given the
    positions; position_ids then leaves the inputs); prefill and decode equal the standard model's, and
    a right-padded batch gives each row the logits and cache of its unpadded run."""
    from flora_graph.frontend.causal_lm import present_names
    from flora_graph.runtimes.ort_contrib import CACHE_PADDING_KEY

    graph, layout = _captured("LlamaForCausalLM")
    plain = to_onnx(graph, 23)
    fused = to_onnx(graph, 23, contrib=True, max_positions=max_positions)
    ops = _ops(fused)
    assert ops[f"{CONTRIB_DOMAIN}:GroupQueryAttention"] == layout.layers and ops["Attention"] == 0
    assert {p.key: p.value for p in fused.metadata_props}[CACHE_PADDING_KEY] == "right"
    rotary = [a.i for n in fused.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute if a.name == "do_rotary"]
    takes = [i.name for i in fused.graph.input]
    if max_positions:
        assert rotary == [1] * layout.layers and ops["RotaryEmbedding"] == 0 and "position_ids" not in takes
    else:
        assert rotary in ([], [0] * layout.layers) and ops["RotaryEmbedding"] == 2 * layout.layers and "position_ids" in takes
    empty = [np.zeros((1, layout.kv_heads, 0, layout.head_dim), np.float32)] * (2 * layout.layers)
    long, short = [5, 9, 11, 3, 7], [8, 2, 6]
    # unpadded rows, each alone: prefill + one decode step, equal in both models
    alone = {name: _equal_at_prefill_and_decode(plain, fused, layout, prompt)
             for name, prompt in (("long", long), ("short", short))}
    # both rows in one right-padded batch: prefill, then a decode step at each row's own position
    mask = np.array([[1] * 5, [1, 1, 1, 0, 0]])
    both = _step(fused, layout, [long, [*short, 0, 0]], mask, [np.zeros((2, *e.shape[1:]), np.float32) for e in empty],
                 np.array([list(range(5)), [0, 1, 2, 3, 4]]))
    np.testing.assert_allclose(both["logits"][0], alone["long"][0]["logits"][0], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(both["logits"][1, :3], alone["short"][0]["logits"][0], atol=2e-5, rtol=1e-4)
    past = [both[k] for k in present_names(layout.layers)]
    np.testing.assert_allclose(past[0][1, :, :3], alone["short"][0]["present.0.key"][0], atol=2e-5, rtol=1e-4)
    step_mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]])
    nxt = _step(fused, layout, [[4], [4]], step_mask, past, np.array([[5], [3]]))
    np.testing.assert_allclose(nxt["logits"][0], alone["long"][1]["logits"][0], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(nxt["logits"][1], alone["short"][1]["logits"][0], atol=2e-5, rtol=1e-4)


def test_sliding_window_attention_keeps_its_window_in_the_kernel() -> None:
    """Mistral with a 4-key sliding window: GroupQueryAttention's local window of 4 keys (the query's own
    among them) gives the standard model's logits on a 7-token prompt and on decode steps past the window."""
    graph, layout = _captured("MistralForCausalLM", sliding_window=4)
    plain, fused = to_onnx(graph, 23), to_onnx(graph, 23, contrib=True, max_positions=256)
    windows = [a.i for n in fused.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
               if a.name == "local_window_size"]
    assert windows == [4] * layout.layers
    empty = [np.zeros((1, layout.kv_heads, 0, layout.head_dim), np.float32)] * (2 * layout.layers)
    prompt = [5, 9, 11, 3, 7, 8, 2]
    want = _equal_at_prefill_and_decode(plain, fused, layout, prompt, (4, 6))[0]
    unwindowed = _step(to_onnx(_captured("MistralForCausalLM", sliding_window=None)[0], 23), layout, [prompt],
                       np.ones((1, len(prompt))), empty, np.arange(len(prompt))[None])
    assert np.abs(unwindowed["logits"][0, -1] - want["logits"][0, -1]).max() > 1e-4  # the window matters here


def test_attention_the_kernel_cannot_take_keeps_the_standard_model() -> None:
    """An attention whose mask is only ``attention_mask`` (no causal part) is not what the kernel computes:
    no attention is fused (one contract per model), the metadata says nothing, and the residual norms,
    ``position_ids``-free here, are untouched."""
    from flora_graph.runtimes.ort_contrib import CACHE_PADDING_KEY

    g = Graph("padding_mask_decoder")
    x = g.input("x", ("batch", "seq", H))
    am = g.input("attention_mask", ("batch", "past_seq+seq"), "int64")
    past = [g.input(f"past_key_values.0.{kv}", ("batch", 2, "past_seq", H // 2)) for kv in ("key", "value")]
    mask = g.add(Op.UNSQUEEZE, [g.add(Op.CAST, [am], {"to": "bool"})], {"axes": [1, 2]})
    qkv = [_linear(g, x, f"{n}_proj") for n in ("q", "k", "v")]
    attrs = {"q_heads": 2, "kv_heads": 2}
    g.set_output("y", g.add(Op.KV_ATTENTION, [*qkv, *past, mask], attrs))
    for i, kv in ((1, "key"), (2, "value")):
        g.set_output(f"present.0.{kv}", g.add(Op.KV_ATTENTION, [*qkv, *past, mask], {**attrs, "output": i}))
    fused = to_onnx(verify(g), 23, contrib=True, max_positions=64)
    ops = _ops(fused)
    assert ops[f"{CONTRIB_DOMAIN}:GroupQueryAttention"] == 0 and ops["Attention"] == 1
    assert CACHE_PADDING_KEY not in {p.key for p in fused.metadata_props}
    assert [i.name for i in fused.graph.input] == [i.name for i in to_onnx(g, 23).graph.input]


def test_heads_the_kernel_refuses_keep_the_standard_model() -> None:
    """ONNX Runtime's GroupQueryAttention refuses, when it runs, a head size that is not a multiple of 16: a
    Llama with 8-wide heads keeps the standard attention (and its contract), and runs."""
    from flora_graph.runtimes.ort_contrib import CACHE_PADDING_KEY, GQA_HEAD_MULTIPLE

    graph, layout = _captured("LlamaForCausalLM", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8)
    assert layout.head_dim % GQA_HEAD_MULTIPLE  # the case at hand
    fused = to_onnx(graph, 23, contrib=True, max_positions=256)
    ops = _ops(fused)
    assert ops[f"{CONTRIB_DOMAIN}:GroupQueryAttention"] == 0 and ops["Attention"] == layout.layers
    assert CACHE_PADDING_KEY not in {p.key for p in fused.metadata_props}
    _equal_at_prefill_and_decode(to_onnx(graph, 23), fused, layout, [5, 9, 11, 3])  # runs, and equals the plain model


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", *(pytest.param(a, marks=pytest.mark.slow)
                                                         for a in ("Gemma3ForCausalLM", "GPTNeoXForCausalLM"))])
def test_four_d_attention_on_concatenated_caches_becomes_group_query_attention(arch: str) -> None:
    """Qwen3 and Gemma 3 (per-head q/k norms before the rotary, Gemma 3's on the transposed heads, and two
    rotary bases) and GPT-NeoX (partial rotary) attend in 4-D over caches concatenated outside the attention:
    those become GroupQueryAttention's presents; Qwen3's and Gemma 3's full rotary moves into the kernel (their
    q/k/v go in untransposed, position_ids is no input any more), GPT-NeoX's partial one stays outside
    (position_ids stays an input); prefill and decode equal the standard model's."""

    graph, layout = _captured(arch)
    plain, fused = to_onnx(graph, 23), to_onnx(graph, 23, contrib=True, max_positions=256)
    ops = _ops(fused)
    assert ops[f"{CONTRIB_DOMAIN}:GroupQueryAttention"] == layout.layers and ops["Attention"] == 0
    assert ops["Concat"] < _ops(plain)["Concat"]
    inside = arch != "GPTNeoXForCausalLM"
    assert ("position_ids" in [i.name for i in fused.graph.input]) != inside
    assert (ops["RotaryEmbedding"] == 0) == inside and (ops["Transpose"] < _ops(plain)["Transpose"] - layout.layers) == inside
    if inside:
        gqa = next(n for n in fused.graph.node if n.op_type == "GroupQueryAttention")
        assert {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}["do_rotary"] == 1
    _equal_at_prefill_and_decode(plain, fused, layout, [5, 9, 11, 3, 7], (4, 6))


def test_layers_reading_another_layers_cache_attend_with_group_query_attention_too() -> None:
    """Gemma 4's edge form: its last two layers attend over earlier layers' caches (the same concatenations the
    earlier layers' attentions read), and its full attention layers have wider, fewer heads. Every attention becomes
    GroupQueryAttention: the first reader of a cache writes it as the present, a later reader takes the same past and
    new keys and values into presents of its own that nothing reads; prefill and decode equal the standard model."""
    graph, layout = _captured("Gemma4ForCausalLM", num_kv_shared_layers=2)
    assert layout.shared == ((2, 0), (3, 1)) and len(set(layout.per_layer)) == 2
    plain, fused = to_onnx(graph, 23), to_onnx(graph, 23, contrib=True, max_positions=256)
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layout.layers and _ops(fused)["Attention"] == 0
    outputs = {o.name for o in fused.graph.output}
    assert [n.output[1] in outputs for n in gqa] == [True, True, False, False]
    assert [n.input[3] for n in gqa] == [f"past_key_values.{i}.key" for i in (0, 1, 0, 1)]
    _equal_at_prefill_and_decode(plain, fused, layout, [5, 9, 11, 3, 7], (4, 6))


def test_attention_sinks_go_into_the_kernel_as_head_sinks() -> None:
    """gpt-oss (a sink logit per query head, sliding and full layers): each attention becomes one
    GroupQueryAttention reading the layer's sinks as ``head_sink``, with the sliding layer's window; prefill and
    decode steps past the window equal the standard model, whose spelled-out sinks give eager's logits."""
    import warnings

    import torch

    from flora_graph.frontend.causal_lm import cache_layout, capture_causal_lm
    from flora_graph.passes import optimize
    from tests.frontend.test_causal_lm import tiny_causal_lm

    model = tiny_causal_lm("GptOssForCausalLM")
    model.config.update({"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]})
    torch.manual_seed(0)
    model = type(model)(model.config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # sinks that take a good share of each row
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, layer.self_attn.sinks.numel()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, layout = optimize(capture_causal_lm(model), "fused", backend="onnxruntime"), cache_layout(model)
    assert collections.Counter(n.op for n in graph.nodes)[Op.KV_ATTENTION] == 3 * layout.layers
    plain, fused = to_onnx(graph, 23), to_onnx(graph, 23, contrib=True, max_positions=256)
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layout.layers and _ops(fused)["Softmax"] == _ops(plain)["Softmax"] - layout.layers
    assert [n.input[11] for n in gqa] == [f"model.layers.{i}.self_attn.sinks" for i in range(layout.layers)]
    windows = [next((a.i for a in n.attribute if a.name == "local_window_size"), -1) for n in gqa]
    assert windows == [4, -1]
    prompt = [5, 9, 11, 3, 7, 8, 2]
    want = _equal_at_prefill_and_decode(plain, fused, layout, prompt, (4, 6))
    with torch.no_grad():
        eager = model(torch.tensor([prompt])).logits.numpy()
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # no sinks: other logits (the sinks matter here)
        sinkless = model(torch.tensor([prompt])).logits.numpy()
    np.testing.assert_allclose(want[0]["logits"], eager, atol=2e-4, rtol=1e-3)
    assert np.abs(sinkless - eager).max() > 1e-2


def test_no_group_query_attention_where_the_mask_is_read_past_the_attentions() -> None:
    """Bamba's Mamba-2 layer zeroes padded tokens with ``attention_mask``, which GroupQueryAttention's right-padded
    contract would change: its attention stays the standard one, its model left-padded (no metadata), and it
    gives the same logits as the model lowered without contrib ops."""
    from flora_graph.runtimes.ort_contrib import CACHE_PADDING_KEY

    graph, layout = _captured("BambaForCausalLM")
    plain, fused = to_onnx(graph, 23), to_onnx(graph, 23, contrib=True, max_positions=256)
    ops = _ops(fused)
    assert ops[f"{CONTRIB_DOMAIN}:GroupQueryAttention"] == 0 and ops["Attention"] == 1
    assert CACHE_PADDING_KEY not in {p.key for p in fused.metadata_props}
    assert ops[f"{CONTRIB_DOMAIN}:SkipSimplifiedLayerNormalization"] > 0  # the other contrib fusions still apply
    feeds = {"input_ids": np.array([[5, 9, 11, 3, 7]]), "attention_mask": np.array([[0, 0, 1, 1, 1]]),
             "position_ids": np.array([[1, 1, 0, 1, 2]])}
    feeds.update({n: np.zeros((1, *layout.state_shape(i, k)) if k in ("conv", "recurrent") else
                              (1, layout.kv_heads, 0, layout.head_dim), np.float32)
                  for n, (i, k) in zip(layout.past_names(), layout.entries(), strict=True)})
    np.testing.assert_allclose(_ort(fused, feeds)["logits"], _ort(plain, feeds)["logits"], atol=2e-5, rtol=1e-4)
