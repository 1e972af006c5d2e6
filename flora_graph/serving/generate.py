"""Text generation on plain ONNX Runtime from a GenAI package, with mixed-adapter decoding.

:class:`Generator` loads a package written by :func:`~flora_graph.serving.genai.export_genai`
and manages the key/value cache itself: a batch of rows, each with its own prompt, adapter
(or none), sampling settings, stop tokens, ``max_new_tokens`` and ``min_new_tokens``. Rows of one step may use
different adapters: the package's ``mixed.onnx`` takes the adapters stacked per module and a
per-row ``adapter_index`` (:class:`~flora_graph.serving.mixed.MixedAdapterSession`; the Generator
serves it with ``group_rows``, the rows that share an adapter run on its weights together, and
``per_row_weights`` for the other slots, each set of rows' weights gathered once), so the
whole batch is one ONNX Runtime call per step; when every row uses the same adapter (or
none), the package's ``model.onnx`` runs with that adapter active. Rows join (:meth:`Batch.add`, which prefills
the prompt and pads the shorter side of the cache; :meth:`Batch.add_many`, several prompts in one prefill call
where the cache is right-padded) and leave (:meth:`Batch.remove`, or when they finish) between steps.

Padding is invisible to a row, so a row's tokens are those it would get alone. A package whose
models use ``GroupQueryAttention`` (metadata ``flora_graph.cache_padding = "right"``, what the
GenAI export writes for Llama-like decoders) takes each row's length from the attention mask:
every row's tokens start at cache position 0, the cache is right-padded, and each layer's cache
is one buffer that is past and present at once (:class:`~flora_graph.serving.shared_cache.SharedCache`),
appended to in place. Other packages are left-padded: the attention mask hides the padded
positions and position ids count a row's own tokens. A model whose recurrent layers keep fixed-size
states (``past.{i}.conv`` / ``past.{i}.recurrent``, ``past.{i}.conv.1``, ... where a layer keeps several:
state-space and convolution layers) has them
stacked row by row beside its keys and values, zeros for a row's empty cache; such a model is never
right-padded (its layers read the mask themselves). A sparse attention's indexer keys
(``past_key_values.{i}.indexer_key``, ``[batch, 1, past_seq, dim]``) are one head of keys to it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flora_graph.runtimes import huge_pages
from flora_graph.serving.beam import NO_RULES, BeamSearch, Rules, process_scores
from flora_graph.serving.errors import ServingError, UnknownAdapterError
from flora_graph.serving.shared_cache import SharedCache

__all__ = ["MIXED_MODES", "MIXED_ONLY_BYTES", "Batch", "GenerationError", "Generator", "Row", "RowSettings", "mixed_mode",
           "pick_token", "sampling_distribution", "take_token"]


MIXED_ONLY_BYTES = 256 * 2**20
"""A package's model and data of at least this many bytes: :class:`Generator` serves every row through its mixed
model (``mixed="auto"``), holding the base weights once. Below it the steps are short enough that the package's own
model, which skips the adapter slots for rows without one, is worth its second copy."""

MIXED_MODES = (True, False, "lazy", "only", "auto")
"""The ``mixed`` arguments of :class:`Generator` and :class:`~flora_graph.serving.seq2seq.Seq2SeqGenerator`."""


def mixed_mode(mixed: bool | str, package: Path, *, mixed_files: Sequence[Path], weight_files: Sequence[Path],
               adapters: bool, small: bool | str) -> bool | str:
    """The mode a generator serves ``package`` in for its ``mixed`` argument (one of :data:`MIXED_MODES`).

    ``mixed_files`` are the package's mixed models, ``weight_files`` the files whose bytes hold its models and weights,
    ``adapters`` whether it has adapter files. ``"auto"`` becomes ``"only"`` where the package has adapters and a mixed
    model and its weights reach :data:`MIXED_ONLY_BYTES`, else ``small``; the other modes stay as given. Raises
    :class:`ServingError` for another value, and for ``"only"`` where the package has no mixed model (or no adapters).
    """
    if mixed not in MIXED_MODES:
        raise ServingError(f"mixed must be True, False, 'lazy', 'only' or 'auto', got {mixed!r}")
    has_mixed = adapters and any(p.is_file() for p in mixed_files)
    if mixed == "only" and not has_mixed:
        names = " / ".join(p.name for p in mixed_files)
        raise ServingError(f"{package}: mixed='only' serves every row through the package's {names}, which it has not"
                           + ("" if adapters else " (a package without adapters)"))
    if mixed == "auto":
        weights = sum(p.stat().st_size for p in weight_files if p.is_file())
        return "only" if has_mixed and weights >= MIXED_ONLY_BYTES else small
    return mixed

_UNSERVED = "adapter {!r} stopped being served while the row decoded"
_INDEXER = re.compile(r"^past_key_values\.\d+\.indexer_key$")
"""A sparse attention layer's indexer keys among a model's inputs: ``[batch, 1, past_seq, dim]``, one head of keys."""


class GenerationError(ServingError):
    """A request the generator cannot serve (a prompt past the context, an empty prompt, bad settings)."""


@dataclass(frozen=True)
class RowSettings:
    """How one row generates: greedy unless ``do_sample``; sampling draws from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens (0: all) and the smallest set reaching ``top_p``. Until
    ``min_new_tokens`` tokens are out, the row's stop tokens cannot be chosen (as transformers'
    ``min_new_tokens`` and ONNX Runtime GenAI's ``min_length`` keep the end-of-text token out).
    ``repetition_penalty`` (1: none) divides the positive logits, and multiplies the negative ones, of
    every token already in the row, its prompt included, as transformers and ONNX Runtime GenAI do;
    ``no_repeat_ngram_size`` (0: none) keeps out every token that would repeat an n-gram of the row, and
    ``encoder_no_repeat_ngram_size`` (an encoder-decoder's) every token that would repeat one of its input.

    ``num_beams`` above 1 is beam search (:class:`~flora_graph.serving.beam.BeamSearch`, greedy only), with
    transformers' ``length_penalty`` (a finished hypothesis scores its summed log-probabilities over its
    length to this power) and ``early_stopping`` (``True``: an input stops at ``num_beams`` finished
    hypotheses; ``False``: when no running one can beat them at its current length; ``"never"``: at the
    length that could). ``num_return_sequences`` rows come back per prompt: the best hypotheses of beam
    search (at most ``num_beams``), or as many draws of sampling."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_tokens: frozenset[int] = frozenset()
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    @classmethod
    def of(cls, defaults: dict[str, Any], settings: dict[str, Any], **fixed: Any) -> RowSettings:
        """The settings a call asks for: ``settings`` over a package's ``defaults``, with ``fixed`` fields, checked;
        :class:`GenerationError` for an unknown setting or one out of range."""
        try:
            rs = cls(**fixed, **{**defaults, **settings})
        except TypeError as exc:
            raise GenerationError(f"unknown generation setting: {exc}") from None
        rs.check()
        return rs

    def check(self) -> None:
        """Raise :class:`GenerationError` naming the setting that is out of range."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if (isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int)
                or not 0 <= self.min_new_tokens <= self.max_new_tokens):
            raise GenerationError(f"min_new_tokens must be an int in [0, max_new_tokens={self.max_new_tokens}], "
                                  f"got {self.min_new_tokens!r}")
        if not self.temperature > 0:
            raise GenerationError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise GenerationError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty!r}")
        for name, low in (("no_repeat_ngram_size", 0), ("encoder_no_repeat_ngram_size", 0), ("num_beams", 1),
                          ("num_return_sequences", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise GenerationError(f"{name} must be an int >= {low}, got {v!r}")
        if self.num_return_sequences > 1 and not self.do_sample and self.num_return_sequences > self.num_beams:
            raise GenerationError(f"num_return_sequences={self.num_return_sequences}: at most num_beams="
                                  f"{self.num_beams} hypotheses to return (greedy search finds one; sampling draws any "
                                  "number)")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, int | float) \
                or not np.isfinite(self.length_penalty):
            raise GenerationError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise GenerationError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.do_sample:
            raise GenerationError(f"num_beams={self.num_beams} with do_sample: beam search here is greedy; "
                                  "set num_beams=1 to sample")


@dataclass
class Row:
    """One generation: its settings, its tokens (the prompt then the tokens chosen), its random stream."""

    rid: int
    adapter: str | None
    settings: RowSettings
    tokens: list[int]  # prompt + generated
    prompt_len: int
    rng: np.random.Generator
    next_token: int = -1
    done: bool = False
    error: str | None = None  # why the row finished early (its adapter stopped being served)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class Generator:
    """Greedy and sampled generation from a GenAI package folder on plain ONNX Runtime.

    Args:
        package: the folder :func:`~flora_graph.serving.genai.export_genai` wrote.
        threads: ONNX Runtime intra-op threads (no spinning).
        require_checksum: refuse adapter files without a checksum file.
        per_row_weights: rows with different adapters read their adapter weights gathered once per set
            of rows (``MixedAdapterSession(per_row_weights=True)``: faster steps, ``rows x`` one adapter's
            weights held meanwhile); ``False``: the mixed model gathers them in every step. With
            ``group_rows`` this applies to the weights that are not grouped (embedding and conv slots, DoRA magnitudes,
            slots' biases).
        group_rows: rows with different adapters run their ``Linear`` slots in groups, one per adapter
            (``MixedAdapterSession(group_rows=True)``; below :data:`MIXED_ONLY_BYTES`, rows that share no adapter
            run on a per-row session, ``distinct_rows_per_row``): each adapter's weights read once a step however many
            rows use it, and held once. ``benchmarks/generate.py --shared-rows N --shared-adapters K`` on its tiny
            Llama (one thread): 1.42x the tokens/s of per-row weights for 32 rows over 4 adapters, 1.09x for 8 over
            3; rows that share no adapter run per row (the grouped session was 0.92x for 8 rows over 8 adapters, two
            small gathers per slot); ``False``: per-row weights.
        mixed: how the package's mixed model (rows with different adapters in one batch) is used. ``True``: it
            loads with the Generator, beside the package's model, which serves the batches whose rows share one
            adapter (or none); ``"lazy"``: the same, loaded on the first step whose rows use different adapters;
            ``False``: never (such a step raises :class:`ServingError`); ``"only"``: it serves every row, the
            package's model is not loaded. Each model holds its own copy of the base weights in ONNX Runtime, so
            ``"only"`` holds half the memory of ``True``; on a 0.5B Qwen2 package (2 GB of weights, 2 threads) its
            steps and prefills ran as fast (one row with an adapter: 85.1 against 84.5 ms a step, a 64-token prefill
            465 against 450 ms; without an adapter 83.0 against 83.9 ms; four rows 96.5 against 101.1 ms), while on
            the benchmark's tiny Llama, whose steps are a fraction of a millisecond, rows without an adapter stepped
            12% slower (no branch that skips the slots) and prompts prefilled in up to 1.7x the time. ``"auto"``
            (the default): ``"only"`` for a package whose model and data reach :data:`MIXED_ONLY_BYTES`, else
            ``True``.
        huge_pages: back the sessions' weights, a mixed batch's per-row adapter weights and the key/value caches
            with huge pages where Linux can (:mod:`~flora_graph.runtimes.huge_pages`): on a 2-core VM an 8-row
            mixed-adapter batch ran 1.11-1.16x as fast, a one-row generation 0.99-1.03x, a 512 MB model's step
            1.21x; loading takes longer, about 3.5 ms per MB of weights there (``benchmarks/huge_pages.py``);
            ``False``: small pages.

    Attributes:
        defaults: the package's search settings (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
            ``repetition_penalty``: its model's generation config, what ONNX Runtime GenAI applies too),
            the :class:`RowSettings` of a row that does not set them.
        eos: the package's end-of-text ids, a row's stop tokens unless it sets others.
        refill_at: for a ``longrope`` Phi-3 package (metadata :data:`~flora_graph.serving.genai.REFILL_KEY`),
            the cache length at which a row runs all its tokens again from an empty cache, where its
            rotary switches to the long frequencies (transformers' and GenAI's Phi-3 recompute the cache
            there); ``None`` otherwise. Each row picks its frequency set from its own positions
            (:func:`~flora_graph.frontend.causal_lm.longrope_per_row`), so rows stay independent.
        max_step: the most new tokens the model takes a call (its ``dim_max`` of ``seq``, metadata
            :data:`~flora_graph.runtimes.onnx_lowering.DIM_MAX_KEY`: a Python loop over a scan's chunks,
            one chunk a call); a longer prompt is prefilled in pieces of that many; ``None``: any number.

    Raises :class:`ServingError` naming the file for a package it cannot read.
    """

    def __init__(self, package: str | Path, *, threads: int | None = 1, require_checksum: bool = True,
                 per_row_weights: bool = True, group_rows: bool = True, mixed: bool | str = "auto",
                 huge_pages: bool = True) -> None:
        from flora_graph.serving.genai import (
            ADAPTERS_DIR,
            GENAI_CONFIG,
            MIXED_FILE,
            MODEL_FILE,
            REFILL_KEY,
            UNCACHED_KEY,
            search_defaults,
        )

        self.package = Path(package)
        cfg_path = self.package / GENAI_CONFIG
        try:
            doc = json.loads(cfg_path.read_text())
            dec = doc["model"]["decoder"]
            self.layers = int(dec["num_hidden_layers"])
            self.kv_heads = int(dec["num_key_value_heads"])
            self.head_dim = int(dec["head_size"])
            self.context_length = int(doc["model"]["context_length"])
            eos = doc["model"].get("eos_token_id")
            self.takes_position_ids = "position_ids" in dec["inputs"]
            search = doc.get("search") if isinstance(doc.get("search"), dict) else {}
            self.defaults = search_defaults(search)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ServingError(f"{cfg_path}: not a GenAI package config ({type(exc).__name__}: {exc})") from None
        self.eos = frozenset(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        adapter_files = {p.name.removesuffix(".onnx_adapter"): p
                         for p in sorted((self.package / ADAPTERS_DIR).glob("*.onnx_adapter"))}
        self._huge_pages = huge_pages
        options = {"intra_op_threads": threads, "inter_op_threads": 1, "huge_pages": huge_pages}
        from flora_graph.serving.session import AdapterSession, OrtModel

        # one adapter (or none) for every row: the package's model, with that adapter active;
        # rows with different adapters: the mixed model, one call for the whole batch
        self._single: AdapterSession | None = None
        self._plain: OrtModel | None = None
        mixed = mixed_mode(mixed, self.package, mixed_files=[self.package / MIXED_FILE],
                           weight_files=sorted(self.package.glob(f"{MODEL_FILE}*")), adapters=bool(adapter_files),
                           small=True)
        self._mixed_only = mixed == "only"
        if adapter_files and not self._mixed_only:
            self._single = AdapterSession(self.package / MODEL_FILE, require_checksum=require_checksum, **options)
            for name, path in adapter_files.items():
                self._single.load_adapter(name, path)
        elif not adapter_files:  # a package without adapters: the model has no LoRA inputs
            self._plain = OrtModel(self.package / MODEL_FILE, **options)
        self._mixed_mode = mixed
        self._mixed_file = self.package / MIXED_FILE if adapter_files and mixed is not False else None
        # below MIXED_ONLY_BYTES the base weights are held twice anyway (the package's model beside the mixed one):
        # rows that share no adapter run on a per-row session of the mixed model, where grouping gains nothing
        self._mixed_options = {"per_row_weights": per_row_weights, "group_rows": group_rows,
                               "distinct_rows_per_row": not self._mixed_only,
                               "require_checksum": require_checksum, **options}
        self._mixed_session = None
        self._adapter_files: dict[str, Path] = dict(adapter_files)  # the adapters served, in load order
        from flora_graph.runtimes.ort_contrib import CACHE_PADDING_KEY, STATE_INPUT

        if self._mixed_only:  # every row through the mixed model: it is the model the steps are built for
            from flora_graph.serving.mixed import MixedAdapterSession

            self._mixed_session = MixedAdapterSession(self._mixed_file, self._adapter_files, **self._mixed_options)
        model = (self._plain if self._plain is not None else self._single.model if self._single is not None
                 else self._mixed_session.model)
        # keys and values per layer, and the fixed-size states of recurrent layers (state-space or convolution
        # layers: "past.{i}.conv" / ".recurrent"), which only the layers with keys and values lack
        states = [n for n in model.inputs if STATE_INPUT.match(n)]
        uncached = set(json.loads(model.metadata.get(UNCACHED_KEY, "[]")))  # Mllama's cross-attention layers
        kv = [f"past_key_values.{i}.{kv}" for i in range(self.layers) if i not in uncached for kv in ("key", "value")]
        if states:
            kv = [n for n in kv if n in model.inputs]
        kv += [n for n in model.inputs if _INDEXER.match(n)]  # sparse attention's indexer keys grow as keys do
        order = {n: i for i, n in enumerate(model.inputs)}
        self._past = sorted(kv + states, key=lambda n: order.get(n, len(order)))
        self._present = ["present." + n.removeprefix("past_key_values.").removeprefix("past.") for n in self._past]
        self._is_state = [bool(STATE_INPUT.match(n)) for n in self._past]
        # GroupQueryAttention models read each row's length from the mask: their caches are right-padded
        self.right_padded = model.metadata.get(CACHE_PADDING_KEY) == "right"
        from flora_graph.runtimes.onnx_lowering import DIM_MAX_KEY

        try:  # the most new tokens one call takes (a scan of one chunk a call): longer prompts prefill in pieces
            piece = json.loads(model.metadata.get(DIM_MAX_KEY) or "{}").get("seq")
        except ValueError:
            piece = None
        self.max_step = int(piece) if isinstance(piece, int) and piece > 0 else None
        refill = model.metadata.get(REFILL_KEY)
        self.refill_at = int(refill) if refill is not None and refill.isdigit() else None
        if mixed is True:
            _ = self._mixed  # loaded and checked now
        steps = ["input_ids", "attention_mask", *(["position_ids"] if self.takes_position_ids else []), *self._past]
        missing = [n for n in steps if n not in model.inputs] + [n for n in ["logits", *self._present]
                                                                   if n not in model.output_names]
        if missing:
            raise ServingError(f"{model.where} does not match {cfg_path}: it lacks {missing}")
        # the dtypes the model declares: the decode loop builds its inputs in them and passes them unchecked
        self._id_dtype = np.dtype(model.inputs["input_ids"][1] or np.int64)
        self._mask_dtype = np.dtype(model.inputs["attention_mask"][1] or np.int64)
        self._pos_dtype = np.dtype(model.inputs["position_ids"][1] or np.int64) if self.takes_position_ids else np.dtype(np.int64)
        # each past's [kv_heads, head] as the model declares it: a latent-attention model's keys and values differ;
        # a state's whole shape but the batch
        self._past_dims = [tuple(model.inputs[n][0][1:]) if state else
                           tuple(d if isinstance(d, int) else fallback
                                 for d, fallback in zip(model.inputs[n][0][1::2], (self.kv_heads, self.head_dim), strict=True))
                           for n, state in zip(self._past, self._is_state, strict=True)]
        if states and (self.right_padded or not all(isinstance(d, int) for n in states for d in model.inputs[n][0][1:])):
            raise ServingError(f"{model.where}: recurrent states {states[:2]} need fixed shapes and left-padded caches")

    def batch(self) -> Batch:
        """An empty batch: add rows, step, remove rows, in any order between steps."""
        return Batch(self)

    @property
    def _mixed(self):
        """The mixed model's session (loaded on first use where ``mixed="lazy"``), or ``None`` where the package
        has none or ``mixed=False``."""
        if self._mixed_session is None and self._mixed_file is not None and self._mixed_file.is_file():
            from flora_graph.runtimes.ort_contrib import CACHE_PADDING_KEY
            from flora_graph.serving.mixed import MixedAdapterSession

            session = MixedAdapterSession(self._mixed_file, self._adapter_files, **self._mixed_options)
            if (session.model.metadata.get(CACHE_PADDING_KEY) == "right") != self.right_padded:
                raise ServingError(f"{self.package}: its model and {self._mixed_file.name} pad their caches differently "
                                   f"(metadata {CACHE_PADDING_KEY!r}); export the package again")
            self._mixed_session = session
        return self._mixed_session

    def generate(self, prompts: Sequence[Sequence[int]], *, adapters: str | Sequence[str | None] | None = None,
                 on_token: Callable[[int, int], None] | None = None, **settings: Any) -> list[list[int]]:
        """The tokens generated after each prompt (row ``i`` with ``adapters[i]``; one name or ``None``: every row).
        With ``num_return_sequences`` ``n`` above 1, prompt ``i``'s ``n`` sequences (beam search's best hypotheses, or
        draws) are rows ``i * n`` to ``i * n + n - 1``.

        ``settings`` are :class:`RowSettings` fields (``max_new_tokens``, ``min_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``seed``,
        ``stop_tokens``, and for beam search ``num_beams``, ``length_penalty``, ``early_stopping``); those not
        given are the package's (:attr:`defaults`; stop tokens: its end-of-text ids, :attr:`eos`).
        ``on_token(row, token)`` streams each token as it is chosen (with ``num_beams`` above 1, :meth:`Batch.search`,
        a prompt's tokens once its search has stopped). A seeded row draws the same tokens whatever else is in the
        batch.
        """
        if adapters is None or isinstance(adapters, str):
            adapters = [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise GenerationError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
        batch = self.batch()
        if settings.get("num_beams", self.defaults.get("num_beams", 1)) != 1:
            settings.pop("seed", None)  # beam search draws nothing
            out = batch.search(prompts, adapters=adapters, **settings)
            if on_token is not None:
                for r, tokens in enumerate(out):
                    for tok in tokens:
                        on_token(r, tok)
            return out
        n = settings.pop("num_return_sequences", 1)
        if n != 1:  # draws: each prompt n times, rows i * n + j
            RowSettings.of(self.defaults, settings, num_return_sequences=n)
            prompts = [p for p in prompts for _ in range(n)]
            adapters = [a for a in adapters for _ in range(n)]
        seed = settings.pop("seed", None)
        rows = batch.add_many(prompts, adapters=adapters,
                              seeds=[None if seed is None else seed + i for i in range(len(prompts))], **settings)
        if on_token is not None:
            for r in rows:
                on_token(r, batch.row(r).next_token)
        while batch.active:
            for r, tok in batch.step().items():
                if on_token is not None:
                    on_token(r, tok)
        failed = [batch.row(r).error for r in rows if batch.row(r).error]
        if failed:
            raise UnknownAdapterError(failed[0])
        return [batch.row(r).generated for r in rows]

    # ------------------------------------------------------------------ one model call
    def _model_for(self, adapters: list[str | None]) -> str:
        """Which model serves rows using ``adapters``: ``"plain"`` (a package without adapters: add()
        refused any adapter name already), ``"single"`` (one adapter, or none, for every row) or ``"mixed"``."""
        if self._plain is not None:
            return "plain"
        if self._mixed_only:
            return "mixed"
        if all(a == adapters[0] for a in adapters):
            return "single"
        if self._mixed is None:
            why = "this Generator was made with mixed=False" if self._mixed_mode is False else "the package has none"
            raise ServingError(f"{self.package}: rows with different adapters need the package's mixed model ({why})")
        return "mixed"

    def _run(self, feeds: dict[str, np.ndarray], adapters: list[str | None]) -> dict[str, np.ndarray]:
        """One model call on feeds :class:`Batch` built in the model's dtypes (passed on unchecked)."""
        kind = self._model_for(adapters)
        if kind == "plain":
            return self._plain.run(feeds, None, lambda: "generation step")
        if kind == "single":
            return self._single.run(feeds, adapters[0], prepared=True)
        return self._mixed.run(feeds, adapters, prepared=True)

    def _run_shared(self, shared: SharedCache, tokens: list[int], lengths: list[int], adapters: list[str | None],
                    kind: str, vocab: tuple[int, np.dtype]) -> np.ndarray:
        """One decode step on ``shared`` buffers (right-padded models): row ``i`` feeds ``tokens[i]`` at
        position ``lengths[i]`` through the model ``kind`` (:meth:`_model_for` of ``adapters``); the logits
        ``[rows, 1, vocab]``."""
        if kind == "plain":
            return shared.run(self._plain.session, "plain", self._plain, dict, tokens, lengths, vocab,
                              lambda: "generation step")
        if kind == "single":
            one = adapters[0]
            token, inputs = self._single.adapter_inputs(one)
            return shared.run(self._single.model.session, ("single", one), token, lambda: inputs, tokens, lengths,
                              vocab, lambda: f"generation step with adapter {one!r}" if one else "generation step")
        token, inputs = self._mixed.adapter_inputs(adapters)
        return shared.run(self._mixed.model_for(adapters).session, ("mixed", tuple(adapters)), token, lambda: inputs, tokens,
                          lengths, vocab, lambda: f"mixed generation step with adapters {sorted({a for a in adapters if a})}")

    def load_adapter(self, name: str, source: str | Path, *, replace: bool = False) -> None:
        """Serve adapter ``name`` from the ``.onnx_adapter`` file ``source`` (written for this package's model,
        as ``flora-graph export`` writes them; its checksum checked as the package's own are) from the next
        step on, alone and in mixed batches; ``replace`` swaps the weights of a loaded one, rows decoding with
        it taking the new ones from their next step. The mixed model's stacks are built again from every
        adapter file.

        Raises :class:`ServingError` for a package exported without adapters (its model has no slots) or a
        name already served without ``replace``, and :class:`~flora_graph.serving.errors.AdapterFileError`
        naming a file that does not fit the model; either way the Generator serves what it served.
        """
        from flora_graph.serving.errors import AdapterFileError

        if self._plain is not None:
            raise ServingError(f"{self.package} was exported without adapters: its model has no adapter slots")
        if not isinstance(name, str) or not name:
            raise ServingError(f"adapter name must be a non-empty str, got {name!r}")
        if name in self._adapter_files and not replace:
            raise ServingError(f"adapter {name!r} is already served; pass replace=True to swap its weights")
        old, files = self._adapter_files, {**self._adapter_files, name: Path(source)}
        mixed = self._mixed_session  # one not loaded yet stacks the files it finds then
        if mixed is not None:
            mixed.set_adapters(files)  # checked whole before it changes anything
        try:
            if self._single is not None:  # (where the mixed model serves every row, it checked the file)
                self._single.load_adapter(name, files[name], replace=True)
        except AdapterFileError:
            if mixed is not None:
                mixed.set_adapters(old)
            raise
        self._adapter_files = files

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``; a row still decoding with it finishes at its next step, its ``error``
        saying why, and the rows beside it decode on. Raises :class:`UnknownAdapterError` for a name not served."""
        self.check_adapter(name)
        files = {k: v for k, v in self._adapter_files.items() if k != name}
        if self._mixed_session is not None:
            self._mixed_session.set_adapters(files)
        if self._single is not None:
            self._single.unload_adapter(name)
        self._adapter_files = files

    @property
    def adapter_names(self) -> list[str]:
        """The adapters served: the package's, then those loaded since."""
        return list(self._adapter_files)

    def _serves(self, adapter: str | None) -> bool:
        """Whether rows with ``adapter`` (``None``: none) can run."""
        return adapter is None or adapter in self._adapter_files

    def check_adapter(self, adapter: str | None) -> None:
        """Raise :class:`UnknownAdapterError` for a name that is not one of the package's adapters."""
        if not self._serves(adapter):
            raise UnknownAdapterError(f"adapter {adapter!r} is not in package {str(self.package)!r} "
                                      f"(it has {self.adapter_names})")


class Batch:
    """Rows decoding together; the key/value cache is held here, padded to one length: on the left,
    or on the right for a model whose attention takes row lengths (:attr:`Generator.right_padded`)."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.rows: list[Row] = []  # in cache order
        self._done: dict[int, Row] = {}
        self._next_id = 0
        self.cache: list[np.ndarray] = []  # per past name: [rows, kv, length, head_dim] (left-padded models)
        # right-padded models: buffers that are past and present at once, [rows, kv, capacity, head_dim]
        self.shared = SharedCache(gen._past, gen._present, gen._id_dtype, gen._mask_dtype,
                                  gen._pos_dtype if gen.takes_position_ids else None) if gen.right_padded else None
        self._vocab: tuple[int, np.dtype] | None = None
        self.mask = np.zeros((0, 0), gen._mask_dtype)
        self.positions: list[int] = []  # per row: the position id of its next token
        self.step_seconds: list[float] = []
        # the rows' adapters, the model kind serving them and whether one argmax picks for all (greedy,
        # no stop token held back by min_new_tokens): set by step(), cleared when a row joins or leaves
        self._plan: tuple[list[str | None], str, bool] | None = None

    @property
    def active(self) -> list[int]:
        """Ids of the rows still generating."""
        return [r.rid for r in self.rows]

    def row(self, rid: int) -> Row:
        """The row ``rid`` (active or finished)."""
        for r in self.rows:
            if r.rid == rid:
                return r
        if rid in self._done:
            return self._done[rid]
        raise GenerationError(f"no row {rid} in this batch")

    def add(self, prompt: Sequence[int], *, adapter: str | None = None, seed: int | None = None,
            stop_tokens: Iterable[int] | None = None, **settings: Any) -> int:
        """Prefill ``prompt`` as a new row and choose its first token; return the row id. ``settings``:
        :class:`RowSettings` fields, the package's :attr:`Generator.defaults` for those not given.

        Raises :class:`GenerationError` / :class:`UnknownAdapterError` naming the culprit before
        anything changes: the other rows keep decoding.
        """
        ids, rs = self._request(prompt, adapter, seed, stop_tokens, settings)
        cache, mask, logits = self._prefill(ids, adapter)
        row = self._new_row(ids, adapter, rs, seed)
        self._choose(row, logits)
        self._merge(row, cache, mask)  # a row done on its first token goes straight to the finished ones
        return row.rid

    def add_many(self, prompts: Sequence[Sequence[int]], *, adapters: Sequence[str | None] | None = None,
                 seeds: Sequence[int | None] | None = None, stop_tokens: Iterable[int] | None = None,
                 **settings: Any) -> list[int]:
        """:meth:`add` for several prompts at once (row ``i`` with ``adapters[i]`` and ``seeds[i]``, the same
        ``settings``); their ids, in order. A package whose cache is right-padded prefills them in one model
        call, the prompts right-padded to the longest (each row's tokens, positions and logits are those it
        gets alone); otherwise, or where the model takes fewer tokens a call than the longest prompt, one
        after the other.

        Raises :class:`GenerationError` / :class:`UnknownAdapterError` naming the row and the culprit before
        anything changes: the other rows keep decoding.
        """
        gen = self.gen
        adapters = [None] * len(prompts) if adapters is None else list(adapters)
        seeds = [None] * len(prompts) if seeds is None else list(seeds)
        if not len(prompts) == len(adapters) == len(seeds):
            raise GenerationError(f"{len(prompts)} prompts, {len(adapters)} adapter names and {len(seeds)} seeds")
        requests = []
        for i, (prompt, adapter, seed) in enumerate(zip(prompts, adapters, seeds, strict=True)):
            try:
                requests.append(self._request(prompt, adapter, seed, stop_tokens, settings))
            except ServingError as exc:
                raise type(exc)(f"prompt {i}: {exc}") from None
        longest = max((len(ids) for ids, _ in requests), default=0)
        if len(requests) < 2 or not gen.right_padded or (gen.max_step is not None and longest > gen.max_step) \
                or (gen._mixed is None and len(set(adapters)) > 1):
            return [self.add(p, adapter=a, seed=sd, stop_tokens=stop_tokens, **settings)
                    for p, a, sd in zip(prompts, adapters, seeds, strict=True)]
        cache, logits = self._prefill_many([ids for ids, _ in requests], adapters)
        rows = []
        for i, ((ids, rs), adapter, seed) in enumerate(zip(requests, adapters, seeds, strict=True)):
            rows.append(self._new_row(ids, adapter, rs, seed))
            self._choose(rows[-1], logits[i, len(ids) - 1])
        self._join_right(rows, cache)
        return [r.rid for r in rows]

    def _request(self, prompt: Sequence[int], adapter: str | None, seed: int | None, stop_tokens: Iterable[int] | None,
                 settings: dict[str, Any], *, beams: bool = False) -> tuple[list[int], RowSettings]:
        """A row's prompt ids and settings, checked (:class:`GenerationError` / :class:`UnknownAdapterError`);
        ``num_beams`` above 1 only where ``beams`` (:meth:`search`)."""
        gen = self.gen
        gen.check_adapter(adapter)
        stops = frozenset(int(t) for t in (gen.eos if stop_tokens is None else stop_tokens))
        rs = RowSettings.of(gen.defaults, settings, seed=seed, stop_tokens=stops)
        if rs.num_beams > 1 and not beams:
            raise GenerationError(f"num_beams={rs.num_beams}: a Batch steps each row on its own; beam search runs "
                                  "through Generator.generate")
        if rs.encoder_no_repeat_ngram_size:
            raise GenerationError(f"encoder_no_repeat_ngram_size={rs.encoder_no_repeat_ngram_size}: a decoder-only "
                                  "model has no encoder input")
        if rs.num_return_sequences > 1 and not beams:
            raise GenerationError(f"num_return_sequences={rs.num_return_sequences}: a Batch row is one sequence; "
                                  "Generator.generate returns several per prompt")
        ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError("prompt is empty")
        if len(ids) + rs.max_new_tokens > gen.context_length:
            raise GenerationError(f"prompt of {len(ids)} tokens + max_new_tokens {rs.max_new_tokens} is past the "
                                  f"model's context length {gen.context_length}")
        if beams and gen.refill_at is not None and len(ids) + rs.max_new_tokens > gen.refill_at:
            raise GenerationError(f"num_beams={rs.num_beams}: beam search does not run past position {gen.refill_at}, "
                                  f"where this model's rotary embedding changes (prompt of {len(ids)} tokens + "
                                  f"max_new_tokens {rs.max_new_tokens}); use num_beams=1")
        return ids, rs

    def search(self, prompts: Sequence[Sequence[int]], *, adapters: Sequence[str | None] | None = None,
               stop_tokens: Iterable[int] | None = None, **settings: Any) -> list[list[int]]:
        """Beam search (:class:`~flora_graph.serving.beam.BeamSearch`, ``settings["num_beams"]`` hypotheses, the
        package's :attr:`Generator.defaults` for settings not given) for each prompt, with ``adapters[i]``: the
        tokens of its best hypotheses (``num_return_sequences`` of them, rows ``i * n + j``), the stop token
        included. Each prompt is prefilled alone and searches on its own, as it would alone; the hypotheses of
        every prompt still searching run as the rows of one call a step (padded as the package pads its cache:
        a right-padded package's in buffers that are past and present at once, reordered in place; rows with
        different adapters through its mixed model), their caches reordered as the searches pick them and a
        prompt's rows dropped when its search stops. Every request is checked before anything runs; the
        batch's own rows are left as they are."""
        adapters = [None] * len(prompts) if adapters is None else list(adapters)
        if len(adapters) != len(prompts):
            raise GenerationError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
        requests = []
        for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
            try:
                requests.append(self._request(prompt, adapter, None, stop_tokens, settings, beams=True))
            except ServingError as exc:
                raise type(exc)(f"prompt {i}: {exc}") from None
        gen = self.gen
        if len(set(adapters)) > 1 and gen._mixed is None:  # one adapter a call: the prompts by adapter
            out: list[list[list[int]]] = [[] for _ in prompts]
            for name in dict.fromkeys(adapters):
                mine = [i for i, a in enumerate(adapters) if a == name]
                found = self.search([prompts[i] for i in mine], adapters=[name] * len(mine), stop_tokens=stop_tokens,
                                    **settings)
                n = len(found) // len(mine)
                for j, i in enumerate(mine):
                    out[i] = found[j * n:(j + 1) * n]
            return [h for hyps in out for h in hyps]
        k = requests[0][1].num_beams
        searches, caches, firsts = [], [], []
        for (ids, rs), adapter in zip(requests, adapters, strict=True):
            cache, _, logits = self._prefill(ids, adapter)
            searches.append(BeamSearch([ids], k, rs, rs.stop_tokens))
            caches.append(cache)
            firsts.append(logits)
        lens = np.repeat([len(ids) for ids, _ in requests], k)  # tokens in each row's cache
        width = int(lens.max())
        right = gen.right_padded
        if right:  # buffers that are past and present at once, reordered in place (SharedCache)
            capacity = max(len(ids) + rs.max_new_tokens for ids, rs in requests)
            shared = SharedCache(gen._past, gen._present, gen._id_dtype, gen._mask_dtype,
                                 gen._pos_dtype if gen.takes_position_ids else None)
            buffers = _cache_buffers(caches[0], len(lens), capacity, gen._huge_pages)
            for i, cache in enumerate(caches):  # each prompt's cache [1, kv, length, head_dim] k times
                for buffer, c in zip(buffers, cache, strict=True):
                    buffer[i * k:(i + 1) * k, :, :c.shape[2]] = c
            shared.set(buffers, lens.tolist())
        else:
            cache = [np.concatenate([np.repeat(c[j] if state else _left_pad(c[j], width), k, axis=0) for c in caches])
                     for j, state in enumerate(gen._is_state)]
            mask = (np.arange(width)[None, :] >= width - lens[:, None]).astype(gen._mask_dtype)
        names = [a for a in adapters for _ in range(k)]
        logits = np.repeat(np.stack(firsts), k, axis=0)
        live, results = list(range(len(prompts))), [[] for _ in prompts]
        while True:
            order, tokens, going = [], [], []
            for g, i in enumerate(live):  # each prompt's search picks from its rows' logits
                beams = searches[i]
                beams.step(logits[g * k:(g + 1) * k])
                if beams.done:
                    results[i] = beams.result[0] or []
                    continue
                going.append(i)
                order.extend(g * k + beams.reorder)
                tokens.extend(beams.tokens.tolist())
            if not going:
                break
            order = np.asarray(order)
            lens, names, live = lens[order], [names[r] for r in order], going
            if right:  # row i's token goes to position lens[i] of its buffers, in place
                if len(order) < len(shared.arrays[0]):  # a prompt's search stopped: its rows leave
                    shared.set([a[order] for a in shared.arrays], lens.tolist())
                else:  # the same rows reordered: the bound buffers keep their memory
                    for a in shared.arrays:
                        a[:] = a[order]
                logits = gen._run_shared(shared, tokens, lens.tolist(), names, gen._model_for(names), self._vocab)[:, -1]
            else:  # left-padded: positions that every row pads dropped (a long prompt's search stopped)
                cache, mask = _trim_left([c[order] for c in cache], mask[order], gen._is_state)
                mask = np.concatenate([mask, np.ones((len(mask), 1), mask.dtype)], axis=1)
                step = self._call(np.asarray(tokens, gen._id_dtype).reshape(-1, 1), mask,
                                  lens.astype(gen._pos_dtype).reshape(-1, 1), cache, names)
                cache = [step[n] for n in gen._present]
                logits = step["logits"][:, -1]
            lens = lens + 1
        return [h for hyps in results for h in hyps]

    def _new_row(self, ids: list[int], adapter: str | None, rs: RowSettings, seed: int | None) -> Row:
        row = Row(self._next_id, adapter, rs, ids, len(ids), np.random.default_rng(seed))
        self._next_id += 1
        return row

    def remove(self, rid: int) -> None:
        """Drop an active row from the batch (its tokens stay readable with :meth:`row`)."""
        self._finish([rid])

    def _finish(self, rids: Sequence[int]) -> None:
        """Drop the active rows ``rids`` together (one copy of the caches), their tokens kept readable."""
        for row in self._detach(rids):
            self._done[row.rid] = row

    def _detach(self, rids: Sequence[int]) -> list[Row]:
        """Take the active rows ``rids`` out of the batch and its caches (one copy of the caches for all of them;
        none when no row stays), in the order given."""
        where = {r.rid: i for i, r in enumerate(self.rows)}
        if missing := [rid for rid in rids if rid not in where]:
            raise GenerationError(f"row {missing[0]} is not active in this batch")
        gone = {where[rid] for rid in rids}
        out = [self.rows[where[rid]] for rid in rids]
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]
        self._plan = None
        if self.shared is not None:  # the buffers keep their capacity
            self.shared.set([c[keep] for c in self.shared.arrays] if self.rows else [], self.positions)
            return out
        self.cache = [c[keep] for c in self.cache]
        self.mask = self.mask[keep]
        self._trim()
        return out

    def step(self) -> dict[int, int]:
        """Feed every active row's last token, choose the next; return ``{row id: token}``. Rows
        that hit a stop token or ``max_new_tokens`` finish (and leave the batch); a row whose adapter
        stopped being served (:meth:`Generator.unload_adapter`) finishes with its ``error`` set, and the
        others step on."""
        if not self.rows:
            return {}
        gen = self.gen
        if gen.refill_at is not None and gen.refill_at in self.positions:
            return self._refill_step()
        rows = self.rows
        if self._plan is None:  # what the rows share until one joins or leaves
            adapters = [r.adapter for r in rows]
            self._plan = (adapters, gen._model_for(adapters),
                          not any(r.settings.do_sample or r.settings.repetition_penalty != 1
                                  or r.settings.no_repeat_ngram_size
                                  or (r.settings.min_new_tokens and r.settings.stop_tokens) for r in rows))
        adapters, kind, greedy = self._plan
        try:  # an adapter is looked up before anything is written: a refusal leaves the batch as it was
            if self.shared is not None:  # row i's token goes to cache position positions[i], in place
                t0 = time.perf_counter()
                logits = gen._run_shared(self.shared, [r.next_token for r in rows], self.positions, adapters, kind,
                                         self._vocab)
                self.step_seconds.append(time.perf_counter() - t0)
            else:
                ids = np.array([[r.next_token] for r in rows], gen._id_dtype)
                mask = np.concatenate([self.mask, np.ones((len(rows), 1), self.mask.dtype)], axis=1)
                t0 = time.perf_counter()
                out = self._call(ids, mask, np.array(self.positions, gen._pos_dtype).reshape(-1, 1), self.cache, adapters)
                self.step_seconds.append(time.perf_counter() - t0)
                self.cache = [out[n] for n in gen._present]
                logits = out["logits"]
                self.mask = mask
        except UnknownAdapterError:
            if not self._drop_unserved():
                raise
            return self.step()
        # plain Python where it serves: after a model call the CPU caches hold its weights, not numpy's code
        self.positions = [p + 1 for p in self.positions]
        if greedy:
            picks = [int(logits[0, -1].argmax())] if len(rows) == 1 else logits[:, -1].argmax(-1).tolist()
        else:
            picks = [pick_token(r, logits[i, -1]) for i, r in enumerate(rows)]
        chosen = {r.rid: take_token(r, tok) for r, tok in zip(rows, picks, strict=True)}
        if done := [r.rid for r in rows if r.done]:  # rows finishing together leave in one copy of the caches
            self._finish(done)
        return chosen

    # ------------------------------------------------------------------ internals
    def _drop_unserved(self) -> bool:
        """Finish the rows whose adapter is no longer served, their ``error`` saying so; whether there were any."""
        gone = [r.rid for r in self.rows if self._unserved(r)]
        if gone:
            self._finish(gone)
        return bool(gone)

    def _unserved(self, row: Row) -> bool:
        """Whether ``row``'s adapter stopped being served; its ``error`` then says so."""
        if self.gen._serves(row.adapter):
            return False
        row.error = _UNSERVED.format(row.adapter)
        return True

    def _refill_step(self) -> dict[int, int]:
        """:meth:`step` where rows reach the package's :data:`~flora_graph.serving.genai.REFILL_KEY` position:
        the others step as usual, and each of those runs all its tokens again from an empty cache (its
        rotary now takes the long frequencies, as transformers' and GenAI's Phi-3 recompute the cache there)."""
        refill = self._detach([r.rid for r, p in zip(self.rows, self.positions, strict=True) if p == self.gen.refill_at])
        chosen = self.step() if self.rows else {}
        for row in refill:
            if self._unserved(row):
                self._done[row.rid] = row
                continue
            cache, mask, logits = self._prefill(row.tokens, row.adapter)
            chosen[row.rid] = self._choose(row, logits)
            self._merge(row, cache, mask)
        return chosen

    def _prefill(self, ids: list[int], adapter: str | None) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """One row's ``ids`` from an empty cache: ``(its cache, its mask, the last position's logits)``; in pieces of
        :attr:`Generator.max_step` tokens where the model takes no more a call, each continuing the cache."""
        gen = self.gen
        cache = [np.zeros((1, *dims), np.float32) if state else np.zeros((1, dims[0], 0, dims[1]), np.float32)
                 for dims, state in zip(gen._past_dims, gen._is_state, strict=True)]  # a state starts at zeros
        step = gen.max_step or len(ids)
        for start in range(0, len(ids), step):
            end = min(start + step, len(ids))
            mask = np.ones((1, end), gen._mask_dtype)
            out = self._call(np.array([ids[start:end]], gen._id_dtype), mask,
                             np.arange(start, end, dtype=gen._pos_dtype)[None], cache, [adapter])
            cache = [out[n] for n in gen._present]
        self._vocab = (int(out["logits"].shape[-1]), out["logits"].dtype)
        return cache, mask, out["logits"][0, -1]

    def _prefill_many(self, prompts: list[list[int]], adapters: list[str | None]) -> tuple[list[np.ndarray], np.ndarray]:
        """Rows ``prompts`` from empty caches in one call, right-padded to the longest (a right-padded package: the
        attention takes each row's length from the mask; positions count from 0 in every row, a padded slot
        repeating its row's last): ``(their caches [rows, kv, longest, head_dim], valid up to each row's length;
        the logits [rows, longest, vocab])``."""
        gen = self.gen
        n, longest = len(prompts), max(len(p) for p in prompts)
        ids = np.zeros((n, longest), gen._id_dtype)
        mask = np.zeros((n, longest), gen._mask_dtype)
        for i, p in enumerate(prompts):
            ids[i, :len(p)], mask[i, :len(p)] = p, 1
        cache = [np.zeros((n, dims[0], 0, dims[1]), np.float32) for dims in gen._past_dims]
        # a padded slot repeats its row's last position: a model whose rotary depends on a row's furthest position
        # (dynamic scaling, longrope's switch) sees each row's own
        positions = np.minimum(np.arange(longest)[None, :], np.array([len(p) - 1 for p in prompts])[:, None])
        positions = positions.astype(gen._pos_dtype)
        out = self._call(ids, mask, positions, cache, adapters)
        self._vocab = (int(out["logits"].shape[-1]), out["logits"].dtype)
        return [out[name] for name in gen._present], out["logits"]

    def _join_right(self, rows: list[Row], cache: list[np.ndarray]) -> None:
        """Add ``rows`` (row ``i``'s tokens but the last, just chosen, in ``cache[:][i]`` from position 0) to a
        right-padded batch's buffers, with room for every row to finish; a row done already finishes."""
        live = [i for i, r in enumerate(rows) if not r.done]
        for r in rows:
            if r.done:  # finished on the token just chosen: nothing to decode
                self._done[r.rid] = r
        if not live:
            return
        self._plan = None
        cache = [c[live] if len(live) < len(rows) else c for c in cache]
        had = bool(self.rows)
        self.rows.extend(rows[i] for i in live)
        self.positions.extend(len(rows[i].tokens) - 1 for i in live)
        capacity = max(r.prompt_len + r.settings.max_new_tokens for r in self.rows)
        have = self.shared.arrays if had else [np.zeros((0, *c.shape[1:]), c.dtype) for c in cache]
        buffers = _cache_buffers(cache, len(self.rows), capacity, self.gen._huge_pages)
        self.shared.set([_stack_right(a, b, out) for a, b, out in zip(have, cache, buffers, strict=True)], self.positions)

    def _call(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray],
              adapters: list[str | None]) -> dict[str, np.ndarray]:
        """One model call; every array already contiguous in the dtype the model declares."""
        gen = self.gen
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if gen.takes_position_ids:
            feeds["position_ids"] = positions
        feeds.update(zip(gen._past, past, strict=True))
        return gen._run(feeds, adapters)

    def _choose(self, row: Row, logits: np.ndarray) -> int:
        return take_token(row, pick_token(row, logits))

    def _merge(self, row: Row, cache: list[np.ndarray], mask: np.ndarray) -> None:
        """Add ``row``, its tokens but the last (just chosen) in ``cache``, to the batch; a done row finishes."""
        if self.shared is not None:  # each row's tokens from position 0; room for every row to finish
            self._join_right([row], cache)
            return
        if row.done:  # finished on the token just chosen: nothing to decode
            self._done[row.rid] = row
            return
        self._plan = None
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = [row], cache, mask, [len(row.tokens) - 1]
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache = [np.concatenate([a, b] if state else [_left_pad(a, width), _left_pad(b, width)], axis=0)
                      for a, b, state in zip(self.cache, cache, self.gen._is_state, strict=True)]
        self.mask = np.concatenate([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)], axis=0)
        self.positions.append(len(row.tokens) - 1)
        self.rows.append(row)

    def _trim(self) -> None:
        """Drop leading positions that every row pads (after a long row left; left-padded caches)."""
        if self.mask.size == 0:
            self.cache, self.mask = [], np.zeros((0, 0), self.mask.dtype)
            self.positions = []
            return
        self.cache, self.mask = _trim_left(self.cache, self.mask, self.gen._is_state)


