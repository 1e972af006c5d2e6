"""simplify: operations that return an input unchanged leave the graph; the values stay the
reference interpreter's, and what only looks neutral stays."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from flora_graph.ir import Graph, Op, verify
from flora_graph.passes import optimize
from flora_graph.passes.simplify import simplify
from flora_graph.runtimes.reference import run

from .helpers import lora_linear

RNG = np.random.default_rng(0)


def _ops(g: Graph) -> collections.Counter:
    return collections.Counter(n.op for n in g.nodes)


def _same_values(before: Graph, after: Graph, x: dict[str, np.ndarray]) -> None:
    want, got = run(before, x), run(after, x)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_neutral_operands_go_and_the_rest_stays() -> None:
    g = Graph("neutral")
    x = g.input("x", ("batch", 4))
    zero, one = g.const("zero", np.zeros(4, np.float32)), g.const("one", np.ones((), np.float32))
    y = g.add(Op.ADD, [zero, x])                               # 0 + x: goes
    y = g.add(Op.MUL, [y, one])                                # * 1: goes
    y = g.add(Op.SUB, [y, zero])                               # - 0: goes
    y = g.add(Op.DIV, [y, one])                                # / 1: goes
    y = g.add(Op.SUB, [zero, y], name="negate")                # 0 - y: stays
    y = g.add(Op.MUL, [y, g.const("two", np.full(4, 2, np.float32))], name="double")  # stays
    wide = g.add(Op.ADD, [y, g.const("zeros", np.zeros((3, 1, 4), np.float32))], name="widen")  # broadcasts: stays
    m = g.input("m", ("batch", 4), "bool")
    kept = g.add(Op.AND, [g.const("true", np.ones(4, bool)), m])  # True & m: goes
    g.set_output("y", g.add(Op.ADD, [wide, g.const("half", np.full(4, 0.5, np.float32))], name="out"))
    g.set_output("m", g.add(Op.OR, [kept, g.const("false", np.zeros((), bool))], name="m_out"))  # an output: stays
    before = verify(g).copy()
    res = simplify(g)
    after = verify(res.graph)
    assert res.stats["fired"] == {"simplify-neutral": 5}
    names = {n.name for n in after.nodes}
    assert {"negate", "double", "widen", "out", "m_out"} <= names
    assert _ops(after)[Op.AND] == 0 and _ops(after)[Op.DIV] == 0
    x = {"x": RNG.standard_normal((2, 4)).astype(np.float32), "m": RNG.random((2, 4)) < 0.5}
    _same_values(before, after, x)


def test_movement_to_the_same_shape_goes() -> None:
    g = Graph("movement")
    x = g.input("x", ("batch", "seq", 4))
    y = g.add(Op.RESHAPE, [x], {"shape": (0, -1, 4)})               # same shape: goes
    y = g.add(Op.EXPAND, [y], {"shape": ("batch", "seq", 4)})       # same shape: goes
    y = g.add(Op.CAST, [y], {"to": "float32"})                      # same dtype: goes
    y = g.add(Op.RESHAPE, [y], {"shape": (0, -1)}, name="flatten")  # stays
    g.set_output("y", g.add(Op.CAST, [y], {"to": "float16"}, name="half"))
    before = verify(g).copy()
    after = verify(simplify(g).graph)
    assert [n.name for n in after.nodes if n.op not in (Op.INPUT,)] == ["flatten", "half"]
    _same_values(before, after, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})


def _indexed(rows_axis: int = 0, cols_axis: int = 3, cols_end: str = "kv") -> Graph:
    """``m[arange(batch) on axis rows_axis, arange(cols_end) on axis cols_axis]`` of rank-4 indices, as
    Hugging Face's mask code indexes the padding mask."""
    g = Graph("index")
    m = g.input("m", ("batch", "kv"), "bool")

    def placed(end: str, axis: int) -> object:
        node = g.add(Op.ARANGE, [], {"end": end})
        for a in sorted({0, 1, 2, 3} - {axis}):
            node = g.add(Op.UNSQUEEZE, [node], {"axes": (a,)})
        return node

    out = g.add(Op.INDEX, [m, placed("batch", rows_axis), placed(cols_end, cols_axis)], name="index")
    g.set_output("y", g.add(Op.AND, [out, g.input("c", (1, 1, 1, 1), "bool")], name="out"))
    return verify(g)


def test_indexing_by_whole_aranges_is_an_unsqueeze() -> None:
    g = _indexed()
    before = g.copy()
    res = simplify(g)
    after = verify(res.graph)
    assert res.stats["fired"]["simplify-arange-index"] == 1  # (and the index's own Unsqueeze chains merge)
    (unsq,) = [n for n in after.nodes if n.op is Op.UNSQUEEZE and n.inputs[0].name == "m"]
    assert unsq.attrs["axes"] == (1, 2) and unsq.inputs[0].name == "m" and Op.INDEX not in _ops(after)
    x = {"m": RNG.random((3, 5)) < 0.6, "c": np.ones((1, 1, 1, 1), bool)}
    _same_values(before, after, x)


