"""Packages for every supported causal LM: GenAI (where it has a model type) and the Generator equal eager greedy."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import pytest
import torch

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")

from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.serving.genai import export_genai, genai_type  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.frontend.test_causal_lm import tiny_causal_lm  # noqa: E402
from tests.serving.genai_package import eager_greedy, genai_tokens, tiny_with_adapter  # noqa: E402

PROMPT, NEW = [1, 5, 9, 33, 70], 8
FIRST = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
         "GemmaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM"]
MORE = ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
        "PhiForCausalLM", "NemotronForCausalLM", "SmolLM3ForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM",
        "CohereForCausalLM", "GPTJForCausalLM", "OPTForCausalLM", "BloomForCausalLM", "FalconForCausalLM",
        "MixtralForCausalLM", "Qwen2MoeForCausalLM"]
"""Causal LMs beyond the first eight: GenAI's own types (Gemma 2 and 3 with sliding windows, Granite, OLMo, Phi,
Nemotron, SmolLM3) and others as its generic ``decoder`` type; OPT's MLP and Qwen2-MoE's shared expert run on
flattened ``[batch*seq, hidden]`` rows (per-row slots between reshapes)."""
NEWER = ["GptOssForCausalLM", "GraniteMoeForCausalLM", "ArceeForCausalLM", "ApertusForCausalLM", "SeedOssForCausalLM",
         "HunYuanDenseV1ForCausalLM", "Exaone4ForCausalLM", "Olmo3ForCausalLM", "Cohere2ForCausalLM",
         "BitNetForCausalLM", "Glm4ForCausalLM", "Gemma3nForCausalLM", "GPTBigCodeForCausalLM", "CodeGenForCausalLM",
         "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Llama4ForCausalLM", "MiniCPM3ForCausalLM",
         "Glm4MoeLiteForCausalLM", "MptForCausalLM", "BambaForCausalLM", "GraniteMoeHybridForCausalLM",
         "FalconH1ForCausalLM", "NemotronHForCausalLM", "Lfm2ForCausalLM", "Mamba2ForCausalLM", "Qwen3_5ForCausalLM",
         "Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM", "KimiLinearForCausalLM", "MambaForCausalLM",
         "FalconMambaForCausalLM", "JambaForCausalLM", "Gemma4ForCausalLM", "MiMoV2FlashForCausalLM", "Lfm2MoeForCausalLM"]
"""More recent ones: gpt-oss (attention sinks, alternating sliding windows, biased experts), Granite-MoE, Arcee,
Apertus, Seed-OSS, Hunyuan dense, EXAONE 4 and OLMo 3 and Cohere 2 (sliding windows), BitNet, GLM-4, Gemma 3n (its
text model: per-layer inputs, AltUp, LAuReL, layers that read earlier layers' cache), GPT-BigCode (StarCoder's
multi-query attention), CodeGen (a fused qkv in a mixed head order), Llama 4 (complex rotary, chunked attention) and
the multi-head latent attention of DeepSeek-V2 (complex rotary) and V3, MiniCPM3 and GLM-4 MoE lite, whose packages the
Generator serves (GenAI sizes cached keys and values alike), MPT (ALiBi over a bias built for its maximum
length), and the hybrids whose state-space (Bamba, Granite 4, Falcon-H1, Nemotron-H) or convolution (LFM2) layers keep
fixed-size states in the cache, Mamba-2 (state-space layers alone) and Qwen3.5, Qwen3.5-MoE, Qwen3-Next and Kimi
Linear (gated delta rule layers, Kimi's with a decay per key channel beside latent attention: one op over any
length), and the Mamba-1 models (Mamba,
Falcon-Mamba, and Jamba beside attention and experts: their selective scan one op), which the Generator serves too,
and Gemma 4 (GenAI's ``gemma4_text``: its full attention layers' heads wider and fewer than its windowed layers',
so each layer's cache has its own shape) and MiMo-V2-Flash (values narrower than keys, twice the heads in its
windowed layers, which have attention sinks: the Generator's), and LFM2-MoE (short convolutions, experts)."""
FAST = {"Qwen3ForCausalLM", "GPT2LMHeadModel"}  # no BOS token id; GenAI's generic type
TARGETS = {arch: ["q_proj", "k_proj", "v_proj", "o_proj"]  # all-linear reaches their experts' tensors
           for arch in ("MixtralForCausalLM", "GptOssForCausalLM", "MiMoV2FlashForCausalLM")}
GENERATOR_ONLY = {arch: "keys 16 wide and values 8 wide"  # latent attention: GenAI's one head_size
                  for arch in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "MiniCPM3ForCausalLM",
                               "Glm4MoeLiteForCausalLM")}
