"""The table-driven op tests: a :class:`Case` per row, two checks per case.

Each family module of :mod:`flora_graph.ops` has one test module here (``test_<family>.py``)
holding its ``CASES`` table. A case builds one small graph whose inputs declare ``"batch"``
and ``"seq"`` (and sometimes ``"kv"``) dims and runs it at the two :data:`SIZES`:

* :func:`check_reference`: the numpy reference (:func:`flora_graph.runtimes.run`) against the
  case's independent torch expression ``ref``;
* :func:`check_backend`: each of :data:`BACKENDS` against the numpy reference (torch.export at
  the sizes inside its exported Dim range).

Adding an op adds one row to its family's table; ``test_coverage.py`` checks that every op has one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from flora_graph.errors import UnsupportedOpError
from flora_graph.ir import ComputationNode, Graph, Op, verify
from flora_graph.ops import FAMILIES
from flora_graph.ops.evaluate import eval_dim
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile

__all__ = [
    "BACKENDS",
    "END",
    "SIZES",
    "TESTED_FAMILIES",
    "Case",
    "In",
    "all_cases",
    "assert_close",
    "aten_overload",
    "build",
    "case_id",
    "check_backend",
    "check_capture",
    "check_reference",
    "const",
    "f64",
    "family_tables",
    "family_tests",
    "feeds",
    "find",
    "op",
    "values",
]

SIZES = ({"batch": 2, "seq": 3, "kv": 4}, {"batch": 4, "seq": 7, "kv": 2})
BACKENDS = ("onnxruntime", "torchscript", "torch-export")
END = 2**63 - 1  # torch's "to the end"
TESTED_FAMILIES = tuple(f for f in FAMILIES if f != "adapters")  # adapter slots: tests/ops/test_adapters_family.py

Build = Callable[[Graph, dict[str, ComputationNode], np.random.Generator], Any]


@dataclass
class In:
    """A graph input: declared shape (names allowed), dtype and the kind of values fed."""

    shape: tuple[Any, ...]
    dtype: str = "float32"
    kind: str = "normal"  # normal | positive | small_int | nonzero_int | bool | index:<n>


@dataclass
class Case:
    id: str
    inputs: dict[str, In]
    build: Build  # (graph, inputs by name, rng) -> the output node, or a dict of output nodes by name
    ref: Callable[..., torch.Tensor]  # torch on the inputs (in order) -> the expected output (a tuple for several)
    tol: float = 1e-5
    dim_max: dict[str, int] = field(default_factory=dict)  # bounds the graph declares (graph.dim_max)
    dim_min: dict[str, int] = field(default_factory=dict)  # and graph.dim_min
    unsupported: tuple[str, ...] = ()  # backends that must refuse the graph (UnsupportedOpError): known limits
    capture: tuple[str, ...] = ()  # ATen overloads ("sign.default") whose converters capturing `ref` must run: check_capture


def values(spec: In, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    shape = [eval_dim(d, sizes) for d in spec.shape]  # names and expressions of them ("kv+seq")
    if spec.kind == "positive":
        return rng.uniform(0.2, 3.0, shape).astype(spec.dtype)
    if spec.kind == "small_int":
        return rng.integers(-3, 4, shape).astype(spec.dtype)
    if spec.kind == "nonzero_int":  # divisors: +-1 .. +-3
        return (rng.integers(1, 4, shape) * rng.choice([-1, 1], shape)).astype(spec.dtype)
    if spec.kind == "bool":
        return rng.random(shape) < 0.6
    if spec.kind.startswith("index:"):  # index:<n> or index:<dim name>: values in [-n, n)
        n = spec.kind.split(":")[1]
        n = sizes[n] if n in sizes else int(n)
        return rng.integers(-n, n, shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


def const(rng: np.random.Generator | int, *shape: int) -> np.ndarray:
    """Standard-normal float32 weights (``rng`` may be a seed)."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    return rng.standard_normal(shape).astype(np.float32)


def op(o: Op, *args: str | np.ndarray, **attrs: Any) -> Build:
    """``o`` over ``args``: a string names an input, an array is a Const (``p<k>``)."""
    return lambda g, x, rng: g.add(
        o, [x[a] if isinstance(a, str) else g.const(f"p{k}", a) for k, a in enumerate(args)], attrs
    )


def f64(a: np.ndarray) -> torch.Tensor:
    """A constant as a float64 tensor, for references computed in float64."""
    return torch.from_numpy(a).double()


def build(case: Case) -> Graph:
    g = Graph(case.id)
    g.dim_max = dict(case.dim_max)
    g.dim_min = dict(case.dim_min)
    ins = {name: g.input(name, spec.shape, spec.dtype) for name, spec in case.inputs.items()}
    out = case.build(g, ins, np.random.default_rng(0))
    for name, node in (out if isinstance(out, dict) else {"out": out}).items():
        g.set_output(name, node)
    return verify(g)


def feeds(case: Case, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: values(spec, sizes, rng) for name, spec in case.inputs.items()}


def assert_close(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    if got.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), atol=tol, rtol=tol, err_msg=what)


def case_id(case: Case) -> str:
    return case.id


