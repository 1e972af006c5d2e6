"""Adapter fidelity: PEFT adapter variants in a GenAI package, flora_graph against the ONNX Runtime GenAI model builder.

Builds the tiny Llama of ``benchmarks/generate.py`` (hidden 256, 8 heads, 4 KV heads, vocab 512; ``--layers``
layers) and one PEFT adapter per variant, each with nonzero ``B``:

- ``plain``: r 4, alpha 16 on q/v/o;
- ``rslora``: ``use_rslora`` (scale ``alpha / sqrt(r)``);
- ``pattern``: ``rank_pattern`` / ``alpha_pattern`` (another rank and scale per module);
- ``layers``: ``layers_to_transform`` (one layer of the model only);
- ``dora``: ``use_dora`` with magnitudes that are not the weight norms;
- ``adalora``: an AdaLoRA adapter (``peft_type`` ``ADALORA``: ``x (A * E)^T B^T * alpha / (ranknum + 1e-5)``), ``A``,
  ``E`` and ``B`` drawn large and trained a few steps with PEFT's rank allocation, whose last step prunes each
  module to the ranks it keeps (its ``rank_pattern``; some modules keep none);
- ``loha`` and ``vera``: PEFT's LoHa (a Hadamard product of two low-rank products) and VeRA (shared random projections
  scaled per layer) adapters, every trainable value drawn at random (flora_graph swaps each as a slot of its change
  of the weight).

Per variant it generates ``--new`` greedy tokens after a 6-token prompt with eager transformers + PEFT (the
reference), with the builder's model of the base with the adapter baked in (``python -m
onnxruntime_genai.models.builder -i BASE -o OUT -p fp32 -e cpu --extra_options adapter_path=DIR``, run in
onnxruntime-genai), and with flora_graph's package (the adapter hot-swappable, ``flora-graph export BASE
--task text-generation-with-past --format genai --adapter NAME=DIR``, DoRA's magnitude included), also in
onnxruntime-genai, and prints whether each equals the
reference and the largest difference of their first step's logits from eager's. The base model alone is
the control row: the builder must match there for its other rows to mean anything.
Run: ``python benchmarks/adapter_fidelity.py``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

PROMPT = [1, 5, 9, 33, 70, 12]
TARGETS = ["q_proj", "v_proj", "o_proj"]
VARIANTS = {
    "plain": dict(r=4, lora_alpha=16, target_modules=TARGETS),
    "rslora": dict(r=4, lora_alpha=16, target_modules=TARGETS, use_rslora=True),
    "pattern": dict(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"v_proj": 8}, alpha_pattern={"o_proj": 32}),
    "layers": dict(r=4, lora_alpha=16, target_modules=TARGETS, layers_to_transform=[1]),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "adalora": dict(init_r=8, target_r=4, lora_alpha=16, target_modules=TARGETS, total_step=6, tinit=1, tfinal=1,
                    deltaT=1),
    "loha": dict(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    "vera": dict(r=16, target_modules=TARGETS),
}
OTHER_TYPES = {"loha": "LoHaConfig", "vera": "VeraConfig"}
"""The variants of PEFT's other adapter types: their config classes."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--new", type=int, default=32, help="new tokens per generation")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Llama")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import numpy as np
    import peft
    import torch
    import transformers

    from flora_graph.llm_demo import save_word_tokenizer
    from flora_graph.serving.genai import export_genai

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688,
                                       num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
        transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
        save_word_tokenizer(root / "base", cfg.vocab_size)  # the model builder reads the folder's tokenizer
        gen = torch.Generator().manual_seed(1)
        for name, spec in VARIANTS.items():
            if name == "adalora":
                _adalora(root / "base", spec, root / name)
                continue
            if name in OTHER_TYPES:
                model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                            getattr(peft, OTHER_TYPES[name])(**spec))
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
                model.save_pretrained(root / name)
                continue
            model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                        peft.LoraConfig(init_lora_weights=False, **spec))  # nonzero B
            with torch.no_grad():
                for module in model.modules():
                    for vec in getattr(module, "lora_magnitude_vector", {}).values():
                        vec.weight.mul_(1.0 + 0.5 * torch.rand(vec.weight.shape, generator=gen))
            model.save_pretrained(root / name)

        def eager(adapter: str | None) -> tuple[list[int], np.ndarray]:
            model = transformers.LlamaForCausalLM.from_pretrained(root / "base").eval()
            if adapter:
                model = peft.PeftModel.from_pretrained(model, root / adapter).eval()
            model.generation_config.eos_token_id = None
            ids = torch.tensor([PROMPT])
            with torch.no_grad():
                logits = model(ids).logits[0, -1].numpy()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, do_sample=False)
            return out[0, len(PROMPT):].tolist(), logits

        rows = []
        for name in [None, *VARIANTS]:
            want, want_logits = eager(name)
            extra = ["--extra_options", f"adapter_path={root / name}"] if name else []
            done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "base"),
                                   "-o", str(root / f"builder_{name}"), "-p", "fp32", "-e", "cpu", *extra],
                                  capture_output=True, text=True)
            builder = (_genai(root / f"builder_{name}", None, args.new) if done.returncode == 0
                       else (f"builder failed: {done.stderr.strip().splitlines()[-1][:100]}", None))
            export_genai(root / "base", root / f"flora_{name}", {name: root / name} if name else None)
            ours = _genai(root / f"flora_{name}", name, args.new)
            rows.append((name or "base (control)", want, want_logits, builder, ours))

    print(f"greedy tokens ({args.new}) equal eager transformers + PEFT; in brackets, the largest |logit - eager's| "
          "at the first new token")
    print(f"{'adapter':>16}  {'builder (baked in)':>28}  {'flora_graph (swappable)':>28}")
    for name, want, want_logits, builder, ours in rows:
        cells = []
        for tokens, logits in (builder, ours):
            if logits is None:
                cells.append(str(tokens))
            else:
                cells.append(f"{tokens == want} ({float(np.abs(logits - want_logits).max()):.1e})")
        print(f"{name:>16}  {cells[0]:>28}  {cells[1]:>28}")
    flora_ok = all(ours[0] == want for _, want, _, _, ours in rows)
    print(f"flora_graph equals eager PEFT on every variant: {flora_ok}")
    return 0 if flora_ok else 1


