"""The ``torchscript`` and ``torch-export`` backends against the numpy reference and eager torch.

Every op (with its attribute variants) is compiled once per backend with a dynamic
``"batch"`` dim and fed batch sizes 1, 5, 0 and 2; for torch-export only those inside
the exported Dim range (``[dim_min, inf)``, ``dim_min`` 0 unless a guard needed 1 or 2),
and at least two of them. Saved artifacts are loaded in a fresh interpreter in which
``import flora_graph`` fails.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flora_graph.errors import FloraGraphError, RuntimeInputError
from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile
from flora_graph.runtimes.torch_backend import TorchExportExecutable

ATOL, RTOL = 1e-5, 1e-5
BATCHES = (1, 5, 0, 2)
BACKENDS = ("torchscript", "torch-export")
F32 = np.float32

Build = Callable[[Graph, dict[str, ComputationNode], np.random.Generator], Any]


@dataclass
class Case:
    """Graph inputs ``{name: (rest of shape, dtype)}`` (dim 0 is "batch") and a builder of the body."""

    id: str
    inputs: dict[str, tuple[tuple[int, ...], str]]
    build: Build


def c(id: str, shapes: dict[str, tuple[int, ...]] | tuple[int, ...], build: Build, dtype: str = "float32") -> Case:
    named = shapes if isinstance(shapes, dict) else {"x": shapes}
    return Case(id, {k: (v, dtype) for k, v in named.items()}, build)


def w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(F32)


def unary(op: Op, **attrs: Any) -> Build:
    return lambda g, x, rng: g.add(op, [x["x"]], attrs)


def conv(cin: int, cout: int, k: int, bias: bool = True, **attrs: Any) -> Build:
    def build(g: Graph, x: dict[str, ComputationNode], rng: np.random.Generator) -> ComputationNode:
        groups = attrs.get("groups", 1)
        args = [x["x"], g.const("w", w(rng, cout, cin // groups, k, k))]
        return g.add(Op.CONV2D, [*args, g.const("b", w(rng, cout))] if bias else args, attrs)

    return build


def layer_norm(axis: int, norm: tuple[int, ...], n_affine: int) -> Build:
    def build(g: Graph, x: dict[str, ComputationNode], rng: np.random.Generator) -> ComputationNode:
        affine = [g.const(f"p{i}", w(rng, *norm)) for i in range(n_affine)]
        return g.add(Op.LAYER_NORM, [x["x"], *affine], {"axis": axis, "epsilon": 1e-5})

    return build


def splits(axis: int, sizes: tuple[int, ...]) -> Build:
    return lambda g, x, rng: {
        f"y{i}": g.add(Op.SPLIT, [x["x"]], {"axis": axis, "sizes": sizes, "index": i}) for i in range(len(sizes))
    }


CASES = [
    c("linear", (3, 4), lambda g, x, rng: g.add(Op.LINEAR, [x["x"], g.const("w", w(rng, 5, 4)), g.const("b", w(rng, 5))])),
    c("linear_nobias_3d", (3, 4), lambda g, x, rng: g.add(Op.LINEAR, [x["x"], g.const("w", w(rng, 5, 4))])),
    c("matmul_const", (3, 4), lambda g, x, rng: g.add(Op.MATMUL, [x["x"], g.const("w", w(rng, 4, 6))])),
    c("matmul_batched", {"a": (2, 3, 4), "b": (2, 4, 5)}, lambda g, x, rng: g.add(Op.MATMUL, [x["a"], x["b"]])),
    c("matmul_vector", (3, 4), lambda g, x, rng: g.add(Op.MATMUL, [x["x"], g.const("v", w(rng, 4))])),
    c("conv_basic", (3, 8, 8), conv(3, 4, 3, padding=(1, 1))),
    c("conv_stride_pad", (3, 9, 7), conv(3, 4, 3, stride=(2, 1), padding=(1, 0))),
    c("conv_dilation_nobias", (2, 9, 9), conv(2, 3, 3, bias=False, dilation=(2, 2), padding=(2, 1))),
    c("conv_groups", (4, 6, 6), conv(4, 6, 3, groups=2, padding=(1, 1))),
    c("conv_depthwise", (4, 6, 6), conv(4, 4, 3, groups=4, stride=(2, 2), padding=(1, 1))),
    *[
        c(op.value.lower(), {"a": (3, 4), "b": (3, 4)}, lambda g, x, rng, op=op: g.add(op, [x["a"], g.add(op, [x["b"], g.const("k", w(rng, 4))])]))
        for op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV)
    ],
    c("div_int_trunc", {"a": (6,), "b": (6,)}, lambda g, x, rng: g.add(Op.DIV, [x["a"], x["b"]]), dtype="int32"),
    c("neg", (3, 4), unary(Op.NEG)),
    c("relu", (3, 4), unary(Op.RELU)),
    c("gelu_exact", (3, 4), unary(Op.GELU, approximate="none")),
    c("gelu_tanh", (3, 4), unary(Op.GELU, approximate="tanh")),
    c("silu", (3, 4), unary(Op.SILU)),
    c("sigmoid", (3, 4), unary(Op.SIGMOID)),
    c("tanh", (3, 4), unary(Op.TANH)),
    c("identity", (3, 4), unary(Op.IDENTITY)),
    c("softmax_last", (3, 4), unary(Op.SOFTMAX, axis=-1)),
    c("softmax_axis1", (3, 4), unary(Op.SOFTMAX, axis=1)),
    c("layernorm_last_affine", (3, 4), layer_norm(-1, (4,), 2)),
    c("layernorm_last_plain", (3, 4), layer_norm(-1, (4,), 0)),
    c("layernorm_last_scale_only", (3, 4), layer_norm(-1, (4,), 1)),
    c("layernorm_last2_affine", (3, 4), layer_norm(-2, (3, 4), 2)),
    c("layernorm_last2_plain", (3, 4), layer_norm(1, (3, 4), 0)),
    c("reshape_0_m1", (3, 4), unary(Op.RESHAPE, shape=(0, -1))),
    c("reshape_m1_static", (3, 4), unary(Op.RESHAPE, shape=(-1, 6))),
    c("reshape_0_split", (3, 4), unary(Op.RESHAPE, shape=(0, 2, 3, 2))),
    *[c(f"flatten_axis{a}", (3, 4), unary(Op.FLATTEN, axis=a)) for a in (0, 1, 2, 3, -1)],
    c("transpose", (3, 4), unary(Op.TRANSPOSE, perm=(1, 0, 2))),
    c("transpose_rot", (3, 4), unary(Op.TRANSPOSE, perm=(2, 0, 1))),
    c("concat", {"a": (3, 4), "b": (2, 4)}, lambda g, x, rng: g.add(Op.CONCAT, [x["a"], x["b"]], {"axis": 1})),
    c("concat3_last", {"a": (3, 4), "b": (3, 2)}, lambda g, x, rng: g.add(Op.CONCAT, [x["a"], x["b"], x["a"]], {"axis": -1})),
    c("split_axis1", (6, 4), splits(1, (1, 2, 3))),
    c("split_last", (3, 5), splits(-1, (2, 3))),
]


def build_graph(case: Case, rng: np.random.Generator) -> Graph:
    g = Graph(case.id)
    ins = {name: g.input(name, ["batch", *rest], dtype) for name, (rest, dtype) in case.inputs.items()}
    out = case.build(g, ins, rng)
    for name, node in (out if isinstance(out, dict) else {"y": out}).items():
        g.set_output(name, node)
    return g


def feeds_for(case: Case, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, (rest, dtype) in case.inputs.items():
        if dtype == "int32":  # nonzero, both signs, so truncating division is exercised
            out[name] = (rng.integers(1, 9, (n, *rest)) * rng.choice([-1, 1], (n, *rest))).astype(dtype)
        else:
            out[name] = rng.standard_normal((n, *rest)).astype(dtype)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_op_matches_reference(case: Case, backend: str) -> None:
    rng = np.random.default_rng(0)
    g = build_graph(case, rng)
    exe = compile(g, backend)
    batches = [n for n in BATCHES if n >= getattr(exe, "dim_min", 0)]
    assert len(batches) >= 2
    for n in batches:
        feeds = feeds_for(case, n, rng)
        want, got = run(g, feeds), exe(feeds)
        assert list(got) == list(g.outputs)
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, (name, n)
            np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=RTOL, err_msg=f"{name} at batch {n}")


# --------------------------------------------------------------------------- the demo model
@pytest.fixture(scope="module")
def demo() -> tuple[torch.nn.Module, Graph]:
    from flora_graph.frontend import capture
    from flora_graph.models import build_demo_model, demo_inputs

    model = build_demo_model()
    return model, capture(model, demo_inputs(2), {"image": {0: "batch"}})


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_model_matches_eager_torch(demo: tuple[torch.nn.Module, Graph], backend: str) -> None:
    from flora_graph.models import demo_inputs

    model, g = demo
    exe = compile(g, backend)
    assert getattr(exe, "dim_min", 0) == 0  # torch.export does not specialise batch 0 or 1 here
    for batch in (1, 5):
        image = demo_inputs(batch, seed=batch)["image"]
        with torch.no_grad():
            want = model(image).numpy()
        np.testing.assert_allclose(exe(image=image)["output"], want, atol=1e-5, rtol=1e-5)


LOADER = """
import sys
sys.modules["flora_graph"] = None  # any import of flora_graph now raises
import json, numpy as np, torch
kind, path, x_file, want_file = sys.argv[1:]
x = torch.from_numpy(np.load(x_file, allow_pickle=False))
extra = {"flora_io.json": ""}
if kind == "torchscript":
    module = torch.jit.load(path, _extra_files=extra)
