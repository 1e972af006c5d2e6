"""group-experts: a mixture of experts' products on gathered weights become ExpertLinear, equal to eager."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from flora_graph.frontend import capture  # noqa: E402
from flora_graph.frontend.causal_lm import capture_causal_lm  # noqa: E402
from flora_graph.ir import Op  # noqa: E402
from flora_graph.passes import optimize  # noqa: E402
from flora_graph.passes.group_experts import group_experts  # noqa: E402
from flora_graph.runtimes.onnx_lowering import to_onnx  # noqa: E402
from tests.frontend.test_causal_lm import assert_logits_like_eager  # noqa: E402


def _moe(arch: str, **extra):
    """A tiny ``arch`` whose experts are 3-D tensors: Qwen3-MoE (``[experts, out, in]``) or gpt-oss
    (``[experts, in, out]``, biased); ``extra`` config fields."""
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=256)
    cfg = (transformers.Qwen3MoeConfig(**common, intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, **extra) if arch == "qwen3_moe" else
           transformers.GptOssConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=4, **extra))
    model = (transformers.Qwen3MoeForCausalLM if arch == "qwen3_moe" else transformers.GptOssForCausalLM)(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, capture_causal_lm(model)


@pytest.mark.parametrize(("arch", "transposed"), [("qwen3_moe", 0), ("gpt_oss", 1)])
def test_expert_products_become_expert_linear_and_match_eager(arch: str, transposed: int) -> None:
    model, graph = _moe(arch)
    layers = model.config.num_hidden_layers
    gathered = [n for n in graph.nodes if n.op is Op.GATHER and n.inputs[0].op is Op.CONST and len(n.inputs[0].shape) == 3]
    assert len(gathered) == 2 * layers  # as captured: each pair gathers its own copy of its expert's weight
    fused = optimize(graph, "fused", backend="onnxruntime")
    experts = [n for n in fused.nodes if n.op is Op.EXPERT_LINEAR]
    assert len(experts) == 2 * layers and {n.attrs["transposed"] for n in experts} == {transposed}
    assert not [n for n in fused.nodes if n.op is Op.GATHER and n.inputs[0].op is Op.CONST and len(n.inputs[0].shape) == 3]
    assert_logits_like_eager(model, fused, ("numpy", "onnxruntime", "torchscript"))

def _outer_reads_exist(model: onnx.ModelProto, loops: int) -> None:
    """``model`` has ``loops`` Loops, and every value a body reads from the graph around it is made there."""
    found = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(found) == loops
    made = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.initializer} | \
        {i.name for i in model.graph.input}
    for loop in found:
        body = loop.attribute[0].g
        outer = {i for n in body.node for i in n.input} - {o for n in body.node for o in n.output} - \
            {i.name for i in body.input}
        assert outer and outer <= made, outer - made
    onnx.checker.check_model(model, full_check=True)


def test_onnx_model_loops_over_the_experts_in_use_and_keeps_what_the_loop_reads() -> None:
    """ONNX: one Loop per product, whose body reads the routed rows and the weights from the graph around it;
    the contrib lowering (GroupQueryAttention, which drops what only the old attention read) keeps them: in
    float its blocks stay loops unless MoE nodes are asked for (``moe``, what 4-bit packages quantize)."""
    _, graph = _moe("qwen3_moe")
    fused = optimize(graph, "fused", backend="onnxruntime")
    _outer_reads_exist(to_onnx(fused, 23), 4)
    _outer_reads_exist(to_onnx(fused, 23, contrib=True, max_positions=256), 4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_contrib_model_runs_each_block_as_one_moe_node_equal_to_the_loops(arch: str) -> None:
    """With contrib ops and ``moe``, each block (routing, both expert products, the gated activation, the weighted sum)
    is one com.microsoft.MoE: Qwen3-MoE's silu(gate) * up on halves, gpt-oss's clamped, interleaved SwiGLU
    with biases; the logits equal the standard model's (Loops) at a prefill and a decode step."""
    import numpy as np
    import onnxruntime as ort

    from flora_graph.frontend.causal_lm import cache_layout, example_inputs
    from tests.frontend.test_causal_lm import _feed

    model, graph = _moe(arch)
    fused = optimize(graph, "fused", backend="onnxruntime")
    plain, contrib = to_onnx(fused, 23), to_onnx(fused, 23, contrib=True, max_positions=256, moe=True)
    moe = [n for n in contrib.graph.node if n.op_type == "MoE"]
    assert len(moe) == model.config.num_hidden_layers and not [n for n in contrib.graph.node if n.op_type == "Loop"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
    assert attrs["k"] == 2 and attrs["activation_type"] == b"swiglu"
    if arch == "gpt_oss":  # min(gate, 7) * sigmoid(1.702 gate) * (clip(up, -7, 7) + 1), biased, softmax over the top k
        assert attrs["activation_alpha"] == pytest.approx(1.702) and attrs["activation_beta"] == 1.0
        assert attrs["swiglu_limit"] == 7.0 and attrs["normalize_routing_weights"] == 1 and len(moe[0].input) == 6
    else:  # silu(gate) * up, the softmax over every expert read at the top k
        assert attrs["activation_alpha"] == 1.0 and attrs["activation_beta"] == 0.0
        assert "swiglu_limit" not in attrs and attrs["normalize_routing_weights"] == 0 and len(moe[0].input) == 5
    layout = cache_layout(model)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (plain, contrib)]
    for batch, seq, past in [(2, 5, 0), (2, 1, 4)]:  # unpadded: both cache contracts read these alike
        feed = _feed(example_inputs(layout, 128, batch, seq, past, seed=seq), layout)
        got = [s.run(["logits"], {i.name: feed[i.name] for i in s.get_inputs()})[0] for s in sessions]
        np.testing.assert_allclose(got[1], got[0], atol=2e-5, rtol=1e-4)


class _SharedGather(nn.Module):
    """The gathered expert weights also leave the graph: the copies are needed, no rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5, 6))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sel = self.w[ids]
        return torch.bmm(sel, x.unsqueeze(-1)).squeeze(-1), sel


def test_gathered_weights_read_elsewhere_are_refused_with_the_reason() -> None:
    g = capture(_SharedGather(), {"x": torch.randn(3, 6), "ids": torch.tensor([1, 3, 1])})
    res = group_experts(g)
    assert not res.changed
    assert any("also read by" in why for why in res.stats["refused"].values())


def test_a_block_whose_activation_moe_cannot_run_keeps_its_loops() -> None:
    """GELU(gate) * up is no SwiGLU: checked against the activation's own nodes, the block is not fused."""
    _, graph = _moe("qwen3_moe", hidden_act="gelu")
    fused = optimize(graph, "fused", backend="onnxruntime")
    model = to_onnx(fused, 23, contrib=True, max_positions=256, moe=True)
    assert not [n for n in model.graph.node if n.op_type == "MoE"]
    _outer_reads_exist(model, 4)
