"""GPTQ, AWQ and compressed-tensors 4-bit checkpoints as a package's base. The checkpoints are written here from
codes, scales and zero points drawn at random (:mod:`tests.serving.int4_checkpoints`); the references are the float
model of those weights in eager transformers (+ PEFT) and ONNX Runtime's ``MatMulNBits`` on the blocks; independent
readers check the test's own layouts: the ONNX Runtime GenAI model builder (GPTQ, AWQ: its model decodes as that
float model) and transformers with compressed-tensors (its dequantized weights are those weights in bfloat16)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flora_graph.model_export import ModelFolderError, check_model_folder, load_transformers
from flora_graph.quantized_checkpoints import Int4CheckpointError, Int4Grid, read_checkpoint
from flora_graph.serving.genai import export_genai
from flora_graph.serving.generate import Generator
from flora_graph.serving.int4 import grid_blocks

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")
peft = pytest.importorskip("peft")

from tests.serving.genai_package import all_nodes, eager_greedy, genai_tokens  # noqa: E402
from tests.serving.int4_checkpoints import write_checkpoint, write_fp8_checkpoint  # noqa: E402
from tests.serving.test_int4 import fake_quant  # noqa: E402

PROMPT, NEW = [1, 5, 9, 33, 70, 12], 10
KINDS = {"gptq": ("gptq", {}), "gptq_v2-act-order": ("gptq", {"v2": True, "act_order": True}), "awq": ("awq", {}),
         "ct-group": ("compressed-tensors", {}), "ct-symmetric-channel": ("compressed-tensors", {"symmetric": True, "group": -1}),
         "ct-act-order": ("compressed-tensors", {"act_order": True})}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_checkpoint_loads_as_the_float_model_of_its_weights(tmp_path: Path, kind: str) -> None:
    """Every weight of the loaded model equals the reference's bit for bit (each quantized layer's ``s * (q - z)``
    over its groups, the rest the checkpoint's float16 tensors), so do the logits."""
    method, kw = KINDS[kind]
    want = write_checkpoint(tmp_path / "ckpt", method, **kw)
    got = load_transformers(tmp_path / "ckpt")
    ref = want.state_dict()
    assert set(got.state_dict()) == set(ref)
    for name, value in got.state_dict().items():
        assert torch.equal(value, ref[name]), name
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)


@pytest.mark.parametrize("kind", ["ct-group", "ct-symmetric-channel"])
def test_transformers_reads_the_compressed_tensors_checkpoints_as_their_weights(tmp_path: Path, kind: str) -> None:
    """An independent reader: transformers with compressed-tensors dequantizes each layer (in the scales' bfloat16)
    to the float weight flora_graph reads, rounded to bfloat16, bit for bit."""
    import transformers

    _, kw = KINDS[kind]
    write_checkpoint(tmp_path / "ckpt", "compressed-tensors", intermediate=96, **kw)  # it reads whole groups only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "ckpt", quantization_config=transformers.CompressedTensorsConfig(run_compressed=False),
            dtype=torch.float32).state_dict()
    ours = load_transformers(tmp_path / "ckpt").state_dict()
    layers = [n for n in ours if n.endswith("proj.weight")]
    assert len(layers) == 14
    for name in layers:
        assert torch.equal(ours[name].to(torch.bfloat16), theirs[name].to(torch.bfloat16)), name
        assert not torch.equal(ours[name], ours[name].to(torch.bfloat16).float()), name  # ours: the exact products


