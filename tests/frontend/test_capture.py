"""capture(): MLP/CNN/movement models with LoRA adapters, numbers against eager torch, tags, structure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.adapters import LoRAAdapter, adapters_of, apply_lora
from flora_graph.frontend import ATEN_TABLE, capture
from flora_graph.ir import ComputationNode, Graph, Op, OpGroup, verify
from flora_graph.runtimes.reference import run

ATOL, RTOL = 1e-5, 1e-5
EXAMPLE_BATCH = 3
RUN_BATCHES = (2, 7)
ROLES = ("base", "lora_down", "lora_up", "lora_scale", "lora_add")
BATCH = {"x": {0: "batch"}}


# --------------------------------------------------------------------------- models
class Block(nn.Module):
    """Pre-norm residual block: LayerNorm, Linear, GELU (exact and tanh), SiLU gate, residual."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x))
        h = F.gelu(h) * torch.sigmoid(h) + F.gelu(h, approximate="tanh") - F.silu(h) / 2.0
        return x + self.down(h)


class MLP(nn.Module):
    """Every elementwise op of the table, scalar and tensor operands, nested adapter paths."""

    def __init__(self, d_in: int = 8, d: int = 16, d_out: int = 5) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.gain = nn.Parameter(torch.rand(d) + 0.5)
        self.shift = nn.Parameter(torch.randn(d))
        self.ln = nn.LayerNorm(d, elementwise_affine=False)
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_in(x))
        for blk in self.blocks:
            h = blk(h)
        h = torch.tanh(h) / self.gain - self.shift * h  # div / mul / sub by tensors
        h = -h + 1.5  # neg, add scalar
        h = (h * 0.5 - 0.25) / 3  # mul / sub / div by scalars
        h = 1.0 - self.ln(h)  # rsub
        return torch.softmax(self.head(h), dim=-1)


class CNN(nn.Module):
    """Conv2d with stride, padding, dilation, groups (grouped and depthwise), 'same' padding; flatten + head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.same = nn.Conv2d(8, 8, 3, padding="same")
        self.tail = nn.Conv2d(8, 6, (3, 1), stride=(1, 2), padding=(1, 0), dilation=(2, 1))
        self.head = nn.Linear(6 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))  # [b, 8, 4, 4]
        h = F.relu(self.dw(h))
        h = self.grouped(h)
        h = F.relu(self.same(h)) + h
        h = F.relu(self.tail(h))  # [b, 6, 2, 2]
        return self.head(h.flatten(1))


class Movement(nn.Module):
    """reshape/view with a dynamic batch (incl. size arithmetic), transpose/permute, cat, split, matmul/bmm/mm, t()."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(16, 8)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, d = x.shape  # [b, 4, 8]
        q, k, v = torch.split(self.qkv(x), 8, dim=-1)
        att = torch.softmax(torch.matmul(q, k.transpose(1, 2)) / 8**0.5, dim=1)
        o = torch.bmm(att, v)  # [b, 4, 8]
        o2 = o.reshape(b, -1).view(b, 2, 16).permute(2, 0, 1).permute(1, 2, 0)  # [b, 2, 16]
        y = self.out(o2).reshape(b * 2, d)  # size arithmetic on the dynamic dim
        y = torch.mm(y, self.w.t()).view(b, 16)
        z = torch.cat([y, o.flatten(1), x.reshape(b, s * d)], dim=1)  # [b, 80]
        lo, hi = torch.split(z, [30, 50], dim=1)
        first, second = hi.chunk(2, dim=-1)
        return torch.cat([second, lo, first], dim=-1), o.transpose(-1, -2)


