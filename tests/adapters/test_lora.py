"""LoRAAdapter: forward, merge, parameters, dropout and validation, against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.adapters import LoRAAdapter, apply_lora
from flora_graph.errors import AdapterError, FloraGraphError


def _nonzero(adapter: LoRAAdapter, seed: int = 0) -> LoRAAdapter:
    """Give the adapter a nonzero ``B`` (a zero ``B`` makes every merge test pass trivially)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen).to(adapter.lora_B.dtype))
    return adapter


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- construction
def test_shapes_and_init_linear():
    _seeded(0)
    a = LoRAAdapter(nn.Linear(12, 7), rank=3)
    assert a.lora_A.shape == (3, 12)
    assert a.lora_B.shape == (7, 3)
    assert torch.count_nonzero(a.lora_B) == 0
    # kaiming-uniform(a=sqrt(5)), as nn.Linear: bound 1/sqrt(fan_in), not all zero
    assert a.lora_A.abs().max() <= 1 / math.sqrt(12) + 1e-6
    assert a.lora_A.abs().sum() > 0
    assert a.rank == 3 and a.alpha == 3.0 and a.scaling == 1.0
    assert isinstance(a.base_layer, nn.Linear)


def test_weight_and_bias_are_the_base_layer_s_as_peft_exposes_them():
    """A model that reads its layer's weight directly (a Mamba layer's ``dt_proj``) reads the base layer's."""
    base = nn.Linear(5, 4)
    a = _nonzero(LoRAAdapter(base, rank=2))
    assert a.weight is base.weight and a.bias is base.bias
    assert LoRAAdapter(nn.Linear(5, 4, bias=False), rank=2).bias is None
    assert sorted(n for n, _ in a.named_parameters()) == ["base_layer.bias", "base_layer.weight", "lora_A", "lora_B"]
    x = torch.randn(3, 5)
    assert not torch.allclose(a(x), F.linear(x, a.weight, a.bias))  # the adapter's own forward still adds its branch


def test_shapes_conv():
    a = LoRAAdapter(nn.Conv2d(3, 8, (3, 5)), rank=2)
    assert a.lora_A.shape == (2, 3, 3, 5)
    assert a.lora_B.shape == (8, 2, 1, 1)
    assert torch.count_nonzero(a.lora_B) == 0
    assert a.is_conv


@pytest.mark.parametrize(
    ("rank", "alpha", "scaling"),
    [(4, -1, 1.0), (4, 0, 1.0), (4, 16, 4.0), (8, 4, 0.5), (2, 3.0, 1.5)],
)
def test_alpha_and_scaling(rank, alpha, scaling):
    a = LoRAAdapter(nn.Linear(16, 16), rank=rank, alpha=alpha)
    assert a.scaling == pytest.approx(scaling)
    assert a.alpha == pytest.approx(rank if alpha <= 0 else alpha)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("alpha", [-1, 16])
@pytest.mark.parametrize("shape", [(5, 10), (2, 3, 10)])
def test_forward_linear_matches_independent_formula(alpha, shape):
    _seeded(1)
    a = _nonzero(LoRAAdapter(nn.Linear(10, 6), rank=4, alpha=alpha))
    x = torch.randn(shape)
    want = a.base_layer(x) + a.scaling * (x @ a.lora_A.T @ a.lora_B.T)
    assert a.scaling == (4.0 if alpha == 16 else 1.0)
    torch.testing.assert_close(a(x), want, rtol=1e-5, atol=1e-5)
    # and the LoRA branch really contributes
    assert not torch.allclose(a(x), a.base_layer(x), atol=1e-3)


def _conv_ref64(a: LoRAAdapter, x: torch.Tensor) -> torch.Tensor:
    """F.conv2d in float64 with ``W + s * (B.flatten(1) @ A.flatten(1)).reshape(W.shape)``."""
    base = a.base_layer
    w = base.weight.detach().double()
    delta = (a.lora_B.detach().double().flatten(1) @ a.lora_A.detach().double().flatten(1)).reshape(w.shape)
    b = None if base.bias is None else base.bias.detach().double()
    return F.conv2d(x.double(), w + a.scaling * delta, b, base.stride, base.padding, base.dilation)


CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3)),
    dict(kernel_size=3, padding="same", bias=False),
    dict(kernel_size=1),
]


