"""torch.compile(backend="flora_graph"): registration, eager equality, graph breaks, adapters, weights, training."""

from __future__ import annotations

import subprocess
import sys
import warnings
from importlib.metadata import entry_points

import pytest
import torch
from torch import nn

from flora_graph.adapters import merge_all
from flora_graph.errors import UnsupportedOpError
from flora_graph.ir import Graph, Op
from flora_graph.models import build_demo_model, demo_inputs
from flora_graph.torch_jit import dynamo
from flora_graph.torch_jit.fx_islands import LoweringFallbackWarning
from tests.torch_jit.helpers import ORT, AdaptedLinear, Branchy, Exotic, TwoHeads, adapted_stack, assert_close

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def compiled(model: nn.Module, graphs: list[Graph] | None = None, dynamic: bool | None = None, **options) -> nn.Module:
    opts = {**ORT, **options}
    if graphs is not None:
        opts["on_compile"] = graphs.append
    return torch.compile(model, backend="flora_graph", options=opts, dynamic=dynamic)


# --------------------------------------------------------------------------- registration
def test_entry_point_is_declared() -> None:
    names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    assert "flora_graph" in names
    assert entry_points(group="torch_dynamo_backends")["flora_graph"].load() is dynamo.flora_graph_backend


def test_backend_listed_after_importing_torch_only() -> None:
    code = "import sys, torch; ok = 'flora_graph' in torch._dynamo.list_backends(); " \
           "print(ok, 'flora_graph' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "False"]  # listed without importing flora_graph


# --------------------------------------------------------------------------- equality
@pytest.mark.parametrize("preset", ["fused", "merged"])
def test_demo_matches_eager(preset: str) -> None:
    model = build_demo_model()
    cm = compiled(model, preset=preset)
    with torch.no_grad():
        for batch in (1, 4):
            x = demo_inputs(batch, seed=batch)["image"]
            assert_close(cm(x), model(x))
    assert dynamo.stats().compiles >= 1 and not dynamo.stats().torch_ops


@pytest.mark.parametrize("seed", [0, 1])
def test_adapted_stacks_match_eager(seed: int) -> None:
    model = adapted_stack(seed)
    cm = compiled(model, preset="merged" if seed else "fused")
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_close(cm(x), model(x))


def test_tuple_output_and_numpy_backend() -> None:
    model = TwoHeads().eval()
    cm = torch.compile(model, backend="flora_graph", options={"backend": "numpy"})
    x = torch.randn(4, 6)
    with torch.no_grad():
        got, want = cm(x), model(x)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


# --------------------------------------------------------------------------- graph breaks, fallback
def test_graph_break_on_tensor_value_is_correct() -> None:
    model = Branchy()
    cm = compiled(model)
    with torch.no_grad():
        for sign in (1.0, -1.0, 1.0):
            x = sign * (torch.rand(3, 8) + 0.1)  # positive then negative sum: both branches
            assert_close(cm(x), model(x))
    st = dynamo.stats()
    assert st.graphs == 3 and st.compiles == 3  # before the branch, and each branch's continuation


def test_fallback_error_raises_unsupported_op() -> None:
    model = Exotic()
    cm = compiled(model, fallback="error")
    with pytest.raises(Exception) as info, torch.no_grad():
        cm(torch.randn(3, 5))
    err = info.value
    while err is not None and not isinstance(err, UnsupportedOpError):
        err = err.__cause__ or getattr(err, "inner_exception", None)
    assert isinstance(err, UnsupportedOpError) and model.op_name in err.ops


def test_unsupported_op_runs_in_torch_by_default() -> None:
    model = Exotic()
    cm = compiled(model)
    x = torch.randn(3, 5)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        assert_close(cm(x), model(x))
        assert_close(cm(x), model(x))
    told = [str(w.message) for w in caught if issubclass(w.category, LoweringFallbackWarning)]
    assert len(told) == 1 and model.op_name in told[0]
    assert dynamo.stats().torch_ops == {model.op_name: 1} and dynamo.stats().compiles == 1


