"""Capture a Hugging Face encoder-decoder model (T5, BART, Marian, Pegasus, Whisper, ...) for generation with a cache.

Two graphs, named as Optimum names the ONNX models of a sequence-to-sequence generation:

* the **encoder**: ``input_ids [batch, enc_seq]`` and ``attention_mask [batch, enc_seq]`` (or a speech model's
  ``input_features [batch, mel_bins, frames]``) in; out, for every decoder layer, the cross-attention's keys and
  values of the encoder's states, ``present.{i}.encoder.key`` / ``.value [batch, heads, enc_seq', head_dim]``: the
  decoder layers' key/value projections of the cross-attention run once per input, in the encoder graph, not once
  per generated token;
* the **decoder**, one graph for the first step (``past_seq = 0``) and every later one: ``input_ids [batch, seq]``
  (the decoder's tokens), ``encoder_attention_mask [batch, enc_seq]`` (where the model reads one), and per layer
  ``past_key_values.{i}.decoder.key`` / ``.value [batch, heads, past_seq, head_dim]`` (its self-attention's cache)
  and ``past_key_values.{i}.encoder.key`` / ``.value`` (the encoder graph's outputs) in; ``logits [batch, seq,
  vocab]`` and ``present.{i}.decoder.key`` / ``.value [batch, heads, past_seq+seq, head_dim]`` out.

The rows of a batch share the decoder's positions (every row starts from the decoder's start token, as
transformers' ``generate`` runs an encoder-decoder model), so the decoder needs no mask of its own; the encoder's
padding is the encoder mask's business.

Both are captured through the model's own forward (a flat-cache stand-in for the block, so module paths, and the
adapter slots named after them, stay the model's own): the decoder's runs on an ``EncoderDecoderCache`` whose
cross-attention part is marked filled, so each layer reads its keys and values from the inputs; the encoder's
runs the encoder and then one decoder step on an empty cache, keeping only the cross-attention keys and values
that step stores (the rest of it is dead code the passes remove). PEFT LoRA layers come out tagged as usual.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flora_graph.errors import GraphError
from flora_graph.frontend.capture import capture
from flora_graph.frontend.layer_stamp import StampError, capture_stamped, check_by_value, plan_layers, stamped_or_none
from flora_graph.ir import Graph

_log = logging.getLogger(__name__)

__all__ = ["Seq2SeqLayout", "capture_seq2seq", "seq2seq_layout"]


@dataclass(frozen=True)
class Seq2SeqLayout:
    """The caches of an encoder-decoder model: ``layers`` decoder layers, each with self-attention keys and values
    ``[batch, heads, past_seq, head_dim]`` and cross-attention keys and values ``[batch, cross_heads, enc_seq',
    cross_head_dim]``. ``main_input``: ``"input_ids"`` (text, with ``attention_mask``), ``"input_features"`` or
    ``"input_values"`` (speech: a row's shape is ``feature_shape``, ``None`` where it is free: Whisper's fixed
    ``[mel_bins, frames]``, Speech2Text's ``[frames, features]``, Moonshine's samples), or ``"pixel_values"`` (a
    vision encoder-decoder's images, TrOCR's and Donut's: ``[channels, height, width]`` at the encoder's image
    size). ``encoder_mask``: whether the decoder reads the encoder's mask (only text inputs are padded)."""

    layers: int
    heads: int
    head_dim: int
    cross_heads: int
    cross_head_dim: int
    main_input: str = "input_ids"
    encoder_mask: bool = True
    feature_shape: tuple[int | None, ...] = ()

    def encoder_inputs(self) -> list[str]:
        """The encoder graph's inputs."""
        return [self.main_input, "attention_mask"] if self.main_input == "input_ids" else [self.main_input]

    def cross_names(self) -> list[str]:
        """The encoder graph's outputs: ``present.{i}.encoder.key`` / ``.value``."""
        return [f"present.{i}.encoder.{k}" for i in range(self.layers) for k in ("key", "value")]

    def past_names(self) -> list[str]:
        """The decoder's cache inputs, per layer: ``past_key_values.{i}.decoder.key`` / ``.value``, then
        ``past_key_values.{i}.encoder.key`` / ``.value``."""
        return [f"past_key_values.{i}.{part}.{k}" for i in range(self.layers)
                for part in ("decoder", "encoder") for k in ("key", "value")]

    def present_names(self) -> list[str]:
        """The decoder's cache outputs: ``present.{i}.decoder.key`` / ``.value``."""
        return [f"present.{i}.decoder.{k}" for i in range(self.layers) for k in ("key", "value")]

    def decoder_inputs(self) -> list[str]:
        """The decoder graph's inputs, in order."""
        return ["input_ids", *(["encoder_attention_mask"] if self.encoder_mask else []), *self.past_names()]


