"""Output and input names of captured models (``frontend.model_outputs``), for containers torch's pytree
knows only without key functions (as diffusers registers its ``BaseOutput``), and outputs named as inputs."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from flora_graph.frontend import capture
from flora_graph.frontend.model_outputs import leaf_keys, output_names, output_tensors
from flora_graph.runtimes.executable import compile
from flora_graph.runtimes.reference import run


class Output(OrderedDict):
    """A dict-like output registered the way diffusers registers ``BaseOutput``: no key function."""


pytree.register_pytree_node(Output, lambda o: (list(o.values()), list(o.keys())),
                            lambda values, keys: Output(zip(keys, values, strict=True)))


class Denoiser(nn.Module):
    """Takes ``sample`` and returns ``Output(sample=..., noise=(a, b))``, as a diffusion UNet returns ``sample``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, sample: torch.Tensor, cond: dict[str, torch.Tensor]) -> Output:
        h = self.proj(sample) * cond["scale"]
        return Output(sample=h + cond["shift"], noise=(h.relu(), h.sigmoid()))


def _cond(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(scale=torch.randn(1, 1, 8, generator=gen), shift=torch.randn(1, 1, 8, generator=gen))


def test_leaf_keys_of_a_type_without_key_function() -> None:
    value = Output(a=torch.zeros(1), b=[torch.ones(1), Output(c=torch.zeros(2))])
    try:  # what the fallback is for: torch cannot name this type's leaves itself
        pytree.tree_flatten_with_path(value)
        raise AssertionError("tree_flatten_with_path named the leaves of a type without a key function")
    except ValueError:
        pass
    keys = leaf_keys(value)
    assert [k for k, _ in keys] == [["a"], ["b", "0"], ["b", "1", "c"]]
    assert [leaf for _, leaf in keys] == pytree.tree_leaves(value)  # the same leaves, in torch's order
    assert leaf_keys((torch.zeros(1), {"x": torch.ones(1)}))[1][0] == ["1", "x"]  # the keyed path as before


def test_an_output_named_as_an_input_is_renamed() -> None:
    out = Output(sample=torch.zeros(1), noise=(torch.zeros(1), torch.zeros(1)))
    assert output_names(out) == ["sample", "noise.0", "noise.1"]
    assert output_names(out, ["sample", "cond"]) == ["out_sample", "noise.0", "noise.1"]
    assert output_names(out, ["sample", "out_sample"]) == ["out_out_sample", "noise.0", "noise.1"]
    assert output_names(torch.zeros(1), ["output"]) == ["out_output"]
    both = Output(sample=torch.zeros(1), out_sample=torch.zeros(1))  # a renamed output meets an output's own name
    assert output_names(both, ["sample"]) == ["out_sample", "out_out_sample"]


def test_capture_names_inputs_and_outputs_of_such_types() -> None:
    """The output ``sample``, inside a keyless container, is ``out_sample`` (the inputs inside a dict are named by
    their keys), and the ONNX model (one graph cannot hold two values named ``sample``) runs in ONNX Runtime as eager."""
    model = Denoiser().eval()
    example = {"sample": torch.randn(2, 5, 8), "cond": _cond(0)}
    names = output_names(model(**example), example)
    graph = capture(model, example, {"sample": {0: "batch", 1: "seq"}}, output_names=names)
    assert [i.name for i in graph.inputs] == ["sample", "cond.scale", "cond.shift"]
    assert [o for o in graph.outputs] == ["out_sample", "noise.0", "noise.1"]
    ort = compile(graph, "onnxruntime")
    for batch, seq in ((1, 3), (3, 7)):
        sample, cond = torch.randn(batch, seq, 8, generator=torch.Generator().manual_seed(seq)), _cond(seq)
        feeds = {"sample": sample.numpy(), "cond.scale": cond["scale"].numpy(), "cond.shift": cond["shift"].numpy()}
        with torch.no_grad():
            want = [t.numpy() for t in output_tensors(model(sample, cond))]
        for got in (ort(**feeds), run(graph, feeds)):
            assert list(got) == names
            for g, w in zip(got.values(), want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_numbers_among_the_inputs_are_not_graph_inputs() -> None:
    """A model taking sizes as numbers beside its tensors (LTX-Video's ``num_frames, height, width``): the
    numbers are constants of the graph, and the tensors keep their own names."""
    class Video(nn.Module):
        def forward(self, hidden: torch.Tensor, frames: int, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return hidden.reshape(hidden.shape[0], frames, -1).mean(1) * scale + text.sum(1)

    model = Video()
    example = {"hidden": torch.zeros(2, 6, 4), "frames": 3, "text": torch.zeros(2, 5, 8), "scale": 0.5}
    graph = capture(model, example, {"hidden": {0: "batch"}, "text": {0: "batch", 1: "seq"}})
    assert [i.name for i in graph.inputs] == ["hidden", "text"]
    gen = torch.Generator().manual_seed(3)
    hidden, text = torch.randn(3, 6, 4, generator=gen), torch.randn(3, 7, 8, generator=gen)
    want = model(hidden, 3, text, 0.5).numpy()
    np.testing.assert_allclose(run(graph, {"hidden": hidden.numpy(), "text": text.numpy()})["output"], want,
                               rtol=1e-5, atol=1e-6)


def test_numbers_among_the_outputs_are_not_graph_outputs() -> None:
    """A model returning sizes beside its tensors (MaskFormer's Swin returns each stage's spatial size, a static and
    a dynamic one here): the names name the tensors, and the graph's outputs are those tensors, as eager's."""
    class Stages(nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            h = x.relu()
            return {"last": h * 2, "sizes": ((x.shape[1], x.shape[2]), (4, 2)), "pooled": h.mean(1)}

    model = Stages()
    example = {"x": torch.randn(2, 5, 4)}
    names = output_names(model(**example), example)
    assert names == ["last", "pooled"]
    graph = capture(model, example, {"x": {0: "batch", 1: "seq"}}, output_names=names)
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(1))
    got = compile(graph, "onnxruntime")(x=x.numpy())
    assert list(got) == names
    np.testing.assert_allclose(got["last"], model(x)["last"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["pooled"], model(x)["pooled"].numpy(), rtol=1e-5, atol=1e-6)
