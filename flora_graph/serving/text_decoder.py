"""The text decoder of an image-text (or audio-text) checkpoint, as the causal LM a package is made of.

Many causal LMs users adapt ship as multimodal checkpoints: Gemma 3 (4B and up), Qwen3.5, Mistral
Small 3, Llama 4, LLaVA-style models (``*ForConditionalGeneration``: a vision tower and projector
beside a text decoder). A text generation package needs the decoder alone, as ONNX Runtime GenAI's
model builder exports it. :func:`text_decoder` builds the text causal LM class transformers has for
the checkpoint's ``text_config`` (``Gemma3ForCausalLM``, ``MistralForCausalLM``, ...) around the
loaded model's own decoder and output layer (no copy), and maps the module paths of the two
(``model.language_model.layers.0.self_attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``), so
that an adapter trained on the whole model is read where it was trained and written where the
package reads it. Adapter weights on the vision side cannot change a text-only generation;
:func:`text_params` leaves them out and names them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flora_graph.model_export import ModelFolderError

__all__ = ["TextDecoder", "text_causal_lm_class", "text_decoder", "text_params"]


@dataclass
class TextDecoder:
    """A text causal LM over the modules of a multimodal model."""

    model: nn.Module  # the text causal LM (its decoder and output layer are ``source``'s own modules)
    source: nn.Module  # the model loaded from the checkpoint
    paths: dict[str, str]  # ``source`` module path -> ``model`` module path, for each module they share


def text_causal_lm_class(config: Any) -> type | None:
    """The transformers causal LM class of ``config``'s text part, for a config that holds one (``text_config``)
    of a type ``AutoModelForCausalLM`` builds; ``None`` for a text-only config or a text part without one."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    if text is config or text is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(text)]
    except KeyError:
        return None


def text_decoder(model: nn.Module) -> TextDecoder | None:
    """The text causal LM of multimodal ``model`` over its own decoder and output layer, or ``None`` when
    ``model``'s config has no text part with a causal LM class (a text model: nothing to do).

    Raises :class:`ModelFolderError` when the text class's layout does not take ``model``'s modules (its
    decoder of another type, no output layer, or weights of the text class left unfilled).
    """
    cls = text_causal_lm_class(model.config)
    if cls is None:
        return None
    what = f"{type(model).__name__}'s text part as {cls.__name__}"
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if isinstance(decoder, cls):  # the text part is a whole causal LM already (Llama 4's): the checkpoint's
        decoder.generation_config = model.generation_config  # generation settings (end-of-text ids) are its own
        return TextDecoder(decoder.eval(), model, _shared_paths(model, decoder))
    with torch.device("meta"):
        text = cls(model.config.get_text_config())
    prefix = cls.base_model_prefix
    inner = getattr(text, prefix, None)
    if type(decoder) is not type(inner):
        raise ModelFolderError(f"{what}: its decoder is a {type(decoder).__name__}, {cls.__name__} holds a "
                               f"{type(inner).__name__}")
    own_head = text.get_output_embeddings()
    if head is None or own_head is None or tuple(head.weight.shape) != tuple(own_head.weight.shape):
        raise ModelFolderError(f"{what}: no output layer of the text vocabulary's shape")
    setattr(text, prefix, decoder)
    text.set_output_embeddings(head)
    unfilled = [n for n, t in itertools.chain(text.named_parameters(), text.named_buffers()) if t.is_meta]
    if unfilled:
        raise ModelFolderError(f"{what}: {', '.join(unfilled[:3])} have no counterpart in the checkpoint")
    text.generation_config = model.generation_config
    return TextDecoder(text.eval(), model, _shared_paths(model, text))


def _shared_paths(model: nn.Module, text: nn.Module) -> dict[str, str]:
    """``model``'s path -> ``text``'s path of every module (but the root) the two hold."""
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)]: n for n, m in text.named_modules() if id(m) in names and n}


def text_params(params: Mapping[str, Any], paths: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Adapter parameters named by the source model's module paths (``<path>.lora_A``/``.lora_B``), renamed to the
    text model's: ``(kept, dropped)``, ``dropped`` the sites the text model does not hold (vision tower, projector)."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in params.items():
        site, _, leaf = name.rpartition(".")
        if site in paths:
            kept[f"{paths[site]}.{leaf}"] = value
        elif site not in dropped:
            dropped.append(site)
    return kept, dropped
