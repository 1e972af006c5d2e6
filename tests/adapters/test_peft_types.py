"""PEFT's adapter types other than LoRA (``flora_graph.adapters.peft.THROUGH_PEFT``): ``flora-graph export MODEL
--adapter DIR`` installs the folder through PEFT, captures the ops its layers run (``fused``) or PEFT's merge of it
(``merged``), and the ONNX model's logits are eager PEFT's; a package swaps those whose layers PEFT gives as a change
of a ``Linear``'s weight (greedy tokens eager PEFT's, alone and in mixed batches) and refuses the others by name, which
merge into its base (``--merge-adapter``) with eager PEFT's greedy tokens. Every adapter is drawn with nonzero
trainable values, so it changes the logits."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from flora_graph.adapters.peft import THROUGH_PEFT, load_peft_adapter, read_peft_config  # noqa: E402
from flora_graph.cli import main  # noqa: E402
from flora_graph.errors import AdapterError  # noqa: E402
from tests.serving.genai_package import eager_greedy, save_small  # noqa: E402
from tests.serving.test_causal_lm_families import small_model  # noqa: E402

QV = ["q_proj", "v_proj"]
CONFIGS = {
    "IA3": lambda: peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "LOHA": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=QV, init_weights=False),
    "LOKR": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=QV, init_weights=False),
    "VERA": lambda: peft.VeraConfig(r=8, target_modules=QV),
    "OFT": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=QV, init_weights=False),
    "BOFT": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=QV, init_weights=False),
    "HRA": lambda: peft.HRAConfig(r=4, target_modules=QV, init_weights=False),
    "FOURIERFT": lambda: peft.FourierFTConfig(n_frequency=20, target_modules=QV, init_weights=False),
    "VBLORA": lambda: peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, target_modules=QV),
    "RANDLORA": lambda: peft.RandLoraConfig(r=8, target_modules=QV),
    "SHIRA": lambda: peft.ShiraConfig(r=4, target_modules=QV),
    "C3A": lambda: peft.C3AConfig(block_size=8, target_modules=QV),
    "MISS": lambda: peft.MissConfig(r=8, target_modules=QV),
    "LN_TUNING": lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"]),
    "DELORA": lambda: peft.DeloraConfig(r=4, target_modules=QV),
    "BEFT": lambda: peft.BeftConfig(target_modules=QV, init_weights=False),
    "DEFT": lambda: peft.DeftConfig(r=4, target_modules=QV, init_weights=False),
    "FROD": lambda: peft.FrodConfig(target_modules=QV, init_weights=False),
    "GLORA": lambda: peft.GloraConfig(r=4, target_modules=QV, init_weights=False),
    "GRALORA": lambda: peft.GraloraConfig(r=4, target_modules=QV, init_weights=False),
    "HIRA": lambda: peft.HiraConfig(r=4, target_modules=QV, init_weights=False),
    "OSF": lambda: peft.OSFConfig(target_modules=QV, init_weights=False),
    "PACA": lambda: peft.PacaConfig(r=4, target_modules=QV, init_weights=False),
    "PEANUT": lambda: peft.PeanutConfig(r=4, target_modules=QV, init_weights=False),
    "PSOFT": lambda: peft.PsoftConfig(r=4, target_modules=QV, init_weights=False),
    "PVERA": lambda: peft.PveraConfig(r=4, target_modules=QV, init_weights=False),
    "ROAD": lambda: peft.RoadConfig(target_modules=QV, init_weights=False, group_size=16),
    "SUPERTUNING": lambda: peft.SupertuningConfig(r=4, target_modules=QV, init_weights=False),
    "TINYLORA": lambda: peft.TinyLoraConfig(r=4, target_modules=QV),  # its init_weights=False draws values of 1e22
    "UNILORA": lambda: peft.UniLoraConfig(r=4, target_modules=QV, init_weights=False),
    "WAVEFT": lambda: peft.WaveFTConfig(target_modules=QV, init_weights=False, n_frequency=64),
}

NEWER = frozenset({"BEFT", "DEFT", "FROD", "GLORA", "GRALORA", "HIRA", "OSF", "PACA", "PEANUT", "PSOFT", "PVERA", "ROAD",
                   "SUPERTUNING", "TINYLORA", "UNILORA", "WAVEFT"})
"""PEFT's newer types: each one's CLI export is a slow test but RoAd's (captured as its layers run it) and PSOFT's
(merged for the capture); every one of them swaps in the default run, in one package
(:func:`test_a_package_holds_every_newer_type_at_once_and_each_decodes_as_eager_peft`)."""

ARCH = {"BEFT": "Qwen2ForCausalLM"}
"""The model a type's tests adapt where not a Llama: BEFT trains biases, which a Llama's projections lack."""
def biased_model(arch: str):
    """:func:`small_model` of ``arch`` with its biases (zeros as transformers draws them) drawn nonzero, so that a
    change of a bias shows in the tokens."""
    model = small_model(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


def adapter_of(kind: str, model, folder: Path) -> object:
    """A ``kind`` adapter on ``model`` saved as ``folder / kind`` (``model`` saved beside it), every trainable value
    moved by random values: the adapted model loaded back from the folder, in eval mode."""
    base = save_small(model, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), CONFIGS[kind]())
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in adapted.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        adapted.save_pretrained(folder / kind)
        return peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                              folder / kind).eval()


def test_every_type_flora_graph_installs_through_peft_is_tested_here() -> None:
    assert set(CONFIGS) == THROUGH_PEFT


FUSED_DEFAULT = frozenset({"IA3", "LOHA", "ROAD"})
"""The types whose ``fused`` export runs in the default run (the others' in the slow run): a scaling, a low-rank product
and a rotation, the three kinds of change the fused preset keeps apart from the base weights."""

MERGED_DEFAULT = frozenset({"IA3", "LOHA", "OFT", "VERA", "LN_TUNING", "ROAD", "PSOFT"})
"""The types whose ``merged`` export runs in the default run (the others' in the slow run): a scaling, a low-rank
product, a rotation, shared random projections, a norm's change, and the two newer types captured as their layers run."""

DEFAULT_CASES = {"fused": FUSED_DEFAULT, "merged": MERGED_DEFAULT}


@pytest.mark.parametrize("kind, preset", [
    (k, preset) if k in DEFAULT_CASES[preset] else pytest.param(k, preset, marks=pytest.mark.slow)
    for preset in ("fused", "merged") for k in CONFIGS])
def test_export_of_a_peft_adapter_type_matches_eager_peft(tmp_path: Path, kind: str, preset: str) -> None:
    import onnxruntime as ort

    model = small_model(ARCH.get(kind, "LlamaForCausalLM"))
    adapted = adapter_of(kind, model, tmp_path)
    out = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(tmp_path / "base"), "--adapter", str(tmp_path / kind), "--preset", preset,
                     "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out))
    ids = np.array([[1, 5, 9, 33, 70, 12, 40], [1, 8, 3, 7, 7, 2, 9]], np.int64)
    got = session.run(None, {i.name: ids if i.name == "input_ids" else np.ones_like(ids)
                             for i in session.get_inputs()})[0]
    with torch.no_grad():
        want = adapted(input_ids=torch.from_numpy(ids)).logits.numpy()
        base = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - base).max() > 1e-2  # the adapter is in the model, not only the base


SWAPPED_ALONE = ("VERA", "LOHA", "LOKR", "VBLORA", "FOURIERFT", "RANDLORA", "C3A", "DELORA", "IA3", "OFT", "BOFT",
                 "HRA", "SHIRA", "MISS")
SWAPPABLE = (*SWAPPED_ALONE, *sorted(NEWER))
"""The types whose layers PEFT merges into a ``Linear``'s weight: each module's change ``W' - W`` (additive, or a
rotation, reflection or scaling of the base weight) is a slot, and they swap; each of ``SWAPPED_ALONE`` in a package of
its own beside a LoRA, :data:`NEWER` in one package. LN tuning adapts a norm: refused."""


def test_a_package_holds_every_newer_type_at_once_and_each_decodes_as_eager_peft(tmp_path: Path) -> None:
    """One package of a Qwen2 (biased projections, the biases drawn nonzero) with an adapter of each of :data:`NEWER`:
    each one's greedy tokens are eager PEFT's and not the base model's, and a batch whose rows use two of them (one
    captured as its layers run it, one merged for the capture) gives each row its own adapter's tokens."""
    from flora_graph.serving.genai import export_genai
    from flora_graph.serving.generate import Generator

    model = biased_model("Qwen2ForCausalLM")
    prompts = [[1, 5, 9, 33, 70, 12], [1, 8, 3, 7, 7, 2, 9, 40]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = {kind: adapter_of(kind, model, tmp_path) for kind in sorted(NEWER)}
        export_genai(tmp_path / "base", tmp_path / "pkg", {kind.lower(): tmp_path / kind for kind in adapted})
    gen = Generator(tmp_path / "pkg")
    base = eager_greedy(model, prompts[0], 8, min_new_tokens=8)
    for kind, eager in adapted.items():
        want = eager_greedy(eager, prompts[0], 8, min_new_tokens=8)
        assert want != base, kind  # the adapter changes the tokens
        assert gen.generate([prompts[0]], adapters=kind.lower(), max_new_tokens=8, min_new_tokens=8)[0] == want, kind
    mixed = gen.generate(prompts, adapters=["road", "psoft"], max_new_tokens=8, min_new_tokens=8)
    assert mixed == [eager_greedy(adapted["ROAD"], prompts[0], 8, min_new_tokens=8),
                     eager_greedy(adapted["PSOFT"], prompts[1], 8, min_new_tokens=8)]


SWAPPED_DEFAULT = frozenset({"VERA", "LOHA", "IA3", "OFT"})
"""The types of ``SWAPPED_ALONE`` that swap in the default run (the others in the slow run): shared random projections, a
low-rank product, a scaling and a rotation of the base weight."""


@pytest.mark.parametrize("kind", [k if k in SWAPPED_DEFAULT else pytest.param(k, marks=pytest.mark.slow)
                                  for k in SWAPPED_ALONE])
def test_a_peft_adapter_type_swaps_in_a_package_and_decodes_as_eager_peft(tmp_path: Path, kind: str) -> None:
    """A package with the adapter and a LoRA one: padded rows with no adapter, with it for both rows, and a mixed batch
    (the LoRA on one row, it on the other) decode as eager PEFT decodes each prompt alone; the adapter changes the
    tokens."""
    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import assert_mixed_rows_decode_as_eager_peft, export_small, small_adapters

    model = small_model("LlamaForCausalLM")
    adapted = small_adapters(model, tmp_path, {"lora": ["q_proj", "up_proj"]})
    adapted[kind] = adapter_of(kind, model, tmp_path)
    export_small(model, tmp_path, {"lora": tmp_path / "lora", kind: tmp_path / kind})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, kind, "lora")


def test_vera_on_gpt2_s_conv1d_layers_swaps_as_eager_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VeRA on GPT-2's ``Conv1D`` layers (``fan_in_fan_out``: PEFT's change of the weight laid out ``[in, out]``, turned
    for the slot): mixed rows beside a LoRA adapter decode as eager PEFT."""
    from flora_graph.serving.generate import Generator
    from tests.serving.genai_package import assert_mixed_rows_decode_as_eager_peft, export_small, small_adapters

    monkeypatch.setitem(CONFIGS, "VERA", lambda: peft.VeraConfig(r=8, target_modules=["c_attn", "c_fc"],
                                                                 fan_in_fan_out=True))
    model = small_model("GPT2LMHeadModel")
    adapted = small_adapters(model, tmp_path, {"lora": ["c_attn"]})
    adapted["VERA"] = adapter_of("VERA", model, tmp_path)
    export_small(model, tmp_path, {"lora": tmp_path / "lora", "VERA": tmp_path / "VERA"})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "VERA", "lora")


def test_a_low_rank_change_swaps_at_its_rank_and_a_full_one_at_full_rank(tmp_path: Path) -> None:
    """VeRA's change (rank 8) and MiSS's (its block of 8 rows tiled) are stored as their singular vectors, 8 of them;
    C3A's circulant blocks and OFT's rotation of the base weight (full rank) as the identity and the change itself;
    each gives the change of the weight PEFT's merge makes; and in ONNX Runtime GenAI the VeRA adapter's tokens are
    eager PEFT's."""
    import onnxruntime_genai as og

    from flora_graph.serving.slots import peft_adapter_params
    from tests.serving.genai_package import export_small, genai_tokens

    model = small_model("LlamaForCausalLM")
    base = model.model.layers[0].self_attn.v_proj.weight.detach().numpy()  # [32, 64]: rank at most 32
    for kind, rank in (("VERA", 8), ("MISS", 8), ("C3A", 32), ("OFT", 32)):
        adapted = adapter_of(kind, model, tmp_path)
        params = peft_adapter_params(model, tmp_path / kind)
        merged = copy.deepcopy(adapted).merge_and_unload().model.layers[0].self_attn.v_proj.weight.detach().numpy()
        a, b = params["model.layers.0.self_attn.v_proj.lora_A"], params["model.layers.0.self_attn.v_proj.lora_B"]
        assert a.shape[0] == rank, kind
        np.testing.assert_allclose(b @ a, merged - base, rtol=0, atol=1e-5)
    export_small(model, tmp_path, {"vera": tmp_path / "VERA"})
    og_model = og.Model(str(tmp_path / "pkg"))
    og_adapters = og.Adapters(og_model)
    og_adapters.load(str(tmp_path / "pkg" / "adapters" / "vera.onnx_adapter"), "vera")
    vera = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                          tmp_path / "VERA").eval()
    prompt = [1, 5, 9, 33, 70, 12]
    assert genai_tokens(og_model, prompt, 8, og_adapters, "vera") == eager_greedy(vera, prompt, 8, min_new_tokens=8)


