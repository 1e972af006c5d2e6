"""4-bit packages: base weights as MatMulNBits, adapters float on top; tokens equal eager PEFT on the same
4-bit weights (quantized here in torch, independently), in the Generator and in GenAI."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flora_graph.errors import FloraGraphError
from flora_graph.serving.genai import export_genai
from flora_graph.serving.generate import Generator
from flora_graph.serving.int4 import quantize_block

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai cannot be imported on this platform")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.serving.genai_package import eager_greedy, genai_tokens, tiny_with_adapter  # noqa: E402

PROMPT, NEW, BLOCK = [1, 5, 9, 33, 70], 10, 32


def fake_quant(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``w`` ``[out, in]`` through symmetric 4-bit round-to-nearest in blocks of ``block`` inputs (the last one
    zero-padded)."""
    out, k = w.shape
    padded = torch.nn.functional.pad(w, (0, -k % block))
    b = padded.reshape(out, -1, block)
    scale = b.abs().amax(-1, keepdim=True) / 7
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(b / scale), -8, 7) * scale).reshape(out, -1)[:, :k]


def test_blocks_run_in_onnxruntime_as_their_dequantized_weights() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 80)).astype(np.float32)  # [out, in]: 2.5 blocks
    w[3, :32] = 0  # an all-zero block
    x = rng.standard_normal((3, 80)).astype(np.float32)
    packed, scales = quantize_block(w, BLOCK)
    assert packed.shape == (24, 3, 16) and packed.dtype == np.uint8 and scales.shape == (72,)
    chunked = quantize_block(w.T.copy().T, BLOCK, rows=5)  # a strided view, 5 rows at a time: the same bytes
    np.testing.assert_array_equal(chunked[0], packed)
    np.testing.assert_array_equal(chunked[1], scales)
    deq = fake_quant(torch.from_numpy(w)).numpy()
    assert np.abs(deq - w).max() <= scales.max() / 2 + 1e-6 and not deq[3, :32].any()
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=80, N=24, bits=4,
                            block_size=BLOCK, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 80])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq.T, atol=1e-4)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama, a PEFT adapter (nonzero ``B``) and its fp32 and int4 packages."""
    root = tmp_path_factory.mktemp("int4")
    model, adapted = tiny_with_adapter("LlamaForCausalLM", root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(root / "base", root / "fp32", {"ad": root / "ad"})
        export_genai(root / "base", root / "int4", {"ad": root / "ad"}, precision="int4", int4_accuracy_level=0)
        export_genai(root / "base", root / "int8act", {"ad": root / "ad"}, precision="int4")  # the default level, 4
    return root, model, adapted


def _eager(m, prompt: list[int] = PROMPT) -> list[int]:
    return eager_greedy(m, prompt, NEW, eos_token_id=None)


def _quantized(model, adapted):
    """Copies of ``model`` and ``adapted`` whose base ``Linear`` and ``Embedding`` layers have 4-bit weights (an
    output layer tied to the embedding gets the same 4-bit values, both quantized over the hidden axis)."""
    q_model, q_adapted = copy.deepcopy(model), copy.deepcopy(adapted)
    with torch.no_grad():
        for m in (q_model, q_adapted.base_model.model):
            for name, mod in m.named_modules():
                if isinstance(mod, torch.nn.Linear | torch.nn.Embedding) and "lora_" not in name:
                    mod.weight = torch.nn.Parameter(fake_quant(mod.weight.detach().clone()))
    return q_model, q_adapted


def test_int4_package_gives_eager_tokens_of_the_4_bit_weights(packages) -> None:
    """Accuracy level 0: float activations, so the package is the float model of its 4-bit weights."""
    root, model, adapted = packages
    q_model, q_adapted = _quantized(model, adapted)
    want, want_ad = _eager(q_model), _eager(q_adapted)
    assert want != _eager(model) and want_ad != want  # the 4 bits and the adapter both show in the tokens
    gen = Generator(root / "int4")
    assert gen.generate([PROMPT], max_new_tokens=NEW, stop_tokens=[])[0] == want
    assert gen.generate([PROMPT], adapters="ad", max_new_tokens=NEW, stop_tokens=[])[0] == want_ad
    assert gen.generate([PROMPT, PROMPT], adapters=["ad", None], max_new_tokens=NEW, stop_tokens=[]) == [want_ad, want]
    gen_model = og.Model(str(root / "int4"))
    loaded = og.Adapters(gen_model)
    loaded.load(str(root / "int4" / "adapters" / "ad.onnx_adapter"), "ad")
    assert genai_tokens(gen_model, PROMPT, NEW, loaded, "ad") == want_ad
    assert genai_tokens(gen_model, PROMPT, NEW, loaded, None) == want


def test_int4_models_hold_4_bit_base_weights_and_float_adapter_slots(packages) -> None:
    root = packages[0]
    for name in ("model.onnx", "mixed.onnx"):
        fp32, int4 = (onnx.load(str(root / p / name)) for p in ("fp32", "int4"))

        def ops(m):
            out = [n.op_type for n in m.graph.node]
            for n in m.graph.node:
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        out += [x.op_type for x in a.g.node]
            return out

        assert ops(int4).count("MatMulNBits") > 0 and ops(int4).count("GatherBlockQuantized") >= 1  # the embedding
        # the adapter slots' MatMuls (their weights graph inputs) stay float
        assert [i.name for i in int4.graph.input] == [i.name for i in fp32.graph.input]
        assert weight_bytes(root / "int4" / name) < 0.5 * weight_bytes(root / "fp32" / name), name


def weight_bytes(path: Path) -> int:
    """The bytes of the model at ``path``: its file and the external data its initializers read."""
    m = onnx.load(str(path), load_external_data=False)
    external = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in m.graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL)
    return path.stat().st_size + external


def test_bad_precision_or_block_size_is_refused_before_anything_loads(tmp_path: Path, capsys) -> None:
    with pytest.raises(FloraGraphError, match="precision 'int8'"):
        export_genai(tmp_path / "nowhere", tmp_path / "out", precision="int8")
    with pytest.raises(FloraGraphError, match="block size 48"):
        export_genai(tmp_path / "nowhere", tmp_path / "out", precision="int4", int4_block_size=48)
    from flora_graph.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path), "--format", "genai", "--precision", "int8"])
    assert exit_.value.code == 2
    for args, why in ((["--precision", "int4"], "goes with --format genai"),
                      (["--format", "genai", "--int4-block-size", "64"], "go with --precision int4"),
                      (["--format", "genai", "--task", "text-generation-with-past", "--precision", "int4",
                        "--adapters-only", "--adapter", f"a={tmp_path}"], "leaves the package's models")):
        assert main(["export", str(tmp_path), *args, "--out", str(tmp_path / "out")]) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_int8_activations_are_the_default_and_both_runtimes_agree(packages) -> None:
    """The default accuracy level 4 (int8 activations, the model builder's on CPU): the Generator and GenAI
    run the same model, so they give the same tokens, base and adapter."""
    root = packages[0]
    levels = {a.i for n in _all_nodes(onnx.load(str(root / "int8act" / "model.onnx")).graph) if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    gen = Generator(root / "int8act")
    gen_model = og.Model(str(root / "int8act"))
    loaded = og.Adapters(gen_model)
    loaded.load(str(root / "int8act" / "adapters" / "ad.onnx_adapter"), "ad")
    for adapter in (None, "ad"):
        assert gen.generate([PROMPT], adapters=adapter, max_new_tokens=NEW, stop_tokens=[])[0] == \
            genai_tokens(gen_model, PROMPT, NEW, loaded, adapter)


def _all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def test_int4_gemm_layers_and_a_tied_embedding(tmp_path: Path) -> None:
    """OPT: its MLP layers run on flattened rows, lowered as ``Gemm`` (the bias an ``Add`` after the 4-bit product),
    and its output layer is tied to the embedding: both read one 4-bit copy of the table; base and adapter rows
    equal eager's."""
    model, adapted = tiny_with_adapter("OPTForCausalLM", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"}, precision="int4",
                     int4_accuracy_level=0)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    graph = onnx.load(str(tmp_path / "pkg" / "model.onnx")).graph
    table = next(n for n in _all_nodes(graph) if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in _all_nodes(graph) if n.output[0] == table.input[0])
    head = [n for n in _all_nodes(graph) if n.op_type == "MatMulNBits" and n.input[1] == reshape.input[0]]
    assert head and {i.name for i in graph.initializer} >= {reshape.input[0]}  # the output layer reads the same bytes
    q_model, q_adapted = _quantized(model, adapted)
    want, want_ad = _eager(q_model), _eager(q_adapted)
    with torch.no_grad():  # the 4 bits move the logits (the tokens may not move)
        ids = torch.tensor([PROMPT])
        assert (q_model(ids).logits - model(ids).logits).abs().max() > 1e-3
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT, PROMPT], adapters=["ad", None], max_new_tokens=NEW, stop_tokens=[]) == [want_ad, want]


