"""fuse-rms-norm: a hand-written RMSNorm becomes one ``RMSNorm`` node (which ORT runs fused).

Hand-built graphs cover the written forms (``Pow``/``Mul(x, x)``, ``Rsqrt``/``Sqrt`` +
``Reciprocal``/``Div``, operand orders, no-op casts, the scale) and the refusals; the built-in
decoder and a small random Hugging Face Llama cover what capture really produces.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

from flora_graph.frontend import capture
from flora_graph.ir import Graph, Op, verify
from flora_graph.models import build_decoder
from flora_graph.passes import PASSES, PRESETS, optimize, optimize_with_report
from flora_graph.passes.fuse_rms_norm import fuse_rms_norm
from flora_graph.runtimes.onnx_writer import save_onnx
from flora_graph.runtimes.reference import run
from tests.passes.helpers import assert_same_numbers, inputs_for

HIDDEN = 16
DYN = {"input_ids": {0: "batch", 1: "seq"}}


def rms_graph(*, square: str = "pow", inv: str = "rsqrt", scale: str = "left", x_first: bool = True,
              casts: bool = False, axes: tuple[int, ...] = (2,), keepdims: int = 1, eps_shape: tuple = (),
              exponent: float = 2.0, root_exponent: float = -0.5, share: str = "", scale_shape: tuple = (HIDDEN,), dtype: str = "float32") -> Graph:
    """``Linear(x) -> hand-written RMSNorm -> Linear``; options pick the written form or break it."""
    rng = np.random.default_rng(0)
    g = Graph("rms")
    inp = g.input("inp", ("batch", "seq", HIDDEN), dtype)
    x = g.add(Op.LINEAR, [inp, g.const("W0", rng.standard_normal((HIDDEN, HIDDEN)).astype(dtype))], name="x")

    def cast(n, name):
        return g.add(Op.CAST, [n], {"to": n.dtype}, name=name) if casts else n

    if square == "pow":
        sq = g.add(Op.POW, [x, g.const("two", np.asarray(exponent, dtype=dtype))], name="sq")
    else:
        sq = g.add(Op.MUL, [x, x], name="sq")
    mean = g.add(Op.REDUCE_MEAN, [cast(sq, "cast_sq")], {"axes": axes, "keepdims": keepdims}, name="mean")
    eps = g.const("eps", np.full(eps_shape, 1e-6, dtype=dtype))
    var = g.add(Op.ADD, [cast(mean, "cast_mean"), eps], name="var")
    if inv == "rsqrt":
        r = g.add(Op.RSQRT, [var], name="inv")
        norm = g.add(Op.MUL, [x, r] if x_first else [r, x], name="norm")
    elif inv == "reciprocal":
        r = g.add(Op.RECIPROCAL, [g.add(Op.SQRT, [var], name="sqrt")], name="inv")
        norm = g.add(Op.MUL, [x, cast(r, "cast_inv")] if x_first else [cast(r, "cast_inv"), x], name="norm")
    elif inv == "pow_half":  # Gemma 4's: var ** -0.5
        r = g.add(Op.POW, [var, g.const("minus_half", np.asarray(root_exponent, dtype=dtype))], name="inv")
        norm = g.add(Op.MUL, [x, r] if x_first else [r, x], name="norm")
    elif inv == "one_div":
        r = g.add(Op.DIV, [g.const("one", np.asarray(1.0, dtype=dtype)), g.add(Op.SQRT, [var], name="sqrt")], name="inv")
        norm = g.add(Op.MUL, [x, r] if x_first else [r, x], name="norm")
    else:  # div
        norm = g.add(Op.DIV, [x, g.add(Op.SQRT, [var], name="sqrt")], name="norm")
    out = norm
    if scale:
        w = g.const("w", (1 + 0.1 * rng.standard_normal(scale_shape)).astype(dtype))
        c = cast(norm, "cast_norm")
        out = g.add(Op.MUL, [w, c] if scale == "left" else [c, w], name="scaled")
    y = g.add(Op.LINEAR, [out, g.const("W1", rng.standard_normal((4, HIDDEN)).astype(dtype))], name="y")
    g.set_output("y", y)
    if share:
        g.set_output("shared", g.nodes[[n.name for n in g.nodes].index(share)])
    return verify(g)


def ops(g: Graph) -> collections.Counter:
    return collections.Counter(n.op for n in g.nodes)


FORMS = [dict(square=s, inv=i) for s in ("pow", "mul") for i in ("rsqrt", "reciprocal", "one_div", "div", "pow_half")]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f['square']}-{f['inv']}")
@pytest.mark.parametrize("scale", ["left", "right", ""])
@pytest.mark.parametrize("x_first", [True, False])
def test_every_written_form_becomes_one_rms_norm(form: dict, scale: str, x_first: bool) -> None:
    g = rms_graph(**form, scale=scale, x_first=x_first)
    res = fuse_rms_norm(g.copy())
    after = verify(res.graph)
    c = ops(after)
    assert c[Op.RMS_NORM] == 1 and c[Op.LINEAR] == 2, c
    assert not {Op.POW, Op.REDUCE_MEAN, Op.RSQRT, Op.SQRT, Op.RECIPROCAL, Op.DIV} & set(c)
    assert c[Op.MUL] == 0
    rms = next(n for n in after.nodes if n.op is Op.RMS_NORM)
    assert rms.attrs["axis"] == 2 and rms.attrs["epsilon"] == 1e-6
    assert [i.name for i in rms.inputs] == (["x", "w"] if scale else ["x"])
    assert res.stats["fired"] == ({"fuse-rms-norm": 1, "fuse-rms-norm-scale": 1} if scale else {"fuse-rms-norm": 1})
    assert res.stats["refused"] == {}
    assert_same_numbers(g, after)


def test_noop_casts_between_the_pieces_are_looked_through() -> None:
    for inv in ("rsqrt", "reciprocal"):
        g = rms_graph(inv=inv, casts=True)
        after = fuse_rms_norm(g.copy()).graph
        assert ops(after)[Op.RMS_NORM] == 1 and Op.CAST not in ops(after)
        assert_same_numbers(g, after)


def test_several_trailing_axes_and_a_scalar_shaped_eps() -> None:
    g = rms_graph(axes=(-2, -1), eps_shape=(1, 1, 1), scale="")
    after = fuse_rms_norm(g.copy()).graph
    rms = [n for n in after.nodes if n.op is Op.RMS_NORM]
    assert len(rms) == 1 and rms[0].attrs["axis"] == 1
    assert_same_numbers(g, after)


@pytest.mark.parametrize(("kw", "root", "why"), [
    (dict(share="mean"), "norm", "intermediate 'mean' (mean) is also read by ['<output>']"),
    (dict(share="inv"), "norm", "intermediate 'inv' (inv) is also read by ['<output>']"),
    (dict(axes=(1,)), "norm", "axes (1,) are not the trailing axes of rank 3"),
    (dict(eps_shape=(HIDDEN,)), "norm", "is not a scalar weight"),
    (dict(exponent=3.0), "norm", "exponent 'two' is not the scalar 2"),
    (dict(inv="pow_half", root_exponent=-0.25), "norm", "exponent 'minus_half' is not the scalar -0.5"),
])
def test_refusals_name_their_reason(kw: dict, root: str, why: str) -> None:
    g = rms_graph(scale="", **kw)
    res = fuse_rms_norm(g.copy())
    assert not res.changed and Op.RMS_NORM not in ops(res.graph)
    assert why in res.stats["refused"][root], res.stats["refused"]
    assert_same_numbers(g, res.graph)


def test_eps_that_is_not_a_weight_is_refused() -> None:
    g = rms_graph(scale="")
    eps_in = g.input("eps_in", (), "float32")
    var = next(n for n in g.nodes if n.name == "var")
    var.inputs = [var.inputs[0], eps_in]
    g.nodes.remove(eps_in)
    g.nodes.insert(0, eps_in)
    g.remove_dead()
    verify(g)
    res = fuse_rms_norm(g)
    assert not res.changed and "eps 'eps_in'" in res.stats["refused"]["norm"]


def test_scale_of_another_shape_stays_a_mul() -> None:
    g = rms_graph(scale="left", scale_shape=(1, 1, HIDDEN))
    res = fuse_rms_norm(g.copy())
    c = ops(res.graph)
    assert c[Op.RMS_NORM] == 1 and c[Op.MUL] == 1
    assert res.stats["fired"] == {"fuse-rms-norm": 1}
    assert "is not the normalised shape" in res.stats["refused"]["scaled"]
    assert_same_numbers(g, res.graph)


def test_scale_not_absorbed_when_the_norm_is_read_elsewhere() -> None:
    g = rms_graph(scale="left", share="norm")
    res = fuse_rms_norm(g.copy())
    c = ops(res.graph)
    assert c[Op.RMS_NORM] == 1 and c[Op.MUL] == 1
    assert "is also read by ['<output>']" in res.stats["refused"]["scaled"]
    assert_same_numbers(g, res.graph)


def test_registered_in_every_optimizing_preset() -> None:
    assert "fuse-rms-norm" in PASSES
    assert PRESETS["unfused"] == ()  # the graph as exported
    for preset in ("fused", "merged"):
        assert "fuse-rms-norm" in PRESETS[preset]
        g = rms_graph()
        out, report = optimize_with_report(g, preset)
        assert ops(out)[Op.RMS_NORM] == 1
        assert "fuse-rms-norm" in [r.name for r in report.records]


# --------------------------------------------------------------------------- captured models
class Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def _ids(vocab: int, b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decoder():
    model = build_decoder(lora_rank=2, seed=0).eval()
    return model, capture(model, {"input_ids": _ids(259, 2, 8, 0)}, DYN), 2 * model.config.layers + 1


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Logits(transformers.LlamaForCausalLM(cfg)).eval()
    with torch.no_grad():  # norm weights away from one, so a dropped scale shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return model, capture(model, {"input_ids": _ids(100, 2, 8, 0)}, DYN), 2 * cfg.num_hidden_layers + 1


@pytest.mark.parametrize("which", ["decoder", "llama"])
def test_captured_model_norms_become_rms_norm_nodes(which: str, request) -> None:
    model, g, norms = request.getfixturevalue(which)
    res = fuse_rms_norm(g.copy())
    after = verify(res.graph)
    c = ops(after)
    assert c[Op.RMS_NORM] == norms
    assert not {Op.POW, Op.REDUCE_MEAN, Op.RSQRT} & set(c)
    assert all(len(n.inputs) == 2 and n.inputs[1].op is Op.CONST for n in after.nodes if n.op is Op.RMS_NORM)
    assert res.stats["fired"] == {"fuse-rms-norm": norms, "fuse-rms-norm-scale": norms}
    assert res.stats["refused"] == {}
    vocab = 259 if which == "decoder" else 100
    for k, (b, s) in enumerate(((1, 1), (3, 7))):
        ids = _ids(vocab, b, s, k + 1)
        want = run(g, {"input_ids": ids.numpy()})["output"]
        got = run(after, {"input_ids": ids.numpy()})["output"]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(got, model(ids).numpy(), atol=1e-4, rtol=1e-4)


def _ort_ops(g: Graph, tmp_path, name: str) -> collections.Counter:
    path = save_onnx(g, tmp_path / f"{name}.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    model = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("preset", ["fused", "merged"])
@pytest.mark.parametrize("which", ["decoder", "llama"])
def test_onnxruntime_runs_each_norm_as_one_fused_kernel(which: str, preset: str, request, tmp_path) -> None:
    _, g, norms = request.getfixturevalue(which)
    c = _ort_ops(optimize(g, preset), tmp_path, f"{which}-{preset}")
    assert c["SimplifiedLayerNormalization"] + c["SkipSimplifiedLayerNormalization"] == norms, c
    assert not {"Pow", "Reciprocal", "Sqrt", "ReduceMean"} & set(c), c


def test_rms_norm_lowering_matches_reference_on_onnxruntime() -> None:
    from flora_graph.runtimes.executable import compile

    g = fuse_rms_norm(rms_graph()).graph
    feeds = inputs_for(g)
    want = run(g, feeds)["y"]
    np.testing.assert_allclose(compile(g, "onnxruntime")(**feeds)["y"], want, atol=1e-5, rtol=1e-5)


def test_optimize_cli_prints_after_fuse_rms_norm(decoder, tmp_path, capsys) -> None:
    from flora_graph.cli import main

    _, g, norms = decoder
    g.save(tmp_path / "g")
    assert main(["optimize", str(tmp_path / "g"), "--preset", "fused", "--print-after", "fuse-rms-norm"]) == 0
    out = capsys.readouterr().out
    assert "after fuse-rms-norm" in out and out.count("= RMSNorm[axis=2, epsilon=1e-06]") == norms