def test_ln_tuning_is_refused_by_name_for_a_package_and_an_adapter_merges_into_its_base(tmp_path: Path) -> None:
    """LN tuning (it adapts a norm, not a ``Linear``) is refused as a hot-swappable adapter, naming the module and what
    to do, nothing written; ``--merge-adapter`` of an IA3 adapter gives eager PEFT's greedy tokens (not the base
    model's)."""
    from flora_graph.serving.genai import export_genai
    from flora_graph.serving.generate import Generator

    model = small_model("LlamaForCausalLM")
    refused = sorted(THROUGH_PEFT - set(SWAPPABLE))
    assert refused == ["LN_TUNING"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter_of("LN_TUNING", model, tmp_path)
        with pytest.raises(AdapterError, match=r"module 'model\.layers\.0\.input_layernorm'.*LlamaRMSNorm, not a "
                                               r"Linear.*--merge-adapter"):
            export_genai(tmp_path / "base", tmp_path / "swapped", {"ln": tmp_path / "LN_TUNING"})
        assert not (tmp_path / "swapped").exists()
        adapted = adapter_of("IA3", model, tmp_path)
        export_genai(tmp_path / "base", tmp_path / "merged", merge=tmp_path / "IA3")
    prompt = [1, 5, 9, 33, 70, 12]
    got = Generator(tmp_path / "merged").generate([prompt], max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted, prompt, 8, min_new_tokens=8) != eager_greedy(model, prompt, 8, min_new_tokens=8)


CHANGES_OF_THE_BASE = {
    "miss-bat": ("LlamaForCausalLM", lambda: peft.MissConfig(r=8, target_modules=QV, init_weights="bat")),
    "miss-mini": ("LlamaForCausalLM", lambda: peft.MissConfig(r=8, mini_r=4, target_modules=QV, init_weights="mini")),
    "ia3-biases": ("Qwen2ForCausalLM", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                  feedforward_modules=["down_proj"])),
}
"""Changes that read the base weight (MiSS's ``bat`` mode), tile a block (``mini``), or scale a layer's bias too (IA3
on the outputs of Qwen2's biased key and value projections, its down projection's inputs)."""