class Arith(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.rsub(x, 3.0, alpha=2)  # 3 - 2x
        b = torch.add(x, a, alpha=0.5)
        c = torch.sub(x, b, alpha=3)
        d = x * torch.tensor(2.5)  # a lifted tensor constant
        return torch.cat([1 - x, a, b, c, d], dim=-1)


class Chunks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q, r = x.chunk(3, dim=1)  # 7 -> 3, 3, 1
        return torch.cat([r, p * 2, q], dim=1)


class Aliases(nn.Module):
    """Ops that capture turns into their input: clone, contiguous, detach, eval dropout (channel-wise and
    alpha dropout too), same-dtype casts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.clone() + x.t().contiguous().t()
        b = F.dropout(x.detach(), 0.3, training=False) * x.to(torch.float32)
        c = F.alpha_dropout(x, 0.2, training=False) * F.dropout1d(x.unsqueeze(0), 0.2, training=False).squeeze(0)
        c = c - F.feature_alpha_dropout(x.unsqueeze(0), 0.2, training=False).squeeze(0)
        return a - b.float() + c


EXTRA = {"arith": Arith, "chunk": Chunks, "aliases": Aliases}  # no adapters; inputs [batch, 7]


def _randomize_lora(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters_of(model).values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.5)  # nonzero B: the branch counts


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    ranks: dict[str, int]
    item_shape: tuple[int, ...]

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        m = self.build()
        assert apply_lora(m, self.targets, rank=self.ranks, alpha=8) == list(self.ranks)
        _randomize_lora(m, seed=1)
        return m.eval()


CASES = [
    Case(
        "mlp",
        MLP,
        ["fc_in", "up", "head"],
        {"fc_in": 2, "blocks.0.up": 4, "blocks.1.up": 1, "head": 3},
        (8,),
    ),
    Case("cnn", CNN, ["stem", "same", "tail", "head"], {"stem": 2, "same": 3, "tail": 4, "head": 1}, (3, 8, 8)),
    Case("movement", Movement, ["qkv", "out"], {"qkv": 3, "out": 5}, (4, 8)),
]


ALL_NAMES = [c.name for c in CASES] + list(EXTRA)


@dataclass
class Captured:
    case: Case
    model: nn.Module
    graph: Graph


def _recording_table(hits: set) -> dict:
    """ATEN_TABLE's converters wrapped so that each records its target when it runs."""
    saved = dict(ATEN_TABLE)

    def wrap(target, conv):
        def recorded(*args, **kwargs):
            hits.add(target)
            return conv(*args, **kwargs)

        return recorded

    for target, conv in saved.items():
        ATEN_TABLE[target] = wrap(target, conv)
    return saved


@pytest.fixture(scope="module")
def captured() -> dict[str, Captured | Exception]:
    """Every model captured once with a dynamic batch (a failure is kept, so it fails only its own tests).

    ATEN_TABLE's converters that ran are recorded under ``"_hits"``.
    """
    hits: set = set()
    saved = _recording_table(hits)
    todo = [(c, c.model) for c in CASES] + [(Case(n, cls, [], {}, (7,)), lambda cls=cls: cls().eval()) for n, cls in EXTRA.items()]
    out: dict = {}
    try:
        for case, make in todo:
            try:
                m = make()
                out[case.name] = Captured(case, m, capture(m, torch.randn(EXAMPLE_BATCH, *case.item_shape), BATCH))
            except Exception as exc:  # re-raised by get()
                out[case.name] = exc
    finally:
        ATEN_TABLE.clear()
        ATEN_TABLE.update(saved)
    out["_hits"] = hits
    return out


def get(captured: dict, name: str) -> Captured:
    c = captured[name]
    if isinstance(c, Exception):
        raise c
    return c


def _outputs(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        y = model(x)
    return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("batch", RUN_BATCHES)
@pytest.mark.parametrize("name", ALL_NAMES)
def test_captured_graph_matches_eager(captured, name, batch):
    c = get(captured, name)
    x = torch.randn(batch, *c.case.item_shape, generator=torch.Generator().manual_seed(batch))
    want = _outputs(c.model, x)
    got = run(c.graph, {"x": x.numpy()})
    names = ["output"] if len(want) == 1 else [f"output_{i}" for i in range(len(want))]
    assert list(got) == names
    for key, w in zip(names, want, strict=True):
        assert got[key].shape == w.shape
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], w, atol=ATOL, rtol=RTOL, err_msg=f"{name} {key} batch={batch}")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_input_has_dynamic_batch(captured, name):
    c = get(captured, name)
    g = c.graph
    assert [i.name for i in g.inputs] == ["x"]
    assert g.inputs[0].shape == ("batch", *c.case.item_shape)
    assert g.inputs[0].dtype == "float32"
    for out in g.outputs.values():
        assert out.shape[0] == "batch"
    verify(g)


def test_captured_ops(captured):
    """Movement ops come out as the IR ops they stand for (no silent aliasing)."""
    ops = get(captured, "movement").graph.ops()
    assert ops.count("MatMul") == 2  # matmul, bmm
    mm = [n for n in get(captured, "movement").graph.nodes if n.op is Op.LINEAR and n.inputs[1].attrs.get("param") == "w"]
    assert len(mm) == 1  # mm(y, w.t()): a product with a transposed weight is the Linear it is
    assert ops.count("Split") >= 5
    assert ops.count("Concat") == 2
    cnn = get(captured, "cnn").graph
    convs = {n.name: n.attrs for n in cnn.nodes if n.op is Op.CONV2D}
    assert {"stride": (1, 1), "padding": (2, 2), "dilation": (2, 2), "groups": 8} in convs.values()  # depthwise
    assert {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 2} in convs.values()
    assert convs["same.base"]["padding"] == (1, 1)
    assert convs["tail.base"] == {"stride": (1, 2), "padding": (1, 0), "dilation": (2, 1), "groups": 1}
    assert convs["tail.lora_down"] == {"stride": (1, 2), "padding": (1, 0), "dilation": (2, 1), "groups": 1}
    assert [n.op for n in cnn.nodes if n.op is Op.FLATTEN] == [Op.FLATTEN]
    gelus = sorted(n.attrs["approximate"] for n in get(captured, "mlp").graph.nodes if n.op is Op.GELU)
    assert gelus == ["none", "none", "tanh", "tanh"]


