"""A package carries its model's generation config (sampling defaults, repetition penalty, end-of-text ids,
the tokenizer's end-of-turn token among them), which ONNX Runtime GenAI and the Generator apply alike."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from flora_graph.serving.genai import GENAI_CONFIG, SEARCH_DEFAULTS, export_genai  # noqa: E402
from flora_graph.serving.generate import GenerationError, Generator  # noqa: E402
from tests.serving.genai_package import PROMPT, eager_tokens, genai_tokens  # noqa: E402

PENALTY = 1.5
CHAT_TEMPLATE = ("{% for m in messages %}<s> w{{ 10 if m['role'] == 'user' else 11 }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}w12{% endif %}")


def _eager(folders: Path, prompt: list[int], new: int, **search: object) -> list[int]:
    model = transformers.LlamaForCausalLM.from_pretrained(folders / "base").eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False, **search)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def chat(folders: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test base model as a chat model: a generation config that samples, with a repetition penalty and
    two end-of-text ids (and one past the vocabulary), and a tokenizer whose end-of-text token (``w9``) the
    configs do not name, with a chat template."""
    root = tmp_path_factory.mktemp("chat")
    shutil.copytree(folders / "base", root / "base")
    (root / "base" / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 7, 500], "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9,
         "repetition_penalty": PENALTY}))
    tok_cfg = root / "base" / "tokenizer_config.json"
    doc = json.loads(tok_cfg.read_text())
    doc["eos_token"] = "w9"
    tok_cfg.write_text(json.dumps(doc))
    (root / "base" / "special_tokens_map.json").unlink(missing_ok=True)
    (root / "base" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(root / "base", root / "pkg")
    return root / "pkg"


def test_the_package_carries_the_generation_config_and_the_end_of_turn_token(chat: Path, package: Path) -> None:
    doc = json.loads((chat / GENAI_CONFIG).read_text())
    assert doc["model"]["eos_token_id"] == [9, 2, 7]  # the tokenizer's first, as the model builder does; 500 is no token
    assert {k: doc["search"][k] for k in SEARCH_DEFAULTS} == {"do_sample": True, "temperature": 0.7, "top_k": 20,
                                                             "top_p": 0.9, "repetition_penalty": PENALTY}
    gen = Generator(chat)
    assert gen.defaults == {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": PENALTY}
    assert gen.eos == {9, 2, 7}
    plain = json.loads((package / GENAI_CONFIG).read_text())  # no generation_config.json: transformers' defaults
    assert plain["model"]["eos_token_id"] == 2
    assert {k: plain["search"][k] for k in SEARCH_DEFAULTS} == SEARCH_DEFAULTS
    assert Generator(package).defaults == SEARCH_DEFAULTS


def test_repetition_penalty_gives_eager_transformers_tokens(chat: Path, folders: Path, package: Path) -> None:
    gen = Generator(chat)
    want = _eager(folders, PROMPT, 24, repetition_penalty=PENALTY)
    assert want != eager_tokens(folders, None, PROMPT, 24)  # the penalty changes the tokens
    # the package's defaults sample; greedy with the package's penalty is eager's greedy with it
    assert gen.generate([PROMPT], do_sample=False, max_new_tokens=24, stop_tokens=[]) == [want]
    # a row's own penalty, next to a row without one, in one batch of the plain package
    plain = Generator(package)
    other = [1, 7, 3]
    got = plain.generate([PROMPT, other], repetition_penalty=PENALTY, max_new_tokens=24, stop_tokens=[])
    assert got[0] == want and got[1] == _eager(folders, other, 24, repetition_penalty=PENALTY)
    batch = plain.batch()
    a = batch.add(PROMPT, repetition_penalty=PENALTY, max_new_tokens=24, stop_tokens=[])
    b = batch.add(other, max_new_tokens=24, stop_tokens=[])
    while batch.active:
        batch.step()
    assert batch.row(a).generated == want and batch.row(b).generated == eager_tokens(folders, None, other, 24)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(GenerationError, match="repetition_penalty"):
            plain.generate([PROMPT], repetition_penalty=bad)


def test_the_package_samples_by_default_as_its_generation_config_says(chat: Path) -> None:
    gen = Generator(chat)
    first = gen.generate([PROMPT] * 2, seed=3, max_new_tokens=16, stop_tokens=[])
    again = gen.generate([PROMPT] * 2, seed=3, max_new_tokens=16, stop_tokens=[])
    assert first == again and first[0] != first[1]  # seeded sampling: rows seeded 3 and 4 differ
    greedy = gen.generate([PROMPT], do_sample=False, max_new_tokens=16, stop_tokens=[])[0]
    assert first[0] != greedy


def test_genai_applies_the_package_search_settings_as_the_generator_does(chat: Path, folders: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")
    # greedy, the penalty the package's
    assert genai_tokens(og.Model(str(chat)), PROMPT, 24) == _eager(folders, PROMPT, 24, repetition_penalty=PENALTY)


def test_generate_command_takes_the_package_settings_unless_given(chat: Path, folders: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from flora_graph.cli import main

    ids = ",".join(map(str, PROMPT))
    common = ["generate", str(chat), "--ids", ids, "--max-new-tokens", "24", "--ignore-eos"]
    assert main([*common, "--temperature", "0"]) == 0  # greedy, the package's penalty
    assert capsys.readouterr().out.split()[:24] == [str(t) for t in _eager(folders, PROMPT, 24, repetition_penalty=PENALTY)]
    assert main([*common, "--temperature", "0", "--repetition-penalty", "1"]) == 0
    assert capsys.readouterr().out.split()[:24] == [str(t) for t in eager_tokens(folders, None, PROMPT, 24)]
    for flag, value in (("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "-1"), ("--repetition-penalty", "0"),
                        ("--temperature", "nan")):
        with pytest.raises(SystemExit) as exc:
            main([*common, flag, value])
        assert exc.value.code == 2 and f"argument {flag}: must be a number in" in capsys.readouterr().err


def test_generate_command_formats_chat_prompts_with_the_package_chat_template(chat: Path, package: Path, folders: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    from flora_graph.cli import main

    assert (chat / "chat_template.jinja").read_text() == CHAT_TEMPLATE  # copied with the tokenizer
    ids = [1, 11, 7, 2, 1, 10, 5, 6, 2, 12]  # <s> system w7 </s> <s> user w5 w6 </s> reply
    assert main(["generate", str(chat), "--chat", "--system", "w7", "--prompt", "w5 w6", "--temperature", "0",
                 "--max-new-tokens", "8", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    want = _eager(folders, ids, 8, repetition_penalty=PENALTY)
    assert out.splitlines()[0].split() == [f"w{t}" for t in want if t >= 3] and "prompt 10 tokens" in out
    assert main(["generate", str(package), "--chat", "--prompt", "w5"]) == 2  # no chat template there
    assert "has no chat template" in capsys.readouterr().err
    assert main(["generate", str(chat), "--system", "w7", "--prompt", "w5"]) == 2
    assert "--system needs --chat" in capsys.readouterr().out
    assert main(["generate", str(chat), "--chat", "--ids", "1,5"]) == 2
    assert "--ids are token ids already" in capsys.readouterr().out