GENERATOR_ONLY["MiMoV2FlashForCausalLM"] = "keys 24 wide and values 16 wide"
GENERATOR_ONLY["Lfm2MoeForCausalLM"] = "convolution"
GENERATOR_ONLY.update({arch: "convolution" for arch in ("BambaForCausalLM", "GraniteMoeHybridForCausalLM",
                                                        "FalconH1ForCausalLM", "NemotronHForCausalLM", "Lfm2ForCausalLM",
                                                        "Mamba2ForCausalLM", "Qwen3_5ForCausalLM",
                                                        "Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM",
                                                        "KimiLinearForCausalLM", "MambaForCausalLM",
                                                        "FalconMambaForCausalLM", "JambaForCausalLM")})
TARGETS.update({arch: ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]  # MLA's
                for arch in ("DeepseekV3ForCausalLM", "MiniCPM3ForCausalLM", "Glm4MoeLiteForCausalLM")})
TARGETS.update({arch: ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj"]  # PEFT refuses their Mamba out_proj
                for arch in ("FalconH1ForCausalLM", "NemotronHForCausalLM")})
TARGETS["Mamba2ForCausalLM"] = ["in_proj"]
TARGETS["Lfm2MoeForCausalLM"] = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj"]  # its experts: 3-d tensors
TARGETS.update({arch: ["in_proj", "x_proj", "dt_proj"]  # PEFT refuses the Mamba out_proj; the layer reads dt_proj's
                for arch in ("MambaForCausalLM", "FalconMambaForCausalLM")})  # weight: no part in eager PEFT, nor here
TARGETS["JambaForCausalLM"] = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj"]
TARGETS["Qwen3NextForCausalLM"] = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "out_proj"]
TARGETS["Qwen3_5MoeForCausalLM"] = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "out_proj"]
TARGETS["KimiLinearForCausalLM"] = ["q_proj", "k_proj", "v_proj", "o_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
TARGETS["DeepseekV2ForCausalLM"] = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
TARGETS["Llama4ForCausalLM"] = ["q_proj", "k_proj", "v_proj", "o_proj"]



def _package(arch: str, tmp_path: Path, **options):
    """A tiny ``arch`` saved (with a tokenizer) under ``tmp_path / "base"`` and its package at ``tmp_path / "pkg"``:
    ``(model, report)``."""
    model = tiny_causal_lm(arch)
    model.config.eos_token_id = 2
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, export_genai(tmp_path / "base", tmp_path / "pkg", **options)


@pytest.mark.parametrize("arch", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in FIRST])
def test_package_generates_eager_greedy_tokens(arch: str, tmp_path: Path) -> None:
    model, report = _package(arch, tmp_path)
    want = eager_greedy(model, PROMPT, NEW, min_new_tokens=NEW)
    written = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())["model"]["type"]
    assert written == report.model_type == {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                                            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                                            "Phi3ForCausalLM": "phi3", "GemmaForCausalLM": "gemma"}.get(arch, "decoder")
    # end-of-text held back until NEW tokens, as eager's min_new_tokens and GenAI's min_length do
    assert Generator(tmp_path / "pkg").generate([PROMPT], max_new_tokens=NEW, min_new_tokens=NEW)[0] == want
    gen_model = og.Model(str(tmp_path / "pkg"))
    params = og.GeneratorParams(gen_model)
    params.set_search_options(max_length=len(PROMPT) + NEW, min_length=len(PROMPT) + NEW, do_sample=False)
    gen = og.Generator(gen_model, params)
    gen.append_tokens(PROMPT)
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)][len(PROMPT):] == want


