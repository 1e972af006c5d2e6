"""PEFT interop: folders written by PEFT load onto flora_graph adapters, and back."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter, adapters_of
from flora_graph.adapters.peft import load_peft_adapter, save_peft_adapter
from flora_graph.errors import AdapterError
from tests.peft_folders import edit_peft_folder


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(12, 12), nn.Linear(12, 8), nn.Linear(12, 8)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.score = nn.Linear(28, 3)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.q(x), self.k(x), self.v(x)], -1)
        return self.score(h) + self.conv(img).mean()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 12, generator=g), torch.randn(5, 2, 6, 6, generator=g)


def _peft_folder(tmp_path, **config):
    torch.manual_seed(0)
    plain = Block().eval()
    cfg = peft.LoraConfig(init_lora_weights=False, **config)  # nonzero B: the load must be exact, not trivially zero
    pm = peft.get_peft_model(copy.deepcopy(plain), cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    return plain, pm, tmp_path / "adapter"


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q", "k", "v", "conv"]},
        {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "use_rslora": True},
        {"r": 2, "lora_alpha": 4, "target_modules": r".*\.?(q|k|v)", "rank_pattern": {"k": 5}, "alpha_pattern": {"v": 16}},
        {"r": 3, "lora_alpha": 3, "target_modules": ["q", "k"], "modules_to_save": ["score"], "bias": "all"},
        {"r": 3, "lora_alpha": 6, "target_modules": ["q", "k"], "bias": "lora_only"},
    ],
)
def test_peft_folder_loads_onto_flora_adapters_and_matches_peft(tmp_path, config):
    plain, pm, folder = _peft_folder(tmp_path, **config)
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        with torch.no_grad():  # what PEFT trains (and saves) besides A and B differs from the plain model
            for n, p in pm.named_parameters():
                if p.requires_grad and "lora_" not in n:
                    p.add_(0.5)
        pm.save_pretrained(folder)
    model = copy.deepcopy(plain)
    names = load_peft_adapter(model, folder)
    assert names and all(isinstance(m, LoRAAdapter) for m in adapters_of(model).values())
    x, img = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, img), pm(x, img), atol=1e-5, rtol=1e-5)
    if "rank_pattern" in config:
        assert adapters_of(model)["k"].rank == 5 and adapters_of(model)["q"].rank == 2
    if config.get("use_rslora"):
        assert adapters_of(model)["q"].scaling == pytest.approx(8 / 2.0)


def test_saved_folder_loads_in_peft_with_equal_outputs(tmp_path):
    plain, _, folder = _peft_folder(tmp_path, r=2, lora_alpha=4, target_modules=["q", "k"], rank_pattern={"k": 3})
    model = copy.deepcopy(plain)
    load_peft_adapter(model, folder)
    out = save_peft_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(plain), out).eval()
    x, img = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x, img), model(x, img), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"drop": "q.lora_B"}, r"missing key base_model\.model\.q\.lora_B\.weight"),
        ({"reshape": "k.lora_A"}, r"key base_model\.model\.k\.lora_A\.weight has shape"),
        ({"config": {"r": 3}}, r"key base_model\.model\.(q|k)\.lora_A\.weight has shape .* r=3"),
        ({"config": {"use_dora": True}}, r"use_dora=True \(DoRA\) rescales .* installs a DoRA folder through PEFT"),
        ({"config": {"lora_bias": True}}, r"option lora_bias=True \(a bias on each LoRA.s up projection\) is not held"),
        ({"config": {"layers_to_transform": ["0"]}}, r"layers_to_transform must be a layer index or a list"),
        ({"config": {"layers_to_transform": [0], "target_modules": "q|k"}}, r"needs target_modules as a list"),
        ({"config": {"layers_pattern": "layers"}}, r"layers_pattern='layers' needs layers_to_transform"),
        ({"config": {"layers_to_transform": 0, "layers_pattern": "("}}, r"layers_pattern '\(': .* not a valid regular"),
        ({"config": {"some_future_option": 1}}, r"unknown PEFT option\(s\) \['some_future_option'\]"),
        ({"config": {"target_modules": ["q"]}}, r"key base_model\.model\.k\.lora_A\.weight matches no adapted module"),
        ({"config": {"modules_to_save": ["score"]}}, r"modules_to_save names 'score', but no weights for it are in"),
    ],
)
def test_bad_folders_raise_naming_the_key_and_leave_the_model_untouched(tmp_path, edit, match):
    plain, _, folder = _peft_folder(tmp_path, r=2, lora_alpha=4, target_modules=["q", "k"])
    edit_peft_folder(folder, **edit)
    model = copy.deepcopy(plain)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=match):
        load_peft_adapter(model, folder)
    assert not adapters_of(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_a_module_to_save_the_model_does_not_have_saves_nothing(tmp_path):
    """PEFT's task defaults name modules a model may not have (``SEQ_CLS``: ``classifier`` and ``score``, which
    BART's ``classification_head`` is neither): PEFT saves and loads nothing for such a name, and so does the load."""
    plain, pm, folder = _peft_folder(tmp_path, r=2, lora_alpha=4, target_modules=["q", "k"],
                                     modules_to_save=["classifier"])
    model = copy.deepcopy(plain)
    load_peft_adapter(model, folder)
    x, img = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, img), pm(x, img), atol=1e-5, rtol=1e-5)


