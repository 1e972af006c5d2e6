"""The graph -> ``nn.Module`` lowering: table completeness, generated source, names, errors.

Numerical agreement of every op lives in ``test_torch_backends.py``; here the module is
checked eagerly against the numpy reference where a number is needed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from flora_graph.errors import UnsupportedOpError
from flora_graph.ir import Graph, Op, OpGroup
from flora_graph.ops import OPS
from flora_graph.runtimes import run
from flora_graph.runtimes.torch_lowering import generate_forward, to_torch_module

ATOL, RTOL = 1e-5, 1e-5


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _mlp(rng: np.random.Generator) -> Graph:
    g = Graph("mlp")
    x = g.input("x", ["batch", 4])
    h = g.add(Op.LINEAR, [x, g.const("fc.weight", rng.standard_normal((8, 4)).astype(np.float32))], name="fc")
    g.add(Op.TANH, [h], name="dead")  # no output depends on it
    g.set_output("y", g.add(Op.RELU, [h], name="act"))
    return g


def _eager(module: torch.nn.Module, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.inference_mode():
        return tuple(t.numpy() for t in module(*(torch.from_numpy(a) for a in arrays)))


def test_every_non_leaf_op_has_a_lowering() -> None:
    assert set(OPS) == set(Op) - OpGroup.Leaf


def test_source_is_one_typed_line_per_live_node(rng: np.random.Generator) -> None:
    source, args, buffers = generate_forward(_mlp(rng))
    lines = source.splitlines()
    assert lines[0] == "def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:"
    assert lines[-1] == "    return (v_act,)"
    assert [ln.split(" = ")[0].strip() for ln in lines[1:-1]] == ["v_fc", "v_act"]  # 'dead' is not emitted
    assert "F.linear(x, self.w_fc_weight)" in lines[1]
    assert args == ["x"]
    assert buffers == {"w_fc_weight": "fc.weight"}


def test_module_is_self_contained_and_scripts(rng: np.random.Generator) -> None:
    g = _mlp(rng)
    module = to_torch_module(g)
    assert dict(module.named_buffers()).keys() == {"w_fc_weight"}
    assert not list(module.parameters())
    assert module.input_names == ["x"] and module.output_names == ["y"]
    x = rng.standard_normal((3, 4)).astype(np.float32)
    want = run(g, {"x": x})["y"]
    g.params["fc.weight"][:] = 0  # the module holds its own copy of the weights
    (got,) = _eager(module, x)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
    assert type(module).source == generate_forward(g)[0] and "flora_graph" not in scripted.code
    np.testing.assert_allclose(scripted(torch.from_numpy(x))[0].numpy(), want, atol=ATOL, rtol=RTOL)


def test_names_are_sanitized_and_unique(rng: np.random.Generator) -> None:
    g = Graph("odd names")
    ins = [g.input(n, ["batch", 3]) for n in ("x.in", "class", "self", "2d", "__p", "v_x_in")]
    a = g.const("a.b", rng.standard_normal(3).astype(np.float32))
    b = g.const("a_b", rng.standard_normal(3).astype(np.float32))
    a2 = g.const("a.b", name="again")  # a second Const node of the same param: one buffer
    acc = ins[0]
    for node in [*ins[1:], a, b, a2]:
        acc = g.add(Op.ADD, [acc, node], name="x.in")  # node names collide with input names after sanitizing
    g.set_output("out.put", acc)
    _, args, buffers = generate_forward(g)
    assert len(set(args)) == len(args) == 6 and all(a.isidentifier() and not a.startswith("__") for a in args)
    assert sorted(buffers.values()) == ["a.b", "a_b"]
    feeds = {n.name: rng.standard_normal((2, 3)).astype(np.float32) for n in ins}
    (got,) = _eager(to_torch_module(g), *feeds.values())
    np.testing.assert_allclose(got, run(g, feeds)["out.put"], atol=ATOL, rtol=RTOL)


def test_single_output_is_still_a_tuple(rng: np.random.Generator) -> None:
    out = to_torch_module(_mlp(rng))(torch.zeros(2, 4))
    assert isinstance(out, tuple) and len(out) == 1


def test_missing_lowering_names_op_and_node(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(OPS, Op.RELU)
    with pytest.raises(UnsupportedOpError, match=r"'act'.*Relu") as info:
        to_torch_module(_mlp(rng))
    assert info.value.ops == {"Relu": ["act"]}


def test_layer_norm_over_dynamic_dims_is_refused() -> None:
    g = Graph("ln")
    x = g.input("x", ["batch", 4])
    g.set_output("y", g.add(Op.LAYER_NORM, [x], {"axis": 0}, name="norm"))
    with pytest.raises(UnsupportedOpError, match=r"'norm'.*static") as info:
        generate_forward(g)
    assert info.value.ops == {"LayerNorm": ["norm"]}


@pytest.mark.parametrize(
    ("target", "expect"),
    [
        ((0, -1), "x.reshape([-1]).reshape([x.size(0), 12])"),
        ((-1, 4), "x.reshape([-1]).reshape([x.size(0) * 3, 4])"),
        ((0, 0, 2, 2), "x.reshape([-1]).reshape([x.size(0), 3, 2, 2])"),
        ((-1, 6), "x.reshape([-1]).reshape([x.size(0) * 2, 6])"),
    ],
)
def test_reshape_source_follows_onnx(rng: np.random.Generator, target: tuple[int, ...], expect: str) -> None:
    g = Graph("r")
    x = g.input("x", ["batch", 3, 4])
    g.set_output("y", g.add(Op.RESHAPE, [x], {"shape": target}, name="r"))
    source, _, _ = generate_forward(g)
    assert f"v_r = {expect}" in source
    arr = rng.standard_normal((2, 3, 4)).astype(np.float32)
    (got,) = _eager(to_torch_module(g), arr)
    np.testing.assert_array_equal(got, run(g, {"x": arr})["y"])


def test_weight_only_expressions_are_computed_once_not_per_call():
    import numpy as np

    from flora_graph.frontend import capture
    from flora_graph.models import build_demo_model, demo_inputs
    from flora_graph.passes import optimize
    from flora_graph.runtimes.reference import run
    from flora_graph.runtimes.torch_lowering import to_torch_module

    fused = optimize(capture(build_demo_model(), demo_inputs(2), {"image": {0: "batch"}}), "fused", backend="torchscript")
    weight_exprs = [n for n in fused.nodes if n.inputs and all(i.op.value == "Const" for i in n.inputs)]
    assert weight_exprs, "the swappable fused graph keeps s*B / [W; A] as expressions over weights"
    folded, unfolded = to_torch_module(fused), to_torch_module(fused, fold_weights=False)
    assert folded.source.count("\n") < unfolded.source.count("\n")
    for expr in weight_exprs:
        tag = f"# {expr.op.value} {expr.name!r}"
        assert tag not in folded.source and tag in unfolded.source
    x = demo_inputs(3, seed=5)["image"]
    want = run(fused, {"image": x.numpy()})["output"]
    for m in (folded, unfolded):
        np.testing.assert_allclose(m(x)[0].detach().numpy(), want, atol=1e-5, rtol=1e-5)
