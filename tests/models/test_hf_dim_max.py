"""Upper bounds on dynamic dims: ``capture(..., dim_max=...)`` -> ``Graph.dim_max`` -> graph files -> torch-export.

BERT slices a learned position table (and a ``token_type_ids`` buffer) by the sequence
length, so ``torch.export`` needs ``"seq" <= max_position_embeddings``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from flora_graph.errors import GraphError, RuntimeInputError
from flora_graph.frontend import capture
from flora_graph.ir import Graph, Op
from flora_graph.runtimes import compile
from tests.models.test_hf_peft_parity import MAX_POS, TOL, bert_model, token_feeds

DYN = {"input_ids": {0: "batch", 1: "seq"}}


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return bert_model().eval()


def test_bert_needs_a_bound_and_capture_applies_the_one_torch_export_suggests(bert) -> None:
    g = capture(bert, token_feeds(2, 8, 0, False), DYN)  # torch.export: "Suggested fixes: seq = Dim('seq', max=64)"
    assert g.dim_max == {"seq": MAX_POS}
    x = token_feeds(3, 11, 1, False)
    with torch.no_grad():
        want = bert(**x)[0].numpy()
    np.testing.assert_allclose(compile(g, "numpy")(**x)["output_0"], want, atol=TOL, rtol=TOL)
    with pytest.raises(RuntimeInputError, match=rf"past its maximum {MAX_POS}"):
        compile(g, "numpy")(**token_feeds(1, MAX_POS + 1, 0, False))


def test_bounds_that_leave_no_size_are_refused_before_export(bert) -> None:
    with pytest.raises(GraphError, match=r"dim_min\['seq'\] = 65 is above dim_max\['seq'\] = 64"):
        capture(bert, token_feeds(2, 8, 0, False), DYN, dim_max={"seq": MAX_POS}, dim_min={"seq": MAX_POS + 1})


def test_dim_max_names_must_be_dynamic_dims_and_sizes_at_least_two(bert) -> None:
    with pytest.raises(GraphError, match=r"dim_max names \['sequence'\]"):
        capture(bert, token_feeds(2, 8, 0, False), DYN, dim_max={"sequence": MAX_POS})
    with pytest.raises(GraphError, match=r"dim_max\['seq'\] = 1"):
        capture(bert, token_feeds(2, 8, 0, False), DYN, dim_max={"seq": 1})


def test_bounded_bert_runs_on_torch_export_within_its_range_and_refuses_beyond(bert, tmp_path) -> None:
    g = capture(bert, token_feeds(2, 8, 0, False), DYN, dim_max={"seq": MAX_POS})
    assert g.dim_max == {"seq": MAX_POS}
    g.save(tmp_path / "g")
    loaded = Graph.load(tmp_path / "g")
    assert loaded.dim_max == {"seq": MAX_POS}
    exe = compile(loaded, "torch-export")
    for k, (b, s) in enumerate(((1, 5), (3, MAX_POS))):
        x = token_feeds(b, s, k + 1, False)
        with torch.no_grad():
            want = bert(**x)[0].numpy()
        np.testing.assert_allclose(exe(**x)["output_0"], want, atol=TOL, rtol=TOL, err_msg=f"at {(b, s)}")
    with pytest.raises(RuntimeInputError, match=rf"sizes \d\.\.{MAX_POS}"):
        exe(**token_feeds(1, MAX_POS + 1, 0, False))


def _tiny_graph() -> Graph:
    g = Graph("tiny")
    x = g.input("x", ["batch", "seq", 4])
    w = g.const("w", np.ones((3, 4), dtype=np.float32))
    g.set_output("y", g.add(Op.LINEAR, [x, w]))
    return g


def test_dim_max_round_trips_and_files_without_it_still_load(tmp_path) -> None:
    g = _tiny_graph()
    g.save(tmp_path / "plain")
    assert "dim_max" not in json.loads((tmp_path / "plain" / "graph.json").read_text())  # unchanged format
    assert Graph.load(tmp_path / "plain").dim_max == {}
    g.dim_max = {"seq": 16}
    assert g.copy().dim_max == {"seq": 16}
    g.save(tmp_path / "bounded")
    assert Graph.load(tmp_path / "bounded").dim_max == {"seq": 16}


@pytest.mark.parametrize("bad", [{"seq": 0}, {"seq": "16"}, {"seq": True}, ["seq", 16]])
def test_bad_dim_max_in_a_file_is_a_graph_error(tmp_path, bad) -> None:
    g = _tiny_graph()
    g.dim_max = {"seq": 16}
    g.save(tmp_path / "g")
    path = tmp_path / "g" / "graph.json"
    doc = json.loads(path.read_text())
    doc["dim_max"] = bad
    path.write_text(json.dumps(doc))
    with pytest.raises(GraphError, match="dim_max"):
        Graph.load(tmp_path / "g")


def test_torch_export_backend_honours_a_bound_on_a_hand_built_graph() -> None:
    g = _tiny_graph()
    g.dim_max = {"seq": 6}
    exe = compile(g, "torch-export")
    assert exe(x=np.ones((2, 6, 4), np.float32))["y"].shape == (2, 6, 3)
    with pytest.raises(RuntimeInputError, match=r"sizes \d\.\.6"):
        exe(x=np.ones((2, 7, 4), np.float32))


def test_a_guard_without_a_suggested_bound_gets_the_range_torch_export_infers() -> None:
    """OpenAI GPT slices its position ids by the sequence length and guards ``seq != n_positions``, for which
    torch.export suggests no bound: capture lets it infer the range (as torch.onnx does), which keeps the
    bound given, and the graph matches eager up to it."""
    torch.manual_seed(0)
    cfg = transformers.OpenAIGPTConfig(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=MAX_POS)
    model = transformers.OpenAIGPTLMHeadModel(cfg).eval()
    with pytest.raises(Exception, match=r"Constraints violated \(seq\)"):  # what the named dims alone give
        torch.export.export(model, (), {"input_ids": torch.randint(0, 64, (2, 8))}, strict=False,
                            dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"),
                                                          1: torch.export.Dim("seq", max=MAX_POS)}})
    g = capture(model, {"input_ids": torch.randint(0, 64, (2, 8))}, DYN, dim_max={"seq": MAX_POS})
    assert g.dim_max == {"seq": MAX_POS}
    exe = compile(g, "onnxruntime")
    for batch, seq in [(1, 5), (3, MAX_POS - 1), (2, MAX_POS)]:
        x = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = model(input_ids=x).logits.numpy()
        np.testing.assert_allclose(exe(input_ids=x.numpy())["output"], want, atol=TOL, rtol=TOL)
    with pytest.raises(RuntimeInputError, match=rf"past its maximum {MAX_POS}"):
        compile(g, "numpy")(input_ids=np.zeros((1, MAX_POS + 1), np.int64))


class _PerPosition(torch.nn.Module):
    """A loop over the positions: torch.export fixes the sequence length to the example's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, i] * (i + 1) for i in range(x.shape[1])], dim=1)


def test_a_dim_the_code_fixes_is_refused_naming_it() -> None:
    with pytest.raises(GraphError, match=r"_PerPosition: its code fixes seq = 6 \(the example's size\)"):
        capture(_PerPosition(), torch.randn(2, 6), {"x": {0: "batch", 1: "seq"}})
