"""The adapter-slot family: ``LoRASlot`` and ``LoRAMixedSlot`` on numpy, ONNX Runtime and torch.

The numpy rule is checked against an independent float64 torch expression (``F.linear`` /
``F.conv2d``, each row of a mixed batch with its own adapter taken back out of the stacks);
each backend against the numpy rule. Linear (2-D and 3-D rows), conv sites (strided,
padded, dilated 3x3; pointwise with dynamic spatial dims) and embedding sites (``F.embedding`` of
the ids by ``A.T``; 2-D and 3-D ids), ranks 0, 1 and 3, float32 and float16, ``B`` nonzero throughout. The table harness of this folder skips this family
(``TESTED_FAMILIES``): a slot's weights are fed per run, which its generic cases do not model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flora_graph.errors import GraphError, RuntimeInputError, ShapeError
from flora_graph.ir import Graph, Op, OpGroup, verify
from flora_graph.ops import OPS
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile
from flora_graph.runtimes.onnx_lowering import to_onnx

SIZES = {"batch": 3, "seq": 4, "h": 5, "w": 6}
N_ADAPTERS = 3  # mixed: three adapters + the zero slot


@dataclass
class Site:
    id: str
    kind: str
    x: tuple[Any, ...]
    in_dims: tuple[int, ...]  # A's dims after the rank
    out: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> tuple[Any, ...]:
        if self.kind == "linear":
            return (*self.x[:-1], self.out)
        if self.kind == "embedding":
            return (*self.x, self.out)
        (kh, kw) = self.in_dims[1:]
        a = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), **self.attrs}
        dims = [d if isinstance(d, str) else (d + 2 * p - dl * (k - 1) - 1) // s + 1
                for d, k, s, p, dl in zip(self.x[2:], (kh, kw), a["stride"], a["padding"], a["dilation"], strict=True)]
        return (self.x[0], self.out, *dims)

    def node_attrs(self) -> dict[str, Any]:
        extra = {"kind": "conv", "kernel": self.in_dims[1:]} if self.kind == "conv" else {}
        if self.kind == "embedding":
            extra = {"kind": "embedding"}
        return {"module": self.id, **extra, **self.attrs}


SITES = [
    Site("linear_2d", "linear", ("batch", 8), (8,), 5),
    Site("linear_3d", "linear", ("batch", "seq", 8), (8,), 5),
    Site("conv_3x3", "conv", ("batch", 3, 9, 11), (3, 3, 3), 4, {"stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)}),
    Site("conv_1x1_dynamic", "conv", ("batch", 4, "h", "w"), (4, 1, 1), 6),
    Site("embedding_2d", "embedding", ("batch", "seq"), (11,), 5),
    Site("embedding_3d", "embedding", ("batch", "seq", 2), (11,), 5),
]
RANKS = (0, 1, 3)
DTYPES = ("float32", "float16")


def concrete(shape: tuple[Any, ...], rank: int) -> tuple[int, ...]:
    return tuple(rank if d == "r" else N_ADAPTERS + 1 if d == "slots" else SIZES.get(d, d) for d in shape)


def stack_shapes(s: Site) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    if s.kind in ("linear", "embedding"):
        return ("slots", s.in_dims[0], "r"), ("slots", "r", s.out)
    return ("slots", "r", math.prod(s.in_dims)), ("slots", s.out, "r")


def build(s: Site, mixed: bool, dtype: str, *, defaults: int | None = None) -> Graph:
    """One slot node over graph inputs ``base``, ``x``, ``A``, ``B`` (``idx``); ``defaults``: rank of the weights' defaults."""
    g = Graph(s.id)
    base, x = g.input("base", s.base, dtype), g.input("x", s.x, "int64" if s.kind == "embedding" else dtype)
    if mixed:
        shapes = stack_shapes(s)
    else:
        shapes = (("r", *s.in_dims), (s.out, "r", *((1, 1) if s.kind == "conv" else ())))
    w = [g.input(n, sh, dtype, default=None if defaults is None else np.zeros(concrete(sh, defaults), dtype))
         for n, sh in zip("AB", shapes, strict=True)]
    ins = [base, x, *w] + ([g.input("idx", (s.x[0],), "int64")] if mixed else [])
    g.set_output("y", g.add(Op.LORA_MIXED_SLOT if mixed else Op.LORA_SLOT, ins, s.node_attrs()))
    return verify(g)


def feeds(s: Site, mixed: bool, dtype: str, rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"base": rng.standard_normal(concrete(s.base, rank)), "x": rng.standard_normal(concrete(s.x, rank))}
    shapes = stack_shapes(s) if mixed else (("r", *s.in_dims), (s.out, "r", *((1, 1) if s.kind == "conv" else ())))
    for name, sh in zip("AB", shapes, strict=True):
        arr = rng.standard_normal(concrete(sh, rank)) * 0.5
        if mixed:
            arr[-1] = 0  # the zero slot
        out[name] = arr
    assert rank == 0 or np.abs(out["B"]).max() > 0.1  # B is nonzero
    out = {k: v.astype(dtype) for k, v in out.items()}
    if s.kind == "embedding":  # token ids, every id of the vocabulary possible
        out["x"] = rng.integers(0, s.in_dims[0], concrete(s.x, rank)).astype(np.int64)
    if mixed:
        out["idx"] = np.array([2, -1, 0], np.int64)
    return out


