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


def _moe(arch: str):
    """A tiny ``arch`` whose experts are 3-D tensors: Qwen3-MoE (``[experts, out, in]``) or gpt-oss
    (``[experts, in, out]``, biased)."""
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=256)
    cfg = (transformers.Qwen3MoeConfig(**common, intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32) if arch == "qwen3_moe" else
           transformers.GptOssConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=4))
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

def test_onnx_model_loops_over_the_experts_in_use_and_keeps_what_the_loop_reads() -> None:
    """ONNX: one Loop per product, whose body reads the routed rows and the weights from the graph around it;
    the contrib lowering (GroupQueryAttention, which drops what only the old attention read) keeps them."""
    _, graph = _moe("qwen3_moe")
    fused = optimize(graph, "fused", backend="onnxruntime")
    for model in (to_onnx(fused, 23), to_onnx(fused, 23, contrib=True, max_positions=256)):
        loops = [n for n in model.graph.node if n.op_type == "Loop"]
        assert len(loops) == 4
        made = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.initializer} | \
            {i.name for i in model.graph.input}
        for loop in loops:
            body = loop.attribute[0].g
            outer = {i for n in body.node for i in n.input} - {o for n in body.node for o in n.output} - \
                {i.name for i in body.input}
            assert outer and outer <= made, outer - made
        onnx.checker.check_model(model, full_check=True)


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
