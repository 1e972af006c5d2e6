"""Ops without a converter are decomposed with torch.export's default table, and nothing else is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend import capture
from flora_graph.frontend.capture import decompose_unconverted
from flora_graph.ir import Op
from flora_graph.runtimes import compile


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.lin(x))
        return (torch.logsumexp(y, -1, keepdim=True) + F.softplus(y) + F.glu(torch.cat([y, y], -1)) + F.mish(y)
                + torch.frac(y) + torch.floor_divide(y, 0.7) + F.scaled_dot_product_attention(y, y, y))


def test_unconverted_ops_are_decomposed_and_the_rest_stays_whole() -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    graph = capture(model, torch.randn(2, 3, 8), {"x": {0: "batch", 1: "seq"}})
    ops = {n.op for n in graph.nodes}
    assert {Op.LINEAR, Op("LayerNorm"), Op("ScaledDotProductAttention")} <= ops  # not decomposed
    for backend in ("numpy", "onnxruntime", "torchscript"):
        x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(compile(graph, backend)(x=x.numpy())["output"], want, atol=1e-5, rtol=1e-5)


def test_a_program_whose_ops_all_convert_is_returned_as_it_is() -> None:
    ep = torch.export.export(nn.Linear(4, 4), (torch.randn(2, 4),))
    assert decompose_unconverted(ep) is ep


def test_an_op_without_a_decomposition_is_still_named() -> None:
    class Cumprod(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumprod(x, 1)

    with pytest.raises(UnsupportedOpError, match=r"aten\.cumprod\.default"):
        capture(Cumprod(), torch.randn(2, 3))


class WrittenInPlace(nn.Module):
    """An in-place write capture functionalizes (a slice of an intermediate) beside an op it decomposes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y[:, 0] = F.mish(x[:, 0])
        return y


def test_functionalizing_and_decomposing_retrace_the_program_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real = torch.export.ExportedProgram.run_decompositions

    def counted(self: torch.export.ExportedProgram, table: dict | None = None, **kw: object) -> object:
        calls.append(sorted(str(op) for op in (table or {})))
        return real(self, table, **kw)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counted)
    graph = capture(WrittenInPlace(), torch.randn(2, 3, 8), {"x": {0: "batch", 1: "seq"}})
    assert calls == [["aten.mish.default"]]  # one retrace: functionalized and decomposed together
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(compile(graph, "onnxruntime")(x=x.numpy())["output"], WrittenInPlace()(x).numpy(),
                               rtol=1e-5, atol=1e-6)
