"""ONNX Runtime GenAI packages: a causal LM with its key/value cache and hot-swappable LoRA adapters.

:func:`export_genai` goes from a transformers model folder and PEFT adapter folders to a
folder that ``onnxruntime_genai.Model(OUT)`` loads, in one step::

    OUT/genai_config.json            model type, sizes, input/output names, search defaults
    OUT/model.onnx (+ model.onnx.data: its weights past 2 GB, or any size where mixed.onnx shares them)
    OUT/adapters/NAME.onnx_adapter   one per adapter, with NAME.onnx_adapter.sha256
    OUT/mixed.onnx                   with adapters (unless mixed=False): the same model serving rows with different
                                     adapters in one call (stacked adapters, a per-row
                                     ``adapter_index``), for :class:`~flora_graph.serving.generate.Generator`;
                                     its base weights are read from model.onnx.data (stored once)
    OUT/tokenizer.json, ...          the tokenizer files of the base folder, copied

The model is captured with its cache (:func:`~flora_graph.frontend.causal_lm.capture_causal_lm`),
optimized with the ``fused`` preset and lowered for ONNX Runtime (``to_onnx(..., contrib=True)``:
residual adds fused into ``SkipSimplifiedLayerNormalization``; attention, with the rotary embedding
where it can, into ``GroupQueryAttention`` on right-padded caches whose past and present buffers
GenAI then shares, as the model builder's models do), and every LoRA site of any adapter becomes an adapter
slot: its ``A``/``B`` are graph inputs with empty (rank-0) defaults, so the model alone is
the base model, and ``og.Adapters(model).load(file, NAME)`` plus
``generator.set_active_adapter(adapters, NAME)`` switch adapters between generations. Each
adapter keeps its own ranks and target modules (a subset of the slots is fine); its scale
is folded into ``B``. The model is one ``If`` on the input ``flora_graph.adapter_active``, which
every adapter file sets to 1 (:mod:`flora_graph.serving.base_branch`): with no adapter active the
slots' empty kernels do not run at all. The folder is written through :func:`flora_graph.storage.staged_folder`:
a reader sees the old package or the new one, never a mix; a package written over another drops the old
one's entries it does not write (:func:`package_owns`: an old ``mixed.onnx`` or ``adapters`` folder), and
keeps any other file (a README).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from flora_graph import quantized_checkpoints
from flora_graph.errors import AdapterError, FloraGraphError
from flora_graph.storage import check_name, staged_folder

if TYPE_CHECKING:
    from flora_graph.serving.text_decoder import TextDecoder

__all__ = ["BASE_BRANCH_MAX_BYTES", "GENAI_CONFIG", "GENAI_TYPES", "GENERIC_TYPE", "MODEL_DATA", "PRECISIONS", "REFILL_KEY",
           "SEARCH_DEFAULTS", "TOKENIZER_FILES", "GenAIReport", "add_adapters", "causal_lm_classes", "context_length", "copy_present", "export_genai", "genai_config", "genai_type", "merged_base",
           "package_owns", "refill_position", "search_defaults"]

GENAI_CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
GENAI_OPSET = 23  # RotaryEmbedding and RMSNormalization as one node each; onnxruntime >= 1.23 runs them
MIXED_FILE = "mixed.onnx"
MODEL_DATA = "model.onnx.data"
"""The external data of a package's models: ``model.onnx``'s weights past the 2 GB of one file, or, where the
package has ``mixed.onnx``, the weights of both at any size, those they share (the base weights) stored once."""
BASE_BRANCH_MAX_BYTES = 64 * 2**20
"""The base weights up to which :func:`export_genai` adds the base branch by default. ONNX Runtime prepacks
the weights of each branch's ``MatMul``\\ s apart, so the branch doubles them in memory and in load time:
on a 0.5B Qwen2 package (fp32, 1.9 GiB of weights) GenAI held 3.9 GB against 2.0 GB without it, loaded in
16.4 s against 3.9 s, and decoded no faster (100 against 96 ms a step), the slots' empty kernels being well
under 1% of a step there; on the 12 MB Llama of ``benchmarks/generate.py`` they are about 10%."""
ADAPTERS_DIR = "adapters"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
"""Files copied from the base folder where present (ONNX Runtime GenAI's tokenizer reads them; transformers
keeps a chat template in ``chat_template.jinja``)."""


def copy_present(base: str | Path, dest: Path, names: Sequence[str]) -> None:
    """Copy each of ``names`` that ``base`` holds as a plain file (not a link) into ``dest``."""
    for f in names:
        src = Path(base) / f
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, dest / f)


def package_owns(name: str) -> bool:
    """Whether ``name`` is an entry a package writes in some exports and not in others: a new package
    removes it from the folder it replaces where it does not write it (an old ``mixed.onnx`` or
    ``adapters`` beside a model exported without them would serve the old weights)."""
    from flora_graph.runtimes.onnx_writer import data_files_of

    return name in (MODEL_FILE, MIXED_FILE, GENAI_CONFIG, ADAPTERS_DIR, *TOKENIZER_FILES) or any(
        data_files_of(model).fullmatch(name) for model in (MODEL_FILE, MIXED_FILE))


GENAI_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "GemmaForCausalLM": "gemma",
               "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text", "Gemma4ForCausalLM": "gemma4_text",
               "Gemma4UnifiedForCausalLM": "gemma4_text", "GraniteForCausalLM": "granite", "OlmoForCausalLM": "olmo",
               "PhiForCausalLM": "phi", "NemotronForCausalLM": "nemotron", "SmolLM3ForCausalLM": "smollm3",
               "Ernie4_5ForCausalLM": "ernie4_5"}
"""transformers class -> ``model.type`` of genai_config.json where ONNX Runtime GenAI names the architecture
(the types of its model builder); every other causal LM is :data:`GENERIC_TYPE`."""

PRECISIONS = ("fp32", "int4")
"""The weights a package's base layers are stored in (``export_genai(precision=...)``)."""