def _trim_left(cache: list[np.ndarray], mask: np.ndarray, is_state: Sequence[bool]) -> tuple[list[np.ndarray], np.ndarray]:
    """Left-padded ``cache`` and ``mask`` (rows ``[rows, positions]``) without the leading positions every row pads;
    a recurrent state (``is_state``) has no positions and stays as it is."""
    used = np.flatnonzero(mask.any(axis=0))
    first = int(used[0]) if used.size else mask.shape[1]
    if not first:
        return cache, mask
    return [c if state else c[:, :, first:] for c, state in zip(cache, is_state, strict=True)], mask[:, first:]


def pick_token(row: Row, logits: np.ndarray, rules: Rules = NO_RULES,
               source: dict[tuple[int, ...], set[int]] | None = None) -> int:
    """The row's next token from its ``logits`` ``[vocab]``: greedy, or drawn by its settings, after its settings'
    and the package's ``rules`` (:func:`~flora_graph.serving.beam.process_scores`: no stop token before
    ``min_new_tokens``, the repetition penalty, forced and suppressed tokens; ``source``: the row's encoder input as
    an :func:`~flora_graph.serving.beam.ngram_table`)."""
    s = row.settings
    logits = process_scores(logits, row.tokens, row.prompt_len, s, s.stop_tokens, rules, source)
    if not s.do_sample:
        return int(logits.argmax())
    tokens, p = sampling_distribution(logits, s.temperature, s.top_k, s.top_p)
    return int(tokens[row.rng.choice(p.size, p=p)])


