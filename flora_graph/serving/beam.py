"""Beam search and the score rules of a generation config, on numpy, as transformers' ``generate`` applies them.

:func:`process_scores` is the one place where a row's next-token scores are changed before a token is chosen,
greedy, sampled or by beam search: the repetition penalty, ``no_repeat_ngram_size`` (and an encoder-decoder's
``encoder_no_repeat_ngram_size``), the minimum length (no stop token before it), the forced first and last tokens
and the suppressed tokens of a package's generation config (:class:`Rules`), in the order of transformers' logits
processors. Greedy and sampled steps apply them to the logits, beam search to the log-probabilities, as
transformers does. :func:`unapplied_settings` names what a generation config asks that a package does not carry.

:class:`BeamSearch` keeps ``num_beams`` hypotheses per input and picks, at every step, the best ``num_beams``
continuations of all of them, with the length penalty and stopping rules of transformers' vectorized beam search
(``length_penalty``, ``early_stopping`` ``True`` / ``False`` / ``"never"``): a generator feeds it each step's logits,
reorders its key/value cache rows by :attr:`BeamSearch.reorder` and feeds :attr:`BeamSearch.tokens`. Scores are
float32 throughout, as in transformers, so the same logits give the same tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BEAM_DEFAULTS", "NO_RULES", "SCORE_SETTINGS", "BeamSearch", "Rules", "banned_ngram_tokens", "beam_defaults",
           "log_softmax", "ngram_table", "process_scores", "unapplied_settings"]

_PENALTY = np.float32(-1.0e9)
"""What transformers adds to a score that must not be chosen (a finished or stopped hypothesis)."""


@dataclass(frozen=True)
class Rules:
    """A package's fixed score rules (its generation config's): ``suppress`` tokens are never chosen,
    ``begin_suppress`` not as the first new token; ``forced_bos`` is the first token after a one-token decoder
    prompt, ``forced_eos`` the token at ``max_new_tokens``; no stop token while a row holds fewer than
    ``min_length`` tokens, its prompt included (transformers' ``min_length``)."""

    suppress: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    begin_suppress: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    forced_bos: int | None = None
    forced_eos: int | None = None
    min_length: int = 0


NO_RULES = Rules()

BEAM_DEFAULTS: dict[str, bool | float | int | str] = {"num_beams": 1, "length_penalty": 1.0, "early_stopping": False,
                                                     "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0}
"""The beam search and n-gram settings a package carries from its model's generation config (with transformers'
defaults)."""


def beam_defaults(given) -> dict[str, bool | float | int | str]:
    """:data:`BEAM_DEFAULTS` as ``given`` (a generation config's values, a package's ``search`` section) sets them;
    values missing or out of range keep the default."""
    out = dict(BEAM_DEFAULTS)
    for key in ("num_beams", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
        v = given.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= (1 if key == "num_beams" else 0):
            out[key] = v
    v = given.get("length_penalty")
    if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v):
        out["length_penalty"] = float(v)
    if given.get("early_stopping") in (True, False, "never"):
        out["early_stopping"] = given["early_stopping"]
    return out


SCORE_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                  "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size",
                  "encoder_no_repeat_ngram_size", "bad_words_ids", "force_words_ids", "renormalize_logits",
                  "constraints", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
                  "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                  "guidance_scale", "num_beams", "num_beam_groups", "diversity_penalty", "penalty_alpha", "dola_layers",
                  "min_length", "min_new_tokens", "early_stopping", "watermarking_config")
"""The generation config's settings that change which tokens ``generate`` chooses."""


def unapplied_settings(generation_config, applied: Collection[str]) -> list[str]:
    """``key=value`` for each setting of ``generation_config`` (transformers' ``GenerationConfig``, or ``None``)
    that changes the tokens ``generate`` chooses, is not transformers' default and is not among ``applied`` (what a
    package carries); beam sampling (a package samples without beams) and a ``bad_words_ids`` entry of several tokens
    (a package keeps single tokens out) among them."""
    if generation_config is None or not hasattr(generation_config, "to_diff_dict"):
        return []
    given = generation_config.to_diff_dict()
    out = [f"{k}={given[k]!r}" for k in SCORE_SETTINGS if k in given and given[k] is not None and k not in applied]
    if "num_beams" in applied and given.get("do_sample") and (given.get("num_beams") or 1) > 1:
        out.append(f"num_beams={given['num_beams']} with do_sample=True (beam sampling; the package samples one "
                   "hypothesis)")
    if "bad_words_ids" in applied:
        longer = [w for w in given.get("bad_words_ids") or [] if isinstance(w, list | tuple) and len(w) > 1]
        if longer:
            out.append(f"bad_words_ids={longer!r} (sequences of several tokens)")
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log(softmax(logits))`` over the last axis, in float32."""
    x = np.asarray(logits, np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def ngram_table(tokens: Sequence[int], n: int) -> dict[tuple[int, ...], set[int]]:
    """Every ``n``-gram of ``tokens`` as ``{its first n - 1 tokens: the tokens that followed them}``."""
    table: dict[tuple[int, ...], set[int]] = {}
    for i in range(len(tokens) - n + 1):
        table.setdefault(tuple(int(t) for t in tokens[i:i + n - 1]), set()).add(int(tokens[i + n - 1]))
    return table


def banned_ngram_tokens(tokens: Sequence[int], n: int, table: dict[tuple[int, ...], set[int]] | None = None
                        ) -> list[int]:
    """The tokens that would repeat an ``n``-gram of ``tokens`` (of ``table``, an :func:`ngram_table` of another
    sequence, where given): those that followed an occurrence of the last ``n - 1`` tokens of ``tokens``; none while
    it holds fewer than ``n - 1``. As transformers' ``no_repeat_ngram_size`` (and ``encoder_no_repeat_ngram_size``,
    with the encoder input's table)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    tail = tuple(int(t) for t in tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return sorted((ngram_table(tokens, n) if table is None else table).get(tail, ()))


def process_scores(scores: np.ndarray, tokens: Sequence[Sequence[int]] | Sequence[int], prompt_len: int, settings,
                   stop: Collection[int], rules: Rules = NO_RULES,
                   sources: Sequence[dict[tuple[int, ...], set[int]]] | None = None) -> np.ndarray:
    """Next-token ``scores`` (logits, or log-probabilities for beam search) after the rows' ``settings`` (a
    :class:`~flora_graph.serving.generate.RowSettings`: ``repetition_penalty``, ``no_repeat_ngram_size``,
    ``min_new_tokens``, ``max_new_tokens``) and the package's ``rules``: ``scores`` ``[rows, vocab]`` for rows that
    hold ``tokens[i]`` (all of one length: a prompt of ``prompt_len`` tokens, then what they generated), or
    ``[vocab]`` for one row that holds ``tokens``; every row stops on ``stop``. ``sources``: each row's encoder
    input as an :func:`ngram_table` of ``settings.encoder_no_repeat_ngram_size`` (an encoder-decoder's rows; one
    table for one row). A copy where anything changes; ``scores`` itself otherwise. What depends on the length alone
    is done once for every row."""
    one = scores.ndim == 1
    rows = [tokens] if one else tokens
    out = scores[None] if one else scores
    vocab = out.shape[-1]
    n = len(rows[0]) if len(rows) else 0
    new = n - prompt_len
    copied = False

    def writable() -> np.ndarray:
        nonlocal out, copied
        if not copied:
            out, copied = out.copy(), True
        return out

    if settings.repetition_penalty != 1:
        for i, row in enumerate(rows):
            seen = np.unique(np.asarray(row, np.int64))
            seen = seen[(seen >= 0) & (seen < vocab)]
            got = writable()[i, seen]
            out[i, seen] = np.where(got < 0, got * settings.repetition_penalty, got / settings.repetition_penalty)
    if settings.no_repeat_ngram_size:
        for i, row in enumerate(rows):
            banned = banned_ngram_tokens(list(row), settings.no_repeat_ngram_size)
            if banned:
                writable()[i, banned] = -np.inf
    if sources is not None and settings.encoder_no_repeat_ngram_size:
        for i, (row, table) in enumerate(zip(rows, [sources] if one else sources, strict=True)):
            banned = banned_ngram_tokens(row, settings.encoder_no_repeat_ngram_size, table)
            if banned:
                writable()[i, banned] = -np.inf
    if stop and (n < rules.min_length or new < settings.min_new_tokens):
        writable()[:, [t for t in stop if 0 <= t < vocab]] = -np.inf
    forced = None
    if rules.forced_bos is not None and n == 1:
        forced = rules.forced_bos
    if rules.forced_eos is not None and new == settings.max_new_tokens - 1:
        forced = rules.forced_eos
    if forced is not None:
        writable()[:] = -np.inf
        out[:, forced] = 0
    if rules.suppress.size:
        writable()[:, rules.suppress] = -np.inf
    if rules.begin_suppress.size and new == 0:
        writable()[:, rules.begin_suppress] = -np.inf
    if not copied:
        return scores
    return out[0] if one else out


def _top(scores: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """Per row of ``scores`` ``[rows, n]``, the indices of the ``k`` highest, highest first (ties: lowest index).

    Over a long row (a step's ``num_beams x vocab`` candidates) the row is cut into blocks of ``block``: the ``k``
    highest lie in the ``k`` blocks of highest maximum (any other block's maximum is below ``k`` values, one per
    those blocks), so only those are sorted; numpy's ``argpartition`` of the whole row measured 8x slower."""
    rows_n, n = scores.shape
    rows = np.arange(rows_n)[:, None]
    idx = np.broadcast_to(np.arange(n), scores.shape)
    if n > 16 * block and k < n // block:
        blocks = -(-n // block)
        padded = scores
        if blocks * block != n:
            padded = np.full((rows_n, blocks * block), -np.inf, scores.dtype)
            padded[:, :n] = scores
        highs = padded.reshape(rows_n, blocks, block).max(axis=2)
        best = np.sort(np.argpartition(-highs, k - 1, axis=1)[:, :k], axis=1)
        idx = (best[:, :, None] * block + np.arange(block)).reshape(rows_n, -1)
        scores = padded[rows, idx]
    elif 4 * k < n:  # the k highest first, then their order (ties: lowest index, as sorted)
        idx = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
        scores = scores[rows, idx]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx[rows, order]


class BeamSearch:
    """Beam search over ``inputs`` inputs that share one prompt length, ``num_beams`` hypotheses each.

    Args:
        prompts: each input's prompt (its decoder prompt, for an encoder-decoder), all of one length.
        num_beams: hypotheses per input.
        settings: the :class:`~flora_graph.serving.generate.RowSettings` of every input (``max_new_tokens``,
            ``length_penalty``, ``early_stopping``, the score rules of :func:`process_scores`).
        stop: the stop tokens (a hypothesis that chooses one is finished).
        rules: the package's :class:`Rules`.
        sources: each input's encoder input as an :func:`ngram_table` (``settings.encoder_no_repeat_ngram_size``).

    Every live input has ``num_beams`` rows, in input order (:attr:`live`). After :meth:`step` a generator
    keeps rows :attr:`reorder` of its caches (indices into the rows it just ran), drops those of inputs no
    longer live, and feeds :attr:`tokens`. :attr:`result` holds each input's ``num_return_sequences`` best finished
    hypotheses, best first (their new tokens, the stop token included), once :attr:`done`.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], num_beams: int, settings, stop: Collection[int],
                 rules: Rules = NO_RULES, sources: Sequence[dict[tuple[int, ...], set[int]]] | None = None) -> None:
        self.k = k = int(num_beams)
        self.settings, self.stop, self.rules = settings, frozenset(stop), rules
        self.prompt_len = plen = len(prompts[0])
        self.max_len = plen + settings.max_new_tokens
        b = len(prompts)
        self.seqs = np.zeros((b, k, self.max_len), np.int64)
        self.seqs[:, :, :plen] = np.asarray(prompts, np.int64)[:, None, :]
        self.scores = np.full((b, k), _PENALTY, np.float32)  # the running hypotheses' summed log-probabilities
        self.scores[:, 0] = 0
        self.best = np.zeros((b, k, self.max_len), np.int64)  # finished hypotheses, best first
        self.best_scores = np.full((b, k), _PENALTY, np.float32)
        self.best_lens = np.zeros((b, k), np.int64)
        self.finished = np.zeros((b, k), bool)
        self.improvable = np.ones(b, bool)
        self.cur = plen
        self.live = list(range(b))
        self.reorder = np.arange(b * k)
        self.tokens = np.asarray(prompts, np.int64)[:, -1].repeat(k)
        self._stop_ids = np.asarray(sorted(self.stop), np.int64)
        self.result: list[list[list[int]] | None] = [None] * b
        self.sources = None if sources is None else list(sources)

    @property
    def done(self) -> bool:
        """Whether every input has its result."""
        return not self.live

    def step(self, logits: np.ndarray) -> None:
        """Choose the next tokens from ``logits`` ``[live inputs * num_beams, vocab]`` (the last position of the
        rows as last fed); updates :attr:`reorder`, :attr:`tokens`, :attr:`live` and :attr:`result`."""
        k, s, cur = self.k, self.settings, self.cur
        b, vocab = len(self.live), logits.shape[-1]
        rows = np.arange(b)[:, None]
        logp = process_scores(log_softmax(logits), self.seqs[:, :, :cur].reshape(b * k, cur), self.prompt_len, s,
                              self.stop, self.rules,
                              None if self.sources is None else [t for t in self.sources for _ in range(k)])
        total = (logp.reshape(b, k, vocab) + self.scores[:, :, None]).reshape(b, k * vocab)
        keep = max(2, 1 + len(self._stop_ids)) * k
        top = _top(total, keep)
        cand_scores = total[rows, top]
        cand_beam, cand_tok = top // vocab, top % vocab
        cand_seqs = self.seqs[rows, cand_beam]
        cand_seqs[:, :, cur] = cand_tok
        hits = (cand_tok[:, :, None] == self._stop_ids).any(axis=2) | (cur + 1 >= self.max_len)
        # the best num_beams candidates that go on
        running = cand_scores + hits.astype(np.float32) * _PENALTY
        go = _top(running, k)
        self.seqs, self.scores, beam = cand_seqs[rows, go], running[rows, go], cand_beam[rows, go]
        # the finished ones among the first num_beams candidates, if they beat what is finished already (where none
        # finished, every candidate scores below every finished hypothesis and the finished ones stay)
        just = hits[:, :k]
        if just.any():
            final = cand_scores[:, :k] / np.float32((cur + 1 - self.prompt_len) ** s.length_penalty)
            full = self.finished.all(axis=1) & (s.early_stopping is True)
            final = final + full[:, None].astype(np.float32) * _PENALTY
            final = final + (~self.improvable)[:, None].astype(np.float32) * _PENALTY
            final = final + (~just).astype(np.float32) * _PENALTY
            merged = np.concatenate([self.best_scores, final], axis=1)
            pick = _top(merged, k)
            self.best = np.concatenate([self.best, cand_seqs[:, :k]], axis=1)[rows, pick]
            self.best_scores = merged[rows, pick]
            self.best_lens = np.concatenate([self.best_lens, np.full((b, k), cur + 1, np.int64)], axis=1)[rows, pick]
            self.finished = np.concatenate([self.finished, just], axis=1)[rows, pick]
        self.cur = cur = cur + 1
        # can a running hypothesis still beat the worst finished one?
        if s.early_stopping == "never" and s.length_penalty > 0:
            length = self.max_len - self.prompt_len
        else:
            length = cur - self.prompt_len
        best_running = self.scores[:, :1] / np.float32(length ** s.length_penalty)
        worst = np.where(self.finished, self.best_scores.min(axis=1, keepdims=True), _PENALTY)
        self.improvable &= (best_running > worst).any(axis=1)
        stopped = ~self.improvable | (self.finished.all(axis=1) & (s.early_stopping is True))
        if cur >= self.max_len or hits.all():  # no input can go on
            stopped[:] = True
        for j in np.flatnonzero(stopped):
            self.result[self.live[j]] = [self.best[j, h, self.prompt_len:self.best_lens[j, h]].tolist()
                                         for h in range(s.num_return_sequences)]
        on = ~stopped
        self.reorder = ((rows * k + beam)[on]).reshape(-1)
        if not on.all():  # the state of the inputs that go on
            self.seqs, self.scores, self.best, self.best_scores = self.seqs[on], self.scores[on], self.best[on], \
                self.best_scores[on]
            self.best_lens, self.finished, self.improvable = self.best_lens[on], self.finished[on], self.improvable[on]
            self.live = [i for i, o in zip(self.live, on, strict=True) if o]
            if self.sources is not None:
                self.sources = [t for t, o in zip(self.sources, on, strict=True) if o]
        self.tokens = self.seqs[:, :, cur - 1].reshape(-1)
