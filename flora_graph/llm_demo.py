"""The main job: a LoRA-adapted LLM from PEFT folders to generation, end to end, checked against eager PEFT.

:func:`run_llm_demo` builds the built-in small Llama (transformers' ``LlamaForCausalLM`` from a
fixed config, seeded, no download) and two PEFT LoRA adapters with nonzero ``B`` (rank 8 on all
seven projections; rank 4 on ``q_proj``/``v_proj``), then:

1. exports an ONNX Runtime GenAI package with both adapters hot-swappable
   (:func:`~flora_graph.serving.genai.export_genai`: capture with the key/value cache, optimize,
   adapter slots, ``.onnx_adapter`` files), timed;
2. generates greedy tokens with the base and each adapter through ONNX Runtime GenAI (where it
   imports) and through :class:`~flora_graph.serving.generate.Generator` on plain ONNX Runtime,
   and checks them against eager transformers + PEFT;
3. decodes a mixed-adapter batch (base, adapter 1, adapter 2 in one batch, one ONNX Runtime call
   per step) and checks every row against eager PEFT;
4. times a decode step (1 thread, medians): the Generator against eager transformers + PEFT
   with its cache.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LLMDemoReport", "build_llm", "run_llm_demo", "save_word_tokenizer"]

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"chat": {"r": 8, "lora_alpha": 16, "target_modules": PROJECTIONS},
            "style": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 87, 111, 114], [1, 70, 108, 111, 114, 97, 32, 76, 111]]


@dataclass
class LLMDemoReport:
    """What the demo measured: token checks, speed and export time."""

    package: Path
    export_s: float
    checks: dict[str, bool] = field(default_factory=dict)  # what -> tokens equal eager PEFT
    step_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # adapter -> (generator, eager) ms/step
    tokens: dict[str, list[int]] = field(default_factory=dict)
    genai: str = ""  # "" when onnxruntime-genai ran, else why it did not

    @property
    def ok(self) -> bool:
        """Whether every generation matched eager PEFT."""
        return bool(self.checks) and all(self.checks.values())


def save_word_tokenizer(folder: str | Path, vocab: int) -> None:
    """Save a whitespace word-level tokenizer of ``vocab`` words (``<pad> <s> </s> w3 w4 ...``) in ``folder``:
    what a model folder needs for tools that read its tokenizer (ONNX Runtime GenAI, its model builder)."""
    import tokenizers
    import transformers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def build_llm(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write the built-in small Llama to ``folder/base`` and its two PEFT adapters to ``folder/NAME``."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder / "base")
    save_word_tokenizer(folder / "base", cfg.vocab_size)
    out = {}
    for name, spec in ADAPTERS.items():
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(folder / "base"), peft.LoraConfig(**spec))
        for module in model.modules():
            if hasattr(module, "lora_B"):
                for key in module.lora_B:
                    torch.nn.init.normal_(module.lora_B[key].weight, std=0.1)  # nonzero B: the adapter changes tokens
        model.save_pretrained(folder / name)
        out[name] = folder / name
    return out


def run_llm_demo(out: str | Path | None = None, *, new_tokens: int = 24, rounds: int = 5,
                 progress: Callable[[str], None] | None = None) -> LLMDemoReport:
    """Run the demo (see the module docstring); the package goes to ``out`` (a temporary folder by default)."""
    import torch
    import transformers

    say = progress or (lambda msg: None)
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per model load
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices
        root = Path(tmp)
        say("building the small Llama and two PEFT adapters")
        peft_dirs = build_llm(root)
        package = Path(out) if out is not None else root / "package"
        from flora_graph.serving.genai import export_genai

        t0 = time.perf_counter()
        export_genai(root / "base", package, peft_dirs, progress=say)
        report = LLMDemoReport(package, time.perf_counter() - t0)
        eager = _eager_models(root, peft_dirs)
        say("generating with eager transformers + PEFT")
        want = {a: _eager_tokens(eager[a], PROMPTS[0], new_tokens) for a in eager}

        from flora_graph.serving.generate import Generator

        gen = Generator(package, threads=1)
        for adapter, tokens in want.items():
            label = adapter or "base"
            say(f"generating with the Generator ({label})")
            got = gen.generate([PROMPTS[0]], adapters=adapter, max_new_tokens=new_tokens, stop_tokens=[])[0]
            report.checks[f"Generator, {label}"] = got == tokens
            report.tokens[label] = got
        report.genai = _genai_checks(report, package, want, new_tokens, say)

        say("decoding a mixed-adapter batch")
        rows = [None, *peft_dirs]
        mixed = gen.generate(PROMPTS, adapters=rows, max_new_tokens=new_tokens, stop_tokens=[])
        report.checks["Generator, mixed batch (base, " + ", ".join(peft_dirs) + ")"] = all(
            got == _eager_tokens(eager[a], p, new_tokens) for got, a, p in zip(mixed, rows, PROMPTS, strict=True))

        say("timing a decode step")
        for adapter in (None, next(iter(peft_dirs))):
            g, e = [], []
            for _ in range(rounds):  # interleaved
                g.append(_step_ms(lambda n, a=adapter: gen.generate([PROMPTS[0]], adapters=a, max_new_tokens=n,
                                                                   stop_tokens=[]), new_tokens))
                e.append(_step_ms(lambda n, a=adapter: _eager_tokens(eager[a], PROMPTS[0], n), new_tokens))
            report.step_ms[adapter or "base"] = (statistics.median(g), statistics.median(e))
        if out is None:
            report.package = Path("(temporary)")
    return report


def _eager_models(root: Path, peft_dirs: dict[str, Path]) -> dict[str | None, Any]:
    import peft
    import transformers

    models: dict[str | None, Any] = {None: transformers.LlamaForCausalLM.from_pretrained(root / "base").eval()}
    for name, folder in peft_dirs.items():
        base = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        models[name] = peft.PeftModel.from_pretrained(base, folder).eval()
    return models


def _eager_tokens(model: Any, prompt: list[int], new: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def _step_ms(generate: Callable[[int], Any], new: int) -> float:
    t0 = time.perf_counter()
    generate(new)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate(1)
    one = time.perf_counter() - t0
    return (full - one) / (new - 1) * 1e3


def _genai_checks(report: LLMDemoReport, package: Path, want: dict[str | None, list[int]], new: int,
                  say: Callable[[str], None]) -> str:
    try:
        import onnxruntime_genai as og
    except ImportError as exc:  # not installable on every platform
        return f"onnxruntime-genai does not import here ({exc})"
    say("generating with ONNX Runtime GenAI")
    model = og.Model(str(package))
    adapters = og.Adapters(model)
    for name in [a for a in want if a]:
        adapters.load(str(package / "adapters" / f"{name}.onnx_adapter"), name)
    for adapter, tokens in want.items():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(PROMPTS[0]) + new, min_length=len(PROMPTS[0]) + new, do_sample=False)
        g = og.Generator(model, params)
        if adapter:
            g.set_active_adapter(adapters, adapter)
        g.append_tokens(PROMPTS[0])
        while not g.is_done():
            g.generate_next_token()
        report.checks[f"ONNX Runtime GenAI, {adapter or 'base'}"] = [int(t) for t in g.get_sequence(0)][len(PROMPTS[0]):] == tokens
    return ""
