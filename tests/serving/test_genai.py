"""ONNX Runtime GenAI packages from a model folder and PEFT folders: GenAI generates eager PEFT's greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")

from flora_graph.errors import AdapterError, FloraGraphError  # noqa: E402
from flora_graph.serving import read_adapter  # noqa: E402
from flora_graph.serving.base_branch import has_adapter_flag  # noqa: E402
from flora_graph.serving.errors import AdapterFileError  # noqa: E402
from flora_graph.serving.genai import GENAI_CONFIG, export_genai  # noqa: E402
from flora_graph.serving.slots import ADAPTER_FLAG  # noqa: E402
from tests.serving.genai_package import ADAPTERS, NEW, PROMPT, all_nodes, eager_tokens, genai_tokens  # noqa: E402


def _genai(package: Path, adapter: str | None) -> list[int]:
    model = og.Model(str(package))
    adapters = og.Adapters(model)
    for name in ADAPTERS:
        adapters.load(str(package / "adapters" / f"{name}.onnx_adapter"), name)
    return genai_tokens(model, PROMPT, NEW, adapters, adapter)


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_genai_generates_eager_peft_greedy_tokens(folders: Path, package: Path, adapter: str | None) -> None:
    want = eager_tokens(folders, adapter)
    assert len(want) == NEW
    assert _genai(package, adapter) == want


def test_package_layout_and_adapter_checksums(package: Path) -> None:
    doc = json.loads((package / GENAI_CONFIG).read_text())
    dec = doc["model"]["decoder"]
    assert doc["model"]["type"] == "llama" and dec["num_hidden_layers"] == 2 and dec["num_key_value_heads"] == 2
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key" and dec["outputs"]["logits"] == "logits"
    assert (package / dec["filename"]).is_file()
    model = onnx.load(str(package / dec["filename"]), load_external_data=False)
    assert has_adapter_flag(model) and [n.op_type for n in model.graph.node] == ["Cast", "If"]  # base_branch
    assert sum(n.op_type == "GroupQueryAttention" for n in all_nodes(model.graph)) == 2 * 2  # 2 layers, 2 branches
    for name, spec in ADAPTERS.items():
        params = read_adapter(package / "adapters" / f"{name}.onnx_adapter", require_checksum=True).params
        for k, v in params.items():  # q/k/v and gate/up are packed slots: their rank sums the members targeted
            if k.endswith(".lora_A"):
                members = k.removesuffix(".lora_A").rpartition(".")[2].split("+")
                assert v.shape[0] == spec["r"] * len(set(members) & set(spec["target_modules"])), k
        assert any("q_proj+k_proj+v_proj" in k for k in params)
        slots = [{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}]
        touched = sum(1 for slot in slots if slot & set(spec["target_modules"]))
        assert params.pop(ADAPTER_FLAG).tolist() == [1.0]  # the model takes its slots' branch (base_branch)
        layers = len(spec.get("layers_to_transform", range(2)))  # of the model's 2
        assert len(params) == 2 * layers * touched  # A and B per slot the adapter targets, per layer it targets
    assert not [p for p in package.parent.iterdir() if p.name.startswith(".pkg")]  # no staging leftovers


def test_adapters_that_cannot_be_swapped_are_refused_before_anything_is_written(folders: Path, tmp_path: Path) -> None:
    import shutil

    from tests.peft_folders import edit_peft_folder

    loftq = edit_peft_folder(shutil.copytree(folders / "qdown", tmp_path / "loftq"), config={"loftq_config": {"loftq_bits": 4}})
    with pytest.raises(AdapterError, match="loftq_config"):
        export_genai(folders / "base", tmp_path / "out", {"loftq": loftq})
    with pytest.raises(AdapterError, match="adapter name"):
        export_genai(folders / "base", tmp_path / "out", {"../x": folders / "qdown"})
    assert not (tmp_path / "out").exists()


def test_model_class_that_is_not_a_causal_lm_is_refused(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(FloraGraphError, match="BertForMaskedLM is not a causal LM"):
        export_genai(tmp_path / "bert", tmp_path / "out")


def test_standard_onnx_package_from_the_command_line_generates_the_same_tokens(folders: Path, tmp_path: Path) -> None:
    """``--no-ort-contrib``: the models are standard ONNX (no com.microsoft ops, left-padded caches, GenAI
    keeps past and present apart, position_ids an input); ``--no-base-branch``: no ``If``, the slots always run;
    and GenAI still gives eager PEFT's tokens."""
    import warnings

    from flora_graph.cli import main

    out = tmp_path / "std"
    args = ["export", str(folders / "base"), "--task", "text-generation-with-past", "--format", "genai",
            "--no-ort-contrib", "--no-base-branch", "--out", str(out),
            *(a for n in ADAPTERS for a in ("--adapter", f"{n}={folders / n}"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    doc = json.loads((out / GENAI_CONFIG).read_text())
    assert doc["search"]["past_present_share_buffer"] is False and "position_ids" in doc["model"]["decoder"]["inputs"]
    for f in ("model.onnx", "mixed.onnx"):
        model = onnx.load(str(out / f), load_external_data=False)
        assert not [n.op_type for n in all_nodes(model.graph) if n.domain or n.op_type == "If"], f
    for adapter in (None, "all7"):
        assert _genai(out, adapter) == eager_tokens(folders, adapter)


def test_adapters_added_to_a_package_serve_without_a_new_export(folders: Path, package: Path, tmp_path: Path) -> None:
    """``--adapters-only`` writes adapter files into an existing package; GenAI and the Generator serve them as the
    package's own. Refused before anything is written: a module without a slot, a name the package has, a
    package without slots; nothing else in the package changes."""
    import shutil
    import warnings

    from flora_graph.cli import main
    from flora_graph.serving.genai import add_adapters
    from flora_graph.serving.generate import Generator

    pkg = tmp_path / "pkg"
    shutil.copytree(package, pkg)
    before = {p.name: p.read_bytes() for p in pkg.iterdir() if p.is_file()}
    args = ["export", str(folders / "base"), "--task", "text-generation-with-past", "--format", "genai",
            "--out", str(pkg), "--adapters-only", "--adapter", f"extra={folders / 'qdown'}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    assert (pkg / "adapters" / "extra.onnx_adapter").is_file() and (pkg / "adapters" / "extra.onnx_adapter.sha256").is_file()
    assert {p.name: p.read_bytes() for p in pkg.iterdir() if p.is_file()} == before
    assert read_adapter(pkg / "adapters" / "extra.onnx_adapter", require_checksum=True).params.keys() == \
        read_adapter(pkg / "adapters" / "qdown.onnx_adapter", require_checksum=True).params.keys()
    want = eager_tokens(folders, "qdown")
    gen = Generator(pkg)
    assert gen.generate([PROMPT], adapters="extra", max_new_tokens=NEW, stop_tokens=[])[0] == want
    model = og.Model(str(pkg))
    loaded = og.Adapters(model)
    loaded.load(str(pkg / "adapters" / "extra.onnx_adapter"), "extra")
    assert genai_tokens(model, PROMPT, NEW, loaded, "extra") == want
    with pytest.raises(AdapterError, match=r"already has adapter\(s\) \['extra'\]"):
        add_adapters(pkg, folders / "base", {"extra": folders / "all7"})
    add_adapters(pkg, folders / "base", {"extra": folders / "all7"}, replace=True)
    assert Generator(pkg).generate([PROMPT], adapters="extra", max_new_tokens=NEW, stop_tokens=[])[0] == \
        eager_tokens(folders, "all7")
    # a package whose slots are qdown's modules only: all7's other modules have none; nothing is written
    small = tmp_path / "small"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(folders / "base", small, {"qdown": folders / "qdown"})
        with pytest.raises(AdapterFileError, match="'wide'"):
            add_adapters(small, folders / "base", {"ok": folders / "qdown", "wide": folders / "all7"})
    assert sorted(p.name for p in (small / "adapters").iterdir()) == ["qdown.onnx_adapter", "qdown.onnx_adapter.sha256"]
    bare = tmp_path / "bare"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(folders / "base", bare)
    with pytest.raises(FloraGraphError, match="exported without adapters"):
        add_adapters(bare, folders / "base", {"x": folders / "qdown"})
    assert main([*args[:-3], "--replace", "--adapter", f"x={folders / 'qdown'}"]) == 2  # only with --adapters-only


def test_the_base_branch_is_left_out_of_a_package_whose_weights_it_would_double_too_much(
        folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the base branch goes only into packages whose base weights are at most BASE_BRANCH_MAX_BYTES
    (ONNX Runtime holds each branch's prepacked weights apart); above, model.onnx has no ``If`` and its adapters
    no flag, and the package gives the same tokens; ``base_branch=True`` adds it regardless."""
    import warnings

    from flora_graph.serving import genai
    from flora_graph.serving.generate import Generator

    monkeypatch.setattr(genai, "BASE_BRANCH_MAX_BYTES", 1024)  # the test model's weights are well past 1 KiB
    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(folders / "base", tmp_path / "auto", {n: folders / n for n in ADAPTERS}, progress=said.append)
        export_genai(folders / "base", tmp_path / "forced", {"all7": folders / "all7"}, base_branch=True)
    assert any(m.startswith("base branch off (") for m in said), said
    assert not has_adapter_flag(onnx.load(str(tmp_path / "auto" / "model.onnx"), load_external_data=False))
    assert has_adapter_flag(onnx.load(str(tmp_path / "forced" / "model.onnx"), load_external_data=False))
    assert ADAPTER_FLAG not in read_adapter(tmp_path / "auto" / "adapters" / "all7.onnx_adapter").params
    for adapter in (None, "all7"):
        want = eager_tokens(folders, adapter)
        assert _genai(tmp_path / "auto", adapter) == want
        assert Generator(tmp_path / "auto").generate([PROMPT], adapters=adapter, max_new_tokens=len(want),
                                                      stop_tokens=[])[0] == want


def test_a_package_without_the_mixed_model_serves_one_adapter_per_batch(folders: Path, tmp_path: Path) -> None:
    """``--no-mixed``: no mixed.onnx (the base weights once); GenAI and the Generator serve each adapter, and a
    batch mixing adapters is refused saying the package has no mixed model."""
    import warnings

    from flora_graph.cli import main
    from flora_graph.serving.errors import ServingError
    from flora_graph.serving.generate import Generator

    out = tmp_path / "pkg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(folders / "base"), "--task", "text-generation-with-past", "--format", "genai",
                     "--no-mixed", "--out", str(out), *(a for n in ADAPTERS for a in ("--adapter", f"{n}={folders / n}"))]) == 0
    assert not (out / "mixed.onnx").exists() and (out / "model.onnx").is_file()
    gen = Generator(out)
    for adapter in (None, "all7"):
        want = eager_tokens(folders, adapter)
        assert _genai(out, adapter) == want
        assert gen.generate([PROMPT], adapters=adapter, max_new_tokens=len(want), stop_tokens=[])[0] == want
    with pytest.raises(ServingError, match="has none"):
        gen.generate([PROMPT, PROMPT], adapters=["all7", None], max_new_tokens=2, stop_tokens=[])


def _external(path: Path) -> dict[str, tuple[str, int, int]]:
    """``{initializer: (data file, offset, length)}`` of the model at ``path``'s external weights."""
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            e = {x.key: x.value for x in t.external_data}
            out[t.name] = (e["location"], int(e["offset"]), int(e["length"]))
    return out


def test_the_mixed_model_reads_the_base_weights_where_the_model_stores_them(package: Path) -> None:
    """model.onnx and mixed.onnx keep their weights in one model.onnx.data, which stores the base weights once
    (the Generator's mixed batches read them there: tests/serving/test_generate.py)."""
    model, mixed = _external(package / "model.onnx"), _external(package / "mixed.onnx")
    assert model and mixed and {f for f, _, _ in [*model.values(), *mixed.values()]} == {"model.onnx.data"}
    ranges = {(o, n) for _, o, n in model.values()}
    model_bytes = sum(n for _, _, n in model.values())
    mixed_own = sum(n for _, o, n in mixed.values() if (o, n) not in ranges)
    mixed_bytes = sum(n for _, _, n in mixed.values())
    assert mixed_bytes > 0.9 * model_bytes and mixed_own < 0.1 * model_bytes  # its base weights are the model's
    size = (package / "model.onnx.data").stat().st_size
    assert model_bytes + mixed_own <= size < model_bytes + mixed_own + 64 * (len(model) + len(mixed))


@pytest.mark.parametrize("in_place", [False, True], ids=["swapped", "in-place"])
def test_a_package_written_over_another_drops_the_old_entries_it_does_not_write(
        folders: Path, package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool) -> None:
    """An old mixed.onnx, adapters folder or data file beside a package exported without them would serve the
    old weights: the new package drops them, whether its folder is swapped in whole or its files renamed in one
    by one (a mount point), and keeps a file of the user's."""
    import errno
    import shutil

    from flora_graph import storage
    from flora_graph.serving.generate import Generator

    out = tmp_path / "pkg"
    shutil.copytree(package, out)
    (out / "README.md").write_text("notes")
    if in_place:
        def refuse(a: Path, b: Path) -> None:
            raise OSError(errno.EXDEV, "another file system")

        monkeypatch.setattr(storage, "_exchange", refuse)
    export_genai(folders / "base", out, mixed=False)  # no adapters: one small model file, nothing else of the old
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "genai_config.json", "generation_config.json", "model.onnx",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert not _external(out / "model.onnx")
    assert Generator(out).adapter_names == []
    assert genai_tokens(og.Model(str(out)), PROMPT, NEW) == eager_tokens(folders, None)
