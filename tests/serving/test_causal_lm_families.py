"""Causal LM families beyond those ``tests/frontend/test_causal_lm.py`` configures by hand: each built from its
config class's own defaults with every size the config has made small, exported as a GenAI package and decoded
by the Generator, against eager transformers' greedy tokens; and the package's model over the whole sequence in one
call against eager's logits at every position.

Two things of the random models are set apart from the families' code: a zero-initialized matrix (an expert router's
``gate``, which transformers initializes to zeros) gets small random values, so that no two experts tie and the
choice between them is not up to each runtime's tie-breaking; and the generation config's forced end-of-text token
(BART-like decoders'), which a decoder package does not apply (its export says so), is dropped from eager's.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.serving.genai import export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import eager_greedy  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             vocab_size=128, head_dim=16, max_position_embeddings=256, n_embd=64, n_layer=2, n_head=4, d_model=64,
             n_layers=2, n_heads=4, num_layers=2, num_heads=4, ffn_dim=96, decoder_layers=2, decoder_attention_heads=4,
             decoder_ffn_dim=96, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96,
             moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, n_positions=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)
"""Small sizes, each given to a config class that has the attribute."""

_LATENT = dict(num_key_value_heads=4, head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
               topk_group=1, first_k_dense_replace=1, n_shared_experts=1)
"""Multi-head latent attention (DeepSeek-V3-like) at small sizes: keys and values as many heads as queries, as the
checkpoints have them, and rotary dims that agree with ``head_dim``."""

_SPARSE = dict(_LATENT, index_head_dim=16, index_n_heads=16, index_topk=4)
"""DeepSeek Sparse Attention (DeepSeek-V3.2-like) over latent attention: an indexer that keeps the best 4 keys of each
query, fewer than the test's tokens, so that it selects; 16 indexer heads, so that no two keys tie at a score of 0
(each head's score is a ReLU) and the choice between tied keys is not up to each runtime's tie-breaking."""

_INKLING2 = dict(num_hidden_layers=4, layer_types=["hybrid_sliding", "hybrid"] * 2, unpadded_vocab_size=128,
                 swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=4,
                 rel_extent=8, log_scaling_n_floor=4, n_layers_per_attn_res_block=2)
"""Inkling 2 at small sizes: its windowed and full layers alternating, a window and a relative position bias shorter
than the test's tokens, its queries' logarithmic scaling from position 4 on, blocks of two layers for its attention
residuals, and an output layer as wide as the vocabulary (the checkpoints' is narrower, padded on save)."""

OVERRIDES = {
    "AXK1ForCausalLM": _LATENT,
    "AXK2ForCausalLM": _SPARSE,
    "BailingHybridForCausalLM": dict(_LATENT, layer_types=["linear_attention", "full_attention"],
                                     mlp_layer_types=["dense", "sparse"], num_experts_per_token=2, linear_num_heads=4,
                                     linear_head_dim=16),
    "DeepseekV32ForCausalLM": dict(_SPARSE, mlp_layer_types=["dense", "sparse"]),
    "Dots3NoteForCausalLM": _SPARSE,
    "GlmMoeDsaForCausalLM": _SPARSE,
    "HYV4ForCausalLM": _SPARSE,
    "CohereCompassForCausalLM": dict(layer_types=["full_attention", "sliding_attention"], sliding_window=4,
                                     rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                                      for t in ("full_attention", "sliding_attention")}),
    "DbrxForCausalLM": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0), max_seq_len=256,
                            ffn_config=dict(ffn_hidden_size=96, moe_num_experts=4, moe_top_k=2, hidden_size=64)),
    "Dots1ForCausalLM": dict(n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                             layer_types=["full_attention", "sliding_attention"], sliding_window=4, max_window_layers=1),
    "DoryForCausalLM": dict(num_hidden_layers=4, n_input_layers=1, n_recurrent_layers=2, n_output_layers=1,
                            n_recurrent_loops=2),
    "GPTNeoForCausalLM": dict(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=4),
    "InklingForCausalLM": dict(sliding_window_size=4),
    "Inkling2ForCausalLM": _INKLING2,
    "Kolibri1_1ForCausalLM": dict(num_hidden_layers=3, layer_types=["sliding_attention", "indexed_attention",
                                                                    "indexed_attention"], sliding_window=4,
                                  index_layers=[1], kv_source_layers=[0, 1, 1], mlp_only_layers=[0],
                                  mlp_only_intermediate_size=96, index_num_heads=2, index_topk=3, index_pool_size=6,
                                  index_compression=2, index_num_local_tokens=2, index_num_sink_tokens=1),
    "Inkling2LoopForCausalLM": dict(_INKLING2, loop_layer_index_start=2, loop_layer_index_end=4, loop_num_passes=2,
                                    loop_gate_rank=8),
    "LongcatFlashForCausalLM": _LATENT,
    "MiniMaxForCausalLM": dict(layer_types=["linear_attention", "full_attention"], block_size=4),
    "MllamaForCausalLM": dict(num_hidden_layers=3, cross_attention_layers=[1]),
    "RwkvForCausalLM": dict(attention_hidden_size=64, context_length=256),
    "Qwen4ExpForCausalLM": dict(layer_types=["linear_attention", "indexed_attention"], linear_key_head_dim=16,
                                linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                shared_expert_intermediate_size=32, hc_lowrank=8, indexer_n_heads=16,
                                indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2,
                                ple_layer_ids=[1], ple_embed_dim=32, heads_per_ngram=2, ngram_vocab_size_base=500),
    "RecurrentGemmaForCausalLM": dict(num_hidden_layers=3, lru_width=64, attention_window_size=4),
    "xLSTMForCausalLM": dict(hidden_size=128, embedding_dim=128, num_blocks=2, mode="inference"),
    "XmodForCausalLM": dict(languages=("en_XX", "de_DE"), default_language="de_DE"),
    "YoutuForCausalLM": _LATENT,
    "ZambaForCausalLM": dict(layers_block_type=["linear_attention", "hybrid"], attention_hidden_size=128,
                             attention_head_dim=32, num_key_value_heads=4, mamba_dt_rank=8, mamba_d_state=8,
                             n_mamba_heads=2, use_mamba_kernels=False, attn_layer_period=2, attn_layer_offset=1),
    "ZayaForCausalLM": dict(layer_types=["hybrid", "hybrid"], router_hidden_size=32, num_experts=4,
                            moe_intermediate_size=32, num_experts_per_tok=1),
    "Zamba2ForCausalLM": dict(layers_block_type=["linear_attention", "hybrid"], hybrid_layer_ids=[1], mamba_d_state=16,
                              n_mamba_heads=4, mamba_headdim=32, attention_head_dim=32, kv_channels=16,
                              attention_hidden_size=128, num_query_groups=4, num_key_value_heads=4,
                              use_mamba_kernels=False, chunk_size=8),
}
"""Sizes a family's config checks against each other (layer patterns, windows shorter than the test's tokens,
latent attention's head dims, Bailing's hybrid of a linear attention layer and a latent attention one, DBRX's nested attention and experts configs, Inkling 2 Loop's second pass over its last
two layers (their cache layers kept apart from the first pass's), Kolibri 1.1's indexed layers (the second reads the
first's keys and values and pool) with budgets below the test's tokens, so that they select, rotary settings per layer type, MiniMax's lightning attention in blocks of 4, so
that the prompt spans two; Qwen4-Exp's QSA indexer keeping 2 blocks of 2 keys and the keys past them, fewer than the
test's tokens, so that it selects, with 16 indexer heads, so that no two blocks tie at a score of 0, and its per-layer n-gram embeddings on its
delta-rule layer, their hashed vocabularies small; RecurrentGemma's two recurrent blocks before its attention layer, Mllama's cross-attention
layer between two self-attention layers; RWKV's time-mixing width; xLSTM's
widths, which its config rounds up to 64 for its cache and its layers do not), over :data:`SMALL` (given to the text config of a multimodal family)."""

