"""fuse-softcap-attention: Gemma 2's soft-capped attention, spelled out in torch ops, becomes one attention node."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from flora_graph.frontend import capture  # noqa: E402
from flora_graph.frontend.causal_lm import capture_causal_lm  # noqa: E402
from flora_graph.ir import Op  # noqa: E402
from flora_graph.passes import optimize  # noqa: E402
from flora_graph.passes.fuse_softcap_attention import fuse_softcap_attention  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402
from tests.frontend.test_causal_lm import assert_logits_like_eager, tiny_causal_lm  # noqa: E402


def _gemma2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_causal_lm("Gemma2ForCausalLM")
        return model, capture_causal_lm(model)


def test_gemma2_attention_becomes_kv_attention_with_its_cap_and_matches_eager() -> None:
    model, graph = _gemma2()
    assert any(n.op is Op.TANH for n in graph.nodes)  # the cap, spelled out as captured
    fused = optimize(graph, "fused", backend="onnxruntime")
    atts = [n for n in fused.nodes if n.op is Op.KV_ATTENTION and n.attrs["output"] == 0]
    assert len(atts) == model.config.num_hidden_layers
    assert {n.attrs["softcap"] for n in atts} == {model.config.attn_logit_softcapping}
    assert not any(n.op is Op.SOFTMAX for n in fused.nodes)
    assert sum(n.op is Op.TANH for n in fused.nodes) == 1  # the final logits' own cap
    assert_logits_like_eager(model, fused)

def test_gemma2_package_attention_is_group_query_attention_with_cap_and_window(tmp_path) -> None:
    from flora_graph.llm_demo import save_word_tokenizer
    from flora_graph.serving.genai import export_genai

    model, _ = _gemma2()
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg")
    gqa = [n for n in onnx.load(str(tmp_path / "pkg" / "model.onnx")).graph.node if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert len(gqa) == model.config.num_hidden_layers
    assert all(a["softcap"] == pytest.approx(model.config.attn_logit_softcapping) for a in attrs)
    assert sorted(a.get("local_window_size", -1) for a in attrs) == [-1, model.config.sliding_window]  # sliding, global


class _TwoCaps(nn.Module):
    """Soft-capped attention whose tanh divides by one cap and multiplies by another: not a soft cap."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        s = torch.tanh(q @ k.transpose(-1, -2) * 0.5 / 30.0) * 20.0
        return torch.softmax(s + torch.where(m, 0.0, float("-inf")), -1) @ v


def test_attention_with_two_caps_is_refused_with_the_reason() -> None:
    x = {"q": torch.randn(1, 2, 3, 4), "k": torch.randn(1, 2, 3, 4), "v": torch.randn(1, 2, 3, 4),
         "m": torch.ones(1, 1, 3, 3, dtype=torch.bool)}
    g = capture(_TwoCaps(), x)
    res = fuse_softcap_attention(g)
    assert not res.changed
    assert any("one positive cap" in why for why in res.stats["refused"].values())


def test_attention_without_a_cache_keeps_its_ops_and_every_position_equals_eager() -> None:
    """Without a cache every position is an output, a left-padded row's padding queries too: eager averages every
    value where a query sees no key (its bias is a finite lowest value), the fused node would give 0. Refused
    there with the reason, and the optimized graph equals eager at every position."""
    model, _ = _gemma2()
    model.config.use_cache = False
    ids = torch.tensor([[5, 9, 11, 3, 7, 8], [4, 6, 2, 9, 13, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture(model, {"input_ids": ids, "attention_mask": mask},
                        {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    res = fuse_softcap_attention(graph)
    assert not res.changed and any("not a cache's" in why for why in res.stats["refused"].values())
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    got = compile(optimize(graph, "fused", backend="onnxruntime"), "onnxruntime")(
        input_ids=ids.numpy(), attention_mask=mask.numpy())
    np.testing.assert_allclose(next(iter(got.values())), want, atol=2e-5, rtol=1e-4)  # the padded row's too
