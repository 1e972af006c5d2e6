"""Mixed-adapter batches: one call equals, row by row, each row's own merged model."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from flora_graph.frontend import capture
from flora_graph.serving import MixedAdapterSession, ServingError, adapter_params, export_mixed, stack_adapters
from flora_graph.serving.demo import random_adapter
from flora_graph.serving.slots import param_spec, slots_from_metadata

from .conftest import ATOL, merged


@pytest.fixture(scope="module")
def session(served):
    return MixedAdapterSession(served.mixed, {k: str(p) for k, p in served.files.items()}, intra_op_threads=1)


def per_row_reference(served, names, x):
    return np.stack([served.reference(n, x[i : i + 1])[0] for i, n in enumerate(names)])


def test_export_structure(served):
    model = onnx.load(str(served.mixed))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gather") == 10  # A and B of each of the five sites
    assert ops.count("Slice") == 18 and ops.count("Conv") == 2  # conv sites: 3x3 taps; only the base layers convolve
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["adapter_index"] == ["batch"]
    assert dims["fc_in.lora_A.stack"] == ["adapter_slots", 1024, "fc_in.rank"]
    assert dims["conv1.lora_A.stack"] == ["adapter_slots", "conv1.rank", 27]
    assert {t.name for t in model.graph.initializer} >= {n for n in dims if n.endswith(".stack")}


@pytest.mark.parametrize("names", [
    ["a", "b", "c", None, "c", "a"],
    [None] * 6,
    ["c"] * 6,
])
def test_rows_match_their_merged_models(served, session, images, names):
    out = session.run({"image": images}, names)["output"]
    np.testing.assert_allclose(out, per_row_reference(served, names, images), atol=ATOL)


def test_raw_index_and_single_name(served, session, images):
    idx = np.array([2, -1, 0, 1, 1, 2])  # index order is the mapping order: a, b, c
    names = [session.adapter_names[i] if i >= 0 else None for i in idx]
    out = session.run({"image": images}, adapter_index=idx)["output"]
    np.testing.assert_allclose(out, per_row_reference(served, names, images), atol=ATOL)
    np.testing.assert_allclose(session.run({"image": images[:2]}, "b")["output"], served.reference("b", images[:2]), atol=ATOL)


def test_without_stacks_it_is_the_base_model(served, images):
    s = MixedAdapterSession(served.mixed, intra_op_threads=1)
    np.testing.assert_allclose(s.run({"image": images})["output"], served.reference(None, images), atol=ATOL)


def test_set_adapters_swaps_the_set(served, images):
    s = MixedAdapterSession(served.mixed, {"b": served.params["b"]}, intra_op_threads=1)
    assert s.adapter_names == ["b"]
    s.set_adapters({"c": served.files["c"], "a": served.params["a"]})
    names = ["a", "c", None, "a", "c", "c"]
    np.testing.assert_allclose(s.run({"image": images}, names)["output"], per_row_reference(served, names, images), atol=ATOL)


def test_stack_layout_zero_pads_ranks(served):
    _, slots = slots_from_metadata({p.key: p.value for p in onnx.load(str(served.mixed)).metadata_props}, "mixed")
    params = [served.params["a"], served.params["c"]]
    st = stack_adapters(slots, params)
    a, b = st["head.lora_A.stack"], st["head.lora_B.stack"]
    assert a.shape == (3, 64, 8) and b.shape == (3, 8, 10)
    np.testing.assert_array_equal(a[0, :, :2], params[0]["head.lora_A"].T)
    assert not a[0, :, 2:].any() and not a[2].any() and not b[2].any()
    assert st["conv2.lora_A.stack"].shape == (3, 8, 72) and st["conv2.lora_B.stack"].shape == (3, 16, 8)
    conv_a = params[1]["conv2.lora_A"]  # [8, C=8, 3, 3] -> row r, column (i*3 + j)*8 + c
    np.testing.assert_array_equal(st["conv2.lora_A.stack"][1, 5, (1 * 3 + 2) * 8 + 4], conv_a[5, 4, 1, 2])
    assert set(param_spec(slots)) == set(served.params["a"])


def check_rows_match_merged(net: type[nn.Module], targets: list[str], ranks: dict[str, int], shape: tuple[int, ...]) -> None:
    """A mixed batch of rows ``q``, no adapter, ``p`` over ``net`` equals each row's merged model."""
    torch.manual_seed(0)
    base = net().eval()
    models = {n: random_adapter(base, r, seed=k, targets=targets) for k, (n, r) in enumerate(ranks.items())}
    x = torch.randn(*shape)
    g = capture(models["p"], {"x": x}, {"x": {0: "batch"}})
    s = MixedAdapterSession(export_mixed(g), {n: adapter_params(m) for n, m in models.items()}, intra_op_threads=1)
    names = ["q", None, "p"]
    with torch.no_grad():
        want = np.stack([(base if n is None else merged(models[n]))(x[i : i + 1])[0].numpy() for i, n in enumerate(names)])
    np.testing.assert_allclose(s.run({"x": x.numpy()}, names)["output"], want, atol=ATOL)


