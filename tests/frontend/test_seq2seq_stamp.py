"""Encoder-decoder decoders captured from their first layers, the others stamped: the graph of tracing every layer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.frontend import seq2seq_lm  # noqa: E402
from flora_graph.frontend.layer_stamp import StampError  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402
from tests.frontend.test_layer_stamp import kept, structure  # noqa: E402
from tests.serving.seq2seq_package import nonzero_b  # noqa: E402

SLOW = pytest.mark.slow
_E = dict(d_model=32, encoder_layers=7, decoder_layers=7, encoder_attention_heads=4, decoder_attention_heads=4,
          encoder_ffn_dim=64, decoder_ffn_dim=64)
_T = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=7, num_heads=4, decoder_start_token_id=0)
DEEP = {
    "bart": lambda: transformers.BartForConditionalGeneration(
        transformers.BartConfig(vocab_size=100, max_position_embeddings=64, **_E)),
    # every layer after the first adds the position biases the first computes (tensors of layer 0 read past layer 1)
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**_T)),
    "whisper": lambda: transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=100, num_mel_bins=8, max_source_positions=16, max_target_positions=64, pad_token_id=1,
        bos_token_id=2, eos_token_id=3, decoder_start_token_id=2, **_E)),
    "marian": lambda: transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=100, max_position_embeddings=64, pad_token_id=99, decoder_start_token_id=99, **_E)),
    # sparse (expert) and dense decoder layers in turn: two kinds of layer, a template each
    "switch": lambda: transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
        **_T, num_decoder_layers=7, num_experts=4, expert_capacity=8, encoder_sparse_step=2, decoder_sparse_step=2)),
}


def deep(kind: str):
    torch.manual_seed(0)
    return DEEP[kind]().eval()


def stamped_graphs(model, layout):
    """``model``'s ``(encoder, decoder)`` graphs captured with their layers stamped (a speech model's encoder graph
    traced whole); the :class:`StampError` where they cannot be (no other graph is traced whole)."""
    errors: list[Exception] = []
    real_stamped, real_check, real_by_value, real_capture = (
        seq2seq_lm.capture_stamped, seq2seq_lm._check_decoder, seq2seq_lm.check_by_value, seq2seq_lm.capture)
    text = layout.main_input == "input_ids"

    def refused(*args, **kwargs):
        if text or kwargs["name"].endswith(".decoder"):
            raise errors[0] if errors else AssertionError(f"{kwargs['name']} not stamped")
        return real_capture(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(seq2seq_lm, "capture_stamped", kept(real_stamped, errors))
        mp.setattr(seq2seq_lm, "_check_decoder", kept(real_check, errors))
        mp.setattr(seq2seq_lm, "check_by_value", kept(real_by_value, errors))
        mp.setattr(seq2seq_lm, "capture", refused)
        return seq2seq_lm.capture_seq2seq(model, layout=layout)


def decoder_feeds(layout, cross: int, seed: int = 0) -> tuple[dict, dict]:
    """A two-row, three-token step with a four-token past: the graph's feeds and the eager decoder's arguments."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 3), generator=gen)
    shapes = [(layout.heads, 4, layout.head_dim)] * 2 + [(layout.cross_heads, cross, layout.cross_head_dim)] * 2
    past = [torch.randn(2, *shapes[j % 4], generator=gen) for j in range(4 * layout.layers)]
    mask = torch.ones(2, cross, dtype=torch.int64) if layout.encoder_mask else None
    feeds = {"input_ids": ids.numpy(), **{n: t.numpy() for n, t in zip(layout.past_names(), past, strict=True)}}
    if mask is not None:
        feeds["encoder_attention_mask"] = mask.numpy()
    return feeds, {"input_ids": ids, "encoder_attention_mask": mask, "past_key_values": past}


# every kind runs in the slow run (each about 20 s); the default run checks stamping through its packages' exports,
# which compare every stamped layer with the traced one (tests/serving/seq2seq_package.py, test_a_deep_package_...)
@pytest.mark.parametrize("kind", [pytest.param("bart", marks=SLOW), pytest.param("t5", marks=SLOW),
                                  pytest.param("whisper", marks=SLOW),
                                  pytest.param("marian", marks=SLOW), pytest.param("switch", marks=SLOW)])