def _adalora(base: Path, spec: dict, out: Path) -> None:
    """An AdaLoRA adapter of ``spec`` on ``base``: ``A``, ``E`` and ``B`` drawn large (AdaLoRA starts ``E`` at zero), then
    ``spec["total_step"]`` SGD steps on random tokens with PEFT's rank allocation after each (``update_and_allocate``;
    its last step prunes each module to the ranks it keeps), saved as ``out``."""
    import peft
    import torch
    import transformers

    torch.manual_seed(2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), peft.AdaLoraConfig(**spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{k}." in name for k in ("lora_A", "lora_B", "lora_E")):
                p.normal_(0, 1.0 if ".lora_E." in name else 0.2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(spec["total_step"]):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.save_pretrained(out)


def _genai(package: Path, adapter: str | None, new: int):
    """onnxruntime-genai's greedy tokens after :data:`PROMPT` on ``package`` and its first step's logits."""
    import onnxruntime_genai as og

    model = og.Model(str(package))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + new, do_sample=False)
    gen = og.Generator(model, params)
    if adapter:
        loaded = og.Adapters(model)
        loaded.load(str(package / "adapters" / f"{adapter}.onnx_adapter"), adapter)
        gen.set_active_adapter(loaded, adapter)
    gen.append_tokens(PROMPT)
    logits = gen.get_output("logits")[0, -1].copy()
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(PROMPT):], logits


if __name__ == "__main__":
    raise SystemExit(main())
