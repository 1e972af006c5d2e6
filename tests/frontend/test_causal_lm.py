"""Causal LMs captured with their key/value cache: GenAI names, sum dims, parity with eager transformers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.errors import RuntimeInputError  # noqa: E402
from flora_graph.frontend.causal_lm import (  # noqa: E402
    CacheLayout,
    CausalLMWithPast,
    cache_layout,
    capture_causal_lm,
    example_inputs,
    past_names,
    present_names,
)
from flora_graph.runtimes import compile  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _config(arch: str):
    return {
        "LlamaForCausalLM": lambda: transformers.LlamaConfig(**COMMON),
        "MistralForCausalLM": lambda: transformers.MistralConfig(**COMMON),
        "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(**COMMON),
        "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
        "Phi3ForCausalLM": lambda: transformers.Phi3Config(**COMMON, pad_token_id=0),
        "GemmaForCausalLM": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
        "GPT2LMHeadModel": lambda: transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "GPTNeoXForCausalLM": lambda: transformers.GPTNeoXConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256),
        # sliding windows of 3 positions, so that a short prompt already slides; Gemma 2 soft-caps its logits
        "Gemma2ForCausalLM": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=3),
        "Gemma3ForCausalLM": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=3),
        "GraniteForCausalLM": lambda: transformers.GraniteConfig(
            **COMMON, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0),
        "OlmoForCausalLM": lambda: transformers.OlmoConfig(**COMMON),
        "Olmo2ForCausalLM": lambda: transformers.Olmo2Config(**COMMON),
        "PhiForCausalLM": lambda: transformers.PhiConfig(**COMMON),
        "NemotronForCausalLM": lambda: transformers.NemotronConfig(**COMMON),
        "SmolLM3ForCausalLM": lambda: transformers.SmolLM3Config(**COMMON, pad_token_id=0),
        "StableLmForCausalLM": lambda: transformers.StableLmConfig(**COMMON),
        "Starcoder2ForCausalLM": lambda: transformers.Starcoder2Config(**COMMON),
        "CohereForCausalLM": lambda: transformers.CohereConfig(**COMMON),
        "GPTJForCausalLM": lambda: transformers.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                           n_positions=256, rotary_dim=8),
        "OPTForCausalLM": lambda: transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=256,
                                                         word_embed_proj_dim=64),
        "BloomForCausalLM": lambda: transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
        "FalconForCausalLM": lambda: transformers.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                               num_attention_heads=4, new_decoder_architecture=True,
                                                               num_kv_heads=2),
        "MixtralForCausalLM": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        "Qwen2MoeForCausalLM": lambda: transformers.Qwen2MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
        # attention sinks, sliding windows on alternate layers, clamped SwiGLU experts with biases
        "GptOssForCausalLM": lambda: transformers.GptOssConfig(**COMMON, head_dim=16, num_local_experts=4,
                                                               num_experts_per_tok=2, sliding_window=4),
        "GraniteMoeForCausalLM": lambda: transformers.GraniteMoeConfig(**COMMON, num_local_experts=4,
                                                                       num_experts_per_tok=2),
        "ArceeForCausalLM": lambda: transformers.ArceeConfig(**COMMON),
        "ApertusForCausalLM": lambda: transformers.ApertusConfig(**COMMON),
        "SeedOssForCausalLM": lambda: transformers.SeedOssConfig(**COMMON, head_dim=16),
        "HunYuanDenseV1ForCausalLM": lambda: transformers.HunYuanDenseV1Config(**COMMON, head_dim=16),
        "Exaone4ForCausalLM": lambda: transformers.Exaone4Config(**COMMON, sliding_window=4),
        "Olmo3ForCausalLM": lambda: transformers.Olmo3Config(**COMMON, sliding_window=4),
        "Cohere2ForCausalLM": lambda: transformers.Cohere2Config(**COMMON, sliding_window=4),
        "BitNetForCausalLM": lambda: transformers.BitNetConfig(**COMMON),
        "Glm4ForCausalLM": lambda: transformers.Glm4Config(**COMMON, head_dim=16, pad_token_id=0),
        # StarCoder's multi-query attention (one key/value head) in one fused c_attn; CodeGen's fused qkv in a
        # mixed head order with an interleaved partial rotary
        "GPTBigCodeForCausalLM": lambda: transformers.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                                       n_positions=256),
        "CodeGenForCausalLM": lambda: transformers.CodeGenConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                                 n_positions=256, rotary_dim=8),
        # complex rotary (torch.polar), chunked attention on 3 of 4 layers (chunks of 3 positions), no rotary on the
        # 4th, L2-normed q/k, queries scaled by position, a shared expert beside top-1 routed ones
        "Llama4ForCausalLM": lambda: transformers.Llama4TextConfig(
            **{**COMMON, "num_hidden_layers": 4}, head_dim=16, intermediate_size_mlp=96, num_local_experts=2,
            attention_chunk_size=3, floor_scale=4),
        # complex rotary and multi-head latent attention
        "DeepseekV2ForCausalLM": lambda: transformers.DeepseekV2Config(
            **{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16),
        # multi-head latent attention with the standard rotary (MiniCPM3) and with routed experts (GLM-4 MoE lite)
        "MiniCPM3ForCausalLM": lambda: transformers.MiniCPM3Config(
            **{**COMMON, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16),
        "Glm4MoeLiteForCausalLM": lambda: transformers.Glm4MoeLiteConfig(
            **{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16),
        # multi-head latent attention: one head of compressed keys/values and the keys' rotary part cached
        "DeepseekV3ForCausalLM": lambda: transformers.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16),
        # ALiBi built for max_seq_len positions, its last total_seq columns sliced (bias[..., max(0, n - total):])
        "MptForCausalLM": lambda: transformers.MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                                                         max_seq_len=256),
        # state-space hybrids (Mamba-2 layers: a convolution state and a recurrent state in the cache, a chunked
        # scan of 4 positions) beside attention layers, and LFM2's short convolutions (a convolution state)
        "BambaForCausalLM": lambda: transformers.BambaConfig(
            **COMMON, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4, attn_layer_indices=[1]),
        "GraniteMoeHybridForCausalLM": lambda: transformers.GraniteMoeHybridConfig(
            **COMMON, num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8,
            mamba_chunk_size=4, layer_types=["mamba", "attention"]),
        "FalconH1ForCausalLM": lambda: transformers.FalconH1Config(  # attention and Mamba-2 side by side in each layer
            **COMMON, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
            mamba_chunk_size=4),
        "NemotronHForCausalLM": lambda: transformers.NemotronHConfig(
            **{k: v for k, v in COMMON.items() if k != "num_hidden_layers"}, head_dim=16, mamba_num_heads=8,
            mamba_head_dim=16, ssm_state_size=8, chunk_size=4, hybrid_override_pattern="M*-", n_groups=1),
        "Mamba2ForCausalLM": lambda: transformers.Mamba2Config(  # state-space layers alone: no keys or values
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=8, chunk_size=4,
            n_groups=1),
        # Mamba-1 layers (a selective scan transformers loops over position by position), alone (Mamba; Falcon-Mamba
        # with its B/C/dt norms) and beside attention layers and experts (Jamba)
        "MambaForCausalLM": lambda: transformers.MambaConfig(vocab_size=128, hidden_size=64, state_size=8,
                                                             num_hidden_layers=2, expand=2, conv_kernel=4),
        "FalconMambaForCausalLM": lambda: transformers.FalconMambaConfig(vocab_size=128, hidden_size=64, state_size=8,
                                                                         num_hidden_layers=2, expand=2, conv_kernel=4),
        "JambaForCausalLM": lambda: transformers.JambaConfig(
            **{**COMMON, "num_hidden_layers": 4}, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8, num_experts=4,
            num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=1, use_mamba_kernels=False),
        # gated delta rule layers (a Python loop over chunks of 64: one chunk a call) beside attention
        "Qwen3_5ForCausalLM": lambda: transformers.Qwen3_5TextConfig(
            **COMMON, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
            linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
        "Qwen3NextForCausalLM": lambda: transformers.Qwen3NextConfig(  # the same with routed and shared experts
            **COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
        # linear attention beside a sliding-window layer (the only one with rotary embeddings) and experts
        "LaraMiniForCausalLM": lambda: transformers.LaraMiniConfig(
            **COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "sliding_attention"],
            sliding_window=3),
        "Qwen3_5MoeForCausalLM": lambda: transformers.Qwen3_5MoeTextConfig(  # Qwen3.5's with experts
            **COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
        # Kimi's delta attention (a decay per key channel, one short convolution over q, k and v) beside
        # multi-head latent attention, experts on the second layer
        "KimiLinearForCausalLM": lambda: transformers.KimiLinearConfig(
            **{**COMMON, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, linear_head_dim=16, linear_num_heads=4,
            layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"]),
        "Lfm2ForCausalLM": lambda: transformers.Lfm2Config(
            **{**COMMON, "num_hidden_layers": 3}, layer_types=["conv", "full_attention", "conv"]),
        # multimodal checkpoints (a vision tower and projector beside the text decoder), whose text part a package holds
        "Gemma3ForConditionalGeneration": lambda: transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(**COMMON, head_dim=16), mm_tokens_per_image=4,
            vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=28, patch_size=14),
            image_token_index=127, boi_token_index=125, eoi_token_index=126),
        "Mistral3ForConditionalGeneration": lambda: transformers.Mistral3Config(
            text_config=transformers.MistralConfig(**COMMON, head_dim=16), image_token_index=127,
            vision_config=transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=28, patch_size=14,
                                                           head_dim=16)),
        "Llama4ForConditionalGeneration": lambda: transformers.Llama4Config(  # its text part a whole causal LM
            text_config=dict(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, intermediate_size_mlp=96,
                             num_local_experts=2, attention_chunk_size=3, floor_scale=4),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                               projector_output_dim=64)),
        # per-layer inputs, AltUp, LAuReL, the last layers reading earlier layers' key/value cache
        "Gemma3nForCausalLM": lambda: transformers.Gemma3nTextConfig(
            **{**COMMON, "num_hidden_layers": 4}, head_dim=16, vocab_size_per_layer_input=128,
            hidden_size_per_layer_input=16, num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=3, laurel_rank=8, altup_num_inputs=4, activation_sparsity_pattern=[0.0] * 4),
        # short convolutions and attention, experts after a dense layer (LFM2's mixture of experts)
        "Lfm2MoeForCausalLM": lambda: transformers.Lfm2MoeConfig(
            **{**COMMON, "num_hidden_layers": 3}, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            num_dense_layers=1, layer_types=["conv", "full_attention", "conv"], pad_token_id=0, bos_token_id=1,
            eos_token_id=2),
        # values narrower than keys; windowed layers (with attention sinks) with twice the heads of full ones
        "MiMoV2FlashForCausalLM": lambda: transformers.MiMoV2FlashConfig(
            **COMMON, head_dim=24, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
        # sequence-to-sequence decoders whose encoder has other layer and head counts (num_hidden_layers and
        # num_attention_heads name the encoder's)
        "BlenderbotForCausalLM": lambda: transformers.BlenderbotConfig(
            vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=3, decoder_attention_heads=4,
            encoder_attention_heads=2, decoder_ffn_dim=96, max_position_embeddings=256),
        "WhisperForCausalLM": lambda: transformers.WhisperConfig(
            vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=3, decoder_attention_heads=4,
            encoder_attention_heads=2, decoder_ffn_dim=96, max_target_positions=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=1),
        # full attention layers with wider heads, fewer of them, keys as values; per-layer inputs; a window of 3
        # positions; the multimodal one's last two layers read earlier layers' cache
        "Gemma4ForCausalLM": lambda: transformers.Gemma4TextConfig(**GEMMA4),
        # image placeholders (which the whole model embeds as padding, the text decoder as themselves) at the pad id
        "Gemma4ForConditionalGeneration": lambda: transformers.Gemma4Config(
            text_config=transformers.Gemma4TextConfig(**GEMMA4, num_kv_shared_layers=2),
            vision_config=transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                                          patch_size=4, position_embedding_size=64, pooling_kernel_size=2),
            image_token_id=0, boi_token_id=125, eoi_token_id=126, video_token_id=None, audio_token_id=None,
            boa_token_id=None, eoa_token_index=None),
        "Gemma4UnifiedForConditionalGeneration": lambda: transformers.Gemma4UnifiedConfig(
            text_config=transformers.Gemma4UnifiedTextConfig(**GEMMA4),
            vision_config=transformers.Gemma4UnifiedVisionConfig(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32,
                                                                 mm_posemb_size=16, output_proj_dims=64),
            image_token_id=0, boi_token_id=125, eoi_token_id=126, video_token_id=None, audio_token_id=None,
            boa_token_id=None, eoa_token_index=None),
    }[arch]()


GEMMA4 = dict(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
              attention_k_eq_v=True, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
              layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=3, final_logit_softcapping=30.0)


def tiny_causal_lm(arch: str):
    """A seeded tiny transformers causal LM of ``arch``, in eval mode."""
    torch.manual_seed(0)
    return getattr(transformers, arch)(_config(arch)).eval()


def _feed(x: dict, layout: CacheLayout) -> dict[str, np.ndarray]:
    feed = {k: v.numpy() for k, v in x.items() if k != "past_key_values"}
    feed.update({n: t.numpy() for n, t in zip(layout.past_names(), x["past_key_values"], strict=True)})
    return feed


def assert_logits_like_eager(model, graph, backends=("numpy", "onnxruntime"), vocab: int = 128) -> None:
    """The logits of ``graph`` (``model`` captured with its cache, optimized or not) against eager ``model``'s in
    each backend, at a prefill with a left-padded row and at one decode step; the padded row's query positions
    (whose outputs nothing reads) are not compared."""
    layout = cache_layout(model)
    wrapper = CausalLMWithPast(model, layout)
    takes = {i.name for i in graph.inputs}
    for backend in backends:
        exe = compile(graph, backend)
        for batch, seq, past, pad in [(2, 5, 0, 2), (3, 1, 6, 3)]:
            x = example_inputs(layout, vocab, batch, seq, past, seed=batch, left_pad=pad)
            with torch.no_grad():
                want = wrapper(**x)[0].numpy()
            got = np.asarray(exe({k: v for k, v in _feed(x, layout).items() if k in takes})["logits"])
            rows = [r for r in range(batch) if not (r == 0 and seq > 1)]
            np.testing.assert_allclose(got[rows], want[rows], atol=2e-5, rtol=1e-4, err_msg=backend)


SLOW = pytest.mark.slow
ARCHS = ["LlamaForCausalLM", "GPT2LMHeadModel", "DeepseekV3ForCausalLM", "MptForCausalLM",
         pytest.param("BambaForCausalLM", marks=SLOW),  # 9 s; test_a_state_space_hybrid_decodes_... keeps a hybrid
         "Lfm2ForCausalLM", "Gemma4ForCausalLM", "MiMoV2FlashForCausalLM", pytest.param("Mamba2ForCausalLM", marks=SLOW),
         *(pytest.param(a, marks=SLOW) for a in ("MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                                  "Phi3ForCausalLM", "GemmaForCausalLM", "GPTNeoXForCausalLM"))]


def captured_with_eager(arch: str):
    """A tiny ``arch`` captured with its cache, beside its eager reference: ``(graph, layout, wrapper, output names)``."""
    model = tiny_causal_lm(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_causal_lm(model)
        layout = cache_layout(model)
    return graph, layout, CausalLMWithPast(model, layout), ["logits", *layout.present_names()]


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_graph_matches_eager_at_prefill_and_decode(arch: str) -> None:
    graph, layout, wrapper, names = captured_with_eager(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(graph.outputs) == names
        assert graph.inputs[1].name == "attention_mask" and graph.inputs[1].shape == ("batch", "past_seq+seq")
        for i in (range(layout.layers) if layout.kv_layers is None else layout.kv_layers):
            heads, key, value = layout.layer_kv(i)
            assert graph.outputs[f"present.{i}.key"].shape == ("batch", heads, "past_seq+seq", key)
            assert graph.outputs[f"present.{i}.value"].shape == ("batch", heads, "past_seq+seq", value)
        for st in layout.states:  # a recurrent layer's state: one fixed size, whatever the length
            assert graph.outputs[f"present.{st.layer}.{st.kind}"].shape == ("batch", *st.shape)
        if arch == "DeepseekV3ForCausalLM":  # one head of the compressed keys/values, and the keys' rotary part
            assert (layout.kv_heads, *layout.dims) == (1, 16, 8)
        if arch == "BambaForCausalLM":  # a Mamba-2 layer (convolution and recurrent states), an attention layer
            assert layout.kv_layers == (1,) and [(st.layer, st.kind) for st in layout.states] == [(0, "conv"), (0, "recurrent")]
        if arch == "Mamba2ForCausalLM":  # no attention: the mask's width less seq is past_seq
            assert layout.kv_layers == () and len(layout.states) == 4 and graph.inputs[1].shape[1] == "past_seq+seq"
        if arch == "Gemma4ForCausalLM":  # full attention layers: one head of 32 (keys as values), windowed: two of 16
            assert layout.per_layer == ((2, 16, 16), (1, 32, 32)) * 2 and (layout.kv_heads, layout.head_dim) == (2, 16)
        elif arch == "MiMoV2FlashForCausalLM":  # read off the cache: the config has one head count and no value width
            assert layout.per_layer == ((4, 24, 16), (2, 24, 16)) and layout.dims == (24, 16)
        else:
            assert layout.per_layer == ()
        if arch == "Lfm2ForCausalLM":  # two short-convolution layers around an attention layer
            assert layout.kv_layers == (1,) and [(st.layer, st.kind) for st in layout.states] == [(0, "conv"), (2, "conv")]
        assert_outputs_like_eager(graph, layout, wrapper, names)


def assert_outputs_like_eager(graph, layout: CacheLayout, wrapper, names: list[str]) -> None:
    """Every output of ``graph`` (``names``: logits, then the presents) against ``wrapper`` (the eager model with its
    flat cache) in the numpy and ONNX Runtime backends, at a prefill with a left-padded row and at one decode step."""
    for backend in ("numpy", "onnxruntime"):
        exe = compile(graph, backend)
        for batch, seq, past, pad in [(2, 5, 0, 2), (3, 1, 6, 3)]:  # prefill (left-padded row), one decode step
            x = example_inputs(layout, 128, batch, seq, past, seed=batch, left_pad=pad)
            with torch.no_grad():
                want = wrapper(**x)
            got = exe(_feed(x, layout))
            for i, n in enumerate(names):
                np.testing.assert_allclose(got[n], want[i].numpy(), atol=2e-5, rtol=1e-4, err_msg=f"{backend} {n}")


def test_left_padded_rows_equal_unpadded_runs_and_decode_continues_them() -> None:
    model = tiny_causal_lm("LlamaForCausalLM")
    graph = capture_causal_lm(model)
    exe = compile(graph, "onnxruntime")
    layout = cache_layout(model)
    empty = [np.zeros((1, layout.kv_heads, 0, layout.head_dim), np.float32)] * (2 * layout.layers)

    def run(ids: list[list[int]], mask: np.ndarray, past: list[np.ndarray], start: int) -> dict[str, np.ndarray]:
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)[:, start:]
        feed = {"input_ids": np.array(ids), "attention_mask": mask, "position_ids": pos}
        feed.update(dict(zip(past_names(layout.layers), past, strict=True)))
        return exe(feed)

    long, short = [5, 9, 11, 3, 7], [8, 2, 6]
    alone = run([short], np.ones((1, 3), np.int64), empty, 0)
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]])
    batch_empty = [np.zeros((2, *e.shape[1:]), np.float32) for e in empty]
    both = run([long, [0, 0, *short]], mask, batch_empty, 0)
    np.testing.assert_allclose(both["logits"][1, 2:], alone["logits"][0], atol=1e-5)
    # one decode step from each cache: the padded row's next logits equal the unpadded row's
    nxt_alone = run([[4]], np.ones((1, 4), np.int64), [alone[n] for n in present_names(layout.layers)], 3)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    nxt_both = run([[1], [4]], mask2, [both[n] for n in present_names(layout.layers)], 5)
    np.testing.assert_allclose(nxt_both["logits"][1], nxt_alone["logits"][0], atol=1e-5)


def test_mask_that_does_not_cover_cache_and_tokens_is_refused() -> None:
    model = tiny_causal_lm("GPT2LMHeadModel")
    graph = capture_causal_lm(model)
    layout = cache_layout(model)
    x = _feed(example_inputs(layout, 128, 1, 2, 3), layout)
    x["attention_mask"] = np.ones((1, 4), np.int64)  # past 3 + seq 2 = 5
    for backend in ("numpy", "onnxruntime"):
        with pytest.raises(RuntimeInputError, match="attention_mask"):
            compile(graph, backend)(x)
    x = _feed(example_inputs(layout, 128, 1, 2, 3), layout)
    x["past_key_values.1.value"] = x["past_key_values.1.value"][:, :, :2]  # one layer's past shorter than the others
    with pytest.raises(RuntimeInputError, match=r"past_key_values\.1\.value"):
        compile(graph, "onnxruntime")(x)
    x = _feed(example_inputs(layout, 128, 1, 2, 3), layout)
    x["position_ids"] = x["position_ids"][:, :1]  # ids and positions of different lengths
    with pytest.raises(RuntimeInputError, match="position_ids"):
        compile(graph, "onnxruntime")(x)


def test_longrope_picks_its_frequency_set_per_row_inside_the_block() -> None:
    """Each row of a batch gets the cos/sin transformers gives it alone, below and past the switch; the
    module's own forward is back after the block."""
    from flora_graph.frontend.causal_lm import longrope_per_row

    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                  original_max_position_embeddings=16, pad_token_id=0,
                                  rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                "long_factor": [3.0 + i for i in range(8)]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Phi3ForCausalLM(cfg).eval()
    rotary, x = model.model.rotary_emb, torch.zeros(1, 1)
    rows = torch.stack([torch.arange(10, 22), torch.arange(0, 12)])  # past position 16; below it
    with torch.no_grad():
        alone = [rotary(x, r[None]) for r in rows]
        assert not torch.equal(alone[0][0][0, 1:2], rotary(x, torch.arange(12)[None])[0][0, -1:])  # the sets differ
        with longrope_per_row(model) as paths:
            assert paths == ["model.rotary_emb"]
            cos, sin = rotary(x, rows)
        for i, (c, s) in enumerate(alone):
            assert torch.equal(cos[i], c[0]) and torch.equal(sin[i], s[0])
        assert "forward" not in vars(rotary)
        assert not torch.equal(rotary(x, rows)[0][1], alone[1][0][0])  # transformers: the batch's set for both