def _ort_matmul(blocks: tuple, k: int, n: int) -> ort.InferenceSession:
    """One ``MatMulNBits`` over ``grid_blocks``' output (a ``Gather`` of the input's columns first where it gives an
    order), in ONNX Runtime."""
    packed, scales, zeros, block, order = blocks
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"),
             numpy_helper.from_array(zeros, "Z")]
    nodes, x = [], "A"
    if order is not None:
        inits.append(numpy_helper.from_array(order.astype(np.int64), "order"))
        nodes.append(helper.make_node("Gather", ["A", "order"], ["Ao"], axis=-1))
        x = "Ao"
    nodes.append(helper.make_node("MatMulNBits", [x, "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                                  block_size=block, accuracy_level=0))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("k", "group", "act_order", "block"), [
    (96, 32, False, 32),   # groups of 32: blocks of 32
    (80, 32, False, 32),   # a short last group (16 rows): blocks of 32, the last one padded
    (64, 128, False, 64),  # one group over rows fewer than the group size
    (80, -1, False, 16),   # one group over all rows: its scale repeated over blocks of 16
    (96, 32, True, 32),    # activation order: rows sorted by group, the input's columns gathered in that order
])
def test_checkpoint_blocks_run_in_onnxruntime_as_their_weights(k: int, group: int, act_order: bool, block: int) -> None:
    """``MatMulNBits`` over a layer's blocks (its own codes, scales and zero points) computes ``x @ W.T`` for the
    layer's float weight, at float precision (accuracy level 0)."""
    rng = np.random.default_rng(k + group)
    n, size = 24, k if group == -1 else group
    n_groups = -(-k // size)
    groups = np.arange(k) // size
    if act_order:
        groups = groups[rng.permutation(k)]
    grid = Int4Grid(rng.integers(0, 16, (n, k)).astype(np.uint8), rng.uniform(0.02, 0.06, (n, n_groups)).astype(np.float32),
                    rng.integers(0, 16, (n, n_groups)).astype(np.uint8), groups, size)
    blocks = grid_blocks(grid)
    assert blocks is not None and blocks[3] == block and (blocks[4] is not None) == act_order
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = _ort_matmul(blocks, k, n).run(None, {"A": x})[0]
    np.testing.assert_allclose(got, x @ grid.weight().T, rtol=1e-5, atol=1e-5)


def _adapted(model, folder: Path):
    """Eager PEFT (seeded, nonzero ``B``) on a copy of ``model``, saved as ``folder``: the adapted model."""
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    adapted.save_pretrained(folder)
    return adapted.eval()


def _with_4_bit_table_and_head(model) -> None:
    """``model``'s embedding table and output layer (which the checkpoints hold in float) as a 4-bit package holds
    them: symmetric blocks of 32, quantized by the package."""
    with torch.no_grad():
        for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
            mod.weight.copy_(fake_quant(mod.weight))


# each format, activation order and symmetric codes in the default run; the other combinations with the slow tests
PACKAGED = ["gptq", "gptq_v2-act-order", "ct-symmetric-channel", pytest.param("awq", marks=pytest.mark.slow),
            pytest.param("ct-group", marks=pytest.mark.slow), pytest.param("ct-act-order", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", PACKAGED)
def test_a_4_bit_package_keeps_the_checkpoint_blocks_and_decodes_as_its_float_model(tmp_path: Path, kind: str) -> None:
    """``--precision int4`` at accuracy level 0: the quantized layers' ``MatMulNBits`` hold the checkpoint's own
    blocks, so the package decodes as eager transformers (+ PEFT for an adapter trained on the checkpoint) on the
    checkpoint's float weights, its float embedding table and output layer quantized as the package quantizes them;
    the export says how many nodes kept the checkpoint's blocks."""
    method, kw = KINDS[kind]
    model = write_checkpoint(tmp_path / "ckpt", method, **kw)
    adapted = _adapted(model, tmp_path / "lora")
    report = export_genai(tmp_path / "ckpt", tmp_path / "pkg", {"lora": tmp_path / "lora"}, precision="int4",
                          int4_accuracy_level=0)
    assert any("read as the float32 model of its 4-bit layers" in n for n in report.notes), report.notes
    # q/k/v, o, gate/up and down of each of the 2 layers from the checkpoint; the table and the head quantized here
    # (model.onnx has each twice: the branch with the adapter slots and the base branch without them)
    for kept in ("model.onnx: 16 of its 20", "mixed.onnx: 8 of its 10"):
        assert any(f"{kept} 4-bit nodes keep the checkpoint's own" in n for n in report.notes), report.notes
    _with_4_bit_table_and_head(model)
    _with_4_bit_table_and_head(adapted.get_base_model())
    want, want_ad = (eager_greedy(m, PROMPT, NEW, min_new_tokens=NEW) for m in (model, adapted))
    assert want != want_ad
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT], max_new_tokens=NEW, min_new_tokens=NEW)[0] == want
    assert gen.generate([PROMPT, PROMPT], adapters=["lora", None], max_new_tokens=NEW, min_new_tokens=NEW) == \
        [want_ad, want]
    genai = og.Model(str(tmp_path / "pkg"))
    loaded = og.Adapters(genai)
    loaded.load(str(tmp_path / "pkg" / "adapters" / "lora.onnx_adapter"), "lora")
    assert genai_tokens(genai, PROMPT, NEW, loaded, "lora") == want_ad
    graph = onnx.load(str(tmp_path / "pkg" / "model.onnx"), load_external_data=False).graph
    ordered = [n for n in all_nodes(graph) if n.op_type == "Gather" and n.name.endswith("/order")]
    assert bool(ordered) == bool(kw.get("act_order"))


def test_a_checkpoint_from_the_command_line(tmp_path: Path, capsys) -> None:
    """``flora-graph export CKPT --task text-generation-with-past --format genai --precision int4`` says the checkpoint
    kept its blocks and decodes as its float model; ``flora-graph export CKPT`` (one ONNX file) gives its logits."""
    from flora_graph.cli import main

    model = write_checkpoint(tmp_path / "ckpt", "gptq", act_order=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(tmp_path / "ckpt"), "--task", "text-generation-with-past", "--format", "genai",
                     "--precision", "int4", "--int4-accuracy-level", "0", "--out", str(tmp_path / "pkg")]) == 0
        said = capsys.readouterr().out
        assert "a GPTQ 4-bit checkpoint" in said and "model.onnx: 8 of its 10 4-bit nodes keep" in said, said
        assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "model.onnx")]) == 0
    float_model = copy.deepcopy(model)
    _with_4_bit_table_and_head(model)
    assert Generator(tmp_path / "pkg").generate([PROMPT], max_new_tokens=NEW, min_new_tokens=NEW)[0] == \
        eager_greedy(model, PROMPT, NEW, min_new_tokens=NEW)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([PROMPT, PROMPT[::-1]], np.int64)
    feeds = {i.name: ids if i.name == "input_ids" else np.ones_like(ids) for i in session.get_inputs()}
    with torch.no_grad():
        want = float_model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(session.run(["logits"], feeds)[0], want, rtol=1e-4, atol=1e-4)


