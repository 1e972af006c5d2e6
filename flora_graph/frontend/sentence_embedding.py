"""A sentence-transformers folder's pipeline: its transformers model, then its pooling (dense, normalize, ...) modules.

An embedding model saved by sentence-transformers (``modules.json`` beside ``config.json``: ``all-MiniLM-L6-v2``,
BGE, E5, GTE, ...) is its transformers model followed by the modules that turn the tokens' states into one vector per
text: ``Pooling`` (mean, CLS, max, last token, ...), then ``Dense`` and ``Normalize`` where the folder has them. What
a user of such a model serves is that vector, so its export is the whole pipeline (as Optimum's exports of
sentence-transformers models are): inputs ``input_ids``, ``attention_mask`` (the pooling reads it) and
``token_type_ids`` where the model takes them; outputs ``token_embeddings`` ``[batch, seq, hidden]`` and
``sentence_embedding`` ``[batch, dim]``.

The modules after the transformer are sentence-transformers' own, loaded by that package from the folder (the
``embeddings`` extra installs it); the transformer is flora_graph's load of the folder (or of the subfolder
``modules.json`` names, ``0_Transformer`` in older folders), held apart as :attr:`SentenceEmbedding.model`, where a
PEFT adapter installs (its module names are the transformers model's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora_graph.errors import ModelFolderError

__all__ = ["MODULES_FILE", "OUTPUTS", "SentenceEmbedding", "sentence_modules", "transformer_folder"]

MODULES_FILE = "modules.json"
"""The file that makes a folder a sentence-transformers one: its modules in order, each ``{"path", "type", ...}``."""

OUTPUTS = ("token_embeddings", "sentence_embedding")
"""What :class:`SentenceEmbedding` returns, by sentence-transformers' (and Optimum's) names."""

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle")


def _entries(folder: Path) -> list[dict[str, Any]] | None:
    """``modules.json``'s entries, or ``None`` where ``folder`` has none; :class:`ModelFolderError` for a bad one."""
    path = folder / MODULES_FILE
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFolderError(f"{path}: cannot read it as JSON ({exc})") from None
    if not (isinstance(entries, list) and entries and all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                                          and isinstance(e.get("type"), str) for e in entries)):
        raise ModelFolderError(f"{path}: expected a non-empty list of {{\"path\": ..., \"type\": ...}} entries, as "
                               "sentence-transformers writes it")
    return entries


def transformer_folder(folder: str | Path) -> Path | None:
    """The folder of the transformers model of sentence-transformers folder ``folder`` (itself, or the subfolder its
    first module names), or ``None`` where ``folder`` is not a sentence-transformers one (no ``modules.json``).

    :class:`ModelFolderError` where ``modules.json`` is unreadable, its first module is not a ``Transformer``, a path
    leaves the folder, or a module's weights are pickles only (flora_graph loads safetensors only)."""
    folder = Path(folder)
    entries = _entries(folder)
    if entries is None:
        return None
    first = entries[0]
    if first["type"].rsplit(".", 1)[-1] != "Transformer":
        raise ModelFolderError(f"{folder / MODULES_FILE}: its first module is {first['type']!r}; flora-graph export "
                               "reads a sentence-transformers pipeline that starts with a Transformer module")
    root = folder.resolve()
    for entry in entries:
        sub = (folder / entry["path"]).resolve()
        if sub != root and root not in sub.parents:
            raise ModelFolderError(f"{folder / MODULES_FILE}: module path {entry['path']!r} leaves the folder")
        pickles = [p for pattern in _PICKLES for p in sub.glob(pattern)]
        if pickles and not any(sub.glob("*.safetensors")):
            raise ModelFolderError(f"{pickles[0]}: the module's weights are a pickle; flora_graph loads safetensors "
                                   "only (save the model again with safe_serialization, sentence-transformers' default)")
    return folder / first["path"]


def sentence_modules(folder: str | Path) -> nn.Sequential:
    """The modules after the transformer of sentence-transformers folder ``folder``, as sentence-transformers loads
    them (float32, eval mode, on the CPU); :class:`ModelFolderError` where that package is missing or refuses the
    folder."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ModelFolderError(f"{folder}: a sentence-transformers folder ({MODULES_FILE}); its pooling modules load "
                               "through that package: pip install 'flora-graph[embeddings]'") from None
    try:
        pipeline = SentenceTransformer(str(folder), device="cpu", local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise ModelFolderError(f"{folder}: sentence-transformers cannot load it ({type(exc).__name__}: {exc})") from exc
    return nn.Sequential(*list(pipeline)[1:]).float().eval()


class SentenceEmbedding(nn.Module):
    """A transformers ``model`` then sentence-transformers' ``modules``: ``forward(input_ids, attention_mask,
    token_type_ids=None)`` -> ``{"token_embeddings": [batch, seq, hidden], "sentence_embedding": [batch, dim]}``,
    as sentence-transformers computes them (its ``Transformer`` module's states are the model's
    ``last_hidden_state``)."""

    def __init__(self, model: nn.Module, modules: nn.Sequential) -> None:
        super().__init__()
        self.model = model
        self.modules_after = modules

    @property
    def config(self) -> Any:
        """The transformers model's config."""
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The tokens' states and the texts' embeddings of a batch of token ids (``attention_mask`` 0 at padding)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.model(**inputs, return_dict=True)
        features: dict[str, Any] = {**inputs, "token_embeddings": out.last_hidden_state}
        for module in self.modules_after:
            features = module(features)
        return {name: features[name] for name in OUTPUTS}