@pytest.mark.parametrize("arch", ["BlenderbotForCausalLM", pytest.param("WhisperForCausalLM", marks=SLOW)])
def test_a_sequence_to_sequence_decoder_caches_its_own_layers_and_heads(arch: str) -> None:
    """A seq2seq model's decoder as a causal LM: its config's num_hidden_layers / num_attention_heads are the
    encoder's (1 layer, 2 heads here); the cache is the decoder's (3 layers of 4 heads), and the graph equals eager."""
    graph, layout, _, names = captured_with_eager(arch)
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (3, 4, 16) and list(graph.outputs) == names
    assert_logits_like_eager(tiny_causal_lm(arch), graph)


@pytest.mark.slow
def test_layers_reading_another_layers_cache_present_that_cache() -> None:
    """Gemma 3n's last layers attend to an earlier layer's keys and values and leave their own cache empty in
    transformers: their presents are the source layer's, so every layer's cache grows by the new tokens, and the
    graph still equals eager at prefill and decode."""
    from flora_graph.frontend.causal_lm import kv_shared_layers

    model = tiny_causal_lm("Gemma3nForCausalLM")
    layout = cache_layout(model)
    assert layout.shared == kv_shared_layers(model) == ((2, 0), (3, 1))  # by attention type: sliding, full
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_causal_lm(model)
    x = example_inputs(layout, 128, 2, 3, 4, seed=1)
    got = compile(graph, "onnxruntime")(_feed(x, layout))
    for layer, source in layout.shared:
        for kv in ("key", "value"):
            assert got[f"present.{layer}.{kv}"].shape[2] == 4 + 3
            np.testing.assert_array_equal(got[f"present.{layer}.{kv}"], got[f"present.{source}.{kv}"])
    assert_logits_like_eager(model, graph)