GENERIC_TYPE = "decoder"
"""GenAI's decoder-only model type for any other causal LM (GPT-2, GPT-NeoX, OLMo 2, StableLM, Starcoder2,
OPT, Mixtral, ...): GenAI runs every type of its decoder-only family one way, reading the input and output names
from the config, and a package's names are the ones it reads. (GenAI's own ``gpt2`` type expects another
cache layout, so GPT-2 packages are ``decoder`` too.)"""


def genai_type(arch: str) -> str:
    """The ``model.type`` a package of transformers class ``arch`` gets (:data:`GENAI_TYPES`, else
    :data:`GENERIC_TYPE`)."""
    return GENAI_TYPES.get(arch, GENERIC_TYPE)


def causal_lm_classes() -> frozenset[str]:
    """The transformers classes ``AutoModelForCausalLM`` builds: the architectures a package is made for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([v] if isinstance(v, str) else v)
    return frozenset(names)


@dataclass
class GenAIReport:
    """What :func:`export_genai` wrote and how long each stage took."""

    path: Path
    adapters: dict[str, Path]
    summary: str
    seconds: dict[str, float] = field(default_factory=dict)
    model_type: str = GENERIC_TYPE  # genai_config.json's model.type (genai_type of the model's class)
    merged: Path | None = None  # the PEFT folder baked into the base weights (export_genai's merge)
    not_for_genai: str | None = None  # why ONNX Runtime GenAI cannot run the package (the Generator can), or None
    notes: list[str] = field(default_factory=list)  # what the export left out or chose, for the user to know


def genai_config(model: Any, layout: Any, *, model_type: str, context_length: int,
                 end_of_turn: int | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` document of a package of ``model`` (a transformers causal LM).

    Special tokens and the search defaults (:data:`SEARCH_DEFAULTS`) come from the model's
    ``generation_config`` (its ``generation_config.json``) before its config, as transformers'
    ``generate()`` and the ONNX Runtime GenAI model builder read them: a chat model's sampling settings
    and its end-of-turn tokens. ``end_of_turn``: the tokenizer's end-of-text token, added to the end-of-text
    ids where they lack it (checkpoints whose config names only ``<|endoftext|>`` end each turn with it).
    """
    cfg = model.config
    gen_cfg = getattr(model, "generation_config", None)

    vocab = int(cfg.vocab_size)

    def token(key: str) -> Any:
        """The first source's id(s) in the vocabulary: ``generation_config`` first, as ``generate()`` reads it."""
        for source in (gen_cfg, cfg):
            v = getattr(source, key, None)
            ids = [t for t in (v if isinstance(v, list) else [v])
                   if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab]
            if ids:
                return ids if isinstance(v, list) else ids[0]
        return None

    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if layout.takes_position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    eos = token("eos_token_id")
    if end_of_turn is not None:
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if end_of_turn not in ids:
            eos = [end_of_turn, *ids] if ids else end_of_turn
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    bos = token("bos_token_id")
    return {
        "model": {
            "bos_token_id": bos if bos is not None else (first_eos if first_eos is not None else 0),  # GenAI needs a number
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": layout.head_dim,
                "hidden_size": int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(getattr(cfg, "decoder_attention_heads", None)  # a seq2seq decoder's own
                                           or getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0))),
                "num_hidden_layers": layout.layers,
                "num_key_value_heads": layout.kv_heads,
            },
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": token("pad_token_id") if token("pad_token_id") is not None else (eos if isinstance(eos, int) else 0),
            "type": model_type,
            "vocab_size": vocab,
        },
        "search": {"diversity_penalty": 0.0, "early_stopping": True, "length_penalty": 1.0, "max_length": context_length,
                   "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False,
                   **search_defaults({k: getattr(gen_cfg, k, None) for k in SEARCH_DEFAULTS})},
    }


SEARCH_DEFAULTS: dict[str, bool | float | int] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                                  "repetition_penalty": 1.0}
"""The search settings a package carries from the model's generation config (with transformers' defaults),
which ONNX Runtime GenAI and :class:`~flora_graph.serving.generate.Generator` both apply unless a call sets them."""


