"""A tiny Llama folder, two PEFT adapters and their GenAI package, built once per test session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from flora_graph.cli import main
from flora_graph.llm_demo import save_word_tokenizer

PROMPT = [1, 5, 9, 33, 70, 12]
NEW = 32
ADAPTERS = {
    "all7": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]),
    # a subset of the modules, in one of the two layers (PEFT's layers_to_transform), another rank
    "qdown": dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
}


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder and two PEFT adapter folders with nonzero ``B``."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("genai")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    save_word_tokenizer(root / "base", cfg.vocab_size)
    for name, spec in ADAPTERS.items():
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"), peft.LoraConfig(**spec))
        for mod in model.modules():
            if hasattr(mod, "lora_B"):
                for k in mod.lora_B:
                    torch.nn.init.normal_(mod.lora_B[k].weight, std=0.2)
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="session")
def package(folders: Path) -> Path:
    """The GenAI package of ``folders``' base and adapters, written by ``flora-graph export``."""
    out = folders / "pkg"
    args = ["export", str(folders / "base"), "--task", "text-generation-with-past", "--format", "genai",
            "--out", str(out), *(a for n in ADAPTERS for a in ("--adapter", f"{n}={folders / n}"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    return out


def all_nodes(graph) -> list:
    """The nodes of an ONNX graph and of its subgraphs (``If`` branches), depth first."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.HasField("g"):
                out.extend(all_nodes(attr.g))
    return out


def eager_tokens(folders: Path, adapter: str | None, prompt: list[int] | None = None, new: int = NEW) -> list[int]:
    """Greedy tokens of eager transformers (+ PEFT for ``adapter``) after ``prompt``."""
    import peft
    import transformers

    prompt = PROMPT if prompt is None else prompt
    base = transformers.LlamaForCausalLM.from_pretrained(folders / "base").eval()
    model = peft.PeftModel.from_pretrained(base, folders / adapter).eval() if adapter else base
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()




def eager_greedy(model, prompt: list[int], new: int, **kw) -> list[int]:
    """Eager greedy tokens of ``model`` after ``prompt`` (``kw`` to ``generate``); the mask given, as generate() would
    otherwise take a prompt token equal to the config's pad id for padding."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, **kw)[0, len(prompt):].tolist()


def genai_tokens(model, prompt: list[int], new: int, adapters=None, adapter: str | None = None, **search) -> list[int]:
    """The ``new`` greedy tokens (beam search's, by ``search`` options such as ``num_beams``) ONNX Runtime GenAI
    generates after ``prompt`` on ``og.Model`` ``model`` (with ``adapter`` of ``og.Adapters`` ``adapters`` active),
    ``min_length`` keeping the end-of-text token out."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False, **search)
    g = og.Generator(model, params)
    if adapter:
        g.set_active_adapter(adapters, adapter)
    g.append_tokens(prompt)
    while not g.is_done():
        g.generate_next_token()
    return [int(t) for t in g.get_sequence(0)][len(prompt):]


def tiny_with_adapter(arch: str, root: Path, target_modules: object = "all-linear"):
    """A tiny ``arch`` (``tests.frontend.test_causal_lm.tiny_causal_lm``, end-of-text 2) saved with a tokenizer under
    ``root / "base"`` and a PEFT LoRA adapter on it (r 4, nonzero ``B``) under ``root / "ad"``: ``(model, adapted)``,
    both in eval mode."""
    import peft

    from tests.frontend.test_causal_lm import tiny_causal_lm

    model = tiny_causal_lm(arch)
    model.config.eos_token_id = 2
    model.save_pretrained(root / "base")
    save_word_tokenizer(root / "base", 128)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(tiny_causal_lm(arch), peft.LoraConfig(r=4, lora_alpha=8,
                                                                            target_modules=target_modules))
        adapted.base_model.model.load_state_dict(model.state_dict(), strict=False)
        for mod in adapted.modules():
            if "default" in getattr(mod, "lora_B", {}):
                torch.nn.init.normal_(mod.lora_B["default"].weight, std=0.1)
        adapted.save_pretrained(root / "ad")
    return model, adapted.eval()
PADDED_PROMPTS = [[1, 5, 9, 33, 70, 12, 40, 41, 7], [1, 8, 3]]
"""Two prompts of 9 and 3 tokens: in one batch the second row is left-padded by 6."""


def save_small(model, folder: Path) -> Path:
    """``model`` saved as ``folder / "base"`` with a word tokenizer of its vocabulary; that folder."""
    model.save_pretrained(folder / "base")
    save_word_tokenizer(folder / "base", model.config.vocab_size)
    return folder / "base"


def small_adapters(model, folder: Path, targets: dict[str, list[str]]) -> dict[str, object]:
    """``model`` saved (:func:`save_small`) and a PEFT LoRA adapter on it per name of ``targets`` (its target modules;
    the ``k``-th of rank ``4 * (k + 1)``, seed ``k``, nonzero ``B``) saved as ``folder / name``: name -> the adapted
    model, in eval mode."""
    import peft
    import transformers

    base = save_small(model, folder)
    adapted = {}
    for seed, (name, modules) in enumerate(targets.items()):
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                         peft.LoraConfig(r=4 * (seed + 1), lora_alpha=8, target_modules=modules,
                                                         init_lora_weights=False))
        peft_model.save_pretrained(folder / name)
        adapted[name] = peft_model.eval()
    return adapted


def assert_mixed_rows_decode_as_eager_peft(gen, model, adapted: dict, one: str, other: str, new: int = 8) -> list:
    """The Generator ``gen`` decodes :data:`PADDED_PROMPTS` in one batch as eager transformers (``model``) and eager
    PEFT (``adapted``, name -> adapted model) decode each prompt alone: with no adapter, with ``one`` for both rows,
    and with ``other`` and ``one`` as the rows' adapters in the same steps; the adapters change the tokens. The
    tokens of the rows without adapter."""
    kw = dict(max_new_tokens=new, min_new_tokens=new)
    base = gen.generate(PADDED_PROMPTS, **kw)
    single = gen.generate(PADDED_PROMPTS, adapters=one, **kw)
    mixed = gen.generate(PADDED_PROMPTS, adapters=[other, one], **kw)  # rows of different adapters in each step
    for row, prompt in enumerate(PADDED_PROMPTS):
        assert base[row] == eager_greedy(model, prompt, new, min_new_tokens=new)
        assert single[row] == eager_greedy(adapted[one], prompt, new, min_new_tokens=new)
    assert mixed == [eager_greedy(adapted[other], PADDED_PROMPTS[0], new, min_new_tokens=new), single[1]]
    assert base != single and mixed[0] != base[0]  # the adapters change the tokens: their slots are fed
    return base


def export_small(model, folder: Path, adapters: dict[str, Path] | None = None):
    """``model`` saved (:func:`save_small`) and exported by ``export_genai`` to ``folder / "pkg"`` with PEFT
    ``adapters`` (name -> folder); the export's report."""
    from flora_graph.serving.genai import export_genai

    save_small(model, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_genai(folder / "base", folder / "pkg", adapters)


def assert_padded_rows_decode_as_eager(model, folder: Path, new: int = 8):
    """Export ``model`` (:func:`export_small`) and check that the Generator decodes :data:`PADDED_PROMPTS` in one
    batch as eager transformers decodes each prompt alone, ``new`` greedy tokens; the export's report."""
    from flora_graph.serving.generate import Generator

    report = export_small(model, folder)
    got = Generator(folder / "pkg").generate(PADDED_PROMPTS, max_new_tokens=new, min_new_tokens=new)
    assert got == [eager_greedy(model, p, new, min_new_tokens=new) for p in PADDED_PROMPTS]
    return report


def assert_one_padded_call_gives_rows_alone(model, folder: Path) -> None:
    """Export ``model`` (:func:`export_small`: a model of recurrent states alone, no keys, values or positions in) and
    check that one ONNX Runtime call over :data:`PADDED_PROMPTS`, left-padded, from zero states, gives each row the
    logits eager transformers gives it alone (transformers' own call reads no mask, so it runs the padding as tokens)."""
    import numpy as np
    import onnxruntime as ort

    export_small(model, folder)
    session = ort.InferenceSession(str(folder / "pkg" / "model.onnx"), providers=["CPUExecutionProvider"])
    long, short = PADDED_PROMPTS
    pad = len(long) - len(short)
    feeds = {"input_ids": np.array([long, [0] * pad + short]),
             "attention_mask": np.array([[1] * len(long), [0] * pad + [1] * len(short)])}
    feeds.update({i.name: np.zeros((2, *i.shape[1:]), np.float32) for i in session.get_inputs() if i.name.startswith("past.")})
    both = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([p])).logits[0].numpy() for p in (long, short)]
    np.testing.assert_allclose(both[0], want[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(both[1, pad:], want[1], rtol=0, atol=1e-4)


def assert_captured_without_cache_as_eager_peft(model, targets: list[str]) -> None:
    """``model`` with a PEFT LoRA on ``targets`` (nonzero ``B``), captured without the cache at one length, runs on
    numpy and ONNX Runtime at other batches and lengths as eager PEFT does; the model's own forward is back after.
    The adapter is unloaded again (the model as it was)."""
    import numpy as np
    import peft

    from flora_graph.frontend import capture
    from flora_graph.runtimes import compile

    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
    try:
        graph = capture(adapted, {"input_ids": torch.randint(0, 128, (2, 8))}, {"input_ids": {0: "batch", 1: "seq"}})
        assert "forward" not in vars(model) and any(n.meta.get("adapter") for n in graph.nodes)
        for backend in ("numpy", "onnxruntime"):
            exe = compile(graph, backend)
            for shape in [(1, 5), (3, 11)]:
                x = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
                with torch.no_grad():
                    want = adapted(input_ids=x).logits.numpy()
                np.testing.assert_allclose(next(iter(exe(input_ids=x.numpy()).values())), want, rtol=0, atol=1e-4)
    finally:
        adapted.unload()
