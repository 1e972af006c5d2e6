"""apply_lora / merge_all / adapters_of / match_target on a small nested model."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from flora_graph.adapters import FloraAdapter, LoRAAdapter, adapters_of, apply_lora, match_target, merge_all
from flora_graph.errors import AdapterError


class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.qq = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x) + self.qq(x)) * self.k(x) + self.v(x))


class Net(nn.Module):
    """conv stem -> attention block -> MLP; module order: stem, attn.{q,qq,k,v,o}, mlp.{0,2}, seq (a Conv3d, which
    LoRA does not wrap, unused)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, d, 3, padding=1)
        self.attn = Attn(d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.seq = nn.Conv3d(d, d, 3)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h = self.stem(img).mean(dim=(2, 3))
        return self.mlp(self.attn(h))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _nonzero_all(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in adapters_of(model).values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- match_target
@pytest.mark.parametrize(
    ("name", "targets", "want"),
    [
        ("attn.q", ["attn.q"], True),
        ("attn.q", ["q"], True),
        ("attn.qq", ["q"], False),
        ("attn.q", ["tn.q"], False),  # a suffix is whole path components
        ("q", ["q"], True),
        ("attn.q", [re.compile(r"attn\.(q|v)")], True),
        ("attn.qq", [re.compile(r"attn\.(q|v)")], False),  # full match, not search
        ("attn.q", [re.compile(r"q")], False),
        ("attn.q", r"attn\.(q|v)", True),
        ("attn.qq", r"attn\.(q|v)", False),
        ("attn.q", "q", False),  # a single string is a regex over the whole path
        ("mlp.0", r".*\.0", True),
        ("attn.k", ["q", "v"], False),
        ("attn.v", ["q", "v"], True),
    ],
)
def test_match_target(name, targets, want):
    assert match_target(name, targets) is want


# --------------------------------------------------------------------------- apply_lora
def test_exact_name():
    m = _net()
    assert apply_lora(m, ["attn.q"], rank=2) == ["attn.q"]
    assert isinstance(m.attn.q, LoRAAdapter)
    assert m.attn.q.module_name == "attn.q"
    assert type(m.attn.qq) is nn.Linear
    assert list(adapters_of(m)) == ["attn.q"]


def test_suffix_matches_whole_component_only():
    m = _net()
    assert apply_lora(m, ["q"], rank=2) == ["attn.q"]
    assert isinstance(m.attn.q, LoRAAdapter)
    assert type(m.attn.qq) is nn.Linear


def test_regex_string_full_match():
    m = _net()
    assert apply_lora(m, r"attn\.(q|v|o)", rank=2) == ["attn.q", "attn.v", "attn.o"]
    assert type(m.attn.qq) is nn.Linear and type(m.attn.k) is nn.Linear


def test_compiled_pattern_in_list():
    m = _net()
    names = apply_lora(m, [re.compile(r"mlp\.[02]"), "k"], rank=2)
    assert names == ["attn.k", "mlp.0", "mlp.2"]
    assert set(adapters_of(m)) == set(names)


def test_returns_names_in_module_order():
    m = _net()
    names = apply_lora(m, ["mlp.2", "o", "stem", "q", "mlp.0"], rank=2)
    assert names == ["stem", "attn.q", "attn.o", "mlp.0", "mlp.2"]
    assert isinstance(m.stem, LoRAAdapter) and m.stem.is_conv
    assert list(adapters_of(m)) == names


def test_per_module_rank_and_alpha_dicts():
    m = _net()
    apply_lora(m, ["q", "v"], rank={"attn.q": 2, "attn.v": 5}, alpha={"attn.q": 8, "attn.v": -1})
    assert (m.attn.q.rank, m.attn.q.scaling) == (2, 4.0)
    assert (m.attn.v.rank, m.attn.v.scaling) == (5, 1.0)
    assert m.attn.q.lora_A.shape == (2, 8) and m.attn.v.lora_A.shape == (5, 8)


def test_rank_dict_missing_entry_raises_and_leaves_model():
    m = _net()
    with pytest.raises(AdapterError, match=r"'attn.v'"):
        apply_lora(m, ["q", "v"], rank={"attn.q": 2})
    assert adapters_of(m) == {}
    assert all(p.requires_grad for p in m.parameters())


def test_nothing_wrapped_twice():
    m = _net()
    first = apply_lora(m, ["q", "v"], rank=2)
    adapter_q = m.attn.q
    again = apply_lora(m, ["q", "v"], rank=2)
    assert again == []
    assert m.attn.q is adapter_q
    assert type(m.attn.q.base_layer) is nn.Linear
    assert list(adapters_of(m)) == first
    # a regex reaching into the adapters (base_layer, lora_dropout) wraps nothing inside them
    assert apply_lora(m, r"attn\..*", rank=2) == ["attn.qq", "attn.k", "attn.o"]
    for a in adapters_of(m).values():
        assert not isinstance(a.base_layer, LoRAAdapter)
    # a new target next to adapted ones is still wrapped
    assert apply_lora(m, ["q", "mlp.0"], rank=2) == ["mlp.0"]


def test_bad_rank_on_one_target_leaves_model_untouched():
    m = _net()
    before = _state(m)
    x = torch.randn(3, 2, 5, 5)
    out = m(x).detach()
    # rank 0 is refused for stem and mlp.2
    with pytest.raises(AdapterError, match=r"'stem'"):
        apply_lora(m, ["stem", "q"], rank={"stem": 0, "attn.q": 2})
    # here attn.q and attn.v are built (freezing their base layers) before mlp.2 fails
    with pytest.raises(AdapterError, match=r"'mlp.2'"):
        apply_lora(m, ["q", "v", "mlp.2"], rank={"attn.q": 2, "attn.v": 2, "mlp.2": 0})
    assert adapters_of(m) == {}
    assert type(m.attn.q) is nn.Linear and type(m.stem) is nn.Conv2d
    # building the first adapters froze their base layers: that must be undone
    assert all(p.requires_grad for p in m.parameters())
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    torch.testing.assert_close(m(x), out, rtol=0, atol=0)


def test_unsupported_matching_leaf_raises_and_leaves_model():
    m = _net()
    with pytest.raises(AdapterError, match=r"'seq'.*Conv3d"):
        apply_lora(m, ["q", "seq"], rank=2)
    assert adapters_of(m) == {}
    with pytest.raises(AdapterError, match=r"'mlp.1'.*GELU"):
        apply_lora(m, r"mlp\..*", rank=2)
    assert adapters_of(m) == {}


def test_regex_matching_a_container_is_not_an_error():
    m = _net()
    # "attn" (a container) and "mlp" match; only their Linear leaves are not selected by this regex
    assert apply_lora(m, r"attn|attn\.o|mlp", rank=2) == ["attn.o"]


@pytest.mark.parametrize("targets", [["nope"], r"attn", ["attn.qqq"], [re.compile("q")], []])
def test_no_match_raises(targets):
    m = _net()
    with pytest.raises(AdapterError, match="target_modules"):
        apply_lora(m, targets, rank=2)
    assert adapters_of(m) == {}


def test_bad_target_type_raises():
    with pytest.raises(AdapterError):
        apply_lora(_net(), 5, rank=2)  # type: ignore[arg-type]


def test_frozen_base_after_apply():
    m = _net()
    apply_lora(m, ["q"], rank=2)
    assert not m.attn.q.base_layer.weight.requires_grad
    assert m.attn.qq.weight.requires_grad
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "attn.q.lora_A" in trainable and "attn.q.base_layer.weight" not in trainable


# --------------------------------------------------------------------------- merge_all
@pytest.mark.parametrize("adapter_cls", [LoRAAdapter, FloraAdapter])
def test_merge_all_replaces_adapters_and_keeps_output(adapter_cls):
    m = _net()
    x = torch.randn(3, 2, 6, 6)
    base_out = m(x).detach()
    names = apply_lora(m, ["stem", "q", "k", "mlp.0", "mlp.2"], rank=2, alpha=4, adapter_cls=adapter_cls)
    _nonzero_all(m)
    adapted_out = m(x).detach()
    assert not torch.allclose(adapted_out, base_out, atol=1e-4)  # the adapters do something
    assert set(adapters_of(m)) == set(names)
    assert all(isinstance(a, adapter_cls) for a in adapters_of(m).values())

    merged = merge_all(m)
    assert merged == names
    assert adapters_of(m) == {}
    assert type(m.stem) is nn.Conv2d and type(m.attn.q) is nn.Linear and type(m.mlp[2]) is nn.Linear
    assert not any(isinstance(mod, LoRAAdapter) for mod in m.modules())
    torch.testing.assert_close(m(x), adapted_out, rtol=1e-5, atol=1e-5)
    # merged base layers are trainable again, as before apply_lora
    assert m.attn.q.weight.requires_grad


def test_merge_all_non_finite_leaves_model_untouched():
    m = _net()
    apply_lora(m, ["q", "v"], rank=2)
    _nonzero_all(m)
    with torch.no_grad():
        m.attn.v.lora_B[0, 0] = float("nan")
    with pytest.raises(AdapterError, match=r"'attn.v'"):
        merge_all(m)
    assert list(adapters_of(m)) == ["attn.q", "attn.v"]  # attn.q, merged first, was not replaced


def test_merge_all_without_adapters_is_a_no_op():
    m = _net()
    before = _state(m)
    assert merge_all(m) == []
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_unload_all_restores_the_plain_model_and_its_outputs():
    import copy

    import torch
    from torch import nn

    from flora_graph.adapters import apply_lora, unload_all

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = copy.deepcopy(plain)
    apply_lora(model, ["0", "2"], rank=2)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B)
    x = torch.randn(4, 6)
    assert not torch.allclose(model(x), plain(x))
    assert unload_all(model) == ["0", "2"]
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert torch.equal(model(x), plain(x))
    assert all(p.requires_grad for p in model.parameters())