def search_defaults(given: Mapping[str, Any]) -> dict[str, bool | float | int]:
    """:data:`SEARCH_DEFAULTS` as ``given`` (a generation config's values, a package's ``search`` section) sets
    them; values missing, of the wrong type or out of range (a temperature of 0, a ``top_p`` above 1) keep the
    default."""
    out = dict(SEARCH_DEFAULTS)
    for key, default in SEARCH_DEFAULTS.items():
        v = given.get(key)
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        else:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and (v >= 0 if key == "top_k" else v > 0)
            ok = ok and (key != "top_p" or v <= 1)
        if ok:
            out[key] = type(default)(v)
    return out


def export_genai(
    base: str | Path,
    out: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    contrib: bool = True,
    base_branch: bool | None = None,
    precision: str = "fp32",
    int4_block_size: int = 32,
    int4_accuracy_level: int = 4,
    merge: str | Path | None = None,
    mixed: bool = True,
    stamp_layers: bool = True,
) -> GenAIReport:
    """Write an ONNX Runtime GenAI package of the transformers model folder ``base`` with the PEFT
    ``adapters`` (``{name: folder}``) as hot-swappable ``.onnx_adapter`` files; see the module docstring.

    ``merge``: a PEFT folder baked into the base weights first, by PEFT itself (``merge_and_unload``): any
    adapter PEFT can merge, those no hot-swappable slot holds included (a ``modules_to_save`` module other than a
    ``Linear`` or an ``Embedding``, a norm's trained bias). The package's base model is then the adapted model;
    ``adapters`` swap on top of it. A fine-tune that added tokens (embedding layers of another size saved beside it)
    gives the model its vocabulary first; tokenizer files saved beside the merged adapter are the package's. Adapters
    with DoRA, LoRA on a mixture of experts' expert tensors (``target_parameters``), trainable tokens, biases
    (``lora_bias``, a ``Linear``'s trained bias) or ``Linear`` / ``Embedding`` modules trained whole
    (``modules_to_save``, a slot of full rank: :func:`~flora_graph.serving.slots.params_through_peft`) swap as any
    other. A bitsandbytes 4-bit or 8-bit ``base`` (a QLoRA adapter's) is dequantized as it loads, and the report's
    notes say so.

    ``mixed=False`` leaves out ``mixed.onnx`` (rows with different adapters in one batch, for the
    :class:`~flora_graph.serving.generate.Generator`), which holds its own copy of the base weights: half the
    package for ONNX Runtime GenAI, which serves one adapter per generator.

    ``contrib=False`` writes the models in standard ONNX only (no ONNX Runtime contrib ops: the
    standard ``Attention`` on left-padded caches, ``position_ids`` an input), for runtimes or
    execution providers without them; they are slower in ONNX Runtime. ``base_branch``: whether ``model.onnx``
    is the ``If`` that skips the slots when no adapter is active (:mod:`~flora_graph.serving.base_branch`);
    ``None`` (the default) adds it where the base weights are at most :data:`BASE_BRANCH_MAX_BYTES`: ONNX
    Runtime prepacks each branch's weights apart, doubling them in memory, which pays only where the
    slots' empty kernels are a noticeable part of a step. Without it the base model runs the slots'
    empty kernels, and an active adapter saves the ``If``.
    ``precision="int4"`` stores the base layers' weights in 4 bits, blocks of ``int4_block_size``
    (:mod:`~flora_graph.serving.int4`: ONNX Runtime's ``MatMulNBits``, as the model builder's ``-p int4``);
    adapters stay float and swappable on top. ``int4_accuracy_level`` 4 (the default, the builder's on CPU)
    quantizes the activations to int8 as well, the fastest on CPU; 0 computes with float activations: the
    float model of the 4-bit weights, token for token.

    ``stamp_layers``: torch.export traces the decoder's first layers, up to a template of each kind of layer (three
    where the layers past the first are alike), and the others are stamped from their kind's template
    (:mod:`~flora_graph.frontend.layer_stamp`: the same graph, checked; a 24-layer 0.5B Qwen2 captured in 4.0 s
    instead of about 10 s); ``False`` traces every layer.

    Every argument and folder is checked before the model loads: a precision or block size it does not
    take, an adapter name that cannot be a file name, a folder that is not a PEFT LoRA folder, a model class that is not
    a causal LM; an adapter no slot can carry is refused by name when it is read, before anything is written.
    Raises :class:`~flora_graph.errors.FloraGraphError` subclasses naming the culprit; on
    failure nothing at ``out`` changes.
    """
    from flora_graph.model_export import check_adapter_folder, check_model_folder, quantized_checkpoint
    from flora_graph.serving.int4 import ACCURACY_LEVELS, INT4_BLOCK_SIZES, quantize_weights

    if precision not in PRECISIONS:
        raise FloraGraphError(f"precision {precision!r}: expected one of {list(PRECISIONS)}")
    if precision == "int4" and int4_block_size not in INT4_BLOCK_SIZES:
        raise FloraGraphError(f"int4 block size {int4_block_size!r}: expected one of {list(INT4_BLOCK_SIZES)}")
    if precision == "int4" and int4_accuracy_level not in ACCURACY_LEVELS:
        raise FloraGraphError(f"int4 accuracy level {int4_accuracy_level!r}: expected one of {list(ACCURACY_LEVELS)}")
    say = progress or (lambda msg: None)
    adapters = dict(adapters or {})
    arch = check_model_folder(base)
    if arch not in causal_lm_classes() and text_part(base) is None:
        raise FloraGraphError(f"{base}: {arch} is not a causal LM (a class transformers' AutoModelForCausalLM "
                              "builds) nor a multimodal model whose text part has one; generation packages are "
                              "made for causal LMs")
    for name, folder in adapters.items():
        check_name(name, "adapter name", error=AdapterError)
        check_adapter_folder(folder)
    if merge is not None:
        check_adapter_folder(merge)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    say(f"loading {arch} from {base}")
    from flora_graph.model_export import load_model
    from flora_graph.serving.text_decoder import text_decoder

    model = load_model(base).model
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        say(msg)

    loaded = model  # the model a GPTQ / AWQ checkpoint's grids are recorded on (model_grids)
    model, tokenizer_from = merged_base(model, base, merge, say, note)

    base_config = json.loads((Path(base) / "config.json").read_text())
    if quantized_checkpoints.checkpoint_method(base_config):
        note(f"{base}: {quantized_checkpoint(base_config)}, read as the float32 model of its 4-bit layers' weights" +
             ("" if precision == "int4" else ", at 32 bits a weight (--precision int4 keeps the checkpoint's 4-bit "
                                             "blocks)"))
    elif quantized := quantized_checkpoint(base_config):
        note(f"{base}: {quantized}, dequantized to float32 as it loads"
             + (" (a QLoRA adapter's base)" if "bitsandbytes" in quantized else "")
             + ": the package's weights are as its layers compute with them"
             + (" (--precision int4 quantizes them to 4 bits again)" if precision == "int4" else
                ", at 32 bits a weight (--precision int4 writes 4-bit ones)"))

    text = text_decoder(model)
    if text is not None:
        note(f"{arch}: exporting its text decoder as {type(text.model).__name__} (the vision/audio side is left out)")
        arch = type(text.model).__name__
    params = _adapter_params(model, adapters, say, text, note)
    model = model if text is None else text.model
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("capturing with the key/value cache")
    from flora_graph.frontend.causal_lm import cache_layout, capture_causal_lm

    layout = cache_layout(model)
    sites = install_sites(model, params)
    # the weights stay where the model loaded them
    graph = capture_causal_lm(model, name=arch, share_weights=True, layout=layout, stamp_layers=stamp_layers)
    # the graph's weights keep the tensors' memory alive: from here on the model is its configs
    model = SimpleNamespace(config=model.config, generation_config=getattr(model, "generation_config", None))
    from flora_graph.serving.beam import unapplied_settings

    skipped = unapplied_settings(model.generation_config, SEARCH_DEFAULTS)
    if skipped:
        note(f"the generation config's {', '.join(skipped)}: not applied by the package (eager generate applies "
             "them)")
    seconds["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("optimizing (fused, adapter slots)")
    from flora_graph.passes import optimize

    unpacked = optimize(graph, "fused", backend="onnxruntime", **slot_options(params))
    if sites:
        from flora_graph.serving.slots import graph_slots

        params = _read_sites(params, graph_slots(unpacked), note)
        if precision == "int4" and any(s.kind == "experts" for s in graph_slots(unpacked)):
            note("the expert tensors that carry adapter slots stay float (a loop over the experts present): ONNX "
                 "Runtime's QMoE takes no LoRA between its products; the other layers are 4-bit")
    if sites and base_branch is None:
        weight_bytes = sum(int(a.nbytes) for a in unpacked.params.values())
        base_branch = weight_bytes <= BASE_BRANCH_MAX_BYTES
        say(f"base branch {'on' if base_branch else 'off'} ({weight_bytes / 2**20:.0f} MiB of weights; "
            f"automatic up to {BASE_BRANCH_MAX_BYTES // 2**20} MiB)")
    # model.onnx: sibling slots packed (fewer nodes per step), and the sibling layers outside slots (q/k/v, gate/up
    # an adapter leaves alone) as plain Linears, as mixed.onnx below packs them: both then store those weights as
    # they are, once in the shared data file; mixed.onnx keeps its slots unpacked
    graph = optimize(unpacked, [*(["pack-slots"] if sites else []), "pack-linears", "cse", "dce"])
    seconds["optimize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    context = context_length(model.config)
    doc = genai_config(model, layout, model_type=genai_type(arch), context_length=context,
                       end_of_turn=_end_of_turn(tokenizer_from, int(model.config.vocab_size), say))
    refill = refill_position(model) if arch in REFILL_ARCHS else None
    marks = {REFILL_KEY: str(refill)} if refill is not None else {}
    if uncached := layout.uncached_layers():
        marks[UNCACHED_KEY] = json.dumps(uncached)
    # 4-bit packages: mixture-of-experts blocks as MoE nodes, whose experts the quantizer makes 4-bit (QMoE);
    # float ones keep each expert product a Loop (faster decode steps on CPU than the float MoE kernel)
    moe = contrib and precision == "int4"
    written: dict[str, Path] = {}
    with staged_folder(out, what="GenAI package", last=GENAI_CONFIG, owns=package_owns) as tmp, \
            contextlib.ExitStack() as files:
        say("writing the model")
        # each model lowered with its big weights apart (views of the graph's), written from the arrays; with
        # the mixed model beside it, both in one data file that holds the weights they share once
        from flora_graph.runtimes.onnx_writer import SharedData, save_lowered

        shared = files.enter_context(SharedData(tmp, MODEL_DATA)) if sites and mixed else None
        grids = quantized_checkpoints.model_grids(loaded) if precision == "int4" else []

        def write(model: Any, weights: dict[str, Any], file: str) -> None:
            if precision == "int4":
                say(f"quantizing {file}'s base weights to 4 bits (blocks of {int4_block_size})")
                kept: list[str] = []
                n = quantize_weights(model, int4_block_size, int4_accuracy_level, weights, grids=grids, kept=kept)
                if grids:
                    note(f"{file}: {len(kept)} of its {n} 4-bit nodes keep the checkpoint's own codes, scales and "
                         "zero points (the others: layers the checkpoint holds in float, or packed layers whose "
                         f"groups differ, quantized in blocks of {int4_block_size})")
            if shared is None:
                save_lowered(_marked(model, marks), weights, tmp / file)
            else:
                shared.write(_marked(model, marks), weights, file)

        if sites:
            from flora_graph.serving.base_branch import branch_on_adapter
            from flora_graph.serving.export import lower_slotted
            from flora_graph.serving.slots import graph_slots

            written_model, weights = lower_slotted(graph, "swappable", opset=GENAI_OPSET, contrib=contrib,
                                                   max_positions=context, moe=moe)
            if base_branch:
                written_model = branch_on_adapter(written_model)
            write(written_model, weights, MODEL_FILE)
            if mixed:
                say("writing the mixed-adapter model")
                # slots unpacked: per-row gathers of a block-diagonal B would copy its zero blocks (12% slower
                # with 8 adapters; the mixed session unpacks the package's packed adapter files); their
                # base layers packed as plain Linears (pack-linears: 6% faster steps, 8 rows over 8 adapters)
                write(*lower_slotted(optimize(unpacked, ["pack-linears", "cse", "dce"]), "mixed", opset=GENAI_OPSET,
                                     packed=[s for s in graph_slots(graph) if s.members], contrib=contrib,
                                     max_positions=context, moe=moe), MIXED_FILE)
                say(f"{MIXED_FILE} reads {shared.shared / 2**20:.0f} MiB of its weights from {MODEL_FILE}'s data "
                    f"({MODEL_DATA}, {shared.stored / 2**20:.0f} MiB)")
                files.close()  # the data file complete
        else:
            from flora_graph.runtimes.onnx_lowering import lower

            written_model, weights = lower(graph, GENAI_OPSET, contrib=contrib, max_positions=context, moe=moe)
            write(written_model, weights, MODEL_FILE)
        _fit_config(doc, written_model)
        if params:
            from flora_graph.serving.adapter_file import write_adapter

            (tmp / ADAPTERS_DIR).mkdir()
            for name, p in params.items():
                say(f"writing adapter {name}")
                write_adapter(tmp / ADAPTERS_DIR / f"{name}.onnx_adapter", p, model=tmp / MODEL_FILE, name=name)
                written[name] = Path(out) / ADAPTERS_DIR / f"{name}.onnx_adapter"
        copy_present(base, tmp, ("generation_config.json",))
        copy_present(tokenizer_from, tmp, [f for f in TOKENIZER_FILES if f != "generation_config.json"])
        (tmp / GENAI_CONFIG).write_text(json.dumps(doc, indent=2))
    seconds["write"] = time.perf_counter() - t0
    return GenAIReport(Path(out), written, graph.summary(), seconds, model_type=genai_type(arch),
                       merged=None if merge is None else Path(merge), not_for_genai=not_for_genai(layout), notes=notes)


def not_for_genai(layout: Any) -> str | None:
    """Why ONNX Runtime GenAI cannot run a package of a model with cache ``layout``
    (:class:`~flora_graph.frontend.causal_lm.CacheLayout`), or ``None``: GenAI sizes every cache entry by one
    ``head_size``, and a latent-attention model's cached keys and values differ in width (MiMo-V2's too); it carries
    recurrent states for its own model types only, no sparse attention's indexer keys, and keys and values for every
    layer (not a layer without a cache, as Mllama's cross-attention layers are without an image)."""
    if layout.states:
        kinds = sorted({st.kind for st in layout.states})
        where = "beside keys and values" if layout.kv_layers != () else "(it caches no keys or values)"
        return (f"this model's recurrent layers (state-space, convolution or linear attention) keep "
                f"{', '.join(kinds)} states in the cache ({', '.join(layout.past_names()[:2])}, ...) {where}, which "
                "ONNX Runtime GenAI carries only for its own model types: the package is for flora_graph's Generator")
    if layout.indexed:
        return (f"this model's sparse attention caches its indexer's keys ({layout.past_names()[2]}, ...) beside keys "
                "and values, which ONNX Runtime GenAI does not carry: the package is for flora_graph's Generator")
    if uncached := layout.uncached_layers():
        return (f"this model's layers {uncached} keep no cache (cross-attention layers a text-only decoder skips), and "
                "ONNX Runtime GenAI expects keys and values for every layer: the package is for flora_graph's Generator")
    layers = range(layout.layers) if layout.kv_layers is None else layout.kv_layers
    wide = next(((key, value) for key, value in (layout.layer_kv(i)[1:] for i in layers) if key != value), None)
    if wide is None:
        return None
    return (f"ONNX Runtime GenAI sizes keys and values alike (head_size), and this model caches keys {wide[0]} wide and "
            f"values {wide[1]} wide (as multi-head latent attention and MiMo-V2 cache them): the package is for "
            "flora_graph's Generator")


def context_length(config: Any) -> int:
    """The positions a package of a model with ``config`` serves: ``max_position_embeddings`` (``n_positions``), times
    the factor of a ``dynamic`` (NTK) rotary, which scales its frequencies to reach past that length."""
    n = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) == "dynamic":
        factor = rope.get("factor")
        if isinstance(factor, int | float) and factor > 1:
            n = int(n * factor)
    return n


REFILL_KEY = "flora_graph.rope_refill_at"
"""Model metadata: the position at which a row's cache is computed again from all its tokens (see
:func:`refill_position`); :class:`~flora_graph.serving.generate.Generator` does so."""

UNCACHED_KEY = "flora_graph.uncached_layers"
"""Model metadata: the layers that keep nothing in the cache among the decoder's ``num_hidden_layers``
(:meth:`~flora_graph.frontend.causal_lm.CacheLayout.uncached_layers`), a JSON list, where there are such layers
(Mllama's cross-attention layers in a text-only decoder); :class:`~flora_graph.serving.generate.Generator` expects the
others' caches."""

REFILL_ARCHS = frozenset({"Phi3ForCausalLM"})
"""The classes whose transformers ``generate()`` drops the cache where their ``longrope`` rotary switches
to its long frequencies (``prepare_inputs_for_generation``), as ONNX Runtime GenAI does for ``phi3``."""


def refill_position(model: Any) -> int | None:
    """``original_max_position_embeddings`` of a ``longrope`` model: once a call's positions pass it, the rotary
    takes its long frequency set, and the cache, rotated by the short one, is computed again from all the
    tokens (transformers and GenAI do so for Phi-3); ``None`` for any other rotary."""
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict) or (rope.get("rope_type") or rope.get("type")) != "longrope":
        return None
    limit = rope.get("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
    return int(limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _marked(model: Any, marks: dict[str, str]) -> Any:
    """``model`` with ``marks`` in its metadata (:data:`REFILL_KEY`, :data:`UNCACHED_KEY`)."""
    if marks:
        from onnx import helper

        props = {p.key: p.value for p in model.metadata_props}
        helper.set_model_props(model, {**props, **marks})
    return model


def _has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer's files (a fast tokenizer's, a SentencePiece model, a BPE vocabulary; T5's,
    Marian's and mBART's SentencePiece models)."""
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                                                "source.spm", "sentencepiece.bpe.model"))


def _end_of_turn(base: Path, vocab: int, say: Callable[[str], None]) -> int | None:
    """The id of the end-of-text token of ``base``'s tokenizer; ``None`` without tokenizer files (or one
    that does not load, saying so)."""
    if not _has_tokenizer(base):
        return None
    try:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(base, local_files_only=True).eos_token_id
    except Exception as exc:  # a tokenizer that does not load takes nothing else down
        say(f"the tokenizer of {base} does not load ({type(exc).__name__}: {exc}); end-of-text ids from the config only")
        return None
    return eos if isinstance(eos, int) and 0 <= eos < vocab else None


def add_adapters(package: str | Path, base: str | Path, adapters: Mapping[str, str | Path], *, replace: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the PEFT ``adapters`` (``{name: folder}``) into the package ``package`` that :func:`export_genai` made
    of the model folder ``base``, as ``adapters/NAME.onnx_adapter`` files with their checksums, without
    exporting the model again: a new fine-tune served by GenAI and the Generator beside the others. Their
    target modules must be among the package's slots (the modules its first adapters targeted); ranks are free.

    Everything is checked before any file is written: names that cannot be file names, folders that are not
    PEFT LoRA folders, a package without adapter slots, a name the package has (unless ``replace``), an
    adapter on a module without a slot or of another shape. Raises
    :class:`~flora_graph.errors.FloraGraphError` subclasses naming the culprit. Returns ``{name: file}``.
    """
    import onnx

    from flora_graph.model_export import check_adapter_folder, check_model_folder, load_model
    from flora_graph.serving.adapter_file import spec_of, write_adapter
    from flora_graph.serving.errors import ServingError
    from flora_graph.serving.slots import METADATA_KEY, check_params

    say = progress or (lambda msg: None)
    pkg, adapters = Path(package), dict(adapters)
    if not adapters:
        raise AdapterError("no adapters to add")
    for name, folder in adapters.items():
        check_name(name, "adapter name", error=AdapterError)
        check_adapter_folder(folder)
    if not (pkg / GENAI_CONFIG).is_file() or not (pkg / MODEL_FILE).is_file():
        raise ServingError(f"{pkg}: not a GenAI package (no {GENAI_CONFIG} or {MODEL_FILE}); export it with "
                           "flora-graph export BASE --task text-generation-with-past --format genai")
    model_proto = onnx.load(str(pkg / MODEL_FILE), load_external_data=False)
    if METADATA_KEY not in {p.key for p in model_proto.metadata_props}:
        raise ServingError(f"{pkg}: exported without adapters, its model has no adapter slots; export it again "
                           "with its adapters")
    spec = spec_of(model_proto)
    files = {name: pkg / ADAPTERS_DIR / f"{name}.onnx_adapter" for name in adapters}
    taken = sorted(n for n, f in files.items() if f.exists())
    if taken and not replace:
        raise AdapterError(f"{pkg} already has adapter(s) {taken}; pass replace=True (--replace) to write them again")
    check_model_folder(base)
    say(f"loading the model of {base}")
    from flora_graph.serving.text_decoder import text_decoder

    model = load_model(base).model
    # a module without a slot in the package is refused (check_params), not left out: the package may have been
    # exported with other modules adapted, which only a capture of the model could tell from one it never reads
    params = _adapter_params(model, adapters, say, text_decoder(model))
    for name, p in params.items():  # every adapter checked before the first is written
        check_params(p, spec, name, cast=True)
    (pkg / ADAPTERS_DIR).mkdir(exist_ok=True)
    for name, p in params.items():
        say(f"writing adapter {name}")
        write_adapter(files[name], p, model=model_proto, name=name)
    return files


