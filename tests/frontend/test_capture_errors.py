"""capture() failures: unsupported ATen ops (all listed, with where), bad dynamic_dims, export failures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_graph.adapters import apply_lora
from flora_graph.errors import FloraGraphError, GraphError, UnsupportedOpError
from flora_graph.frontend import capture

BATCH = {"x": {0: "batch"}}


class LgammaInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(self.fc(x))


class TwoUnsupported(nn.Module):
    """lgamma inside a submodule (twice: once there, once at top level) and cumprod at top level
    (two ops without a converter)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LgammaInside()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cumprod(self.inner(x), 1) + torch.lgamma(x)
        return self.head(h)


class Cumprod(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(x, 1)


class WithBatchNorm(nn.Module):
    """A batch norm (captured in eval mode) followed by an op without a converter."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Cumprod(), nn.ReLU())
        self.head = nn.Linear(4 * 5 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _unsupported(model: nn.Module, x: torch.Tensor, **kw) -> UnsupportedOpError:
    with pytest.raises(UnsupportedOpError) as info:
        capture(model, x, **kw)
    assert isinstance(info.value, FloraGraphError)
    return info.value


def test_every_unsupported_op_is_listed_with_where():
    err = _unsupported(TwoUnsupported(), torch.randn(3, 4), dynamic_dims=BATCH)
    assert set(err.ops) == {"aten.lgamma.default", "aten.cumprod.default"}
    lgamma_places = err.ops["aten.lgamma.default"]
    assert len(lgamma_places) == 2
    assert any("'inner'" in w for w in lgamma_places)  # the submodule path where the first lgamma occurs
    assert len(err.ops["aten.cumprod.default"]) == 1
    msg = str(err)
    assert "2 unsupported op(s)" in msg
    for op in err.ops:
        assert op in msg
    assert "module 'inner'" in msg


def test_unsupported_op_after_a_batchnorm_is_located_and_the_mode_restored():
    model = WithBatchNorm()
    model.train()  # capture exports in eval mode: batch_norm, not the training-mode running-stat updates
    err = _unsupported(model, torch.randn(2, 3, 5, 5), dynamic_dims=BATCH)
    assert list(err.ops) == ["aten.cumprod.default"]  # the eval-mode batch_norm converts
    (where,) = err.ops["aten.cumprod.default"]
    assert "features.2" in where
    assert "features.2" in str(err)
    assert model.training  # mode restored after the failed capture
    assert model.features[1].running_mean.abs().sum() == 0  # and running stats untouched


def test_unsupported_op_inside_adapted_model_names_module():
    torch.manual_seed(0)
    model = TwoUnsupported()
    apply_lora(model, ["fc", "head"], rank=2)
    err = _unsupported(model, torch.randn(3, 4))
    assert set(err.ops) == {"aten.lgamma.default", "aten.cumprod.default"}


def test_topk_with_a_dynamic_k_of_another_axis_is_refused_by_name():
    class TopBatch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.topk(x.shape[0], dim=1).values  # k the batch, of a static axis of 8

    with pytest.raises(UnsupportedOpError, match=r"topk with a dynamic k \('batch'\) other than the axis's dim"):
        capture(TopBatch(), torch.randn(3, 8), BATCH)


def test_ops_on_weights_only_are_folded_not_reported():
    """An unsupported op whose inputs are all weights runs once at capture and becomes a constant."""

    class Folded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_scale = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.lgamma(self.log_scale)

    model = Folded()
    g = capture(model, torch.randn(3, 4), BATCH)
    assert g.ops() == ["Mul"]
    from flora_graph.runtimes.reference import run

    x = torch.randn(5, 4)
    with torch.no_grad():
        want = model(x).numpy()
    torch.testing.assert_close(torch.from_numpy(run(g, {"x": x})["output"]), torch.from_numpy(want), atol=1e-6, rtol=1e-6)


class Normalized(nn.Module):
    """RecurrentGemma's ``normalizer``: a bfloat16 buffer (sqrt of the width, rounded) converted to the activations'
    type; ``bf16_math`` multiplies it in bfloat16 first, a result numpy cannot hold."""

    def __init__(self, bf16_math: bool = False) -> None:
        super().__init__()
        self.register_buffer("normalizer", torch.tensor(5.7, dtype=torch.bfloat16), persistent=False)
        self.bf16_math = bf16_math

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.normalizer * self.normalizer if self.bf16_math else self.normalizer
        return x * scale.type(x.dtype)


def test_bfloat16_weight_converted_to_float32_is_folded() -> None:
    model = Normalized()
    g = capture(model, torch.randn(3, 4), BATCH)
    assert g.ops() == ["Mul"]
    from flora_graph.runtimes.reference import run

    x = torch.randn(5, 4)
    with torch.no_grad():
        want = model(x).numpy()  # 5.6875, the bfloat16 value, not 5.7
    assert run(g, {"x": x.numpy()})["output"].tolist() == want.tolist()


def test_bfloat16_arithmetic_on_weights_is_refused_by_name() -> None:
    with pytest.raises(GraphError, match="is bfloat16"):
        capture(Normalized(bf16_math=True), torch.randn(3, 4), BATCH)


def test_dtype_cast_is_captured_as_cast():
    class Cast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.float64) * 2

    g = capture(Cast(), torch.randn(3, 4))
    assert g.ops() == ["Cast", "Mul"] and g.outputs["output"].dtype == "float64"


def test_training_dropout_in_forward_is_unsupported():
    class AlwaysDrop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, 0.5, training=True)

    err = _unsupported(AlwaysDrop(), torch.randn(3, 4))
    assert "dropout" in str(err) and any("dropout" in k for k in err.ops)


# --------------------------------------------------------------------------- dynamic_dims
@pytest.mark.parametrize(
    "dims,unknown",
    [({"y": {0: "batch"}}, ["y"]), ({"input": {0: "batch"}, "x": {0: "batch"}}, ["x"])],
    ids=["unknown", "one-known-one-unknown"],
)
def test_dynamic_dims_naming_unknown_input(dims, unknown):
    # nn.Linear.forward takes one input called "input"
    with pytest.raises(GraphError) as info:
        capture(nn.Linear(4, 2), torch.randn(3, 4), dims)
    msg = str(info.value)
    assert f"unknown inputs {unknown}" in msg
    assert "['input']" in msg  # names the inputs the model takes


def test_dynamic_dims_unknown_with_keyword_inputs():
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    with pytest.raises(GraphError, match="'c'"):
        capture(Two(), {"a": torch.randn(3, 4), "b": torch.randn(3, 4)}, {"c": {0: "batch"}})


# --------------------------------------------------------------------------- export failures
class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on data: torch.export cannot trace it
            return x
        return -x


def test_unexportable_model_raises_graph_error_with_cause():
    with pytest.raises(GraphError) as info:
        capture(DataDependent(), torch.randn(3, 4))
    err = info.value
    assert isinstance(err, FloraGraphError)
    assert "DataDependent" in str(err)
    assert err.__cause__ is not None
    assert not isinstance(err.__cause__, FloraGraphError)


def test_specialised_dynamic_dim_raises_graph_error():
    """The model pins the batch to its example size, so the dim named dynamic cannot be."""

    class Pinned(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(3, 4) * 2

    with pytest.raises(GraphError) as info:
        capture(Pinned(), torch.randn(3, 4), BATCH)
    assert info.value.__cause__ is not None


def test_failed_capture_restores_mode():
    model = DataDependent().train()
    with pytest.raises(GraphError):
        capture(model, torch.randn(3, 4))
    assert model.training


class AssertsWhileExporting(nn.Module):
    """An error without a message under torch.export (as XLM's bare ``assert`` on its masks gives with a cache's;
    raised, not asserted, as pytest gives a test module's asserts a message)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise AssertionError
        return x * 2


def test_an_export_failure_without_a_message_names_its_type_and_line():
    with pytest.raises(GraphError, match=r"could not export AssertsWhileExporting: AssertionError at .*"
                                         r"test_capture_errors\.py:\d+ \(raise AssertionError\)"):
        capture(AssertsWhileExporting(), (torch.randn(2, 4),), BATCH)
