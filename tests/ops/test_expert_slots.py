"""The experts kind of the adapter slots: LoRA on a mixture of experts' expert tensors, one product per
(token, expert) pair.

Every backend (the numpy rule, ONNX Runtime, TorchScript, torch.export) against an independent float64 loop over
the pairs written here, ``B`` nonzero: the swappable ``LoRASlot`` at ranks 0, 1 and 3 (one compiled program for
all: the adapter is swapped per run), int64 and int32 ids, one pair and several, experts no pair uses; the per-row
``LoRAMixedSlot`` at batch 2 and 3 (seq 2, top-2: four pairs a row), rows on different adapters, ``-1`` rows
(exactly ``base``) and adapters of lower rank than the stack's (zero padded). Then the shape checks' refusals and
the ONNX lowering's shape: one ``Loop`` per slot, the weights gathered one expert at a time inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest

from flora_graph.errors import ShapeError
from flora_graph.ir import Graph, Op, verify
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile
from flora_graph.runtimes.onnx_lowering import to_onnx

from .test_adapters_family import DTYPES, RANKS, tol

E, D_IN, D_OUT = 4, 6, 5  # experts, the expert layer's in and out features
SEQ, TOP_K = 2, 2  # mixed: each row's tokens, each routed to TOP_K experts
ADAPTER_RANKS = (3, 1, 2)  # mixed: three adapters in a stack of R = 3, then the zero slot
BACKENDS = ("numpy", "onnxruntime", "torchscript", "torch-export")
ATTRS = {"module": "layers.0.mlp.experts", "kind": "experts"}
IDS = {"one-pair": [2], "some-unused": [3, 0, 3, 2, 0, 0, 3, 2, 3], "one-expert": [1] * 5}  # expert 1 or more idle
MIXED_IDX = ([1, 0], [-1, 2], [2, -1, 0])  # adapter_index per batch


def slot_graph(dtype: str, ids_dtype: str, mixed: bool, experts: int | str = E) -> Graph:
    """One experts slot over inputs ``base``, ``x``, ``A``, ``B`` (``idx``) and ``ids``; pairs, rank (and slots) named."""
    g = Graph("experts_mixed" if mixed else "experts_slot")
    lead, r = (("slots", experts), "R") if mixed else ((experts,), "r")
    ins = [g.input("base", ("pairs", D_OUT), dtype), g.input("x", ("pairs", D_IN), dtype),
           g.input("A", (*lead, r, D_IN), dtype), g.input("B", (*lead, D_OUT, r), dtype)]
    ins += [g.input("idx", ("batch",), "int64")] if mixed else []
    ins.append(g.input("ids", ("pairs",), ids_dtype))
    g.set_output("y", g.add(Op.LORA_MIXED_SLOT if mixed else Op.LORA_SLOT, ins, ATTRS))
    return verify(g)


@functools.cache
def executable(backend: str, dtype: str, ids_dtype: str, mixed: bool) -> Callable[[dict], dict]:
    g = slot_graph(dtype, ids_dtype, mixed)
    return functools.partial(run, g) if backend == "numpy" else compile(g, backend)


def per_pair(base: np.ndarray, x: np.ndarray, weights: Callable[[int], tuple | None]) -> np.ndarray:
    """``base[s] + B_s @ (A_s @ x[s])`` in float64, one pair at a time; ``weights(s)``: ``(A_s, B_s)``, None for none."""
    out = base.astype(np.float64)
    for s in range(len(x)):
        if (w := weights(s)) is not None:
            a, b = (v.astype(np.float64) for v in w)
            out[s] += b @ (a @ x[s].astype(np.float64))
    return out


def check(got: np.ndarray, want: np.ndarray, base: np.ndarray, dtype: str, backend: str, what: str) -> None:
    assert got.dtype == np.dtype(dtype) and got.shape == base.shape, (what, got.dtype, got.shape)
    np.testing.assert_allclose(got.astype(np.float64), want, **tol(dtype, backend), err_msg=what)


@pytest.mark.parametrize("ids_dtype", ["int64", "int32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_matches_a_loop_over_pairs(backend: str, dtype: str, ids_dtype: str) -> None:
    exe = executable(backend, dtype, ids_dtype, False)
    for rank in RANKS:  # one program: each run's adapter, of any rank
        for k, (name, ids) in enumerate(IDS.items()):
            rng = np.random.default_rng(10 * rank + k)
            s = len(ids)
            f = {"base": rng.standard_normal((s, D_OUT)), "x": rng.standard_normal((s, D_IN)),
                 "A": rng.standard_normal((E, rank, D_IN)) * 0.5, "B": rng.standard_normal((E, D_OUT, rank)) * 0.5}
            f = {key: v.astype(dtype) for key, v in f.items()} | {"ids": np.array(ids, ids_dtype)}
            assert rank == 0 or np.abs(f["B"]).max() > 0.1
            got = exe(f)["y"]
            want = per_pair(f["base"], f["x"], lambda p, ids=ids, f=f: (f["A"][ids[p]], f["B"][ids[p]]))
            check(got, want, f["base"], dtype, backend, f"{backend} rank {rank} {name}")
            if rank == 0:
                np.testing.assert_array_equal(got, f["base"])
            else:  # every pair's own expert counts
                assert np.abs(got.astype(np.float64) - f["base"]).max(axis=1).min() > 1e-3


def mixed_feeds(idx: list[int], dtype: str, ids_dtype: str, seed: int, ranks=ADAPTER_RANKS):
    """The feeds (stacks zero padded to the largest rank, the last slot zero) and the adapters unpadded."""
    rng = np.random.default_rng(seed)
    adapters = [(rng.standard_normal((E, r, D_IN)) * 0.5, rng.standard_normal((E, D_OUT, r)) * 0.5) for r in ranks]
    adapters = [(a.astype(dtype), b.astype(dtype)) for a, b in adapters]
    big = max(ranks)
    a_stack, b_stack = np.zeros((len(ranks) + 1, E, big, D_IN), dtype), np.zeros((len(ranks) + 1, E, D_OUT, big), dtype)
    for i, (a, b) in enumerate(adapters):
        a_stack[i, :, : a.shape[1]], b_stack[i, ..., : b.shape[2]] = a, b
    pairs = len(idx) * SEQ * TOP_K  # batch-major: a row's tokens, each token's TOP_K experts; expert 2 idle
    ids = np.concatenate([rng.choice([0, 1, 3], TOP_K, replace=False) for _ in range(len(idx) * SEQ)])
    f = {"base": rng.standard_normal((pairs, D_OUT)).astype(dtype), "x": rng.standard_normal((pairs, D_IN)).astype(dtype),
         "A": a_stack, "B": b_stack, "idx": np.array(idx, np.int64), "ids": ids.astype(ids_dtype)}
    return f, adapters


@pytest.mark.parametrize("ids_dtype", ["int64", "int32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_matches_a_loop_over_pairs(backend: str, dtype: str, ids_dtype: str) -> None:
    exe, per_row = executable(backend, dtype, ids_dtype, True), SEQ * TOP_K
    for k, idx in enumerate(MIXED_IDX):
        f, adapters = mixed_feeds(idx, dtype, ids_dtype, seed=k)

        def weights(p: int, idx=idx, f=f, adapters=adapters) -> tuple | None:
            slot, e = idx[p // per_row], f["ids"][p]
            return None if slot == -1 else (adapters[slot][0][e], adapters[slot][1][e])

        got = exe(f)["y"]
        check(got, per_pair(f["base"], f["x"], weights), f["base"], dtype, backend, f"{backend} idx {idx}")
        for row, slot in enumerate(idx):
            rows = slice(row * per_row, (row + 1) * per_row)
            if slot == -1:  # no adapter: the base layer, exactly
                np.testing.assert_array_equal(got[rows], f["base"][rows])
            else:
                assert np.abs(got[rows].astype(np.float64) - f["base"][rows]).max(axis=1).min() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_stack_of_rank_0_adds_zeros(backend: str) -> None:
    """A stack of rank 0 (the swappable slot's rank 0, and the other kinds' mixed one, add zeros) is the base layer."""
    f, _ = mixed_feeds([0, -1], "float32", "int64", seed=5, ranks=(0, 0))
    np.testing.assert_array_equal(executable(backend, "float32", "int64", True)(f)["y"], f["base"])


def test_mixed_with_a_named_experts_dim_is_refused() -> None:
    """A pair's row of the stacks is ``slot * experts + expert``: the number of experts must be static."""
    with pytest.raises(ShapeError, match=r"layers.0.mlp.experts.*the stacks' number of experts must be static"):
        slot_graph("float32", "int64", True, experts="experts")


