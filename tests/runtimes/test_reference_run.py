"""``run()`` and ``ReferenceExecutable``: input checking, outputs, freeing, dtypes."""

from __future__ import annotations

import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flora_graph.errors import GraphError, RuntimeInputError, ShapeError, UnsupportedOpError
from flora_graph.ir import Graph, Op, verify
from flora_graph.ops import OPS
from flora_graph.runtimes import ReferenceExecutable, run

ATOL, RTOL = 1e-5, 1e-5


def rand(*shape: int, seed: int = 0, dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def two_input_graph() -> Graph:
    """``y = Linear(x, W) + z`` with x ``[batch, 3]`` and z ``[batch, 4]``."""
    g = Graph("two")
    x = g.input("x", ("batch", 3))
    z = g.input("z", ("batch", 4))
    w = g.const("w", rand(4, 3, seed=1))
    g.set_output("y", g.add(Op.ADD, [g.add(Op.LINEAR, [x, w]), z]))
    return verify(g)


def expected_two(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    return (F.linear(torch.from_numpy(x), torch.from_numpy(rand(4, 3, seed=1))) + torch.from_numpy(z)).numpy()


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "feeds,culprit",
    [
        ({"x": rand(2, 3)}, "'z'"),  # missing
        ({"x": rand(2, 3), "z": rand(2, 4), "extra": rand(1)}, "'extra'"),  # unknown name
        ({"x": rand(2, 3), "z": rand(2, 4, 1)}, "'z'"),  # wrong rank
        ({"x": rand(3), "z": rand(2, 4)}, "'x'"),  # wrong rank
        ({"x": rand(2, 5), "z": rand(2, 4)}, "'x'"),  # static dim mismatch
        ({"x": rand(2, 3), "z": rand(2, 3)}, "'z'"),  # static dim mismatch
        ({"x": rand(2, 3), "z": rand(5, 4)}, "'z'"),  # "batch" bound to 2, then 5
        ({"x": rand(2, 3), "z": np.array([["a"] * 4] * 2)}, "'z'"),  # strings
        ({"x": rand(2, 3).astype(object), "z": rand(2, 4)}, "'x'"),  # object array
        ({"x": rand(2, 3).astype(np.complex64), "z": rand(2, 4)}, "'x'"),  # complex
        ({"x": np.ones((2, 3), bool), "z": rand(2, 4)}, "'x'"),  # bool into float
        ({"x": [[1.0, 2.0], [3.0]], "z": rand(2, 4)}, "'x'"),  # ragged
    ],
    ids=[
        "missing",
        "unknown",
        "rank-high",
        "rank-low",
        "static-x",
        "static-z",
        "batch-twice",
        "strings",
        "object",
        "complex",
        "bool",
        "ragged",
    ],
)
def test_bad_inputs_raise_naming_the_input(feeds: dict, culprit: str) -> None:
    with pytest.raises(RuntimeInputError, match=culprit):
        run(two_input_graph(), feeds)


def test_compound_dynamic_dim_is_checked() -> None:
    g = Graph("compound")
    x = g.input("x", ("batch", 3))
    y = g.input("y", ("2*batch", 3))
    g.set_output("x", g.add(Op.NEG, [x]))
    g.set_output("y", g.add(Op.NEG, [y]))
    out = run(g, {"x": rand(3, 3), "y": rand(6, 3)})
    np.testing.assert_array_equal(out["y"], -rand(6, 3))
    with pytest.raises(RuntimeInputError, match="'y'"):
        run(g, {"x": rand(3, 3), "y": rand(5, 3)})


def test_int_and_float64_inputs_are_cast_to_the_declared_float() -> None:
    x64, zi = rand(2, 3, dtype="float64"), np.arange(8).reshape(2, 4)
    got = run(two_input_graph(), {"x": x64, "z": zi})["y"]
    assert got.dtype == np.float32
    want = expected_two(x64.astype("float32"), zi.astype("float32"))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_float_into_int_input_is_rejected() -> None:
    g = Graph("ints")
    i = g.input("i", ("batch",), "int64")
    g.set_output("y", g.add(Op.NEG, [i]))
    assert run(g, {"i": np.arange(3, dtype=np.int32)})["y"].tolist() == [0, -1, -2]
    with pytest.raises(RuntimeInputError, match="'i'"):
        run(g, {"i": np.arange(3.0)})


# --------------------------------------------------------------------------- good inputs
def test_torch_tensors_and_lists_are_accepted() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    z = rand(5, 4).tolist()
    got = run(two_input_graph(), {"x": x, "z": z})["y"]
    np.testing.assert_allclose(got, expected_two(x.detach().numpy(), np.array(z, "float32")), atol=ATOL, rtol=RTOL)


def test_bfloat16_graph_takes_torch_bfloat16() -> None:
    g = Graph("bf16")
    x = g.input("x", ("batch", 8), "bfloat16")
    g.set_output("y", g.add(Op.GELU, [x]))
    xt = torch.randn(3, 8).to(torch.bfloat16)
    got = run(g, {"x": xt})["y"]
    assert str(got.dtype) == "bfloat16"
    want = F.gelu(xt.float()).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, atol=1e-2, rtol=1e-2)


