"""LoRA on an ``nn.Embedding`` (PEFT's ``lora_embedding_A`` / ``_B``): the adapter, its PEFT folders, its capture,
merge and slots. References: PEFT's own ``Embedding`` LoRA layer and eager torch; ``B`` nonzero throughout."""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from torch import nn

from flora_graph.adapters import LoRAAdapter, apply_lora
from flora_graph.adapters.peft import load_peft_adapter, save_peft_adapter
from flora_graph.errors import AdapterError
from flora_graph.frontend import capture
from flora_graph.ir import Graph, Op
from flora_graph.passes import optimize
from flora_graph.runtimes import compile, run
from flora_graph.serving.slots import graph_adapter_params, graph_slots

VOCAB, DIM = 40, 12


class Tiny(nn.Module):
    """An embedding, then a projection: ids ``[batch, seq]`` in, ``[batch, seq, 6]`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.proj = nn.Linear(DIM, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids))


class ScaledEmbedding(nn.Embedding):
    """Rows times a scalar buffer ``embed_scale``, as Gemma 3's embedding computes them."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.embed_scale = nn.Buffer(torch.tensor(DIM**0.5), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class ScaledTiny(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.emb = ScaledEmbedding(VOCAB, DIM)


def _ids(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _peft_model(targets: list[str], seed: int = 0, cls: type[nn.Module] = Tiny) -> tuple[nn.Module, nn.Module]:
    """``(plain, PEFT-adapted)`` with nonzero ``A`` and ``B`` on every adapted layer."""
    torch.manual_seed(seed)
    plain = cls().eval()
    adapted = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                                                      init_lora_weights=False)).eval()
    return plain, adapted


@pytest.mark.parametrize("cls", [Tiny, ScaledTiny], ids=["plain", "scaled"])
def test_the_adapter_computes_what_peft_embedding_lora_computes(cls: type[nn.Module]) -> None:
    """A scaled embedding's branch is scaled as its rows are (PEFT's rule), and the merged table is unscaled."""
    plain, adapted = _peft_model(["emb"], cls=cls)
    layer = adapted.base_model.model.emb
    ours = LoRAAdapter(copy.deepcopy(plain.emb), 3, 6, module_name="emb")
    assert (ours.embed_scale is None) == (cls is Tiny)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_embedding_A["default"])
        ours.lora_B.copy_(layer.lora_embedding_B["default"])
    ids = _ids()
    want = layer(ids)
    assert (want - plain.emb(ids)).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(ours(ids), want)
    torch.testing.assert_close(ours.merge_to_original_layer()(ids), want, rtol=1e-5, atol=1e-5)
    assert ours.delta_weight().shape == plain.emb.weight.shape


def test_a_fresh_adapter_adds_nothing_and_refuses_max_norm() -> None:
    emb = nn.Embedding(VOCAB, DIM)
    ad = LoRAAdapter(emb, 4)
    ids = _ids()
    assert torch.equal(ad(ids), emb(ids))  # PEFT's init: A zeros, B normal
    assert ad.lora_B.abs().max() > 0
    assert isinstance(ad.lora_dropout, nn.Identity)  # the ids take no dropout, as in PEFT
    with pytest.raises(AdapterError, match=r"module 'e': LoRA on an embedding with max_norm=1.0 is unsupported"):
        LoRAAdapter(nn.Embedding(VOCAB, DIM, max_norm=1.0), 4, module_name="e")


@pytest.mark.parametrize("layer", [nn.Embedding, ScaledEmbedding])
def test_export_graph_runs_as_the_module(layer: type[nn.Embedding]) -> None:
    torch.manual_seed(0)
    ad = LoRAAdapter(layer(VOCAB, DIM), 3, 6, module_name="emb")
    nn.init.normal_(ad.lora_A)
    g = Graph("emb")
    x = g.input("ids", ("batch", "seq"), "int64")
    g.set_output("y", ad.export_graph(g, x))
    ids = _ids()
    np.testing.assert_allclose(run(g, {"ids": ids.numpy()})["y"], ad(ids).detach().numpy(), rtol=1e-5, atol=1e-6)
    merged = optimize(g, "merged")
    if layer is nn.Embedding:  # one table, the adapter baked in
        assert [n.op for n in merged.live_nodes() if n.op not in (Op.CONST, Op.INPUT)] == [Op.GATHER]
    np.testing.assert_allclose(run(merged, {"ids": ids.numpy()})["y"], ad(ids).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_peft_folder_loads_onto_our_adapters_and_saves_back(tmp_path) -> None:
    plain, adapted = _peft_model(["emb", "proj"])
    adapted.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(plain)
    assert sorted(load_peft_adapter(ours, tmp_path / "peft")) == ["emb", "proj"]
    ids = _ids()
    torch.testing.assert_close(ours(ids), adapted(ids))
    save_peft_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "ours").eval()
    torch.testing.assert_close(again(ids), adapted(ids))


