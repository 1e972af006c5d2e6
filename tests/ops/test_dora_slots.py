"""DoRA's magnitude on the linear adapter slots: ``(1 + d) * (base + x @ A.T @ B.T)``, ``d`` per output row.

Every backend (the numpy rule, ONNX Runtime, TorchScript, torch.export) against an independent float64 computation
written here, ``B`` and ``d`` nonzero: the swappable ``LoRASlot`` (2-D and 3-D inputs, ranks 0 and 3) and the per-row
``LoRAMixedSlot`` (rows on different adapters, a ``-1`` row that stays ``base`` exactly, 3-D inputs); then the shape
checks' refusals.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from flora_graph.errors import ShapeError
from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile

from .test_adapters_family import tol

D_IN, D_OUT, SEQ = 6, 5, 3
BACKENDS = ("numpy", "onnxruntime", "torchscript", "torch-export")
ATTRS = {"module": "layers.0.self_attn.q_proj", "kind": "linear", "dora": 1}


def slot_graph(mixed: bool, rank3: bool, dtype: str = "float32") -> Graph:
    """One DoRA slot over ``base``, ``x``, ``A``, ``B`` (``idx``) and ``d``; batch, rank (and slots) named."""
    g = Graph("dora_mixed" if mixed else "dora_slot")
    rows = ("batch", SEQ) if rank3 else ("batch",)
    if mixed:
        ab = [g.input("A", ("slots", D_IN, "R"), dtype), g.input("B", ("slots", "R", D_OUT), dtype),
              g.input("idx", ("batch",), "int64"), g.input("d", ("slots", D_OUT), dtype)]
    else:
        ab = [g.input("A", ("r", D_IN), dtype), g.input("B", (D_OUT, "r"), dtype), g.input("d", (D_OUT,), dtype)]
    ins = [g.input("base", (*rows, D_OUT), dtype), g.input("x", (*rows, D_IN), dtype), *ab]
    g.set_output("y", g.add(Op.LORA_MIXED_SLOT if mixed else Op.LORA_SLOT, ins, ATTRS))
    return verify(g)


@functools.cache
def executable(backend: str, mixed: bool, rank3: bool):
    g = slot_graph(mixed, rank3)
    return functools.partial(run, g) if backend == "numpy" else compile(g, backend)


def want(base, x, a, b, d) -> np.ndarray:
    """``(1 + d) * (base + x @ a.T @ b.T)`` in float64 (``a`` ``[r, in]``, ``b`` ``[out, r]``, ``d`` ``[out]``)."""
    f = np.float64
    return (1 + d.astype(f)) * (base.astype(f) + x.astype(f) @ a.astype(f).T @ b.astype(f).T)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank3", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("rank", [0, 3])
def test_slot_rescales_each_row(backend: str, rank3: bool, rank: int) -> None:
    rng = np.random.default_rng(rank)
    rows = (2, SEQ) if rank3 else (4,)
    f = {"base": rng.standard_normal((*rows, D_OUT), dtype=np.float32),
         "x": rng.standard_normal((*rows, D_IN), dtype=np.float32),
         "A": rng.standard_normal((rank, D_IN), dtype=np.float32),
         "B": rng.standard_normal((D_OUT, rank), dtype=np.float32),
         "d": rng.uniform(-0.5, 0.5, D_OUT).astype(np.float32)}
    got = executable(backend, False, rank3)(f)["y"]
    np.testing.assert_allclose(got, want(f["base"], f["x"], f["A"], f["B"], f["d"]), **tol("float32"))
    assert np.abs(got - f["base"]).max() > 1e-2  # d alone moves it at rank 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank3", [False, True], ids=["2d", "3d"])
def test_mixed_rows_take_their_own_magnitude(backend: str, rank3: bool) -> None:
    rng = np.random.default_rng(7)
    idx = np.array([1, -1, 0], np.int64)
    rows = (3, SEQ) if rank3 else (3,)
    a = rng.standard_normal((3, D_IN, 2), dtype=np.float32)  # two adapters and the zero slot, as stacks are
    b = rng.standard_normal((3, 2, D_OUT), dtype=np.float32)
    d = rng.uniform(-0.5, 0.5, (3, D_OUT)).astype(np.float32)
    a[-1], b[-1], d[-1] = 0, 0, 0
    f = {"base": rng.standard_normal((*rows, D_OUT), dtype=np.float32),
         "x": rng.standard_normal((*rows, D_IN), dtype=np.float32), "A": a, "B": b, "idx": idx, "d": d}
    got = executable(backend, True, rank3)(f)["y"]
    for row, k in enumerate(idx):
        np.testing.assert_allclose(got[row], want(f["base"][row], f["x"][row], a[k].T, b[k].T, d[k]), **tol("float32"))
    np.testing.assert_array_equal(got[1], f["base"][1])  # no adapter: the base layer, exactly


@pytest.mark.parametrize(("mixed", "change", "match"), [
    (False, {"d": (D_OUT + 1,)}, r"its DoRA magnitude must be \[out\] = \[5\]"),
    (False, {"d": None}, r"takes base, x, A and B and the DoRA magnitude"),
    (True, {"d": (2, D_OUT)}, r"its DoRA magnitudes' stack must be \[slots, out\]"),
    (False, {"kind": "embedding"}, r"only a linear slot of one module takes a DoRA magnitude"),
])
def test_bad_dora_slots_are_refused(mixed: bool, change: dict, match: str) -> None:
    g = Graph("bad")
    attrs = {**ATTRS, **{k: v for k, v in change.items() if k == "kind"}}
    base, x = g.input("base", (4, D_OUT)), g.input("x", (4, D_IN), "int64" if attrs["kind"] == "embedding" else "float32")
    if mixed:
        ins = [base, x, g.input("A", (3, D_IN, 2)), g.input("B", (3, 2, D_OUT)), g.input("idx", (4,), "int64")]
    else:
        ins = [base, x, g.input("A", (2, D_IN)), g.input("B", (D_OUT, 2))]
    if "d" not in change or change["d"] is not None:
        ins.append(g.input("d", change.get("d", (3, D_OUT) if mixed else (D_OUT,))))
    with pytest.raises(ShapeError, match=match):
        g.add(Op.LORA_MIXED_SLOT if mixed else Op.LORA_SLOT, ins, attrs)
