"""The per-call fast path: torch tensors straight into the onnxruntime session, cheap weight checks.

On the demo decoder (LoRA on all seven projections, nonzero ``B``, int64 token ids): outputs
equal eager through the fast path (no fallback conversion), and a weight change, in place or
by ``p.data = ...``, still rebuilds instead of serving the stale executable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter
from flora_graph.errors import RuntimeInputError
from flora_graph.ir import Graph, Op
from flora_graph.models import build_decoder
from flora_graph.runtimes.executable import compile as compile_graph
from flora_graph.torch_jit import dynamo, jit
from flora_graph.torch_jit import runner as runner_mod
from flora_graph.torch_jit.fingerprint import TensorFingerprint
from flora_graph.torch_jit.runner import make_runner, make_torch_runner, picker
from tests.torch_jit.helpers import ORT, assert_close

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture
def decoder() -> nn.Module:
    model = build_decoder(lora_rank=4, seed=3)
    b = model.layers[0].mlp.down_proj.lora_B
    assert isinstance(model.layers[0].mlp.down_proj, LoRAAdapter) and b.abs().sum() > 0  # merges are not trivial
    return model


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the slow path's tensor -> numpy conversions (the fast path makes none)."""
    calls: list[int] = []
    slow = runner_mod.to_numpy

    def counted(t: torch.Tensor):
        calls.append(1)
        return slow(t)

    monkeypatch.setattr(runner_mod, "to_numpy", counted)
    return calls


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 259, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- decoder, both front doors
@pytest.mark.parametrize("preset", ["fused", pytest.param("merged", marks=pytest.mark.slow)])
def test_backend_decoder_matches_eager_on_the_fast_path(decoder: nn.Module, conversions: list[int], preset: str) -> None:
    cm = torch.compile(decoder, backend="flora_graph", options={"preset": preset, **ORT})
    with torch.no_grad():
        for shape in [(1, 1), (1, 1), (1, 32)]:
            x = ids(*shape, seed=shape[1])
            assert_close(cm(x), decoder(x))
    assert dynamo.stats().torch_ops == {}
    assert conversions == []


@pytest.mark.parametrize("preset", ["fused", "merged"])
def test_jit_decoder_matches_eager_on_the_fast_path(decoder: nn.Module, conversions: list[int], preset: str) -> None:
    jm = jit(decoder, preset=preset, **ORT)
    with torch.no_grad():
        for shape in [(1, 1), (4, 16), (2, 9)]:
            x = ids(*shape, seed=shape[0])
            assert_close(jm(x), decoder(x))
    assert jm.compile_count == 2  # (2, 9) reuses the dynamic batch x seq graph of (4, 16)
    assert conversions == []


def test_backend_decoder_outputs_are_fresh_tensors(decoder: nn.Module) -> None:
    """The whole-graph runner hands back the session's fresh arrays: a later call never overwrites an earlier result."""
    cm = torch.compile(decoder, backend="flora_graph", options={"preset": "fused", **ORT})
    with torch.no_grad():
        x, z = ids(1, 4, seed=1), ids(1, 4, seed=2)
        first = cm(x)
        kept = first.clone()
        second = cm(z)
        assert torch.equal(first, kept) and first.data_ptr() != second.data_ptr()
        assert_close(second, decoder(z))


def test_backend_decoder_weight_changes_rebuild(decoder: nn.Module) -> None:
    cm = torch.compile(decoder, backend="flora_graph", options={"preset": "merged", **ORT})
    x = ids(1, 8)
    proj = decoder.layers[1].self_attn.o_proj
    with torch.no_grad():
        before = cm(x)
        proj.lora_B.add_(0.5)  # version counter
        after = cm(x)
        assert_close(after, decoder(x))
        assert not torch.allclose(before, after)
        proj.lora_A.data = torch.randn_like(proj.lora_A)  # data pointer
        assert_close(cm(x), decoder(x))
        decoder.norm.weight.add_(0.1)  # a weight outside the adapters
        assert_close(cm(x), decoder(x))
    assert dynamo.stats().compiles == 4


