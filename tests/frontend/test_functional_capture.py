"""capture() of models with in-place ops.

``torch.export`` leaves ``add_``, ``div_``, ``index_put_``, ``masked_fill_`` in its graph. An
in-place op on a tensor the model computed, that no view shares, converts as its functional twin
(:mod:`flora_graph.frontend.mutations`): no retrace. Anything else (a write through a view, a view
read after the write) makes capture run ``run_decompositions({})``, which turns the program
functional and keeps ``linear``, attention, layer norm and the LoRA op whole. Both paths match eager.
"""

from __future__ import annotations

import importlib

import numpy as np
import peft
import pytest
import torch
from torch import nn

from flora_graph.errors import GraphError
from flora_graph.frontend import capture
from flora_graph.frontend.capture import trace_with_torch_export
from flora_graph.ir import Op
from flora_graph.runtimes import compile
from flora_graph.runtimes.reference import run

ATOL = RTOL = 1e-5
LORA = torch.ops.flora_graph.lora_linear.default


class InPlace(nn.Module):
    """Every in-place form the issue names, on a value computed inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h.add_(y)
        h.div_(2)
        row = torch.tanh(h[0])
        row[torch.tensor([0, 3])] = 0.25  # index_put_ (along a static axis)
        h.masked_fill_(h > 0.5, -1.0)
        return torch.relu(h) + row


def _feeds(batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 6, generator=gen), "y": torch.randn(batch, 6, generator=gen)}


def _eager(model: nn.Module, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**feeds).numpy()


def _targets(model: nn.Module, example, dims) -> set:
    ep = trace_with_torch_export(model, example, dims)[0]
    return {n.target for n in ep.graph.nodes if n.op == "call_function"}


class InPlaceStale(InPlace):
    """:class:`InPlace`'s ops, with a view of ``h`` taken before its writes and read after them (it sees them): the
    program is functionalized."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        early = h[:, :1]
        h.add_(y)
        h.div_(2)
        row = torch.tanh(h[0])
        row[torch.tensor([0, 3])] = 0.25
        h.masked_fill_(h > 0.5, -1.0)
        return torch.relu(h) + row + early


