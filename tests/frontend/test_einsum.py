"""``einsum`` converts to the IR's own ops (Transpose, Reshape, MatMul, ReduceSum) without a decomposition: each
equation of the models that use one, checked against ``torch.einsum`` on the numpy reference and ONNX Runtime at
sizes other than the example's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend import capture
from flora_graph.frontend.aten.einsum import parse_equation
from flora_graph.runtimes.executable import compile
from flora_graph.runtimes.reference import run

TARGETS = {torch.ops.aten.einsum.default, torch.ops.aten._trilinear.default, torch.ops.aten.bilinear.default}
"""The ATen op these tests exercise (test_capture.py checks every converter is)."""

# equation, operand shapes ("b": the batch, "s": the sequence; both dynamic)
CASES = [
    ("bhqd,bhkd->bhqk", [("b", 4, "s", 8), ("b", 4, "s", 8)]),  # attention scores
    ("...qhd,...khd->...hqk", [("b", "s", 4, 8), ("b", "s", 4, 8)]),  # LongT5
    ("bhwc,hkc->bhwk", [("b", 5, 6, 8), (5, 3, 8)]),  # SAM's relative positions
    ("ibh,hnd->ibnd", [("s", "b", 8), (8, 2, 3)]),  # XLNet: two output letters from the right operand
    ("bsj,j->bs", [("b", "s", 8), (8,)]),  # no right letter
    ("blh,bl->bh", [("b", "s", 8), ("b", "s")]),  # no ... contracted over the sequence
    ("ijbn->bnij", [(3, 4, "b", "s")]),  # one operand: a transpose
    ("bclhn,bcshn->bclsh", [("b", 2, "s", 4, 3), ("b", 2, "s", 4, 3)]),  # Mamba-2's chunked scan
    ("bhld,lrd->bhlr", [("b", 4, "s", 8), ("s", 7, 8)]),
    ("ij,jk", [("s", 8), (8, 5)]),  # implicit output
    ("ab,b->", [("s", 8), (8,)]),  # everything contracted: a scalar
    ("bij,bjk->bik", [(1, "s", 8), ("b", 8, 5)]),  # a batch axis of 1 broadcast
    ("b h c d, c r d -> b h c r", [("b", 4, 6, 8), (6, 3, 8)]),  # spaces
    ("bij,bkl->bik", [("b", 3, 4), ("b", 5, 6)]),  # a letter of one operand alone: summed first
]


def _inputs(shapes: list[tuple], batch: int, seq: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*[{"b": batch, "s": seq}.get(d, d) for d in shape], generator=gen) for shape in shapes)


class _Einsum(nn.Module):
    def __init__(self, equation: str) -> None:
        super().__init__()
        self.equation = equation

    def forward(self, x0: torch.Tensor, x1: torch.Tensor | None = None) -> torch.Tensor:
        return torch.einsum(self.equation, x0) if x1 is None else torch.einsum(self.equation, x0, x1)


@pytest.mark.parametrize(("equation", "shapes"), CASES, ids=[c[0] for c in CASES])
def test_einsum_matches_torch(equation: str, shapes: list[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_retrace(*args: object, **kwargs: object) -> None:
        raise AssertionError("einsum was decomposed (the program retraced)")

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", no_retrace)
    names = [f"x{i}" for i in range(len(shapes))]
    dims = {n: {i: {"b": "batch", "s": "seq"}[d] for i, d in enumerate(s) if isinstance(d, str)}
            for n, s in zip(names, shapes, strict=True)}
    graph = capture(_Einsum(equation), _inputs(shapes, 2, 5, 0), dims)
    ort = compile(graph, "onnxruntime")
    for batch, seq in ((3, 7), (1, 2)):
        xs = _inputs(shapes, batch, seq, batch)
        want = torch.einsum(equation, *xs).numpy()
        feeds = {n: x.numpy() for n, x in zip(names, xs, strict=True)}
        np.testing.assert_allclose(run(graph, feeds)["output"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ort(**feeds)["output"], want, rtol=1e-5, atol=1e-5)


def test_an_ellipsis_is_spelled_from_the_right() -> None:
    assert parse_equation("...ij,...jk", [4, 2]) == (["01ij", "jk"], "01ik")
    assert parse_equation("b...,b->...b", [3, 1]) == (["b01", "b"], "01b")


@pytest.mark.parametrize(("equation", "ranks", "what"), [
    ("ij,jk->ik", [2], "2 operand"), ("ijk->i", [2], "does not name"), ("ij->ii", [2], "repeats"),
    ("ij->z", [2], "names one"),
])
def test_bad_equations_are_named(equation: str, ranks: list[int], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        parse_equation(equation, ranks)


@pytest.mark.parametrize(("equation", "shapes", "what"), [
    ("ii->i", [(4, 4)], "diagonal"),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], "3 operands"),
])
def test_unsupported_einsums_are_refused_by_name(equation: str, shapes: list[tuple], what: str) -> None:
    class Many(nn.Module):
        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return torch.einsum(equation, *xs)

    with pytest.raises(UnsupportedOpError, match=what):
        capture(Many(), _inputs(shapes, 2, 5, 0))


class _Bilinear(nn.Module):
    """``nn.Bilinear`` (``x1 W x2 + b``), and ``_trilinear`` of another expansion (a sum over the middle axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(5, 4, 3)
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        other = torch.ops.aten._trilinear(x0, self.w, x1, [2], [0], [1], [1])  # [b, 5, 1] [1, 5, 4] [b, 1, 4] -> [b, 4]
        return self.bilinear(x0, x1) + other.sum(-1, keepdim=True)


def test_bilinear_as_two_einsums_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_retrace(*args: object, **kwargs: object) -> None:
        raise AssertionError("bilinear or _trilinear was decomposed (the program retraced)")

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", no_retrace)
    model = _Bilinear().eval()
    graph = capture(model, (torch.randn(2, 5), torch.randn(2, 4)), {"x0": {0: "batch"}, "x1": {0: "batch"}})
    ort = compile(graph, "onnxruntime")
    for batch in (3, 1):
        gen = torch.Generator().manual_seed(batch)
        x0, x1 = torch.randn(batch, 5, generator=gen), torch.randn(batch, 4, generator=gen)
        with torch.no_grad():
            want = model(x0, x1).numpy()
        np.testing.assert_allclose(run(graph, {"x0": x0.numpy(), "x1": x1.numpy()})["output"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ort(x0=x0.numpy(), x1=x1.numpy())["output"], want, rtol=1e-5, atol=1e-5)