# --------------------------------------------------------------------------- tags
def _tagged(g: Graph, path: str) -> dict[str, ComputationNode]:
    out: dict[str, ComputationNode] = {}
    for n in g.nodes:
        if n.meta.get("module") == path:
            assert n.meta["role"] not in out, f"{path}: two nodes tagged {n.meta['role']!r}"
            out[n.meta["role"]] = n
    return out


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_adapter_tags(captured, name):
    c = get(captured, name)
    g = c.graph
    paths = list(adapters_of(c.model))
    assert paths == list(c.case.ranks)
    tagged_modules = {n.meta["module"] for n in g.nodes if "role" in n.meta}
    assert tagged_modules == set(paths)
    for path in paths:
        nodes = _tagged(g, path)
        assert set(nodes) == set(ROLES), path
        for role, n in nodes.items():
            assert n.meta == {"adapter": "default", "role": role, "module": path}
            assert n.name == f"{path}.{role}"
        base, down, up, scale, add = (nodes[r] for r in ROLES)
        assert base.inputs[0] is down.inputs[0], f"{path}: base and lora_down read different nodes"
        assert up.inputs[0] is down
        assert scale.inputs[0] is up
        assert g.param_of(scale.inputs[1]).shape == ()
        assert float(g.param_of(scale.inputs[1])) == pytest.approx(8 / c.case.ranks[path])
        assert add.inputs == [base, scale]
        assert g.param_of(down.inputs[1]).shape[0] == c.case.ranks[path]
        assert down.inputs[1].attrs["param"] == f"{path}.lora_A"
        assert up.inputs[1].attrs["param"] == f"{path}.lora_B"
    untagged_roles = [n for n in g.nodes if n.meta and "role" not in n.meta]
    assert untagged_roles == []


def test_custom_adapter_name_is_tagged():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    apply_lora(m, ["0", "2"], rank=2, adapter_name="style")
    g = capture(m, torch.randn(3, 4))
    tags = {(n.meta["module"], n.meta["adapter"]) for n in g.nodes if n.meta}
    assert tags == {("0", "style"), ("2", "style")}


# --------------------------------------------------------------------------- structure
def structure(g: Graph) -> tuple:
    """Everything but names and meta: op, inputs by position, attrs, shape, dtype; Consts by value."""
    index = {n: i for i, n in enumerate(g.nodes)}
    rows = []
    for n in g.nodes:
        if n.op is Op.CONST:
            arr = g.param_of(n)
            rows.append((n.op, (), str(arr.dtype), arr.shape, arr.tobytes()))
        else:
            attrs = tuple(sorted(n.attrs.items()))
            rows.append((n.op, tuple(index[i] for i in n.inputs), attrs, n.shape, n.dtype))
    return (
        tuple(rows),
        tuple((i.shape, i.dtype) for i in g.inputs),
        tuple((k, index[v]) for k, v in g.outputs.items()),
    )


class PlainLinearLoRA(nn.Module):
    """The LoRA computation written by hand, no adapter class: ``base(x) + (x A^T) B^T * s``."""

    def __init__(self, adapter: LoRAAdapter) -> None:
        super().__init__()
        self.base = adapter.base_layer
        self.A = nn.Parameter(adapter.lora_A.detach().clone())
        self.B = nn.Parameter(adapter.lora_B.detach().clone())
        self.s = adapter.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.s


class PlainConvLoRA(PlainLinearLoRA):
    def __init__(self, adapter: LoRAAdapter) -> None:
        super().__init__(adapter)
        b = adapter.base_layer
        self.conv = {"stride": b.stride, "padding": b.padding, "dilation": b.dilation}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.conv2d(F.conv2d(x, self.A, None, **self.conv), self.B) * self.s