def _fit_config(doc: dict[str, Any], model: Any) -> None:
    """Make ``doc`` (a :func:`genai_config`) name only the inputs ``model`` takes, and share the past and
    present cache buffers where its attention is ``GroupQueryAttention`` (right-padded caches)."""
    from flora_graph.runtimes.ort_contrib import CACHE_PADDING_KEY

    takes = {i.name for i in model.graph.input}
    inputs = doc["model"]["decoder"]["inputs"]
    for key in [k for k in ("position_ids",) if k in inputs and inputs[k] not in takes]:
        del inputs[key]
    props = {p.key: p.value for p in model.metadata_props}
    doc["search"]["past_present_share_buffer"] = props.get(CACHE_PADDING_KEY) == "right"


def merged_base(model: Any, base: str | Path, merge: str | Path | None, say: Callable[[str], None],
                note: Callable[[str], None]) -> tuple[Any, Path]:
    """``(model, the folder of the package's tokenizer files)``: ``model`` loaded from ``base`` with the PEFT folder
    ``merge`` baked into its weights (:func:`_merged`; as it is for ``None``), and ``merge`` itself where it holds
    tokenizer files (a merged fine-tune's own tokenizer wins: it trained with it), else ``base``; ``note`` says which,
    and that the base's tokenizer lacks the tokens a fine-tune added without saving its tokenizer."""
    if merge is None:
        return model, Path(base)
    vocab = int(model.config.get_text_config().vocab_size)
    model = _merged(model, Path(merge), say)
    if _has_tokenizer(Path(merge)):
        note(f"the tokenizer files of {merge}, saved beside the merged adapter, are the package's")
        return model, Path(merge)
    if int(model.config.get_text_config().vocab_size) != vocab:
        note(f"the package's tokenizer is {base}'s, without the tokens {merge} added (ids {vocab} and up): save "
             "the fine-tune's tokenizer beside it to ship them")
    return model, Path(base)


