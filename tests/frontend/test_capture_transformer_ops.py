"""capture() of the transformer ATen ops: small modules with a dynamic batch and sequence, against eager torch.

Every module is captured once (example ``[3, 6, ...]``) with dims ``batch`` and ``seq`` and
run by the numpy reference at two other sizes; one module also runs on every backend. The
converters that ran are recorded: every converter of the transformer ATen ops
(:data:`TRANSFORMER_TARGETS`) and every IR op of the family must come out of some module here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend import ATEN_TABLE, capture
from flora_graph.ir import Graph, Op
from flora_graph.runtimes.executable import compile
from flora_graph.runtimes.reference import run

from .test_capture import _recording_table

ATOL = RTOL = 1e-5
EXAMPLE = (3, 6)
RUN = ((2, 5), (4, 9))
DIMS = {0: "batch", 1: "seq"}

TRANSFORMER_OPS = {
    Op.GATHER, Op.GATHER_ELEMENTS, Op.INDEX, Op.SLICE, Op.UNSQUEEZE, Op.SQUEEZE, Op.EXPAND, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.RECIPROCAL, Op.COS, Op.SIN,
    Op.ABS, Op.POW, Op.EQUAL, Op.LESS, Op.LESS_OR_EQUAL, Op.GREATER, Op.GREATER_OR_EQUAL, Op.NOT, Op.AND, Op.OR, Op.WHERE, Op.CAST,
    Op.REDUCE_MEAN, Op.REDUCE_SUM, Op.CUMSUM, Op.RMS_NORM, Op.SDPA, Op.ARANGE,
}
"""IR ops that these models produce (test_capture.py checks the rest of the op set)."""



def _overloads(names: str) -> set[torch._ops.OpOverload]:
    """``"abs.default eq.Tensor"`` -> ``{aten.abs.default, aten.eq.Tensor}``."""
    return {getattr(getattr(torch.ops.aten, op), overload) for op, overload in (n.split(".") for n in names.split())}


TRANSFORMER_TARGETS = _overloads("""
    _to_copy.default to.dtype to.dtype_layout to.device type_as.default
    exp.default log.default sqrt.default rsqrt.default reciprocal.default cos.default sin.default abs.default
    pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar
    eq.Tensor eq.Scalar ne.Tensor ne.Scalar lt.Tensor lt.Scalar le.Tensor le.Scalar gt.Tensor gt.Scalar ge.Tensor ge.Scalar
    logical_not.default bitwise_not.default logical_and.default bitwise_and.Tensor __and__.Tensor
    logical_or.default bitwise_or.Tensor __or__.Tensor
    where.self where.ScalarOther where.ScalarSelf where.Scalar masked_fill.Scalar masked_fill.Tensor
    triu.default tril.default diff.default
    addmm.default
    mean.dim sum.dim_IntList mean.default sum.default cumsum.default
    rms_norm.default glu.default
    scaled_dot_product_attention.default _scaled_dot_product_flash_attention_for_cpu.default
    _scaled_dot_product_efficient_attention.default
    slice.Tensor unsqueeze.default squeeze.dim squeeze.dims squeeze.default expand.default expand_as.default
    embedding.default index_select.default gather.default select.int unbind.int index.Tensor
    arange.default arange.start arange.start_step full.default ones.default zeros.default new_ones.default
    new_zeros.default new_full.default full_like.default ones_like.default zeros_like.default scalar_tensor.default