@pytest.mark.parametrize("case", list(CHANGES_OF_THE_BASE))
def test_a_change_that_reads_the_base_weight_or_scales_its_bias_swaps_as_eager_peft(
        tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The change PEFT's merge makes of the package's base weight is the slot, and of its bias the slot's bias (the
    biases drawn nonzero): the adapter's greedy tokens are eager PEFT's, and not the base model's."""
    from flora_graph.serving.genai import export_genai
    from flora_graph.serving.generate import Generator

    arch, config = CHANGES_OF_THE_BASE[case]
    monkeypatch.setitem(CONFIGS, case, config)
    model = biased_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = adapter_of(case, model, tmp_path)
        export_genai(tmp_path / "base", tmp_path / "pkg", {"x": tmp_path / case})
    if case == "ia3-biases":  # the scaled outputs' biases are the slots' biases
        import onnx

        names = {i.name for i in onnx.load(tmp_path / "pkg" / "model.onnx", load_external_data=False).graph.input}
        assert {"model.layers.0.self_attn.k_proj.lora_bias", "model.layers.1.self_attn.v_proj.lora_bias"} <= names
    prompt = [1, 5, 9, 33, 70, 12]
    want = eager_greedy(adapted, prompt, 8, min_new_tokens=8)
    assert Generator(tmp_path / "pkg").generate([prompt], adapters="x", max_new_tokens=8, min_new_tokens=8)[0] == want
    assert want != eager_greedy(model, prompt, 8, min_new_tokens=8)