@pytest.mark.parametrize("cls", [Tiny, ScaledTiny], ids=["plain", "scaled"])
@pytest.mark.parametrize("source", ["ours", "peft"])
@pytest.mark.parametrize("preset", ["unfused", "fused", "merged"])
def test_captured_adapter_runs_as_eager_in_every_preset(source: str, preset: str, cls: type[nn.Module]) -> None:
    """merged bakes a plain embedding's adapter into its table; a scaled one's is left as captured (the rows'
    scale is the layer's, not the adapter's), and both run as eager."""
    plain, adapted = _peft_model(["emb", "proj"], cls=cls)
    if source == "ours":
        adapted = copy.deepcopy(plain)
        apply_lora(adapted, ["emb", "proj"], rank=3, alpha=6)
        with torch.no_grad():
            for p in adapted.parameters():
                if p.ndim == 2 and not p.any():
                    p.normal_()
    ids = _ids()
    want = adapted(ids).detach().numpy()
    g = optimize(capture(adapted, {"ids": _ids(2, 5)}, {"ids": {0: "batch", 1: "seq"}}), preset)
    tables = [n for n in g.live_nodes() if n.op is Op.GATHER]
    assert len(tables) == (1 if preset == "merged" and cls is Tiny else 2)
    for backend in ("numpy", "onnxruntime", "torchscript"):
        np.testing.assert_allclose(compile(g, backend)({"ids": ids.numpy()})["y" if "y" in g.outputs else
                                                                              next(iter(g.outputs))],
                                   want, rtol=1e-5, atol=1e-5, err_msg=backend)


@pytest.mark.parametrize("cls", [Tiny, ScaledTiny], ids=["plain", "scaled"])
@pytest.mark.parametrize("slots", ["swappable", "mixed"])
def test_embedding_site_becomes_a_slot_fed_its_own_adapter(slots: str, cls: type[nn.Module]) -> None:
    """The captured PEFT embedding adapter becomes a slot of kind ``embedding`` (``A`` ``[r, vocab]``, PEFT's
    layout; a scaled embedding's scale folded into ``B`` with the adapter's); fed the graph's own adapter it runs as
    eager PEFT, and without one as the plain model."""
    from flora_graph.serving.mixed import stack_adapters
    from flora_graph.serving.slots import adapter_params

    plain, adapted = _peft_model(["emb", "proj"], cls=cls)
    captured = capture(adapted, {"ids": _ids(2, 5)}, {"ids": {0: "batch", 1: "seq"}})
    own = graph_adapter_params(captured)
    torch.testing.assert_close(torch.from_numpy(own["emb.lora_A"]),
                               adapted.base_model.model.emb.lora_embedding_A["default"].detach())
    ours = copy.deepcopy(plain)  # the same folder on our adapters gives the same slot weights
    with torch.no_grad():
        apply_lora(ours, ["emb", "proj"], rank=3, alpha=6)
        ours.emb.lora_A.copy_(adapted.base_model.model.emb.lora_embedding_A["default"])
        ours.emb.lora_B.copy_(adapted.base_model.model.emb.lora_embedding_B["default"])
    np.testing.assert_allclose(adapter_params(ours)["emb.lora_B"], own["emb.lora_B"], rtol=1e-6)
    g = optimize(captured, "fused", slots=slots)
    emb = next(s for s in graph_slots(g) if s.module == "emb")
    assert (emb.kind, emb.in_dims, emb.out) == ("embedding", (VOCAB,), DIM)
    ids = _ids()
    out = next(iter(g.outputs))
    feeds = {"ids": ids.numpy()}
    if slots == "mixed":
        stacks = stack_adapters(graph_slots(g), [own])
        feeds.update(stacks, adapter_index=np.array([0, -1, 0], np.int64))
        with torch.no_grad():
            want = torch.cat([adapted(ids[:1]), plain(ids[1:2]), adapted(ids[2:])]).numpy()
    else:
        feeds.update(own)
        want = adapted(ids).detach().numpy()
    for backend in ("numpy", "onnxruntime", "torchscript"):
        got = compile(g, backend)(feeds)[out]
        np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=1e-5, atol=1e-5, err_msg=backend)
    if slots == "swappable":  # no adapter: the plain model
        np.testing.assert_allclose(compile(g, "onnxruntime")({"ids": ids.numpy()})[out], plain(ids).detach().numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_export_graph_refuses_an_embedding_whose_forward_it_does_not_know() -> None:
    class Shifted(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) + 1

    g = Graph("emb")
    with pytest.raises(AdapterError, match=r"module 'emb': export_graph knows nn.Embedding's forward, not Shifted's"):
        LoRAAdapter(Shifted(VOCAB, DIM), 3, module_name="emb").export_graph(g, g.input("ids", ("b",), "int64"))