# --------------------------------------------------------------------------- adapters
def test_merged_adapted_linear_is_one_linear() -> None:
    graphs: list[Graph] = []
    model = AdaptedLinear()
    cm = compiled(model, graphs, preset="merged")
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert_close(cm(x), model(x))
    (g,) = graphs
    assert g.ops().count(Op.LINEAR.value) == 1 and Op.MUL.value not in g.ops()


def test_fused_keeps_adapter_and_folds_scale() -> None:
    graphs: list[Graph] = []
    model = AdaptedLinear()
    cm = compiled(model, graphs, preset="fused")
    with torch.no_grad():
        cm(torch.randn(5, 8))
    (g,) = graphs
    assert g.ops().count(Op.LINEAR.value) == 3  # base, A, B: swappable, the scale folded into B


def test_3d_dynamic_shapes_keep_the_lora_pattern() -> None:
    graphs: list[Graph] = []
    model = adapted_stack(3)
    cm = compiled(model, graphs, dynamic=True, preset="merged")
    with torch.no_grad():
        for shape in [(2, 5, 16), (3, 7, 16)]:
            x = torch.randn(*shape)
            assert_close(cm(x), model(x))
    assert len(graphs) == 1 and not dynamo.stats().torch_ops
    assert graphs[0].ops().count(Op.LINEAR.value) == 14  # every adapter merged, no reshape in the way


# --------------------------------------------------------------------------- dynamic dims
def test_dynamic_true_compiles_once_for_new_batch() -> None:
    model = AdaptedLinear()
    cm = compiled(model, dynamic=True)
    with torch.no_grad():
        for batch in (2, 3, 9):
            x = torch.randn(batch, 8)
            assert_close(cm(x), model(x))
    assert dynamo.stats().compiles == 1


def test_dynamic_false_compiles_once_per_shape() -> None:
    model = AdaptedLinear()
    cm = compiled(model, dynamic=False)
    with torch.no_grad():
        for batch in (2, 3, 2, 3):
            x = torch.randn(batch, 8)
            assert_close(cm(x), model(x))
    assert dynamo.stats().compiles == 2


# --------------------------------------------------------------------------- weights
def test_inplace_lora_edit_rebuilds() -> None:
    model = AdaptedLinear()
    cm = compiled(model, preset="merged")
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = cm(x)
        model.proj.lora_B.add_(1.0)
        after = cm(x)
        assert_close(after, model(x))
        assert not torch.allclose(before, after)
        model.proj.lora_A.data = torch.randn_like(model.proj.lora_A)
        assert_close(cm(x), model(x))
    assert dynamo.stats().compiles == 3


def test_merge_all_recompiles_fresh() -> None:
    model = build_demo_model(seed=2)
    cm = compiled(model)
    x = demo_inputs(2, seed=5)["image"]
    with torch.no_grad():
        cm(x)
        merge_all(model)
        assert_close(cm(x), model(x))


def test_content_check_sees_data_edits() -> None:
    model = AdaptedLinear()
    cm = compiled(model, check_weights="content")
    x = torch.randn(4, 8)
    with torch.no_grad():
        cm(x)
        model.proj.lora_B.data.mul_(3.0)
        assert_close(cm(x), model(x))


# --------------------------------------------------------------------------- training
def test_training_forward_and_backward_stay_in_torch() -> None:
    model = AdaptedLinear()
    cm = compiled(model)
    x = torch.randn(4, 8)
    y = cm(x)
    y.square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).square().sum().backward()
    assert got.keys() == {"proj.lora_A", "proj.lora_B"}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert_close(got[n], p.grad)
    st = dynamo.stats()
    assert st.torch_graphs == 2 and st.compiles == 0


def test_bad_options_are_refused() -> None:
    with pytest.raises(Exception, match="preset"), torch.no_grad():
        torch.compile(AdaptedLinear(), backend="flora_graph", options={"preset": "quick"})(torch.randn(2, 8))
