"""AdaLoRA adapters (PEFT's ``peft_type="ADALORA"``: ``x (A * E)^T B^T * alpha / (ranknum + 1e-5)``, ranks pruned by
training) swapped as LoRA slots (``A * E`` and the scale folded into ``B``). The adapter is trained for a few steps with
PEFT's own rank allocation, so its folder holds a ``rank_pattern`` and each module's tensors at the ranks it kept.
References: eager PEFT alone, row by row in a mixed batch beside a LoRA adapter, in ONNX Runtime GenAI, and PEFT's
layers module by module; ``flora-graph export`` of the folder against eager PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from flora_graph.adapters.peft import load_peft_adapter, read_peft_config  # noqa: E402
from flora_graph.errors import AdapterError  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from flora_graph.serving.slots import peft_adapter_params  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    assert_mixed_rows_decode_as_eager_peft,
    eager_greedy,
    export_small,
    genai_tokens,
    save_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402

PROMPT = [1, 5, 9, 33, 70, 12]
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def trained_adalora(model, folder: Path, name: str = "ada", *, steps: int = 6, targets: list[str] = TARGETS) -> object:
    """An AdaLoRA adapter (``init_r`` 8 pruned towards ``target_r`` 4) on the saved ``model``, its ``A``, ``E`` and ``B``
    drawn large enough to change the tokens, trained ``steps`` steps with PEFT's rank allocation
    (``update_and_allocate``, whose last step fixes the ``rank_pattern``), saved as ``folder / name``: the adapted model
    loaded back from the folder (the ranks cut as saved), in eval mode."""
    base = save_small(model, folder)
    torch.manual_seed(11)
    spec = peft.AdaLoraConfig(init_r=8, target_r=4, lora_alpha=16, target_modules=targets, total_step=steps, tinit=1,
                              tfinal=1, deltaT=1)
    adapted = peft.get_peft_model(type(model).from_pretrained(base), spec)
    with torch.no_grad():
        for pname, p in adapted.named_parameters():
            if any(f".{k}." in pname for k in ("lora_A", "lora_B", "lora_E")):
                p.normal_(0, 1.0 if ".lora_E." in pname else 0.4)
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    adapted.train()
    for step in range(steps):
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        adapted.base_model.update_and_allocate(step)
        opt.zero_grad()
    adapted.save_pretrained(folder / name)
    return peft.PeftModel.from_pretrained(type(model).from_pretrained(base), folder / name).eval()


def test_a_trained_adalora_folder_holds_pruned_ranks(tmp_path: Path) -> None:
    """The fixture is what the tests need: a ``rank_pattern`` that kept fewer ranks than ``init_r`` in some modules,
    nonzero singular values, and tokens other than the base model's."""
    model = small_model("LlamaForCausalLM")
    adapted = trained_adalora(model, tmp_path)
    pattern = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())["rank_pattern"]
    kept = [sum(v) for v in pattern.values()]
    assert pattern and min(kept) < 8 and len(set(kept)) > 1, kept
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].shape[0] == sum(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    assert eager_greedy(adapted, PROMPT, 8, min_new_tokens=8) != eager_greedy(model, PROMPT, 8, min_new_tokens=8)


def test_adalora_params_are_a_times_e_and_b_scaled_and_match_peft_s_layers(tmp_path: Path) -> None:
    """Each ``SVDLinear``'s slot: ``A`` is ``A * E``, ``B`` is ``B * alpha / (ranknum + 1e-5)`` (PEFT's forward); a module
    pruned to no rank has no entry; the reading's own check against PEFT's layers passed (it refuses otherwise)."""
    model = small_model("LlamaForCausalLM")
    adapted = trained_adalora(model, tmp_path)
    params = peft_adapter_params(model, tmp_path / "ada")
    n = 0
    for name, mod in adapted.named_modules():
        if "default" not in getattr(mod, "lora_E", {}):
            continue
        path = name.removeprefix("base_model.model.")
        a, e, b = (getattr(mod, k)["default"].detach() for k in ("lora_A", "lora_E", "lora_B"))
        if a.shape[0] == 0:
            assert f"{path}.lora_A" not in params
            continue
        scale = mod.scaling["default"] / (float(mod.ranknum["default"]) + 1e-5)
        np.testing.assert_allclose(params[f"{path}.lora_A"], (a * e).numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(params[f"{path}.lora_B"], (b * scale).numpy(), rtol=1e-6, atol=1e-7)
        n += 1
    assert n > len(TARGETS)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_adalora_swaps_and_decodes_as_eager_peft(tmp_path: Path, arch: str) -> None:
    """An AdaLoRA adapter in a package beside a LoRA one: alone, in a mixed batch beside the LoRA adapter's rows, and
    in ONNX Runtime GenAI, greedy tokens equal eager PEFT's (which the adapter changes)."""
    import onnxruntime_genai as og

    model = small_model(arch)
    adapted = small_adapters(model, tmp_path, {"lora": ["q_proj", "up_proj"]})
    adapted["ada"] = trained_adalora(model, tmp_path)
    export_small(model, tmp_path, {n: tmp_path / n for n in ("lora", "ada")})
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "ada", "lora")
    og_model = og.Model(str(tmp_path / "pkg"))
    og_adapters = og.Adapters(og_model)
    og_adapters.load(str(tmp_path / "pkg" / "adapters" / "ada.onnx_adapter"), "ada")
    assert genai_tokens(og_model, PROMPT, 8, og_adapters, "ada") == eager_greedy(adapted["ada"], PROMPT, 8,
                                                                                 min_new_tokens=8)


def test_adalora_in_an_encoder_decoder_package_decodes_as_eager_peft(tmp_path: Path) -> None:
    """T5 with an AdaLoRA adapter on both stacks' ``q``/``v``/``o``: the encoder-decoder package's greedy tokens equal
    eager PEFT's, row by row beside base rows, and differ from the base model's."""
    from flora_graph.cli import main
    from flora_graph.serving.seq2seq import Seq2SeqGenerator
    from tests.serving.seq2seq_package import PROMPTS, build, eager_tokens

    model = build("t5")
    adapted = trained_adalora(model, tmp_path, targets=["q", "v", "o"])
    assert main(["export", str(tmp_path / "base"), "--task", "text2text-generation-with-past", "--adapter",
                 f"ada={tmp_path / 'ada'}", "--out", str(tmp_path / "pkg")]) == 0
    gen = Seq2SeqGenerator(tmp_path / "pkg")
    kw = dict(max_new_tokens=12, min_new_tokens=12)
    want = eager_tokens(tmp_path, "t5", None, PROMPTS, gen.pad, set(), model=adapted, **kw)
    base = eager_tokens(tmp_path, "t5", None, PROMPTS, gen.pad, set(), model=model, **kw)
    assert gen.generate(PROMPTS, adapters="ada", **kw) == want != base
    assert gen.generate(PROMPTS, adapters=["ada", None, "ada"], **kw) == [want[0], base[1], want[2]]


@pytest.mark.parametrize("preset", ["fused", "merged"])
def test_flora_graph_export_of_an_adalora_folder_matches_eager_peft(tmp_path: Path, preset: str) -> None:
    """``flora-graph export BASE --adapter ADALORA_DIR`` installs the folder through PEFT (``merged``: PEFT merges it
    into the weights): the ONNX model's logits are eager PEFT's, and not the base model's."""
    import onnxruntime as ort

    from flora_graph.cli import main

    model = small_model("LlamaForCausalLM")
    adapted = trained_adalora(model, tmp_path)
    out = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "base"), "--adapter", str(tmp_path / "ada"), "--preset", preset,
                 "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out))
    ids = np.array([PROMPT, PROMPT[::-1]], np.int64)
    feeds = {i.name: ids if i.name == "input_ids" else np.ones_like(ids) for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = adapted(input_ids=torch.from_numpy(ids)).logits.numpy()
        base = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - base).max() > 0.1


def test_an_adalora_folder_is_refused_by_name_where_flora_graph_s_lora_adapters_would_hold_it(tmp_path: Path) -> None:
    """``load_peft_adapter`` (flora_graph's LoRA adapters installed from a folder) cannot hold ``E``: it refuses the
    folder, naming its type and the paths that take it; a malformed ``rank_pattern`` is refused on reading."""
    model = small_model("LlamaForCausalLM")
    trained_adalora(model, tmp_path, steps=4)
    with pytest.raises(AdapterError, match=r"ADALORA.*--format genai"):
        load_peft_adapter(model, tmp_path / "ada")
    assert read_peft_config(tmp_path / "ada", peft_layers=True)["rank_pattern"]
    cfg_path = tmp_path / "ada" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": 3}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="rank_pattern must be"):
        read_peft_config(tmp_path / "ada", peft_layers=True)