class SeqNet(nn.Module):
    """Linear layers on ``[batch, seq, features]`` rows (transformer-shaped)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def test_sequence_inputs_gather_per_batch_row():
    check_rows_match_merged(SeqNet, ["up", "down"], {"p": 3, "q": 6}, (3, 5, 16))


class FoldedNet(nn.Module):
    """Folds the sequence into the rows before its Linear layers, batch-major (as OPT's MLP and a
    mixture-of-experts' shared expert do): row ``b * seq + t`` is batch row ``b``'s token ``t``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(x.reshape(-1, 16))))


class SeqMajorNet(FoldedNet):
    """Folds the sequence into the rows sequence-major: row ``t * batch + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(0, 1).reshape(-1, 16))


def test_rows_flattened_batch_major_pick_their_batch_rows_adapter():
    torch.manual_seed(0)
    base = FoldedNet().eval()
    models = {n: random_adapter(base, r, seed=k, targets=["proj", "out"]) for k, (n, r) in enumerate({"p": 3, "q": 5}.items())}
    x = torch.randn(3, 4, 16)
    g = capture(models["p"], {"x": x}, {"x": {0: "batch"}})
    s = MixedAdapterSession(export_mixed(g), {n: adapter_params(m) for n, m in models.items()}, intra_op_threads=1)
    names = ["q", None, "p"]
    with torch.no_grad():  # each batch row's 4 tokens through its own merged model
        want = np.concatenate([(base if n is None else merged(models[n]))(x[i : i + 1]).numpy() for i, n in enumerate(names)])
        assert not np.allclose(want[:4], base(x[:1]).numpy(), atol=1e-3)  # the adapters matter
    np.testing.assert_allclose(s.run({"x": x.numpy()}, names)["output"], want, atol=ATOL)


class SeqFirstNet(nn.Module):
    """Linear layers on sequence-first ``[seq, batch, features]`` (FSMT's and ``nn.MultiheadAttention``'s layout),
    back to batch-first at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x.transpose(0, 1)))).transpose(0, 1)


def test_sequence_first_inputs_pick_their_batch_rows_adapter():
    """The slot sees the rows batch-first (the first two axes swapped, there and back): each batch row its adapter."""
    check_rows_match_merged(SeqFirstNet, ["up", "down"], {"p": 3, "q": 6}, (3, 5, 16))


def test_site_whose_rows_are_not_batch_rows_is_refused():
    m = random_adapter(SeqMajorNet().eval(), 2, seed=0, targets=["proj"])
    g = capture(m, {"x": torch.randn(2, 4, 16)}, {"x": {0: "batch"}})
    with pytest.raises(ServingError, match=r"module 'proj'.*not the batch dim"):
        export_mixed(g)


def test_set_adapters_during_concurrent_runs_never_mixes_sets(served, images):
    """The set is swapped between two index orders while 4 workers run; every row stays right."""
    from concurrent.futures import ThreadPoolExecutor

    orders = [{"a": served.params["a"], "c": served.params["c"]}, {"c": served.params["c"], "a": served.params["a"]}]
    s = MixedAdapterSession(served.mixed, orders[0], intra_op_threads=1)
    names = ["a", "c", None, "c", "a", "a"]
    want = per_row_reference(served, names, images)

    def swap():
        for k in range(30):
            s.set_adapters(orders[k % 2])
        return k

    with ThreadPoolExecutor(max_workers=4) as pool:
        side = pool.submit(swap)
        outs = list(pool.map(lambda _: s.run({"image": images}, names)["output"], range(200)))
        assert side.result() == 29
    for out in outs:
        np.testing.assert_allclose(out, want, atol=ATOL)


def test_float16_graph_computes_lora_in_float32():
    torch.manual_seed(0)
    base = SeqNet().eval()
    models = {n: random_adapter(base, r, seed=k, targets=["up", "down"]).half() for k, (n, r) in enumerate([("p", 3), ("q", 6)])}
    x = torch.randn(4, 16).half()
    g = capture(models["p"], {"x": x}, {"x": {0: "batch"}})
    s = MixedAdapterSession(export_mixed(g), {n: adapter_params(m) for n, m in models.items()}, intra_op_threads=1)
    names = ["q", "p", None, "q"]
    with torch.no_grad():
        ref = {n: (base if n is None else copy.deepcopy(merged(models[n])).float()) for n in ("p", "q", None)}
        want = np.stack([ref[n](x[i : i + 1].float())[0].numpy() for i, n in enumerate(names)])
    out = s.run({"x": x.numpy()}, names)["output"]
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), want, atol=3e-3)
    per_row = MixedAdapterSession(export_mixed(g), {n: adapter_params(m) for n, m in models.items()},
                                  intra_op_threads=1, per_row_weights=True)  # float16 rows' weights
    np.testing.assert_array_equal(per_row.run({"x": x.numpy()}, names)["output"], out)


class ConvNet(nn.Module):
    """A pointwise conv and a strided, dilated 3x3 conv (the im2col cases the demo model lacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.point = nn.Conv2d(4, 6, 1)
        self.wide = nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(torch.relu(self.point(x)))


def test_pointwise_and_strided_dilated_convs():
    check_rows_match_merged(ConvNet, ["point", "wide"], {"p": 2, "q": 3}, (3, 4, 9, 11))