else:
    module = torch.export.load(path, extra_files=extra).module()
assert json.loads(extra["flora_io.json"]) == {"inputs": ["image"], "outputs": ["output"]}, extra
with torch.inference_mode():
    (got,) = module(x)
np.testing.assert_allclose(got.numpy(), np.load(want_file, allow_pickle=False), atol=1e-5, rtol=1e-5)
assert not any(m == "flora_graph" or m.startswith("flora_graph.") for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_artifact_runs_without_flora_graph(demo: tuple[torch.nn.Module, Graph], backend: str, tmp_path: Path) -> None:
    from flora_graph.models import demo_inputs

    model, g = demo
    image = demo_inputs(3, seed=11)["image"]
    with torch.no_grad():
        want = model(image).numpy()
    np.save(tmp_path / "x.npy", image.numpy())
    np.save(tmp_path / "want.npy", want)
    path = compile(g, backend).save(tmp_path / "sub" / ("model.pt" if backend == "torchscript" else "model.pt2"))
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOADER), backend, str(path), str(tmp_path / "x.npy"), str(tmp_path / "want.npy")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# --------------------------------------------------------------------------- errors and ownership
def _two_input_graph() -> Graph:
    g = Graph("two")
    a, b = g.input("a", ["batch", 4]), g.input("b", ["batch", 4])
    g.set_output("y", g.add(Op.ADD, [a, b]))
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("feeds", "match"),
    [
        ({"a": np.zeros((2, 4), F32)}, "missing"),
        ({"a": np.zeros((2, 4), F32), "b": np.zeros((2, 4), F32), "c": 1}, "unknown"),
        ({"a": np.zeros((2, 4), F32), "b": np.zeros((2, 5), F32)}, "'b' dim 1"),
        ({"a": np.zeros((2, 4), F32), "b": np.zeros((2, 4, 1), F32)}, "rank"),
        ({"a": np.zeros((2, 4), F32), "b": np.zeros((3, 4), F32)}, "batch"),
        ({"a": np.zeros((2, 4), F32), "b": np.full((2, 4), "x")}, "dtype"),
        ({"a": np.zeros((2, 4), F32), "b": np.zeros((2, 4), bool)}, "dtype"),
    ],
    ids=["missing", "unknown", "static_dim", "rank", "named_dim", "str_dtype", "bool_dtype"],
)
def test_bad_inputs_raise_runtime_input_error(backend: str, feeds: dict[str, Any], match: str) -> None:
    exe = compile(_two_input_graph(), backend)
    with pytest.raises(RuntimeInputError, match=match):
        exe(feeds)