def test_jit_decoder_weight_changes_rebuild(decoder: nn.Module) -> None:
    jm = jit(decoder, preset="fused", **ORT)
    x = ids(1, 8)
    proj = decoder.layers[0].mlp.gate_proj
    with torch.no_grad():
        before = jm(x)
        proj.lora_B.add_(0.5)
        after = jm(x)
        assert_close(after, decoder(x))
        assert not torch.allclose(before, after)
        proj.lora_B.data = torch.randn_like(proj.lora_B)
        assert_close(jm(x), decoder(x))
    assert jm.stats.invalidations == 2 and jm.stats.captures == 1


# --------------------------------------------------------------------------- the runner
def small_graph() -> Graph:
    g = Graph("small")
    x = g.input("x", ["batch", 4], "float32")
    w = g.const("w", torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).numpy())
    g.set_output("y", g.add(Op.LINEAR, [x, w], name="fc"))
    return g


def test_torch_runner_falls_back_for_unusual_inputs(conversions: list[int]) -> None:
    exe = compile_graph(small_graph(), "onnxruntime", **ORT)
    run = make_torch_runner(exe)
    x = torch.randn(4, 2).t()  # a [2, 4] view with strides
    assert not x.is_contiguous()
    want = exe({"x": x.contiguous().numpy()})["y"]
    (y,) = run([x])  # non-contiguous: copied by the slow path
    assert conversions and torch.equal(y, torch.from_numpy(want))
    conversions.clear()
    (y,) = run([x.contiguous()])
    assert conversions == [] and torch.equal(y, torch.from_numpy(want))
    (y,) = run([x.contiguous().requires_grad_()])  # numpy() refuses: the slow path detaches
    assert conversions and torch.equal(y, torch.from_numpy(want)) and not y.requires_grad


def test_torch_runner_errors_name_the_graph() -> None:
    exe = compile_graph(small_graph(), "onnxruntime", **ORT)
    run = make_torch_runner(exe)
    with pytest.raises(Exception, match="x"):
        run([torch.randn(2, 5)])  # wrong feature size: the checked path names the input


def test_runners_refuse_dims_past_dim_max(conversions: list[int]) -> None:
    graph = small_graph()
    graph.dim_max = {"batch": 3}
    exe = compile_graph(graph, "onnxruntime", **ORT)
    run, run_arrays = make_torch_runner(exe), make_runner(exe)
    x = torch.randn(3, 4)
    (y,) = run([x])
    assert conversions == [] and torch.equal(y, torch.from_numpy(exe({"x": x.numpy()})["y"]))
    assert_close(torch.from_numpy(run_arrays([x.numpy()])[0]), y)
    with pytest.raises(RuntimeInputError, match="batch"):
        run([torch.randn(4, 4)])
    with pytest.raises(RuntimeInputError, match="batch"):
        run_arrays([np.zeros((4, 4), np.float32)])


def test_picker() -> None:
    args = ("a", "b", "c")
    assert picker([])(args) == ()
    assert picker([2])(args) == ("c",)
    assert tuple(picker([2, 0])(args)) == ("c", "a")


# --------------------------------------------------------------------------- fingerprint
def test_moved_sees_identity_version_pointer_and_length() -> None:
    ps = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.ones(2))]
    fp = TensorFingerprint(ps)
    assert not fp.moved(ps) and not fp.moved(tuple(ps))
    assert fp.moved(ps[:1])
    assert fp.moved([ps[0], nn.Parameter(torch.ones(2))])
    with torch.no_grad():
        ps[1].add_(1)
    assert fp.moved(ps)
    fp = TensorFingerprint(ps)
    ps[0].data = torch.zeros(3)
    assert fp.moved(ps)


def test_moved_handles_inference_tensors() -> None:
    with torch.inference_mode():
        t = torch.zeros(3)
    fp = TensorFingerprint([t])
    assert not fp.moved([t])
    assert fp.moved([torch.zeros(3)])