""")
"""The transformer ATen ops: those these models exercise (test_capture.py checks the rest of ``ATEN_TABLE``)."""

# overloads torch.export does not emit for modules written in plain torch (they come from other paths)
_NOT_EXERCISED = {
    torch.ops.aten._to_copy.default,  # after decompositions; capture exports training IR (to.dtype)
    torch.ops.aten.to.dtype_layout,  # from transformers' code paths
    torch.ops.aten._scaled_dot_product_efficient_attention.default,  # a CUDA kernel's op
    torch.ops.aten.squeeze.default,  # squeezing every size-1 dim guards each dynamic dim != 1
    torch.ops.aten.scalar_tensor.default,
}


def _w(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- models: x [b, s, 8], ids [b, s]
class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.register_buffer("cols", torch.tensor([7, 0, 3]))
        self.register_buffer("rows", torch.tensor([[1], [0]]))
        self.register_buffer("pick", torch.tensor([[[5, 1]]]))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        e = self.emb(ids)  # embedding
        picked = torch.index_select(x, 2, self.cols)  # index_select
        last = x.select(1, -1)  # select.int on the dynamic dim
        first = x[:, 0]  # select.int
        adv = x[:, :, self.cols]  # index.Tensor with one index tensor
        adv2 = x[:, self.rows, self.cols]  # two index tensors on consecutive axes: Index
        b = torch.arange(x.shape[0])[:, None, None]
        pos = torch.arange(x.shape[1])[None, :, None]
        hf = ids[b, pos]  # transformers' mask creation: a batch and a position index
        gathered = torch.gather(x, 2, self.pick.expand(x.shape[0], x.shape[1], 2))  # GatherElements
        steps = torch.diff(ids, prepend=ids[:, :1] - 1) + torch.diff(x, dim=-1).sum(-1).long()
        return e + x, picked, last - first, adv, adv2, hf, gathered, steps


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)  # each [b, 2, s, 4]
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        pos = torch.arange(s)
        keep = pos[None, :] <= pos[:, None]  # a bool mask built from arange + comparison
        boolean = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
        bias = torch.zeros(s, s).masked_fill(~keep, float("-inf"))  # a float mask
        additive = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        gqa = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], is_causal=True, enable_gqa=True)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]
        return causal, boolean, additive, gqa, flash


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_w(8) * 0.1 + 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fused = F.rms_norm(x, (8,), self.w, 1e-5)
        plain = F.rms_norm(x, (6, 8)[1:])  # eps None: finfo(float32).eps
        prims = self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))  # as Llama writes it
        return fused, plain, prims


class Math(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = torch.sqrt(x.abs()) + torch.exp(x) - torch.log(x.abs() + 1) + torch.cos(x) * torch.sin(x)
        b = torch.reciprocal(x.abs() + 0.5) + torch.pow(x.abs() + 0.1, x) + 2.0**x
        b = b + F.glu(torch.cat([x, x.flip(-1)], -1))  # Conformer's gated convolution module
        c = torch.rsqrt(ids.abs() + 1)  # an integer input promoted to float
        d = ids * 0.5 + ids / 2  # int * float, int / int -> float
        return a, b, c, d


class Reductions(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = x.mean(-1) + x.mean((1, 2), keepdim=True).squeeze(-1) + x.mean()
        s = x.sum(1, keepdim=True) * x.sum()
        c = torch.cumsum(x, dim=1)
        count = (ids > 3).cumsum(-1)  # bool -> int64
        total = (ids > 3).sum(-1)
        return m, s, c, count, total


class Logic(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lt, le, gt, ge = x < 0.5, x <= ids[..., None], x > 0, x >= ids[..., None] - 1
        lt, le, gt, ge = lt | (x < x * 2), le & x.le(0.2), gt & (x > x.mean(-1, keepdim=True)), ge | x.ge(0.1)
        eq, ne = ids == 3, ids != 2
        both = (lt & ~gt) | (le & ge)
        either = torch.logical_not(both) | eq[..., None]
        fill = torch.where(either, x, 0.0) + x.masked_fill(lt, -1.0) + torch.where(ne[..., None], x, x * 2)
        fill = fill + torch.where(gt, 1.0, x) + torch.where(ge, 1.0, -1.0) + x.masked_fill(le, torch.tensor(2.0))
        more = torch.logical_and(lt, ge) | torch.logical_or(gt, le) | torch.bitwise_and(lt, gt) | torch.bitwise_or(le, ge)
        return fill, both | more, ne.to(torch.int64) + ids.eq(ids).long() + (ids != ids.abs()).long()


class Casts(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wide = (x.to(torch.float64) * 2).float()
        idf = ids.float() + (x > 0).long().sum(-1)
        half = x.half().float()
        moved = x.to("cpu", torch.float64) + x.to(device="cpu", dtype=torch.float64) + x.type_as(ids)
        return wide, idf, half, ids.to(torch.int32), moved


class Movement(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("empty", torch.tensor([]))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape
        head = x[:, :, 2:6] + x[..., ::2]  # static slices (with a step)
        first = x[:, :1] + x[:, : x.shape[1]]  # a static end and a dynamic end on the dynamic dim
        # x[:, -2:] and self.table[:s] export only with a bounded seq (torch guards seq != 2, seq <= 32), which
        # capture's dims do not set: their Slice lowerings are tested in tests/ops/test_movement.py
        u = x.unsqueeze(1).unsqueeze(-1).squeeze(dim=(1, 4))
        e = x[:, :1].expand(b, s, 8) + x[:, :, :1].expand(-1, -1, 8) + x[:, :1].expand_as(x)
        cached = torch.cat([self.empty, x], dim=-2)  # a KV cache's first update: torch skips the 1-D empty tensor
        return head, first, u, e, cached


class Sources(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape
        pos = torch.arange(s) + torch.arange(2, 10, 2).sum()  # dynamic and static arange
        fill = torch.full((b, s), 2.5) + x.new_ones(b, s) + torch.zeros(b, s) + x.new_zeros(b, s) + x.new_full((b, s), 3.0)
        fill = fill + torch.arange(1, 5)[:1]
        ones = torch.ones(s, s).triu(1) + torch.ones(5, 5).tril(-1)[:1, :1]
        tri = x[..., None].expand(b, s, 8, 8).tril() + torch.ones(b, s, s).triu()[..., :1, None]
        tri = tri + torch.zeros_like(x)[..., None] + torch.ones_like(x)[..., None] + torch.full_like(x, 0.5)[..., None]
        return pos, fill, ones, tri


class AddMM(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x2d, W[in, out])``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(_w(8, 5)), nn.Parameter(_w(5, seed=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return torch.addmm(self.bias, x.view(-1, 8), self.weight).view(b, s, 5)


@dataclass
class Model:
    build: Callable[[], nn.Module]
    uses_ids: bool = False


MODELS = {
    "embeddings": Model(Embeddings, True),
    "attention": Model(Attention),
    "norms": Model(Norms),
    "math": Model(Math, True),
    "reductions": Model(Reductions, True),
    "logic": Model(Logic, True),
    "casts": Model(Casts, True),
    "movement": Model(Movement, True),
    "sources": Model(Sources),
    "addmm": Model(AddMM),
}


def inputs(spec: Model, b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(b, s, 8, generator=gen)}
    if spec.uses_ids:
        out["ids"] = torch.randint(0, 11, (b, s), generator=gen)
    return out


@pytest.fixture(scope="module")
def captured() -> dict:
    """Each model captured once (an exception is kept and re-raised by its tests); converter hits recorded."""
    hits: set = set()
    saved = _recording_table(hits)
    out: dict = {"_hits": hits}
    try:
        for name, spec in MODELS.items():
            torch.manual_seed(0)
            model = spec.build().eval()
            example = inputs(spec, *EXAMPLE)
            try:
                out[name] = (model, capture(model, example, {k: DIMS for k in example}))
            except Exception as exc:
                out[name] = exc
    finally:
        ATEN_TABLE.clear()
        ATEN_TABLE.update(saved)
    return out


def get(captured: dict, name: str) -> tuple[nn.Module, Graph]:
    if isinstance(captured[name], Exception):
        raise captured[name]
    return captured[name]


def eager(model: nn.Module, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        y = model(**feeds)
    return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]


@pytest.mark.parametrize("name", list(MODELS))
def test_capture_matches_eager(captured: dict, name: str) -> None:
    model, g = get(captured, name)
    for i, d in enumerate(g.inputs[0].shape[:2]):
        assert d == DIMS[i]
    for k, (b, s) in enumerate(RUN):
        feeds = inputs(MODELS[name], b, s, seed=k + 1)
        want = eager(model, feeds)
        got = list(run(g, {k2: v.numpy() for k2, v in feeds.items()}).values())
        assert len(got) == len(want)
        for i, (x, w) in enumerate(zip(got, want, strict=True)):
            assert x.dtype == w.dtype and x.shape == w.shape, (name, i, x.dtype, w.dtype, x.shape, w.shape)
            np.testing.assert_allclose(x, w, atol=ATOL, rtol=RTOL, err_msg=f"{name} output {i} at {(b, s)}")


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript", "torch-export"])
def test_attention_capture_on_every_backend(captured: dict, backend: str) -> None:
    model, g = get(captured, "attention")
    exe = compile(g, backend)
    for k, (b, s) in enumerate(RUN):
        feeds = inputs(MODELS["attention"], b, s, seed=k + 5)
        for got, want in zip(exe(x=feeds["x"]).values(), eager(model, feeds), strict=True):
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=backend)


def test_every_transformer_op_and_converter_is_exercised(captured: dict) -> None:
    graphs = [get(captured, name)[1] for name in MODELS]
    assert TRANSFORMER_OPS - {n.op for g in graphs for n in g.nodes} == set()
    assert TRANSFORMER_TARGETS <= set(ATEN_TABLE)
    assert TRANSFORMER_TARGETS - captured["_hits"] <= _NOT_EXERCISED
    assert len(TRANSFORMER_TARGETS) > 60


def test_sdpa_attributes(captured: dict) -> None:
    _, g = get(captured, "attention")
    attns = [n for n in g.nodes if n.op is Op.SDPA]
    assert [(n.attrs["is_causal"], n.attrs["scale"], len(n.inputs)) for n in attns] == [
        (1, 0.0, 3), (0, 0.3, 4), (0, 0.0, 4), (1, 0.0, 3), (1, 0.0, 3)]
    assert attns[1].inputs[3].dtype == "bool" and attns[2].inputs[3].dtype == "float32"
    # enable_gqa stays grouped-query attention: the one k/v head is read, not repeated
    assert attns[3].attrs["enable_gqa"] == 1 and attns[3].inputs[1].shape == ("batch", 1, "seq", 4)
    assert [n.attrs["enable_gqa"] for n in attns] == [0, 0, 0, 1, 0]


def test_named_dims_in_attributes(captured: dict) -> None:
    _, g = get(captured, "sources")
    assert any(n.op is Op.ARANGE and n.attrs["end"] == "seq" for n in g.nodes)
    assert any(n.op is Op.EXPAND and n.attrs["shape"] == ("batch", "seq") for n in g.nodes)
    _, g = get(captured, "movement")
    assert any(n.op is Op.EXPAND and n.attrs["shape"] == ("batch", "seq", 8) for n in g.nodes)


# --------------------------------------------------------------------------- refusals
def _capture(fn: Callable[[torch.Tensor], torch.Tensor]) -> Graph:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fn(x)

    return capture(M(), torch.randn(*EXAMPLE, 8), {"x": DIMS})


def test_advanced_indexing_of_axes_apart_is_unsupported() -> None:
    rows, cols = torch.tensor([0, 1]), torch.tensor([2, 3])
    with pytest.raises(UnsupportedOpError, match="not consecutive") as info:
        _capture(lambda x: x[rows, :, cols])
    assert any("aten.index.Tensor" in k for k in info.value.ops)


def test_size_that_is_not_a_dim_is_refused() -> None:
    with pytest.raises(UnsupportedOpError, match=r"node arange.*not a product of dims") as info:
        _capture(lambda x: x + torch.arange(x.shape[1] * x.shape[1] - x.shape[0]).sum())  # seq**2 - batch may be < 0
    assert any("aten.arange.default" in k for k in info.value.ops)


class _RelativeWindow(nn.Module):
    """Wav2Vec2-Conformer's relative positions: a table of 2c + 1 rows around its centre c, its window
    ``pe[c - n + 1 : c + n]`` for n frames (a start of ``c + 1 - n``, no dim), then the rel-shift's first
    ``w // 2 + 1`` of the window's ``w = 2n - 1`` rows (``n``: at most ``w`` where ``w >= 0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pe", torch.randn(41, 8, generator=torch.Generator().manual_seed(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, n = self.pe.shape[0] // 2, x.shape[1] - 1  # a frame count that is not the input's dim itself
        window = self.pe[c - n + 1: c + n]
        return x[:, 1:] * window[: window.shape[0] // 2 + 1].flip(0) + window[n - 1:].sum(0)


def test_a_window_around_a_centre_of_a_static_table() -> None:
    graph = capture(_RelativeWindow(), torch.randn(*EXAMPLE, 8), {"x": DIMS})
    ort = compile(graph, "onnxruntime")
    for seq in (2, 5, 13, 21):  # one frame up to the whole table
        x = torch.randn(3, seq, 8, generator=torch.Generator().manual_seed(seq))
        want = _RelativeWindow()(x).numpy()
        np.testing.assert_allclose(run(graph, {"x": x.numpy()})["output"], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ort(x=x.numpy())["output"], want, rtol=1e-5, atol=1e-6)


def test_floor_division_of_a_dim_is_a_dim() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.sum(1, keepdim=True) * torch.arange(x.shape[1] // 2, dtype=x.dtype)[:, None]

    graph = _capture(fn)
    assert graph.outputs["output"].shape[1] == "((seq)//2)"
    for seq in (5, 8):
        x = torch.randn(3, seq, 8, generator=torch.Generator().manual_seed(seq))
        # sums near zero: an absolute tolerance too (numpy and torch add in different orders)
        np.testing.assert_allclose(run(graph, {"x": x.numpy()})["output"], fn(x).numpy(), rtol=1e-6, atol=1e-5)


def test_sum_of_dims_is_a_dim() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([x, x[:, :1]], dim=1)  # seq + 1 rows
        return both * torch.arange(x.shape[1] + 1, dtype=x.dtype)[:, None]

    graph = _capture(fn)
    assert graph.outputs["output"].shape[1] == "seq+1"
    x = torch.randn(3, 5, 8)
    np.testing.assert_allclose(run(graph, {"x": x.numpy()})["output"], fn(x).numpy(), rtol=1e-6)


def test_logical_ops_read_numbers_as_nonzero() -> None:
    """LongT5's local-attention mask: ``logical_and`` of int64 tensors (torch reads each as ``x != 0``)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        ids = (x * 2).long()  # zeros where |x| < 0.5
        both = torch.logical_and(ids, x.round()) | torch.logical_or(ids[:, :1], x > 1)
        return (both ^ torch.logical_xor(ids, x) ^ torch.logical_not(ids)).float()

    graph = _capture(fn)
    for seq in (5, 8):
        x = torch.randn(3, seq, 8, generator=torch.Generator().manual_seed(seq))
        assert 0 < int(fn(x).sum()) < fn(x).numel()
        np.testing.assert_array_equal(run(graph, {"x": x.numpy()})["output"], fn(x).numpy())


def test_a_named_dim_cut_in_equal_named_pieces() -> None:
    """ProphetNet's streams: ``(1 + ngram) * seq`` rows cut by ``chunk`` and by ``split`` of ``seq``."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        streams = torch.cat([x, x * 2, x - 1], 1)  # 3*seq rows
        a, b, c = streams.chunk(3, dim=1)
        d, e, f = streams.split(x.shape[1], dim=1)
        return a * b - c + d * e * f

    graph = _capture(fn)
    ort = compile(graph, "onnxruntime")
    for seq in (1, 4, 9):
        x = torch.randn(3, seq, 8, generator=torch.Generator().manual_seed(seq))
        np.testing.assert_allclose(run(graph, {"x": x.numpy()})["output"], fn(x).numpy(), rtol=1e-6)
        np.testing.assert_allclose(ort(x=x.numpy())["output"], fn(x).numpy(), rtol=1e-6)


def test_arange_counting_down_past_zero() -> None:
    """Parakeet's relative positions ``arange(n - 1, -n, -1)`` (an end that is no dim), XLNet's with float whole
    steps, and a negative step of two: ``start + step * Arange(0, length)``."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        rel = torch.arange(n - 1, -n, -1)
        floats = torch.arange(n, -n, -1.0)
        even = torch.arange(2 * n, 0, -2)
        return x.sum() + rel.sum() + floats[:, None].sum(1).mean() + even.float().mean() + rel.float().std()

    graph = _capture(fn)
    for seq in (1, 4, 9):
        x = torch.randn(3, seq, 8, generator=torch.Generator().manual_seed(seq))
        np.testing.assert_allclose(run(graph, {"x": x.numpy()})["output"], fn(x).numpy(), rtol=1e-5)
        np.testing.assert_allclose(compile(graph, "onnxruntime")(x=x.numpy())["output"], fn(x).numpy(), rtol=1e-5)


def test_cat_promotes_mixed_dtypes() -> None:
    """SAM's prompt encoder joins embeddings of int32 labels with float ones: torch.cat promotes."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        flags = torch.cat([(x > 0).to(torch.int32), (x < -1)], -1)  # int32 and bool -> int32
        return torch.cat([x, flags], -1) * 2  # float32 and int32 -> float32

    graph = _capture(fn)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(run(graph, {"x": x.numpy()})["output"], fn(x).numpy())
    np.testing.assert_array_equal(compile(graph, "onnxruntime")(x=x.numpy())["output"], fn(x).numpy())


def test_glu_halves_its_dim() -> None:
    graph = _capture(lambda x: F.glu(x, -1) + F.glu(x.transpose(1, 2), 1).transpose(1, 2)[..., :4])
    assert {n.op for n in graph.nodes} >= {Op.SIGMOID, Op.SLICE, Op.MUL}
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(4))
    want = F.glu(x, -1) + F.glu(x.transpose(1, 2), 1).transpose(1, 2)[..., :4]
    np.testing.assert_allclose(compile(graph, "onnxruntime")(x=x.numpy())["output"], want.numpy(), rtol=1e-6)
    np.testing.assert_allclose(run(graph, {"x": x.numpy()})["output"], want.numpy(), rtol=1e-6)


def test_bitwise_ops_on_integers_keep_their_bits() -> None:
    """Integer ``&`` / ``|`` / ``^`` / ``~`` (with a tensor or a Python int) are the integers' bits, not a bool's."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        a, b = (x * 40).long(), (x.flip(-1) * 40).long()
        return (((a & b) | 5) ^ ~b ^ (a | 3)).float()

    graph = _capture(fn)
    assert {n.op for n in graph.nodes} >= {Op.BITWISE_AND, Op.BITWISE_OR, Op.BITWISE_XOR, Op.BITWISE_NOT}
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(run(graph, {"x": x.numpy()})["output"], fn(x).numpy())
    np.testing.assert_array_equal(compile(graph, "onnxruntime")(x=x.numpy())["output"], fn(x).numpy())


def test_bitwise_ops_with_a_float_scalar_are_refused() -> None:
    with pytest.raises(UnsupportedOpError, match="scalar"):
        _capture(lambda x: torch.ops.aten.bitwise_and.Scalar(x > 0, 1.5).float())


def test_attention_dropout_is_unsupported() -> None:
    with pytest.raises(UnsupportedOpError, match="dropout"):
        _capture(lambda x: F.scaled_dot_product_attention(x, x, x, dropout_p=0.5))


def test_split_back_into_named_pieces() -> None:
    """Flux's joint attention: text and image tokens concatenated along the sequence and split back by
    ``[text, image]``, two named dims (``Slice``\\ s between their running sums), beside static sizes."""
    class Joint(nn.Module):
        def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            joint = torch.cat([text, image], dim=1).softmax(1)
            t, i = joint.split([text.shape[1], image.shape[1]], dim=1)
            a, b = i.split([3, 5], dim=-1)
            return t * 2, torch.cat([b, a], -1) - 1

    graph = capture(Joint(), (torch.randn(2, 4, 8), torch.randn(2, 6, 8)),
                    {"text": {0: "batch", 1: "text"}, "image": {0: "batch", 1: "image"}})
    ort = compile(graph, "onnxruntime")
    for t, i in ((1, 9), (7, 2), (5, 5)):
        gen = torch.Generator().manual_seed(t)
        text, image = torch.randn(3, t, 8, generator=gen), torch.randn(3, i, 8, generator=gen)
        want = [w.numpy() for w in Joint()(text, image)]
        for got in (run(graph, {"text": text.numpy(), "image": image.numpy()}), ort(text=text.numpy(), image=image.numpy())):
            for g, w in zip(got.values(), want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)