def test_a_state_space_hybrid_decodes_with_its_states_as_eager_does() -> None:
    """Bamba's Mamba-2 layer keeps a convolution state and a recurrent state: the graph takes them (zeros: an empty
    cache) and returns them, so one graph prefills and decodes; its logits step by step equal eager transformers'
    own cached generation (its cache, not the flat wrapper's), across scan chunks of 4."""
    model = tiny_causal_lm("BambaForCausalLM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_causal_lm(model)
        layout = cache_layout(model)
    exe = compile(graph, "onnxruntime")
    prompt = torch.tensor([[5, 9, 33, 70, 2, 17, 4, 8, 90, 11]])  # three chunks of the scan
    feed = {"input_ids": prompt.numpy(), "attention_mask": np.ones((1, 10), np.int64),
            "position_ids": np.arange(10)[None]}
    feed.update({n: np.zeros((1, *layout.state_shape(i, k)) if k in ("conv", "recurrent") else
                             (1, layout.kv_heads, 0, layout.head_dim), np.float32)
                 for n, (i, k) in zip(layout.past_names(), layout.entries(), strict=True)})
    with torch.no_grad():
        want = model(input_ids=prompt, use_cache=True)
        cache, ids = want.past_key_values, prompt
        for step in range(4):
            got = exe(feed)
            np.testing.assert_allclose(got["logits"][:, -1], want.logits[:, -1].numpy(), atol=2e-5, rtol=1e-4,
                                       err_msg=f"step {step}")
            nxt = want.logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], 1)
            want = model(input_ids=nxt, position_ids=torch.tensor([[ids.shape[1] - 1]]), cache=cache, use_cache=True)
            feed = {"input_ids": nxt.numpy(), "attention_mask": np.ones((1, ids.shape[1]), np.int64),
                    "position_ids": np.array([[ids.shape[1] - 1]])}
            feed.update(zip(layout.past_names(), (got[n] for n in layout.present_names()), strict=True))