def test_a_float_package_of_a_checkpoint_decodes_as_its_float_model(tmp_path: Path) -> None:
    """Without ``--precision int4`` the package holds the checkpoint's float weights: tokens equal eager
    transformers on them, the adapter's eager PEFT's, and the export says how to keep the 4-bit blocks."""
    model = write_checkpoint(tmp_path / "ckpt", "awq")
    adapted = _adapted(model, tmp_path / "lora")
    report = export_genai(tmp_path / "ckpt", tmp_path / "pkg", {"lora": tmp_path / "lora"})
    assert any("an AWQ 4-bit checkpoint" in n and "--precision int4 keeps" in n for n in report.notes), report.notes
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT], max_new_tokens=NEW, min_new_tokens=NEW)[0] == \
        eager_greedy(model, PROMPT, NEW, min_new_tokens=NEW)
    assert gen.generate([PROMPT], adapters="lora", max_new_tokens=NEW, min_new_tokens=NEW)[0] == \
        eager_greedy(adapted, PROMPT, NEW, min_new_tokens=NEW)


def test_an_fp8_checkpoint_loads_as_its_float_weights_and_packages_with_an_adapter(tmp_path: Path) -> None:
    """An FP8 checkpoint with block-wise scales: every weight equals the test's ``w * scale``
    bit for bit; its package (fp32) decodes as eager transformers and, with an adapter trained on it, as eager PEFT;
    the export says it was dequantized."""
    model = write_fp8_checkpoint(tmp_path / "ckpt")
    got = load_transformers(tmp_path / "ckpt").state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(got[name], value), name
    adapted = _adapted(model, tmp_path / "lora")
    report = export_genai(tmp_path / "ckpt", tmp_path / "pkg", {"lora": tmp_path / "lora"})
    assert any("an FP8 checkpoint (scales per 32x32 block), dequantized to float32" in n for n in report.notes)
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT, PROMPT], adapters=[None, "lora"], max_new_tokens=NEW, min_new_tokens=NEW) == \
        [eager_greedy(m, PROMPT, NEW, min_new_tokens=NEW) for m in (model, adapted)]


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_the_model_builder_reads_the_test_checkpoints_as_their_float_weights(tmp_path: Path, method: str) -> None:
    """An independent reader of the layouts written here: the ONNX Runtime GenAI model builder's model of the
    checkpoint (float activations, its output layer left float) decodes as the float model of the test's weights.
    (Its model of an activation-order checkpoint does not, which is why that case is checked against eager alone.)"""
    model = write_checkpoint(tmp_path / "ckpt", method, intermediate=96)  # the builder takes whole groups only
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "ckpt"), "-o",
                    str(tmp_path / "built"), "-p", "int4", "-e", "cpu", "--extra_options", "accuracy_level=1",
                    "nodes_to_exclude=/lm_head/MatMul"], check=True, capture_output=True, cwd=tmp_path)
    assert genai_tokens(og.Model(str(tmp_path / "built")), PROMPT, NEW) == eager_greedy(model, PROMPT, NEW,
                                                                                        min_new_tokens=NEW)


