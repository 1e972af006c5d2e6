"""Encoder-decoder capture: the encoder graph (cross-attention keys and values) and the decoder graph with its cache,
run by the numpy interpreter against eager transformers + PEFT, step by step."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.errors import GraphError  # noqa: E402
from flora_graph.frontend.seq2seq_lm import capture_seq2seq, seq2seq_layout  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402
from tests.serving.seq2seq_package import TARGETS, build  # noqa: E402


def _adapted(kind: str):
    """``kind``'s tiny model with PEFT LoRA (rank 4, nonzero ``B``) on every projection of both stacks."""
    model = build(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.get(
            kind, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])))
    gen = torch.Generator().manual_seed(0)
    for mod in adapted.modules():
        if hasattr(mod, "lora_B"):
            for k in mod.lora_B:
                mod.lora_B[k].weight.data.normal_(0, 0.3, generator=gen)
    return adapted.eval()


@pytest.mark.parametrize("kind", ["t5", "bart", "whisper"])
def test_encoder_and_decoder_graphs_match_eager_step_by_step(kind: str) -> None:
    """A padded batch encoded once; the decoder run on three tokens at once from an empty cache, then on one token
    a step from that cache: every step's logits are eager's for the whole decoder sequence (numpy interpreter)."""
    model = _adapted(kind)
    layout = seq2seq_layout(model)
    encoder, decoder = capture_seq2seq(model)
    def adapted(graph) -> set[str]:
        return {n.meta["module"] for n in graph.nodes if n.meta.get("role") == "lora_down"}

    cross_kv = {m for m in adapted(encoder) if f".{m}".count(".decoder.")}  # PEFT's layers came out as tagged LoRA patterns
    assert cross_kv and all(m.rsplit(".", 1)[1] in ("k", "v", "k_proj", "v_proj") for m in cross_kv)
    assert adapted(decoder) and not cross_kv & adapted(decoder)  # cross keys/values projected in the encoder only
    batch = 3
    if layout.main_input == "input_ids":
        ids = torch.randint(3, 100, (batch, 6), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(batch, 6, dtype=torch.int64)
        mask[1, 4:], mask[2, 2:] = 0, 0
        enc_in = {"input_ids": ids, "attention_mask": mask}
    else:
        enc_in = {"input_features": torch.randn(batch, *layout.feature_shape, generator=torch.Generator().manual_seed(1))}
    dec_ids = torch.randint(3, 100, (batch, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(**enc_in, decoder_input_ids=dec_ids).logits.numpy()
    run_enc, run_dec = compile(encoder, "numpy"), compile(decoder, "numpy")
    cross = run_enc({k: v.numpy() for k, v in enc_in.items()})
    assert list(cross) == layout.cross_names()
    empty = np.zeros((batch, layout.heads, 0, layout.head_dim), np.float32)
    own = {n: empty for n in layout.present_names()}
    pos = 0
    for width in (3, 1, 1, 1):
        feeds = {"input_ids": dec_ids[:, pos:pos + width].numpy()}
        if layout.encoder_mask:
            feeds["encoder_attention_mask"] = enc_in["attention_mask"].numpy()
        for i in range(layout.layers):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.decoder.{k}"] = own[f"present.{i}.decoder.{k}"]
                feeds[f"past_key_values.{i}.encoder.{k}"] = cross[f"present.{i}.encoder.{k}"]
        out = run_dec(feeds)
        np.testing.assert_allclose(out["logits"], want[:, pos:pos + width], rtol=1e-4, atol=2e-5)
        own = {n: out[n] for n in layout.present_names()}
        pos += width
        assert own["present.0.decoder.key"].shape == (batch, layout.heads, pos, layout.head_dim)


def test_a_decoder_only_model_is_refused_naming_it() -> None:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(GraphError, match="GPT2LMHeadModel: not a transformers encoder-decoder model"):
        seq2seq_layout(transformers.GPT2LMHeadModel(cfg))
