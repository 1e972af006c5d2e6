"""Longformer's and LED's windowed attention as one masked attention (``flora_graph.frontend.windowed_attention``):
equal to transformers' chunked form on lengths that are and are not whole windows, padded rows, and rows with
different numbers of global tokens; a Longformer question-answering head exports from its folder with a PEFT adapter,
its ``global_attention_mask`` an input, and runs in ONNX Runtime as eager PEFT at other lengths and other counts of
global tokens a row, where torch.export and torch.onnx refuse the chunked form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.frontend.traceable import traceable_modules  # noqa: E402
from flora_graph.frontend.windowed_attention import is_windowed_attention  # noqa: E402
from flora_graph.model_export import export_model, load_model  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=80, attention_window=4, pad_token_id=1, bos_token_id=0, eos_token_id=2,
             sep_token_id=2, initializer_range=0.2)


def _inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Ids, a mask whose second row is right-padded by 3, and global tokens: the first of every row, two more in the
    first row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, -3:] = 0
    glob = torch.zeros(batch, seq, dtype=torch.int64)
    glob[:, 0] = 1
    glob[0, [2, seq - 2]] = 1
    return {"input_ids": ids, "attention_mask": mask, "global_attention_mask": glob}


@pytest.mark.parametrize("seq", [7, 8, 13])
def test_the_masked_form_equals_the_chunked_one(seq: int) -> None:
    torch.manual_seed(0)
    model = transformers.LongformerModel(transformers.LongformerConfig(**SMALL)).eval()
    x = _inputs(3, seq, seed=seq)
    with torch.no_grad():
        want = model(**x).last_hidden_state
        with traceable_modules(model) as swapped:
            got = model(**x).last_hidden_state
    assert not any({"forward", "_pad_to_window_size"} & set(vars(m)) for m in model.modules())  # restored
    assert sum(is_windowed_attention(m) for m in model.modules()) == 2
    assert any(p.endswith("attention.self") for p in swapped) and "" in swapped  # the attention, the padding
    keep = x["attention_mask"].bool()  # padding positions' states are arbitrary in both
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_leds_encoder_takes_the_masked_form_too() -> None:
    torch.manual_seed(0)
    config = transformers.LEDConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_encoder_position_embeddings=64,
                                    max_decoder_position_embeddings=64, attention_window=4, init_std=0.2)
    encoder = transformers.LEDForConditionalGeneration(config).eval().get_encoder()
    x = _inputs(3, 11, seed=2)
    with torch.no_grad():
        want = encoder(**x).last_hidden_state
        with traceable_modules(encoder):
            got = encoder(**x).last_hidden_state
    keep = x["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_a_question_answering_head_exports_and_runs_as_eager_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LongformerConfig(**{**SMALL, "num_hidden_layers": 1})
    model = transformers.LongformerForQuestionAnswering(config).eval()
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=["query", "value", "query_global"])).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    report = export_model(tmp_path / "base", tmp_path / "m.onnx", adapter=tmp_path / "adapter", attention_mask=True)
    assert report.ok, report.max_abs_diff
    assert "global_attention_mask" in load_model(tmp_path / "base", attention_mask=True).example_inputs
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for seq in (9, 16):
        x = _inputs(3, seq, seed=seq)
        x["token_type_ids"] = torch.zeros_like(x["input_ids"])
        got = sess.run(None, {n: x[n].numpy() for n in names})
        with torch.no_grad():
            out = adapted(**{k: v for k, v in x.items() if k != "token_type_ids"})
        keep = x["attention_mask"].bool().numpy()
        for g, w in zip(got, (out.start_logits, out.end_logits), strict=True):
            np.testing.assert_allclose(g[keep], w.numpy()[keep], rtol=1e-4, atol=1e-5)