def _config(folder: Path, **quant) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(quant)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(("method", "setting", "match"), [
    ("gptq", {"bits": 8}, r"an? 8-bit gptq checkpoint \(quantization_config.bits\)"),
    ("gptq", {"checkpoint_format": "marlin"}, r"GPTQ checkpoint of format 'marlin'"),
    ("gptq", {"dynamic": {r"+:.*down_proj": {"bits": 8}}}, r"per-layer settings \(quantization_config.dynamic"),
    ("gptq", {"group_size": 0}, r"group_size 0"),
    ("awq", {"version": "gemv"}, r"AWQ checkpoint of version 'gemv'"),
    ("awq", {"zero_point": False}, r"without zero points"),
])
def test_a_setting_it_does_not_read_is_refused_by_name_before_loading(tmp_path: Path, method: str, setting: dict,
                                                                     match: str) -> None:
    write_checkpoint(tmp_path / "ckpt", method)
    _config(tmp_path / "ckpt", **setting)
    with pytest.raises(Int4CheckpointError, match=match):
        check_model_folder(tmp_path / "ckpt")
    with pytest.raises(ModelFolderError, match=match):  # the loader's error type, through the package export
        export_genai(tmp_path / "ckpt", tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def _weights(**change):
    """A change of a compressed-tensors config's one weight scheme."""
    return lambda q: q["config_groups"]["group_0"]["weights"].update(change)


@pytest.mark.parametrize(("change", "match"), [
    (lambda q: q.update(format="int-quantized"), r"compressed-tensors checkpoint of format 'int-quantized'"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
     r"config_groups.group_0 quantizes the activations too .*W4A16"),
    (_weights(num_bits=8), r"config_groups.group_0.weights: 8-bit int weights"),
    (_weights(strategy="tensor"), r"config_groups.group_0.weights.strategy 'tensor'"),
    (lambda q: q["config_groups"].update(group_1={"targets": ["re:.*down_proj"], "weights": {
        **q["config_groups"]["group_0"]["weights"], "group_size": 16}}), r"config_groups of 2 different schemes"),
    (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}), r"sparse weights"),
])
def test_a_compressed_tensors_scheme_it_does_not_read_is_refused_by_name(tmp_path: Path, change, match: str) -> None:
    write_checkpoint(tmp_path / "ckpt", "compressed-tensors")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    change(cfg["quantization_config"])
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Int4CheckpointError, match=match):
        check_model_folder(tmp_path / "ckpt")


def test_a_layer_missing_a_part_or_of_the_wrong_shape_is_refused_naming_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    write_checkpoint(tmp_path / "ckpt", "gptq")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(path))
    with pytest.raises(Int4CheckpointError, match=r"'model.layers.1.mlp.up_proj' has no model.layers.1.mlp.up_proj.qzeros"):
        read_checkpoint(tmp_path / "ckpt")
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.up_proj.qzeros"] = torch.zeros(5, 10, dtype=torch.int32)
    save_file(tensors, str(path))
    with pytest.raises(Int4CheckpointError, match=r"'model.layers.1.mlp.up_proj': qweight \(8, 80\), scales \(2, 80\), qzeros \(5, 10\) do not fit"):
        load_transformers(tmp_path / "ckpt")