FAST_ADAPTED = {"Qwen2ForCausalLM", "Gemma2ForCausalLM", "OPTForCausalLM"}  # biased q/k/v packed with their biases;
# sliding windows and soft-capping; flattened rows (Gemma 4's cache shape per layer: its cache-graph test)


@pytest.mark.parametrize("arch", [a if a in FAST_ADAPTED else pytest.param(a, marks=pytest.mark.slow)
                                  for a in [*FIRST, *MORE, *NEWER]])
def test_adapted_package_generates_eager_peft_greedy_tokens(arch: str, tmp_path: Path) -> None:
    """With a PEFT adapter on every linear layer (nonzero ``B``), sibling slots packed: the Generator (adapter
    and base) and GenAI give eager PEFT's greedy tokens."""
    model, adapted = tiny_with_adapter(arch, tmp_path, TARGETS.get(arch, "all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_genai(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"})
        with torch.no_grad():  # pure greedy: no EOS (the Generator runs with stop_tokens=[])
            for m in (model, adapted.base_model.model):
                m.generation_config.eos_token_id = None
            want, plain = eager_greedy(adapted, PROMPT, NEW), eager_greedy(model, PROMPT, NEW)
            ids = torch.tensor([PROMPT])
            assert (adapted(input_ids=ids).logits - model(ids).logits).abs().max() > 1e-3  # the adapter matters
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT], adapters="ad", max_new_tokens=NEW, stop_tokens=[])[0] == want
    assert gen.generate([PROMPT, PROMPT], adapters=[None, "ad"], max_new_tokens=NEW, stop_tokens=[]) == [plain, want]
    assert report.model_type == genai_type(arch)
    if arch in ("MambaForCausalLM", "FalconMambaForCausalLM"):  # its dt_proj adapter: read by neither model
        assert any("take no part" in n and "dt_proj" in n for n in report.notes)
    if arch in GENERATOR_ONLY:  # the report says why GenAI cannot run it; the Generator's tokens are checked above
        assert report.not_for_genai is not None and GENERATOR_ONLY[arch] in report.not_for_genai
        return
    assert report.not_for_genai is None
    gen_model = og.Model(str(tmp_path / "pkg"))
    adapters = og.Adapters(gen_model)
    adapters.load(str(report.adapters["ad"]), "ad")
    params = og.GeneratorParams(gen_model)
    params.set_search_options(max_length=len(PROMPT) + NEW, min_length=len(PROMPT) + NEW, do_sample=False)
    g = og.Generator(gen_model, params)
    g.set_active_adapter(adapters, "ad")
    g.append_tokens(PROMPT)
    while not g.is_done():
        g.generate_next_token()
    ends = [i for i, t in enumerate(want) if t in gen.eos]
    cut = ends[0] if ends else NEW  # GenAI's min_length forbids end-of-text ids: equal up to the first
    assert [int(t) for t in g.get_sequence(0)][len(PROMPT):][:cut] == want[:cut]


@pytest.mark.parametrize(("arch", "right"), [("Qwen3ForCausalLM", True), ("LlamaForCausalLM", True),
                                             ("LlamaForCausalLM", False),
                                             *(pytest.param(a, r, marks=pytest.mark.slow) for a, r in (
                                                 ("OPTForCausalLM", True), ("Qwen2MoeForCausalLM", True),
                                                 ("BloomForCausalLM", False), ("Gemma3ForCausalLM", False)))])
