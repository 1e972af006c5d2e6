"""Mixture-of-experts (Mixtral): every experts implementation captures and matches eager transformers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.frontend import capture  # noqa: E402
from flora_graph.frontend.causal_lm import (  # noqa: E402
    CausalLMWithPast,
    cache_layout,
    capture_causal_lm,
    example_inputs,
    past_names,
    present_names,
)
from flora_graph.frontend.traceable import traceable_experts  # noqa: E402
from flora_graph.ir import Op  # noqa: E402
from flora_graph.passes import optimize  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402

TOL = 2e-5
DIMS = {"input_ids": {0: "batch", 1: "seq"}}


def mixtral(impl: str | None = None):
    torch.manual_seed(0)
    extra = {"experts_implementation": impl} if impl else {}
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128, use_cache=False, **extra)
    return transformers.MixtralForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", [None, "eager", "batched_mm"])  # None: transformers' default, grouped_mm
def test_every_experts_implementation_captures_and_matches_eager(impl: str | None) -> None:
    model = mixtral(impl)
    chosen = model.config._experts_implementation_internal  # the default resolves to grouped_mm
    graph = capture(model, {"input_ids": torch.randint(0, 128, (2, 8))}, DIMS, dim_max={"seq": 128})
    assert model.config._experts_implementation_internal == chosen == (impl or "grouped_mm")  # restored
    for backend in ("numpy", "onnxruntime"):
        exe = compile(graph, backend)
        for shape in [(1, 5), (3, 11)]:
            x = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
            with torch.no_grad():
                want = model(input_ids=x).logits.numpy()  # eager with the model's own implementation
            np.testing.assert_allclose(next(iter(exe(input_ids=x.numpy()).values())), want, atol=TOL, rtol=TOL)


def test_only_untraceable_implementations_are_switched() -> None:
    model = mixtral("batched_mm")
    with traceable_experts(model) as switched:
        assert switched == []
    model = mixtral()
    with traceable_experts(model) as switched:
        assert switched == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert model.config._experts_implementation_internal == "batched_mm"
    assert model.config._experts_implementation_internal == "grouped_mm"


def test_mixtral_with_peft_lora_and_its_cache() -> None:
    base = mixtral()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    for module in model.modules():
        if hasattr(module, "lora_B"):
            for k in module.lora_B:
                torch.nn.init.normal_(module.lora_B[k].weight, std=0.2)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = optimize(capture_causal_lm(model), "fused", backend="onnxruntime")
        layout = cache_layout(model)
        wrapper = CausalLMWithPast(model, layout)
        exe = compile(graph, "onnxruntime")
        for batch, seq, past in [(2, 4, 0), (2, 1, 5)]:
            x = example_inputs(layout, 128, batch, seq, past, seed=past, left_pad=1)
            with torch.no_grad():
                want = wrapper(**x)
            feed = {k: v.numpy() for k, v in x.items() if k != "past_key_values"}
            feed.update({n: t.numpy() for n, t in zip(past_names(layout.layers), x["past_key_values"], strict=True)})
            got = exe(feed)
            for i, name in enumerate(["logits", *present_names(layout.layers)]):
                np.testing.assert_allclose(got[name], want[i].numpy(), atol=TOL, rtol=TOL, err_msg=name)


def test_switch_experts_run_densely_while_capturing_with_tokens_over_capacity_dropped() -> None:
    """SwitchTransformers loops over the experts its tokens hit (data-dependent) and converts its router's classifier
    with ``Module.to`` every call: inside ``traceable_experts`` each experts module runs every expert on every token
    and keeps each token's own (tokens over an expert's capacity get nothing, as in the loop); the encoder captures
    and matches eager at another shape; on exit the modules are as they were."""
    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                                num_experts=4, expert_capacity=2, encoder_sparse_step=1)
    model = transformers.SwitchTransformersEncoderModel(cfg).eval()
    mlp = model.encoder.block[0].layer[1].mlp
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        selected, _, _ = mlp.router(x)
        assert (selected.sum(-1) == 0).any()  # some tokens routed past their expert's capacity
        want = mlp(x)
        with traceable_experts(model) as switched:
            got = mlp(x)
    assert switched == [f"encoder.block.{i}.layer.1.mlp.experts" for i in range(2)]
    assert "forward" not in vars(mlp.experts) and "to" not in vars(mlp.router.classifier)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    graph = capture(model, {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.int64)},
                    {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    ids = torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 13, dtype=torch.int64)
    mask[1, 9:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = next(iter(compile(graph, "onnxruntime")(input_ids=ids.numpy(), attention_mask=mask.numpy()).values()))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def jetmoe():
    torch.manual_seed(0)
    cfg = transformers.JetMoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                                    kv_channels=16, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                    max_position_embeddings=128, use_cache=False)
    return transformers.JetMoeForCausalLM(cfg).eval()


def test_jetmoe_experts_split_by_counts_capture_with_peft_lora() -> None:
    """JetMoE's mixtures of experts and of attention split sorted tokens by counts read into Python (``tolist``):
    captured with the counts a tensor and every expert on every token, at any batch and length, against eager PEFT."""
    model = peft.get_peft_model(jetmoe(), peft.LoraConfig(r=4, target_modules=["layer"], init_lora_weights=False))
    model.eval()
    with traceable_experts(model) as switched:
        assert sorted(switched) == [f"base_model.model.model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp", "self_attention.experts")]
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__.startswith("JetMoe"))
    graph = capture(model, {"input_ids": torch.randint(0, 128, (2, 8))}, DIMS, dim_max={"seq": 128})
    assert any(n.meta.get("adapter") for n in graph.nodes)  # the routers' LoRA sites
    for backend in ("numpy", "onnxruntime"):
        exe = compile(graph, backend)
        for shape in [(1, 5), (3, 11)]:
            x = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
            with torch.no_grad():
                want = model(input_ids=x).logits.numpy()
            np.testing.assert_allclose(next(iter(exe(input_ids=x.numpy()).values())), want, atol=TOL, rtol=TOL)


def dbrx():
    torch.manual_seed(0)
    cfg = transformers.DbrxConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, use_cache=False,
                                  attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                  ffn_config={"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 3,
                                              "hidden_size": 64})
    return transformers.DbrxForCausalLM(cfg).eval()


def test_dbrx_stacked_experts_capture_grouped_with_peft_lora() -> None:
    """DBRX's experts stack every expert's weights in one parameter and loop over the experts the batch hits
    (data-dependent): captured as ``(token, expert)`` products on slices of the stacked weights, grouped into one
    ``ExpertLinear`` per product, and equal to eager PEFT at other batches and lengths, with 3 experts a token (the
    loop adds them in expert order, the products in the router's)."""
    model = peft.get_peft_model(dbrx(), peft.LoraConfig(r=4, target_modules=["Wqkv", "out_proj"],
                                                       init_lora_weights=False)).eval()
    with traceable_experts(model) as switched:
        assert switched == [f"base_model.model.transformer.blocks.{i}.ffn.experts" for i in (0, 1)]
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "DbrxExperts")
    graph = capture(model, {"input_ids": torch.randint(0, 128, (2, 8))}, DIMS, dim_max={"seq": 128})
    assert any(n.meta.get("adapter") for n in graph.nodes)
    grouped = optimize(graph, "fused", backend="onnxruntime")
    assert sum(n.op == Op.EXPERT_LINEAR for n in grouped.nodes) == 4  # w1 with v1, and w2, of each layer
    for g, backend in ((graph, "numpy"), (grouped, "onnxruntime")):
        exe = compile(g, backend)
        for shape in [(1, 5), (3, 11)]:
            x = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
            with torch.no_grad():
                want = model(input_ids=x).logits.numpy()
            np.testing.assert_allclose(next(iter(exe(input_ids=x.numpy()).values())), want, atol=TOL, rtol=TOL)
