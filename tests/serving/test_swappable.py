"""Swappable export + AdapterSession: base model without adapter, merged-model outputs with one, across threads."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest

from flora_graph.serving import AdapterSession, graph_adapter_params, read_adapter
from flora_graph.serving.adapter_file import layout_signature, spec_of

from .conftest import ATOL, RANKS


@pytest.fixture(scope="module")
def session(served):
    s = AdapterSession(served.swappable, intra_op_threads=1)
    for name, path in served.files.items():
        s.load_adapter(name, path)
    return s


def test_export_structure(served):
    model = onnx.load(str(served.swappable))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    lora = {i.name for i in model.graph.input} - {"image"}
    assert len(lora) == 10 and lora <= set(inits)  # A and B of five modules, overridable
    assert inits["fc_in.lora_A"] == [0, 1024] and inits["fc_in.lora_B"] == [64, 0]
    assert inits["conv1.lora_A"] == [0, 3, 3, 3] and inits["conv1.lora_B"] == [8, 0, 1, 1]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["fc_in.lora_A"] == ["fc_in.rank", 1024] and dims["fc_in.lora_B"] == [64, "fc_in.rank"]
    assert not any("scaling" in t for t in inits)  # the scale lives in B
    assert all(0 in d for t, d in inits.items() if "lora" in t)  # no adapter weight is baked in


def test_no_adapter_is_the_base_model(served, session, images):
    out = session.run({"image": images})["output"]
    np.testing.assert_allclose(out, served.reference(None, images), atol=ATOL)


@pytest.mark.parametrize("name", list(RANKS))
def test_each_adapter_is_its_merged_model(served, session, images, name):
    want = served.reference(name, images)
    assert np.abs(want - served.reference(None, images)).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(session.run({"image": images}, name)["output"], want, atol=ATOL)


def test_adapter_files_record_layout_and_rank(served):
    f = read_adapter(served.files["c"])
    assert f.model_version == layout_signature(spec_of(served.swappable))
    assert f.params["head.lora_A"].shape == (8, 64) and f.params["head.lora_B"].shape == (10, 8)


def test_load_from_dict_and_graph_weights(served, images):
    s = AdapterSession(served.swappable, intra_op_threads=1)
    assert s.load_adapter("own", graph_adapter_params(served.graph)) == dict.fromkeys(
        ["conv1", "conv2", "fc_in", "fc_mid", "head"], 2)
    s.load_adapter("b", {k: v.astype(np.float64) for k, v in served.params["b"].items()})  # cast on load
    np.testing.assert_allclose(s.run({"image": images}, "own")["output"], served.reference("a", images), atol=ATOL)
    np.testing.assert_allclose(s.run({"image": images}, "b")["output"], served.reference("b", images), atol=ATOL)


def test_partial_adapter_leaves_other_modules_as_base(served, images):
    s = AdapterSession(served.swappable, intra_op_threads=1)
    head_only = {k: v for k, v in served.params["b"].items() if k.startswith("head.")}
    s.load_adapter("head", head_only)
    import torch

    from .conftest import merged

    m = merged(served.models["b"])
    with torch.no_grad():
        feats = served.base  # base layers everywhere but the head
        h = torch.from_numpy(images)
        h = torch.relu(feats.conv1(h))
        h = torch.nn.functional.gelu(feats.conv2(h))
        h = feats.norm(feats.fc_in(h.flatten(1)))
        h = h + torch.nn.functional.silu(feats.fc_mid(h))
        want = torch.softmax(m.head(h), dim=-1).numpy()
    np.testing.assert_allclose(s.run({"image": images}, "head")["output"], want, atol=ATOL)


def test_interleaved_threads_never_cross(served, session, images):
    """1,000 requests over 4 workers alternate a/b/base; meanwhile an extra adapter is loaded and unloaded."""
    want = {n: served.reference(n, images) for n in (None, "a", "b")}
    rng = random.Random(0)
    plan = [(["a", "b", None][i % 3], rng.randint(1, 6)) for i in range(1000)]

    def call(item):
        name, rows = item
        return name, rows, session.run({"image": images[:rows]}, name)["output"]

    def churn():
        done = 0
        for _ in range(20):
            session.load_adapter("extra", served.files["c"], replace=True)
            session.unload_adapter("extra")
            done += 1
        return done

    with ThreadPoolExecutor(max_workers=4) as pool:
        side = pool.submit(churn)
        results = list(pool.map(call, plan))
        assert side.result() == 20
    for name, rows, out in results:
        np.testing.assert_allclose(out, want[name][:rows], atol=ATOL)
    assert sorted(session.adapters) == ["a", "b", "c"]


def test_a_peft_folder_serves_as_an_adapter(served, images, tmp_path):
    """A PEFT adapter folder (rank 3, different from every exported one) -> .onnx_adapter -> its PEFT output."""
    import copy

    import peft
    import torch

    from flora_graph.serving import peft_adapter_params, write_adapter
    from flora_graph.serving.demo import DEMO_TARGETS

    torch.manual_seed(11)
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=list(DEMO_TARGETS), init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(served.base), cfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    path = write_adapter(tmp_path / "p.onnx_adapter", peft_adapter_params(served.base, tmp_path / "peft"),
                         model=served.swappable)
    s = AdapterSession(served.swappable, intra_op_threads=1)
    s.load_adapter("peft", path)
    with torch.no_grad():
        want = pm(torch.from_numpy(images)).numpy()
    assert np.abs(want - served.reference(None, images)).max() > 0.05
    np.testing.assert_allclose(s.run({"image": images}, "peft")["output"], want, atol=ATOL)


def test_reading_a_peft_folder_leaves_the_base_model_as_it_was_and_copies_no_weight(served, tmp_path, monkeypatch):
    """``peft_adapter_params`` installs the folder on a copy of the model whose modules are its own and whose weights
    are the model's: the model keeps its modules, values and ``requires_grad`` flags, and the copy's weights are the
    model's tensors (reading an adapter of a large model holds no second copy of it); the params are PEFT's."""
    import copy

    import peft
    import torch

    import flora_graph.adapters.peft as peft_loader
    from flora_graph.serving import peft_adapter_params
    from flora_graph.serving.demo import DEMO_TARGETS

    base = copy.deepcopy(served.base)
    for i, p in enumerate(base.parameters()):
        p.requires_grad_(i % 2 == 0)
    torch.manual_seed(12)
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=list(DEMO_TARGETS), init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(served.base), cfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    kinds = {n: type(m) for n, m in base.named_modules()}
    flags = [p.requires_grad for p in base.parameters()]
    installed_on = []
    real = peft_loader.load_peft_adapter

    def spy(model, folder, **kw):
        installed_on.append({id(t) for t in (*model.parameters(), *model.buffers())})
        return real(model, folder, **kw)

    monkeypatch.setattr(peft_loader, "load_peft_adapter", spy)
    params = peft_adapter_params(base, tmp_path / "peft")
    assert installed_on and installed_on[0] == {id(t) for t in (*base.parameters(), *base.buffers())}
    assert {n: type(m) for n, m in base.named_modules()} == kinds
    assert [p.requires_grad for p in base.parameters()] == flags
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name in DEMO_TARGETS:  # A as saved, B times alpha / r
        layer = pm.get_submodule(name)
        np.testing.assert_allclose(params[f"{name}.lora_A"], layer.lora_A["default"].weight.detach().numpy())
        np.testing.assert_allclose(params[f"{name}.lora_B"], layer.lora_B["default"].weight.detach().numpy() * 3,
                                   rtol=1e-6)