def test_int4_from_the_command_line_and_an_adapter_added_later(packages, tmp_path: Path) -> None:
    """``flora-graph export ... --precision int4 --int4-block-size 16`` writes 16-row blocks; ``--adapters-only``
    adds an adapter to the int4 package (its slots are the same float inputs), which then serves it."""
    import shutil

    from flora_graph.cli import main

    root = packages[0]
    out = tmp_path / "pkg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(root / "base"), "--task", "text-generation-with-past", "--format", "genai",
                     "--precision", "int4", "--int4-block-size", "16", "--int4-accuracy-level", "0", "--out", str(out)]) == 0
        sizes = {a.i for n in _all_nodes(onnx.load(str(out / "model.onnx")).graph) if n.op_type == "MatMulNBits"
                 for a in n.attribute if a.name == "block_size"}
        assert sizes == {16}
        shutil.rmtree(out)
        assert main(["export", str(root / "base"), "--task", "text-generation-with-past", "--format", "genai",
                     "--precision", "int4", "--int4-accuracy-level", "0", "--adapter", f"ad={root / 'ad'}",
                     "--out", str(out)]) == 0
        assert main(["export", str(root / "base"), "--task", "text-generation-with-past", "--format", "genai",
                     "--adapter", f"later={root / 'ad'}", "--adapters-only", "--out", str(out)]) == 0
    gen = Generator(out)
    assert gen.generate([PROMPT], adapters="later", max_new_tokens=NEW, stop_tokens=[]) == \
        gen.generate([PROMPT], adapters="ad", max_new_tokens=NEW, stop_tokens=[])


