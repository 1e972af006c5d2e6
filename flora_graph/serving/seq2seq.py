"""Encoder-decoder generation packages (T5, BART, Marian, Pegasus, Whisper, ...) with hot-swappable LoRA adapters.

:func:`export_seq2seq` goes from a transformers model folder and PEFT adapter folders to::

    OUT/seq2seq_config.json              sizes, special tokens, position limits, search defaults
    OUT/encoder.onnx                     the encoder and every decoder layer's cross-attention keys and values
    OUT/decoder.onnx                     the decoder with its self-attention cache (one model: first and later steps)
    OUT/encoder.mixed.onnx, decoder.mixed.onnx
                                         with adapters (unless ``mixed=False``): the same models serving rows with
                                         different adapters in one call (stacked adapters, a per-row ``adapter_index``)
    OUT/model.onnx.data                  the weights of all, each stored once (T5's shared embedding, the base
                                         weights the mixed models read)
    OUT/adapters/NAME.encoder.onnx_adapter, NAME.decoder.onnx_adapter
                                         each adapter's weights for each model (a file only where the adapter
                                         adapts one of its modules), with their ``.sha256`` checksums
    OUT/tokenizer.json, ...              the tokenizer files of the base folder, copied

The graphs are :func:`~flora_graph.frontend.seq2seq_lm.capture_seq2seq`'s, optimized with the ``fused`` preset
for ONNX Runtime; every LoRA site of any adapter is an adapter slot (its ``A``/``B`` graph inputs with empty
defaults), so each model alone is the base model. A cross-attention's key and value projections live in the
encoder model (they run once per input), so their adapter weights go in the adapter's encoder file.
The folder is written through :func:`flora_graph.storage.staged_folder`: a reader sees the old package or
the new one, never a mix.

:class:`Seq2SeqGenerator` generates from such a package on plain ONNX Runtime: the encoder once per batch, then one
decoder call per step, greedy or sampled (:class:`~flora_graph.serving.generate.RowSettings`), the rows of a
batch padded on the encoder side only (every row's decoder starts at the decoder's start token, as transformers'
``generate`` runs it), a finished row leaving the batch, each row with its own adapter or none (rows that differ run
through the mixed-adapter models, one call a step). It applies what the model's generation config asks of a
greedy or sampled search (forced first and last tokens, suppressed tokens), as ``generate`` does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from flora_graph.errors import AdapterError, FloraGraphError
from flora_graph.serving.beam import BEAM_DEFAULTS, BeamSearch, Rules, beam_defaults, ngram_table, unapplied_settings
from flora_graph.serving.errors import ServingError, UnknownAdapterError
from flora_graph.serving.genai import SEARCH_DEFAULTS, copy_present, search_defaults
from flora_graph.serving.generate import GenerationError, Row, RowSettings, mixed_mode, pick_token, take_token
from flora_graph.serving.mixed import MixedAdapterSession
from flora_graph.serving.session import AdapterSession, OrtModel
from flora_graph.storage import check_name, staged_folder

__all__ = ["DECODER_FILE", "ENCODER_FILE", "SEQ2SEQ_CONFIG", "Seq2SeqGenerator", "Seq2SeqReport",
           "export_seq2seq", "seq2seq_classes"]

SEQ2SEQ_CONFIG = "seq2seq_config.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
DATA_FILE = "model.onnx.data"
MIXED_SUFFIX = ".mixed.onnx"
"""``encoder`` / ``decoder`` + this: the mixed-adapter model of each (rows with different adapters in one call)."""
UNMIXED_KEY = "unmixed"
"""The package config's record of the parts that have no mixed-adapter model although adapters adapt them: part ->
why (a slot whose input's rows are not the batch's, as a Swin encoder's windows)."""
ADAPTERS_DIR = "adapters"
PARTS = ("encoder", "decoder")
OPSET = 23


def seq2seq_classes() -> frozenset[str]:
    """The transformers classes an encoder-decoder generation package is made from (``AutoModelForSeq2SeqLM`` and
    ``AutoModelForSpeechSeq2Seq``'s, and ``VisionEncoderDecoderModel``: TrOCR's and Donut's image encoder and text
    decoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )

    return frozenset([*MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values(),
                      *MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values(), "VisionEncoderDecoderModel"])


def _owns(name: str) -> bool:
    return name == ADAPTERS_DIR or name.endswith(MIXED_SUFFIX)  # written only where the package has adapters


@dataclass
class Seq2SeqReport:
    """What :func:`export_seq2seq` wrote: the folder, each adapter's files, the graphs' summaries, seconds per stage."""

    path: Path
    adapters: dict[str, list[Path]]
    summary: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    merged: Path | None = None  # the PEFT folder baked into the base weights (export_seq2seq's merge)


def _token_ids(value: Any, vocab: int) -> list[int]:
    values = value if isinstance(value, list | tuple) else [value]
    return [int(t) for t in values if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab]


SEQ2SEQ_APPLIED = frozenset({*SEARCH_DEFAULTS, *BEAM_DEFAULTS, "min_length", "forced_bos_token_id",
                             "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids"})
"""The generation config's token-choosing settings an encoder-decoder package carries (:func:`package_config`)."""


def package_config(model: Any, layout: Any) -> dict[str, Any]:
    """The ``seq2seq_config.json`` document of a package of ``model`` (its config and generation config; the
    generation config's values first, as transformers' ``generate`` reads them) with cache ``layout``."""
    from flora_graph.frontend.seq2seq_lm import vocab_size

    cfg, gen = model.config, getattr(model, "generation_config", None)
    vocab = vocab_size(cfg, "decoder")

    def first(key: str) -> Any:
        for source in (gen, cfg):
            v = getattr(source, key, None)
            if v is not None:
                return v
        return None

    def one(key: str) -> int | None:
        ids = _token_ids(first(key), vocab)
        return ids[0] if ids else None

    bad = [w[0] for w in (first("bad_words_ids") or []) if isinstance(w, list | tuple) and len(w) == 1]
    speech = layout.main_input == "input_features"

    def limit(*keys: str) -> int | None:
        return next((int(getattr(cfg, k)) for k in keys if isinstance(getattr(cfg, k, None), int)), None)

    return {
        "model_type": type(model).__name__,
        "vocab_size": vocab,
        "layers": layout.layers,
        "heads": layout.heads,
        "head_dim": layout.head_dim,
        "cross_heads": layout.cross_heads,
        "cross_head_dim": layout.cross_head_dim,
        "main_input": layout.main_input,
        "encoder_mask": layout.encoder_mask,
        "feature_shape": list(layout.feature_shape),
        "encoder": ENCODER_FILE,
        "decoder": DECODER_FILE,
        # generate's own fallback: the start token, else the beginning-of-text one (T5Gemma names only that)
        "decoder_start_token_id": next((t for t in (one("decoder_start_token_id"), one("bos_token_id")) if t is not None),
                                       0),
        "eos_token_id": _token_ids(first("eos_token_id"), vocab),
        "pad_token_id": one("pad_token_id"),
        "max_source_positions": None if speech else limit("max_source_positions", "max_position_embeddings"),
        "max_target_positions": limit("max_target_positions", "max_position_embeddings"),
        "search": {
            **search_defaults({k: getattr(gen, k, None) for k in SEARCH_DEFAULTS}),
            **beam_defaults({k: getattr(gen, k, None) for k in BEAM_DEFAULTS}),
            **({"num_beams": 1} if getattr(gen, "do_sample", False) else {}),  # no beam sampling: it samples one
            "min_length": int(getattr(gen, "min_length", None) or 0),
            "forced_bos_token_id": one("forced_bos_token_id"),
            "forced_eos_token_id": one("forced_eos_token_id"),
            "suppress_tokens": sorted(set(_token_ids(first("suppress_tokens") or [], vocab) + _token_ids(bad, vocab))),
            "begin_suppress_tokens": _token_ids(first("begin_suppress_tokens") or [], vocab),
        },
    }


def export_seq2seq(base: str | Path, out: str | Path, adapters: Mapping[str, str | Path] | None = None, *,
                   progress: Callable[[str], None] | None = None, mixed: bool = True,
                   stamp_layers: bool = True, merge: str | Path | None = None) -> Seq2SeqReport:
    """Write an encoder-decoder generation package of the transformers model folder ``base`` with the PEFT
    ``adapters`` (``{name: folder}``) as hot-swappable ``.onnx_adapter`` files; see the module docstring.

    ``merge``: a PEFT folder baked into the base weights first, by PEFT itself (``merge_and_unload``), as
    :func:`~flora_graph.serving.genai.export_genai` bakes one: any adapter PEFT merges, those no slot holds included
    (PEFT's other adapter types, DoRA on an embedding, ...); ``adapters`` swap on top of it.

    ``mixed=False`` leaves out the mixed-adapter models (``encoder.mixed.onnx``, ``decoder.mixed.onnx``: rows
    with different adapters in one batch), which ONNX Runtime holds with their own copy of the base weights.
    ``stamp_layers=False`` traces every layer; by default the decoder's first layers are traced and the others
    stamped from them, and a text model's encoder layers too (:func:`~flora_graph.frontend.seq2seq_lm.capture_seq2seq`:
    the same graphs, checked).

    Every argument and folder is checked before the model loads (an adapter name that cannot be a file name, a
    folder that is not a PEFT LoRA folder or changes more than a slot swaps, a model class that is not an
    encoder-decoder generation model). Raises :class:`~flora_graph.errors.FloraGraphError` subclasses naming the
    culprit; on failure nothing at ``out`` changes.
    """
    from flora_graph.model_export import check_adapter_folder, check_model_folder
    from flora_graph.serving.genai import (
        TOKENIZER_FILES,
        _adapter_params,
        _read_sites,
        install_sites,
        merged_base,
        slot_options,
    )

    say = progress or (lambda msg: None)
    adapters = dict(adapters or {})
    arch = check_model_folder(base)
    if arch not in seq2seq_classes():
        raise FloraGraphError(f"{base}: {arch} is not an encoder-decoder generation model (a class transformers' "
                              "AutoModelForSeq2SeqLM or AutoModelForSpeechSeq2Seq builds)")
    for name, folder in adapters.items():
        check_name(name, "adapter name", error=AdapterError)
        check_adapter_folder(folder)
    if merge is not None:
        check_adapter_folder(merge)
    seconds: dict[str, float] = {}
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        say(msg)

    t0 = time.perf_counter()
    say(f"loading {arch} from {base}")
    from flora_graph.model_export import load_transformers

    model, tokenizer_from = merged_base(load_transformers(base), base, merge, say, note)
    params = _adapter_params(model, adapters, say, note=note)
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("capturing the encoder and the decoder with its cache")
    from flora_graph.frontend.seq2seq_lm import capture_seq2seq, seq2seq_layout

    layout = seq2seq_layout(model)
    sites = install_sites(model, params)
    graphs = dict(zip(PARTS, capture_seq2seq(model, name=arch, share_weights=True, layout=layout,
                                             stamp_layers=stamp_layers), strict=True))
    doc = package_config(model, layout)
    skipped = unapplied_settings(getattr(model, "generation_config", None), SEQ2SEQ_APPLIED)
    if skipped:
        note(f"the generation config's {', '.join(skipped)}: not applied by the package (eager generate applies them)")
    model = SimpleNamespace(config=model.config)  # the graphs' weights keep the tensors alive: the model is its config
    seconds["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("optimizing (fused, adapter slots)")
    from flora_graph.passes import optimize
    from flora_graph.serving.slots import graph_slots

    slotted = slot_options(params)
    unpacked = {part: optimize(g, "fused", backend="onnxruntime", **slotted) for part, g in graphs.items()}
    modules = {part: {m for s in graph_slots(g) for m in (s.members or (s.module,))} for part, g in unpacked.items()}
    if sites:
        params = _read_sites(params, [s for g in unpacked.values() for s in graph_slots(g)], note)
    final = {part: optimize(g, [*(["pack-slots"] if modules[part] else []), "pack-linears", "cse", "dce"])
             for part, g in unpacked.items()}
    seconds["optimize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    written: dict[str, list[Path]] = {}
    with staged_folder(out, what="encoder-decoder package", last=SEQ2SEQ_CONFIG, owns=_owns) as tmp:
        from flora_graph.runtimes.onnx_lowering import lower
        from flora_graph.runtimes.onnx_writer import SharedData
        from flora_graph.serving.export import lower_slotted

        with SharedData(tmp, DATA_FILE) as data:
            for part, g in final.items():
                say(f"writing the {part}")
                lowered = (lower_slotted(g, "swappable", opset=OPSET, contrib=True) if modules[part]
                           else lower(g, OPSET, contrib=True))
                data.write(*lowered, f"{part}.onnx")
                if modules[part] and mixed:  # slots unpacked, base layers packed (as a GenAI package's mixed.onnx)
                    say(f"writing the mixed-adapter {part}")
                    try:
                        lowered = lower_slotted(optimize(unpacked[part], ["pack-linears", "cse", "dce"]), "mixed",
                                                opset=OPSET, packed=[s for s in graph_slots(g) if s.members],
                                                contrib=True)
                    except ServingError as exc:  # a slot whose rows are not the batch's (Swin's windows)
                        doc.setdefault(UNMIXED_KEY, {})[part] = str(exc)
                        note(f"no mixed-adapter {part}: {exc}; its rows take one adapter a call")
                        continue
                    data.write(*lowered, f"{part}{MIXED_SUFFIX}")
        if params:
            from flora_graph.serving.adapter_file import write_adapter

            (tmp / ADAPTERS_DIR).mkdir()
            for name, p in params.items():
                say(f"writing adapter {name}")
                for part in PARTS:
                    mine = {k: v for k, v in p.items() if k.rsplit(".", 1)[0] in modules[part]}
                    if mine:
                        file = f"{name}.{part}.onnx_adapter"
                        write_adapter(tmp / ADAPTERS_DIR / file, mine, model=tmp / f"{part}.onnx", name=name)
                        written.setdefault(name, []).append(Path(out) / ADAPTERS_DIR / file)
        # and T5's / Marian's / mBART's tokenizer vocabularies, a speech model's feature extractor
        tokenizer = (*TOKENIZER_FILES, "spiece.model", "source.spm", "target.spm", "sentencepiece.bpe.model")
        copy_present(base, tmp, ("generation_config.json", "preprocessor_config.json"))
        copy_present(tokenizer_from, tmp, [f for f in tokenizer if f != "generation_config.json"])
        (tmp / SEQ2SEQ_CONFIG).write_text(json.dumps(doc, indent=2))
    seconds["write"] = time.perf_counter() - t0
    summary = "\n".join(f"{part}: {g.summary()}" for part, g in final.items())
    return Seq2SeqReport(Path(out), written, summary, seconds, notes, merged=None if merge is None else Path(merge))


class _BaseOnly:
    """A part of a package whose model has no LoRA inputs (exported without adapters, or one that no adapter
    adapts): it serves the base alone, as :class:`AdapterSession` serves with no adapter active."""

    def __init__(self, model: OrtModel, part: str) -> None:
        self.model, self.part = model, part

    def run(self, feeds: dict[str, np.ndarray], adapter: str | None, *, prepared: bool = False) -> dict[str, np.ndarray]:
        return self.model.run(feeds, None, lambda: f"{self.part} step")


class Seq2SeqGenerator:
    """Greedy, sampled and beam search generation from an encoder-decoder package (:func:`export_seq2seq`) on plain
    ONNX Runtime, with its model's generation config (:attr:`defaults`, :attr:`rules`) unless a call sets otherwise.

    Args:
        package: the folder :func:`export_seq2seq` wrote; its adapters are loaded.
        threads: ONNX Runtime intra-op threads (no spinning).
        require_checksum: refuse adapter files without a checksum file.
        huge_pages: back the sessions' weights with huge pages where Linux can
            (:func:`~flora_graph.runtimes.huge_pages.huge_pages`); ``False``: leave them in small pages.
        mixed: how the package's mixed-adapter models (``encoder.mixed.onnx``, ``decoder.mixed.onnx``) are used, as
            :class:`~flora_graph.serving.generate.Generator` takes it. ``"lazy"``: each loads on the first call
            whose rows use different adapters, beside the part's own model, which serves the calls whose rows share
            one adapter (or none); ``True``: the same, loaded with the generator; ``False``: never (rows with
            different adapters raise :class:`ServingError`); ``"only"``: each part's mixed model serves every row
            and the part's own model is not loaded, so the base weights are held once instead of twice. ``"auto"``
            (the default): ``"only"`` for a package whose models and data reach
            :data:`~flora_graph.serving.generate.MIXED_ONLY_BYTES`, else ``"lazy"``.

    Attributes:
        defaults: the package's search settings (its model's generation config), the :class:`RowSettings` of a
            call that does not set them (``num_beams`` above 1: beam search, as ``generate`` does by default).
        rules: the package's fixed score rules (:class:`~flora_graph.serving.beam.Rules`: forced first and last
            tokens, suppressed tokens, ``min_length``).
        eos: the package's end-of-text ids, a row's stop tokens unless it sets others.
        start: the decoder's start token, every row's first decoder token unless a call gives a decoder prompt.

    Raises :class:`ServingError` naming the file for a package it cannot read.
    """

    def __init__(self, package: str | Path, *, threads: int | None = 1, require_checksum: bool = True,
                 huge_pages: bool = True, mixed: bool | str = "auto") -> None:
        from flora_graph.frontend.seq2seq_lm import Seq2SeqLayout

        self.package = Path(package)
        path = self.package / SEQ2SEQ_CONFIG
        try:
            doc = json.loads(path.read_text())
            self.layout = Seq2SeqLayout(int(doc["layers"]), int(doc["heads"]), int(doc["head_dim"]),
                                        int(doc["cross_heads"]), int(doc["cross_head_dim"]), str(doc["main_input"]),
                                        bool(doc["encoder_mask"]),
                                        tuple(None if d is None else int(d) for d in doc["feature_shape"]))
            self.vocab = int(doc["vocab_size"])
            self.start = int(doc["decoder_start_token_id"])
            self.eos = frozenset(int(t) for t in doc["eos_token_id"])
            self.pad = int(doc["pad_token_id"]) if doc.get("pad_token_id") is not None else 0
            self.max_source = doc.get("max_source_positions")
            self.max_target = doc.get("max_target_positions")
            search = doc["search"]
            self.defaults = {**search_defaults(search), **beam_defaults(search)}
            forced = [None if search.get(k) is None else int(search[k]) for k in ("forced_bos_token_id",
                                                                                  "forced_eos_token_id")]
            self.rules = Rules(suppress=np.asarray(search.get("suppress_tokens") or [], np.int64),
                               begin_suppress=np.asarray(search.get("begin_suppress_tokens") or [], np.int64),
                               forced_bos=forced[0], forced_eos=forced[1], min_length=int(search.get("min_length") or 0))
            files = {part: self.package / str(doc[part]) for part in PARTS}
            self._unmixed = {str(k): str(v) for k, v in (doc.get(UNMIXED_KEY) or {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ServingError(f"{path}: not an encoder-decoder package config ({type(exc).__name__}: {exc})") from None
        options = {"intra_op_threads": threads, "inter_op_threads": 1, "huge_pages": huge_pages}
        found: dict[str, dict[str, Path]] = {}
        for p in sorted((self.package / ADAPTERS_DIR).glob("*.onnx_adapter")):
            name, _, part = p.name.removesuffix(".onnx_adapter").rpartition(".")
            if part in PARTS and name:
                found.setdefault(name, {})[part] = p
        self._files = {name: dict(parts) for name, parts in found.items()}
        self._mixed_paths = {part: self.package / f"{part}{MIXED_SUFFIX}" for part in PARTS}
        self._mixed_mode = mixed_mode(mixed, self.package, mixed_files=list(self._mixed_paths.values()),
                                      weight_files=[*files.values(), self.package / DATA_FILE], adapters=bool(found),
                                      small="lazy")
        # rows sharing an adapter run together on its weights (Linear slots), the other slots on each row's own;
        # rows that share none on a per-row session, where the parts' own models hold the base weights twice anyway
        self._mixed_options = {"require_checksum": require_checksum, "per_row_weights": True, "group_rows": True,
                               "distinct_rows_per_row": self._mixed_mode != "only", **options}
        self._mixed: dict[str, MixedAdapterSession | None] = {}
        # None: the part's mixed model serves every row (mixed="only"), its own model is not loaded
        self.models: dict[str, AdapterSession | _BaseOnly | None] = {}
        for part in PARTS:  # a model without slots serves the base alone (an adapter that adapts nothing there)
            if self._mixed_mode == "only" and self._mixed_paths[part].is_file():
                self.models[part] = None
                self._mixed_session(part)
                continue
            model = OrtModel(files[part], **options)
            if not model.spec:
                stray = sorted(str(parts[part]) for parts in found.values() if part in parts)
                if stray:
                    raise ServingError(f"{files[part]} has no LoRA inputs, yet the package has adapter files for it: "
                                       f"{stray}")
                self.models[part] = _BaseOnly(model, part)
                continue
            self.models[part] = session = AdapterSession(model, require_checksum=require_checksum)
            for name, parts in found.items():
                if part in parts:
                    session.load_adapter(name, parts[part])
        if self._mixed_mode is True:  # loaded and checked now
            for part in PARTS:
                self._mixed_session(part)
        self._past = self.layout.past_names()
        self._present = self.layout.present_names()
        dec = self._model("decoder")
        missing = [n for n in self.layout.decoder_inputs() if n not in dec.inputs]
        missing += [n for n in ["logits", *self._present] if n not in dec.output_names]
        enc = self._model("encoder")
        missing += [n for n in self.layout.encoder_inputs() if n not in enc.inputs]
        missing += [n for n in self.layout.cross_names() if n not in enc.output_names]
        if missing:
            raise ServingError(f"{self.package}: its models do not match {path}: they lack {missing}")

    def _model(self, part: str) -> Any:
        served = self.models[part]
        return self._mixed[part].model if served is None else served.model

    @property
    def adapter_names(self) -> list[str]:
        """The adapters the package serves."""
        return sorted(self._files)

    def _mixed_session(self, part: str) -> MixedAdapterSession | None:
        """``part``'s mixed-adapter model with every adapter's file for it, loaded on first use; ``None`` where the
        package has none (``export_seq2seq(mixed=False)``, or a model no adapter adapts) or the generator was made
        with ``mixed=False``."""
        if self._mixed_mode is False:
            return None
        if part not in self._mixed:
            path = self._mixed_paths[part]
            files = {name: parts[part] for name, parts in self._files.items() if part in parts}
            self._mixed[part] = MixedAdapterSession(path, files, **self._mixed_options) if path.is_file() else None
        return self._mixed[part]

    def _run(self, part: str, feeds: dict[str, np.ndarray], adapters: list[str | None]) -> dict[str, np.ndarray]:
        """One call of the ``part`` model on feeds built in its dtypes, row ``i`` with ``adapters[i]`` where that
        adapter adapts the model (else the base): the model with one adapter active where the rows agree, its mixed
        model where they do not."""
        names = [a if a is not None and part in self._files[a] else None for a in adapters]
        served = self.models[part]
        if served is not None and all(n == names[0] for n in names):
            return served.run(feeds, names[0], prepared=True)
        mixed = self._mixed_session(part)
        if mixed is None:
            why = ("this generator was made with mixed=False" if self._mixed_mode is False
                   else f"its {part} has none: {self._unmixed[part]}" if part in self._unmixed
                   else "export it again without --no-mixed")
            raise ServingError(f"{self.package}: rows with different adapters need its mixed-adapter models "
                               f"({part}{MIXED_SUFFIX}); {why}")
        return mixed.run(feeds, names, prepared=True)

    def _row_adapters(self, adapters: str | Sequence[str | None] | None, rows: int) -> list[str | None]:
        names = [adapters] * rows if adapters is None or isinstance(adapters, str) else list(adapters)
        if len(names) != rows:
            raise GenerationError(f"{len(names)} adapter names for {rows} inputs")
        for row, name in enumerate(names):
            if name is not None and name not in self._files:
                raise UnknownAdapterError(f"row {row}: adapter {name!r} is not in {self.package}; it serves "
                                          f"{self.adapter_names}")
        return names

    def encode(self, inputs: Sequence[Sequence[int]] | np.ndarray, adapters: str | Sequence[str | None] | None = None
               ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Run the encoder: each row's cross-attention keys and values (:meth:`Seq2SeqLayout.cross_names` order) and
        the encoder mask (``None`` for a speech model). ``inputs``: token id lists (right-padded here) or, for a
        speech model, one array ``[batch, ...]`` of its features or samples (``layout.feature_shape`` a row; rows are
        not masked, so a batch's rows are of one length). ``adapters``: one name (or ``None``) for every row, or one
        per row."""
        main, shape = self.layout.main_input, self.layout.feature_shape
        if main != "input_ids":
            try:
                feats = np.ascontiguousarray(np.asarray(inputs, np.float32))
            except (TypeError, ValueError) as exc:
                raise GenerationError(f"{main}: expected one array [batch, ...] ({exc})") from None
            if feats.ndim != 1 + len(shape) or not len(feats) or any(
                    want is not None and got != want for got, want in zip(feats.shape[1:], shape, strict=True)):
                dims = ", ".join("any" if d is None else str(d) for d in shape)
                raise GenerationError(f"{main} must be [batch, {dims}], got {list(feats.shape)}")
            out = self._run("encoder", {main: feats}, self._row_adapters(adapters, len(feats)))
            return [out[n] for n in self.layout.cross_names()], None
        rows = [[int(t) for t in row] for row in inputs]
        names = self._row_adapters(adapters, len(rows))
        for i, row in enumerate(rows):
            if not row:
                raise GenerationError(f"input {i} is empty")
            bad = [t for t in row if not 0 <= t < self.vocab]
            if bad:
                raise GenerationError(f"input {i}: token ids {bad[:3]} outside the vocabulary of {self.vocab}")
            if self.max_source is not None and len(row) > self.max_source:
                raise GenerationError(f"input {i} of {len(row)} tokens is past the encoder's {self.max_source} positions")
        if not rows:
            raise GenerationError("no inputs")
        width = max(map(len, rows))
        ids = np.full((len(rows), width), self.pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        out = self._run("encoder", {"input_ids": ids, "attention_mask": mask}, names)
        return [out[n] for n in self.layout.cross_names()], mask

    def generate(self, inputs: Sequence[Sequence[int]] | np.ndarray, *,
                 adapters: str | Sequence[str | None] | None = None, decoder_prompt: Sequence[int] | None = None,
                 on_token: Callable[[int, int], None] | None = None, **settings: Any) -> list[list[int]]:
        """The tokens generated for each input (token ids, or a speech model's features or samples), row ``i`` with
        ``adapters[i]`` (one name or ``None``: every row; ``None``: the base model). Rows with different adapters run
        in one call per step (the package's mixed-adapter models). With ``num_return_sequences`` ``n`` above 1, input
        ``i``'s ``n`` sequences (beam search's best hypotheses, or draws) are rows ``i * n`` to ``i * n + n - 1``.

        ``decoder_prompt``: every row's first decoder tokens (default: the decoder's start token; Whisper's
        task tokens go here). ``settings`` are :class:`RowSettings` fields; those not given are the package's
        (:attr:`defaults`; stop tokens: its end-of-text ids). A seeded row (``seed``: row ``i`` draws from
        ``seed + i``) draws the same tokens whatever else is in the batch. ``on_token(row, token)`` streams each
        token as it is chosen (with ``num_beams`` above 1, beam search, each input's tokens once its search has
        stopped). Raises :class:`GenerationError` for bad inputs or settings,
        :class:`UnknownAdapterError` for an adapter the package does not serve, before anything runs.
        """
        stops = settings.pop("stop_tokens", None)
        seed = settings.pop("seed", None)
        rs = RowSettings.of(self.defaults, settings,
                            stop_tokens=frozenset(int(t) for t in (self.eos if stops is None else stops)))
        prompt = [self.start] if decoder_prompt is None else [int(t) for t in decoder_prompt]
        if not prompt or any(not 0 <= t < self.vocab for t in prompt):
            raise GenerationError(f"decoder_prompt {prompt!r}: expected token ids below {self.vocab}")
        if self.max_target is not None and len(prompt) + rs.max_new_tokens - 1 > self.max_target:
            raise GenerationError(f"decoder prompt of {len(prompt)} tokens + max_new_tokens {rs.max_new_tokens} is past "
                                  f"the decoder's {self.max_target} positions")
        if rs.encoder_no_repeat_ngram_size and self.layout.main_input != "input_ids":
            raise GenerationError(f"encoder_no_repeat_ngram_size={rs.encoder_no_repeat_ngram_size}: this package's "
                                  f"encoder takes {self.layout.main_input}, not token ids")
        cross, mask = self.encode(inputs, adapters)
        names = self._row_adapters(adapters, cross[0].shape[0])
        sources = [ngram_table([int(t) for t in row], rs.encoder_no_repeat_ngram_size) for row in inputs] \
            if rs.encoder_no_repeat_ngram_size else None
        if rs.num_beams > 1:
            return self._beam_search(cross, mask, names, prompt, rs, on_token, sources)
        if (n := rs.num_return_sequences) > 1:  # draws: each input n times (encoded once), rows i * n + j
            cross = [np.repeat(a, n, axis=0) for a in cross]
            mask = None if mask is None else np.repeat(mask, n, axis=0)
            names = [a for a in names for _ in range(n)]
            sources = None if sources is None else [t for t in sources for _ in range(n)]
        batch = cross[0].shape[0]
        rows = [Row(i, names[i], rs, list(prompt), len(prompt),
                    np.random.default_rng(None if seed is None else seed + i)) for i in range(batch)]
        live = list(range(batch))
        own = self._empty_cache(batch)
        ids = np.asarray([prompt] * batch, np.int64)
        while live:
            out = self._run("decoder", self._decoder_feeds(ids, own, cross, mask), [rows[r].adapter for r in live])
            logits = out["logits"][:, -1]
            own = [out[n] for n in self._present]
            for j, r in enumerate(live):
                tok = take_token(rows[r], pick_token(rows[r], logits[j], self.rules, sources and sources[r]))
                if on_token is not None:
                    on_token(r, tok)
            keep = [j for j, r in enumerate(live) if not rows[r].done]
            if len(keep) < len(live):  # finished rows leave the batch
                live = [live[j] for j in keep]
                own = [a[keep] for a in own]
                cross = [a[keep] for a in cross]
                mask = None if mask is None else mask[keep]
            ids = np.asarray([[rows[r].next_token] for r in live], np.int64).reshape(len(live), 1)
        return [r.generated for r in rows]

    def _empty_cache(self, rows: int) -> list[np.ndarray]:
        """The decoder's self-attention caches of ``rows`` rows before the first step (no positions)."""
        return [np.zeros((rows, self.layout.heads, 0, self.layout.head_dim), np.float32)] * (2 * self.layout.layers)

    def _decoder_feeds(self, ids: np.ndarray, own: list[np.ndarray], cross: list[np.ndarray],
                       mask: np.ndarray | None) -> dict[str, np.ndarray]:
        """One decoder call's inputs: ``ids`` ``[rows, n]`` after the self-attention caches ``own``, attending to
        the encoder's ``cross`` keys and values (and ``mask``, a text encoder's)."""
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if mask is not None:
            feeds["encoder_attention_mask"] = mask
        for i in range(self.layout.layers):
            feeds[self._past[4 * i]], feeds[self._past[4 * i + 1]] = own[2 * i], own[2 * i + 1]
            feeds[self._past[4 * i + 2]], feeds[self._past[4 * i + 3]] = cross[2 * i], cross[2 * i + 1]
        return feeds

    def _beam_search(self, cross: list[np.ndarray], mask: np.ndarray | None, names: list[str | None], prompt: list[int],
                     rs: RowSettings, on_token: Callable[[int, int], None] | None,
                     sources: list[dict[tuple[int, ...], set[int]]] | None) -> list[list[int]]:
        """:meth:`generate` with ``rs.num_beams`` hypotheses per input (:class:`~flora_graph.serving.beam.BeamSearch`):
        each input's rows run together, the inputs in one call per step, an input leaving the batch when its search
        stops; ``on_token`` gets each input's tokens once its search has chosen them."""
        k, batch = rs.num_beams, cross[0].shape[0]
        search = BeamSearch([prompt] * batch, k, rs, rs.stop_tokens, self.rules, sources)
        cross = [np.repeat(a, k, axis=0) for a in cross]  # the beams of an input attend to the same encoding
        mask = None if mask is None else np.repeat(mask, k, axis=0)
        own = self._empty_cache(batch * k)
        ids = np.asarray([prompt] * (batch * k), np.int64)
        while True:
            ran = search.live
            out = self._run("decoder", self._decoder_feeds(ids, own, cross, mask), [names[i] for i in ran for _ in range(k)])
            search.step(out["logits"][:, -1])
            if search.done:
                break
            own = [out[n][search.reorder] for n in self._present]
            if len(search.live) < len(ran):  # inputs whose search stopped leave the batch
                rows = [j * k + b for j, i in enumerate(ran) if i in search.live for b in range(k)]
                cross = [a[rows] for a in cross]
                mask = None if mask is None else mask[rows]
            ids = search.tokens.reshape(-1, 1)
        results = [list(h) for r in search.result for h in r or []]
        if on_token is not None:
            for i, tokens in enumerate(results):
                for tok in tokens:
                    on_token(i, tok)
        return results
