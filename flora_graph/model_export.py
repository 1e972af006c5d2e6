"""End-to-end export: a model (+ optional PEFT adapter folder) -> optimized ONNX / TorchScript / pt2.

The route users take today is PEFT merge + ``torch.onnx.export``; this one captures the
adapted model once with ``torch.export``, optimizes it (``merged`` bakes the adapters in,
``fused`` keeps them swappable) and lowers it, then checks the artifact against eager
torch on a fresh input shape and reports the largest difference.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora_graph import quantized_checkpoints
from flora_graph.errors import AdapterError, FloraGraphError, ModelFolderError
from flora_graph.frontend import capture, max_abs_diff, output_tensors
from flora_graph.frontend.causal_lm import scan_chunk
from flora_graph.frontend.model_outputs import output_names, set_use_cache
from flora_graph.frontend.sentence_embedding import SentenceEmbedding, sentence_modules, transformer_folder
from flora_graph.frontend.seq2seq_lm import vocab_size
from flora_graph.frontend.signal_inputs import signal_inputs
from flora_graph.frontend.token_extras import PAIRINGS, paired_layout, token_extras
from flora_graph.passes import PRESETS, optimize
from flora_graph.runtimes import compile

__all__ = [
    "PARITY_TOLERANCE",
    "SUFFIX",
    "ExportReport",
    "ModelFolderError",
    "ModelSpec",
    "check_adapter_folder",
    "check_model_folder",
    "export_model",
    "load_model",
    "quantized_checkpoint",
]

SUFFIX = {"onnxruntime": ".onnx", "torchscript": ".pt", "torch-export": ".pt2"}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
"""Weight files of a model folder that are pickles: never loaded (a pickle runs code when read)."""


def quantized_checkpoint(config: dict[str, Any]) -> str | None:
    """How the checkpoint of a model folder's ``config`` (its ``config.json``, read) is quantized, as a phrase for
    messages (``"a bitsandbytes 4-bit (nf4) checkpoint"``), or ``None`` for a float one (no
    ``quantization_config``)."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = q.get("quant_method")
    if method == "bitsandbytes":
        bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else "quantized"
        kind = f" ({q.get('bnb_4bit_quant_type')})" if q.get("load_in_4bit") and q.get("bnb_4bit_quant_type") else ""
        return f"a bitsandbytes {bits}{kind} checkpoint"
    if method in ("gptq", "awq"):
        return f"{'an AWQ' if method == 'awq' else 'a GPTQ'} {q.get('bits', 4)}-bit checkpoint"
    if method == "compressed-tensors":
        return f"a compressed-tensors checkpoint ({q.get('format', 'no format')})"
    if method == "fp8":
        blocks = q.get("weight_block_size")
        return "an FP8 checkpoint" + (f" (scales per {blocks[0]}x{blocks[1]} block)" if isinstance(blocks, list)
                                      and len(blocks) == 2 else "")
    if not isinstance(method, str) or not method:
        return "a quantized checkpoint of an unnamed method (quantization_config has no quant_method)"
    return f"a {method} checkpoint"


@dataclass
class ModelSpec:
    """A model with what capturing it needs: example inputs, named dynamic dims (with upper
    bounds in ``dim_max`` where the model has them), a fresh test input."""

    model: nn.Module
    example_inputs: dict[str, torch.Tensor]
    dynamic_dims: dict[str, dict[int, str]]
    check_inputs: dict[str, torch.Tensor]
    name: str
    dim_max: dict[str, int] = field(default_factory=dict)
    output_names: list[str] | None = None  # a transformers model's: logits, last_hidden_state, pooler_output, ...
    adapter_root: str = ""  # the submodule a PEFT adapter installs on (a sentence-transformers pipeline's model)