def test_dynamic_batch_sizes_share_one_graph() -> None:
    g = two_input_graph()
    for n in (1, 5, 2):
        x, z = rand(n, 3, seed=n), rand(n, 4, seed=10 + n)
        np.testing.assert_allclose(run(g, {"x": x, "z": z})["y"], expected_two(x, z), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- outputs
def test_intermediate_that_is_also_an_output() -> None:
    g = Graph("mid")
    x = g.input("x", ("batch", 3))
    h = g.add(Op.LINEAR, [x, g.const("w", rand(4, 3, seed=2))], name="h")
    r = g.add(Op.RELU, [h])
    g.set_output("h", h)
    g.set_output("y", g.add(Op.MUL, [g.add(Op.TANH, [h]), r]))
    g.set_output("h_again", h)
    xv = rand(5, 3, seed=3)
    out = run(verify(g), {"x": xv})
    ht = F.linear(torch.from_numpy(xv), torch.from_numpy(rand(4, 3, seed=2)))
    assert list(out) == ["h", "y", "h_again"]
    np.testing.assert_allclose(out["h"], ht.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out["h_again"], ht.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out["y"], (torch.tanh(ht) * F.relu(ht)).numpy(), atol=ATOL, rtol=RTOL)
    out["h"][:] = 0  # two names, two arrays
    assert np.abs(out["h_again"]).sum() > 0


def test_outputs_do_not_alias_weights_or_inputs() -> None:
    g = Graph("alias")
    x = g.input("x", (2, 3))
    g.set_output("w", g.const("w", rand(2, 3, seed=4)))
    g.set_output("x", x)
    g.set_output("x_t", g.add(Op.TRANSPOSE, [g.add(Op.IDENTITY, [x])], {"perm": (1, 0)}))
    xv = rand(2, 3, seed=5)
    out = run(g, {"x": xv})
    for v in out.values():
        v[...] = 7.0
    np.testing.assert_array_equal(g.params["w"], rand(2, 3, seed=4))
    np.testing.assert_array_equal(xv, rand(2, 3, seed=5))


def test_values_are_freed_after_last_use(monkeypatch: pytest.MonkeyPatch) -> None:
    refs: dict[str, weakref.ref] = {}
    alive_at_tanh: list[bool] = []
    relu, tanh = OPS[Op.RELU].numpy, OPS[Op.TANH].numpy

    def spy_relu(x: np.ndarray) -> np.ndarray:
        out = relu(x)
        refs["relu"] = weakref.ref(out)
        return out

    def spy_tanh(x: np.ndarray) -> np.ndarray:
        alive_at_tanh.append(refs["relu"]() is not None)
        return tanh(x)

    monkeypatch.setitem(OPS, Op.RELU, replace(OPS[Op.RELU], numpy=spy_relu))
    monkeypatch.setitem(OPS, Op.TANH, replace(OPS[Op.TANH], numpy=spy_tanh))
    g = Graph("chain")
    x = g.input("x", ("batch", 16))
    g.set_output("y", g.add(Op.TANH, [g.add(Op.NEG, [g.add(Op.RELU, [x])])]))
    xv = rand(4, 16)
    got = run(g, {"x": xv})["y"]
    assert alive_at_tanh == [False]  # the Relu value died once Neg had read it
    np.testing.assert_allclose(got, torch.tanh(-F.relu(torch.from_numpy(xv))).numpy(), atol=ATOL, rtol=RTOL)


def test_dead_nodes_are_not_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(x: np.ndarray) -> np.ndarray:
        raise AssertionError("dead node evaluated")

    monkeypatch.setitem(OPS, Op.SIGMOID, replace(OPS[Op.SIGMOID], numpy=boom))
    g = Graph("dead")
    x = g.input("x", ("batch", 3))
    g.add(Op.SIGMOID, [x])
    g.set_output("y", g.add(Op.SILU, [x]))
    xv = rand(2, 3)
    np.testing.assert_allclose(run(g, {"x": xv})["y"], F.silu(torch.from_numpy(xv)).numpy(), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- graph faults
def test_wrong_declared_shape_is_reported_naming_the_node() -> None:
    g = Graph("lie")
    x = g.input("x", ("batch", 4))
    n = g.add(Op.RESHAPE, [x], {"shape": (0, 2, 2)}, name="r")
    g.set_output("y", n)
    n.shape = ("batch", 4, 1)  # hand-edited, as a buggy pass might
    with pytest.raises(ShapeError, match="'r'"):
        run(g, {"x": rand(2, 4)})


def test_missing_impl_raises_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(OPS, Op.RELU)
    g = Graph("u")
    g.set_output("y", g.add(Op.RELU, [g.input("x", (2,))], name="act"))
    with pytest.raises(UnsupportedOpError, match="'act'"):
        run(g, {"x": rand(2)})


def test_const_without_param_raises() -> None:
    g = Graph("p")
    g.set_output("y", g.add(Op.NEG, [g.const("w", rand(2))]))
    del g.params["w"]
    with pytest.raises(GraphError, match="'w'"):
        run(g, {})


# --------------------------------------------------------------------------- executable
def test_executable_call_styles_and_save_load(tmp_path) -> None:
    exe = ReferenceExecutable(two_input_graph())
    assert exe.backend == "numpy"
    assert exe.input_names == ["x", "z"] and exe.output_names == ["y"]
    x, z = rand(3, 3, seed=6), rand(3, 4, seed=7)
    want = expected_two(x, z)
    for got in (exe(x=x, z=z), exe({"x": x, "z": z}), exe({"x": x}, z=z)):
        np.testing.assert_allclose(got["y"], want, atol=ATOL, rtol=RTOL)
    with pytest.raises(RuntimeInputError, match="'x'"):
        exe({"x": x, "z": z}, x=x)
    exe.save(tmp_path / "g")
    np.testing.assert_allclose(ReferenceExecutable.load(tmp_path / "g")(x=x, z=z)["y"], want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "torchscript", "torch-export"])
def test_a_dim_only_a_sum_carries_is_its_size_less_the_rest(backend: str) -> None:
    """A mask over ``past_seq+seq`` positions beside ``x[batch, seq]`` and no input of ``past_seq`` alone (a
    state-space model's cache graph): ``past_seq`` is the mask's width less ``seq``, on every backend."""
    from flora_graph.runtimes import compile

    g = Graph("sum_carried")
    mask = g.input("mask", ("batch", "past_seq+seq"))
    x = g.input("x", ("batch", "seq"))
    tail = g.add(Op.SLICE, [mask], {"axes": (1,), "starts": ("past_seq",), "ends": ("past_seq+seq",), "steps": (1,)})
    g.set_output("y", g.add(Op.MUL, [tail, x]))
    exe = compile(verify(g), backend)
    for past, seq in ((0, 3), (4, 1), (2, 5)):
        m = np.arange(2 * (past + seq), dtype=np.float32).reshape(2, past + seq)
        xs = np.full((2, seq), 2, np.float32)
        np.testing.assert_array_equal(exe(mask=m, x=xs)["y"], m[:, past:] * 2, err_msg=f"past {past} seq {seq}")
    with pytest.raises(RuntimeInputError, match="mask"):  # a mask narrower than the new tokens: no past_seq fits
        run(g, {"mask": np.ones((2, 1), np.float32), "x": np.ones((2, 3), np.float32)})