@pytest.mark.parametrize(("rows_axis", "cols_axis", "cols_end", "why"), [
    (3, 0, "kv", "distinct axes in order"),   # transposed: a real gather
    (0, 3, "seq", "does not cover the whole axis"),
])
def test_indexing_that_gathers_stays(rows_axis, cols_axis, cols_end, why) -> None:
    g = _indexed(rows_axis, cols_axis, cols_end)
    res = simplify(g)
    assert Op.INDEX in _ops(res.graph) and why in res.stats["refused"]["index"]


def test_a_lora_scale_of_one_stays_a_site() -> None:
    """Tagged adapter nodes (capture tags them; here by hand) are left to the adapter passes, so the
    site is still found and merged."""
    g = lora_linear(scale=1.0)
    for n in g.nodes:
        if n.name in ("base", "down", "up", "scale", "add"):
            n.meta["role"] = {"base": "base", "down": "lora_down", "up": "lora_up", "scale": "lora_scale",
                              "add": "lora_add"}[n.name]
            n.meta["module"] = "m"
    res = simplify(g.copy())
    assert not res.changed
    merged = optimize(g, "merged")
    x = {"x": RNG.standard_normal((3, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(merged, x)["y"], run(g, x)["y"], rtol=1e-5, atol=1e-5)
    assert _ops(merged)[Op.LINEAR] == 1


def test_a_constant_cut_to_a_dynamic_length_is_left_alone() -> None:
    """A weight sliced to ``seq`` (BERT's position ids) has no value before ``seq`` is bound: kept."""
    g = Graph("dynamic")
    x = g.input("x", ("seq", 4))
    cut = g.add(Op.SLICE, [g.const("zeros", np.zeros((16, 4), np.float32))],
                {"axes": (0,), "starts": (0,), "ends": ("seq",), "steps": (1,)})
    g.set_output("y", g.add(Op.MUL, [g.add(Op.ADD, [x, cut], name="add"), g.const("two", np.float32(2))]))
    res = simplify(verify(g))
    assert not res.changed and "add" in {n.name for n in res.graph.nodes}


def test_a_squeeze_of_the_axes_an_unsqueeze_inserted_goes() -> None:
    g = Graph("squeeze")
    x = g.input("x", ("batch", "seq", 4))
    u = g.add(Op.UNSQUEEZE, [x], {"axes": (1,)})
    back = g.add(Op.SQUEEZE, [u], {"axes": (-3,)})  # the same axis, counted from the end: goes
    other = g.add(Op.SQUEEZE, [g.add(Op.UNSQUEEZE, [x], {"axes": (1, 3)})], {"axes": (1,)}, name="other")  # stays
    g.set_output("y", g.add(Op.MUL, [back, g.const("two", np.float32(2))], name="y"))
    g.set_output("z", g.add(Op.MUL, [other, g.const("three", np.float32(3))], name="z"))
    before = verify(g).copy()
    res = simplify(g)
    after = verify(res.graph)
    assert res.stats["fired"] == {"simplify-squeeze-unsqueeze": 1}
    assert after.outputs["y"].inputs[0].name == "x" and "other" in {n.name for n in after.nodes}
    _same_values(before, after, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})


@pytest.mark.parametrize(("axes1", "axes2", "axes3"), [((0,), (1,), (3,)), ((-1,), (0, 2), (-2,)), ((1, 2), (0,), (5,))])
def test_a_chain_of_unsqueezes_is_one_unsqueeze(axes1, axes2, axes3) -> None:
    g = Graph("chain")
    x = g.input("x", ("seq", 4))
    chain = g.add(Op.UNSQUEEZE, [g.add(Op.UNSQUEEZE, [g.add(Op.UNSQUEEZE, [x], {"axes": axes1})], {"axes": axes2})],
                  {"axes": axes3})
    shared = g.add(Op.UNSQUEEZE, [x], {"axes": (0,)}, name="shared")  # read twice: its readers keep it
    g.set_output("y", g.add(Op.MUL, [chain, g.const("two", np.float32(2))], name="y"))
    g.set_output("z", g.add(Op.ADD, [g.add(Op.UNSQUEEZE, [shared], {"axes": (1,)}), shared], name="z"))
    before = verify(g).copy()
    while simplify(g).changed:
        pass
    after = verify(g)
    y_in = after.outputs["y"].inputs[0]
    assert y_in.op is Op.UNSQUEEZE and y_in.inputs[0].name == "x" and y_in.shape == before.outputs["y"].shape
    assert "shared" in {n.name for n in after.nodes}
    _same_values(before, after, {"x": RNG.standard_normal((3, 4)).astype(np.float32)})


def _cache_positions(shift_start: object = "past_seq", shift_len: object = None, dtype: str = "int64") -> Graph:
    """Hugging Face's ``cache_position = arange(seq) + past_seq`` (the shift a one-element arange made a scalar),
    compared with a key index as the causal mask code does."""
    g = Graph("positions")
    g.input("ids", ("batch", "seq"), "int64")
    m = g.input("mask", ("batch", "past_seq+seq"), "int64")
    g.input("past", ("batch", 2, "past_seq", 4))
    shift_end = shift_len if shift_len is not None else f"{shift_start}+1"
    one = g.add(Op.ARANGE, [], {"start": shift_start, "end": shift_end, "dtype": dtype})
    pos = g.add(Op.ADD, [g.add(Op.ARANGE, [], {"end": "seq", "dtype": dtype}), g.add(Op.RESHAPE, [one], {"shape": ()})],
                name="cache_position")
    keys = g.add(Op.UNSQUEEZE, [g.add(Op.ARANGE, [], {"end": "past_seq+seq", "dtype": dtype})], {"axes": (0,)})
    causal = g.add(Op.LESS_OR_EQUAL, [keys, g.add(Op.UNSQUEEZE, [pos], {"axes": (1,)})], name="causal")
    pad = g.add(Op.UNSQUEEZE, [g.add(Op.CAST, [m], {"to": "bool"})], {"axes": (1,)})  # [batch, 1, past_seq+seq]
    g.set_output("y", g.add(Op.AND, [causal, pad], name="y"))
    return verify(g)


def _mask_inputs(batch: int, seq: int, past: int) -> dict[str, np.ndarray]:
    return {"ids": np.zeros((batch, seq), np.int64), "mask": (RNG.random((batch, past + seq)) < 0.8).astype(np.int64),
            "past": np.zeros((batch, 2, past, 4), np.float32)}


@pytest.mark.parametrize(("seq", "past"), [(1, 5), (4, 0), (3, 2)])
def test_an_arange_shifted_by_a_one_element_arange_is_one_arange(seq, past) -> None:
    g = _cache_positions()
    before = g.copy()
    res = simplify(g)
    after = verify(res.graph)
    assert res.stats["fired"]["simplify-arange-shift"] == 1
    (pos,) = [n for n in after.nodes if n.op is Op.ARANGE and n.shape == ("seq",)]
    assert (pos.attrs["start"], pos.attrs["end"]) == ("past_seq", "past_seq+seq")
    assert _ops(after)[Op.ADD] == 0 and _ops(after)[Op.RESHAPE] == 0
    _same_values(before, after, _mask_inputs(2, seq, past))


def test_an_add_of_a_longer_arange_stays() -> None:
    g = _cache_positions(shift_start=0, shift_len=1)  # arange(0, 1): a shift of 0, still one element
    assert simplify(g.copy()).stats["fired"].get("simplify-arange-shift") == 1
    g = Graph("longer")
    a = g.add(Op.ARANGE, [], {"end": "seq"})
    two = g.add(Op.ARANGE, [], {"start": 0, "end": 2})  # two elements: a broadcast, not a shift
    g.input("x", ("seq",), "int64")
    g.set_output("y", g.add(Op.ADD, [g.add(Op.UNSQUEEZE, [a], {"axes": (1,)}), two], name="y"))
    res = simplify(verify(g))
    assert "simplify-arange-shift" not in res.stats["fired"]


def test_a_concat_of_one_input_and_empty_ones_is_that_input() -> None:
    """Phi-3's rotary: the rotated head concatenated with the rest past its rotary width, nothing when the rotary is
    full. The empty slice goes with the Concat; two inputs with values stay concatenated."""
    g = Graph("concat")
    x = g.input("x", ("batch", 2, "seq", 8))
    rotated = g.add(Op.MUL, [x, g.const("two", np.full((), 2, np.float32))], name="rotated")
    empty = g.add(Op.SLICE, [x], {"axes": (3,), "starts": (8,), "ends": (8,), "steps": (1,)}, name="rest")
    g.set_output("y", g.add(Op.NEG, [g.add(Op.CONCAT, [rotated, empty], {"axis": -1}, name="joined")]))
    half = g.add(Op.SLICE, [x], {"axes": (3,), "starts": (4,), "ends": (8,), "steps": (1,)}, name="half")
    g.set_output("z", g.add(Op.NEG, [g.add(Op.CONCAT, [rotated, half], {"axis": 3}, name="kept")]))
    before = verify(g).copy()
    res = simplify(g)
    after = verify(res.graph)
    assert res.stats["fired"] == {"simplify-concat-empty": 1}
    assert "joined" not in {n.name for n in after.nodes} and "kept" in {n.name for n in after.nodes}
    _same_values(before, after, {"x": RNG.standard_normal((1, 2, 3, 8)).astype(np.float32)})
