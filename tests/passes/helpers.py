"""Graph builders and checks shared by the pass tests.

Hand-built graphs carry no tags (as if imported from ONNX); exported ones come from
``LoRAAdapter.export_graph`` and are tagged. Every builder uses a nonzero ``B``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter
from flora_graph.ir import ComputationNode, Graph, Op, verify
from flora_graph.runtimes.reference import run

F32 = {"atol": 1e-5, "rtol": 1e-5}


def lora_linear(*, d_in: int = 8, d_out: int = 6, rank: int = 2, scale: float | None = 0.5, bias: bool = True,
                swap_add: bool = False, scale_left: bool = False, seed: int = 0, zero: str = "",
                x_shape: tuple = ("batch", 8), dtype: str = "float32") -> Graph:
    """Untagged ``Add(Linear(x, W, b), Mul(Linear(Linear(x, A), B), s))``; options permute and vary it.

    ``scale=None`` leaves the ``Mul`` out; ``zero`` names factors ("A", "B", "s") set to zeros.
    """
    rng = np.random.default_rng(seed)
    g = Graph("lora_linear")
    x = g.input("x", (*x_shape[:-1], d_in), dtype)
    w = g.const("W", rng.standard_normal((d_out, d_in)).astype(dtype))
    args = [x, w] + ([g.const("b", rng.standard_normal(d_out).astype(dtype))] if bias else [])
    base = g.add(Op.LINEAR, args, name="base")
    a = g.const("A", (0 if "A" in zero else 1) * rng.standard_normal((rank, d_in)).astype(dtype))
    h = g.add(Op.LINEAR, [x, a], name="down")
    b = g.const("B", (0 if "B" in zero else 1) * rng.standard_normal((d_out, rank)).astype(dtype))
    y = g.add(Op.LINEAR, [h, b], name="up")
    if scale is not None:
        s = g.const("s", np.asarray(0.0 if "s" in zero else scale, dtype=dtype))
        y = g.add(Op.MUL, [s, y] if scale_left else [y, s], name="scale")
    out = g.add(Op.ADD, [y, base] if swap_add else [base, y], name="add")
    g.set_output("y", out)
    return verify(g)


def lora_conv(*, cin: int = 3, cout: int = 5, rank: int = 2, k: int = 3, stride=(1, 1), padding=(1, 1),
              down_stride=None, up_kernel: int = 1, up_stride=(1, 1), scale: float | None = 0.25, zero: str = "", seed: int = 0) -> Graph:
    """Untagged conv LoRA: base ``Conv2d(x, W, b)``, down ``Conv2d(x, A)``, up ``Conv2d(h, B)`` 1x1."""
    rng = np.random.default_rng(seed)
    g = Graph("lora_conv")
    x = g.input("x", ("batch", cin, 8, 8))
    conv = {"stride": stride, "padding": padding}
    w = g.const("W", rng.standard_normal((cout, cin, k, k)).astype(np.float32))
    b = g.const("b", rng.standard_normal(cout).astype(np.float32))
    base = g.add(Op.CONV2D, [x, w, b], conv, name="base")
    a = g.const("A", (0 if "A" in zero else 1) * rng.standard_normal((rank, cin, k, k)).astype(np.float32))
    h = g.add(Op.CONV2D, [x, a], {**conv, "stride": down_stride or stride}, name="down")
    bb = g.const("B", (0 if "B" in zero else 1) * rng.standard_normal((cout, rank, up_kernel, up_kernel)).astype(np.float32))
    pad = (up_kernel - 1) // 2
    y = g.add(Op.CONV2D, [h, bb], {"padding": (pad, pad), "stride": up_stride}, name="up")
    if scale is not None:
        y = g.add(Op.MUL, [y, g.const("s", np.asarray(0.0 if "s" in zero else scale, dtype=np.float32))], name="scale")
    g.set_output("y", g.add(Op.ADD, [base, y], name="add"))
    return verify(g)


def adapter(base: nn.Module, rank: int = 2, name: str = "blk.proj", seed: int = 0, alpha: float = 6) -> LoRAAdapter:
    """A LoRAAdapter with a seeded nonzero ``B``."""
    torch.manual_seed(seed)
    a = LoRAAdapter(base, rank=rank, alpha=alpha, module_name=name)
    with torch.no_grad():
        a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return a.eval()


def exported(kind: str = "linear", n_adapters: int = 1) -> Graph:
    """Tagged graph from ``export_graph``: ``n_adapters`` adapters reading one input, outputs summed."""
    g = Graph(f"exported_{kind}")
    if kind == "linear":
        x = g.input("x", ("batch", 12))
        layers = [adapter(nn.Linear(12, 10), name=f"attn.{p}_proj", seed=i) for i, p in enumerate("qkv"[:n_adapters])]
    else:
        x = g.input("x", ("batch", 3, 8, 8))
        layers = [adapter(nn.Conv2d(3, 6, 3, stride=2, padding=1), name=f"conv{i}", seed=i) for i in range(n_adapters)]
    outs = [layer.export_graph(g, x) for layer in layers]
    for i, o in enumerate(outs):
        g.set_output(f"y{i}", o)
    return verify(g)


@functools.cache
def _demo() -> Graph:
    from flora_graph.frontend import capture
    from flora_graph.models import build_demo_model, demo_inputs

    return capture(build_demo_model(), demo_inputs(2), {"image": {0: "batch"}})


def demo_graph() -> Graph:
    """The captured demo model (a fresh copy each call; captured once per session)."""
    return _demo().copy()


def inputs_for(graph: Graph, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs; named dims take ``dims[name]`` (batch 3, seq 5)."""
    rng = np.random.default_rng(seed)
    dims = {"batch": 3, "seq": 5, **(dims or {})}
    return {n.name: rng.standard_normal([d if isinstance(d, int) else dims[d] for d in n.shape]).astype(n.dtype)
            for n in graph.inputs}


