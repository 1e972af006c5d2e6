"""PEFT's adapter types other than LoRA (``flora_graph.adapters.peft.THROUGH_PEFT``): ``flora-graph export MODEL
--adapter DIR`` installs the folder through PEFT, captures the ops its layers run (``fused``) or PEFT's merge of it
(``merged``), and the ONNX model's logits are eager PEFT's; a GenAI package merges one into its base
(``--merge-adapter``) with eager PEFT's greedy tokens, and refuses to swap one, naming why. Every adapter is drawn with
nonzero trainable values, so it changes the logits."""

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
}
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


@pytest.mark.parametrize("preset", ["fused", "merged"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_export_of_a_peft_adapter_type_matches_eager_peft(tmp_path: Path, kind: str, preset: str) -> None:
    import onnxruntime as ort

    model = small_model("LlamaForCausalLM")
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


def test_a_genai_package_merges_a_loha_adapter_and_refuses_to_swap_it(tmp_path: Path) -> None:
    """``--merge-adapter`` of a LoHa folder: the package's greedy tokens are eager PEFT's (and not the base model's);
    ``--adapter NAME=DIR`` of it is refused naming the type and what to do, and nothing is written."""
    from flora_graph.serving.genai import export_genai
    from flora_graph.serving.generate import Generator

    model = small_model("LlamaForCausalLM")
    adapted = adapter_of("LOHA", model, tmp_path)
    prompt = [1, 5, 9, 33, 70, 12]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "merged", merge=tmp_path / "LOHA")
        with pytest.raises(AdapterError, match=r"LOHA adapter.*--merge-adapter"):
            export_genai(tmp_path / "base", tmp_path / "swapped", {"loha": tmp_path / "LOHA"})
    assert not (tmp_path / "swapped").exists()
    got = Generator(tmp_path / "merged").generate([prompt], max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted, prompt, 8, min_new_tokens=8) != eager_greedy(model, prompt, 8, min_new_tokens=8)


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
