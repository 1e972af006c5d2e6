"""Every op of the numpy reference interpreter against torch, the independent reference.

Each test builds a one-op graph with ``Graph.input/const/add``, declares dim 0 of the
graph inputs as ``"batch"``, and runs the same graph with batch sizes 1 and 5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flora_graph.ir import Graph, Op, OpGroup, verify
from flora_graph.ops import OPS
from flora_graph.runtimes import run

ATOL, RTOL = 1e-5, 1e-5
BATCHES = (1, 5, 0)


@dataclass
class Feed:
    """A graph input: the value fed and the declared shape (with named dims)."""

    value: np.ndarray
    decl: tuple[Any, ...]


def dyn(rng: np.random.Generator, n: int, *rest: int, scale: float = 1.0, dtype: str = "float32") -> Feed:
    """A random input of shape ``[n, *rest]`` declared as ``["batch", *rest]``."""
    return Feed((scale * rng.standard_normal((n, *rest))).astype(dtype), ("batch", *rest))


def const(rng: np.random.Generator, *shape: int, dtype: str = "float32") -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def check(
    op: Op,
    make: Callable[[int], Sequence[Feed | np.ndarray]],
    torch_fn: Callable[..., torch.Tensor],
    attrs: dict[str, Any] | None = None,
    *,
    batches: Sequence[int] = BATCHES,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> None:
    """Build one graph from ``make(batches[0])``, run it for every batch size, compare with torch."""
    g: Graph | None = None
    for n in batches:
        args = make(n)
        if g is None:
            g = Graph("t")
            nodes = [
                g.input(f"x{k}", a.decl, str(a.value.dtype)) if isinstance(a, Feed) else g.const(f"p{k}", a)
                for k, a in enumerate(args)
            ]
            g.set_output("y", g.add(op, nodes, attrs or {}))
            verify(g)
        feeds = {f"x{k}": a.value for k, a in enumerate(args) if isinstance(a, Feed)}
        got = run(g, feeds)["y"]
        want = torch_fn(*[torch.from_numpy(np.array(a.value if isinstance(a, Feed) else a)) for a in args]).numpy()
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        assert got.shape == want.shape, (got.shape, want.shape)
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_every_non_leaf_op_has_an_impl() -> None:
    assert set(OPS) == set(Op) - OpGroup.Leaf


# --------------------------------------------------------------------------- linear algebra
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_linear(rng: np.random.Generator, bias: bool, lead: tuple[int, ...]) -> None:
    w, b = const(rng, 4, 6), const(rng, 4)
    check(Op.LINEAR, lambda n: [dyn(rng, n, *lead, 6), w, *([b] if bias else [])], F.linear)


@pytest.mark.parametrize(
    "case",
    [
        "3d@2d-const",
        "3d@3d-inputs",
        "broadcast-batch-dims",
        "1d-rhs",
        "1d-lhs",
    ],
)
def test_matmul(rng: np.random.Generator, case: str) -> None:
    makers = {
        "3d@2d-const": (lambda w: lambda n: [dyn(rng, n, 3, 4), w])(const(rng, 4, 5)),
        "3d@3d-inputs": lambda n: [dyn(rng, n, 3, 4), dyn(rng, n, 4, 2)],
        "broadcast-batch-dims": (lambda w: lambda n: [dyn(rng, n, 1, 3, 4), w])(const(rng, 2, 4, 5)),
        "1d-rhs": (lambda v: lambda n: [dyn(rng, n, 3, 4), v])(const(rng, 4)),
        "1d-lhs": (lambda v: lambda n: [v, dyn(rng, n, 4, 5)])(const(rng, 4)),
    }
    check(Op.MATMUL, makers[case], torch.matmul)


CONV_CASES = {
    # name: (C, O, (kh, kw), stride, padding, dilation, groups, (H, W))
    "3x3": (3, 4, (3, 3), (1, 1), (0, 0), (1, 1), 1, (7, 6)),
    "stride2": (3, 4, (3, 3), (2, 2), (0, 0), (1, 1), 1, (9, 8)),
    "pad1": (3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, (5, 5)),
    "dilation2": (2, 3, (3, 3), (1, 1), (0, 0), (2, 2), 1, (9, 8)),
    "groups2": (4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, (6, 5)),
    "depthwise": (4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, (6, 6)),
    "depthwise-x2": (3, 6, (3, 3), (2, 1), (1, 0), (1, 1), 3, (7, 5)),
    "mixed-rect": (2, 4, (3, 2), (2, 1), (1, 2), (1, 2), 2, (8, 7)),
    "1x1": (5, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1, (4, 3)),
    "kernel-fills-input": (2, 3, (4, 4), (3, 3), (0, 0), (1, 1), 1, (4, 4)),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d(rng: np.random.Generator, case: str, bias: bool) -> None:
    c, o, (kh, kw), stride, padding, dilation, groups, (h, wd) = CONV_CASES[case]
    w, b = const(rng, o, c // groups, kh, kw), const(rng, o)
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}

    def ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)

    check(Op.CONV2D, lambda n: [dyn(rng, n, c, h, wd), w, *([b] if bias else [])], ref, attrs)


def test_conv2d_1x1_with_dynamic_spatial_dims(rng: np.random.Generator) -> None:
    w, b = const(rng, 3, 4, 1, 1), const(rng, 3)
    sizes = {1: (2, 3), 5: (4, 1), 0: (3, 2)}
    make = lambda n: [Feed(const(rng, n, 4, *sizes[n]), ("batch", 4, "h", "w")), w, b]  # noqa: E731
    check(Op.CONV2D, make, F.conv2d)


# --------------------------------------------------------------------------- elementwise
BINARY = {Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div}


@pytest.mark.parametrize("op", list(BINARY), ids=lambda o: o.value)
@pytest.mark.parametrize("other", [(4,), (3, 1), (1,), (2, 3, 4)], ids=str)
def test_binary_broadcasting_with_const(rng: np.random.Generator, op: Op, other: tuple[int, ...]) -> None:
    b = rng.uniform(0.5, 2.0, other).astype("float32") * rng.choice([-1, 1], other).astype("float32")
    check(op, lambda n: [dyn(rng, n, 2, 3, 4), b], BINARY[op])
    check(op, lambda n: [b, dyn(rng, n, 2, 3, 4)], BINARY[op])  # const on the left


def test_integer_div_truncates_toward_zero() -> None:
    a = np.array([[7, -7, 7, -7, 6, -6, 0, 9_007_199_254_740_993]], "int64")
    b = np.array([2, 2, -2, -2, 3, -3, 5, 1], "int64")
    ref = lambda a, b: torch.div(a, b, rounding_mode="trunc")  # noqa: E731
    check(Op.DIV, lambda n: [Feed(a, ("batch", 8)), b], ref, batches=(1,), atol=0, rtol=0)


@pytest.mark.parametrize("op", list(BINARY), ids=lambda o: o.value)
def test_binary_two_dynamic_inputs(rng: np.random.Generator, op: Op) -> None:
    def make(n: int) -> list[Feed]:
        b = dyn(rng, n, 1, 4)
        b.value = np.where(np.abs(b.value) < 0.5, 1.0, b.value).astype("float32")
        return [dyn(rng, n, 3, 4), b]

    check(op, make, BINARY[op])


UNARY: dict[str, tuple[Op, dict[str, Any], Callable[[torch.Tensor], torch.Tensor]]] = {
    "neg": (Op.NEG, {}, torch.neg),
    "relu": (Op.RELU, {}, F.relu),
    "gelu-exact": (Op.GELU, {}, lambda t: F.gelu(t, approximate="none")),
    "gelu-exact-default": (Op.GELU, {"approximate": "none"}, F.gelu),
    "gelu-tanh": (Op.GELU, {"approximate": "tanh"}, lambda t: F.gelu(t, approximate="tanh")),
    "silu": (Op.SILU, {}, F.silu),
    "sigmoid": (Op.SIGMOID, {}, torch.sigmoid),
    "tanh": (Op.TANH, {}, torch.tanh),
    "identity": (Op.IDENTITY, {}, lambda t: t.clone()),
}


@pytest.mark.parametrize("name", list(UNARY))
@pytest.mark.parametrize("rest", [(7,), (2, 3)], ids=str)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_unary(rng: np.random.Generator, name: str, rest: tuple[int, ...], scale: float) -> None:
    op, attrs, ref = UNARY[name]
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # stable sigmoid/silu never overflow
        check(op, lambda n: [dyn(rng, n, *rest, scale=scale)], ref, attrs)


def test_sigmoid_extremes_are_exact() -> None:
    x = np.array([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, np.inf, -np.inf]], "float32")
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        check(Op.SIGMOID, lambda n: [Feed(x, (1, x.shape[1]))], torch.sigmoid, batches=(1,), atol=1e-38, rtol=1e-6)


# --------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("axis", [-1, 1, 2, 0])
@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_softmax(rng: np.random.Generator, axis: int, scale: float) -> None:
    check(Op.SOFTMAX, lambda n: [dyn(rng, n, 3, 4, scale=scale)], lambda t: torch.softmax(t, dim=axis), {"axis": axis})


@pytest.mark.parametrize("axis", [-1, -2, 2, 1, 3])
@pytest.mark.parametrize("affine", ["none", "scale", "scale+bias"])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-2])
def test_layer_norm(rng: np.random.Generator, axis: int, affine: str, epsilon: float) -> None:
    rest = (3, 4, 5)
    norm = ("batch", *rest)[axis:]
    scale, bias = const(rng, *norm), const(rng, *norm)
    extra = {"none": [], "scale": [scale], "scale+bias": [scale, bias]}[affine]

    def ref(x: torch.Tensor, w: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.layer_norm(x, norm, w, b, eps=epsilon)

    make = lambda n: [dyn(rng, n, *rest, scale=3.0), *extra]  # noqa: E731
    check(Op.LAYER_NORM, make, ref, {"axis": axis, "epsilon": epsilon}, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- movement
RESHAPES = {
    # target: torch reference computing the same shape from the batch size
    (0, -1): lambda t: t.reshape(t.shape[0], 12),
    (0, 3, 4): lambda t: t.reshape(t.shape[0], 3, 4),
    (0, 0, 3, 2): lambda t: t.reshape(t.shape[0], 2, 3, 2),
    (-1, 6): lambda t: t.reshape(t.shape[0] * 2, 6),
    (0, 4, -1): lambda t: t.reshape(t.shape[0], 4, 3),
    (-1,): lambda t: t.reshape(t.numel()),
}


@pytest.mark.parametrize("target", list(RESHAPES), ids=str)
def test_reshape(rng: np.random.Generator, target: tuple[int, ...]) -> None:
    check(Op.RESHAPE, lambda n: [dyn(rng, n, 2, 6)], RESHAPES[target], {"shape": target})


def test_reshape_static_const(rng: np.random.Generator) -> None:
    p = const(rng, 2, 3, 4)
    check(Op.RESHAPE, lambda n: [p], lambda t: t.reshape(2, 12), {"shape": (0, -1)}, batches=(1,))


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_flatten(rng: np.random.Generator, axis: int) -> None:
    def ref(t: torch.Tensor) -> torch.Tensor:
        a = axis + 3 if axis < 0 else axis
        return t.reshape(math.prod(t.shape[:a]), math.prod(t.shape[a:]))

    check(Op.FLATTEN, lambda n: [dyn(rng, n, 2, 3)], ref, {"axis": axis})


@pytest.mark.parametrize("perm", [(0, 1, 2), (0, 2, 1), (2, 0, 1), (1, 2, 0), (2, 1, 0)], ids=str)
def test_transpose(rng: np.random.Generator, perm: tuple[int, ...]) -> None:
    check(Op.TRANSPOSE, lambda n: [dyn(rng, n, 3, 4)], lambda t: t.permute(*perm).contiguous(), {"perm": perm})


@pytest.mark.parametrize("axis", [1, 2, -1])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_concat(rng: np.random.Generator, axis: int, count: int) -> None:
    def make(n: int) -> list[Feed]:
        return [dyn(rng, n, 2 + k, 3) if axis == 1 else dyn(rng, n, 2, 1 + k) for k in range(count)]

    check(Op.CONCAT, make, lambda *ts: torch.cat(ts, dim=axis), {"axis": axis})


def test_concat_mixes_consts_and_inputs(rng: np.random.Generator) -> None:
    p = const(rng, 2, 1)
    make = lambda n: [Feed(const(rng, 2, 3), (2, 3)), p, Feed(const(rng, 2, 2), (2, 2))]  # noqa: E731
    check(Op.CONCAT, make, lambda *ts: torch.cat(ts, -1), {"axis": -1})


@pytest.mark.parametrize("axis,sizes", [(1, (2, 3, 1)), (-1, (1, 4)), (2, (5,)), (1, (1, 1, 1, 1, 1, 1))], ids=str)
def test_split_every_index(rng: np.random.Generator, axis: int, sizes: tuple[int, ...]) -> None:
    shape = [6, 5]
    shape[axis % 3 - 1] = sum(sizes)
    for index in range(len(sizes)):
        check(
            Op.SPLIT,
            lambda n: [dyn(rng, n, *shape)],
            lambda t, index=index: torch.split(t, list(sizes), dim=axis)[index].contiguous(),
            {"axis": axis, "sizes": sizes, "index": index},
        )


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float16", 2e-3)])
@pytest.mark.parametrize(
    "op,attrs,ref",
    [
        (Op.GELU, {}, F.gelu),
        (Op.GELU, {"approximate": "tanh"}, lambda t: F.gelu(t, approximate="tanh")),
        (Op.SIGMOID, {}, torch.sigmoid),
        (Op.SOFTMAX, {"axis": -1}, lambda t: torch.softmax(t.double(), -1).to(t.dtype)),
        (Op.LAYER_NORM, {"axis": -1}, lambda t: F.layer_norm(t.double(), (6,)).to(t.dtype)),
    ],
    ids=["gelu", "gelu-tanh", "sigmoid", "softmax", "layer_norm"],
)
def test_dtype_is_kept(rng: np.random.Generator, dtype: str, tol: float, op: Op, attrs: dict, ref: Callable) -> None:
    check(op, lambda n: [dyn(rng, n, 6, dtype=dtype)], ref, attrs, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float16", 2e-2)])
def test_linear_in_other_dtypes(rng: np.random.Generator, dtype: str, tol: float) -> None:
    w, b = const(rng, 4, 8, dtype=dtype), const(rng, 4, dtype=dtype)
    ref = lambda x, w, b: F.linear(x.double(), w.double(), b.double()).to(x.dtype)  # noqa: E731
    check(Op.LINEAR, lambda n: [dyn(rng, n, 8, dtype=dtype), w, b], ref, atol=tol, rtol=tol)