def test_flora_graph_s_own_lora_adapters_refuse_the_other_types_by_name(tmp_path: Path) -> None:
    """``load_peft_adapter`` installs flora_graph's LoRA adapters, which hold none of these: it refuses the folder, naming
    the type and the paths that take it; a type PEFT has and flora_graph does not take is refused on reading."""
    import json

    model = small_model("LlamaForCausalLM")
    adapter_of("VERA", model, tmp_path)
    with pytest.raises(AdapterError, match=r"peft_type 'VERA'.*flora-graph export"):
        load_peft_adapter(model, tmp_path / "VERA")
    assert read_peft_config(tmp_path / "VERA", peft_layers=True)["peft_type"] == "VERA"
    cfg_path = tmp_path / "VERA" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterError, match="PREFIX_TUNING' is not supported"):
        read_peft_config(tmp_path / "VERA", peft_layers=True)


def test_an_encoder_decoder_package_merges_an_ia3_adapter_and_swaps_a_lora_on_top(tmp_path: Path) -> None:
    """``flora-graph export T5 --task text2text-generation-with-past --merge-adapter IA3_DIR --adapter lora=DIR``: the
    package's base rows decode as eager PEFT's IA3 model, and its LoRA rows as eager PEFT's LoRA on that merged model
    (both differ from the plain base model's tokens)."""
    from flora_graph.serving.seq2seq import Seq2SeqGenerator
    from tests.serving.seq2seq_package import PROMPTS, build, eager_tokens

    model = build("t5")
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3 = peft.get_peft_model(type(model).from_pretrained(tmp_path / "base"),
                                  peft.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]))
        with torch.no_grad():
            for p in ia3.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.8)
        ia3.save_pretrained(tmp_path / "ia3")
        merged = peft.PeftModel.from_pretrained(type(model).from_pretrained(tmp_path / "base"),
                                                tmp_path / "ia3").merge_and_unload().eval()
        lora = peft.get_peft_model(type(model).from_pretrained(tmp_path / "base"),
                                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False))
        lora.save_pretrained(tmp_path / "lora")
        assert main(["export", str(tmp_path / "base"), "--task", "text2text-generation-with-past", "--merge-adapter",
                     str(tmp_path / "ia3"), "--adapter", f"lora={tmp_path / 'lora'}", "--out", str(tmp_path / "pkg")]) == 0
        on_merged = peft.PeftModel.from_pretrained(copy.deepcopy(merged), tmp_path / "lora").eval()  # wraps in place
    gen = Seq2SeqGenerator(tmp_path / "pkg")
    kw = dict(max_new_tokens=10, min_new_tokens=10)
    base = eager_tokens(tmp_path, "t5", None, PROMPTS, gen.pad, set(), model=model.eval(), **kw)
    want = eager_tokens(tmp_path, "t5", None, PROMPTS, gen.pad, set(), model=merged, **kw)
    want_lora = eager_tokens(tmp_path, "t5", None, PROMPTS, gen.pad, set(), model=on_merged, **kw)
    assert gen.generate(PROMPTS, **kw) == want != base
    assert gen.generate(PROMPTS, adapters=["lora", None, "lora"], **kw) == [want_lora[0], want[1], want_lora[2]]
    assert want_lora != want
