"""The transformer op family on every backend: numpy reference against torch, then each backend against the reference.

Each case builds one small graph whose inputs declare ``"batch"`` and ``"seq"`` (and
sometimes ``"kv"``) dims and runs it at two sizes. The numpy reference is checked against
an independent torch expression; ONNX Runtime, TorchScript and torch.export are checked
against the reference (torch.export at the sizes inside its exported Dim range).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flora_graph.ir import ComputationNode, Graph, Op, OpGroup, verify
from flora_graph.ops import OPS
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile

SIZES = ({"batch": 2, "seq": 3, "kv": 4}, {"batch": 4, "seq": 7, "kv": 2})
BACKENDS = ("onnxruntime", "torchscript", "torch-export")
END = 2**63 - 1  # torch's "to the end"

Build = Callable[[Graph, dict[str, ComputationNode], np.random.Generator], Any]


@dataclass
class In:
    """A graph input: declared shape (names allowed), dtype and the kind of values fed."""

    shape: tuple[Any, ...]
    dtype: str = "float32"
    kind: str = "normal"  # normal | positive | small_int | bool | index:<n>


@dataclass
class Case:
    id: str
    inputs: dict[str, In]
    build: Build
    ref: Callable[..., torch.Tensor]  # torch on the inputs (in order) -> the expected output
    tol: float = 1e-5
    dim_max: dict[str, int] = field(default_factory=dict)  # bounds the graph declares (graph.dim_max)


def values(spec: In, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
    if spec.kind == "positive":
        return rng.uniform(0.2, 3.0, shape).astype(spec.dtype)
    if spec.kind == "small_int":
        return rng.integers(-3, 4, shape).astype(spec.dtype)
    if spec.kind == "bool":
        return rng.random(shape) < 0.6
    if spec.kind.startswith("index:"):  # index:<n> or index:<dim name>: values in [-n, n)
        n = spec.kind.split(":")[1]
        n = sizes[n] if n in sizes else int(n)
        return rng.integers(-n, n, shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


def const(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def op(o: Op, *names: str, **attrs: Any) -> Build:
    """``o`` over the named inputs."""
    return lambda g, x, rng: g.add(o, [x[n] for n in names], attrs)


X = In(("batch", "seq", 6))
POS = In(("batch", "seq", 6), kind="positive")
QKV = {"q": In(("batch", 2, "seq", 4)), "k": In(("batch", 2, "kv", 4)), "v": In(("batch", 2, "kv", 5))}
SELF = {"q": In(("batch", 2, "seq", 4)), "k": In(("batch", 2, "seq", 4)), "v": In(("batch", 2, "seq", 5))}

_EMB = const(np.random.default_rng(5), 11, 6)
_TABLE = const(np.random.default_rng(6), 16, 6)
_W = np.random.default_rng(7).uniform(0.5, 1.5, 6).astype(np.float32)


def _sdpa_ref(**kw: Any) -> Callable[..., torch.Tensor]:
    return lambda q, k, v, *m: F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=m[0].double() if m and m[0].is_floating_point() else (m[0] if m else None), **kw
    ).float()


CASES = [
    # ------------------------------------------------------------------ movement
    Case("gather_embedding", {"ids": In(("batch", "seq"), "int64", "index:11")},
         lambda g, x, rng: g.add(Op.GATHER, [g.const("emb", _EMB), x["ids"]]), lambda ids: torch.from_numpy(_EMB)[ids]),
    Case("gather_axis1_2d_index", {"x": In(("batch", 5, 3))},
         lambda g, x, rng: g.add(Op.GATHER, [x["x"], g.const("i", np.array([[0, -1], [4, 2]], np.int64))], {"axis": 1}),
         lambda x: x[:, torch.tensor([[0, -1], [4, 2]])]),
    Case("gather_scalar_index", {"x": In(("batch", 5, 3))},
         lambda g, x, rng: g.add(Op.GATHER, [x["x"], g.const("i", np.array(-2, np.int64))], {"axis": 1}), lambda x: x[:, -2]),
    Case("gather_1d_index_last_axis", {"x": In(("batch", "seq", 4))},
         lambda g, x, rng: g.add(Op.GATHER, [x["x"], g.const("i", np.array([3, 0, 1], np.int32))], {"axis": -1}),
         lambda x: x[..., [3, 0, 1]]),
    Case("gather_elements", {"x": In(("batch", 5)), "i": In(("batch", 3), "int64", "index:5")}, op(Op.GATHER_ELEMENTS, "x", "i", axis=1),
         lambda x, i: torch.gather(x, 1, torch.where(i < 0, i + 5, i))),
    Case("gather_elements_dynamic_axis", {"x": In(("batch", "seq", 3)), "i": In((2, "seq", 2), "int32", "index:batch")},
         op(Op.GATHER_ELEMENTS, "x", "i", axis=0), lambda x, i: torch.gather(x, 0, torch.where(i < 0, i + x.shape[0], i).long())),
    Case("index_leading_axes", {"x": In((5, 4, "seq")), "i": In(("batch", 1), "int64", "index:5"), "j": In((1, "seq"), "int64", "index:4")},
         op(Op.INDEX, "x", "i", "j"), lambda x, i, j: x[i, j]),
    Case("index_inner_axes", {"x": In(("batch", 5, 4, 3))},
         lambda g, x, rng: g.add(Op.INDEX, [x["x"], g.const("i", np.array([[0], [-1]], np.int64)), g.const("j", np.array([3, 0, 1], np.int32))], {"axis": 1}),
         lambda x: x[:, torch.tensor([[0], [-1]]), torch.tensor([3, 0, 1])]),
    Case("index_hf_mask", {"p": In(("batch", "seq"), "int64", "small_int"), "b": In(("batch", 1, 1), "int64", "index:batch"),
                           "q": In((1, "seq", 1), "int64", "index:seq")},
         op(Op.INDEX, "p", "b", "q"), lambda p, b, q: p[b, q]),
    Case("slice_static_steps", {"x": In(("batch", 6, 5))},
         op(Op.SLICE, "x", axes=(1, 2), starts=(1, -3), ends=(5, END), steps=(2, 1)), lambda x: x[:, 1:5:2, -3:]),
    Case("slice_named_dim_ends", {"x": In(("batch", "seq", 6))},
         lambda g, x, rng: {
             "last2": g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (-2,), "ends": (END,)}),
             "first": g.add(Op.SLICE, [x["x"]], {"axes": (1,), "starts": (0,), "ends": (1,)}),
             "all": g.add(Op.SLICE, [x["x"]], {"axes": (-2,), "starts": (0,), "ends": ("seq",)}),
         },
         lambda x: (x[:, -2:], x[:, :1], x)),
    Case("slice_table_to_seq", {"x": X},
         lambda g, x, rng: g.add(Op.ADD, [x["x"], g.add(Op.SLICE, [g.const("t", _TABLE)], {"axes": (0,), "starts": (0,), "ends": ("seq",)})]),
         lambda x: x + torch.from_numpy(_TABLE)[: x.shape[1]],
         dim_max={"seq": 16}),  # the table has 16 rows: torch-export needs the bound
    Case("unsqueeze", {"x": In(("batch", "seq"))}, op(Op.UNSQUEEZE, "x", axes=(0, -1)), lambda x: x[None, :, :, None]),
    Case("squeeze", {"x": In(("batch", 1, "seq", 1))}, op(Op.SQUEEZE, "x", axes=(1, -1)), lambda x: x[:, 0, :, 0]),
    Case("expand_named", {"x": In(("batch", 1, 6)), "y": In(("batch", "seq"))},
         op(Op.EXPAND, "x", shape=("batch", "seq", 6)), lambda x, y: x.expand(-1, y.shape[1], -1)),
    Case("expand_bidirectional", {"x": In(("batch", 1, 6))}, op(Op.EXPAND, "x", shape=(1, 3, 1)),
         lambda x: x.expand(-1, 3, -1)),
    Case("expand_const_to_named", {"y": In(("batch", "seq"), "int64", "small_int")},
         lambda g, x, rng: g.add(Op.ADD, [x["y"], g.add(Op.EXPAND, [g.const("two", np.array(2, np.int64))], {"shape": ("batch", "seq")})]),
         lambda y: y + torch.full(y.shape, 2)),
    Case("reshape_named_target", {"x": In(("batch", "seq", 8))}, op(Op.RESHAPE, "x", shape=("batch", "seq", 2, -1)),
         lambda x: x.reshape(x.shape[0], x.shape[1], 2, 4)),
    Case("reshape_named_product", {"x": In(("batch", "seq", 8))}, op(Op.RESHAPE, "x", shape=("batch*seq", 4, 2)),
         lambda x: x.reshape(-1, 4, 2)),
    # ------------------------------------------------------------------ elementwise
    Case("exp", {"x": X}, op(Op.EXP, "x"), torch.exp),
    Case("log", {"x": POS}, op(Op.LOG, "x"), torch.log),
    Case("sqrt", {"x": POS}, op(Op.SQRT, "x"), torch.sqrt),
    Case("rsqrt", {"x": POS}, op(Op.RSQRT, "x"), torch.rsqrt),
    Case("reciprocal", {"x": POS}, op(Op.RECIPROCAL, "x"), torch.reciprocal),
    Case("cos", {"x": X}, op(Op.COS, "x"), torch.cos),
    Case("sin", {"x": X}, op(Op.SIN, "x"), torch.sin),
    Case("abs", {"x": X}, op(Op.ABS, "x"), torch.abs),
    Case("abs_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.ABS, "x"), torch.abs),
    Case("pow_scalar", {"x": X}, lambda g, x, rng: g.add(Op.POW, [x["x"], g.const("e", np.array(2.0, np.float32))]),
         lambda x: x**2),
    Case("pow_tensors", {"x": POS, "e": In(("seq", 1))}, op(Op.POW, "x", "e"), torch.pow),
    *[
        Case(f"{o.value.lower()}_{kind}", {"a": In(("batch", "seq"), dt, kind), "b": In((1, "seq"), dt, kind)}, op(o, "a", "b"), fn)
        for o, fn in [(Op.EQUAL, torch.eq), (Op.LESS, torch.lt), (Op.LESS_OR_EQUAL, torch.le), (Op.GREATER, torch.gt),
                      (Op.GREATER_OR_EQUAL, torch.ge)]
        for dt, kind in [("int64", "small_int"), ("float32", "normal")]
    ],
    Case("not", {"a": In(("batch", "seq"), "bool", "bool")}, op(Op.NOT, "a"), torch.logical_not),
    Case("and", {"a": In(("batch", "seq"), "bool", "bool"), "b": In(("seq",), "bool", "bool")}, op(Op.AND, "a", "b"),
         torch.logical_and),
    Case("or", {"a": In(("batch", 1), "bool", "bool"), "b": In(("seq",), "bool", "bool")}, op(Op.OR, "a", "b"),
         torch.logical_or),
    Case("where", {"c": In(("batch", "seq"), "bool", "bool"), "a": In(("batch", "seq"))},
         lambda g, x, rng: g.add(Op.WHERE, [x["c"], x["a"], g.const("m", np.array(-1e9, np.float32))]),
         lambda c, a: torch.where(c, a, torch.tensor(-1e9))),
    Case("where_int", {"c": In(("seq",), "bool", "bool"), "a": In(("batch", "seq"), "int64", "small_int")},
         lambda g, x, rng: g.add(Op.WHERE, [x["c"], g.const("z", np.array(7, np.int64)), x["a"]]),
         lambda c, a: torch.where(c, torch.tensor(7), a)),
    *[
        Case(f"cast_{src}_{dst}", {"x": In(("batch", "seq"), src, kind)}, op(Op.CAST, "x", to=dst),
             lambda x, dst=dst: x.to(getattr(torch, dst)), tol=1e-3 if dst == "float16" else 1e-5)
        for src, dst, kind in [("float32", "int64", "normal"), ("int64", "float32", "small_int"), ("float32", "bool", "small_int"),
                               ("bool", "float32", "bool"), ("float32", "float16", "normal"), ("int64", "int32", "small_int"),
                               ("bool", "int64", "bool"), ("float32", "float64", "normal")]
    ],
    # ------------------------------------------------------------------ reductions
    Case("reduce_mean_last_keep", {"x": X}, op(Op.REDUCE_MEAN, "x", axes=(-1,), keepdims=1),
         lambda x: x.mean(-1, keepdim=True)),
    Case("reduce_mean_two_axes", {"x": X}, op(Op.REDUCE_MEAN, "x", axes=(1, 2), keepdims=0), lambda x: x.mean((1, 2))),
    Case("reduce_sum_all", {"x": X}, op(Op.REDUCE_SUM, "x", axes=(), keepdims=0), lambda x: x.sum(), tol=1e-4),
    Case("reduce_sum_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.REDUCE_SUM, "x", axes=(0,), keepdims=1),
         lambda x: x.sum(0, keepdim=True)),
    Case("cumsum", {"x": X}, op(Op.CUMSUM, "x", axis=1), lambda x: x.cumsum(1), tol=1e-4),
    Case("cumsum_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.CUMSUM, "x", axis=-1), lambda x: x.cumsum(-1)),
    # ------------------------------------------------------------------ normalisation, attention
    Case("rms_norm_scale", {"x": X}, lambda g, x, rng: g.add(Op.RMS_NORM, [x["x"], g.const("w", _W)], {"epsilon": 1e-5}),
         lambda x: F.rms_norm(x, (6,), torch.from_numpy(_W), 1e-5)),
    Case("rms_norm_plain_2dims", {"x": In(("batch", 3, 6))}, op(Op.RMS_NORM, "x", axis=-2, epsilon=1e-2),
         lambda x: F.rms_norm(x, (3, 6), None, 1e-2)),
    Case("rms_norm_dynamic_dims", {"x": X}, op(Op.RMS_NORM, "x", axis=1), lambda x: F.rms_norm(x, x.shape[1:], None, 1e-6)),
    Case("sdpa_plain", QKV, op(Op.SDPA, "q", "k", "v"), _sdpa_ref()),
    Case("sdpa_scale", QKV, op(Op.SDPA, "q", "k", "v", scale=0.3), _sdpa_ref(scale=0.3)),
    Case("sdpa_causal", SELF, op(Op.SDPA, "q", "k", "v", is_causal=1), _sdpa_ref(is_causal=True)),
    Case("sdpa_causal_cross_lengths", QKV, op(Op.SDPA, "q", "k", "v", is_causal=1), _sdpa_ref(is_causal=True)),
    Case("sdpa_bool_mask", {**QKV, "m": In(("batch", 1, "seq", "kv"), "bool", "bool")}, op(Op.SDPA, "q", "k", "v", "m"),
         _sdpa_ref()),
    Case("sdpa_float_mask", {**QKV, "m": In(("seq", "kv"))}, op(Op.SDPA, "q", "k", "v", "m"), _sdpa_ref()),
    Case("sdpa_3d", {"q": In(("batch", "seq", 4)), "k": In(("batch", "kv", 4)), "v": In(("batch", "kv", 4))},
         op(Op.SDPA, "q", "k", "v"), _sdpa_ref()),
    # ------------------------------------------------------------------ sources
    Case("arange_seq", {"x": In(("batch", "seq"))}, lambda g, x, rng: g.add(Op.ARANGE, [], {"end": "seq"}),
         lambda x: torch.arange(x.shape[1])),
    Case("arange_batch_seq_float", {"x": In(("batch", "seq"))},
         lambda g, x, rng: g.add(Op.ARANGE, [], {"end": "batch*seq", "dtype": "float32"}),
         lambda x: torch.arange(x.numel(), dtype=torch.float32)),
    Case("arange_static_step", {"x": In(("batch", "seq"))},
         lambda g, x, rng: g.add(Op.ADD, [g.add(Op.ARANGE, [], {"start": 2, "end": 11, "step": 3}), g.add(Op.ARANGE, [], {"start": 6, "end": -3, "step": -3})]),
         lambda x: torch.arange(2, 11, 3) + torch.arange(6, -3, -3)),
]
BY_ID = {c.id: c for c in CASES}
NEW_OPS = {
    Op.GATHER, Op.GATHER_ELEMENTS, Op.INDEX, Op.SLICE, Op.UNSQUEEZE, Op.SQUEEZE, Op.EXPAND, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.RECIPROCAL, Op.COS, Op.SIN,
    Op.ABS, Op.POW, Op.EQUAL, Op.LESS, Op.LESS_OR_EQUAL, Op.GREATER, Op.GREATER_OR_EQUAL, Op.NOT, Op.AND, Op.OR, Op.WHERE, Op.CAST,
    Op.REDUCE_MEAN, Op.REDUCE_SUM, Op.CUMSUM, Op.RMS_NORM, Op.SDPA, Op.ARANGE,
}


def build(case: Case) -> Graph:
    g = Graph(case.id)
    g.dim_max = dict(case.dim_max)
    ins = {name: g.input(name, spec.shape, spec.dtype) for name, spec in case.inputs.items()}
    out = case.build(g, ins, np.random.default_rng(0))
    for name, node in (out if isinstance(out, dict) else {"out": out}).items():
        g.set_output(name, node)
    return verify(g)


def feeds(case: Case, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: values(spec, sizes, rng) for name, spec in case.inputs.items()}


def assert_close(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    if got.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), atol=tol, rtol=tol, err_msg=what)


# --------------------------------------------------------------------------- tables
def test_every_new_op_has_an_entry_in_every_table_and_a_case() -> None:
    assert NEW_OPS <= set(Op) - OpGroup.Leaf
    for rule in ("numpy", "onnx", "torch"):
        assert all(callable(getattr(OPS[op], rule)) for op in NEW_OPS)
    covered = {n.op for c in CASES for n in build(c).nodes}
    assert NEW_OPS <= covered


# --------------------------------------------------------------------------- numpy against torch
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_matches_torch(case: Case) -> None:
    g = build(case)
    for k, sizes in enumerate(SIZES):
        x = feeds(case, sizes, k)
        got = run(g, x)
        want = case.ref(*[torch.from_numpy(np.array(v)) for v in x.values()])
        want = want if isinstance(want, tuple) else (want,)
        for (name, value), w in zip(got.items(), want, strict=True):
            assert_close(value, w.numpy(), case.tol, f"{case.id} {name} at {sizes}")


# --------------------------------------------------------------------------- backends against numpy
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_backend_matches_reference(case: Case, backend: str) -> None:
    g = build(case)
    exe = compile(g, backend)
    low = getattr(exe, "dim_min", 0)
    sizes_run = [s for s in SIZES if min(s.values()) >= low]
    assert sizes_run
    for k, sizes in enumerate(sizes_run):
        x = feeds(case, sizes, k)
        want, got = run(g, x), exe(x)
        assert list(got) == list(want)
        for name in want:
            assert_close(got[name], want[name], case.tol, f"{case.id} {name} on {backend} at {sizes}")


def test_fully_masked_rows_are_zero_on_every_backend() -> None:
    case = BY_ID["sdpa_bool_mask"]
    g = build(case)
    x = feeds(case, SIZES[0], 3)
    x["m"][:, :, 1, :] = False  # query 1 may attend to nothing
    want = run(g, x)["out"]
    assert np.all(want[:, :, 1] == 0) and np.isfinite(want).all()
    for backend in BACKENDS:
        np.testing.assert_allclose(compile(g, backend)(x)["out"], want, atol=1e-5, rtol=1e-5, err_msg=backend)


def test_rms_norm_native_at_opset_23() -> None:
    import onnxruntime as ort

    from flora_graph.runtimes.onnx_lowering import to_onnx

    g = build(BY_ID["rms_norm_scale"])
    model = to_onnx(g, 23)
    assert [n.op_type for n in model.graph.node] == ["RMSNormalization"]
    x = feeds(BY_ID["rms_norm_scale"], SIZES[1], 0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # ORT >= 1.22 loads opset 23
    np.testing.assert_allclose(sess.run(None, x)[0], run(g, x)["out"], atol=1e-5, rtol=1e-5)


def test_named_dim_without_a_carrying_input_is_refused() -> None:
    from flora_graph.errors import GraphError
    from flora_graph.runtimes.onnx_lowering import to_onnx
    from flora_graph.runtimes.torch_lowering import generate_forward

    g = Graph("orphan")
    x = g.input("x", ("batch", 3))
    g.set_output("y", g.add(Op.ARANGE, [], {"end": "seq"}, name="positions"))
    g.set_output("z", g.add(Op.NEG, [x]))
    with pytest.raises(GraphError, match=r"'positions'.*'seq'"):
        run(g, {"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(GraphError, match=r"'positions'.*'seq'"):
        to_onnx(g)
    with pytest.raises(GraphError, match=r"'positions'.*'seq'"):
        generate_forward(g)


@pytest.mark.parametrize("opset", [18, 23])
def test_every_case_at_other_opsets(opset: int) -> None:
    """Opset 18 (the oldest supported) and 23 (native RMSNormalization) give the reference's numbers too."""
    for case in CASES:
        g = build(case)
        exe = compile(g, "onnxruntime", opset=opset)
        x = feeds(case, SIZES[1], 7)
        want, got = run(g, x), exe(x)
        for name in want:
            assert_close(got[name], want[name], case.tol, f"{case.id} {name} at opset {opset}")
