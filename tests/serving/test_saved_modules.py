"""Modules an adapter trains whole (PEFT's ``modules_to_save``: the output layer, the input embedding, a projection),
swapped as slots of full rank: the change of the module's weight as a LoRA whose rank is the smaller of its sizes,
one factor the change and the other the identity. References: eager PEFT (alone, row by row in a mixed batch, and
in ONNX Runtime GenAI) and the adapter file's product against PEFT's weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from flora_graph.errors import AdapterError  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.serving.genai_package import (  # noqa: E402
    assert_mixed_rows_decode_as_eager_peft,
    eager_greedy,
    export_small,
    genai_tokens,
    save_small,
    small_adapters,
)
from tests.serving.test_causal_lm_families import small_model  # noqa: E402


def _saved(model, folder: Path, name: str, saved: list[str], targets: list[str], change: str = "weight",
           seed: int = 7, scale: float = 2.0) -> object:
    """A PEFT adapter on ``targets`` that also trains the modules ``saved`` whole (``modules_to_save``), their
    ``change`` parameter moved by random values (``scale`` times its spread), saved as ``folder / name`` beside the
    saved base model: the adapted model, in eval mode."""
    base = save_small(model, folder)
    torch.manual_seed(seed)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=saved,
                                                  init_lora_weights=False))
    with torch.no_grad():
        for pname, p in adapted.named_parameters():
            if ".modules_to_save.default." in pname and pname.endswith(f".{change}"):
                p.add_(torch.randn_like(p) * (float(p.std()) or 0.1) * scale)  # a bias may start at zeros
    adapted.save_pretrained(folder / name)
    return adapted.eval()


def _saved_undone(adapted, prompt: list[int]) -> list[int]:
    """Eager PEFT's greedy tokens of ``adapted`` with its saved modules' weights put back to the base's (its LoRA
    kept): what the package would give if the saved modules were dropped."""
    import copy

    from peft.utils import ModulesToSaveWrapper

    undone = copy.deepcopy(adapted)
    for mod in undone.modules():
        if isinstance(mod, ModulesToSaveWrapper):
            mod.modules_to_save["default"].load_state_dict(mod.original_module.state_dict())
    return eager_greedy(undone, prompt, 8, min_new_tokens=8)


@pytest.mark.parametrize("arch, saved", [("LlamaForCausalLM", ["lm_head"]), ("Gemma3ForCausalLM", ["embed_tokens"]),
                                         ("Qwen2ForCausalLM", ["embed_tokens", "lm_head"])])
def test_modules_trained_whole_swap_and_decode_as_eager_peft(tmp_path: Path, arch: str, saved: list[str]) -> None:
    """An output layer or an input embedding trained whole (Gemma 3's scaled; Qwen2's tied to the output layer, both
    saved), beside LoRA on ``q_proj``: alone, in a mixed batch beside another adapter's rows, and in ONNX Runtime
    GenAI, greedy tokens equal eager PEFT's, which the saved modules change."""
    import onnxruntime_genai as og

    model = small_model(arch)
    if arch == "Qwen2ForCausalLM":  # tied, as small Qwen2 checkpoints are: PEFT trains two copies apart
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    adapted = small_adapters(model, tmp_path, {"attn": ["v_proj", "o_proj"]})
    adapted["whole"] = _saved(model, tmp_path, "whole", saved, ["q_proj"])
    report = export_small(model, tmp_path, {n: tmp_path / n for n in ("attn", "whole")})
    told = [n for n in report.notes if "trained whole" in n]  # the export names them: their slots are large
    assert len(told) == 1 and told[0].startswith("adapter whole:") and all(m in told[0] for m in saved)
    assert_mixed_rows_decode_as_eager_peft(Generator(tmp_path / "pkg"), model, adapted, "whole", "attn")
    prompt = [1, 5, 9, 33, 70, 12]
    want = eager_greedy(adapted["whole"], prompt, 8, min_new_tokens=8)
    assert want != _saved_undone(adapted["whole"], prompt)  # the saved modules' slots are fed, not only the LoRA
    og_model = og.Model(str(tmp_path / "pkg"))
    og_adapters = og.Adapters(og_model)
    og_adapters.load(str(tmp_path / "pkg" / "adapters" / "whole.onnx_adapter"), "whole")
    assert genai_tokens(og_model, prompt, 8, og_adapters, "whole") == want