def test_batched_rows_of_different_lengths_equal_their_single_runs_on_either_cache_padding(arch: str, right: bool,
                                                                                            tmp_path: Path) -> None:
    """With ONNX Runtime's contrib ops, attention becomes GroupQueryAttention (right-padded caches shared by
    past and present; GenAI shares its buffers too), in 3-D (Llama) or 4-D (Qwen3, caches concatenated
    outside); in standard ONNX (``contrib=False``) the caches are left-padded: either way rows of
    different lengths, joining and leaving (two in the same step, from between rows that stay), decode as they
    do alone."""
    _package(arch, tmp_path, contrib=right)
    gen = Generator(tmp_path / "pkg")
    assert gen.right_padded is right
    assert json.loads((tmp_path / "pkg" / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is right
    prompts = [PROMPT, [1, 7, 3], [1, 100, 101, 102, 103, 104, 105, 106, 107], [1, 9, 8, 7, 6]]
    news = (10, 4, 7, 4)
    alone = [gen.generate([p], max_new_tokens=n, stop_tokens=[])[0] for p, n in zip(prompts, news, strict=True)]
    batch = gen.batch()
    rows = [batch.add(prompts[0], max_new_tokens=10, stop_tokens=[])]
    batch.step()
    rows.append(batch.add(prompts[1], max_new_tokens=4, stop_tokens=[]))  # leaves first: the cache is trimmed
    rows.append(batch.add(prompts[2], max_new_tokens=7, stop_tokens=[]))  # the longest history
    rows.append(batch.add(prompts[3], max_new_tokens=4, stop_tokens=[]))  # leaves with the second row
    sizes = []
    while batch.active:
        batch.step()
        sizes.append(len(batch.active))
    assert sizes[:3] == [4, 4, 2]  # rows 1 and 3 left in one step; rows 0 and 2 went on
    assert [batch.row(r).generated for r in rows] == alone


@pytest.mark.parametrize("contrib", [True, False])  # right-padded caches (GroupQueryAttention) or left-padded
def test_longrope_package_switches_frequency_sets_where_eager_does(contrib: bool, tmp_path: Path) -> None:
    """Phi-3 128k, Phi-3.5-mini and Phi-4-mini scale their rotary by ``longrope``: a call takes the long
    frequency set once its positions pass ``original_max_position_embeddings`` (writing the choice into a
    buffer first: state nothing reads across calls, captured without it), and transformers' ``generate()``
    computes the cache again from all the tokens there. The package (base and an adapter) gives eager's greedy
    tokens in the Generator, crossing in the prompt and while decoding, alone and next to other rows (each row
    picks its set); GenAI recomputes only at 4097 tokens (the real models' point), so here it matches until
    the crossing."""
    import peft
    import transformers

    from flora_graph.serving.genai import REFILL_KEY

    short = [1.0 + 0.1 * i for i in range(8)]

    def phi3(long: list[float]):
        return transformers.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       original_max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=0, initializer_range=0.1,  # tokens that follow the positions
                                       rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long})

    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(phi3([2.0 + 0.5 * i for i in range(8)])).eval()
    never = transformers.Phi3ForCausalLM(phi3(short)).eval()  # the same weights, one frequency set
    never.load_state_dict(model.state_dict())
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base"),
                                      peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for mod in adapted.modules():
            if "default" in getattr(mod, "lora_B", {}):
                torch.nn.init.normal_(mod.lora_B["default"].weight, std=0.1)
        adapted.save_pretrained(tmp_path / "ad")
        adapted.eval()
        export_genai(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"}, contrib=contrib)
    gen, new = Generator(tmp_path / "pkg"), 24
    assert gen.refill_at == 32 and gen.right_padded is contrib
    for name in ("model.onnx", "mixed.onnx"):
        props = {p.key: p.value for p in onnx.load(str(tmp_path / "pkg" / name), load_external_data=False).metadata_props}
        assert props[REFILL_KEY] == "32", name
    gen_model = og.Model(str(tmp_path / "pkg"))
    loaded = og.Adapters(gen_model)
    loaded.load(str(tmp_path / "pkg" / "adapters" / "ad.onnx_adapter"), "ad")

    def eager(m, prompt: list[int]) -> list[int]:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return m.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)[0, len(prompt):].tolist()

    crossing, past = [1, *range(5, 20)], [1, *range(5, 45)]  # past position 32 while decoding; in the prompt
    for prompt in (crossing, past):
        for adapter, m in ((None, model), ("ad", adapted)):
            want = eager(m, prompt)
            if adapter is None:
                assert eager(never, prompt) != want  # the switch shows in the tokens
            assert gen.generate([prompt], adapters=adapter, max_new_tokens=new, stop_tokens=[])[0] == want, adapter
            upto = 32 - len(prompt) + 1 if prompt is crossing else new
            assert genai_tokens(gen_model, prompt, new, loaded, adapter)[:upto] == want[:upto], adapter
    # rows refilled in one step, one with the adapter and one without (the mixed model): each keeps its tokens
    other = [1, *range(30, 45)]
    got = gen.generate([crossing, other], adapters=["ad", None], max_new_tokens=new, stop_tokens=[])
    assert got == [eager(adapted, crossing), eager(model, other)]
    # a row that passes the point while another decodes on below it: each row picks its own set, so each
    # keeps the tokens it gets alone (transformers' batched forward would give both the batch's set)
    got = gen.generate([crossing, [1, 7, 3]], adapters="ad", max_new_tokens=new, stop_tokens=[])
    assert got == [eager(adapted, crossing), eager(adapted, [1, 7, 3])]