GOOD = {"base": (7, 5), "x": (7, 6), "A": (4, 3, 6), "B": (4, 5, 3), "idx": (2,), "ids": (7,)}
WANT_SLOT = r"want x \[pairs, in\], A \[experts, rank, in\], B \[experts, out, rank\], ids \[pairs\]"
WANT_MIXED = r"want x \[pairs, in\], A stack \[slots, experts, R, in\], B stack \[slots, experts, out, R\]"
IDS_INPUT = r"an experts slot takes the pairs' expert ids \(int \[pairs\]\) as input "


REFUSALS = {  # id: (mixed, changed shapes or dtypes (None: the input left out), the message's part)
    "A-in": (False, {"A": (4, 3, 8)}, WANT_SLOT + r" \(inputs \[7, 5\], \[7, 6\], \[4, 3, 8\]"),
    "B-rank": (False, {"B": (4, 5, 2)}, WANT_SLOT),
    "experts-differ": (False, {"B": (3, 5, 3)}, WANT_SLOT),
    "x-3d": (False, {"x": (1, 7, 6)}, WANT_SLOT),
    "ids-length": (False, {"ids": (8,)}, WANT_SLOT + r" \(inputs .*, \[8\]\)"),
    "ids-2d": (False, {"ids": (7, 1)}, IDS_INPUT + "4"),
    "ids-missing": (False, {"ids": None}, IDS_INPUT + "4"),
    "ids-float": (False, {"ids": "float32"}, IDS_INPUT + "4"),
    "B-float16": (False, {"B": "float16"}, r"dtypes \['float32', 'float32', 'float32', 'float16'\] differ"),
    "base": (False, {"base": (7, 4)}, r"base \[7, 4\] is not the layer's output \[7, 5\]"),
    "mixed-slots-differ": (True, {"A": (4, 4, 3, 6), "B": (3, 4, 5, 3)}, WANT_MIXED),
    "mixed-experts-differ": (True, {"A": (3, 4, 3, 6), "B": (3, 2, 5, 3)}, WANT_MIXED),
    "mixed-A-in": (True, {"A": (3, 4, 3, 8), "B": (3, 4, 5, 3)}, WANT_MIXED),
    "mixed-B-rank": (True, {"A": (3, 4, 3, 6), "B": (3, 4, 5, 2)}, WANT_MIXED),
    "mixed-ids-length": (True, {"ids": (6,)}, WANT_MIXED),
    "mixed-ids-missing": (True, {"ids": None}, IDS_INPUT + "5"),
    "mixed-ids-float": (True, {"ids": "float32"}, IDS_INPUT + "5"),
    "mixed-idx-int32": (True, {"idx": "int32"}, r"adapter_index must be int64 \[batch\], got int32\[2\]"),
    "mixed-base": (True, {"base": (7, 6)}, r"base \[7, 6\] is not the layer's output \[7, 5\]"),
}