def _base(model: nn.Module) -> nn.Module:
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def _caches(out: Any) -> Any:
    cache = getattr(out, "past_key_values", None)
    return getattr(out, "cache", None) if cache is None else cache


def vocab_size(config: Any, side: str, default: int = 256) -> int:
    """The vocabulary of the encoder's input ids (``side="encoder"``) or of the decoder's logits (``"decoder"``): a
    composite config's own side (``EncoderDecoderModel``'s, T5Gemma's), FSMT's source or target one, else the
    model's one (``default`` where the config names none)."""
    own = {"encoder": "src_vocab_size", "decoder": "tgt_vocab_size"}[side]
    for v in (getattr(getattr(config, side, None), "vocab_size", None), getattr(config, own, None),
              getattr(config, "vocab_size", None)):
        if isinstance(v, int) and v > 0:
            return v
    return default


def _encoder_example(base: nn.Module, *, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, str]]]:
    """Two rows of the encoder's inputs and their dynamic dims: token ids and a mask (the first row padded), or a
    speech model's features or samples as :func:`~flora_graph.frontend.signal_inputs.signal_inputs` builds them."""
    main = getattr(base, "main_input_name", "input_ids")
    if main != "input_ids":
        from flora_graph.frontend.signal_inputs import signal_inputs

        built = signal_inputs(base.config, type(base).__name__, main)
        if built is None:
            raise GraphError(f"{type(base).__name__}: its encoder's {main!r} has no example input this capture can "
                             "build from the config")
        return built[0], built[1]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size(base.config, "encoder"), (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[0, 6:] = 0  # the first row padded
    return {"input_ids": ids, "attention_mask": mask}, {"input_ids": {0: "batch", 1: "enc_seq"},
                                                        "attention_mask": {0: "batch", 1: "enc_seq"}}


def _encoded(base: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """The encoder's output on ``inputs`` (its own output type, which the model's forward takes back)."""
    return base.get_encoder()(**inputs)


def _without_compute(base: nn.Module, run: Any, inputs: dict[str, torch.Tensor]) -> Any:
    """``run(inputs)`` on fake tensors (shapes and types, no arithmetic: a speech encoder's window of 1,500 positions
    costs seconds eagerly), or eagerly where fake tensors cannot run it (data-dependent shapes); a module attribute
    the fake run set (a cache of positions some layers keep) gets its old value back."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def fake(v: Any) -> bool:
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else (v,)
        return any(isinstance(x, FakeTensor) for x in items)

    before = [(m, dict(vars(m)), dict(m._buffers), dict(m._parameters)) for m in base.modules()]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            return run({k: mode.from_tensor(v) for k, v in inputs.items()})
    except Exception:
        pass
    finally:
        for m, attrs, buffers, params in before:
            if any(fake(v) for v in (*vars(m).values(), *m._buffers.values(), *m._parameters.values())):
                vars(m).clear()
                vars(m).update(attrs)
                m._buffers.clear()
                m._buffers.update(buffers)
                m._parameters.clear()
                m._parameters.update(params)
    with torch.no_grad():
        return run(inputs)


def _start_ids(base: nn.Module, batch: int, seq: int) -> torch.Tensor:
    start = getattr(base.config, "decoder_start_token_id", None)
    return torch.full((batch, seq), int(start) if isinstance(start, int) else 0, dtype=torch.int64)


def seq2seq_layout(model: nn.Module) -> Seq2SeqLayout:
    """The cache layout of a transformers encoder-decoder model (or a PeftModel of one), read off the
    ``EncoderDecoderCache`` of one eager step.

    Raises :class:`GraphError` naming the model when it is not an encoder-decoder model with such a cache.
    """
    base = _base(model)
    name = type(base).__name__
    if not getattr(getattr(base, "config", None), "is_encoder_decoder", False) or not callable(
            getattr(base, "get_encoder", None)):
        raise GraphError(f"{name}: not a transformers encoder-decoder model (config.is_encoder_decoder, "
                         "get_encoder())")
    main = getattr(base, "main_input_name", "input_ids")
    if main not in ("input_ids", "input_features", "input_values", "pixel_values"):
        raise GraphError(f"{name}: its encoder takes {main!r}; encoder-decoder generation is captured for models "
                         "that take input_ids, input_features, input_values or pixel_values")
    inputs, dims = _encoder_example(base)
    inputs = {k: v[:1] for k, v in inputs.items()}

    def step(x: dict[str, torch.Tensor]) -> Any:
        return base(encoder_outputs=_encoded(base, x), attention_mask=x.get("attention_mask"),
                    decoder_input_ids=_start_ids(base, 1, 2), use_cache=True)

    try:  # only the cache's shapes are read
        out = _without_compute(base, step, inputs)
    except Exception as exc:
        raise GraphError(f"{name}: one eager step failed ({type(exc).__name__}: {exc})") from exc
    cache = _caches(out)
    if cache is None or not hasattr(cache, "cross_attention_cache"):
        raise GraphError(f"{name}: its decoder returns no EncoderDecoderCache ({type(cache).__name__}), so its "
                         "cross-attention keys and values cannot be carried between steps")
    selfc, cross = cache.self_attention_cache, cache.cross_attention_cache
    layers = len(selfc.layers)
    if not layers or len(cross.layers) != layers:
        raise GraphError(f"{name}: {layers} self-attention and {len(cross.layers)} cross-attention cache layers")
    k, ck = selfc.layers[0].keys, cross.layers[0].keys
    for i in range(layers):
        if (selfc.layers[i].keys.shape[1:2] + selfc.layers[i].keys.shape[3:] != k.shape[1:2] + k.shape[3:]
                or cross.layers[i].keys.shape[1:2] + cross.layers[i].keys.shape[3:] != ck.shape[1:2] + ck.shape[3:]):
            raise GraphError(f"{name}: decoder layer {i}'s cache differs in heads or width from layer 0's")
    takes_mask = main == "input_ids" and "attention_mask" in inspect.signature(base.forward).parameters
    features = () if main == "input_ids" else tuple(
        None if i in dims[main] else int(d) for i, d in enumerate(inputs[main].shape) if i > 0)
    return Seq2SeqLayout(layers, int(k.shape[1]), int(k.shape[3]), int(ck.shape[1]), int(ck.shape[3]),
                         main, takes_mask, features)


def _cache(layout: Seq2SeqLayout, past: list[torch.Tensor]) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    own, cross = DynamicCache(), DynamicCache()
    for i in range(layout.layers):
        own.update(past[4 * i], past[4 * i + 1], i)
        cross.update(past[4 * i + 2], past[4 * i + 3], i)
    cache = EncoderDecoderCache(own, cross)
    for i in range(layout.layers):
        cache.is_updated[i] = True  # each layer reads its cross-attention keys and values from the cache
    return cache


def _cache_arg(base: nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decoder_forward(base: nn.Module, layout: Seq2SeqLayout):
    """``base``'s forward as the decoder graph: ``f(input_ids, encoder_attention_mask=None, past_key_values=[...])``
    returns ``(logits, present self keys and values...)`` (:meth:`Seq2SeqLayout.present_names` order)."""
    forward = type(base).forward.__get__(base)
    arg = _cache_arg(base)
    example, _ = _encoder_example(base)
    # the encoder's own output type, which the decoder may read more than the states of
    sample = _without_compute(base, lambda x: _encoded(base, x), {k: v[:1] for k, v in example.items()})
    encoded, hidden = type(sample), int(sample.last_hidden_state.shape[-1])  # the encoder's width (T5Gemma: its own)

    def run(input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None,
            past_key_values: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        past = list(past_key_values or [])
        cache = _cache(layout, past)
        ck = past[2]  # the encoder's states are read only for their shape once the cross cache is filled
        # (made from the cache's sizes alone, not from layer 0's keys: the layers read them, and a stamped layer
        # reads its own layer's cache only)
        states = encoded(last_hidden_state=torch.zeros(ck.shape[0], ck.shape[2], hidden, dtype=ck.dtype,
                                                       device=ck.device))
        kwargs: dict[str, Any] = {"decoder_input_ids": input_ids, "encoder_outputs": states, arg: cache,
                                  "use_cache": True}
        if encoder_attention_mask is not None:
            kwargs["attention_mask"] = encoder_attention_mask
        out = forward(**kwargs)
        own = _caches(out).self_attention_cache
        flat = [out.logits]
        for i in range(layout.layers):
            flat += [own.layers[i].keys, own.layers[i].values]
        return tuple(flat)

    return run


def encoder_forward(base: nn.Module, layout: Seq2SeqLayout):
    """``base``'s forward as the encoder graph: the encoder's inputs in, every decoder layer's cross-attention keys
    and values out (:meth:`Seq2SeqLayout.cross_names` order)."""
    from transformers import DynamicCache, EncoderDecoderCache

    forward = type(base).forward.__get__(base)
    arg = _cache_arg(base)

    def cross(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        main = inputs[layout.main_input]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = torch.zeros(main.shape[0], 1, dtype=torch.int64, device=main.device)
        out = forward(encoder_outputs=_encoded(base, inputs), attention_mask=inputs.get("attention_mask"),
                      decoder_input_ids=start, **{arg: cache}, use_cache=True)
        kv = _caches(out).cross_attention_cache
        flat: list[torch.Tensor] = []
        for i in range(layout.layers):  # a decoder cut to its first layers (for the stamping) fills fewer: the last
            layer = kv.layers[min(i, len(kv.layers) - 1)]  # one stands in until the stamped layers replace it
            flat += [layer.keys, layer.values]
        return tuple(flat)

    if layout.main_input == "input_features":
        def features(input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return cross({"input_features": input_features})

        return features
    if layout.main_input == "input_values":
        def samples(input_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return cross({"input_values": input_values})

        return samples
    if layout.main_input == "pixel_values":
        def pixels(pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return cross({"pixel_values": pixel_values})

        return pixels

    def text(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return cross({"input_ids": input_ids, "attention_mask": attention_mask})

    return text


@contextlib.contextmanager
def _forward_as(base: nn.Module, run: Any) -> Iterator[None]:
    base.forward = run
    try:
        yield
    finally:
        del base.forward


def decoder_layers(base: nn.Module, layout: Seq2SeqLayout) -> str:
    """The module path of ``base``'s decoder layer list (the one ``nn.ModuleList`` of ``layout.layers`` layers in its
    decoder: ``model.decoder.layers``, T5's ``decoder.block``); :class:`StampError` where there is not one."""
    get = getattr(base, "get_decoder", None)
    decoder = get() if callable(get) else None
    where = next((path for path, m in base.named_modules() if m is decoder), None) if decoder is not None else None
    if where is None:
        raise StampError(f"{type(base).__name__}: no decoder module found (get_decoder())")
    found = [path for path, m in decoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) == layout.layers]
    if len(found) != 1:
        raise StampError(f"{len(found)} module lists of {layout.layers} layers in the decoder ({where})")
    return f"{where}.{found[0]}" if where else found[0]


def encoder_layers(base: nn.Module) -> str:
    """The module path of ``base``'s encoder layer list (the one outermost ``nn.ModuleList`` of more than one module
    in its encoder: ``model.encoder.layers``, T5's ``encoder.block``); :class:`StampError` where there is not one."""
    get = getattr(base, "get_encoder", None)
    encoder = get() if callable(get) else None
    where = next((path for path, m in base.named_modules() if m is encoder), None) if encoder is not None else None
    if where is None:
        raise StampError(f"{type(base).__name__}: no encoder module found (get_encoder())")
    lists = [path for path, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    outer = [p for p in lists if not any(p.startswith(f"{q}.") for q in lists)]
    if len(outer) != 1:
        raise StampError(f"{len(outer)} outermost layer lists in the encoder ({where})")
    return f"{where}.{outer[0]}" if where else outer[0]


def _check_decoder(graph: Graph, run: Any, layout: Seq2SeqLayout, cross_len: int, vocab: int,
                   out_names: list[str]) -> None:
    """Raise :class:`StampError` unless ``graph`` (a stamped decoder) computes, in the numpy reference backend, the
    logits and every layer's keys and values that the eager decoder (``run``, :func:`decoder_forward`'s) computes on a
    two-token step with a two-token past: the stamped layers past those traced are checked by value too."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (1, 2), generator=gen)
    shapes = [(layout.heads, 2, layout.head_dim)] * 2 + [(layout.cross_heads, cross_len, layout.cross_head_dim)] * 2
    past = [torch.randn(1, *shapes[j], generator=gen) for _ in range(layout.layers) for j in range(4)]
    mask = torch.ones(1, cross_len, dtype=torch.int64) if layout.encoder_mask else None
    feeds = {"input_ids": ids.numpy(), **({"encoder_attention_mask": mask.numpy()} if mask is not None else {}),
             **{n: t.numpy() for n, t in zip(layout.past_names(), past, strict=True)}}
    check_by_value(graph, feeds, lambda: run(ids, mask, past), out_names, "the stamped decoder")


def capture_seq2seq(model: nn.Module, *, name: str | None = None, share_weights: bool = False,
                    layout: Seq2SeqLayout | None = None, dim_max: dict[str, int] | None = None,
                    stamp_layers: bool = True) -> tuple[Graph, Graph]:
    """Capture ``model`` (a transformers encoder-decoder model, or a PeftModel of one) as its ``(encoder,
    decoder)`` graphs, named as the module docstring says.

    ``batch``, ``enc_seq``, ``seq`` and ``past_seq`` are dynamic (``dim_max`` may bound them: a learned position
    table bounds ``seq``/``enc_seq`` and ``past_seq+seq``); a speech encoder's input has the dims
    :func:`~flora_graph.frontend.signal_inputs.signal_inputs` gives it (Whisper's frames fixed, ``2 * max_source_positions``;
    Speech2Text's frames and Moonshine's samples dynamic, the cross-attention's length then the decoder's ``enc_seq``). ``share_weights``: the graphs' weights are views of the model's (see
    :func:`~flora_graph.frontend.capture`). ``layout``: the model's :func:`seq2seq_layout`, where the caller has it.
    ``stamp_layers``: the decoder graph traces its first decoder layers and copies their programs for the others
    (:mod:`~flora_graph.frontend.layer_stamp`, checked op by op against a traced layer and by value against the eager
    decoder; T5's later layers read the position biases its first layer computes, as their copies do), and a text
    model's encoder graph its first encoder layers and then its first decoder layers (checked against eager's
    cross-attention keys and values); a speech model's encoder graph, and any graph that cannot be stamped exactly, is
    traced whole; ``False``: every layer traced.

    Raises:
        GraphError: the model is not an encoder-decoder model, or torch.export fails on it.
        UnsupportedOpError: as :func:`~flora_graph.frontend.capture` does.
    """
    layout = seq2seq_layout(model) if layout is None else layout
    base = _base(model)
    title = name or type(base).__name__
    enc_inputs, enc_dims = _encoder_example(base)
    bounds = {k: v for k, v in (dim_max or {}).items() if k in ("enc_seq", "batch")}
    decoder_list = None  # planned once, stamped in both graphs
    if stamp_layers:
        try:
            decoder_list = plan_layers(base, decoder_layers(base, layout))
        except StampError as exc:
            _log.debug("%s: every decoder layer traced: %s", title, exc)
    encoder = None
    cross_names = layout.cross_names()
    run_encoder = encoder_forward(base, layout)
    with _forward_as(base, run_encoder):
        # a text encoder's layers stamped, then the decoder's (whose cross-attention projections the encoder graph
        # runs); a speech encoder's graph is traced whole: checking it by value would run its whole window, which
        # costs what the stamping saves
        if decoder_list is not None and layout.main_input == "input_ids":
            encoder = stamped_or_none(
                lambda: capture_stamped(model, enc_inputs, enc_dims, None, name=f"{title}.encoder",
                                        input_names=layout.encoder_inputs(), output_names=cross_names,
                                        dim_max=bounds or None, share_weights=share_weights, stack=decoder_list,
                                        uncached=[plan_layers(base, encoder_layers(base))]),
                lambda g: check_by_value(g, {k: v.numpy() for k, v in enc_inputs.items()},
                                         lambda: run_encoder(**enc_inputs), cross_names, "the stamped encoder"),
                f"{title}.encoder")
        if encoder is None:
            encoder = capture(model, enc_inputs, enc_dims, name=f"{title}.encoder", dim_max=bounds or None,
                              input_names=layout.encoder_inputs(), output_names=cross_names,
                              share_weights=share_weights)
    gen = torch.Generator().manual_seed(1)
    batch, seq, past = 2, 3, 5
    cross = encoder.outputs[layout.cross_names()[0]].shape[2]  # fixed where the encoder's input is (Whisper's)
    cross_len, cross_dim = (cross, None) if isinstance(cross, int) else (7, "enc_seq")
    inputs: dict[str, Any] = {"input_ids": torch.randint(0, vocab_size(base.config, "decoder"), (batch, seq),
                                                         generator=gen)}
    dims: dict[str, Any] = {"input_ids": {0: "batch", 1: "seq"}}
    if layout.encoder_mask:
        inputs["encoder_attention_mask"] = torch.ones(batch, cross_len, dtype=torch.int64)
        dims["encoder_attention_mask"] = {0: "batch", 1: "enc_seq"}
    shapes = [(layout.heads, past, layout.head_dim)] * 2 + [(layout.cross_heads, cross_len, layout.cross_head_dim)] * 2
    inputs["past_key_values"] = [torch.randn(batch, *shapes[j], generator=gen)
                                 for _ in range(layout.layers) for j in range(4)]
    dims["past_key_values"] = [{0: "batch", 2: "past_seq"} if j < 2 else
                               ({0: "batch", 2: cross_dim} if cross_dim else {0: "batch"})
                               for _ in range(layout.layers) for j in range(4)]
    out_names = ["logits", *layout.present_names()]
    decoder = None
    run = decoder_forward(base, layout)
    with _forward_as(base, run):
        if decoder_list is not None:  # the first decoder layers traced, the others stamped where that is exact
            decoder = stamped_or_none(
                lambda: capture_stamped(model, inputs, dims, None, name=f"{title}.decoder",
                                        input_names=layout.decoder_inputs(), output_names=out_names,
                                        dim_max=dim_max, share_weights=share_weights, stack=decoder_list),
                lambda g: _check_decoder(g, run, layout, cross_len, vocab_size(base.config, "decoder"), out_names),
                f"{title}.decoder")
        if decoder is None:
            decoder = capture(model, inputs, dims, name=f"{title}.decoder", dim_max=dim_max,
                              input_names=layout.decoder_inputs(), output_names=out_names,
                              share_weights=share_weights)
    return encoder, decoder