FAMILIES = [
    "AXK1ForCausalLM", "AXK2ForCausalLM", "DeepseekV32ForCausalLM", "Dots3NoteForCausalLM", "GlmMoeDsaForCausalLM",
    "HYV4ForCausalLM", "AfmoeForCausalLM", "Apertus1p5TextForCausalLM", "AriaTextForCausalLM", "BailingHybridForCausalLM",
    "BartForCausalLM", "BeamForCausalLM",
    "BertGenerationDecoder", "BertLMHeadModel", "BigBirdForCausalLM", "BigBirdPegasusForCausalLM", "BioGptForCausalLM",
    "BlenderbotSmallForCausalLM", "CTRLLMHeadModel", "CamembertForCausalLM", "CohereCompassForCausalLM", "Cohere2MoeForCausalLM",
    "CwmForCausalLM", "Data2VecTextForCausalLM", "DbrxForCausalLM", "DiffLlamaForCausalLM", "DogeForCausalLM", "DoryForCausalLM", "Dots1ForCausalLM", "ElectraForCausalLM",
    "Emu3ForCausalLM", "ErgoForCausalLM", "GitForCausalLM", "Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM", "ErnieForCausalLM", "ExaoneMoeForCausalLM",
    "FlexOlmoForCausalLM", "FlintForCausalLM", "GPTNeoForCausalLM", "GPTNeoXJapaneseForCausalLM", "Glm4MoeForCausalLM", "GlmForCausalLM",
    "GraniteMoeSWAForCausalLM", "GraniteMoeSharedForCausalLM", "GraniteSWAForCausalLM", "HYV3ForCausalLM",
    "HeliumForCausalLM", "HrmTextForCausalLM", "HunYuanMoEV1ForCausalLM", "HyperCLOVAXForCausalLM", "InklingForCausalLM",
    "Inkling2ForCausalLM", "Inkling2LoopForCausalLM",
    "Jais2ForCausalLM", "JetMoeForCausalLM", "Kolibri1ForCausalLM", "Kolibri1_1ForCausalLM", "LagunaForCausalLM", "Lfm3ForCausalLM", "LongcatFlashForCausalLM", "MBartForCausalLM",
    "MarianForCausalLM", "MegatronBertForCausalLM", "MiniMaxForCausalLM", "MellumForCausalLM", "MllamaForCausalLM", "MiniCPM5MoeForCausalLM",
    "MiniMaxM2ForCausalLM", "MiniMaxM3VLForCausalLM", "Ministral3ForCausalLM", "MinistralForCausalLM",
    "ModernBertDecoderForCausalLM", "MoshiForCausalLM", "MvpForCausalLM", "NanoChatForCausalLM", "OlmoHybridForCausalLM",
    "OlmoeForCausalLM", "PLBartForCausalLM", "PegasusForCausalLM", "PersimmonForCausalLM", "Phi4MultimodalForCausalLM", "PhimoeForCausalLM", "Qwen4ExpForCausalLM",
    "RecurrentGemmaForCausalLM", "RemBertForCausalLM", "RoCBertForCausalLM", "RoFormerForCausalLM", "RobertaForCausalLM", "RobertaPreLayerNormForCausalLM", "RwkvForCausalLM",
    "SolarOpenForCausalLM", "TrOCRForCausalLM", "VaultGemmaForCausalLM", "XGLMForCausalLM", "XLMRobertaForCausalLM",
    "XLMRobertaXLForCausalLM", "XmodForCausalLM", "YoutuForCausalLM", "Zamba2ForCausalLM", "ZambaForCausalLM", "ZayaForCausalLM",
    "xLSTMForCausalLM",
]