class Stack(nn.Module):
    """Numbered layers twice over (``model.layers.i`` and ``extra.blocks.i``), as PEFT's layer selection reads paths."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(8, 8), "v": nn.Linear(8, 8)}) for _ in range(3))
        self.extra = nn.Module()
        self.extra.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(8, 8)}) for _ in range(2))
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.model.layers, *self.extra.blocks]:
            x = torch.tanh(layer["q"](x) + (layer["v"](x) if "v" in layer else 0))
        return self.out(x)


@pytest.mark.parametrize(
    ("config", "adapted"),
    [
        ({"target_modules": ["q", "v"], "layers_to_transform": [1]},
         {"model.layers.1.q", "model.layers.1.v", "extra.blocks.1.q"}),
        ({"target_modules": ["q"], "layers_to_transform": 0}, {"model.layers.0.q", "extra.blocks.0.q"}),
        ({"target_modules": ["q"], "layers_to_transform": [1], "layers_pattern": "blocks"}, {"extra.blocks.1.q"}),
        ({"target_modules": ["q", "model.layers.2.v"], "layers_to_transform": [0, 1],
          "layers_pattern": ["blocks", "layers"]},
         {"model.layers.0.q", "model.layers.1.q", "extra.blocks.0.q", "extra.blocks.1.q", "model.layers.2.v"}),
    ],
)
def test_layers_to_transform_adapts_the_layers_peft_adapts(tmp_path, config, adapted):
    torch.manual_seed(0)
    plain = Stack().eval()
    pm = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=2, init_lora_weights=False, **config)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    peft_adapted = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert peft_adapted == adapted  # the cases mean what they say: PEFT's own selection
    model = copy.deepcopy(plain)
    assert set(load_peft_adapter(model, tmp_path / "adapter")) == adapted
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), atol=1e-5, rtol=1e-5)


def _llama_with_head_adapter(tmp_path):
    """A tiny transformers Llama and a PEFT adapter on ``q_proj`` and ``lm_head`` saved for it: PEFT saves the
    output layer's whole weight beside the adapter (``save_embedding_layers="auto"``)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    plain = transformers.LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    return plain, tmp_path / "adapter"


@pytest.mark.parametrize("changed", [False, True])
def test_saved_embedding_layers_load_as_peft_loads_them(tmp_path, changed):
    """The output layer's weight saved beside an adapter on it is loaded into the model as PEFT loads it: the same
    outputs as PEFT's model of the folder, whether it is the base's own or (a fine-tune after a change) other values;
    ``keep_base`` takes the first and refuses the second, naming the key, with the model untouched."""
    plain, folder = _llama_with_head_adapter(tmp_path)
    if changed:
        edit_peft_folder(folder, shift="lm_head.base_layer")
    want_model = peft.PeftModel.from_pretrained(copy.deepcopy(plain), folder).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    model = copy.deepcopy(plain)
    assert load_peft_adapter(model, folder) == ["model.layers.0.self_attn.q_proj", "lm_head"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    kept = copy.deepcopy(plain)
    if changed:
        with pytest.raises(AdapterError, match=r"lm_head\.weight replaces the base model's weight"):
            load_peft_adapter(kept, folder, keep_base=True)
        assert not adapters_of(kept) and torch.equal(kept.lm_head.weight, plain.lm_head.weight)
    else:
        load_peft_adapter(kept, folder, keep_base=True)
        assert torch.equal(adapters_of(kept)["lm_head"].base_layer.weight, plain.lm_head.weight)