def delta64(s: Site, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """up(down(x, A), B) in float64 with torch's own layers."""
    if a.shape[0] == 0:  # torch's conv2d refuses an empty weight: a rank-1 zero adapter adds the same zeros
        a, b = torch.zeros(1, *a.shape[1:], dtype=a.dtype), torch.zeros(b.shape[0], 1, *b.shape[2:], dtype=b.dtype)
    if s.kind == "linear":
        return F.linear(F.linear(x, a), b)
    if s.kind == "embedding":
        return F.linear(F.embedding(x, a.T), b)
    at = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), **s.attrs}
    return F.conv2d(F.conv2d(x, a, None, at["stride"], at["padding"], at["dilation"]), b)


def reference(s: Site, mixed: bool, f: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v if k == "x" and s.kind == "embedding" else v.astype(np.float64))
         for k, v in f.items() if k != "idx"}
    if not mixed:
        return (t["base"] + delta64(s, t["x"], t["A"], t["B"])).numpy()
    rows = []
    for i, k in enumerate(f["idx"]):
        a, b = t["A"][k], t["B"][k]
        if s.kind in ("linear", "embedding"):  # stacks hold A.T and B.T
            a, b = a.T, b.T
        else:  # A [R, kh*kw*C] taps major -> [R, C, kh, kw]; B [out, R] -> [out, R, 1, 1]
            c, kh, kw = s.in_dims
            a, b = a.reshape(-1, kh, kw, c).permute(0, 3, 1, 2), b[:, :, None, None]
        rows.append(t["base"][i] + delta64(s, t["x"][i : i + 1], a, b)[0])
    return torch.stack(rows).numpy()


def tol(dtype: str, backend: str = "numpy") -> dict[str, float]:
    if dtype == "float32":
        return {"rtol": 1e-5, "atol": 1e-4}
    # numpy and ONNX Runtime widen float16 to float32 and round once; torch computes in float16
    return {"rtol": 1e-2, "atol": 6e-2} if backend.startswith("torch") else {"rtol": 3e-3, "atol": 2e-2}


CASES = [(s, mixed, r, d) for s in SITES for mixed in (False, True) for r in RANKS for d in DTYPES]


def case_id(c) -> str:
    s, mixed, r, d = c
    return f"{'mixed' if mixed else 'slot'}-{s.id}-r{r}-{d}"


def test_the_family_declares_the_two_slot_ops() -> None:
    assert OpGroup.Adapter == {Op.LORA_SLOT, Op.LORA_MIXED_SLOT}
    assert {OPS[op].family for op in OpGroup.Adapter} == {"adapters"}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_numpy_rule_matches_torch(case) -> None:
    s, mixed, rank, dtype = case
    f = feeds(s, mixed, dtype, rank)
    got = run(build(s, mixed, dtype), f)["y"]
    assert got.dtype == np.dtype(dtype) and got.shape == concrete(s.base, rank)
    np.testing.assert_allclose(got.astype(np.float64), reference(s, mixed, f), **tol(dtype))
    if rank:  # the adapter matters
        assert np.abs(got.astype(np.float64) - f["base"].astype(np.float64)).max() > 0.1


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backend_matches_numpy_rule(case, backend: str) -> None:
    s, mixed, rank, dtype = case
    g = build(s, mixed, dtype)
    f = feeds(s, mixed, dtype, rank, seed=1)
    got, want = compile(g, backend)(f)["y"], run(g, f)["y"]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), **tol(dtype, backend))


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("site", [SITES[1], SITES[2], SITES[4]], ids=lambda s: s.id)
def test_torch_export_matches_numpy_rule(site: Site, mixed: bool) -> None:
    g = build(site, mixed, "float32")
    exe = compile(g, "torch-export")
    for rank in (1, 3):
        f = feeds(site, mixed, "float32", rank, seed=2)
        np.testing.assert_allclose(exe(f)["y"], run(g, f)["y"], **tol("float32"))


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("site", SITES, ids=lambda s: s.id)
def test_defaults_make_the_base_layer(site: Site, mixed: bool) -> None:
    """Weights left out take their defaults (rank 0; one zero slot of rank 1): the output is ``base``."""
    g = build(site, mixed, "float32", defaults=0 if not mixed else 1)
    f = feeds(site, mixed, "float32", 2)
    given = {k: v for k, v in f.items() if k not in "AB"}
    if mixed:
        given["idx"] = np.array([0, -1, 0], np.int64)
    np.testing.assert_array_equal(run(g, given)["y"], f["base"])
    np.testing.assert_allclose(compile(g, "onnxruntime")(given)["y"], f["base"], atol=1e-6)
    full = run(g, f)["y"]  # and given, they count
    assert np.abs(full - f["base"]).max() > 0.1