@pytest.mark.parametrize("conv_kw", CONV_CASES)
@pytest.mark.parametrize("alpha", [-1, 16])
def test_forward_conv_matches_merged_weight_float64(conv_kw, alpha):
    _seeded(2)
    a = _nonzero(LoRAAdapter(nn.Conv2d(3, 5, **conv_kw), rank=2, alpha=alpha))
    x = torch.randn(2, 3, 9, 8)
    got = a(x)
    want = _conv_ref64(a, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- merge
LINEAR_MERGE = [
    # (in, out, rank, input shape)
    (10, 6, 1, (4, 10)),
    (10, 6, 6, (4, 10)),  # rank = min(in, out)
    (5, 9, 5, (2, 3, 5)),  # rank = min(in, out), 3-D input
    (8, 8, 3, (1, 8)),
]


@pytest.mark.parametrize(("fin", "fout", "rank", "xshape"), LINEAR_MERGE)
@pytest.mark.parametrize("alpha", [-1, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_merge_linear_equals_unmerged(fin, fout, rank, xshape, alpha, bias):
    _seeded(3)
    a = _nonzero(LoRAAdapter(nn.Linear(fin, fout, bias=bias), rank=rank, alpha=alpha))
    x = torch.randn(xshape)
    merged = a.merge_to_original_layer()
    assert type(merged) is nn.Linear
    assert (merged.bias is None) == (not bias)
    torch.testing.assert_close(merged(x), a(x), rtol=1e-5, atol=1e-5)
    # the merge changed the weight (a zero B would leave it as is)
    assert not torch.allclose(merged.weight, a.base_layer.weight, atol=1e-4)
    # merged weight is W + s * B @ A, computed here independently
    want = a.base_layer.weight.detach().double() + a.scaling * (a.lora_B.double() @ a.lora_A.double())
    torch.testing.assert_close(merged.weight.detach().double(), want, rtol=1e-6, atol=1e-6)


CONV_MERGE = [
    # (in, out, conv kwargs, rank)
    (3, 5, dict(kernel_size=3, stride=2, padding=1), 1),
    (3, 5, dict(kernel_size=3, stride=2, padding=1), 5),  # rank = min(27, 5)
    (2, 16, dict(kernel_size=(3, 2), padding=(1, 2), dilation=(2, 1)), 12),  # rank = min(2*3*2, 16)
    (4, 6, dict(kernel_size=1, bias=False), 4),  # rank = min(4, 6)
]


@pytest.mark.parametrize(("cin", "cout", "conv_kw", "rank"), CONV_MERGE)
@pytest.mark.parametrize("alpha", [-1, 16])
def test_merge_conv_equals_unmerged(cin, cout, conv_kw, rank, alpha):
    _seeded(4)
    a = _nonzero(LoRAAdapter(nn.Conv2d(cin, cout, **conv_kw), rank=rank, alpha=alpha))
    x = torch.randn(2, cin, 10, 9)
    merged = a.merge_to_original_layer()
    assert type(merged) is nn.Conv2d
    assert merged.stride == a.base_layer.stride and merged.padding == a.base_layer.padding
    assert merged.dilation == a.base_layer.dilation
    torch.testing.assert_close(merged(x), a(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged.weight, a.base_layer.weight, atol=1e-4)
    torch.testing.assert_close(merged(x).double(), _conv_ref64(a, x), rtol=1e-4, atol=1e-4)


def test_merge_leaves_adapter_unchanged_and_returns_new_layer():
    _seeded(5)
    a = _nonzero(LoRAAdapter(nn.Linear(6, 4), rank=2))
    x = torch.randn(3, 6)
    before_out = a(x).detach().clone()
    before_state = {k: v.clone() for k, v in a.state_dict().items()}
    merged = a.merge_to_original_layer()
    assert not isinstance(merged, LoRAAdapter)
    assert merged is not a.base_layer
    assert merged.weight.data_ptr() != a.base_layer.weight.data_ptr()
    for k, v in a.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    torch.testing.assert_close(a(x), before_out, rtol=0, atol=0)
    # a second merge gives the same layer (merging does not accumulate into the adapter)
    torch.testing.assert_close(a.merge_to_original_layer().weight, merged.weight, rtol=0, atol=0)
    # editing the merged layer does not touch the adapter's base layer
    with torch.no_grad():
        merged.weight.zero_()
    assert torch.equal(a.base_layer.weight, before_state["base_layer.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_merge_accumulates_in_fp32_and_casts_back(dtype, kind):
    _seeded(6)
    base = nn.Linear(32, 24) if kind == "linear" else nn.Conv2d(4, 6, 3)
    a = _nonzero(LoRAAdapter(base.to(dtype), rank=4, alpha=16))
    assert a.lora_A.dtype == dtype and a.lora_B.dtype == dtype
    merged = a.merge_to_original_layer()
    assert merged.weight.dtype == dtype
    w = a.base_layer.weight.detach()
    delta = a.scaling * (a.lora_B.detach().float().flatten(1) @ a.lora_A.detach().float().flatten(1))
    want = (w.float() + delta.reshape(w.shape)).to(dtype)
    assert torch.equal(merged.weight, want)


@pytest.mark.parametrize(("dtype", "mantissa_bits"), [(torch.float16, 10), (torch.bfloat16, 7)])
def test_merge_rounds_once_from_fp32(dtype, mantissa_bits):
    """``delta = t + t**2`` with ``t`` half an ulp of 1.0: rounding ``delta`` to ``dtype`` first loses
    ``t**2`` and ``1 + t`` then rounds to even (1.0); one rounding of the fp32 sum gives ``1 + 2t``."""
    t = 2.0 ** -(mantissa_bits + 1)
    a = LoRAAdapter(nn.Linear(2, 2, bias=False).to(dtype), rank=2)
    with torch.no_grad():
        a.base_layer.weight.fill_(1.0)
        a.lora_A.copy_(torch.tensor([[1.0, 1.0], [t, t]], dtype=dtype))
        a.lora_B.fill_(t)
    low_precision = a.base_layer.weight + (a.lora_B @ a.lora_A).to(dtype)  # what an fp16/bf16 merge gives
    assert torch.equal(low_precision, torch.ones(2, 2, dtype=dtype))
    merged = a.merge_to_original_layer()
    assert torch.equal(merged.weight, torch.full((2, 2), 1.0 + 2 * t, dtype=dtype))


def test_delta_weight_is_scaled_b_at_a():
    _seeded(7)
    a = _nonzero(LoRAAdapter(nn.Conv2d(3, 4, 3), rank=2, alpha=6))
    d = a.delta_weight()
    assert d.shape == a.base_layer.weight.shape and d.dtype == torch.float32
    want = 3.0 * (a.lora_B.detach().flatten(1) @ a.lora_A.detach().flatten(1)).reshape(d.shape)
    torch.testing.assert_close(d, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- non-finite merge
def _model(dtype=torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)


def test_merge_inf_b_raises_naming_module():
    m = _model()
    apply_lora(m, ["2"], rank=2)
    with torch.no_grad():
        m[2].lora_B.fill_(float("inf"))
    with pytest.raises(AdapterError, match=r"'2'.*non-finite"):
        m[2].merge_to_original_layer()


def test_merge_nan_weight_raises_naming_module():
    m = nn.Sequential()
    m.add_module("proj", nn.Linear(8, 8))
    apply_lora(m, ["proj"], rank=2)
    _nonzero(m.proj)
    with torch.no_grad():
        m.proj.base_layer.weight[0, 0] = float("nan")
    with pytest.raises(AdapterError) as info:
        m.proj.merge_to_original_layer()
    assert "proj" in str(info.value)


def test_merge_float16_overflow_raises_naming_module():
    m = nn.Sequential()
    m.add_module("head", nn.Linear(16, 8).half())
    apply_lora(m, ["head"], rank=4)
    with torch.no_grad():
        m.head.lora_A.fill_(200.0)
        m.head.lora_B.fill_(200.0)
    delta = m.head.delta_weight()
    assert torch.isfinite(delta).all() and delta.abs().max() > torch.finfo(torch.float16).max
    with pytest.raises(AdapterError, match="head"):
        m.head.merge_to_original_layer()


def test_adapter_error_is_a_flora_graph_error():
    assert issubclass(AdapterError, FloraGraphError)


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_parameter_count_and_requires_grad(kind):
    def base():
        return nn.Linear(10, 6) if kind == "linear" else nn.Conv2d(3, 5, 3)

    lora_n = {"linear": 2 * 10 + 6 * 2, "conv": 2 * 27 + 5 * 2}[kind]
    base_n = {"linear": 10 * 6 + 6, "conv": 5 * 27 + 5}[kind]
    frozen = LoRAAdapter(base(), rank=2)
    assert frozen.is_base_frozen
    assert frozen.parameter_count == lora_n
    assert all(not p.requires_grad for p in frozen.base_layer.parameters())
    assert frozen.lora_A.requires_grad and frozen.lora_B.requires_grad
    assert frozen.parameter_count == sum(p.numel() for p in frozen.parameters() if p.requires_grad)

    unfrozen = LoRAAdapter(base(), rank=2, freeze_base=False)
    assert not unfrozen.is_base_frozen
    assert unfrozen.parameter_count == lora_n + base_n
    assert all(p.requires_grad for p in unfrozen.base_layer.parameters())
    assert unfrozen.parameter_count == sum(p.numel() for p in unfrozen.parameters() if p.requires_grad)


def test_frozen_base_gets_no_gradient():
    _seeded(8)
    a = _nonzero(LoRAAdapter(nn.Linear(6, 4), rank=2))
    a(torch.randn(3, 6)).sum().backward()
    assert a.base_layer.weight.grad is None
    assert a.lora_A.grad is not None and a.lora_B.grad is not None


@pytest.mark.parametrize("freeze", [True, False])
def test_get_set_parameters_round_trip(freeze):
    _seeded(9)
    a = _nonzero(LoRAAdapter(nn.Linear(6, 4), rank=2, freeze_base=freeze))
    vec = a.get_parameters()
    assert vec.dim() == 1 and vec.numel() == a.parameter_count
    # packing order: base params (if unfrozen), then A, then B
    parts = ([] if freeze else [a.base_layer.weight, a.base_layer.bias]) + [a.lora_A, a.lora_B]
    torch.testing.assert_close(vec, torch.cat([p.detach().reshape(-1) for p in parts]), rtol=0, atol=0)

    b = LoRAAdapter(nn.Linear(6, 4), rank=2, freeze_base=freeze)
    b.set_parameters(vec)
    torch.testing.assert_close(b.get_parameters(), vec, rtol=0, atol=0)
    torch.testing.assert_close(b.lora_A, a.lora_A, rtol=0, atol=0)
    torch.testing.assert_close(b.lora_B, a.lora_B, rtol=0, atol=0)

    # a new vector changes the forward exactly as the independent formula says
    new = torch.randn(vec.numel())
    a.set_parameters(new)
    off = 0
    if not freeze:
        w = new[:24].reshape(4, 6)
        bias = new[24:28]
        off = 28
    else:
        w, bias = a.base_layer.weight.detach(), a.base_layer.bias.detach()
    A = new[off : off + 12].reshape(2, 6)
    B = new[off + 12 :].reshape(4, 2)
    x = torch.randn(5, 6)
    want = x @ w.T + bias + a.scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(a(x), want, rtol=1e-5, atol=1e-5)
    # the returned vector is a copy, not a view of the parameters
    got = a.get_parameters()
    got.zero_()
    assert a.lora_B.abs().sum() > 0


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(33), torch.zeros(2, 16), torch.zeros(())])
def test_set_parameters_wrong_shape_raises(bad):
    a = LoRAAdapter(nn.Linear(10, 6), rank=2)  # 32 LoRA values
    assert a.parameter_count == 32
    before = a.get_parameters()
    with pytest.raises(AdapterError, match="32"):
        a.set_parameters(bad)
    torch.testing.assert_close(a.get_parameters(), before, rtol=0, atol=0)


def test_set_parameters_wrong_length_names_module():
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(4, 4))
    apply_lora(m, ["fc"], rank=1)
    with pytest.raises(AdapterError, match="fc"):
        m.fc.set_parameters(torch.zeros(3))


def test_reset_state_keeps_outputs():
    _seeded(10)
    a = _nonzero(LoRAAdapter(nn.Linear(6, 4), rank=2))
    x = torch.randn(3, 6)
    before = a(x).detach().clone()
    a.reset_state()
    torch.testing.assert_close(a(x), before, rtol=0, atol=0)


# --------------------------------------------------------------------------- dropout
def test_dropout_applies_only_to_lora_branch():
    _seeded(11)
    p = 0.5
    a = _nonzero(LoRAAdapter(nn.Linear(16, 8), rank=4, dropout=p))
    x = torch.randn(6, 16)
    a.train()
    torch.manual_seed(123)
    got = a(x)
    torch.manual_seed(123)
    xd = F.dropout(x, p, training=True)
    want = a.base_layer(x) + a.scaling * (xd @ a.lora_A.T @ a.lora_B.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the dropout really dropped something, so the train output differs from eval
    a.eval()
    clean = a(x)
    assert not torch.allclose(got, clean, atol=1e-4)
    # with B = 0 the train output is exactly base(x): the base branch sees the undropped x
    with torch.no_grad():
        a.lora_B.zero_()
    a.train()
    torch.testing.assert_close(a(x), a.base_layer(x), rtol=0, atol=0)


def test_dropout_eval_is_deterministic():
    _seeded(12)
    a = _nonzero(LoRAAdapter(nn.Linear(16, 8), rank=4, dropout=0.3)).eval()
    x = torch.randn(6, 16)
    want = a.base_layer(x) + a.scaling * (x @ a.lora_A.T @ a.lora_B.T)
    torch.testing.assert_close(a(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_dropout_out_of_range_raises(p):
    with pytest.raises(AdapterError, match="dropout"):
        LoRAAdapter(nn.Linear(4, 4), rank=2, dropout=p)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "8", None])
def test_bad_alpha_raises(alpha):
    with pytest.raises(AdapterError, match="alpha"):
        LoRAAdapter(nn.Linear(4, 4), rank=2, alpha=alpha)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
@pytest.mark.parametrize("direct", [True, False])
def test_bad_rank_raises(rank, direct):
    if direct:
        with pytest.raises(AdapterError, match="rank"):
            LoRAAdapter(nn.Linear(8, 8), rank=rank)
        return
    m = nn.Sequential()
    m.add_module("enc", nn.Linear(8, 8))
    with pytest.raises(AdapterError, match=r"'enc'.*rank"):
        apply_lora(m, ["enc"], rank=rank)
    assert type(m.enc) is nn.Linear


def test_rank_above_min_in_out_is_exact_as_in_peft():
    """A rank above min(in, out) is redundant but exact (PEFT allows it: a one-output gate or score layer
    adapted with r 8); the branch is still x A^T B^T * alpha / r."""
    torch.manual_seed(0)
    for layer, rank in ((nn.Linear(10, 6), 7), (nn.Linear(3, 10), 4), (nn.Linear(8, 1), 8)):
        a = LoRAAdapter(layer, rank=rank, alpha=16)
        nn.init.normal_(a.lora_B, std=0.5)
        x = torch.randn(5, layer.in_features)
        want = layer(x) + (x @ a.lora_A.T @ a.lora_B.T) * (16 / rank)
        torch.testing.assert_close(a(x), want)
    m = nn.Sequential()
    m.add_module("down", nn.Linear(10, 6))
    assert apply_lora(m, ["down"], rank=7) == ["down"]


def test_rank_above_fan_in_on_conv_is_exact():
    # fan_in = in * kh * kw = 3 * 3 * 3 = 27 < out = 32: rank may exceed in_channels, and fan_in too
    torch.manual_seed(0)
    for rank in (27, 28):
        a = LoRAAdapter(nn.Conv2d(3, 32, 3), rank=rank, alpha=rank)
        assert a.lora_A.shape == (rank, 3, 3, 3)
        nn.init.normal_(a.lora_B, std=0.5)
        x = torch.randn(2, 3, 6, 6)
        want = a.base_layer(x) + F.conv2d(F.conv2d(x, a.lora_A), a.lora_B)
        torch.testing.assert_close(a(x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(AdapterError, match="rank"):
        LoRAAdapter(nn.Conv2d(16, 4, 3), rank=0)


@pytest.mark.parametrize(
    ("layer", "what"),
    [
        (nn.Conv3d(3, 4, 3), "Conv3d"),
        (nn.Embedding(10, 4, max_norm=1.0), "max_norm"),
        (nn.Conv2d(4, 8, 3, groups=2), "multiple of the groups"),  # rank 1 of groups 2
        (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv2d(4, 8, 2, padding="same"), "same"),
    ],
)
def test_unsupported_base_raises_naming_module(layer, what):
    with pytest.raises(AdapterError, match=what):
        LoRAAdapter(layer, rank=1)
    m = nn.Sequential()
    m.add_module("blk", layer)
    with pytest.raises(AdapterError, match=r"'blk'") as info:
        apply_lora(m, ["blk"], rank=1)
    assert what in str(info.value)
    assert m.blk is layer
