"""Serving: one base model, many LoRA adapters.

* :func:`export_swappable` + :class:`AdapterSession`: LoRA weights are ONNX inputs with
  empty defaults; adapters are ``.onnx_adapter`` files (:func:`write_adapter`) chosen per
  run with ONNX Runtime's ``RunOptions.add_active_adapter``.
* :func:`export_mixed` + :class:`MixedAdapterSession`: stacked adapter weights and a
  per-row ``adapter_index``, so one call serves rows that use different adapters.
* :func:`package_triton`, :func:`package_torchscript`, :func:`export_torchscript`: artifacts for Triton
  (ONNX Runtime and PyTorch entries) and libtorch/TorchServe.
* :mod:`flora_graph.serving.genai` (``export_genai``): a causal LM with its key/value cache and
  PEFT adapters as an ONNX Runtime GenAI package; :mod:`flora_graph.serving.generate`
  (``Generator``): generation from such a package on plain ONNX Runtime, with mixed-adapter batches;
  :mod:`flora_graph.serving.base_branch`: the package model's ``If`` that skips the slots without an adapter.
* :mod:`flora_graph.serving.seq2seq` (``export_seq2seq``, ``Seq2SeqGenerator``): an encoder-decoder model (T5,
  BART, Marian, Whisper) as an encoder, a decoder with its cache and per-model adapter files, and generation from it.

Adapters are ``{param name: array}`` mappings (``"<module>.lora_A"``, ``"<module>.lora_B"``
with the scale folded into ``B``): :func:`adapter_params` makes one from a model with
``LoRAAdapter``\\ s, :func:`graph_adapter_params` from a captured graph.
"""

from __future__ import annotations

from flora_graph.serving.adapter_file import AdapterFile, layout_signature, read_adapter, write_adapter
from flora_graph.serving.artifacts import (
    export_torchscript,
    io_description,
    package_torchscript,
    package_triton,
    triton_config,
)
from flora_graph.serving.errors import (
    AdapterChecksumWarning,
    AdapterFileError,
    AdapterIndexError,
    ServingError,
    UnknownAdapterError,
)
from flora_graph.serving.export import INDEX_INPUT, export_mixed, export_swappable
from flora_graph.serving.mixed import NO_ADAPTER, MixedAdapterSession, stack_adapters
from flora_graph.serving.session import AdapterSession
from flora_graph.serving.slots import LoRASlot, adapter_params, graph_adapter_params, peft_adapter_params

__all__ = [
    "INDEX_INPUT",
    "NO_ADAPTER",
    "AdapterChecksumWarning",
    "AdapterFile",
    "AdapterFileError",
    "AdapterIndexError",
    "AdapterSession",
    "LoRASlot",
    "MixedAdapterSession",
    "ServingError",
    "UnknownAdapterError",
    "adapter_params",
    "export_mixed",
    "export_swappable",
    "export_torchscript",
    "graph_adapter_params",
    "io_description",
    "layout_signature",
    "package_torchscript",
    "package_triton",
    "peft_adapter_params",
    "read_adapter",
    "stack_adapters",
    "triton_config",
    "write_adapter",
]