@pytest.mark.parametrize(("mixed", "change", "match"), [
    pytest.param(*v, id=k) for k, v in REFUSALS.items()])
def test_bad_experts_slots_are_refused(mixed: bool, change: dict, match: str) -> None:
    shapes = {"A": (3, 4, 3, 6), "B": (3, 4, 5, 3)} if mixed else {}
    shapes = GOOD | shapes | {k: v for k, v in change.items() if isinstance(v, tuple)}
    dtypes = {"idx": "int64", "ids": "int64"} | {k: v for k, v in change.items() if isinstance(v, str)}
    names = ["base", "x", "A", "B", *(["idx"] if mixed else []), "ids"]
    g = Graph("t")
    ins = [g.input(n, shapes[n], dtypes.get(n, "float32")) for n in names if change.get(n, "") is not None]
    with pytest.raises(ShapeError, match=match) as info:
        g.add(Op.LORA_MIXED_SLOT if mixed else Op.LORA_SLOT, ins, ATTRS)
    assert "layers.0.mlp.experts" in str(info.value)


def test_ids_given_to_a_linear_slot_are_refused() -> None:
    g = Graph("t")
    ins = [g.input(n, GOOD[n]) for n in ("base", "x")] + [g.input("A", (3, 6)), g.input("B", (5, 3))]
    with pytest.raises(ShapeError, match="takes base, x, A and B"):
        g.add(Op.LORA_SLOT, [*ins, g.input("ids", (7,), "int64")], {"module": "m"})