def _merged(model: Any, folder: Path, say: Callable[[str], None]) -> Any:
    """``model`` with the PEFT folder ``folder`` merged into its weights by PEFT (:func:`~flora_graph.adapters.peft.merge_peft`),
    its vocabulary first resized to the folder's (:func:`~flora_graph.adapters.peft.fit_vocab`)."""
    from flora_graph.adapters.peft import fit_vocab, merge_peft, peft_installed

    say(f"merging {folder} into the base weights")
    fit_vocab(model, folder, say)
    adapted = peft_installed(model, folder, "merge")
    return merge_peft(adapted).eval()


def install_sites(model: Any, params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Put a rank-1 adapter where the adapters ``params`` (``{name: {param: array}}``) have weights, so that capture
    sees a LoRA site there (the slots' weights are fed at run time); returns the sites' paths. The model was loaded
    for the export alone: its layers take the adapters in place, no copy. A parameter's path (LoRA on a mixture of
    experts' expert tensor, PEFT's ``target_parameters``) takes a parametrization instead of a layer wrapper."""
    from flora_graph.adapters import apply_lora
    from flora_graph.adapters.param_lora import apply_param_lora, is_param_path

    sites = sorted({k.rsplit(".", 1)[0] for p in params.values() for k in p})
    on_params = [p for p in sites if is_param_path(model, p)]
    if on_params:
        apply_param_lora(model, on_params, rank=1)
    if layers := [p for p in sites if p not in on_params]:
        apply_lora(model, layers, rank=1)
    return sites


def slot_options(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``optimize`` options that make the slots of the adapters ``params``: none without adapters; the modules of a
    DoRA adapter (a ``lora_magnitude`` among its weights) take its magnitude, those of an adapter with a bias (a
    ``lora_bias``) a bias."""
    if not any(params.values()):
        return {}

    def having(suffix: str) -> list[str]:
        return sorted({k.removesuffix(suffix) for p in params.values() for k in p if k.endswith(suffix)})

    return {"slots": "swappable", "dora": having(".lora_magnitude"), "bias": having(".lora_bias")}


def _adapter_params(model: Any, adapters: Mapping[str, str | Path], say: Callable[[str], None],
                    text: TextDecoder | None = None, note: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Each adapter's parameters read on ``model`` (as loaded), named as the package's graph names its slots: by
    ``text``'s module paths where the package is a multimodal model's text decoder (``note`` told of the modules
    outside it, left out, and of the modules an adapter trains whole, with their size)."""
    note = note or say
    from flora_graph.passes.adapter_slots import weight_names
    from flora_graph.serving.slots import peft_adapter_params
    from flora_graph.serving.text_decoder import text_params

    out = {}
    for name, folder in adapters.items():
        say(f"reading adapter {name} from {folder}")
        whole: list[str] = []
        out[name] = peft_adapter_params(model, folder, saved=whole)
        if whole:  # a full-rank slot is as large as its module: worth saying
            size = sum(out[name][k].nbytes for m in whole for k in weight_names(m))
            note(f"adapter {name}: {', '.join(whole)} trained whole (modules_to_save) swap as slots of full rank, "
                 f"{size / 2**20:.1f} MB of its file; a step with it active computes their change once more")
        if text is not None:
            out[name], dropped = text_params(out[name], text.paths)
            if not out[name]:
                raise AdapterError(f"adapter {name!r} ({folder}) adapts none of {type(text.model).__name__}'s "
                                   f"modules (only {', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}), "
                                   "so it cannot change a text generation")
            if dropped:
                note(f"adapter {name}: {len(dropped)} module(s) outside the text decoder left out "
                    f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}): they cannot change a text "
                    "generation")
    return out


def _read_sites(params: dict[str, dict], slots: list[Any], say: Callable[[str], None]) -> dict[str, dict]:
    """``params`` (each adapter's, read on the model) without the adapted modules that have no slot among ``slots``
    (:class:`~flora_graph.serving.slots.LoRASlot` of the graph just captured with every adapted module in place): a
    module the model never calls, reading its weight directly (a Mamba layer's ``dt_proj``), where eager PEFT's
    adapter takes no part either. Raises :class:`AdapterError` for an adapter left with none."""
    slotted = {m for s in slots for m in (s.members or (s.module,))}
    sites = sorted({k.rsplit(".", 1)[0] for p in params.values() for k in p})
    unread = [site for site in sites if site not in slotted]
    if not unread:
        return params
    say(f"{len(unread)} adapted module(s) take no part in the model's computation (it never calls them: it reads their "
        f"weight directly, or skips them, as a decoder without an encoder skips its cross-attention; so under eager "
        f"PEFT too), left out: {', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}")
    out = {name: {k: v for k, v in p.items() if k.rsplit(".", 1)[0] not in unread} for name, p in params.items()}
    for name, p in out.items():
        if not p:
            raise AdapterError(f"adapter {name!r} adapts only modules that take no part in the model's computation "
                               f"({', '.join(unread[:3])}): it cannot change a generation")
    return out


def text_part(base: str | Path) -> type | None:
    """The causal LM class of the text part of the multimodal model folder ``base`` (its config's
    ``text_config``), or ``None``; reads the config only."""
    import transformers

    from flora_graph.serving.text_decoder import text_causal_lm_class

    try:
        config = transformers.AutoConfig.from_pretrained(base, local_files_only=True)
    except Exception:  # a config transformers cannot read: check_model_folder and the load say why
        return None
    return text_causal_lm_class(config)