def take_token(row: Row, tok: int) -> int:
    """Append ``tok`` to the row; the row is done on a stop token or at ``max_new_tokens``."""
    row.tokens.append(tok)
    row.next_token = tok
    if tok in row.settings.stop_tokens or len(row.tokens) - row.prompt_len >= row.settings.max_new_tokens:
        row.done = True
    return tok


def sampling_distribution(logits: np.ndarray, temperature: float, top_k: int = 0,
                          top_p: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, probabilities)``: the tokens a sampled step can draw from ``logits`` ``[vocab]`` and their
    probabilities, those of ``softmax(logits / temperature)`` over the ``top_k`` highest logits (ties with the
    k-th kept, as transformers' ``TopKLogitsWarper``; 0: every token), then over the smallest set of the most
    probable whose mass before each token is under ``top_p`` (1: every one; tied tokens in token order),
    renormalized.

    Computed on candidates, not the whole vocabulary: a partition finds the top k (and the 1,024 most probable,
    which usually hold ``top_p`` of the mass) and only those are sorted: on a 151,936-token vocabulary a draw
    took 1-4 ms instead of 13-15 ms with full sorts. A flat distribution, whose nucleus is most of the
    vocabulary, still sorts it all."""
    tokens = None
    if top_k and top_k < logits.size:  # on the logits as they are: the temperature keeps their order
        kth = np.partition(logits, logits.size - top_k)[logits.size - top_k]
        tokens = np.flatnonzero(logits >= kth)
    z = (logits if tokens is None else logits[tokens]).astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        n, m = p.size, min(p.size, 1024)
        while True:  # the most probable m (and every token tied with the m-th), in order; grown until they hold top_p
            top = np.flatnonzero(p >= p[np.argpartition(-p, m - 1)[m - 1]]) if m < n else np.arange(n)
            top = top[np.argsort(-p[top])]
            if m == n or p[top].sum() >= top_p:
                break
            m = n  # a flat distribution: one sort of the whole
        count = int(np.count_nonzero(np.cumsum(p[top]) - p[top] < top_p))
        tied = np.flatnonzero(p[top] == p[top[count - 1]])  # the last one's ties, one run of the order
        top[tied] = np.sort(top[tied])  # the first in token order are kept: the same sums, a fixed choice
        keep = top[:count]
        p = p[keep] / p[keep].sum()
        tokens = keep if tokens is None else tokens[keep]
    return (np.arange(p.size) if tokens is None else tokens), p


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    """Cache ``a`` (``[rows, kv, length, head_dim]``) zero-padded on the left to ``width`` positions."""
    extra = width - a.shape[2]
    if not extra:
        return a
    return np.concatenate([np.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype), a], axis=2)


def _cache_buffers(like: Sequence[np.ndarray], rows: int, capacity: int, huge: bool) -> list[np.ndarray]:
    """Zeroed right-padded cache buffers ``[rows, kv, capacity, head_dim]``, one per cache of ``like`` (its ``kv``,
    ``head_dim`` and dtype), side by side in huge pages where they fill one (``huge``): a step reads them all."""
    out = huge_pages.zeros({str(j): ((rows, c.shape[1], capacity, c.shape[3]), c.dtype) for j, c in enumerate(like)},
                           huge)
    return [out[str(j)] for j in range(len(like))]


def _stack_right(rows: np.ndarray, new: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Caches ``rows`` and ``new`` (``[n, kv, length, head_dim]`` each) stacked into zeros ``out``, right-padded to its
    capacity (``out.shape[2]``); returns ``out``."""
    keep = min(rows.shape[2], out.shape[2])
    out[:rows.shape[0], :, :keep] = rows[:, :, :keep]
    out[rows.shape[0]:, :, :new.shape[2]] = new
    return out


def _left_pad_mask(m: np.ndarray, width: int) -> np.ndarray:
    extra = width - m.shape[1]
    return m if not extra else np.concatenate([np.zeros((m.shape[0], extra), m.dtype), m], axis=1)

