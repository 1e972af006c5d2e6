"""Mamba-1 layers (Mamba, Falcon-Mamba, Jamba) captured with their cache: the selective scan as one ``LinearScan``;
the swaps of recurrent layers' functions while capturing (``traceable_scans``).

transformers' own cached path of these layers is the reference where it is right: a prefill from an empty
cache and a one-token decode step from any state. With a state and several new tokens it restarts the scan
from zero (its own TODO says so), so a prompt taken in two pieces is checked against eager's prefill of the
whole prompt instead, which is what the pieces must add up to.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.frontend.causal_lm import CausalLMWithPast, cache_layout, example_inputs  # noqa: E402
from flora_graph.frontend.selective_scan import SCAN_FORWARD, scan_forward  # noqa: E402
from flora_graph.frontend.traceable import traceable_scans  # noqa: E402
from flora_graph.ir import Op  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402

from .test_causal_lm import _feed, captured_with_eager, tiny_causal_lm  # noqa: E402

ARCHS = ["MambaForCausalLM", pytest.param("FalconMambaForCausalLM", marks=pytest.mark.slow),
         pytest.param("JambaForCausalLM", marks=pytest.mark.slow)]
MAMBA_LAYERS = {"MambaForCausalLM": 2, "FalconMambaForCausalLM": 2, "JambaForCausalLM": 2}


def _zero_states(x: dict, layout) -> dict:
    """``x`` with every recurrent state zero: an empty cache (keys and values of ``past = 0`` are empty already)."""
    kinds = [kind for _, kind in layout.entries()]
    return {**x, "past_key_values": [torch.zeros_like(t) if k not in ("key", "value") else t
                                     for k, t in zip(kinds, x["past_key_values"], strict=True)]}


def _piece(ids: torch.Tensor, start: int, past: list[torch.Tensor], layout) -> dict:
    """Inputs for the tokens ``ids[:, start:]`` after ``start`` cached ones (no padding)."""
    batch, total = ids.shape
    x = {"input_ids": ids[:, start:].contiguous(), "attention_mask": torch.ones(batch, total, dtype=torch.int64)}
    if layout.takes_position_ids:
        x["position_ids"] = torch.arange(start, total).expand(batch, -1).contiguous()
    x["past_key_values"] = past
    return x


@pytest.mark.parametrize("arch", ARCHS)
def test_a_mamba_1_model_prefills_decodes_and_continues_in_pieces_as_eager(arch: str) -> None:
    graph, layout, wrapper, names = captured_with_eager(arch)
    assert sum(n.op is Op.LINEAR_SCAN for n in graph.live_nodes()) == MAMBA_LAYERS[arch]
    assert graph.inputs[0].shape == ("batch", "seq")  # no length fixed to the example's
    assert {st.kind for st in layout.states} == {"conv", "recurrent"}
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = wrapper(**_zero_states(_piece(ids, 0, example_inputs(layout, 128, 2, 13, 0)["past_key_values"],
                                              layout), layout))
    for backend in ("numpy", "onnxruntime", "torchscript"):
        exe = compile(graph, backend)
        # a prefill from an empty cache with a left-padded row, and one decode step from random states
        for batch, seq, past, pad in [(2, 5, 0, 2), (3, 1, 6, 3)]:
            x = example_inputs(layout, 128, batch, seq, past, seed=batch, left_pad=pad)
            x = _zero_states(x, layout) if past == 0 else x
            with torch.no_grad():
                want = wrapper(**x)
            got = exe(_feed(x, layout))
            for i, n in enumerate(names):
                np.testing.assert_allclose(got[n], want[i].numpy(), atol=2e-5, rtol=1e-4, err_msg=f"{backend} {n}")
        # 13 tokens as 4 then 9: the second piece starts from the first's states, as one prefill of all 13 does
        first = _zero_states(_piece(ids[:, :4], 0, example_inputs(layout, 128, 2, 4, 0)["past_key_values"], layout),
                             layout)
        out = exe(_feed(first, layout))
        second = _piece(ids, 4, [torch.from_numpy(np.asarray(out[n])) for n in layout.present_names()], layout)
        got = exe(_feed(second, layout))
        np.testing.assert_allclose(got["logits"], whole[0][:, 4:].numpy(), atol=2e-5, rtol=1e-4, err_msg=backend)
        for i, n in enumerate(layout.present_names(), start=1):
            np.testing.assert_allclose(got[n], whole[i].numpy(), atol=2e-5, rtol=1e-4, err_msg=f"{backend} {n}")


def test_the_scan_is_swapped_only_while_capturing_and_only_in_mamba_1_models() -> None:
    mamba, llama = tiny_causal_lm("MambaForCausalLM"), tiny_causal_lm("LlamaForCausalLM")
    module = sys.modules[type(mamba).__module__]
    own = getattr(module, SCAN_FORWARD)
    with traceable_scans(llama) as switched:
        assert switched == []
    with traceable_scans(mamba) as switched:
        assert switched == [f"{module.__name__}.{SCAN_FORWARD}"] and getattr(module, SCAN_FORWARD) is scan_forward
    assert getattr(module, SCAN_FORWARD) is own
    with pytest.raises(RuntimeError), traceable_scans(mamba):
        raise RuntimeError("inside")
    assert getattr(module, SCAN_FORWARD) is own
    qwen = tiny_causal_lm("Qwen3_5ForCausalLM")  # both gated delta rule functions, each by its own parameters
    name = type(qwen).__module__
    with traceable_scans(qwen) as switched:
        assert switched == [f"{name}.torch_chunk_gated_delta_rule", f"{name}.torch_recurrent_gated_delta_rule"]


def test_the_swapped_scan_equals_transformers_where_transformers_is_right() -> None:
    """In eager: a prefill from an empty cache and a decode step from a state give transformers' own values."""
    model = tiny_causal_lm("MambaForCausalLM")
    layout = cache_layout(model)
    wrapper = CausalLMWithPast(model, layout)
    for batch, seq, past in [(2, 7, 0), (2, 1, 5)]:
        x = example_inputs(layout, 128, batch, seq, past, seed=3, left_pad=2)
        x = _zero_states(x, layout) if past == 0 else x
        with torch.no_grad():
            want = wrapper(**x)
            with traceable_scans(model):
                got = wrapper(**x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def _zamba():
    from tests.serving.test_causal_lm_families import small_model

    return small_model("ZambaForCausalLM")  # a Mamba layer of 2 heads, then a hybrid layer


def test_zambas_multi_head_mixer_swapped_equals_transformers_prefill_and_decode() -> None:
    """transformers' Zamba mixer scans from zeros for several tokens and steps from the cached state for one; the
    swap scans from the cached state for any number, so it must equal both where they are right."""
    from flora_graph.frontend.selective_scan import is_multi_head_mixer
    from flora_graph.frontend.traceable import traceable_modules

    model = _zamba()
    mixers = [m for m in model.modules() if is_multi_head_mixer(m)]
    assert len(mixers) == 2 and mixers[0].n_mamba_heads == 2
    ids, step = torch.arange(3, 17).reshape(2, 7), torch.tensor([[9], [4]])
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        want = model(input_ids=step, cache=first.past_key_values, use_cache=True).logits
        with traceable_modules(model) as swapped:
            assert len(swapped) == 2
            again = model(input_ids=ids, use_cache=True)
            got = model(input_ids=step, cache=again.past_key_values, use_cache=True).logits
    assert not any("forward" in vars(m) for m in mixers)  # restored
    np.testing.assert_allclose(again.logits.numpy(), first.logits.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)


def test_zamba_package_decodes_left_padded_rows_as_eager(tmp_path) -> None:
    from tests.serving.genai_package import assert_padded_rows_decode_as_eager

    assert_padded_rows_decode_as_eager(_zamba(), tmp_path)
