"""``broadcast_masks``: transformers' masks built with ``torch.vmap`` (a model's own mask function) are built by
broadcasting while capturing: the same masks, and a graph without vmap's batching ops."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import masking_utils  # noqa: E402

from flora_graph.frontend.traceable import broadcast_masks  # noqa: E402


def _window(size: int):
    """T5Gemma 2's bidirectional sliding window: a mask function of the model's own."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        dist = q_idx - kv_idx
        return ((dist >= 0) & (dist < (size + 1) // 2)) | ((dist < 0) & (-dist < size // 2 + 1))

    return inner


def test_the_broadcast_mask_equals_the_vmap_one_and_the_patch_is_undone() -> None:
    padding = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    fn = masking_utils.and_masks(masking_utils.bidirectional_mask_function, _window(3))
    kwargs = dict(batch_size=2, q_length=7, kv_length=7, mask_function=fn, attention_mask=padding)
    want = masking_utils.sdpa_mask(**kwargs, use_vmap=True)
    own = masking_utils.sdpa_mask
    with broadcast_masks() as patched:
        assert patched and masking_utils.AttentionMaskInterface._global_mapping["sdpa"] is not own
        got = masking_utils.sdpa_mask(**kwargs, use_vmap=True)
        traced = torch.export.export(_Masked(), (padding,), strict=False)
    assert masking_utils.sdpa_mask is own and masking_utils.AttentionMaskInterface._global_mapping["sdpa"] is own
    assert torch.equal(got, want) and not want.all() and want.any()
    ops = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert not any("vmap" in op or "batch_dim" in op for op in ops), ops


class _Masked(torch.nn.Module):
    def forward(self, padding: torch.Tensor) -> torch.Tensor:
        return masking_utils.sdpa_mask(batch_size=2, q_length=7, kv_length=7, attention_mask=padding, use_vmap=True,
                                       mask_function=masking_utils.and_masks(masking_utils.bidirectional_mask_function,
                                                                             _window(3)))