PARITY_TOLERANCE = 1e-4
""":func:`export_model`'s check: the largest difference from eager torch over every output, at most this much of the
largest reference value (of 1 where every value is smaller)."""


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and measured."""

    path: Path
    backend: str
    preset: str
    summary: str
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    max_abs_diff: float = float("nan")
    tolerance: float = PARITY_TOLERANCE  # of the largest reference value, where that is above 1 (a depth map's metres)

    @property
    def ok(self) -> bool:
        """Whether the artifact matched eager torch within ``tolerance``."""
        return self.max_abs_diff <= self.tolerance


def _token_inputs(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)}


def _hf_inputs(vocab: int, batch: int, seq: int, seed: int, mask: bool, types: bool = False) -> dict[str, torch.Tensor]:
    out = _token_inputs(vocab, batch, seq, seed)
    if mask:
        m = torch.ones(batch, seq, dtype=torch.int64)
        m[0, : min(2, seq - 1)] = 0  # left padding in the first row
        out["attention_mask"] = m
    if types:
        t = torch.zeros(batch, seq, dtype=torch.int64)
        t[:, seq // 2:] = 1  # a second segment
        out["token_type_ids"] = t
    return out


def load_model(source: str | Path | None = None, *, lora_rank: int | None = 8,
               attention_mask: bool = False) -> ModelSpec:
    """``None``/``"default"``: the built-in small decoder (with LoRA of ``lora_rank`` on every
    projection, nonzero ``B``, unless ``None``); ``"demo-cnn"``: the CNN+MLP demo; a folder with
    ``config.json`` + safetensors: a transformers model built from it (no download).

    A transformers model is loaded in float32 with ``use_cache=False`` (outputs without a
    key/value cache); an image, video or audio model takes what
    :func:`~flora_graph.frontend.signal_inputs.signal_inputs` builds (where the model refuses it, the other layout of
    its audio: ``[batch, 1, samples]``, features ``[batch, features, frames]``; see :func:`_other_layout`), a
    token model ``input_ids`` (``[batch, seq]``, both dynamic; Perceiver's text models too, whose main input
    ``inputs`` takes them by that name; Perceiver's image classifiers take their pixels as ``inputs``), plus an
    ``attention_mask`` of the same shape when ``attention_mask`` is true or the model is an encoder-decoder one (the
    check input pads its first row) and, for an encoder with segment embeddings (BERT), ``token_type_ids``; an
    encoder-decoder model (T5, BART, Whisper, ...) takes ``decoder_input_ids`` ``[batch, dec_seq]`` too; a document,
    web page, table or vision-and-language model the inputs it reads beside its ids (word boxes ``bbox``, MarkupLM's
    XPaths, TAPAS' cell coordinates, LXMERT's regions; a contrastive text-and-image model's images, counted by a dim
    ``images`` of their own: :func:`~flora_graph.frontend.token_extras.token_extras`; a text-prompted detection or
    segmentation head's images, its texts laid out as it reads them, each image's queries ``[images*queries, seq]``
    or one text each: :func:`~flora_graph.frontend.token_extras.paired_layout`). A model whose main input is its
    image and whose texts are optional (SAM 3) takes its texts too where ``attention_mask`` is asked for, or where the
    image alone does not run.
    Its outputs are named as transformers names them (``logits``, ``last_hidden_state``,
    ``pooler_output``: ``spec.output_names``). A multiple-choice head (``BertForMultipleChoice``) takes each token
    input as ``[batch, choices, seq]``, all three dynamic. Where the config has ``max_position_embeddings`` (BERT, GPT-2,
    Llama), ``"seq"`` is bounded by it (``dim_max``): BERT and GPT-2 slice a learned position
    table by the sequence length, which ``torch.export`` accepts only under a bound.

    Raises :class:`ModelFolderError` for a folder it cannot use (see :func:`check_model_folder`;
    pickle weights are never loaded).
    """
    if source in (None, "default"):
        from flora_graph.models.decoder import build_decoder

        model = build_decoder(lora_rank=lora_rank)
        vocab = model.config.vocab_size
        return ModelSpec(model.eval(), _token_inputs(vocab, 2, 8, 0), {"input_ids": {0: "batch", 1: "seq"}},
                         _token_inputs(vocab, 3, 11, 1), "decoder")
    if source == "demo-cnn":
        from flora_graph.models import build_demo_model, demo_inputs

        return ModelSpec(build_demo_model(), demo_inputs(2), {"image": {0: "batch"}}, demo_inputs(3, seed=1), "demo")
    weights = transformer_folder(source)  # a sentence-transformers folder: its transformer's (often the folder itself)
    model = load_transformers(weights or source)
    arch, config = type(model).__name__, model.config
    set_use_cache(model, False)  # logits only: no key/value cache outputs (capture drops them too)
    if weights is not None:  # the whole pipeline, pooling included, which reads the attention mask
        return _token_spec(SentenceEmbedding(model, sentence_modules(source)), f"SentenceEmbedding_{arch}", True,
                           adapter_root="model")
    main = getattr(model, "main_input_name", "input_ids")
    if main == "inputs" and "input_ids" in inspect.signature(model.forward).parameters:
        main = "input_ids"  # Perceiver's text models: a generic input that takes token ids by that name too
    ids = inspect.signature(model.forward).parameters.get("input_ids")
    if main != "input_ids" and ids is not None and (ids.default is inspect.Parameter.empty or attention_mask):
        # a signal model that requires texts too (VideoPrism's CLIP, BLIP-2's retrieval), or that takes them and is
        # asked for their mask (SAM 3's prompts): texts lead
        main = "input_ids"
    if main != "input_ids":  # an image, video or audio model
        if attention_mask:
            raise FloraGraphError(f"{arch} takes {main}, not tokens: an attention_mask is for token inputs")
        built = signal_inputs(config, arch, main)
        if built is None and main == "inputs" and "ImageClassification" in arch:  # Perceiver's image classifiers:
            built = _renamed(signal_inputs(config, arch, "pixel_values"), "pixel_values", main)  # pixels as `inputs`
        if built is None:
            raise ModelFolderError(f"{arch} takes {main!r}: flora-graph export builds token, image, video and audio "
                                   "inputs (input_ids, pixel_values, pixel_values_videos, input_values, input_features); "
                                   "capture it from Python with inputs of its own (flora_graph.frontend.capture)")
        example, dims, check = built
        dim_max = _decoder_ids(model, example, check, dims)
        with torch.no_grad():
            try:
                out = model(**example)
            except _RUN_ERRORS as exc:
                other = _other_layout(main, example, check, dims)
                if other is None and ids is not None:  # it needs its texts beside the signal (SAM 3's prompts)
                    try:
                        return _token_spec(model, arch, attention_mask)
                    except ModelFolderError:
                        raise _does_not_run(arch, example, exc) from exc
                if other is None:
                    raise _does_not_run(arch, example, exc) from exc
                first, (example, check, dims) = example, other
                try:
                    out = model(**example)
                except _RUN_ERRORS:
                    raise _does_not_run(arch, first, exc) from exc  # neither layout: the first one's error
            names_out = output_names(out, example)
        return ModelSpec(model, example, dims, check, arch, dim_max, names_out)
    return _token_spec(model, arch, attention_mask)


def _token_spec(model: nn.Module, arch: str, attention_mask: bool, adapter_root: str = "") -> ModelSpec:
    """:func:`load_model`'s spec of a model that takes token ids (named ``arch``; ``adapter_root``: the submodule a
    PEFT adapter installs on)."""
    config = model.config
    takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    if attention_mask and not takes_mask:
        raise FloraGraphError(f"{arch}.forward takes no attention_mask")
    # an encoder-decoder model's encoder reads padded batches through its mask, always (Optimum's exports take it);
    # SwitchTransformers' encoder cannot even run without one under torch.export
    attention_mask = attention_mask or (takes_mask and bool(getattr(config, "is_encoder_decoder", False)))
    text_config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    vocab = int(getattr(text_config, "vocab_size", None) or getattr(config, "vocab_size", 256))  # a multimodal
    if getattr(config, "is_encoder_decoder", False):  # the encoder's own (EncoderDecoderModel's sides, FSMT's source)
        vocab = vocab_size(config, "encoder", vocab)  # a detector's is its text tower's (Grounding DINO's)
    max_pos = getattr(text_config, "max_position_embeddings", None)  # model's text part names the vocabulary
    dim_max = {"seq": int(max_pos)} if isinstance(max_pos, int) and max_pos >= 2 else {}
    max_text = getattr(config, "max_text_len", None)  # a grounding detector's texts (Grounding DINO's logits)
    if isinstance(max_text, int) and max_text >= 2:
        dim_max["seq"] = min(dim_max.get("seq", max_text), max_text)
    seq = min(8, dim_max.get("seq", 8))
    # an encoder with segment embeddings (BERT) takes token_type_ids beside the mask
    types = attention_mask and "token_type_ids" in inspect.signature(model.forward).parameters \
        and int(getattr(config, "type_vocab_size", 0) or 0) > 1
    example = _hf_inputs(vocab, 2, seq, 0, attention_mask, types)
    chunk = scan_chunk(config)
    if chunk is not None and 2 * chunk + 1 > seq:
        # a chunked scan (Mamba-2's) traced over one chunk would be fixed to one; torch.export runs the example on
        # fake tensors, so a length of several chunks costs nothing there
        example = _hf_inputs(vocab, 2, min(2 * chunk + 1, dim_max.get("seq", 2 * chunk + 1)), 0, attention_mask, types)
    dims = {n: {0: "batch", 1: "seq"} for n in example}
    check = _hf_inputs(vocab, 3, min(11, dim_max.get("seq", 11)), 1, attention_mask, types)
    if _is_multiple_choice(model):  # [batch, choices, seq]: each choice a row of its own, scored against the others
        example = _hf_inputs(vocab, 2 * 3, example["input_ids"].shape[1], 0, attention_mask, types)
        check = _hf_inputs(vocab, 3 * 4, check["input_ids"].shape[1], 1, attention_mask, types)
        example = {n: t.view(2, 3, -1) for n, t in example.items()}
        check = {n: t.view(3, 4, -1) for n, t in check.items()}
        dims = {n: {0: "batch", 1: "choices", 2: "seq"} for n in example}
    else:  # a document, web page, table or vision-and-language model's inputs beside the ids (bbox, ...)
        for inputs, seed in ((example, 0), (check, 1)):
            batch, length = inputs["input_ids"].shape
            extras, extra_dims = token_extras(model, batch, length, seed)
            inputs.update(extras)
        dims.update(extra_dims)
    eos = _classified_at_eos(model)
    if eos is not None:  # every row ends its text with one end-of-sequence token, as a tokenizer gives it
        for inputs in (example, check):
            _end_at(inputs["input_ids"], eos, vocab)
    lengths = (example["input_ids"].shape[-1], check["input_ids"].shape[-1])

    def texts(count: int, seed: int) -> dict[str, torch.Tensor]:  # a paired model's texts laid out anew
        made = _hf_inputs(vocab, count, lengths[seed], seed, attention_mask, types)
        if eos is not None:
            _end_at(made["input_ids"], eos, vocab)
        return made

    dim_max.update(_decoder_ids(model, example, check, dims))
    with torch.no_grad():
        try:
            out = model(**example)
        except _RUN_ERRORS as exc:
            # a paired model whose texts are not counted apart from its images: queries for each, or one each
            layouts = [laid for p in PAIRINGS if (laid := paired_layout(p, example, check, dims, texts))]
            for laid in layouts:
                try:
                    out = model(**laid[0])
                except _RUN_ERRORS:
                    continue
                example, check, dims = laid
                break
            else:
                raise _does_not_run(arch, example, exc) from exc
        names_out = output_names(out, example)
    return ModelSpec(model, example, dims, check, arch, dim_max, names_out, adapter_root)


def _end_at(ids: torch.Tensor, eos: int, vocab: int) -> None:
    """End every row of ``ids`` with one ``eos`` token, in place (any other one replaced by the next id)."""
    ids[ids == eos] = (eos + 1) % vocab
    ids[:, -1] = eos


_RUN_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AttributeError, KeyError)
"""What a model raises in eager torch on example inputs it does not take (a missing input, a wrong layout)."""


def _does_not_run(arch: str, example: dict[str, torch.Tensor], exc: BaseException) -> ModelFolderError:
    """The error of a model ``arch`` that raised ``exc`` on the ``example`` inputs :func:`load_model` built for it."""
    shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in example.items())
    return ModelFolderError(f"{arch} does not run on the inputs flora-graph export builds for it ({shapes}): "
                            f"{type(exc).__name__}: {exc}; capture it from Python with inputs of its own "
                            "(flora_graph.model_export.export_model of a ModelSpec)")


def _renamed(built: tuple[dict, dict, dict] | None, old: str, new: str) -> tuple[dict, dict, dict] | None:
    """:func:`signal_inputs`' ``(example, dims, check)`` with the input ``old`` named ``new``."""
    if built is None:
        return None
    return tuple({new if k == old else k: v for k, v in part.items()} for part in built)  # type: ignore[return-value]