@pytest.mark.parametrize(("arch", "contrib"), [
    ("LlamaForCausalLM", True), ("Gemma2ForCausalLM", True),
    *(pytest.param(a, c, marks=pytest.mark.slow) for a, c in (("Gemma3ForCausalLM", True), ("Gemma3ForCausalLM", False),
                                                              ("GPT2LMHeadModel", True)))])
def test_genai_batch_of_prompts_of_different_lengths_gives_each_its_own_tokens(arch: str, contrib: bool,
                                                                               tmp_path: Path) -> None:
    """GenAI pads a batch of prompts on the right (its ``PadInputs``), so a shorter row's new tokens follow its
    padding: each row still gets its tokens alone, on GroupQueryAttention packages (Llama; Gemma 3's sliding
    window as the kernel's local window) and on standard attention (GPT-2; Gemma 2, whose soft-capped attention
    stays standard, and Gemma 3 without contrib ops: their sliding windows count token positions, not cache
    slots; windows of 3 here, so they slide within the prompt)."""
    import numpy as np

    model, _ = _package(arch, tmp_path, contrib=contrib)
    prompts, new = [[1, 5, 9, 33, 70, 12, 13], [1, 7, 3]], 6
    want = [eager_greedy(model, p, new, min_new_tokens=new) for p in prompts]
    gen_model = og.Model(str(tmp_path / "pkg"))
    pad = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())["model"]["pad_token_id"]
    assert all(pad not in p for p in prompts)
    width = max(map(len, prompts))
    params = og.GeneratorParams(gen_model)
    params.set_search_options(max_length=width + new, min_length=width + new, do_sample=False, batch_size=len(prompts))
    g = og.Generator(gen_model, params)
    g.append_tokens(np.array([p + [pad] * (width - len(p)) for p in prompts], dtype=np.int32))
    while not g.is_done():
        g.generate_next_token()
    assert [[int(t) for t in g.get_sequence(i)][width:width + new] for i in range(len(prompts))] == want