def _quantized_experts(model, transposed: bool):
    """A copy of ``model`` whose 2-D base weights (the embedding among them, LoRA's excepted) and 3-D expert weights are
    4-bit, each expert quantized over its inputs (``[experts, out, in]``, or ``[experts, in, out]`` where
    ``transposed``)."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if "lora_" in name:
                continue
            if p.ndim == 2 and name.endswith("weight"):
                p.copy_(fake_quant(p.detach().clone()))
            elif p.ndim == 3:
                w = p.detach().clone()
                p.copy_(torch.stack([fake_quant(e.T).T if transposed else fake_quant(e) for e in w]))
    return q


@pytest.mark.parametrize(("arch", "transposed"), [("Qwen2MoeForCausalLM", False), ("GptOssForCausalLM", True),
                                                  ("MixtralForCausalLM", False)])
def test_int4_mixture_of_experts_runs_as_qmoe_with_4_bit_experts(arch: str, transposed: bool, tmp_path: Path) -> None:
    """A mixture of experts in a 4-bit package is one QMoE per layer whose experts are 4-bit (Qwen2-MoE: gate/up in
    halves, a shared expert, softmax over every expert; gpt-oss: interleaved, biased, clamped SwiGLU, softmax over
    the top k; Mixtral: the top k's probabilities over their sum); at accuracy level 0 the package gives eager's
    tokens on the same 4-bit weights, base and adapter."""
    model, adapted = tiny_with_adapter(arch, tmp_path, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_genai(tmp_path / "base", tmp_path / "pkg", {"ad": tmp_path / "ad"}, precision="int4",
                     int4_accuracy_level=0)
    for name, copies in (("model.onnx", 2), ("mixed.onnx", 1)):  # model.onnx: the layers in both branches of its If
        ops = [n.op_type for n in _all_nodes(onnx.load(str(tmp_path / "pkg" / name)).graph)]
        assert ops.count("QMoE") == copies * model.config.num_hidden_layers, name
        assert "Loop" not in ops and "MoE" not in ops, name
    q_model, q_adapted = _quantized_experts(model, transposed), _quantized_experts(adapted, transposed)
    want, want_ad = _eager(q_model), _eager(q_adapted)
    with torch.no_grad():  # the 4 bits move the logits (the tokens may not move), the adapter the tokens
        ids = torch.tensor([PROMPT])
        assert (q_model(ids).logits - model(ids).logits).abs().max() > 1e-3
    assert want_ad != want
    gen = Generator(tmp_path / "pkg")
    assert gen.generate([PROMPT, PROMPT], adapters=["ad", None], max_new_tokens=NEW, stop_tokens=[]) == [want_ad, want]
    assert gen.generate([PROMPT], adapters="ad", max_new_tokens=NEW, stop_tokens=[])[0] == want_ad
    gen_model = og.Model(str(tmp_path / "pkg"))
    loaded = og.Adapters(gen_model)
    loaded.load(str(tmp_path / "pkg" / "adapters" / "ad.onnx_adapter"), "ad")
    assert genai_tokens(gen_model, PROMPT, NEW, loaded, "ad") == want_ad
    assert genai_tokens(gen_model, PROMPT, NEW, loaded, None) == want