def test_sizes_outside_the_exported_range_are_refused() -> None:
    exe = compile(_two_input_graph(), "torch-export")
    assert isinstance(exe, TorchExportExecutable)
    assert ("a", 0, 0, None) in exe._ranges
    exe._ranges = [("a", 0, 2, 8)]  # as if export had narrowed the range
    with pytest.raises(RuntimeInputError, match=r"'a' dim 0 has size 9.*2\.\.8"):
        exe(a=np.zeros((9, 4), F32), b=np.zeros((9, 4), F32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_into_a_file_parent_fails_cleanly(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = compile(_two_input_graph(), backend)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(FloraGraphError, match="file"):
        exe.save(blocker / "model.pt2")
    with pytest.raises(FloraGraphError, match="cannot write"):
        exe.save(tmp_path)  # a directory
    # torch itself failing half-way leaves nothing behind either
    def boom(*args: Any, **kwargs: Any) -> None:
        args[1].write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.jit if backend == "torchscript" else torch.export, "save", boom)
    with pytest.raises(FloraGraphError, match="disk full"):
        exe.save(tmp_path / "model.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_owned_by_the_caller(backend: str) -> None:
    g = Graph("alias")
    x = g.input("x", ["batch", 3])
    k = g.const("k", np.arange(6, dtype=F32).reshape(2, 3))
    ident = g.add(Op.IDENTITY, [x])
    for name, node in {"ident": ident, "again": ident, "input": x, "const": k, "kt": g.add(Op.TRANSPOSE, [k], {"perm": (1, 0)}),
                       "s0": g.add(Op.SPLIT, [x], {"axis": 1, "sizes": (1, 2), "index": 0}),
                       "s1": g.add(Op.SPLIT, [x], {"axis": 1, "sizes": (1, 2), "index": 1})}.items():
        g.set_output(name, node)
    exe = compile(g, backend, num_threads=1)
    arr = np.ones((2, 3), F32)
    out = exe(x=arr)
    assert torch.get_num_threads() == 1
    values = list(out.values())
    for i, v in enumerate(values):
        assert v.flags.writeable and not np.shares_memory(v, arr)
        assert not any(np.shares_memory(v, u) for u in values[:i]), list(out)[i]
    for v in values:
        v[...] = -7
    again = exe(x=arr)
    np.testing.assert_array_equal(again["const"], np.arange(6, dtype=F32).reshape(2, 3))
    np.testing.assert_array_equal(again["ident"], arr)
    assert (arr == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_bfloat16_and_torch_inputs(backend: str) -> None:
    import ml_dtypes

    for dtype in ("float64", "bfloat16"):
        g = Graph(dtype)
        x = g.input("x", ["batch", 4], dtype)
        g.set_output("y", g.add(Op.ADD, [x, x]))
        exe = compile(g, backend)
        arr = np.linspace(-2, 2, 12).reshape(3, 4).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        got = exe(x=arr)["y"]
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got.astype(np.float64), run(g, {"x": arr})["y"].astype(np.float64))
    got = exe(x=torch.ones(2, 4, dtype=torch.bfloat16))["y"]  # a torch tensor is accepted too
    np.testing.assert_array_equal(got.astype(np.float32), np.full((2, 4), 2, F32))


def test_bad_num_threads_is_refused() -> None:
    with pytest.raises(FloraGraphError, match="num_threads"):
        compile(_two_input_graph(), "torchscript", num_threads=0)


def test_export_raises_the_dim_minimum_when_a_guard_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.export.export

    def picky(module: torch.nn.Module, args: Any, **kwargs: Any) -> Any:
        if any(d.min == 0 for spec in kwargs["dynamic_shapes"] if spec for d in spec.values()):
            raise RuntimeError("Constraints violated (batch)!")
        return real(module, args, **kwargs)

    monkeypatch.setattr(torch.export, "export", picky)
    g = _two_input_graph()
    exe = compile(g, "torch-export")
    assert exe.dim_min == 1 and ("a", 0, 1, None) in exe._ranges
    feeds = {"a": np.ones((1, 4), F32), "b": np.ones((1, 4), F32)}
    np.testing.assert_array_equal(exe(feeds)["y"], run(g, feeds)["y"])
    with pytest.raises(RuntimeInputError, match="size 0"):
        exe(a=np.ones((0, 4), F32), b=np.ones((0, 4), F32))

    monkeypatch.setattr(torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no way")))
    with pytest.raises(FloraGraphError, match=r"torch.export failed on graph 'two': no way"):
        compile(g, "torch-export")


def test_export_dims_shared_across_inputs_and_products() -> None:
    g = Graph("dims")
    x, y = g.input("x", ["batch", "seq", 3]), g.input("y", ["2*batch", 3])
    z, u = g.input("z", ["batch*seq", 3]), g.input("u", ["a.b", "a_b"])
    g.set_output("a", g.add(Op.RELU, [y]))
    g.set_output("b", g.add(Op.ADD, [g.add(Op.RESHAPE, [x], {"shape": (-1, 3)}), z]))
    g.set_output("c", g.add(Op.NEG, [u]))
    exe = compile(g, "torch-export")
    rng = np.random.default_rng(3)
    for b, s in ((1, 1), (3, 4), (0, 2)):
        feeds = {
            "x": w(rng, b, s, 3), "y": w(rng, 2 * b, 3), "z": w(rng, b * s, 3), "u": w(rng, s + 1, b + 2),
        }
        want, got = run(g, feeds), exe(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=RTOL)