def _greedy_package(arch: str, tmp_path: Path):
    """A tiny ``arch`` with a PEFT adapter (``tiny_with_adapter``), its package at ``tmp_path / "pkg"`` (adapter
    ``ad``): ``(model, adapted)``, both generating without an end-of-text token."""
    model, adapted = tiny_with_adapter(arch, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"})
    for m in (model, adapted.base_model.model):
        m.generation_config.eos_token_id = None
    return model, adapted


def test_hybrid_rows_of_different_lengths_join_and_leave_as_eager_alone(tmp_path: Path) -> None:
    """Bamba (a Mamba-2 layer, an attention layer): rows of different prompt lengths, adapter and base mixed, join
    and leave between steps; the batch left-pads keys and values, stacks the rows' fixed-size states, trims the
    padding a long row leaves behind, and each row's tokens equal eager PEFT's for it alone."""
    model, adapted = _greedy_package("BambaForCausalLM", tmp_path)
    long, short, mid = [1, 5, 9, 33, 70, 4, 8, 21, 17, 3, 60], [7, 12], [44, 2, 90, 13, 5]
    batch = Generator(tmp_path / "pkg").batch()
    a = batch.add(long, adapter="ad", max_new_tokens=10, stop_tokens=[])
    for _ in range(2):
        batch.step()
    b = batch.add(short, max_new_tokens=10, stop_tokens=[])  # joins a longer history: its keys padded on the left
    batch.step()
    c = batch.add(mid, adapter="ad", max_new_tokens=5, stop_tokens=[])
    batch.step()
    batch.remove(a)  # the longest leaves: the others' padding is trimmed
    while batch.active:
        batch.step()
    assert batch.row(a).generated == eager_greedy(adapted, long, 10)[: len(batch.row(a).generated)]
    assert batch.row(b).generated == eager_greedy(model, short, 10)
    assert batch.row(c).generated == eager_greedy(adapted, mid, 5)


def test_linear_attention_beside_a_sliding_window_decodes_as_eager(tmp_path: Path) -> None:
    """LaraMini (a gated delta-rule layer, then a sliding-window layer of 3 tokens, the only one with rotary
    embeddings): decoding past the window gives eager's tokens, base and adapter, rows of different lengths in one
    batch. The sliding-window mask once took its query positions from the linear layer's token count, which the
    exported cache does not carry, so every decode step queried position 0."""
    model, adapted = _greedy_package("LaraMiniForCausalLM", tmp_path)
    gen = Generator(tmp_path / "pkg")
    prompts = [[1, 5, 9, 33, 70], [7, 12]]
    assert gen.generate(prompts, adapters=["ad", None], max_new_tokens=10, min_new_tokens=10) == \
        [eager_greedy(adapted, prompts[0], 10, min_new_tokens=10), eager_greedy(model, prompts[1], 10, min_new_tokens=10)]


@pytest.mark.slow
def test_a_long_prompt_prefills_in_one_call_or_in_pieces_where_the_model_bounds_a_call(tmp_path: Path) -> None:
    """Qwen3.5's gated delta rule is one op, so its graph takes any length: a 150-token prompt (three of the chunks
    transformers loops over) prefills in one call. A model that bounds the tokens of a call (``dim_max`` of seq in
    its metadata, as a loop torch.export fixed leaves it) prefills in pieces, each continuing the cache (its
    recurrent states here): the same tokens as eager PEFT either way."""
    from flora_graph.runtimes.onnx_lowering import DIM_MAX_KEY

    model, adapted = _greedy_package("Qwen3_5ForCausalLM", tmp_path)
    prompt = [int(t) for t in torch.randint(3, 128, (150,), generator=torch.Generator().manual_seed(5))]
    want = [eager_greedy(adapted, prompt, 6), eager_greedy(model, prompt[:40], 6)]
    gen = Generator(tmp_path / "pkg")
    assert gen.max_step is None
    assert gen.generate([prompt, prompt[:40]], adapters=["ad", None], max_new_tokens=6, stop_tokens=[]) == want
    for file in ("model.onnx", "mixed.onnx"):  # the bound declared
        proto = onnx.load(str(tmp_path / "pkg" / file), load_external_data=False)
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, DIM_MAX_KEY: '{"seq": 64}'})
        onnx.save(proto, str(tmp_path / "pkg" / file))
    gen = Generator(tmp_path / "pkg")
    assert gen.max_step == 64
    assert gen.generate([prompt, prompt[:40]], adapters=["ad", None], max_new_tokens=6, stop_tokens=[]) == want
