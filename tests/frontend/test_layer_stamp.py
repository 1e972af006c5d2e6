"""Deep decoders captured from three traced layers, the others stamped: the graph of tracing every layer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flora_graph.frontend import layer_stamp  # noqa: E402
from flora_graph.frontend.causal_lm import (  # noqa: E402
    CausalLMWithPast,
    cache_layout,
    capture_causal_lm,
    example_inputs,
)
from flora_graph.frontend.layer_stamp import StampError  # noqa: E402
from flora_graph.ir import Op  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402
from tests.frontend.test_causal_lm import COMMON, _config, _feed, assert_outputs_like_eager  # noqa: E402

LAYERS = 7
SLOW = pytest.mark.slow


def deep(arch: str, layers: int = LAYERS, **changes):
    """A seeded tiny ``arch`` of ``layers`` layers (the family test's config otherwise), in eval mode."""
    saved = dict(COMMON)
    COMMON.update(num_hidden_layers=layers)
    try:
        cfg = _config(arch)
    finally:
        COMMON.clear()
        COMMON.update(saved)
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return getattr(transformers, arch)(cfg).eval()


def structure(graph, model) -> list[tuple]:
    """``graph`` node by node: op, attributes, inputs (by position), shape and dtype, a constant's value and, for
    ``model``'s weights, name (the capture names the constants it makes after the ops that read them)."""
    weights = {n for n, _ in [*model.named_parameters(), *model.named_buffers()]}
    at: dict = {}
    out = []
    for n in graph.nodes:
        at[n] = len(out)
        attrs = {k: v for k, v in n.attrs.items() if k != "param"}
        key = (n.op.name, repr(sorted(attrs.items())), tuple(at[i] for i in n.inputs), tuple(n.shape), n.dtype)
        if n.op is Op.CONST:
            param = n.attrs.get("param")
            key += (param if param in weights else None, graph.params[param].tobytes())
        out.append(key)
    return out + [("output", name, at[node]) for name, node in graph.outputs.items()] + [
        ("input", i.name, tuple(i.shape), i.dtype) for i in graph.inputs]


def kept(real, errors: list):
    """``real``, each :class:`StampError` it raises appended to ``errors`` too."""
    def run(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except StampError as exc:
            errors.append(exc)
            raise
    return run


def stamped_only(model, layout):
    """``model`` captured with its layers stamped; the :class:`StampError` where they cannot be (no full trace)."""
    import flora_graph.frontend.causal_lm as causal_lm

    errors: list[StampError] = []

    def refuse(*args, **kwargs):
        raise errors[0] if errors else AssertionError("not stamped")

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("capture_stamped", "_check_stamped"):  # the stamping and its check against eager
            mp.setattr(causal_lm, name, kept(getattr(causal_lm, name), errors))
        mp.setattr(causal_lm, "capture", refuse)
        return capture_causal_lm(model, layout=layout)


def both(model):
    """``model`` captured with its layers stamped and with every layer traced; its cache layout."""
    layout = cache_layout(model)
    stamped = stamped_only(model, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = capture_causal_lm(model, layout=layout, stamp_layers=False)
    return stamped, traced, layout


STAMPED = ["LlamaForCausalLM", pytest.param("MixtralForCausalLM", marks=SLOW), pytest.param("MistralForCausalLM", marks=SLOW),
           pytest.param("Gemma2ForCausalLM", marks=SLOW),
           pytest.param("Phi3ForCausalLM", marks=SLOW),
           pytest.param("DeepseekV3ForCausalLM", marks=SLOW), pytest.param("Qwen2MoeForCausalLM", marks=SLOW),
           pytest.param("CohereForCausalLM", marks=SLOW), pytest.param("Olmo2ForCausalLM", marks=SLOW),
           pytest.param("GemmaForCausalLM", marks=SLOW), pytest.param("Qwen3ForCausalLM", marks=SLOW),
           pytest.param("GptOssForCausalLM", marks=SLOW), pytest.param("SmolLM3ForCausalLM", marks=SLOW),
           pytest.param("Cohere2ForCausalLM", marks=SLOW)]


@pytest.mark.parametrize("arch", STAMPED)
def test_a_stamped_capture_is_the_graph_of_tracing_every_layer(arch: str) -> None:
    # Mixtral: routed experts; DeepSeek-V3: latent attention, its first layer dense and the others with experts;
    # Mistral: a sliding window (rewritten to count positions, as a full trace's is); Gemma 2, gpt-oss: windowed and
    # full attention layers in turn (two kinds of layer, a template each); SmolLM3: no rotary in every fourth layer;
    # Cohere 2: a full attention layer after three windowed ones
    model = deep(arch)
    stamped, traced, layout = both(model)
    assert structure(stamped, model) == structure(traced, model)
    assert_outputs_like_eager(stamped, layout, CausalLMWithPast(model, layout), ["logits", *layout.present_names()])


def test_every_layer_of_a_deep_model_reads_its_own_weights_and_cache() -> None:
    model = deep("LlamaForCausalLM", 9)
    stamped, traced, layout = both(model)
    assert structure(stamped, model) == structure(traced, model)
    consts = {n.attrs["param"] for n in stamped.nodes if n.op is Op.CONST}
    for i in range(9):
        assert f"model.layers.{i}.self_attn.q_proj.weight" in consts
        assert f"past_key_values.{i}.key" in [x.name for x in stamped.inputs]
    assert list(stamped.outputs) == ["logits", *layout.present_names()]
    with torch.no_grad():  # a change to one late layer's weights shows in the stamped graph's outputs
        model.model.layers[7].mlp.down_proj.weight.mul_(3.0)
    again = capture_causal_lm(model, layout=layout)
    x = _feed(example_inputs(layout, 128, 2, 4, 3, seed=1), layout)
    with torch.no_grad():
        want = CausalLMWithPast(model, layout)(**example_inputs(layout, 128, 2, 4, 3, seed=1))[0].numpy()
    np.testing.assert_allclose(compile(again, "numpy")(x)["logits"], want, atol=2e-5, rtol=1e-4)
    assert not np.allclose(compile(stamped, "numpy")(x)["logits"], want, atol=1e-3)


@SLOW
def test_a_layer_kind_first_seen_late_is_traced_and_the_others_stamped() -> None:
    # Gemma 3 at 13 layers: five windowed layers, then a full one: layers 0-5 traced (the full layer's template is
    # layer 5), the others stamped from layers 1 and 5
    model = deep("Gemma3ForCausalLM", 13)
    stack = layer_stamp.plan(model, cache_layout(model))
    assert (stack.traced, stack.check, sorted(stack.templates().values())) == (6, 2, [1, 5])
    stamped, traced, layout = both(model)
    assert structure(stamped, model) == structure(traced, model)
    assert_outputs_like_eager(stamped, layout, CausalLMWithPast(model, layout), ["logits", *layout.present_names()])


@pytest.mark.parametrize(("arch", "layers", "why"), [
    ("Gemma3ForCausalLM", LAYERS, "6 of 7 layers to trace for 2 kind"),  # its full layer's template is layer 5
    ("LlamaForCausalLM", 4, "4 layers: too few to stamp"),
    ("BambaForCausalLM", LAYERS, "more than keys and values"),  # state-space layers beside attention
])
def test_layers_that_are_not_alike_are_traced_every_one(arch: str, layers: int, why: str) -> None:
    model = deep(arch, layers)
    with pytest.raises(StampError, match=why):
        layer_stamp.plan(model, cache_layout(model))


@pytest.mark.slow
def test_a_hook_on_a_late_layer_is_not_lost() -> None:
    # a hook on layer 6 of 14 makes it a kind of its own: traced (layers 0-6), the hook's product in the graph; on
    # layer 5 of 7 too few layers would be left to stamp, and every layer is traced
    model = deep("LlamaForCausalLM", 14)
    model.model.layers[6].register_forward_hook(lambda mod, args, out: out * 0.5)
    stack = layer_stamp.plan(model, cache_layout(model))
    assert stack.traced == 7 and stack.kinds[6] != stack.kinds[5] == stack.kinds[7]
    stamped, traced, layout = both(model)
    assert structure(stamped, model) == structure(traced, model)
    x = example_inputs(layout, 128, 2, 3, 2, seed=3)
    with torch.no_grad():
        want = CausalLMWithPast(model, layout)(**x)[0].numpy()
    np.testing.assert_allclose(compile(stamped, "numpy")(_feed(x, layout))["logits"], want, atol=2e-5, rtol=1e-4)
    short = deep("LlamaForCausalLM")
    short.model.layers[5].register_forward_hook(lambda mod, args, out: out * 0.5)
    with pytest.raises(StampError, match="6 of 7 layers to trace for 2 kind"):
        layer_stamp.plan(short, cache_layout(short))


def test_a_layer_2_unlike_its_trace_is_refused_by_the_check() -> None:
    # with hooks left out of the comparison of the layers' modules, a hook on layer 2 alone passes it: the op-by-op
    # check of layer 2 stamped from layer 1 against its trace refuses the stamping then
    model = deep("LlamaForCausalLM")
    model.model.layers[2].register_forward_hook(lambda mod, args, out: out * 0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_stamp, "_hooks", lambda m: ())
        with pytest.raises(StampError, match="layer 2 stamped from layer 1 differs from its trace"):
            stamped_only(model, cache_layout(model))


def test_a_stamped_layer_that_computes_otherwise_is_caught_by_value(monkeypatch) -> None:
    # the stamping handed layer 5 the weights of layer 4 (a fault the op-by-op check of layer 2 cannot see): the
    # check of the whole stamped graph against eager on a short decode step refuses it, and every layer is traced
    model = deep("LlamaForCausalLM")
    layout = cache_layout(model)
    real, traced = layer_stamp.stamp, layer_stamp.plan(model, layout).traced

    def faulty(fx_graph, weights, input_names, output_names, layers, prefix, tensors, *args, **kw):
        if layers > traced:
            tensors = {**tensors, f"{prefix}.5.mlp.down_proj.weight": tensors[f"{prefix}.4.mlp.down_proj.weight"]}
        return real(fx_graph, weights, input_names, output_names, layers, prefix, tensors, *args, **kw)

    monkeypatch.setattr(layer_stamp, "stamp", faulty)
    with pytest.raises(StampError, match="differs from eager"):
        stamped_only(model, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_causal_lm(model, layout=layout)  # traced whole after the refusal
    x = example_inputs(layout, 128, 2, 3, 2, seed=3)
    with torch.no_grad():
        want = CausalLMWithPast(model, layout)(**x)[0].numpy()
    np.testing.assert_allclose(compile(graph, "numpy")(_feed(x, layout))["logits"], want, atol=2e-5, rtol=1e-4)