def assert_same_numbers(before: Graph, after: Graph, *, seed: int = 0, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Both graphs give the same outputs on seeded random inputs (numpy reference interpreter)."""
    feeds = inputs_for(before, seed)
    want, got = run(before, feeds), run(after, feeds)
    assert list(want) == list(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=rtol, err_msg=k)


def live_ops(graph: Graph) -> list[str]:
    """``graph.ops()`` without weight expressions (nodes computed from ``Const`` nodes alone)."""
    static: set[ComputationNode] = set()
    out = []
    for n in graph.nodes:
        if n.op is Op.CONST or (n.op is not Op.INPUT and n.inputs and all(i in static for i in n.inputs)):
            static.add(n)
        elif n.op is not Op.INPUT:
            out.append(n.op.value)
    return out


def assert_structural_equal(after: Graph, expected: Graph) -> None:
    """TVM-style: same ops, attributes, shapes, dtypes, wiring and weight values; names may differ."""
    pairs: dict[int, ComputationNode] = {}

    def same(a: ComputationNode, b: ComputationNode, path: str) -> None:
        if id(a) in pairs:
            assert pairs[id(a)] is b, f"{path}: {a.name} is paired with {pairs[id(a)].name}, not {b.name}"
            return
        pairs[id(a)] = b
        assert a.op is b.op, f"{path}: {a.op.value} != {b.op.value}"
        assert (a.shape, a.dtype) == (b.shape, b.dtype), f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        if a.op is Op.CONST:
            va, vb = after.params[a.attrs["param"]], expected.params[b.attrs["param"]]
            np.testing.assert_allclose(va, vb, rtol=1e-6, atol=1e-7, err_msg=path)
            return
        if a.op is Op.INPUT:
            assert a.name == b.name, path
            return
        assert a.attrs == b.attrs, f"{path}: {a.attrs} != {b.attrs}"
        assert len(a.inputs) == len(b.inputs), f"{path}: arity"
        for k, (ia, ib) in enumerate(zip(a.inputs, b.inputs, strict=True)):
            same(ia, ib, f"{path}.{a.op.value}[{k}]")

    assert list(after.outputs) == list(expected.outputs)
    for k in after.outputs:
        same(after.outputs[k], expected.outputs[k], k)
