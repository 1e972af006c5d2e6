"""LoRA on ``nn.Conv1d`` and on grouped convolutions (SqueezeBERT's attention and feed-forward layers are grouped 1-D
convolutions): PEFT's folders load onto :class:`LoRAAdapter` and match eager PEFT, the captured graph matches it on
every preset in ONNX Runtime, an ungrouped ``Conv1d`` adapter merges as PEFT merges it, and a grouped one refuses to
merge (its update mixes the groups) and stays a branch of its own in the merged preset."""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from torch import nn

from flora_graph.adapters import FloraAdapter, LoRAAdapter, adapters_of
from flora_graph.adapters.peft import load_peft_adapter
from flora_graph.errors import AdapterError
from flora_graph.frontend import capture
from flora_graph.passes import optimize
from flora_graph.runtimes import compile


class Convs(nn.Module):
    """A 1-D convolution stack over ``[batch, channels, length]``: ungrouped with ``same`` padding, strided, grouped
    in twos and fours, and a grouped 2-D convolution over the same values as an image."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv1d(4, 8, 3, padding="same")
        self.down = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.pair = nn.Conv1d(8, 8, 1, groups=2)
        self.quad = nn.Conv1d(8, 12, 3, padding=1, groups=4)
        self.img = nn.Conv2d(12, 8, 3, padding=1, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.quad(torch.relu(self.pair(self.down(self.pre(x)))))
        return self.img(h[:, :, None, :] * h[:, :, :, None]).mean(dim=(2, 3))


TARGETS = ["pre", "down", "pair", "quad", "img"]


def _folder(tmp_path, targets=TARGETS):
    torch.manual_seed(0)
    plain = Convs().eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    adapted = peft.get_peft_model(copy.deepcopy(plain), cfg).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    return plain, adapted


def _x(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, length, generator=torch.Generator().manual_seed(seed))


def test_a_peft_folder_of_conv1d_and_grouped_adapters_loads_and_matches_peft(tmp_path):
    plain, adapted = _folder(tmp_path)
    ours = copy.deepcopy(plain)
    assert sorted(load_peft_adapter(ours, tmp_path / "adapter")) == sorted(TARGETS)
    assert ours.quad.lora_B.shape == (12, 1, 1) and ours.img.lora_B.shape == (8, 1, 1, 1)  # r / groups
    with torch.no_grad():
        x = _x()
        want = adapted(x)
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)
        assert (want - plain(x)).abs().max() > 1e-2  # the adapters move the output


@pytest.mark.parametrize("preset", ["fused", "merged"])
def test_the_captured_graph_matches_peft_on_onnxruntime(tmp_path, preset):
    plain, adapted = _folder(tmp_path)
    ours = copy.deepcopy(plain)
    load_peft_adapter(ours, tmp_path / "adapter")
    graph = capture(ours, (_x(),), {"x": {0: "batch", 2: "length"}})
    run = compile(optimize(graph, preset, backend="onnxruntime"), "onnxruntime")
    for batch, length in ((1, 7), (3, 12)):
        x = _x(batch, length, seed=batch)
        with torch.no_grad():
            want = adapted(x).numpy()
        (got,) = run({"x": x.numpy()}).values()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_an_ungrouped_conv1d_adapter_merges_as_peft_merges_it(tmp_path):
    plain, adapted = _folder(tmp_path, ["pre", "down"])
    ours = copy.deepcopy(plain)
    load_peft_adapter(ours, tmp_path / "adapter")
    merged = adapted.merge_and_unload()
    for name in ("pre", "down"):
        torch.testing.assert_close(ours.get_submodule(name).merge_to_original_layer().weight,
                                   merged.get_submodule(name).weight, rtol=1e-5, atol=1e-6)


def test_a_grouped_adapter_does_not_merge_and_flora_refuses_one():
    adapter = LoRAAdapter(nn.Conv1d(8, 8, 3, groups=2), rank=4, module_name="pair")
    nn.init.normal_(adapter.lora_B)
    with pytest.raises(AdapterError, match=r"'pair'.*grouped convolution \(groups=2\).*does not merge"):
        adapter.merge_to_original_layer()
    with pytest.raises(AdapterError, match="multiple of the groups"):
        LoRAAdapter(nn.Conv1d(8, 8, 3, groups=4), rank=2)
    with pytest.raises(AdapterError, match="FloraAdapter on a grouped convolution"):
        FloraAdapter(nn.Conv1d(8, 8, 3, groups=2), rank=2)
    flora = FloraAdapter(nn.Conv1d(8, 8, 3), rank=2)  # an ungrouped one is a product B @ A
    assert adapters_of(nn.Sequential(flora)) and flora.delta_weight().shape == (8, 8, 3)
