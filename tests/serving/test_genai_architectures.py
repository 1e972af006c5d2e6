"""Packages for every supported causal LM: GenAI (where it has a model type) and the Generator equal eager greedy."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")

from flora_graph.llm_demo import save_word_tokenizer  # noqa: E402
from flora_graph.serving.genai import GENAI_TYPES, GENERATOR_ONLY, export_genai  # noqa: E402
from flora_graph.serving.generate import Generator  # noqa: E402
from tests.frontend.test_causal_lm import tiny_causal_lm  # noqa: E402

PROMPT, NEW = [1, 5, 9, 33, 70], 8
FAST = {"Qwen3ForCausalLM", "GPT2LMHeadModel"}  # no BOS token id; a Generator-only architecture


def _package(arch: str, tmp_path: Path, **options):
    """A tiny ``arch`` saved (with a tokenizer) under ``tmp_path / "base"`` and its package at ``tmp_path / "pkg"``:
    ``(model, report)``."""
    model = tiny_causal_lm(arch)
    model.config.eos_token_id = 2
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, export_genai(tmp_path / "base", tmp_path / "pkg", **options)


@pytest.mark.parametrize("arch", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow)
                                  for a in [*GENAI_TYPES, *GENERATOR_ONLY]])
def test_package_generates_eager_greedy_tokens(arch: str, tmp_path: Path) -> None:
    model, report = _package(arch, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            want = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW,
                                  do_sample=False)[0, len(PROMPT):].tolist()
    assert report.genai == (arch in GENAI_TYPES)
    assert Generator(tmp_path / "pkg").generate([PROMPT], max_new_tokens=NEW, stop_tokens=[])[0] == want
    if report.genai:
        gen_model = og.Model(str(tmp_path / "pkg"))
        params = og.GeneratorParams(gen_model)
        params.set_search_options(max_length=len(PROMPT) + NEW, min_length=len(PROMPT) + NEW, do_sample=False)
        gen = og.Generator(gen_model, params)
        gen.append_tokens(PROMPT)
        while not gen.is_done():
            gen.generate_next_token()
        assert [int(t) for t in gen.get_sequence(0)][len(PROMPT):] == want


FAST_ADAPTED = {"Qwen2ForCausalLM"}  # biased q/k/v: packed with their biases


@pytest.mark.parametrize("arch", [a if a in FAST_ADAPTED else pytest.param(a, marks=pytest.mark.slow)
                                  for a in [*GENAI_TYPES, *GENERATOR_ONLY]])
def test_adapted_package_generates_eager_peft_greedy_tokens(arch: str, tmp_path: Path) -> None:
    """With a PEFT adapter on every linear layer (nonzero ``B``), sibling slots packed: the Generator (adapter
    and base) and GenAI give eager PEFT's greedy tokens."""
    import peft

    model = tiny_causal_lm(arch)
    model.config.eos_token_id = 2
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base", 128)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(tiny_causal_lm(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        adapted.base_model.model.load_state_dict(model.state_dict(), strict=False)
        for mod in adapted.modules():
            if "default" in getattr(mod, "lora_B", {}):
                torch.nn.init.normal_(mod.lora_B["default"].weight, std=0.1)
        adapted.save_pretrained(tmp_path / "ad")
        report = export_genai(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"})
        with torch.no_grad():  # pure greedy: no EOS (the Generator runs with stop_tokens=[])
            adapted.eval()
            for m in (model, adapted.base_model.model):
                m.generation_config.eos_token_id = None
            want = adapted.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=NEW,
                                    do_sample=False)[0, len(PROMPT):].tolist()
            plain = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False)[0, len(PROMPT):].tolist()
            ids = torch.tensor([PROMPT])
            assert (adapted(input_ids=ids).logits - model(ids).logits).abs().max() > 1e-3  # the adapter matters
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT], adapters="ad", max_new_tokens=NEW, stop_tokens=[])[0] == want
    assert gen.generate([PROMPT, PROMPT], adapters=[None, "ad"], max_new_tokens=NEW, stop_tokens=[]) == [plain, want]
    if report.genai:
        gen_model = og.Model(str(tmp_path / "pkg"))
        adapters = og.Adapters(gen_model)
        adapters.load(str(report.adapters["ad"]), "ad")
        params = og.GeneratorParams(gen_model)
        params.set_search_options(max_length=len(PROMPT) + NEW, min_length=len(PROMPT) + NEW, do_sample=False)
        g = og.Generator(gen_model, params)
        g.set_active_adapter(adapters, "ad")
        g.append_tokens(PROMPT)
        while not g.is_done():
            g.generate_next_token()
        cut = want.index(2) if 2 in want else NEW  # GenAI's min_length forbids EOS (2): equal up to it
        assert [int(t) for t in g.get_sequence(0)][len(PROMPT):][:cut] == want[:cut]


@pytest.mark.parametrize(("arch", "right"), [("Qwen3ForCausalLM", True), ("LlamaForCausalLM", True),
                                             ("LlamaForCausalLM", False)])
def test_batched_rows_of_different_lengths_equal_their_single_runs_on_either_cache_padding(arch: str, right: bool,
                                                                                            tmp_path: Path) -> None:
    """With ONNX Runtime's contrib ops, attention becomes GroupQueryAttention (right-padded caches shared by
    past and present; GenAI shares its buffers too), in 3-D (Llama) or 4-D (Qwen3, caches concatenated
    outside); in standard ONNX (``contrib=False``) the caches are left-padded: either way rows of
    different lengths, joining and leaving, decode as they do alone."""
    import json

    _package(arch, tmp_path, contrib=right)
    gen = Generator(tmp_path / "pkg")
    assert gen.right_padded is right
    assert json.loads((tmp_path / "pkg" / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is right
    prompts = [PROMPT, [1, 7, 3], [1, 100, 101, 102, 103, 104, 105, 106, 107]]
    alone = [gen.generate([p], max_new_tokens=n, stop_tokens=[])[0] for p, n in zip(prompts, (10, 4, 7), strict=True)]
    batch = gen.batch()
    rows = [batch.add(prompts[0], max_new_tokens=10, stop_tokens=[])]
    batch.step()
    rows.append(batch.add(prompts[1], max_new_tokens=4, stop_tokens=[]))  # leaves first: the cache is trimmed
    rows.append(batch.add(prompts[2], max_new_tokens=7, stop_tokens=[]))  # the longest history
    while batch.active:
        batch.step()
    assert [batch.row(r).generated for r in rows] == alone