def test_a_default_binds_its_dims_like_a_given_input() -> None:
    g = build(SITES[0], False, "float32", defaults=0)
    f = feeds(SITES[0], False, "float32", 2)
    with pytest.raises(RuntimeInputError, match=r"input 'B' \(its default\) dim 1 binds dim 'r' to 0.* bound it to 2"):
        run(g, {"base": f["base"], "x": f["x"], "A": f["A"]})


@pytest.mark.parametrize(("site", "mixed", "dtype", "ops"), [
    (SITES[0], False, "float32", ["Gemm", "Gemm", "Add"]),
    (SITES[1], False, "float32", ["Transpose", "MatMul", "Transpose", "MatMul", "Add"]),
    (SITES[2], False, "float32", ["Conv", "Conv", "Add"]),
    (SITES[0], False, "float16", ["Cast"] * 4 + ["Gemm", "Gemm", "Add", "Cast"]),
    (SITES[0], True, "float32", ["Gather", "Gather", "Reshape", "MatMul", "MatMul", "Reshape", "Add"]),
    (SITES[1], True, "float32", ["Gather", "Gather", "MatMul", "MatMul", "Add"]),  # 3-D x: the delta has base's shape
    (SITES[2], True, "float32", ["Gather", "Gather", "Pad", *["Slice"] * 9, "Concat", "Reshape", "MatMul", "MatMul",
                                 "Reshape", "Add"]),
    (SITES[3], True, "float32", ["Gather", "Gather", "Reshape", "MatMul", "MatMul", "Shape", "Reshape", "Add"]),
    (SITES[4], False, "float32", ["Gather", "Transpose", "Transpose", "MatMul", "Add"]),
    # no Gather of a whole table per row: the ids index the stack as [slots*vocab, R] at slot*vocab + id
    (SITES[4], True, "float32", ["Shape", "Gather", "Add", "Mod", "Mul", "Reshape", "Flatten", "Add", "Gather",
                                 "Gather", "MatMul", "Add"]),
], ids=["gemm", "matmul", "conv", "gemm-f16", "mixed-linear", "mixed-rows", "mixed-conv", "mixed-pointwise",
        "embedding", "mixed-embedding"])
def test_onnx_nodes(site: Site, mixed: bool, dtype: str, ops: list[str]) -> None:
    """The ONNX rules emit what the serving exports always did (inputs with defaults as initializers)."""
    g = build(site, mixed, dtype, defaults=0 if not mixed else 1)
    model = to_onnx(g)
    assert [n.op_type for n in model.graph.node] == ops
    assert [i.name for i in model.graph.input] == [i.name for i in g.inputs]
    assert {"A", "B"} <= {t.name for t in model.graph.initializer}


@pytest.mark.parametrize(("shapes", "attrs", "match"), [
    ([(2, 5), (2, 8), (3, 7), (5, 3)], {}, "want x"),
    ([(2, 4), (2, 8), (3, 8), (5, 3)], {}, r"base \[2, 4\] is not the layer's output \[2, 5\]"),
    ([(2, 4, 8, 8), (2, 3, 8, 8), (2, 3, 3, 3), (4, 2, 1, 1)], {"kind": "conv", "kernel": (1, 1)}, "kernel"),
    ([(2, 4, "h", "w"), (2, 3, "h", "w"), (2, 3, 3, 3), (4, 2, 1, 1)], {"kind": "conv", "kernel": (3, 3)}, "static"),
])
def test_bad_slot_shapes_name_the_module(shapes, attrs, match: str) -> None:
    g = Graph("t")
    ins = [g.input(f"i{k}", sh) for k, sh in enumerate(shapes)]
    with pytest.raises(ShapeError, match=match) as info:
        g.add(Op.LORA_SLOT, ins, {"module": "layer7", **attrs})
    assert "layer7" in str(info.value)


def test_out_of_range_row_index_is_an_error() -> None:
    s = SITES[0]
    g, f = build(s, True, "float32"), feeds(s, True, "float32", 2)
    f["idx"] = np.array([0, N_ADAPTERS + 1, 0], np.int64)
    with pytest.raises(GraphError, match=r"LoRAMixedSlot.*index 4 is out of bounds"):
        run(g, f)


def test_bfloat16_slot_with_defaults_on_onnxruntime() -> None:
    """ONNX Runtime's numpy API has no bfloat16: the inputs cross as float32, their defaults widened with them."""
    from flora_graph.ops.evaluate import np_dtype

    bf16 = np_dtype("bfloat16")
    g = build(SITES[0], False, "bfloat16", defaults=0)
    f = {k: v.astype(bf16) for k, v in feeds(SITES[0], False, "float32", 2).items()}
    exe = compile(g, "onnxruntime")
    np.testing.assert_array_equal(exe(base=f["base"], x=f["x"])["y"], f["base"])
    np.testing.assert_array_equal(exe(f)["y"], run(g, f)["y"])