# --------------------------------------------------------------------------- the two checks
def check_reference(case: Case) -> None:
    """The numpy reference against the case's torch expression, at every size."""
    g = build(case)
    for k, sizes in enumerate(SIZES):
        x = feeds(case, sizes, k)
        got = run(g, x)
        want = case.ref(*[torch.from_numpy(np.array(v)) for v in x.values()])
        want = want if isinstance(want, tuple) else (want,)
        for (name, value), w in zip(got.items(), want, strict=True):
            assert_close(value, w.numpy(), case.tol, f"{case.id} {name} at {sizes}")


def check_backend(case: Case, backend: str) -> None:
    """``backend`` against the numpy reference, at every size inside the backend's dim range
    (or, for a backend in ``case.unsupported``, its refusal with :class:`UnsupportedOpError`)."""
    g = build(case)
    if backend in case.unsupported:
        with pytest.raises(UnsupportedOpError):
            compile(g, backend)
        return
    exe = compile(g, backend)
    low = getattr(exe, "dim_min", 0)
    sizes_run = [s for s in SIZES if min(s.values()) >= low]
    assert sizes_run
    for k, sizes in enumerate(sizes_run):
        x = feeds(case, sizes, k)
        want, got = run(g, x), exe(x)
        assert list(got) == list(want)
        for name in want:
            assert_close(got[name], want[name], case.tol, f"{case.id} {name} on {backend} at {sizes}")


def aten_overload(name: str) -> Any:
    """``"sign.default"`` -> ``torch.ops.aten.sign.default``; ``"flora_graph::linear_scan.default"`` -> that
    namespace's op (a custom op capture records as one node)."""
    namespace, _, name = name.rpartition("::")
    op_name, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace or "aten"), op_name), overload)


def check_capture(case: Case) -> set[Op]:
    """Capture the case's torch expression ``ref`` as a module, check that the converters of
    ``case.capture`` ran and that the graph matches ``ref`` at every size; return the IR ops it
    holds, which must include the ops the case's own graph tests."""
    from flora_graph.frontend import ATEN_TABLE, capture

    targets = [aten_overload(t) for t in case.capture]
    hits: set[Any] = set()
    saved = {t: ATEN_TABLE[t] for t in targets}

    def recording(target: Any, conv: Any) -> Any:
        def conv_and_record(*args: Any, **kwargs: Any) -> Any:
            hits.add(target)
            return conv(*args, **kwargs)

        return conv_and_record

    names = list(case.inputs)
    namespace: dict[str, Any] = {"ref": case.ref}
    exec(f"def forward(self, {', '.join(names)}):\n    return ref({', '.join(names)})\n", namespace)
    module = type(f"Capture_{case.id}", (torch.nn.Module,), {"forward": namespace["forward"]})()
    example = feeds(case, {"batch": 3, "seq": 5, "kv": 6}, 7)
    dims = {n: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for n, spec in case.inputs.items()}
    try:
        ATEN_TABLE.update({t: recording(t, conv) for t, conv in saved.items()})
        g = capture(module, {k: torch.from_numpy(v) for k, v in example.items()}, dims, dim_min=case.dim_min or None)
    finally:
        ATEN_TABLE.update(saved)
    assert hits == set(targets), f"captured {case.id}: converters of {sorted(map(str, set(targets) - hits))} did not run"
    for k, sizes in enumerate(SIZES):
        x = feeds(case, sizes, k)
        want = case.ref(*[torch.from_numpy(np.array(v)) for v in x.values()])
        want = want if isinstance(want, tuple) else (want,)
        for (name, value), w in zip(run(g, x).items(), want, strict=True):
            assert_close(value, w.numpy(), case.tol, f"captured {case.id} {name} at {sizes}")
    held = {n.op for n in g.nodes}
    tested = {n.op for n in build(case).nodes} - {Op.INPUT, Op.CONST}
    assert tested <= held, f"captured {case.id}: {sorted(o.value for o in tested - held)} missing"
    return held


def family_tests(cases: list[Case]) -> tuple[Callable[..., None], Callable[..., None]]:
    """The two parametrized tests of a family module over its ``cases``: numpy against torch, and
    every backend against numpy (``test_reference_matches_torch, test_backend_matches_reference =
    family_tests(CASES)``)."""

    @pytest.mark.parametrize("case", cases, ids=case_id)
    def test_reference_matches_torch(case: Case) -> None:
        check_reference(case)

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("case", cases, ids=case_id)
    def test_backend_matches_reference(case: Case, backend: str) -> None:
        check_backend(case, backend)

    return test_reference_matches_torch, test_backend_matches_reference


# --------------------------------------------------------------------------- the tables
def family_tables() -> dict[str, list[Case]]:
    """Each tested family's ``CASES`` (from ``tests/ops/test_<family>.py``), by family."""
    return {f: importlib.import_module(f"tests.ops.test_{f}").CASES for f in TESTED_FAMILIES}


def all_cases() -> list[Case]:
    return [c for cases in family_tables().values() for c in cases]


def find(case_id: str) -> Case:
    """The case named ``case_id``, from whichever family table holds it."""
    (case,) = [c for c in all_cases() if c.id == case_id]
    return case