def loop_iter(loop) -> str:
    """The name of a Loop body's iteration number."""
    return next(a.g for a in loop.attribute if a.name == "body").input[0].name


@pytest.mark.parametrize("ids_dtype", ["int64", "int32"])
def test_onnx_one_loop_per_slot_gathering_one_expert_at_a_time(ids_dtype: str) -> None:
    """Two slots (gate, up) over the same pairs: two ``Loop``; no node outside them reads a weight stack whole by
    the pairs' ids; inside, each weight is gathered once per iteration, by the iteration's expert."""
    g = Graph("gate_up")
    x, ids = g.input("x", ("pairs", D_IN)), g.input("ids", ("pairs",), ids_dtype)
    weights = set()
    for name in ("gate", "up"):
        a, b = g.input(f"A_{name}", (E, "r", D_IN)), g.input(f"B_{name}", (E, D_OUT, "r"))
        base = g.input(f"base_{name}", ("pairs", D_OUT))
        g.set_output(name, g.add(Op.LORA_SLOT, [base, x, a, b, ids], {"module": name, "kind": "experts"}))
        weights |= {a.name, b.name}
    nodes = to_onnx(verify(g)).graph.node
    loops = [n for n in nodes if n.op_type == "Loop"]
    assert len(loops) == 2
    assert not [n for n in nodes if set(n.input) & weights], "a weight stack read outside the experts Loop"
    for loop in loops:
        body = next(a.g for a in loop.attribute if a.name == "body").node
        expert = next(n for n in body if n.op_type == "Gather" and n.input[1] == loop_iter(loop)).output[0]
        reads = [n for n in body if set(n.input) & weights]
        assert len(reads) == 2 and all(n.op_type == "Gather" and n.input[1] == expert for n in reads)
        assert {n.op_type for n in body} >= {"NonZero", "GatherND", "Gemm", "ScatterND"}


def test_onnx_mixed_experts_slot_flattens_the_stacks_into_one_loop() -> None:
    nodes = to_onnx(slot_graph("float32", "int64", True)).graph.node
    assert [n.op_type for n in nodes].count("Loop") == 1
    stack_reads = [n.op_type for n in nodes if set(n.input) & {"A", "B"}]
    assert sorted(stack_reads) == ["Reshape", "Reshape", "Shape", "Shape"]  # no Gather of a row's whole stack