def test_a_saved_module_is_a_full_rank_slot_whose_product_is_its_change(tmp_path: Path) -> None:
    """The adapter file's output-layer slot has rank ``hidden`` (the smaller size), and ``B @ A`` is the saved weight
    less the base one; a saved module that PEFT keeps unchanged adds no slot."""
    from flora_graph.serving.slots import peft_adapter_params

    model = small_model("LlamaForCausalLM")
    adapted = _saved(model, tmp_path, "whole", ["lm_head"], ["q_proj"])
    params = peft_adapter_params(model, tmp_path / "whole")
    a, b = params["lm_head.lora_A"], params["lm_head.lora_B"]
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    assert a.shape == (hidden, hidden) and b.shape == (vocab, hidden)
    saved = adapted.base_model.model.lm_head.modules_to_save["default"].weight.detach().numpy()
    np.testing.assert_allclose(b @ a, saved - model.lm_head.weight.detach().numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(b @ a, 0)
    _saved(model, tmp_path, "untouched", ["lm_head"], ["q_proj"], change="none")
    untouched = peft_adapter_params(model, tmp_path / "untouched")
    assert any(k.endswith("q_proj.lora_A") for k in untouched) and not any(k.startswith("lm_head.") for k in untouched)


def test_a_saved_module_whose_bias_alone_changed_is_a_bias_slot(tmp_path: Path) -> None:
    """A saved module whose bias alone changes (Qwen2's ``q_proj`` has one): no full-rank factors, the change of its
    bias the slot's bias; greedy tokens equal eager PEFT's, which the bias changes."""
    from flora_graph.serving.slots import peft_adapter_params

    model = small_model("Qwen2ForCausalLM")
    adapted = _saved(model, tmp_path, "bias", ["layers.0.self_attn.q_proj"], ["v_proj"], change="bias", scale=20.0)
    params = peft_adapter_params(model, tmp_path / "bias")
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.lora_A" not in params and f"{q}.lora_bias" in params
    export_small(model, tmp_path, {"bias": tmp_path / "bias"})
    prompt = [1, 5, 9, 33, 70, 12]
    got = Generator(tmp_path / "pkg").generate([prompt], adapters="bias", max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted, prompt, 8, min_new_tokens=8) != _saved_undone(adapted, prompt)


def test_a_saved_module_of_another_kind_is_refused_by_name(tmp_path: Path) -> None:
    """A saved module that is not a ``Linear`` / ``Embedding`` (the final norm) cannot be a slot: refused naming the
    module, ``--merge-adapter`` offered; nothing is written."""
    model = small_model("Qwen2ForCausalLM")
    _saved(model, tmp_path, "norm", ["model.norm"], ["v_proj"])
    with pytest.raises(AdapterError, match=r"'model\.norm' whole, a Qwen2RMSNorm.*--merge-adapter"):
        export_small(model, tmp_path, {"norm": tmp_path / "norm"})
    assert not (tmp_path / "pkg").exists()


def test_a_saved_projection_inside_a_packed_slot_decodes_as_eager_peft(tmp_path: Path) -> None:
    """A projection of one layer trained whole (its weight changed, its bias not): a full-rank part of the packed
    q/k/v slot beside the adapter's LoRA on ``v_proj``; greedy tokens equal eager PEFT's."""
    model = small_model("Qwen2ForCausalLM")
    adapted = _saved(model, tmp_path, "proj", ["layers.0.self_attn.q_proj"], ["v_proj"], scale=10.0)
    export_small(model, tmp_path, {"proj": tmp_path / "proj"})
    prompt = [1, 5, 9, 33, 70, 12]
    got = Generator(tmp_path / "pkg").generate([prompt], adapters="proj", max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted, prompt, 8, min_new_tokens=8) != _saved_undone(adapted, prompt)
    from flora_graph.serving.adapter_file import read_adapter

    params = read_adapter(tmp_path / "pkg" / "adapters" / "proj.onnx_adapter").params
    packed = params["model.layers.0.self_attn.q_proj+v_proj.lora_A"]  # the full rank (hidden) and the LoRA's 4
    assert packed.shape == (model.config.hidden_size + 4, model.config.hidden_size)


def test_an_encoder_decoder_output_layer_trained_whole_decodes_as_eager_peft(tmp_path: Path) -> None:
    """BART's output layer (tied to its shared embedding) trained whole beside LoRA on ``q_proj``: the
    encoder-decoder package's greedy tokens equal eager PEFT ``generate``'s, alone and beside a row without it."""
    import warnings

    from flora_graph.serving.seq2seq import Seq2SeqGenerator, export_seq2seq
    from tests.serving.seq2seq_package import PROMPTS, build, eager_tokens

    model = build("bart")
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    adapted = peft.get_peft_model(type(model).from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        w = adapted.base_model.model.lm_head.modules_to_save["default"].weight
        w.add_(torch.randn_like(w) * float(w.std()) * 2)
    adapted.save_pretrained(tmp_path / "whole")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_seq2seq(tmp_path / "base", tmp_path / "pkg", {"whole": tmp_path / "whole"})
    assert any(n.startswith("adapter whole: lm_head trained whole") for n in report.notes)
    gen = Seq2SeqGenerator(tmp_path / "pkg")
    kw = dict(max_new_tokens=8, min_new_tokens=8)
    want = eager_tokens(tmp_path, "bart", "whole", PROMPTS[:2], gen.pad, set(), **kw)
    assert gen.generate(PROMPTS[:2], adapters="whole", **kw) == want
    base = eager_tokens(tmp_path, "bart", None, PROMPTS[:2], gen.pad, set(), **kw)
    assert want != base
    assert gen.generate(PROMPTS[:2], adapters=["whole", None], **kw) == [want[0], base[1]]


def test_gpt2_conv1d_modules_trained_whole_beside_fan_in_fan_out_lora_decode_as_eager_peft(tmp_path: Path) -> None:
    """GPT-2: LoRA on ``c_attn`` (a ``Conv1D``, PEFT's ``fan_in_fan_out``) beside a ``Conv1D`` (``c_fc``, its weight
    ``[in, out]``) and the output layer tied to ``wte`` trained whole: read through PEFT's layers, greedy tokens equal
    eager PEFT's, and other than the base model's."""
    model = small_model("GPT2LMHeadModel")
    adapted = _saved(model, tmp_path, "whole", ["h.0.mlp.c_fc", "lm_head"], ["c_attn"])
    assert adapted.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    export_small(model, tmp_path, {"whole": tmp_path / "whole"})
    prompt = [1, 5, 9, 33, 70, 12]
    got = Generator(tmp_path / "pkg").generate([prompt], adapters="whole", max_new_tokens=8, min_new_tokens=8)[0]
    assert got == eager_greedy(adapted, prompt, 8, min_new_tokens=8) != _saved_undone(adapted, prompt)


def test_reading_through_peft_shares_the_weights_peft_leaves_alone(tmp_path: Path, monkeypatch) -> None:
    """An adapter read through PEFT's own layers (DoRA, a saved output layer, trained biases) is installed on a copy
    of the model that holds its own copy of the weights the folder's file names (the output layer, the biases) and
    shares the others: the model keeps its modules, values and flags, and the params are those of a whole copy."""
    import copy

    import flora_graph.adapters.peft as peft_io
    import flora_graph.serving.slots as slots

    model = small_model("Qwen2ForCausalLM")
    base = save_small(model, tmp_path)
    torch.manual_seed(3)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                                  modules_to_save=["lm_head"], bias="lora_only",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if p.requires_grad and ("bias" in name or "modules_to_save" in name or "magnitude" in name):
                p.add_(torch.randn_like(p) * 0.3)
    adapted.save_pretrained(tmp_path / "dora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {n: type(m) for n, m in model.named_modules()}
    flags = [p.requires_grad for p in model.parameters()]
    installed_on = []
    real = peft_io.peft_installed

    def spy(m, folder, what):
        installed_on.append(dict(m.named_parameters(remove_duplicate=False)))
        return real(m, folder, what)

    monkeypatch.setattr(peft_io, "peft_installed", spy)
    params = slots.peft_adapter_params(model, tmp_path / "dora")
    own = dict(model.named_parameters(remove_duplicate=False))
    copied = installed_on[0]
    private = {"lm_head.weight", *(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(model.config.num_hidden_layers)
                                   for p in ("q", "v"))}
    assert {n for n in own if copied[n] is not own[n]} == private
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    monkeypatch.setattr(slots, "_module_copy", lambda m, private=(): copy.deepcopy(m))  # a whole copy, as before
    whole = slots.peft_adapter_params(model, tmp_path / "dora")
    assert sorted(params) == sorted(whole)
    for k in params:
        np.testing.assert_array_equal(params[k], whole[k], err_msg=k)
    assert any(k.endswith(".lora_magnitude") for k in params) and "lm_head.lora_A" in params


def test_peft_replacing_a_shared_weight_is_refused_and_undone(tmp_path: Path, monkeypatch) -> None:
    """Where PEFT replaces the data of a weight the copy shares with the model (as an initialization that rewrites
    base weights would), the model gets its weight back and the adapter is refused, naming the folder."""
    import flora_graph.adapters.peft as peft_io
    import flora_graph.serving.slots as slots

    model = small_model("Qwen2ForCausalLM")
    _saved(model, tmp_path, "whole", ["lm_head"], ["q_proj"])
    weight = model.model.layers[0].mlp.up_proj.weight
    data, values = weight.data, weight.detach().clone()
    real = peft_io.peft_installed

    def rewrites(m, folder, what):
        out = real(m, folder, what)
        m.get_submodule("model.layers.0.mlp.up_proj").weight.data = torch.zeros_like(values)
        return out

    monkeypatch.setattr(peft_io, "peft_installed", rewrites)
    with pytest.raises(AdapterError, match=r"whole: PEFT replaced 1 of the base model's weights"):
        slots.peft_adapter_params(model, tmp_path / "whole")
    assert weight.data.data_ptr() == data.data_ptr() and torch.equal(weight, values)