class Wrapped(nn.Module):
    """relu(adapted(x)): the adapted layer at path ``proj`` of a model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x))


def _adapter(kind: str, path: str = "proj", rank: int = 3) -> tuple[LoRAAdapter, tuple[int, ...]]:
    torch.manual_seed(0)
    if kind == "linear":
        base, item = nn.Linear(10, 6), (10,)
    else:
        base, item = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), (4, 9, 9)
    a = LoRAAdapter(base, rank, alpha=5, module_name=path)
    nn.init.normal_(a.lora_B)
    return a.eval(), item


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_untagged_pattern_has_identical_structure(kind):
    adapter, item = _adapter(kind)
    plain = PlainLinearLoRA(adapter) if kind == "linear" else PlainConvLoRA(adapter)
    x = torch.randn(EXAMPLE_BATCH, *item)
    g_adapter = capture(Wrapped(adapter), x, BATCH)
    g_plain = capture(Wrapped(plain), x, BATCH)
    assert structure(g_adapter) == structure(g_plain)
    assert g_adapter.ops() == g_plain.ops()
    assert all(not n.meta for n in g_plain.nodes)
    assert {n.meta["role"] for n in g_adapter.nodes if n.meta} == set(ROLES)
    # same numbers too
    xr = torch.randn(5, *item).numpy()
    np.testing.assert_allclose(run(g_adapter, {"x": xr})["output"], run(g_plain, {"x": xr})["output"], atol=0, rtol=0)


def _export_graph(adapter: LoRAAdapter, item: tuple[int, ...], name: str) -> Graph:
    g = Graph(name)
    x = g.input("x", ("batch", *item))
    g.set_output("output", adapter.export_graph(g, x))
    return verify(g)


def _same_graph(a: Graph, b: Graph) -> None:
    assert structure(a) == structure(b)
    assert [n.name for n in a.nodes] == [n.name for n in b.nodes]
    assert [n.meta for n in a.nodes] == [n.meta for n in b.nodes]
    assert [n.attrs.get("param") for n in a.nodes] == [n.attrs.get("param") for n in b.nodes]
    assert sorted(a.params) == sorted(b.params)
    assert list(a.outputs) == list(b.outputs)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_capture_of_one_adapter_equals_export_graph(kind):
    adapter, item = _adapter(kind, path="proj")

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = adapter

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    got = capture(One(), torch.randn(EXAMPLE_BATCH, *item), BATCH, name="one")
    _same_graph(got, _export_graph(adapter, item, "one"))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_capture_of_bare_adapter_equals_export_graph(kind):
    """The adapter is the model itself (root path ''): names carry no leading dot, roles are all tagged."""
    adapter, item = _adapter(kind, path="")
    got = capture(adapter, torch.randn(EXAMPLE_BATCH, *item), BATCH, name="bare")
    _same_graph(got, _export_graph(adapter, item, "bare"))
    assert {n.meta["role"] for n in got.nodes if n.meta} == set(ROLES)


# --------------------------------------------------------------------------- modes, dropout
def test_dropout_in_adapter_is_gone_and_mode_restored():
    torch.manual_seed(0)
    m = MLP()
    apply_lora(m, ["fc_in", "head"], rank=2, dropout=0.4)
    _randomize_lora(m, seed=3)
    m.train()
    x = torch.randn(EXAMPLE_BATCH, 8)
    g = capture(m, x, BATCH)
    assert m.training and all(mod.training for mod in m.modules())
    assert isinstance(m.fc_in.lora_dropout, nn.Dropout)
    # the graph is the eval-mode graph: same as with no dropout at all
    torch.manual_seed(0)
    ref = MLP()
    apply_lora(ref, ["fc_in", "head"], rank=2)
    _randomize_lora(ref, seed=3)
    assert structure(g) == structure(capture(ref, x, BATCH))
    assert "Identity" not in g.ops()
    m.eval()
    xr = torch.randn(7, 8)
    np.testing.assert_allclose(run(g, {"x": xr.numpy()})["output"], _outputs(m, xr)[0], atol=ATOL, rtol=RTOL)


def test_mixed_train_eval_modes_are_restored():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.1)))
    m.train()
    m[1].eval()
    m[2][1].eval()
    before = [mod.training for mod in m.modules()]
    capture(m, torch.randn(3, 4))
    assert [mod.training for mod in m.modules()] == before
    m.eval()
    m[2].train()
    before = [mod.training for mod in m.modules()]
    capture(m, torch.randn(3, 4))
    assert [mod.training for mod in m.modules()] == before


def test_eval_model_stays_in_eval():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    capture(m, torch.randn(3, 4))
    assert not any(mod.training for mod in m.modules())


def test_keyword_inputs_and_shared_dim():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * y

    m = Two().eval()
    g = capture(m, {"x": torch.randn(3, 4), "y": torch.randn(3, 3)}, {"x": {0: "batch"}, "y": {0: "batch"}})
    assert [(i.name, i.shape) for i in g.inputs] == [("x", ("batch", 4)), ("y", ("batch", 3))]
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    with torch.no_grad():
        want = m(x, y=y).numpy()
    np.testing.assert_allclose(run(g, {"x": x, "y": y})["output"], want, atol=ATOL, rtol=RTOL)


def test_static_capture_without_dynamic_dims(captured):
    m = get(captured, "mlp").model
    g = capture(m, torch.randn(4, 8))
    assert g.inputs[0].shape == (4, 8)
    x = torch.randn(4, 8)
    np.testing.assert_allclose(run(g, {"x": x.numpy()})["output"], _outputs(m, x)[0], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- the table
def test_every_ir_op_is_produced(captured):
    """Every non-leaf IR op except Identity, the adapter slots (which the adapter-slots pass makes, never
    capture), RotaryEmbedding and KVCacheAttention (fuse-rotary and fuse-kv-attention make them:
    tests/passes/test_fuse_rotary_share_kv.py) and ExpertLinear (group-experts: tests/passes/test_group_experts.py)
    comes out of some captured model, here or in a ``capture=(...)`` row of tests/ops: a broken converter shows here."""
    graphs = [get(captured, name).graph for name in ALL_NAMES]
    seen = {n.op for g in graphs for n in g.nodes}
    from ..ops.harness import all_cases, build  # rows captured by tests/ops/test_converters.py
    from .test_capture_transformer_ops import TRANSFORMER_OPS  # produced by the models of that file

    by_rows = {n.op for c in all_cases() if c.capture for n in build(c).nodes}
    made_by_passes = {Op.ROTARY_EMBEDDING, Op.KV_ATTENTION, Op.EXPERT_LINEAR}
    want = set(Op) - {Op.INPUT, Op.CONST, Op.IDENTITY} - made_by_passes - TRANSFORMER_OPS - OpGroup.Adapter - by_rows
    assert want - seen == set()


# targets torch.export does not emit for these models in eval/no_grad training IR
_NOT_EXERCISED = {
    torch.ops.aten.alias.default,
    torch.ops.aten._softmax.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten.add.Scalar,
    torch.ops.aten.sub.Scalar,
    torch.ops.aten.mul.Scalar,
    torch.ops.aten.div.Scalar,
    torch.ops.aten.rsub.Tensor,
}


def test_table_converters_exercised(captured):
    """The converters the models run cover the table, except overloads torch.export does not emit for them."""
    for name in ALL_NAMES:
        get(captured, name)
    from ..ops.harness import all_cases, aten_overload  # rows captured by tests/ops/test_converters.py
    from .test_capture_core_ops import CORE_TARGETS  # exercised by the rows of that file
    from .test_capture_transformer_ops import TRANSFORMER_TARGETS  # exercised by the models of that file
    from .test_einsum import TARGETS as EINSUM_TARGETS

    hits = captured["_hits"] | {aten_overload(t) for c in all_cases() for t in c.capture}
    assert set(ATEN_TABLE) - hits - TRANSFORMER_TARGETS - CORE_TARGETS - EINSUM_TARGETS <= _NOT_EXERCISED
    for target, conv in ATEN_TABLE.items():
        assert callable(conv), target


def test_capture_pauses_the_garbage_collector_and_restores_its_state():
    import gc

    from flora_graph.errors import GraphError
    from flora_graph.frontend.capture import trace_with_torch_export

    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(gc.isenabled())
            return x * 2

    assert gc.isenabled()
    capture(Probe(), torch.ones(2, 3))
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        capture(Probe(), torch.ones(2, 3))
        assert not gc.isenabled()
    finally:
        gc.enable()

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(GraphError, match="boom"):
        trace_with_torch_export(Broken(), torch.ones(2, 3))
    assert gc.isenabled()


def test_share_weights_makes_the_graph_weights_views_of_the_model() -> None:
    """``share_weights=True``: no second copy of the weights (a model used for nothing else afterwards, as
    ``export_genai`` loads one); by default the graph's weights are copies, which later training does not touch."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    for share in (False, True):
        g = capture(model, x, {"input": {0: "batch"}}, share_weights=share)
        arrays = [np.asarray(v) for v in g.params.values() if np.asarray(v).size >= 16]
        shared = [any(np.shares_memory(a, p.detach().numpy()) for p in model.parameters()) for a in arrays]
        assert arrays and all(shared) if share else not any(shared)
        np.testing.assert_allclose(run(g, {"input": x.numpy()})["output"], model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
