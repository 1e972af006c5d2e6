"""The built-in Llama-style decoder: capture with dynamic batch and sequence, every preset on every backend.

One LoRA-adapted decoder (nonzero ``B`` on all seven projections) is captured once; each
preset (unfused, fused, merged) is compiled for each backend and must give the eager
logits within 1e-4 at two (batch, seq) shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flora_graph.adapters import adapters_of
from flora_graph.frontend import capture
from flora_graph.ir import Graph, Op, verify
from flora_graph.models import DecoderConfig, build_decoder, byte_tokenize
from flora_graph.models.decoder import BOS, DECODER_PROJECTIONS
from flora_graph.passes import find_lora, optimize
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile

TOL = 1e-4
SHAPES = ((1, 5), (3, 17))
DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}}
BACKENDS = ("numpy", "onnxruntime", "torchscript", "torch-export")
PRESETS = ("unfused", "fused", "merged")


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 259, (batch, seq), generator=torch.Generator().manual_seed(seed))


def eager(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


@pytest.fixture(scope="module")
def lora_decoder() -> tuple[torch.nn.Module, dict[str, Graph]]:
    model = build_decoder(lora_rank=4, seed=0)
    g = capture(model, {"input_ids": ids(2, 8)}, DYNAMIC)
    return model, {p: optimize(g, p) for p in PRESETS}


def test_build_decoder_applies_lora_with_nonzero_b() -> None:
    model = build_decoder(lora_rank=2)
    found = adapters_of(model)
    assert len(found) == 7 * model.config.layers
    assert {path.rsplit(".", 1)[1] for path in found} == set(DECODER_PROJECTIONS)
    assert all(a.lora_B.abs().sum() > 0 for a in found.values())
    assert not adapters_of(build_decoder())


def test_captured_graph_keeps_batch_and_seq_dynamic(lora_decoder) -> None:
    _, graphs = lora_decoder
    g = graphs["unfused"]
    verify(g)
    assert [(i.name, i.shape, i.dtype) for i in g.inputs] == [("input_ids", ("batch", "seq"), "int64")]
    assert g.outputs["output"].shape == ("batch", "seq", 259)
    ops = {n.op for n in g.nodes}
    assert {Op.GATHER, Op.ARANGE, Op.COS, Op.SIN, Op.SDPA, Op.RSQRT, Op.REDUCE_MEAN, Op.EXPAND} <= ops
    assert len(list(find_lora(g))) == 14  # every adapter is recognised through the new ops around it
    assert not list(find_lora(graphs["merged"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_every_backend_matches_eager(lora_decoder, preset: str, backend: str) -> None:
    model, graphs = lora_decoder
    exe = compile(graphs[preset], backend)
    low = getattr(exe, "dim_min", 0)
    shapes = [s for s in SHAPES if min(s) >= low]
    assert len(shapes) == 2, f"torch-export range starts at {low}"
    for k, (b, s) in enumerate(shapes):
        x = ids(b, s, seed=k + 1)
        got = exe(input_ids=x)["output"]
        assert got.shape == (b, s, 259) and got.dtype == np.float32
        np.testing.assert_allclose(got, eager(model, x), atol=TOL, rtol=TOL, err_msg=f"{preset} on {backend} at {(b, s)}")


def test_tied_plain_decoder_and_bytes() -> None:
    cfg = DecoderConfig(layers=1, tie_embeddings=True, kv_heads=4)
    model = build_decoder(cfg, seed=3)
    assert model.lm_head.weight is model.embed_tokens.weight
    g = capture(model, {"input_ids": ids(2, 6)}, DYNAMIC)
    assert len([p for p in g.params if "embed_tokens" in p or "lm_head" in p]) == 1  # one weight for both uses
    x = byte_tokenize("Flora, héllo!")
    assert x.dtype == torch.int64 and x.shape == (1, 1 + len("Flora, héllo!".encode())) and x[0, 0] == BOS
    np.testing.assert_allclose(run(g, {"input_ids": x})["output"], eager(model, x), atol=TOL, rtol=TOL)


def test_config_is_checked_and_max_seq_enforced_eagerly() -> None:
    with pytest.raises(ValueError, match="divide"):
        DecoderConfig(hidden=64, heads=5)
    with pytest.raises(ValueError, match="divide"):
        DecoderConfig(heads=4, kv_heads=3)
    model = build_decoder(DecoderConfig(layers=1, max_seq=8))
    with pytest.raises(ValueError, match="max_seq=8"):
        model(ids(1, 9))
