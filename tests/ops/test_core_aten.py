"""The whole Core ATen opset: every overload torch tags ``core`` converts, or is refused on purpose.

The opset is listed from torch itself at test time (``torch.Tag.core``), so a torch upgrade that
adds a core op fails here until the op has a converter in ``ATEN_TABLE``, is a size read capture
makes a dim (``SIZE_OPS``), or joins an entry of the one refusal list
(:data:`flora_graph.frontend.aten.refused.REFUSED`, at most ten entries, documented in
``docs/ARCHITECTURE.md``). A refused op raises ``UnsupportedOpError`` naming it and the module path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend import ATEN_TABLE, capture
from flora_graph.frontend.aten.refused import REFUSED, REFUSED_OPS, refusal_of
from flora_graph.frontend.aten.registry import SIZE_OPS
from flora_graph.frontend.capture import convert_fx_graph

aten = torch.ops.aten
ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


def core_aten_overloads() -> set[Any]:
    """Every overload of ``torch.ops.aten`` tagged ``torch.Tag.core`` (PyTorch's Core ATen opset).

    Read from the dispatcher's list of every registered op: ``dir(torch.ops.aten)`` holds only the
    packets this process has touched so far, which depends on the tests run before."""
    found = set()
    for full in torch._C._dispatch_get_all_op_names():
        if not full.startswith("aten::"):
            continue
        name, _, overload = full.removeprefix("aten::").partition(".")
        packet = getattr(aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        op = getattr(packet, overload or "default", None)
        if op is not None and torch.Tag.core in op.tags:
            found.add(op)
    return found


CORE = core_aten_overloads()


def test_every_core_aten_op_is_converted_or_refused() -> None:
    assert len(CORE) > 150  # torch 2.x lists about 190
    converted = {op for op in CORE if op in ATEN_TABLE or op in SIZE_OPS}
    refused = {op for op in CORE if op in REFUSED_OPS}
    missing = sorted(str(op) for op in CORE - converted - refused)
    assert not missing, f"Core ATen ops with neither a converter nor an entry in the refusal list: {missing}"
    assert not set(REFUSED_OPS) & set(ATEN_TABLE), "a refused op must have no converter"
    assert not SIZE_OPS & set(ATEN_TABLE), "size reads are made dims by capture, not converted"
    assert len(refused) < len(converted) / 10, "prefer converting over refusing"


def test_the_refusal_list_is_short_named_and_explained() -> None:
    assert 0 < len(REFUSED) <= 10
    assert len({r.name for r in REFUSED}) == len(REFUSED)
    for r in REFUSED:
        assert r.reason.strip() and r.overloads, r.name
        assert all(isinstance(op, torch._ops.OpOverload) for op in r.overloads), r.name
        assert all(refusal_of(op) is r for op in r.overloads), f"{r.name}: an overload listed in two entries"
        assert set(r.overloads) & CORE, f"{r.name}: an entry with no Core ATen op"
    assert refusal_of(aten.add.Tensor) is None


def test_the_refusal_list_is_documented() -> None:
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Core ATen coverage"):]
    section = section[: section.find("\n## ", 1)]
    for r in REFUSED:
        assert f"| {r.name} |" in section, f"entry {r.name!r} missing from the Core ATen coverage section"
        for op in sorted(set(r.overloads) & CORE, key=str):
            assert f"`{str(op).removeprefix('aten.')}`" in section, f"{op} missing from the {r.name!r} row"


class _Head(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(x)


class _Model(nn.Module):
    """A linear layer, then the refused op inside the submodule ``head``."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = _Head(fn)

    def forward(self, x: torch.Tensor) -> Any:
        return self.head(self.body(x))


@pytest.mark.parametrize(("entry", "op", "fn"), [
    ("data-dependent shape", "aten.nonzero.default", lambda x: torch.nonzero(x > 0)),
    ("tensor as a Python number", "aten.item.default", lambda x: x * x.sum().item()),
    ("random", "aten.randn.default", lambda x: x + torch.randn(x.shape)),
], ids=["nonzero", "item", "randn"])
def test_capturing_a_refused_op_names_the_op_and_the_module(entry: str, op: str, fn: Callable[..., Any]) -> None:
    with pytest.raises(UnsupportedOpError) as info:
        capture(_Model(fn), torch.randn(3, 8), {"x": {0: "batch"}})
    assert refusal_of(getattr(getattr(aten, op.split(".")[1]), op.split(".")[2])).name == entry
    assert op in str(info.value) and "module 'head'" in str(info.value)
    assert info.value.ops[op] and all("module 'head'" in w for w in info.value.ops[op])


def test_a_backward_op_is_refused_by_name() -> None:
    """Backward ops never come out of capture (an inference export); a joint graph handed to
    ``convert_fx_graph`` is refused naming the op."""
    gm = make_fx(lambda g, i: aten.embedding_dense_backward(g, i, 10, -1, False), tracing_mode="fake")(
        torch.randn(4, 3), torch.tensor([1, 2, 2, 7]))
    with pytest.raises(UnsupportedOpError, match=r"aten\.embedding_dense_backward\.default") as info:
        convert_fx_graph(gm.graph, {})
    assert refusal_of(aten.embedding_dense_backward.default).name == "backward"
    assert list(info.value.ops) == ["aten.embedding_dense_backward.default"]


def test_a_random_op_at_a_static_size_is_refused_with_its_reason_not_frozen() -> None:
    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn(3, 4)

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = Head()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x)

    with pytest.raises(UnsupportedOpError, match=r"aten.randn.default \(refused, random: draws random numbers") as info:
        capture(M(), torch.randn(3, 4))
    assert any("module 'head'" in w for w in info.value.ops["aten.randn.default"])
