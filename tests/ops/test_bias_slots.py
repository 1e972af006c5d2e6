"""A bias ``c`` on the linear adapter slots: ``base + x @ A.T @ B.T + c``, and with DoRA's magnitude ``d``
``(1 + d) * (base + x @ A.T @ B.T) + c``.

Every backend (the numpy rule, ONNX Runtime, TorchScript, torch.export) against an independent float64 computation
written here, ``B``, ``c`` and ``d`` nonzero: the swappable ``LoRASlot`` (2-D and 3-D inputs, ranks 0 and 3) and the
per-row ``LoRAMixedSlot`` (rows on different adapters, a ``-1`` row that stays ``base`` exactly, 3-D inputs); then the
shape checks' refusals.
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
MODULE = "layers.0.self_attn.q_proj"


def slot_graph(mixed: bool, rank3: bool, dora: bool) -> Graph:
    """One slot with a bias over ``base``, ``x``, ``A``, ``B`` (``idx``), (``d``) and ``c``; batch, rank (and slots)
    named."""
    g = Graph("bias_mixed" if mixed else "bias_slot")
    rows = ("batch", SEQ) if rank3 else ("batch",)
    vec = ("slots", D_OUT) if mixed else (D_OUT,)
    if mixed:
        ab = [g.input("A", ("slots", D_IN, "R")), g.input("B", ("slots", "R", D_OUT)), g.input("idx", ("batch",), "int64")]
    else:
        ab = [g.input("A", ("r", D_IN)), g.input("B", (D_OUT, "r"))]
    extras = ([g.input("d", vec)] if dora else []) + [g.input("c", vec)]
    ins = [g.input("base", (*rows, D_OUT)), g.input("x", (*rows, D_IN)), *ab, *extras]
    attrs = {"module": MODULE, "kind": "linear", "lora_bias": 1, "dora": int(dora)}
    g.set_output("y", g.add(Op.LORA_MIXED_SLOT if mixed else Op.LORA_SLOT, ins, attrs))
    return verify(g)


@functools.cache
def executable(backend: str, mixed: bool, rank3: bool, dora: bool):
    g = slot_graph(mixed, rank3, dora)
    return functools.partial(run, g) if backend == "numpy" else compile(g, backend)


def want(base, x, a, b, c, d=None) -> np.ndarray:
    """``(1 + d) * (base + x @ a.T @ b.T) + c`` in float64 (``a`` ``[r, in]``, ``b`` ``[out, r]``, ``c``, ``d``
    ``[out]``; no ``d``: no rescaling)."""
    f = np.float64
    s = base.astype(f) + x.astype(f) @ a.astype(f).T @ b.astype(f).T
    return (s if d is None else (1 + d.astype(f)) * s) + c.astype(f)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank3", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("dora", [False, True], ids=["bias", "dora+bias"])
def test_slot_adds_its_bias(backend: str, rank3: bool, rank: int, dora: bool) -> None:
    rng = np.random.default_rng(rank + 10 * dora)
    rows = (2, SEQ) if rank3 else (4,)
    f = {"base": rng.standard_normal((*rows, D_OUT), dtype=np.float32),
         "x": rng.standard_normal((*rows, D_IN), dtype=np.float32),
         "A": rng.standard_normal((rank, D_IN), dtype=np.float32),
         "B": rng.standard_normal((D_OUT, rank), dtype=np.float32),
         "c": rng.standard_normal(D_OUT, dtype=np.float32)}
    if dora:
        f["d"] = rng.uniform(-0.5, 0.5, D_OUT).astype(np.float32)
    got = executable(backend, False, rank3, dora)(f)["y"]
    np.testing.assert_allclose(got, want(f["base"], f["x"], f["A"], f["B"], f["c"], f.get("d")), **tol("float32"))
    assert np.abs(got - f["base"]).max() > 1e-2  # c alone moves it at rank 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank3", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("dora", [False, True], ids=["bias", "dora+bias"])
def test_mixed_rows_take_their_own_bias(backend: str, rank3: bool, dora: bool) -> None:
    rng = np.random.default_rng(7)
    idx = np.array([1, -1, 0], np.int64)
    rows = (3, SEQ) if rank3 else (3,)
    a = rng.standard_normal((3, D_IN, 2), dtype=np.float32)  # two adapters and the zero slot, as stacks are
    b = rng.standard_normal((3, 2, D_OUT), dtype=np.float32)
    c = rng.standard_normal((3, D_OUT), dtype=np.float32)
    d = rng.uniform(-0.5, 0.5, (3, D_OUT)).astype(np.float32)
    a[-1], b[-1], c[-1], d[-1] = 0, 0, 0, 0
    f = {"base": rng.standard_normal((*rows, D_OUT), dtype=np.float32),
         "x": rng.standard_normal((*rows, D_IN), dtype=np.float32), "A": a, "B": b, "idx": idx, "c": c}
    if dora:
        f["d"] = d
    got = executable(backend, True, rank3, dora)(f)["y"]
    for row, k in enumerate(idx):
        np.testing.assert_allclose(got[row], want(f["base"][row], f["x"][row], a[k].T, b[k].T, c[k], d[k] if dora else None),
                                   **tol("float32"))
    np.testing.assert_array_equal(got[1], f["base"][1])  # no adapter: the base layer, exactly


@pytest.mark.parametrize(("mixed", "change", "match"), [
    (False, {"c": (D_OUT + 1,)}, r"its bias must be \[out\] = \[5\]"),
    (False, {"c": None}, r"takes base, x, A and B and the bias"),
    (True, {"c": (2, D_OUT)}, r"its biases' stack must be \[slots, out\]"),
    (True, {"c": None}, r"takes base, x, the A and B stacks and adapter_index and the biases' stack"),
    (False, {"kind": "embedding"}, r"only a linear slot of one module takes a bias"),
])
def test_bad_bias_slots_are_refused(mixed: bool, change: dict, match: str) -> None:
    g = Graph("bad")
    attrs = {"module": MODULE, "kind": change.get("kind", "linear"), "lora_bias": 1}
    base, x = g.input("base", (4, D_OUT)), g.input("x", (4, D_IN), "int64" if attrs["kind"] == "embedding" else "float32")
    if mixed:
        ins = [base, x, g.input("A", (3, D_IN, 2)), g.input("B", (3, 2, D_OUT)), g.input("idx", (4,), "int64")]
    else:
        ins = [base, x, g.input("A", (2, D_IN)), g.input("B", (D_OUT, 2))]
    if "c" not in change or change["c"] is not None:
        ins.append(g.input("c", change.get("c", (3, D_OUT) if mixed else (D_OUT,))))
    with pytest.raises(ShapeError, match=match):
        g.add(Op.LORA_MIXED_SLOT if mixed else Op.LORA_SLOT, ins, attrs)