def test_stamped_graphs_are_the_graphs_of_tracing_every_layer(kind: str) -> None:
    """Seven encoder and seven decoder layers, three of each traced and four stamped (Switch Transformers: sparse and
    dense layers in turn, the first four traced); a text model's encoder graph stamps its encoder's layers and then
    its decoder's (whose cross-attention projections it runs), a speech model's is traced whole. Node for node the
    graphs of tracing every layer; the decoder gives eager's logits and every layer's keys and values in the numpy
    backend, the encoder eager's cross-attention keys and values."""
    model = deep(kind)
    layout = seq2seq_lm.seq2seq_layout(model)
    stamped_encoder, stamped = stamped_graphs(model, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder, traced = seq2seq_lm.capture_seq2seq(model, layout=layout, stamp_layers=False)
    assert structure(stamped, model) == structure(traced, model)
    assert structure(stamped_encoder, model) == structure(encoder, model)
    inputs, _ = seq2seq_lm._encoder_example(model)
    with torch.no_grad(), seq2seq_lm._forward_as(model, seq2seq_lm.encoder_forward(model, layout)):
        cross = model(**inputs)
    got = compile(stamped_encoder, "numpy")({k: v.numpy() for k, v in inputs.items()})
    for name, ref in zip(layout.cross_names(), cross, strict=True):
        np.testing.assert_allclose(got[name], ref.numpy(), atol=2e-5, rtol=1e-4, err_msg=name)
    cross_len = encoder.outputs[layout.cross_names()[0]].shape[2]
    feeds, args = decoder_feeds(layout, cross_len if isinstance(cross_len, int) else 5)
    got = compile(stamped, "numpy")(feeds)
    with torch.no_grad():
        want = seq2seq_lm.decoder_forward(model, layout)(**args)
    for name, ref in zip(["logits", *layout.present_names()], want, strict=True):
        np.testing.assert_allclose(got[name], ref.numpy(), atol=2e-5, rtol=1e-4, err_msg=name)


def test_the_decoder_layer_list_is_found_in_the_decoder() -> None:
    """The decoder's own layer list, though the encoder's is as long; none where the decoder has another count."""
    model = transformers.BartForConditionalGeneration(
        transformers.BartConfig(vocab_size=100, max_position_embeddings=64, **{**_E, "encoder_layers": 7})).eval()
    layout = seq2seq_lm.seq2seq_layout(model)
    assert seq2seq_lm.decoder_layers(model, layout) == "model.decoder.layers"
    assert seq2seq_lm.decoder_layers(deep("t5"), seq2seq_lm.seq2seq_layout(deep("t5"))) == "decoder.block"
    with pytest.raises(StampError, match="0 module lists of 5 layers in the decoder"):
        seq2seq_lm.decoder_layers(model, type(layout)(5, layout.heads, layout.head_dim, layout.cross_heads,
                                                      layout.cross_head_dim))


@SLOW
def test_a_stamped_decoder_that_differs_from_eager_is_traced_whole(monkeypatch) -> None:
    """A later decoder layer handed another layer's weights (which nothing in the layers' signatures shows) fails the
    check against eager, and the decoder is traced whole: its graph the full trace's."""
    model = deep("bart")
    layout = seq2seq_lm.seq2seq_layout(model)
    real = seq2seq_lm.capture_stamped

    def wrong_weights(*args, **kwargs):
        graph = real(*args, **kwargs)
        if kwargs["name"].endswith(".decoder"):
            src, dst = "model.decoder.layers.4.fc1.weight", "model.decoder.layers.5.fc1.weight"
            graph.params[dst] = graph.params[src]
        return graph

    monkeypatch.setattr(seq2seq_lm, "capture_stamped", wrong_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, got = seq2seq_lm.capture_seq2seq(model, layout=layout)
        _, traced = seq2seq_lm.capture_seq2seq(model, layout=layout, stamp_layers=False)
    assert structure(got, model) == structure(traced, model)


@pytest.mark.parametrize("kind", ["bart", pytest.param("t5", marks=SLOW)])
def test_a_deep_package_generates_eager_peft_tokens(kind: str, tmp_path: Path) -> None:
    """A package of seven encoder and decoder layers with an all-linear adapter, both graphs stamped (a full trace
    refused):
    greedy tokens of the base and the adapter, alone and in one mixed batch, equal eager transformers + PEFT."""
    import peft

    from flora_graph.serving.seq2seq import Seq2SeqGenerator, export_seq2seq

    model = deep(kind)
    model.save_pretrained(tmp_path / "base")
    adapted = peft.get_peft_model(deep(kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    nonzero_b(adapted)
    adapted.save_pretrained(tmp_path / "ad")

    def refused(*args, **kwargs):
        raise AssertionError(f"{kwargs['name']} was traced whole")

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(seq2seq_lm, "capture", refused)
        export_seq2seq(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"})
    served = Seq2SeqGenerator(tmp_path / "pkg")
    prompts = [[5, 9, 33, 70, 12], [7, 3, 44, 8, 10]]
    ids = torch.tensor(prompts)
    want = {}
    for name, eager in ((None, model), ("ad", adapted.eval())):
        with torch.no_grad():
            out = eager.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 min_new_tokens=10, do_sample=False, num_beams=1)
        want[name] = [row[1:].tolist() for row in out]
        assert served.generate(prompts, adapters=name, max_new_tokens=10, min_new_tokens=10, num_beams=1) == want[name]
    assert want["ad"] != want[None]
    mixed = served.generate(prompts, adapters=["ad", None], max_new_tokens=10, min_new_tokens=10, num_beams=1)
    assert mixed == [want["ad"][0], want[None][1]]


@SLOW
def test_cli_trace_every_layer_reaches_an_encoder_decoder_export(tmp_path: Path, monkeypatch, capsys) -> None:
    """``flora-graph export --task text2text-generation-with-past --trace-every-layer`` traces the decoder whole (the
    stamping never asked for), the default stamps it; a plain file export refuses the flag, exit status 2."""
    from flora_graph.cli import main

    deep("bart").save_pretrained(tmp_path / "base")
    asked: list[bool] = []
    real = seq2seq_lm.capture_seq2seq

    def spy(*args, **kwargs):
        asked.append(kwargs["stamp_layers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(seq2seq_lm, "capture_seq2seq", spy)
    for flags in (["--trace-every-layer"], []):
        assert main(["export", str(tmp_path / "base"), "--task", "text2text-generation-with-past", "--out",
                     str(tmp_path / f"pkg{len(flags)}"), *flags]) == 0
    assert asked == [False, True]
    capsys.readouterr()
    assert main(["export", str(tmp_path / "base"), "--out", str(tmp_path / "m.onnx"), "--trace-every-layer"]) == 2
    assert "--trace-every-layer goes with a generation package" in capsys.readouterr().err


def test_probes_run_on_fake_tensors_and_leave_no_fake_state() -> None:
    """``_without_compute`` gives eager's output type and shapes without computing; a module that caches a tensor
    as it runs gets its old value back (no fake tensor left on it), and one whose shapes depend on its data runs
    eagerly."""
    from torch._subclasses.fake_tensor import FakeTensor

    class Caching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.cached = None
            self.register_buffer("steps", torch.zeros(1))

        def forward(self, x):
            self.cached = [x * 2]
            self.steps = self.steps + 1
            return self.lin(x)

    class Selecting(torch.nn.Module):
        def forward(self, x):
            return x[x > 0]

    m = Caching()
    out = seq2seq_lm._without_compute(m, lambda d: m(d["x"]), {"x": torch.randn(2, 4)})
    assert isinstance(out, FakeTensor) and tuple(out.shape) == (2, 3)
    assert m.cached is None and not isinstance(m.steps, FakeTensor) and float(m.steps) == 0.0
    x = torch.tensor([1.0, -1.0, 2.0])
    sel = Selecting()
    got = seq2seq_lm._without_compute(sel, lambda d: sel(d["x"]), {"x": x})
    assert not isinstance(got, FakeTensor) and got.tolist() == [1.0, 2.0]
