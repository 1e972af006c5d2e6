"""Rows picked by a bool mask (``x[mask]``, a count the data decides) captured as every row, the picked first
(:mod:`flora_graph.frontend.selected_rows`): per-token paths written back by the same mask against eager torch on
every backend, with none, some and all rows picked; the reads that would mix the rows refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flora_graph.errors import UnsupportedOpError
from flora_graph.frontend import capture
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile


class TokenPaths(nn.Module):
    """As Higgs Audio v2's decoder layer: the tokens a mask picks through one norm and MLP, the others through
    another, each put back in place (``masked_scatter``, then ``+=`` through ``index_put``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm_a, self.norm_b = nn.LayerNorm(8), nn.RMSNorm(8)
        self.mlp_a = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
        self.mlp_b = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids == 3) | (ids == 5)
        h = x.masked_scatter(mask.unsqueeze(-1), self.norm_a(x[mask]))
        h = h.masked_scatter(~mask.unsqueeze(-1), self.norm_b(h[~mask]))
        h = h * 2
        h[mask] += self.mlp_a(h[mask]).view(-1, 2, 4).flatten(1)
        h[~mask] += self.mlp_b(h[~mask])
        return h


def _inputs(ids: list[list[int]]) -> dict[str, torch.Tensor]:
    t = torch.tensor(ids)
    return {"x": torch.randn(*t.shape, 8, generator=torch.Generator().manual_seed(t.numel())), "ids": t}


@pytest.fixture(scope="module")
def graph():
    model = TokenPaths().eval()
    return model, capture(model, _inputs([[1, 3, 4, 5], [5, 2, 3, 1]]), {"x": {0: "batch", 1: "seq"},
                                                                         "ids": {0: "batch", 1: "seq"}})


@pytest.mark.parametrize("ids", [[[1, 3, 5, 2, 5], [3, 3, 4, 0, 1]], [[1, 2], [4, 0]], [[3, 5, 3]]],
                         ids=["some", "none", "all"])
def test_picked_rows_put_back_match_eager_on_every_backend(graph, ids) -> None:
    model, g = graph
    feeds = _inputs(ids)
    with torch.no_grad():
        want = model(**feeds).numpy()
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    np.testing.assert_allclose(next(iter(run(g, np_feeds).values())), want, rtol=1e-5, atol=1e-5)
    for backend in ("onnxruntime", "torchscript"):
        got = next(iter(compile(g, backend)(**np_feeds).values()))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=backend)


class SumsPicked(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x + x[ids == 3].sum(0)  # mixes the picked rows: their padding would count


class ReturnsPicked(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x[ids == 3] * 2  # as many rows as the data decides


class PutsBackElsewhere(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x.masked_scatter((ids == 4).unsqueeze(-1), x[ids == 3] * 2)  # another mask's places


@pytest.mark.parametrize(("model", "match"), [(SumsPicked(), "rows then read by sum"),
                                              (ReturnsPicked(), "rows picked by a bool mask"),
                                              (PutsBackElsewhere(), "by another mask")])
def test_reads_that_mix_the_picked_rows_are_refused(model: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedOpError, match=match):
        capture(model, _inputs([[1, 3, 4, 5], [5, 2, 3, 1]]), {"x": {0: "batch", 1: "seq"}, "ids": {0: "batch", 1: "seq"}})


def test_higgs_audio_v2_routes_audio_and_text_tokens_as_eager(tmp_path) -> None:
    """Higgs Audio v2's model with audio tokens in its vocabulary (the checkpoints' ids are past a small one) and
    inputs holding some: exported as torch.onnx exports it, against eager on ONNX Runtime."""
    transformers = pytest.importorskip("transformers")
    from flora_graph.model_export import export_model

    cfg = transformers.HiggsAudioV2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=256, audio_token_id=3, audio_delay_token_id=5,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.HiggsAudioV2Model(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    report = export_model(tmp_path / "base", tmp_path / "model.onnx")
    assert report.ok, report.max_abs_diff
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.tensor([[1, 3, 3, 7, 5, 9], [4, 5, 3, 3, 8, 2]])
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state.numpy()
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