def _other_layout(main: str, example: dict[str, torch.Tensor], check: dict[str, torch.Tensor],
                  dims: dict[str, dict[int, str]]) -> tuple[dict, dict, dict] | None:
    """The other layout of an audio input a model refused, which no config field tells apart: raw audio of one
    channel ``[batch, 1, samples]`` (OmniASR's first convolution reads one channel), or features channels-first
    ``[batch, features, frames]`` (GLM-ASR's encoder convolves over frames, as Whisper's does); ``None`` for another
    input."""
    x = example[main]
    if main == "input_values" and x.dim() == 2:
        move, named = (lambda t: t.unsqueeze(1)), {0: "batch", 2: "samples"}
    elif main == "input_features" and x.dim() == 3 and dims.get(main, {}).get(1) == "frames":
        move, named = (lambda t: t.transpose(1, 2).contiguous()), {0: "batch", 2: "frames"}
    else:
        return None
    return {k: move(v) for k, v in example.items()}, {k: move(v) for k, v in check.items()}, {main: named}


def _reads_encoder_positions(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder model's classification or question-answering head (BART's, T5's),
    which shifts the encoder's tokens into the decoder and reads the decoder's states at the encoder's positions:
    it takes no ``decoder_input_ids`` of another length (Optimum's exports of these heads take none)."""
    return _is_head(model, "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES")


def _is_multiple_choice(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a multiple-choice head (``BertForMultipleChoice``): it takes its tokens as ``[batch,
    choices, seq]`` and gives one score per choice, as Optimum's multiple-choice exports take them."""
    return _is_head(model, "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES")


def _is_head(model: torch.nn.Module, *mappings: str) -> bool:
    """Whether ``model``'s class is one that transformers' auto ``mappings`` (``modeling_auto``'s names) list."""
    from transformers.models.auto import modeling_auto as auto

    return any(type(model).__name__ in (v if isinstance(v, tuple | list) else (v,))
               for m in mappings for v in getattr(auto, m).values())


def _classified_at_eos(model: torch.nn.Module) -> int | None:
    """The end-of-sequence id where ``model``'s head classifies each row at its end-of-sequence tokens (BART's and
    T5's sequence classification: every row must hold the same number of them), else ``None``."""
    eos = getattr(model.config, "eos_token_id", None)
    if not isinstance(eos, int) or not _reads_encoder_positions(model):
        return None
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None
    return eos if "eos_mask" in source else None


def _decoder_ids(model: torch.nn.Module, example: dict[str, torch.Tensor], check: dict[str, torch.Tensor],
                 dims: dict[str, dict[int, str]]) -> dict[str, int]:
    """For an encoder-decoder model (T5, BART, Marian, Whisper, ...): ``decoder_input_ids`` ``[batch, dec_seq]``
    added to ``example`` and ``check`` (other lengths than the encoder's) and to ``dims``, as Optimum's exports of
    such a model without a cache take them; returns the bound of ``dec_seq`` where the decoder's positions are a
    table (``{}`` otherwise, and for any other model)."""
    config = model.config
    if not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" not in inspect.signature(
            model.forward).parameters or _reads_encoder_positions(model):
        return {}
    vocab = vocab_size(config, "decoder")  # FSMT's target, EncoderDecoderModel's decoder
    gen = torch.Generator().manual_seed(2)
    for inputs, length in ((example, 5), (check, 4)):
        rows = int(next(iter(inputs.values())).shape[0])
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (rows, length), generator=gen)
    dims["decoder_input_ids"] = {0: "batch", 1: "dec_seq"}
    limit = next((getattr(config, k) for k in ("max_target_positions", "max_position_embeddings")
                  if isinstance(getattr(config, k, None), int)), None)
    return {"dec_seq": int(limit)} if limit is not None and limit >= 5 else {}


def load_transformers(folder: str | Path) -> torch.nn.Module:
    """The transformers model of ``folder`` (config.json + safetensors, its ``architectures`` class), in eval
    mode and float32, loaded without a download; :class:`ModelFolderError` for a folder it cannot use (see
    :func:`check_model_folder`; pickle weights are never loaded). A bitsandbytes 4-bit or 8-bit checkpoint (the base
    of a QLoRA adapter) is dequantized as it loads: its layers become plain ``Linear`` layers holding the weights its
    own forward computes with (on CPU, bitsandbytes' kernels round their products otherwise, about 1e-3 apart). A GPTQ,
    AWQ or compressed-tensors 4-bit checkpoint loads as the float model of its layers' weights
    (:mod:`flora_graph.quantized_checkpoints`), which keeps their 4-bit blocks for a 4-bit package; an FP8 checkpoint
    (``quant_method`` ``fp8``, block-wise scales: Qwen3's and DeepSeek-V3's) is dequantized by transformers as it
    loads, exactly."""
    folder = Path(folder)
    arch = check_model_folder(folder)
    import transformers

    grids = None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        quant = getattr(config, "quantization_config", None)  # config.json's entry, as it reads there
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method in quantized_checkpoints.METHODS:
            # a GPTQ / AWQ / compressed-tensors checkpoint: its layers' float weights, the model built on them as a float one
            state, grids = quantized_checkpoints.read_checkpoint(folder, {"quantization_config": quant})
            del config.quantization_config
            model = getattr(transformers, arch).from_pretrained(None, config=config, state_dict=state,
                                                                dtype=torch.float32).eval()
        elif method == "fp8":
            # an FP8 checkpoint (block-wise scales): transformers dequantizes it as it loads, exactly in float32
            model = getattr(transformers, arch).from_pretrained(
                folder, config=config, local_files_only=True, use_safetensors=True, dtype=torch.float32,
                quantization_config=transformers.FineGrainedFP8Config(dequantize=True)).eval()
        else:
            model = getattr(transformers, arch).from_pretrained(folder, config=config, local_files_only=True,
                                                                use_safetensors=True).eval()
    except ModelFolderError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for a folder it cannot use
        raise ModelFolderError(f"{folder}: transformers cannot load {arch} from it ({type(exc).__name__}: {exc})") from exc
    if getattr(model, "is_quantized", False):  # a bitsandbytes checkpoint (check_model_folder refuses the others):
        model = model.dequantize()  # its weights as its own forward computes them, before any forward repacks them
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # a bfloat16/float16 checkpoint: captured and checked in float32
    if grids is not None:
        quantized_checkpoints.attach_grids(model, grids)
    return model


def check_model_folder(folder: str | Path) -> str:
    """Check a transformers model folder without loading it; return its architecture (a class name).

    Raises :class:`ModelFolderError` naming the file or entry at fault: no ``config.json``, a
    ``config.json`` that is not a JSON object, an ``architectures`` entry that is not the name
    of a transformers model class, a quantized checkpoint other than a bitsandbytes one (or a bitsandbytes one
    without that package installed), or weights only as pickles (``pytorch_model.bin``):
    flora_graph loads safetensors only.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFolderError(f"{folder}: expected a model folder with config.json (+ safetensors weights), or 'default'")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFolderError(f"{cfg_path}: cannot read it as JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"{cfg_path}: not a JSON object")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ModelFolderError(f"{cfg_path}: 'architectures' must be a non-empty list of transformers model class "
                               f"names (e.g. [\"LlamaForCausalLM\"]), got {archs!r}")
    arch = archs[0]
    import transformers

    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelFolderError(f"{cfg_path}: architectures entry {arch!r} is not a transformers model class "
                               f"(expected a name such as \"LlamaForCausalLM\")")
    quantized = quantized_checkpoint(cfg)
    method = cfg["quantization_config"].get("quant_method") if quantized is not None else None
    if method in quantized_checkpoints.METHODS:
        quantized_checkpoints.check_config(cfg, str(cfg_path))
    elif quantized is not None and method not in ("bitsandbytes", "fp8"):
        raise ModelFolderError(f"{cfg_path}: {quantized} (quantization_config), whose weights flora_graph does not "
                               "read (it reads bitsandbytes, GPTQ, AWQ, compressed-tensors and FP8 ones); export the "
                               "model's float checkpoint (a 4-bit GenAI package: --precision int4)")
    if method == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelFolderError(f"{cfg_path}: {quantized}, which transformers reads through the bitsandbytes package: "
                               "install it (pip install bitsandbytes), or export the model's float checkpoint")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix in (".bin", ".pt", ".pth"))
        found = f"only pickle weights ({', '.join(pickles)}), which are never loaded" if pickles else "no weights"
        raise ModelFolderError(f"{folder}: {found}; flora_graph loads safetensors weights only (model.safetensors, "
                               "as transformers' save_pretrained writes them)")
    return arch


def check_adapter_folder(folder: str | Path) -> dict[str, Any]:
    """Check a PEFT adapter folder without loading a model: its ``adapter_config.json`` (every option
    flora_graph refuses; DoRA, ``target_parameters``, ``trainable_token_indices``, AdaLoRA and the adapter types of
    :data:`~flora_graph.adapters.peft.THROUGH_PEFT` are accepted, as :func:`export_model` installs them through PEFT)
    and its safetensors weights; return the config. Raises :class:`AdapterError` naming the file."""
    from flora_graph.adapters.peft import CONFIG_FILE, WEIGHTS_FILE, read_peft_config

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        what = "no such folder" if not folder.exists() else f"no {CONFIG_FILE} in it"
        raise AdapterError(f"{folder}: {what}; expected a PEFT adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    cfg = read_peft_config(folder, peft_layers=True)
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        found = f"only pickle weights ({', '.join(pickles)}), which are never loaded" if pickles else f"no {WEIGHTS_FILE}"
        raise AdapterError(f"{folder}: {found}; flora_graph needs the adapter's safetensors weights ({WEIGHTS_FILE})")
    return cfg


def export_model(
    source: str | Path | ModelSpec | None,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    backend: str = "onnxruntime",
    preset: str = "merged",
    progress: Callable[[str], None] | None = None,
    attention_mask: bool = False,
) -> ExportReport:
    """Export ``source`` (see :func:`load_model`), with the PEFT ``adapter`` folder installed if
    given, optimized with ``preset`` for ``backend``, to ``out`` (a file; the backend's suffix
    is added when missing). Returns timings and the parity against eager torch on the check inputs (the
    largest difference over every output, within :data:`PARITY_TOLERANCE` of the largest reference value).
    ``attention_mask``: a transformers model also takes ``attention_mask`` (and
    ``token_type_ids`` where it has segments), see :func:`load_model`.

    The arguments, the model folder and the adapter folder are checked first (see
    :func:`check_model_folder`, :func:`check_adapter_folder`): a bad one is reported before
    the model loads, and nothing is written."""
    say = progress or (lambda msg: None)
    # every argument and input folder is checked before anything loads or is written
    if backend not in SUFFIX:
        raise FloraGraphError(f"unknown export backend {backend!r}; choose one of {sorted(SUFFIX)}")
    if preset not in PRESETS:
        raise FloraGraphError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if isinstance(source, str | Path) and str(source) not in ("default", "demo-cnn"):
        check_model_folder(transformer_folder(source) or source)  # a sentence-transformers folder: its transformer's
    adapter_cfg = check_adapter_folder(adapter) if adapter is not None else {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    say("loading the model")
    # the built-in decoder carries its own LoRA unless a PEFT adapter is to be installed on it
    spec = source if isinstance(source, ModelSpec) else load_model(source, lora_rank=None if adapter else 8,
                                                                    attention_mask=attention_mask)
    model = spec.model
    if adapter is not None:
        from flora_graph.adapters.peft import (
            fit_vocab,
            load_peft_adapter,
            merge_peft,
            needs_peft_layers,
            peft_installed,
        )

        say(f"installing the PEFT adapter {adapter}")
        model = copy.deepcopy(model)
        target = model.get_submodule(spec.adapter_root)  # the transformers model, whose module names the adapter uses
        fit_vocab(target, Path(adapter), say)  # a fine-tune that added tokens: the model takes its vocabulary
        # DoRA, LoRA on expert tensors, trainable tokens, AdaLoRA, the other adapter types: PEFT's own layers
        if needs_peft_layers(adapter_cfg):
            target = peft_installed(target, Path(adapter), "load").eval()
            if preset == "merged":  # DoRA's m * (W + s B A) / ||W + s B A||, each expert's W + s B_e A_e: once, by PEFT
                target = merge_peft(target)
            if spec.adapter_root:
                parent, _, leaf = spec.adapter_root.rpartition(".")
                setattr(model.get_submodule(parent), leaf, target)
            else:
                model = target
        else:
            load_peft_adapter(target, adapter)
    seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say("capturing with torch.export")
    graph = capture(model, spec.example_inputs, spec.dynamic_dims, name=spec.name, dim_max=spec.dim_max or None,
                    output_names=spec.output_names)
    seconds["capture"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say(f"optimizing ({preset})")
    graph = optimize(graph, preset, backend=backend)
    seconds["optimize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say(f"lowering for {backend}")
    exe = compile(graph, backend)
    path = Path(out)
    if path.suffix != SUFFIX[backend]:
        path = path.with_name(path.name + SUFFIX[backend])
    exe.save(path)
    seconds["lower+save"] = time.perf_counter() - t0
    say("checking against eager torch")
    with torch.no_grad():
        want = output_tensors(model(**spec.check_inputs))
    diff = max_abs_diff(exe(spec.check_inputs), want)  # every output, in order
    scale = max((float(w.detach().abs()[finite].max()) for w in want if w.is_floating_point()
                 and (finite := torch.isfinite(w.detach())).any()), default=1.0)  # masked logits' infinities aside
    return ExportReport(path, backend, preset, graph.summary(), seconds, diff, PARITY_TOLERANCE * max(1.0, scale))