def test_in_place_ops_become_functional() -> None:
    torch.manual_seed(0)
    targets = _targets(InPlaceStale().eval(), _feeds(3, 0), {"x": {0: "b"}, "y": {0: "b"}})
    aten = torch.ops.aten
    assert {aten.add.Tensor, aten.div.Tensor, aten.index_put.default, aten.masked_fill.Scalar} <= targets
    assert not [t for t in targets if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable]
    assert aten.linear.default in targets  # nothing decomposed


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
@pytest.mark.parametrize("model_cls", [InPlace, InPlaceStale])  # converted as traced, and functionalized
def test_in_place_module_matches_eager(backend: str, model_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    g = capture(model, _feeds(3, 0), {"x": {0: "b"}, "y": {0: "b"}})
    assert {Op.INDEX_PUT, Op.WHERE} <= {n.op for n in g.nodes}
    exe = None if backend == "numpy" else compile(g, backend)
    for k, batch in enumerate((2, 5)):
        feeds = _feeds(batch, k + 1)
        np_feeds = {n: v.numpy() for n, v in feeds.items()}
        got = run(g, np_feeds) if exe is None else exe(**np_feeds)
        np.testing.assert_allclose(next(iter(got.values())), _eager(model, feeds), atol=ATOL, rtol=RTOL)


def test_functional_graph_is_not_retraced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph without in-place ops pays only the check: run_decompositions never runs."""
    def refuse(*a, **k):
        raise AssertionError("run_decompositions on a functional graph")

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", refuse)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU()).eval()
    capture(model, torch.randn(3, 6), {"input": {0: "b"}})


def test_lora_op_attention_and_norm_survive_functionalization() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.q(x).unflatten(-1, (2, 4)).transpose(1, 2)
            a = torch.nn.functional.scaled_dot_product_attention(h, h, h).transpose(1, 2).flatten(2)
            first = a[:, :1]  # a view taken before the write and read after it: the program is functionalized
            a.add_(x)
            return self.norm(a) + first

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q"], init_lora_weights=False)
    model = peft.get_peft_model(Block(), cfg).eval()
    x, dims = torch.randn(2, 5, 8), {"x": {0: "b", 1: "s"}}
    aten = torch.ops.aten
    targets = _targets(model, x, dims)
    assert {LORA, aten.scaled_dot_product_attention.default, aten.layer_norm.default, aten.add.Tensor} <= targets
    g = capture(model, x, dims)
    assert {"lora_down", "lora_up"} <= {n.meta.get("role") for n in g.nodes}
    xr = torch.randn(3, 7, 8)
    np.testing.assert_allclose(next(iter(run(g, {"x": xr.numpy()}).values())), _eager(model, {"x": xr}),
                               atol=ATOL, rtol=RTOL)


def test_transformer_encoder_with_dynamic_batch_and_seq_matches_eager() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    g = capture(model, torch.randn(3, 6, 16), {"src": {0: "batch", 1: "seq"}})
    assert g.inputs[0].shape[:2] == ("batch", "seq")
    for k, (b, s) in enumerate(((2, 5), (4, 9))):
        src = torch.randn(b, s, 16, generator=torch.Generator().manual_seed(k))
        got = next(iter(run(g, {"src": src.numpy()}).values()))
        np.testing.assert_allclose(got, _eager(model, {"src": src}), atol=ATOL, rtol=RTOL)


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return x * 2


class WritesInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2)


@pytest.mark.parametrize(("model", "what"), [(Counter(), "buffer 'calls'"), (WritesInput(), "input 'x'")])
def test_a_mutation_that_outlives_the_call_is_refused(model: nn.Module, what: str) -> None:
    with pytest.raises(GraphError, match=f"writes {what} in place"):
        capture(model, torch.randn(2, 3))


class Overwrites(nn.Module):
    """As transformers' longrope: the buffer is set whole from this call's input before anything reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("short", torch.tensor([1.0, 2.0, 3.0]))
        self.register_buffer("long", torch.tensor([4.0, 5.0, 6.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale.copy_(torch.where(x.max() > 0, self.long, self.short))
        return x * self.scale


class PartlyOverwrites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("state", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.state[:1].copy_(x[0, :1])  # the rest of the buffer carries over from the last call
        return x + self.state


def test_a_buffer_overwritten_before_any_read_carries_no_state_and_is_captured() -> None:
    g = capture(Overwrites(), torch.randn(2, 3), {"x": {0: "batch"}})
    for x in (torch.rand(4, 3) + 0.1, -torch.rand(2, 3) - 0.1):  # the long set, then the short one
        got = next(iter(run(g, {"x": x.numpy()}).values()))
        np.testing.assert_allclose(got, _eager(Overwrites(), {"x": x}), atol=ATOL, rtol=RTOL)
    with pytest.raises(GraphError, match="writes buffer 'state' in place"):
        capture(PartlyOverwrites(), torch.randn(2, 3))


class ReassignsBuffer(nn.Module):
    """As CTRL's model: a buffer assigned its own ``to`` in the dtype it has on every call (no state: the value
    written is the one read), which torch.export records as a copy into the buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.table = self.table.to(dtype=torch.float32)
        return self.table[ids] * 2


def test_a_buffer_assigned_its_own_value_carries_no_state_and_is_captured() -> None:
    g = capture(ReassignsBuffer(), torch.tensor([[1, 2, 3], [4, 5, 6]]), {"ids": {0: "batch", 1: "seq"}})
    ids = torch.tensor([[0, 5], [15, 7]])
    got = next(iter(run(g, {"ids": ids.numpy()}).values()))
    np.testing.assert_allclose(got, _eager(ReassignsBuffer(), {"ids": ids}), atol=ATOL, rtol=RTOL)


def test_detach_in_place_is_not_a_reason_to_functionalize(monkeypatch) -> None:
    """transformers' caches call ``detach_``: it changes autograd metadata only, so the program is converted as
    traced (no ``run_decompositions``), with ``detach_`` as the identity."""
    import importlib

    import torch

    from flora_graph.frontend import capture as capture_fn

    module = importlib.import_module("flora_graph.frontend.capture")
    calls = []
    monkeypatch.setattr(module, "_functionalize", lambda ep, name: calls.append(name) or ep)

    class Detached(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            y.detach_()
            return y + 1

    graph = capture_fn(Detached(), torch.randn(2, 3), {"x": {0: "batch"}})
    assert calls == []
    from flora_graph.runtimes import run

    x = torch.randn(4, 3)
    assert (run(graph, {"x": x.numpy()})["output"] == (x * 2 + 1).numpy()).all()


# --------------------------------------------------------------------------- in-place ops without a retrace
class Fresh(InPlace):
    """:class:`InPlace`'s ops with no view of what they write (``row`` from ``x``, not ``h[0]``): no retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h.add_(y).mul_(0.5).masked_fill_(h > 0.4, -1.0)
        row = torch.tanh(x.sum(0))
        row[torch.tensor([0, 3])] = 0.25  # index_put_ on a fresh tensor
        return torch.relu(h) + row


class ThroughView(nn.Module):
    """A write through a view (it changes ``h`` too)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x * 2
        v = h.unsqueeze(0)
        v.add_(y)
        return h + 1


class ViewReadAfter(nn.Module):
    """A view taken before the write and read after it (it sees the write)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x * 2
        v = h[:, :2]
        h.add_(y)
        return v * 3


class SplitItem(nn.Module):
    """An item of ``split`` is a view of the tensor split: writing it writes that tensor."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x * 2
        a, _ = h.split(3, dim=1)
        a.mul_(10)
        return h + y


class SameDtypeTo(nn.Module):
    """``to`` of the same dtype is the tensor itself: writing the result writes the input, which nothing reads after
    (torch.export returns the write's result), so the write converts as it is."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x * 2
        h.to(torch.float32).add_(y)
        return h


class ClonedState(nn.Module):
    """As a Mamba-2 layer's convolution state: a clone of the cache's, read through a slice, then overwritten whole
    (``copy_``); the slice is read before the write, so it converts as it is."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state = x.clone()
        shifted = torch.cat([state[:, 1:], y[:, :1]], dim=1)
        state.copy_(shifted)
        return state * 2


class AliasedState(nn.Module):
    """As a gated delta layer's recurrent state: ``to`` in its own dtype of a clone (an alias of it), read, then
    written whole through that alias; nothing reads the clone after, so it converts as it is."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state = x.clone().to(torch.float32)
        out = state * y
        state.copy_(out + 1)
        return state + out


class MadeConstant(nn.Module):
    """A tensor made in the call (torch.export lifts it as a constant), detached and counted up in place, as a
    transformers cache layer counts its tokens (``cumulative_length.add_``); and a computed tensor written through
    ``detach_``: no view of either, so no retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count = torch.tensor(2.0)
        count.detach_()
        count.add_(x.shape[0])
        h = x * 2
        h.detach_().add_(y)
        return h * count


class SliceFilled(nn.Module):
    """A tensor made in the call filled slice by slice (latent attention's keys: ``k[..., :d].copy_(k_nope)``), one
    slice scaled in place after: each write a ``slice_scatter`` into it, no retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x.new_empty(x.shape[0], 8)
        h[:, :5].copy_(x[:, :5] * 3)
        h[:, 5:].copy_(y[:, :1])  # broadcast over the slice
        h[:, 1:4].mul_(-2)
        return h + 1


class SliceStaleView(nn.Module):
    """A view taken before a slice's write and read after it (it sees the write): a retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x * 2
        v = h[:, 3:]
        h[:, :4].mul_(0)
        return v + y[:, :3]


class SelectFilled(nn.Module):
    """BART's decoder tokens: ``x`` shifted right into a tensor made in the call (a slice of a ``select``), its first
    place set to a start value (``fill_`` of a select of a select, by a 0-d tensor), then another select written from
    ``y`` and scaled in place: each write a ``select_scatter`` (a ``slice_scatter`` inside one) into the tensor, no
    retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 2, 6)
        h[:, 0, 1:] = x[:, :-1]
        h[:, 0, 0] = 7.0
        h[:, 1] = y
        h[:, -1].mul_(-2)
        return h + 1


class SelectStaleView(nn.Module):
    """A view taken before a select's write and read after it (it sees the write): a retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x * 2
        v = h[:, :2]
        h[:, 0] = 0.5
        return v + y[:, :2]


class SharedCutFilled(nn.Module):
    """Qwen3.5's rotary layout: ``t = f[0]`` (a select other writes and reads share), strided slices of it written from
    ``f``'s other rows, then ``t`` read: each write a ``slice_scatter`` into ``t`` and a ``select_scatter`` into ``f``,
    no retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = torch.stack([x, y, x * y])
        t = f[0]
        t[..., 1::3] = f[1, ..., 1::3]
        t[..., 2::3] = f[2, ..., 2::3]
        return torch.cat([t, f[0] * 2], dim=-1)


class ViewAfterCutStale(nn.Module):
    """A view taken after the written slice was cut but before the write, read after it (it sees the write): a
    retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x * 2
        s = h[:, :4]
        v = h[:, 3:]
        s.mul_(0)
        return v + y[:, :3]


class ViewChainScaled(nn.Module):
    """DeBERTa's ``pos_query_layer /= scale``: a projection viewed as heads and permuted, then divided in place,
    nothing else reading the projection or its view: the write reaches the permuted tensor alone, no retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = (x * 2).view(x.shape[0], 2, 3).permute(0, 2, 1)
        h /= y[:, :1, None].abs() + 1
        return h.reshape(x.shape[0], 6) + 1


class ViewChainBaseRead(nn.Module):
    """The same, with the projection read after the write (it sees the write through the view): a retrace."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = x * 2
        h = p.view(x.shape[0], 2, 3).permute(0, 2, 1)
        h /= y[:, :1, None].abs() + 1
        return p + 1


def _retraces(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> tuple[int, object]:
    module = importlib.import_module("flora_graph.frontend.capture")  # the module: the package exports capture()
    calls: list[str] = []
    real = module._functionalize
    monkeypatch.setattr(module, "_functionalize", lambda ep, name: calls.append(name) or real(ep, name))
    g = capture(model, _feeds(3, 0), {"x": {0: "b"}, "y": {0: "b"}})
    return len(calls), g


@pytest.mark.parametrize(("model", "retrace"), [(Fresh, False), (MadeConstant, False), (SliceFilled, False),
                                                (SliceStaleView, True), (ThroughView, True), (ViewReadAfter, True),
                                                (SplitItem, True), (SameDtypeTo, False), (InPlaceStale, True),
                                                (ClonedState, False), (AliasedState, False),
                                                (SelectFilled, False), (SelectStaleView, True),
                                                (SharedCutFilled, False), (ViewAfterCutStale, True),
                                                (ViewChainScaled, False), (ViewChainBaseRead, True)])
def test_in_place_ops_convert_without_a_retrace_only_where_no_view_shares_them(model, retrace, monkeypatch) -> None:
    torch.manual_seed(0)
    m = model().eval()
    calls, g = _retraces(m, monkeypatch)
    assert calls == int(retrace)
    for k, batch in enumerate((2, 5)):
        feeds = _feeds(batch, k + 1)
        got = run(g, {n: v.numpy() for n, v in feeds.items()})
        np.testing.assert_allclose(next(iter(got.values())), _eager(m, feeds), atol=ATOL, rtol=RTOL)


def test_functional_twins() -> None:
    from flora_graph.frontend.mutations import functional_of

    aten = torch.ops.aten
    assert functional_of(aten.add_.Tensor) is aten.add.Tensor
    assert functional_of(aten.masked_fill_.Scalar) is aten.masked_fill.Scalar
    assert functional_of(aten.index_put_.default) is aten.index_put.default
    assert functional_of(aten.add.Tensor) is None  # nothing written


class AutocastOff(nn.Module):
    """A region run with autocast off (``with torch.autocast(..., enabled=False)``, as Qwen3-MoE routes its experts),
    with no in-place op, and within it a region with gradients on and a second with autocast off, nested: torch.export
    wraps each in ``wrap_with_autocast`` / ``wrap_with_set_grad_enabled``, which capture inlines."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            h = self.proj(x.float()).softmax(-1)
            with torch.enable_grad():  # capture runs under no_grad: a region of its own
                h = h * 2 + y[:, 1:5]
                with torch.autocast("cpu", enabled=False):
                    h = h.tanh()
        return h * y[:, :4]


def test_a_region_with_autocast_off_is_inlined_without_a_retrace(monkeypatch) -> None:
    torch.manual_seed(0)
    m = AutocastOff().eval()
    with torch.no_grad():
        ep = torch.export.export(m, (_feeds(3, 0)["x"], _feeds(3, 0)["y"]), strict=False)
    wrapped = [n for n in ep.graph.nodes if n.op == "call_function" and "wrap_with" in str(n.target)]
    assert wrapped  # torch.export wraps the regions: what capture must take apart
    calls, g = _retraces(m, monkeypatch)
    assert calls == 0
    for backend in ("numpy", "onnxruntime"):
        exe = compile(g, backend)
        for k, batch in enumerate((2, 5)):
            feeds = _feeds(batch, k + 1)
            got = exe(**{n: v.numpy() for n, v in feeds.items()})
            np.testing.assert_allclose(next(iter(got.values())), _eager(m, feeds), atol=ATOL, rtol=RTOL)
