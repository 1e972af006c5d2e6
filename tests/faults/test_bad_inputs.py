"""Bad inputs: every backend, the serving sessions and adapter weights refuse what is not a dense
array of numbers with a typed error naming the input; huge results on the numpy backend are
refused naming the node; TorchScript runs a 20,000-node chain (forked parts) instead of crashing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from flora_graph.errors import FloraGraphError, GraphError, RuntimeInputError
from flora_graph.ir import Graph, Op, verify
from flora_graph.ops import OPS
from flora_graph.runtimes import compile, run
from flora_graph.runtimes.torch_backend import TorchScriptExecutable
from flora_graph.runtimes.torch_lowering import to_torch_module
from flora_graph.serving import AdapterFileError, AdapterSession, MixedAdapterSession, ServingError, write_adapter
from tests.serving.conftest import images, served  # the demo model, its exports and adapters (session-scoped)

__all__ = ["images", "served"]  # fixtures, used by name


def _relu_graph() -> Graph:
    g = Graph("g")
    x = g.input("x", ("batch", 3))
    g.set_output("y", g.add(Op.RELU, [x]))
    return verify(g)


def _bad_values() -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR / nested tensors are "beta"
        return {
            "sparse": torch.eye(3)[:2].to_sparse(),
            "sparse-csr": torch.eye(3)[:2].to_sparse_csr(),
            "meta": torch.empty(2, 3, device="meta"),
            "nested": torch.nested.nested_tensor([torch.ones(3), torch.ones(3)]),
            "quantized": torch.quantize_per_tensor(torch.ones(2, 3), 0.1, 0, torch.qint8),
            "complex-tensor": torch.ones(2, 3, dtype=torch.complex64),
            "float8-tensor": torch.ones(2, 3).to(torch.float8_e4m3fn),
            "strings": np.full((2, 3), "a"),
            "bytes": np.full((2, 3), b"a"),
            "objects": np.ones((2, 3), object),
            "complex": np.ones((2, 3), np.complex64),
            "records": np.zeros((2, 3), [("a", "f4")]),
            "dates": np.zeros((2, 3), "datetime64[s]"),
            "ragged": [[1.0, 2.0, 3.0], [1.0]],
            "none": None,
            "dict": {"a": 1},
            "raising": _Raises(),
        }


class _Raises:
    def __array__(self, *args, **kwargs):
        raise KeyError("no array here")


BAD = _bad_values()


@pytest.fixture(scope="module", params=["numpy", "onnxruntime", "torchscript"])
def exe(request):
    return compile(_relu_graph(), request.param)


@pytest.mark.parametrize("kind", list(BAD))
def test_every_backend_refuses_bad_inputs_naming_them(exe, kind):
    with pytest.raises(RuntimeInputError, match=r"input 'x'"):
        exe(x=BAD[kind])
    np.testing.assert_array_equal(exe(x=np.array([[-1.0, 0.0, 2.0]], np.float32))["y"], [[0.0, 0.0, 2.0]])


def test_inputs_that_are_not_a_mapping_are_refused(exe, served):
    for inputs in ([np.ones((1, 3), np.float32)], np.ones((1, 3), np.float32), "x"):
        with pytest.raises(RuntimeInputError, match=r"inputs must be a mapping.*takes \['x'\]"):
            exe(inputs)
    with pytest.raises(RuntimeInputError, match=r"unknown input\(s\) \['z', 3\]"):
        exe({"x": np.ones((1, 3), np.float32), 3: 1, "z": 2})
    with pytest.raises(ServingError, match=r"inputs must be a mapping.*\['image'\]"):
        AdapterSession(served.swappable).run([np.ones((1, 3, 16, 16), np.float32)])


def test_good_torch_inputs_still_convert(exe):
    for value in (torch.ones(2, 3, requires_grad=True), torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 2).T,
                  torch.ones(2, 3, dtype=torch.float64), torch.arange(6).reshape(2, 3), torch._neg_view(torch.ones(2, 3))):
        got = exe(x=value)["y"]
        assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_array_equal(exe(x=torch._neg_view(torch.ones(1, 3)))["y"], [[0.0, 0.0, 0.0]])


@pytest.mark.parametrize("kind", list(BAD))
def test_sessions_refuse_bad_inputs_naming_them(served, images, kind):
    session = AdapterSession(served.swappable, intra_op_threads=1)
    session.load_adapter("a", served.params["a"])
    mixed = MixedAdapterSession(served.mixed, {"a": served.params["a"]}, intra_op_threads=1)
    with pytest.raises(ServingError, match=r"input 'image'"):
        session.run({"image": BAD[kind]}, "a")
    with pytest.raises(ServingError, match=r"input 'image'"):
        mixed.run({"image": BAD[kind]}, ["a", "a"])
    np.testing.assert_allclose(session.run({"image": images}, "a")["output"], served.reference("a", images), atol=2e-5)


@pytest.mark.parametrize("kind", ["sparse", "meta", "nested", "strings", "objects", "complex", "raising"])
def test_adapter_weights_refuse_bad_arrays_naming_the_parameter(served, tmp_path, kind):
    params = dict(served.params["a"])
    name = next(iter(params))
    params[name] = BAD[kind]
    with pytest.raises(AdapterFileError, match=rf"adapter 'w': parameter '{name}'"):
        AdapterSession(served.swappable).load_adapter("w", params)
    with pytest.raises(AdapterFileError, match=rf"adapter 'w': parameter '{name}'"):
        write_adapter(tmp_path / "w.onnx_adapter", params)
    with pytest.raises(AdapterFileError, match=rf"adapter 'w': parameter '{name}'"):
        write_adapter(tmp_path / "w.onnx_adapter", params, model=served.swappable)
    assert not (tmp_path / "w.onnx_adapter").exists()


# --------------------------------------------------------------------------- huge results (numpy backend)
def test_a_huge_constant_arange_or_expand_is_refused_naming_the_node():
    g = Graph("ar")
    g.set_output("y", g.add(Op.ARANGE, [], {"end": 10**13}, name="big_arange"))
    with pytest.raises(GraphError, match=r"node 'big_arange' \(Arange\) would produce shape \[10000000000000\] int64"):
        run(verify(g), {})
    g = Graph("ex")
    x = g.input("x", (1, 1))
    g.set_output("y", g.add(Op.RELU, [g.add(Op.EXPAND, [x], {"shape": (10**7, 10**7)}, name="wide")]))
    with pytest.raises(GraphError, match=r"node 'wide' \(Expand\) would produce shape \[10000000, 10000000\]"):
        run(verify(g), {"x": np.ones((1, 1), np.float32)})


def test_a_huge_result_from_input_dims_is_a_runtime_input_error():
    """An empty input binds a huge dim for free; the Arange over it would need terabytes."""
    g = Graph("bound")
    x = g.input("x", ("rows", "n"))
    r = g.add(Op.ARANGE, [], {"end": "n", "dtype": "float32"}, name="positions")
    g.set_output("y", g.add(Op.ADD, [x, r]))
    g.set_output("r", r)
    with pytest.raises(RuntimeInputError, match=r"node 'positions' \(Arange\) would produce shape \[1000000000000\].*'n': 1000000000000"):
        run(verify(g), {"x": np.zeros((0, 10**12), np.float32)})
    assert run(g, {"x": np.zeros((0, 4), np.float32)})["r"].tolist() == [0, 1, 2, 3]


def test_a_memory_error_inside_an_op_names_the_node(monkeypatch):
    def boom(*args, **kwargs):
        raise MemoryError("Unable to allocate 8 TiB")

    monkeypatch.setitem(OPS, Op.RELU, dataclasses.replace(OPS[Op.RELU], numpy=boom))
    g = Graph("oom")
    x = g.input("x", (2,))
    g.set_output("y", g.add(Op.RELU, [x], name="the_relu"))
    with pytest.raises(GraphError, match=r"node 'the_relu' \(Relu\): out of memory.*Unable to allocate 8 TiB"):
        run(verify(g), {"x": np.ones(2, np.float32)})


# --------------------------------------------------------------------------- long graphs (TorchScript)
def _branchy(n: int) -> Graph:
    """A chain with skip connections, a named dim read by Arange, an input and a weight as outputs."""
    g = Graph("branchy")
    x = g.input("x", ("batch", "seq"))
    w = g.const("w", np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4))
    v, skips = x, [x]
    for i in range(n):
        v = g.add(Op.TANH if i % 3 else Op.NEG, [v])
        if i % 5 == 4:
            v = g.add(Op.ADD, [v, skips[-2 if len(skips) > 1 else -1]])
            skips.append(v)
    pos = g.add(Op.ARANGE, [], {"end": "seq", "dtype": "float32"})
    g.set_output("y", g.add(Op.ADD, [v, pos]))
    g.set_output("mid", skips[len(skips) // 2])
    g.set_output("x_again", x)
    g.set_output("w", w)
    g.add(Op.RELU, [v], name="dead")  # not read: dropped
    return verify(g)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* (script, and fork/wait run eagerly)
@pytest.mark.parametrize("max_lines", [1, 3, 7, 1000])
def test_forward_cut_into_forked_parts_computes_the_same(max_lines):
    g = _branchy(40)
    module = to_torch_module(g, max_lines=max_lines)
    parts = [k for k in vars(type(module)) if k.startswith("_flora_part_")]
    assert (len(parts) > 1) == (max_lines < 40)
    scripted = torch.jit.script(module)
    xs = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    want = run(g, {"x": xs})
    for m in (module, scripted):
        with torch.inference_mode():
            got = m(torch.from_numpy(xs))
        for (key, w), t in zip(want.items(), got, strict=True):
            np.testing.assert_allclose(t.numpy(), w, atol=1e-6, err_msg=key)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_torchscript_backend_saves_and_loads_a_cut_forward(monkeypatch, tmp_path):
    monkeypatch.setattr(TorchScriptExecutable, "max_lines", 5)
    g = _branchy(30)
    exe = compile(g, "torchscript")
    assert "_flora_part_" in type(exe.module).source
    xs = np.ones((3, 4), np.float32)
    want = run(g, {"x": xs})
    for key, w in want.items():
        np.testing.assert_allclose(exe(x=xs)[key], w, atol=1e-6)
    loaded = torch.jit.load(str(exe.save(tmp_path / "m.pt")))
    np.testing.assert_allclose(loaded(torch.from_numpy(xs))[0].numpy(), want["y"], atol=1e-6)
    optimized = compile(g, "torchscript", optimize=True)
    np.testing.assert_allclose(optimized(x=xs)["y"], want["y"], atol=1e-6)


CHAIN = textwrap.dedent("""
    import numpy as np
    from flora_graph.ir import Graph, Op, verify
    from flora_graph.runtimes import compile
    g = Graph("chain")
    v = g.input("x", ("batch", 3))
    for i in range({n}):
        v = g.add(Op.RELU if i % 2 else Op.NEG, [v])
    g.set_output("y", v)
    exe = compile(verify(g), "torchscript")
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    for _ in range(3):  # the profiling executor optimizes on a later call
        y = exe(x=x)["y"]
    print(np.abs(y - compile(g, "numpy")(x=x)["y"]).max(), y.shape)
""")


@pytest.mark.slow
def test_a_20000_node_chain_runs_on_torchscript():
    """Was SIGSEGV (TorchScript's interpreter recursing once per node of the chain) on the first call."""
    proc = subprocess.run([sys.executable, "-c", CHAIN.format(n=20_000)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0.0 (1, 3)"


def test_bad_inputs_are_flora_graph_errors():
    assert issubclass(RuntimeInputError, FloraGraphError) and issubclass(ServingError, FloraGraphError)
