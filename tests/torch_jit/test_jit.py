"""flora_graph.jit: eager equality, the per-signature cache, dynamic dims, weight invalidation, fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from flora_graph.adapters import LoRAAdapter, adapters_of, merge_all
from flora_graph.errors import FloraGraphError, UnsupportedOpError
from flora_graph.ir import Op
from flora_graph.models import build_demo_model, demo_inputs
from flora_graph.torch_jit import JitFallbackWarning, JitModule, jit
from tests.torch_jit.helpers import AdaptedLinear, Branchy, Exotic, TwoHeads, adapted_stack, assert_close

ORT = {"intra_op_threads": 1, "allow_spinning": False}


@pytest.fixture(scope="module")
def demo() -> torch.nn.Module:
    return build_demo_model()


@pytest.fixture(scope="module")
def demo_jit(demo: torch.nn.Module) -> JitModule:
    return jit(demo, **ORT)


# --------------------------------------------------------------------------- equality
@pytest.mark.parametrize("batch", [4, 7, 16])
def test_demo_matches_eager(demo: torch.nn.Module, demo_jit: JitModule, batch: int) -> None:
    x = demo_inputs(batch, seed=batch)["image"]
    with torch.no_grad():
        assert_close(demo_jit(x), demo(x))
    assert demo_jit.compile_count == 1  # batch is dynamic: 4, 7 and 16 share one executable


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("preset", ["fused", "merged"])
def test_adapted_stack_matches_eager(seed: int, preset: str) -> None:
    model = adapted_stack(seed)
    jm = jit(model, preset=preset, **ORT)
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed + batch))
            assert_close(jm(x), model(x))
    assert jm.compile_count == 1
    ops = jm.graphs[0].ops()
    assert ops.count(Op.LINEAR.value) == (14 if preset == "merged" else 14 * 3 - 6)  # 6 LoRA-A fused in pairs/triples


def test_numpy_backend_and_keyword_call() -> None:
    model = AdaptedLinear()
    jm = jit(model, backend="numpy")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close(jm(x=x), model(x))
        assert_close(jm(x), model(x))
    assert jm.stats.captures == 2  # keyword and positional calls are different signatures


def test_tuple_output_structure() -> None:
    model = TwoHeads().eval()
    jm = jit(model, **ORT)
    x = torch.randn(4, 6)
    with torch.no_grad():
        got, want = jm(x), model(x)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def test_sequence_dim_is_dynamic_for_3d_inputs() -> None:
    model = adapted_stack(2)
    jm = jit(model, preset="merged", **ORT)
    with torch.no_grad():
        for shape in [(2, 5, 16), (3, 9, 16)]:
            x = torch.randn(*shape)
            assert_close(jm(x), model(x))
    assert jm.compile_count == 1
    assert jm.graphs[0].inputs[0].shape == ("batch", "seq", 16)


# --------------------------------------------------------------------------- cache
def test_dynamic_batch_does_not_recompile() -> None:
    model = AdaptedLinear()
    jm = jit(model, **ORT)
    with torch.no_grad():
        for batch in (2, 3, 8, 3):
            x = torch.randn(batch, 8)
            assert_close(jm(x), model(x))
    assert jm.compile_count == 1 and jm.stats.captures == 1


def test_static_shapes_compile_once_per_shape() -> None:
    model = AdaptedLinear()
    jm = jit(model, dynamic=False, **ORT)
    with torch.no_grad():
        for batch in (2, 3, 2, 3, 2):
            x = torch.randn(batch, 8)
            assert_close(jm(x), model(x))
    assert jm.compile_count == 2


def test_batch_one_and_dtype_are_their_own_signatures() -> None:
    model = AdaptedLinear()
    jm = jit(model, backend="numpy")
    with torch.no_grad():
        x1 = torch.randn(1, 8)
        assert_close(jm(x1), model(x1))  # size 1 is not made dynamic: a static entry
        x4 = torch.randn(4, 8)
        assert_close(jm(x4), model(x4))
        model64 = AdaptedLinear().double()
        jm64 = jit(model64, backend="numpy")
        x = torch.randn(3, 8, dtype=torch.float64)
        got = jm64(x)
        assert got.dtype == torch.float64
        assert_close(got, model64(x))
    assert jm.compile_count == 2


# --------------------------------------------------------------------------- weights
def test_inplace_lora_edit_invalidates_and_rebuilds_without_export() -> None:
    model = AdaptedLinear()
    jm = jit(model, **ORT)
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = jm(x)
        model.proj.lora_B.mul_(-3.0)  # bumps the version counter
        after = jm(x)
        assert_close(after, model(x))
        assert not torch.allclose(before, after)
    assert jm.stats.invalidations == 1
    assert jm.stats.captures == 1 and jm.compile_count == 2  # same structure: the export is reused


def test_data_assignment_and_load_state_dict_invalidate() -> None:
    model = AdaptedLinear()
    jm = jit(model, backend="numpy")
    x = torch.randn(5, 8)
    with torch.no_grad():
        jm(x)
        model.proj.lora_A.data = torch.randn_like(model.proj.lora_A)  # new data pointer
        assert_close(jm(x), model(x))
        state = {k: v * 0.5 for k, v in model.state_dict().items()}
        model.load_state_dict(state)  # copy_ under no_grad: new versions
        assert_close(jm(x), model(x))
    assert jm.stats.invalidations == 2


def test_merge_all_invalidates_structure() -> None:
    model = build_demo_model(seed=3)
    jm = jit(model, preset="fused", **ORT)
    x = demo_inputs(3, seed=1)["image"]
    with torch.no_grad():
        want = model(x)
        assert_close(jm(x), want)
        merge_all(model)
        assert not adapters_of(model)
        assert_close(jm(x), model(x))
    assert jm.stats.captures == 2 and jm.stats.invalidations == 1
    assert not any(n.meta.get("adapter") for n in jm.graphs[0].nodes)


def test_data_inplace_edit_needs_content_check() -> None:
    model = AdaptedLinear()
    jm = jit(model, backend="numpy", check_weights="content")
    x = torch.randn(5, 8)
    with torch.no_grad():
        jm(x)
        model.proj.lora_B.data.add_(1.0)  # .data has its own version counter: only content sees it
        assert_close(jm(x), model(x))
    assert jm.stats.invalidations == 1
    fast = jit(model, backend="numpy")
    with torch.no_grad():
        fast(x)
        model.proj.lora_B.data.add_(1.0)
        fast.invalidate()  # the documented remedy in "version" mode
        assert_close(fast(x), model(x))


def test_unrelated_module_creation_does_not_invalidate() -> None:
    model = AdaptedLinear()
    jm = jit(model, backend="numpy")
    x = torch.randn(2, 8)
    with torch.no_grad():
        jm(x)
        torch.nn.Linear(3, 3)  # bumps the global registration epoch
        jm(x)
    assert jm.stats.invalidations == 0 and jm.compile_count == 1


# --------------------------------------------------------------------------- eager paths
def test_unsupported_op_raises_naming_it() -> None:
    model = Exotic()
    jm = jit(model, backend="numpy")
    with pytest.raises(UnsupportedOpError) as info, torch.no_grad():
        jm(torch.randn(3, 5))
    assert model.op_name in info.value.ops


def test_fallback_eager_warns_once_and_is_correct() -> None:
    model = Exotic()
    jm = jit(model, backend="numpy", fallback="eager")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for batch in (3, 4, 4):
            x = torch.randn(batch, 5)
            assert_close(jm(x), model(x))
    msgs = [str(w.message) for w in caught if issubclass(w.category, JitFallbackWarning)]
    assert len(msgs) == 1 and model.op_name in msgs[0]
    assert jm.stats.eager_calls == 3 and jm.stats.captures == 1  # the failed capture is not retried per call


def test_unexportable_branch_falls_back_only_when_asked() -> None:
    model = Branchy().eval()
    with pytest.raises(FloraGraphError), torch.no_grad():
        jit(model, backend="numpy")(torch.randn(2, 8))
    jm = jit(model, backend="numpy", fallback="eager")
    with pytest.warns(JitFallbackWarning), torch.no_grad():
        x = torch.randn(2, 8)
        assert_close(jm(x), model(x))


def test_grad_mode_runs_eager_so_gradients_flow() -> None:
    model = AdaptedLinear()
    jm = jit(model, backend="numpy")
    x = torch.randn(3, 8)
    with pytest.warns(JitFallbackWarning, match="autograd"):
        y = jm(x)
    y.sum().backward()
    assert model.proj.lora_B.grad is not None and jm.compile_count == 0


def test_training_mode_runs_eager_and_eval_compiles() -> None:
    model = AdaptedLinear().train()
    jm = jit(model, backend="numpy")
    x = torch.randn(3, 8)
    with pytest.warns(JitFallbackWarning, match="training"), torch.no_grad():
        jm(x)
    jm.eval()
    with torch.no_grad():
        assert_close(jm(x), model(x))
    assert jm.compile_count == 1 and jm.stats.eager_calls == 1


def test_options_are_checked_and_attributes_forward() -> None:
    model = AdaptedLinear()
    with pytest.raises(FloraGraphError):
        jit(model, preset="fastest")
    with pytest.raises(FloraGraphError):
        jit(model, fallback="torch")
    jm = jit(model)
    assert isinstance(jm.proj, LoRAAdapter)  # attributes of the wrapped model
    assert jm.module is model


def test_peft_model_is_captured_through_its_base_model() -> None:
    import peft

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(8, 8)
            self.o = torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.relu(self.q(x)))

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "o"], init_lora_weights=False)
    model = peft.get_peft_model(MLP(), config).eval()
    jm = jit(model, preset="merged", backend="numpy")
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 8)
            assert_close(jm(x), model(x))
    assert jm.compile_count == 1 and jm.graphs[0].ops().count(Op.LINEAR.value) == 2
