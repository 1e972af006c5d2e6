"""End-to-end export: a model (+ optional PEFT adapter folder) -> optimized ONNX / TorchScript / pt2.

The route users take today is PEFT merge + ``torch.onnx.export``; this one captures the
adapted model once with ``torch.export``, optimizes it (``merged`` bakes the adapters in,
``fused`` keeps them swappable) and lowers it, then checks the artifact against eager
torch on a fresh input shape and reports the largest difference.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flora_graph.errors import FloraGraphError
from flora_graph.frontend import capture
from flora_graph.passes import optimize
from flora_graph.runtimes import compile

__all__ = ["SUFFIX", "ExportReport", "ModelSpec", "export_model", "load_model"]

SUFFIX = {"onnxruntime": ".onnx", "torchscript": ".pt", "torch-export": ".pt2"}


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


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and measured."""

    path: Path
    backend: str
    preset: str
    summary: str
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    max_abs_diff: float = float("nan")
    tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        """Whether the artifact matched eager torch within ``tolerance``."""
        return self.max_abs_diff <= self.tolerance


def _token_inputs(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)}


def _hf_inputs(vocab: int, batch: int, seq: int, seed: int, mask: bool) -> dict[str, torch.Tensor]:
    out = _token_inputs(vocab, batch, seq, seed)
    if mask:
        m = torch.ones(batch, seq, dtype=torch.int64)
        m[0, : min(2, seq - 1)] = 0  # left padding in the first row
        out["attention_mask"] = m
    return out


def load_model(source: str | Path | None = None, *, lora_rank: int | None = 8,
               attention_mask: bool = False) -> ModelSpec:
    """``None``/``"default"``: the built-in small decoder (with LoRA of ``lora_rank`` on every
    projection, nonzero ``B``, unless ``None``); ``"demo-cnn"``: the CNN+MLP demo; a folder with
    ``config.json`` + safetensors: a transformers model built from it (no download).

    A transformers model is loaded in float32 with ``use_cache=False`` (outputs without a
    key/value cache) and takes ``input_ids`` (``[batch, seq]``, both dynamic), plus an
    ``attention_mask`` of the same shape when ``attention_mask`` is true (the check input
    pads its first row). Where the config has ``max_position_embeddings`` (BERT, GPT-2,
    Llama), ``"seq"`` is bounded by it (``dim_max``): BERT and GPT-2 slice a learned position
    table by the sequence length, which ``torch.export`` accepts only under a bound.
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
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FloraGraphError(f"{folder}: expected a model folder with config.json (+ safetensors weights), or 'default'")
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise FloraGraphError(f"{folder}/config.json names no known transformers architecture ({arch!r})")
    model = cls.from_pretrained(folder, local_files_only=True).eval()
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # a bfloat16/float16 checkpoint: captured and checked in float32
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # logits only: no key/value cache outputs
    if attention_mask and "attention_mask" not in inspect.signature(model.forward).parameters:
        raise FloraGraphError(f"{arch}.forward takes no attention_mask")
    vocab = int(getattr(config, "vocab_size", 256))
    max_pos = getattr(config, "max_position_embeddings", None)
    dim_max = {"seq": int(max_pos)} if isinstance(max_pos, int) and max_pos >= 2 else {}
    seq = min(8, dim_max.get("seq", 8))
    names = ["input_ids", "attention_mask"] if attention_mask else ["input_ids"]
    return ModelSpec(model, _hf_inputs(vocab, 2, seq, 0, attention_mask), {n: {0: "batch", 1: "seq"} for n in names},
                     _hf_inputs(vocab, 3, min(11, dim_max.get("seq", 11)), 1, attention_mask), arch, dim_max)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, list | tuple):
        return _first_tensor(out[0])
    raise FloraGraphError(f"model output of type {type(out).__name__} holds no tensor")


def export_model(
    source: str | Path | ModelSpec | None,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    backend: str = "onnxruntime",
    preset: str = "merged",
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export ``source`` (see :func:`load_model`), with the PEFT ``adapter`` folder installed if
    given, optimized with ``preset`` for ``backend``, to ``out`` (a file; the backend's suffix
    is added when missing). Returns timings and the parity against eager torch."""
    say = progress or (lambda msg: None)
    if backend not in SUFFIX:
        raise FloraGraphError(f"unknown export backend {backend!r}; choose one of {sorted(SUFFIX)}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    say("loading the model")
    # the built-in decoder carries its own LoRA unless a PEFT adapter is to be installed on it
    spec = source if isinstance(source, ModelSpec) else load_model(source, lora_rank=None if adapter else 8)
    model = spec.model
    if adapter is not None:
        from flora_graph.adapters.peft import load_peft_adapter

        say(f"installing the PEFT adapter {adapter}")
        model = copy.deepcopy(model)
        load_peft_adapter(model, adapter)
    seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say("capturing with torch.export")
    graph = capture(model, spec.example_inputs, spec.dynamic_dims, name=spec.name, dim_max=spec.dim_max or None)
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
        want = _first_tensor(model(**spec.check_inputs)).numpy()
    got = next(iter(exe(spec.check_inputs).values()))
    diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    return ExportReport(path, backend, preset, graph.summary(), seconds, diff)