def _has(config, key: str) -> bool:
    """Whether ``config`` has ``key`` to set: a heterogeneous config (one per layer) refuses to read a per-layer one
    globally; a property without a setter (xLSTM's head dims, worked out from its sizes) is not set."""
    prop = getattr(type(config), key, None)
    if isinstance(prop, property) and prop.fset is None:
        return False
    try:
        return hasattr(config, key)
    except Exception as exc:  # transformers' AmbiguousGlobalPerLayerAttributeError: the config has it, per layer
        return "per-layer attribute" in str(exc)


def small_model(arch: str):
    """A seeded random ``arch`` of small sizes (:data:`SMALL`, then :data:`OVERRIDES`), in eval mode; zero matrices
    made small and random."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = next(k for k, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
                      if (v if isinstance(v, str) else v[0]) == arch)
    config_cls = type(CONFIG_MAPPING[model_type]())
    defaults = config_cls()
    text = getattr(defaults, "text_config", None)
    if text is not None and not hasattr(defaults, "hidden_size"):  # a multimodal config: its causal LM is the text part
        config_cls, defaults = type(text), text
    config = config_cls(**{**{k: v for k, v in SMALL.items() if _has(defaults, k)}, **OVERRIDES.get(arch, {})})
    if hasattr(config, "is_decoder"):  # the encoder families' causal LM heads
        config.is_decoder = True
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and p.dtype.is_floating_point and not p.any():
                p.normal_(0, 0.5)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_family_package_decodes_eager_greedy_tokens(arch: str, tmp_path: Path) -> None:
    model = small_model(arch)
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", model.config.vocab_size)
    model.generation_config.forced_eos_token_id = None
    prompt = [1, 5, 9, 33, 70]
    want = eager_greedy(model, prompt, 8, min_new_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg")
    assert Generator(tmp_path / "pkg").generate([prompt], max_new_tokens=8, min_new_tokens=8)[0] == want
    # every position's logits of the whole sequence in one call, which tokens alone may not tell apart (a window that
    # drops keys changes the logits without always changing the argmax)
    ids = [*prompt, *want]
    kwargs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if "position_ids" in inspect.signature(model.forward).parameters:  # as generate() gives them: from 0 (RoBERTa-like
        kwargs["position_ids"] = torch.arange(len(ids))[None]  # decoders' own forward would start at pad id + 1)
    with torch.no_grad():
        eager = model(**kwargs).logits
    np.testing.assert_allclose(prefill_logits(tmp_path / "pkg", ids), eager[0].numpy(), rtol=0, atol=1e-4)


def prefill_logits(package: Path, ids: list[int]) -> np.ndarray:
    """``[len(ids), vocab]``: the logits of ``package``'s model over ``ids`` from an empty cache, in one ONNX Runtime
    call (keys and values of no past positions, recurrent states of zeros)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    dtypes = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}
    n = len(ids)
    feeds = {}
    for i in sess.get_inputs():
        dt = dtypes[i.type]
        if i.name == "input_ids":
            feeds[i.name] = np.array([ids], dt)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, n), dt)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(n, dtype=dt)[None]
        elif i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dt)
        else:  # a recurrent layer's fixed-size state
            feeds[i.name] = np.zeros([1, *i.shape[1:]], dt)
    return sess.run(["logits"], feeds)[0][0]
