"""LoRA on Falcon's ``FalconLinear`` (``x @ W.T`` [``+ b``], no ``F.linear``): intact sites, swappable slots.

The regression: capture gave each base product as ``MatMul(x, Transpose(W))`` (and the bias as
a separate ``Add``), which the LoRA pattern does not read as a base layer, so exporting a Falcon
GenAI package with a PEFT adapter failed with "no longer intact LoRA sites". The ATen converters
now capture ``x @ W.T`` as ``Linear(x, W)`` and fold a bias added to it alone.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.frontend.causal_lm import CausalLMWithPast, cache_layout, capture_causal_lm, example_inputs, past_names  # noqa: E402
from flora_graph.ir import Op  # noqa: E402
from flora_graph.passes import optimize  # noqa: E402
from flora_graph.passes.adapter_slots import lora_sites  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402
from flora_graph.serving import graph_adapter_params  # noqa: E402

VARIANTS = {
    "new_decoder": dict(new_decoder_architecture=True, num_kv_heads=2),
    "multi_query_parallel_bias": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=True),
}
LAYERS = 2
MODULES = {f"transformer.h.{i}.{m}" for i in range(LAYERS)
           for m in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}


def adapted_falcon(variant: str):
    """A seeded tiny Falcon with a PEFT LoRA adapter (all linear layers, nonzero ``B``), in eval mode."""
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                    **VARIANTS[variant])
    model = peft.get_peft_model(transformers.FalconForCausalLM(cfg).eval(),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            for b in getattr(module, "lora_B", {}).values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", ["new_decoder", pytest.param("multi_query_parallel_bias", marks=pytest.mark.slow)])
def test_falcon_lora_sites_are_intact_and_their_slots_match_eager_peft(variant: str) -> None:
    model = adapted_falcon(variant)
    inner = model.get_base_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_causal_lm(inner)
        layout = cache_layout(inner)
    sites = lora_sites(graph)
    assert {m.module for m in sites} == MODULES
    assert all(m.base.op is Op.LINEAR and (m.bias is not None) == (variant.endswith("bias")) for m in sites)

    slotted = optimize(graph, "fused", backend="onnxruntime", slots="swappable")
    params = graph_adapter_params(graph)
    assert set(params) == {f"{m}.lora_{w}" for m in MODULES for w in "AB"}
    exe = compile(slotted, "onnxruntime")
    wrapper = CausalLMWithPast(inner, layout)
    for batch, seq, past, pad in [(2, 5, 0, 2), (3, 1, 6, 3)]:  # prefill (left-padded row), one decode step
        x = example_inputs(layout, 128, batch, seq, past, seed=batch, left_pad=pad)
        feed = {k: v.numpy() for k, v in x.items() if k != "past_key_values"}
        feed.update({n: t.numpy() for n, t in zip(past_names(layout.layers), x["past_key_values"], strict=True)})
        with torch.no_grad():
            want = wrapper(**x)[0].numpy()
            with model.disable_adapter():
                want_base = wrapper(**x)[0].numpy()
        assert np.abs(want - want_base).max() > 1e-3  # the adapter changes the logits
        np.testing.assert_allclose(exe({**feed, **params})["logits"], want, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(exe(feed)["logits"], want_base, atol=2e-5, rtol=1e-4)
