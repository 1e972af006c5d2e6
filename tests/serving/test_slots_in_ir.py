"""Adapter slots in the IR: ``serve-export`` after any preset keeps every adapter swappable, or says which it cannot.

The regression: ``flora-graph demo --save g && flora-graph optimize g --preset fused --save gf &&
flora-graph serve-export gf s.onnx`` used to succeed with 9 inputs (29 from ``g``), 10 of the
14 adapters silently baked in. Now ``optimize --slots swappable`` keeps all 14 swappable, and
``serve-export`` of a graph whose adapters a preset fused is an error naming the modules.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from flora_graph.adapters import apply_lora, merge_all
from flora_graph.cli import main
from flora_graph.errors import AdapterError
from flora_graph.ir import Graph, Op, OpGroup
from flora_graph.models.decoder import DECODER_PROJECTIONS, build_decoder
from flora_graph.models.seeding import seed_lora_b
from flora_graph.passes import PASSES, optimize
from flora_graph.passes.adapter_slots import INDEX_INPUT
from flora_graph.runtimes import run
from flora_graph.runtimes.executable import compile
from flora_graph.serving import (
    AdapterSession,
    MixedAdapterSession,
    ServingError,
    adapter_params,
    export_mixed,
    export_swappable,
    graph_adapter_params,
    write_adapter,
)
from flora_graph.serving.export import slotted

BASE_ATOL = 1e-5  # the no-adapter model against the base model
ATOL = 2e-5
FUSED_AWAY = [f"layers.{i}.{m}" for i in (0, 1) for m in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]


class Demo:
    """The CLI demo decoder saved as ``g``, its eager base, merged and second-adapter models, and inputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.g = root / "g"
        assert main(["demo", "--model", "decoder", "--save", str(self.g)]) == 0  # LoRA rank 8 with a nonzero B
        self.graph = Graph.load(self.g)
        self.base = build_decoder().eval()
        self.merged = copy.deepcopy(build_decoder(lora_rank=8))
        merge_all(self.merged)
        self.other = copy.deepcopy(self.base)  # a second adapter, rank 3, over the same base
        apply_lora(self.other, list(DECODER_PROJECTIONS), rank=3, alpha=6)
        seed_lora_b(self.other, 7, 0.05)
        self.other.eval()
        self.other_merged = copy.deepcopy(self.other)
        merge_all(self.other_merged)
        gen = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, self.base.config.vocab_size, (3, 9), generator=gen)

    def eager(self, model: torch.nn.Module, ids: torch.Tensor | None = None) -> np.ndarray:
        with torch.no_grad():
            return model(self.ids if ids is None else ids).numpy()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return Demo(tmp_path_factory.mktemp("slots"))


def slot_signature(g: Graph) -> list[tuple[str, str, list[str]]]:
    """(op, module, weight input names) of every slot, and nothing else of the graph's adapters."""
    return sorted((n.op.value, n.attrs["module"], [i.name for i in n.inputs[2:]]) for n in g.nodes if n.op in OpGroup.Adapter)


def inputs_of(g: Graph) -> list[tuple[str, tuple, str, tuple | None]]:
    return [(n.name, n.shape, n.dtype, g.input_defaults[n.name].shape if n.name in g.input_defaults else None)
            for n in g.inputs]


# --------------------------------------------------------------------------- the regression
def test_cli_serve_export_after_fused_keeps_every_adapter_swappable(demo: Demo, capsys) -> None:
    gf, out, plain = demo.root / "gf", demo.root / "s.onnx", demo.root / "plain.onnx"
    assert main(["optimize", str(demo.g), "--preset", "fused", "--slots", "swappable", "--save", str(gf)]) == 0
    assert main(["serve-export", str(gf), str(out)]) == 0
    assert main(["serve-export", str(demo.g), str(plain)]) == 0
    assert " ".join(capsys.readouterr().out.split()).count("(29 inputs)") == 2  # rich wraps long lines
    model = onnx.load(str(out))
    assert len(model.graph.input) == 29
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(str(plain)).graph.input]
    _serves_base_and_both_adapters(demo, out, write_adapter(demo.root / "own.onnx_adapter",
                                                            graph_adapter_params(demo.graph), model=out))


def _serves_base_and_both_adapters(demo: Demo, model, own) -> None:
    """An AdapterSession on ``model`` gives the base model, ``own`` (a file) the merged model, and the rank-3
    adapter (given per module) its merged model."""
    session = AdapterSession(model, intra_op_threads=1)
    ids = {"input_ids": demo.ids.numpy()}
    np.testing.assert_allclose(session.run(ids)["output"], demo.eager(demo.base), atol=BASE_ATOL)
    session.load_adapter("own", own)
    session.load_adapter("other", adapter_params(demo.other))
    for name, ref in (("own", demo.merged), ("other", demo.other_merged)):
        want = demo.eager(ref)
        assert np.abs(want - demo.eager(demo.base)).max() > 1e-3  # the adapter matters
        np.testing.assert_allclose(session.run(ids, name)["output"], want, atol=ATOL)


def test_api_serve_export_after_fused_keeps_every_adapter(demo: Demo) -> None:
    fused = optimize(demo.graph, "fused", slots="swappable")
    assert len(slot_signature(fused)) == 14
    session = AdapterSession(export_swappable(fused), intra_op_threads=1)
    session.load_adapter("own", graph_adapter_params(demo.graph))
    ids = {"input_ids": demo.ids.numpy()}
    np.testing.assert_allclose(session.run(ids)["output"], demo.eager(demo.base), atol=BASE_ATOL)
    np.testing.assert_allclose(session.run(ids, "own")["output"], demo.eager(demo.merged), atol=ATOL)


def test_mixed_rows_after_fused_each_match_their_model(demo: Demo) -> None:
    fused = optimize(demo.graph, "fused", slots="mixed")
    assert {n.op for n in fused.nodes} & OpGroup.Adapter == {Op.LORA_MIXED_SLOT}
    session = MixedAdapterSession(export_mixed(fused), {"own": graph_adapter_params(demo.graph),
                                                        "other": adapter_params(demo.other)}, intra_op_threads=1)
    names = ["other", None, "own"]
    refs = {None: demo.base, "own": demo.merged, "other": demo.other_merged}
    want = np.stack([demo.eager(refs[n], demo.ids[i : i + 1])[0] for i, n in enumerate(names)])
    np.testing.assert_allclose(session.run({"input_ids": demo.ids.numpy()}, names)["output"], want, atol=ATOL)
    # slots of the other kind are converted: the exports of either slotted graph are the exports of the captured one
    names = {kind: [i.name for i in fn(demo.graph).graph.input] for kind, fn in
             (("swappable", export_swappable), ("mixed", export_mixed))}
    assert len(names["mixed"]) == 30 and INDEX_INPUT in names["mixed"]
    for kind, fn in (("swappable", export_mixed), ("mixed", export_swappable)):
        other = "mixed" if kind == "swappable" else "swappable"
        got = [i.name for i in fn(optimize(demo.graph, "fused", slots=kind)).graph.input]
        assert sorted(got) == sorted(names[other])


# --------------------------------------------------------------------------- a site that cannot stay swappable
def test_cli_serve_export_of_a_fused_graph_names_the_modules(demo: Demo, capsys) -> None:
    gf, out = demo.root / "fused_only", demo.root / "baked.onnx"
    assert main(["optimize", str(demo.g), "--preset", "fused", "--save", str(gf)]) == 0
    capsys.readouterr()
    assert main(["serve-export", str(gf), str(out)]) == 2
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines; module names have no spaces
    assert "ServingError" in err and "Traceback" not in err
    for module in FUSED_AWAY:
        assert module in err
    assert "--slotsswappable" in err
    assert not out.exists()


@pytest.mark.parametrize("preset", ["fused", "merged"])
def test_api_refuses_a_graph_whose_adapters_a_preset_fused_or_merged(demo: Demo, preset: str) -> None:
    done = optimize(demo.graph, preset)
    with pytest.raises(ServingError, match="no longer intact LoRA sites") as info:
        export_swappable(done)
    every = sorted(f"layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in (0, 1) for p in DECODER_PROJECTIONS)
    expected = FUSED_AWAY if preset == "fused" else every[:12]  # all 14 merged: twelve named, "and 2 more"
    for module in expected:
        assert f"'{module}'" in str(info.value)
    assert (preset == "merged") == ("and 2 more" in str(info.value))
    with pytest.raises(ServingError, match="no longer intact"):
        export_mixed(done)
    with pytest.raises(AdapterError, match="no longer intact"):  # the pass itself, through optimize
        optimize(done, "fused", slots="swappable")


def test_graph_adapter_params_of_a_slotted_graph_is_an_error(demo: Demo) -> None:
    assert len(graph_adapter_params(demo.graph)) == 28  # the captured graph's own adapter
    with pytest.raises(ServingError, match="adapter slots, which hold no adapter weights"):
        graph_adapter_params(slotted(demo.graph))


# --------------------------------------------------------------------------- slots survive every pass
@pytest.mark.parametrize("kind", ["swappable", "mixed"])
@pytest.mark.parametrize(("preset", "options"), [
    ("unfused", {}), ("fused", {}), ("merged", {}),
    ("fused", {"fuse_base_and_down": True, "drop_zero_lora": True}),
    # every pass, once each, in registration order (pack-slots repacks slots by design: its own tests below)
    ([p for p in PASSES if p not in ("adapter-slots", "pack-slots")], {}),
], ids=["unfused", "fused", "merged", "fused-all-options", "every-pass"])
def test_slots_survive_every_preset(demo: Demo, kind: str, preset, options: dict) -> None:
    before = slotted(demo.graph, kind)
    after = optimize(before, preset, verify_each=True, **options)
    assert len(slot_signature(before)) == 14
    assert slot_signature(after) == slot_signature(before)
    assert inputs_of(after) == inputs_of(before)
    own = graph_adapter_params(demo.graph)
    ids = demo.ids.numpy()
    if kind == "swappable":
        feeds = {"input_ids": ids, **own}
        want = run(demo.graph, {"input_ids": ids})["output"]
    else:
        from flora_graph.serving import stack_adapters
        from flora_graph.serving.slots import graph_slots

        feeds = {"input_ids": ids, INDEX_INPUT: np.array([0, -1, 0]), **stack_adapters(graph_slots(before), [own])}
        want = np.stack([demo.eager(demo.merged, demo.ids[:1])[0], demo.eager(demo.base, demo.ids[1:2])[0],
                         demo.eager(demo.merged, demo.ids[2:])[0]])
    np.testing.assert_allclose(run(after, feeds)["output"], want, atol=ATOL)
    base = run(after, {"input_ids": ids, **({INDEX_INPUT: np.full(3, -1)} if kind == "mixed" else {})})["output"]
    np.testing.assert_allclose(base, demo.eager(demo.base), atol=BASE_ATOL)


def test_a_slotted_graph_saves_loads_and_runs_on_torch(demo: Demo) -> None:
    g = optimize(demo.graph, "fused", slots="swappable")
    g.save(demo.root / "slotted")
    doc = json.loads((demo.root / "slotted" / "graph.json").read_text())
    assert len(doc["input_defaults"]) == 28
    back = Graph.load(demo.root / "slotted")
    assert inputs_of(back) == inputs_of(g) and slot_signature(back) == slot_signature(g)
    assert "input_defaults" not in json.loads((demo.g / "graph.json").read_text())  # none: the field stays out
    exe = compile(back, "torchscript")
    ids = demo.ids.numpy()
    np.testing.assert_allclose(exe(input_ids=ids)["output"], demo.eager(demo.base), atol=BASE_ATOL)
    own = graph_adapter_params(demo.graph)
    np.testing.assert_allclose(exe(input_ids=ids, **own)["output"], demo.eager(demo.merged), atol=ATOL)


class Chain(torch.nn.Module):
    """Two adapted layers back to back: the second site reads the first one's sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize("kind", ["swappable", "mixed"])
def test_a_site_reading_another_site(kind: str) -> None:
    base, model, x, g, s = _adapted_toy(Chain, kind)
    (slot_a,) = [n for n in s.nodes if n.op in OpGroup.Adapter and n.attrs["module"] == "a"]
    (slot_b,) = [n for n in s.nodes if n.op in OpGroup.Adapter and n.attrs["module"] == "b"]
    assert slot_b.inputs[1] is slot_a  # b's site input is a's slot
    _serves_as_eager(g, s, model, base, x, kind)


def _adapted_toy(cls: type[torch.nn.Module], kind: str):
    """``(base, model, x, captured, slotted)``: ``cls()`` with a random rank-2 adapter on its layers ``a`` and ``b``."""
    from flora_graph.frontend import capture
    from flora_graph.serving.demo import random_adapter

    torch.manual_seed(0)
    base = cls().eval()
    model = random_adapter(base, 2, seed=1, targets=["a", "b"])
    x = torch.randn(3, 8)
    g = capture(model, {"x": x}, {"x": {0: "batch"}})
    return base, model, x, g, slotted(g, kind)


def _serves_as_eager(g: Graph, s: Graph, model, base, x: torch.Tensor, kind: str) -> None:
    """``s`` (``g`` slotted as ``kind``) gives eager's merged model with ``g``'s own adapter and the base without
    one; mixed rows each their own."""
    own = graph_adapter_params(g)
    with torch.no_grad():
        merged = copy.deepcopy(model)
        merge_all(merged)
        want, plain = merged(x).numpy(), base(x).numpy()
    if kind == "swappable":
        np.testing.assert_allclose(run(s, {"x": x.numpy(), **own})["output"], want, atol=ATOL)
        np.testing.assert_allclose(run(s, {"x": x.numpy()})["output"], plain, atol=BASE_ATOL)
    else:
        session = MixedAdapterSession(export_mixed(g), {"own": own}, intra_op_threads=1)
        got = session.run({"x": x.numpy()}, ["own", None, "own"])["output"]
        np.testing.assert_allclose(got, np.stack([want[0], plain[1], want[2]]), atol=ATOL)


class Twice(torch.nn.Module):
    """One layer run twice (as Gemma 3n's AltUp router is), with another between."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.tanh(self.b(self.a(x))))


@pytest.mark.parametrize("kind", ["swappable", "mixed"])
def test_a_module_run_twice_has_two_slots_on_one_adapter(kind: str) -> None:
    from flora_graph.serving.slots import graph_slots

    base, model, x, g, s = _adapted_toy(Twice, kind)
    twice = [n for n in s.nodes if n.op in OpGroup.Adapter and n.attrs["module"] == "a"]
    assert len(twice) == 2 and twice[0].inputs[2:4] == twice[1].inputs[2:4]  # one A and one B for both runs
    assert [slot.module for slot in graph_slots(s)] == ["a", "b"]
    assert set(graph_adapter_params(g)) == {"a.lora_A", "a.lora_B", "b.lora_A", "b.lora_B"}
    _serves_as_eager(g, s, model, base, x, kind)


def test_a_sequential_whose_module_paths_start_with_a_number() -> None:
    """Slots on ``nn.Sequential`` layers ``0`` and ``2``: rank dims ``0.rank`` / ``2.rank``, as the exports always named them."""
    from flora_graph.frontend import capture
    from flora_graph.serving.demo import random_adapter

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    model = random_adapter(base, 2, seed=1, targets=["0", "2"])
    x = torch.randn(3, 8)
    g = capture(model, {"input": x}, {"input": {0: "batch"}})
    exported = export_swappable(g)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in exported.graph.input}
    assert dims["0.lora_A"] == ["0.rank", 8] and dims["2.lora_B"] == [4, "2.rank"]
    session = AdapterSession(exported, intra_op_threads=1)
    session.load_adapter("own", graph_adapter_params(g))
    merged = copy.deepcopy(model)
    merge_all(merged)
    with torch.no_grad():
        np.testing.assert_allclose(session.run({"input": x.numpy()}, "own")["output"], merged(x).numpy(), atol=ATOL)
        np.testing.assert_allclose(session.run({"input": x.numpy()})["output"], base(x).numpy(), atol=BASE_ATOL)


# --------------------------------------------------------------------------- pack-slots
PACKED = {f"layers.{i}.{m}" for i in (0, 1) for m in
          ("self_attn.q_proj+k_proj+v_proj", "self_attn.o_proj", "mlp.gate_proj+up_proj", "mlp.down_proj")}


def test_packed_slots_serve_per_module_adapters_like_the_unpacked_ones(demo: Demo) -> None:
    """q/k/v and gate/up pack into one slot each (8 slots for 14 modules, fewer ONNX nodes); adapters given per
    module (ours, and a rank-3 one over all seven projections) are packed on load and give each model's output."""
    from flora_graph.serving.slots import graph_slots

    packed = optimize(demo.graph, "fused", slots="swappable", pack_slots=True, verify_each=True)
    assert {m for _, m, _ in slot_signature(packed)} == PACKED
    slots = {s.module: s for s in graph_slots(packed)}
    qkv = slots["layers.0.self_attn.q_proj+k_proj+v_proj"]
    assert qkv.members == tuple(f"layers.0.self_attn.{m}_proj" for m in "qkv") and sum(qkv.member_outs) == qkv.out
    model = export_swappable(packed)
    unpacked = export_swappable(optimize(demo.graph, "fused", slots="swappable"))
    assert len(model.graph.node) < len(unpacked.graph.node) - 20
    _serves_base_and_both_adapters(demo, model, write_adapter(demo.root / "own_packed.onnx_adapter",
                                                              graph_adapter_params(demo.graph), model=model))
    ids = {"input_ids": demo.ids.numpy()}
    mixed = MixedAdapterSession(export_mixed(packed), {"own": graph_adapter_params(demo.graph),
                                                       "other": adapter_params(demo.other)}, intra_op_threads=1)
    names = ["other", None, "own"]
    refs = {None: demo.base, "own": demo.merged, "other": demo.other_merged}
    want = np.stack([demo.eager(refs[n], demo.ids[i : i + 1])[0] for i, n in enumerate(names)])
    np.testing.assert_allclose(mixed.run(ids, names)["output"], want, atol=ATOL)
    per_row = MixedAdapterSession(export_mixed(packed), {"own": graph_adapter_params(demo.graph),
                                                         "other": adapter_params(demo.other)},
                                  intra_op_threads=1, per_row_weights=True)  # packed stacks, gathered in numpy
    np.testing.assert_array_equal(per_row.run(ids, names)["output"], mixed.run(ids, names)["output"])


class LocalGlobal(torch.nn.Module):
    """Projections run on two inputs, as PEGASUS-X's attention runs them on its local and global tokens: ``q``, ``k``
    and ``v`` on both (``same=True``), or ``q``, ``k``, ``v`` on one and ``k``, ``v`` alone on the other."""

    def __init__(self, same: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        out = self.q(x) * self.k(x) + self.v(x) + self.k(y) * self.v(y)
        return out + self.q(y) if self.same else out


@pytest.mark.parametrize("same", [True, False])
def test_a_module_run_twice_is_packed_only_with_the_same_siblings_everywhere(same: bool) -> None:
    """Two runs with the same siblings read one packed slot's weights; where one run of ``k``/``v`` has other
    siblings, none of them is packed (one module's adapter weights go to one slot): either way the packed adapter
    gives eager's output."""
    from flora_graph.frontend import capture
    from flora_graph.serving.demo import random_adapter
    from flora_graph.serving.slots import graph_slots, pack_params

    torch.manual_seed(0)
    base = LocalGlobal(same).eval()
    model = random_adapter(base, 2, seed=1, targets=["q", "k", "v"])
    x = torch.randn(3, 8)
    g = capture(model, {"x": x}, {"x": {0: "batch"}})
    packed = optimize(g, "fused", slots="swappable", pack_slots=True, verify_each=True)
    slots = [n for n in packed.nodes if n.op in OpGroup.Adapter]
    assert [n.attrs["module"] for n in slots] == (["q+k+v"] * 2 if same else ["q", "k", "v", "k", "v"])
    own = pack_params(graph_adapter_params(g), [s for s in graph_slots(packed) if s.members], "own")
    with torch.no_grad():
        merged = copy.deepcopy(model)
        merge_all(merged)
        want = merged(x).numpy()
    np.testing.assert_allclose(run(packed, {"x": x.numpy(), **own})["output"], want, atol=ATOL)


def test_pack_params_is_block_diagonal_and_refuses_half_a_module(demo: Demo) -> None:
    from flora_graph.serving.errors import AdapterFileError
    from flora_graph.serving.slots import graph_slots, pack_params

    packs = [s for s in graph_slots(optimize(demo.graph, "fused", slots="swappable", pack_slots=True)) if s.members]
    qkv = next(s for s in packs if s.module == "layers.0.self_attn.q_proj+k_proj+v_proj")
    rng = np.random.default_rng(0)
    q_a, q_b = rng.normal(size=(2, qkv.in_dims[0])), rng.normal(size=(qkv.member_outs[0], 2))
    v_a, v_b = rng.normal(size=(5, qkv.in_dims[0])), rng.normal(size=(qkv.member_outs[2], 5))
    got = pack_params({"layers.0.self_attn.q_proj.lora_A": q_a, "layers.0.self_attn.q_proj.lora_B": q_b,
                       "layers.0.self_attn.v_proj.lora_A": v_a, "layers.0.self_attn.v_proj.lora_B": v_b}, packs, "t")
    a, b = got[qkv.a_name], got[qkv.b_name]  # k left out: rank 0 there
    x = rng.normal(size=(3, qkv.in_dims[0]))
    q, k = qkv.member_outs[0], qkv.member_outs[1]
    np.testing.assert_allclose((x @ a.T @ b.T)[:, :q], x @ q_a.T @ q_b.T, atol=1e-12)
    assert not np.any((x @ a.T @ b.T)[:, q : q + k])
    np.testing.assert_allclose((x @ a.T @ b.T)[:, q + k :], x @ v_a.T @ v_b.T, atol=1e-12)
    with pytest.raises(AdapterFileError, match=r"'layers\.0\.self_attn\.q_proj\.lora_A' but not .*q_proj\.lora_B"):
        pack_params({"layers.0.self_attn.q_proj.lora_A": q_a}, packs, "t")
    with pytest.raises(AdapterFileError, match=r"'t'.*k_proj.*do not fit"):
        pack_params({"layers.0.self_attn.k_proj.lora_A": q_a, "layers.0.self_attn.k_proj.lora_B": q_b.T}, packs, "t")


def test_cli_optimize_pack_slots_then_serve_export(demo: Demo, capsys) -> None:
    gp, out = demo.root / "gp", demo.root / "packed.onnx"
    assert main(["optimize", str(demo.g), "--preset", "fused", "--pack-slots", "--save", str(gp)]) == 2
    assert "--slots swappable" in " ".join(capsys.readouterr().out.split()) and not gp.exists()
    assert main(["optimize", str(demo.g), "--preset", "fused", "--slots", "swappable", "--pack-slots",
                 "--save", str(gp)]) == 0
    assert "pack-slots x4" in " ".join(capsys.readouterr().out.split())
    assert main(["serve-export", str(gp), str(out)]) == 0
    names = [i.name for i in onnx.load(str(out)).graph.input]
    assert len(names) == 1 + 2 * len(PACKED) and "layers.1.mlp.gate_proj+up_proj.lora_B" in names
    _serves_base_and_both_adapters(demo, out, graph_adapter_params(demo.graph))


def test_unpack_params_inverts_pack_params_and_refuses_a_b_that_is_not_block_diagonal(demo: Demo) -> None:
    """The mixed model of a GenAI package is unpacked; it reads the package's packed files member by member."""
    from flora_graph.serving.errors import AdapterFileError
    from flora_graph.serving.slots import graph_slots, pack_params, unpack_params

    packs = [s for s in graph_slots(optimize(demo.graph, "fused", slots="swappable", pack_slots=True)) if s.members]
    per_module = adapter_params(demo.other)  # rank 3 on every projection
    per_module["layers.0.self_attn.k_proj.lora_B"][:, 1] = 0  # a zero column of B adds nothing: dropped
    packed = pack_params(per_module, packs, "t")
    back = unpack_params(packed, packs, "t")
    assert set(back) == set(per_module)
    for name, value in per_module.items():
        if name == "layers.0.self_attn.k_proj.lora_A":
            np.testing.assert_array_equal(back[name], value[[0, 2]])
        elif name == "layers.0.self_attn.k_proj.lora_B":
            np.testing.assert_array_equal(back[name], value[:, [0, 2]])
        else:
            np.testing.assert_array_equal(back[name], value)
    qkv = packs[0]
    bad = dict(packed)
    bad[qkv.b_name] = np.ones_like(packed[qkv.b_name])
    with pytest.raises(AdapterFileError, match=r"not block-diagonal.*q_proj"):
        unpack_params(bad, packs, "t")
    ids = {"input_ids": demo.ids.numpy()}  # a mixed model of the unpacked graph, told of the packs, loads packed params
    model = export_mixed(optimize(demo.graph, "fused", slots="swappable"), packed=packs)
    session = MixedAdapterSession(model, {"other": pack_params(adapter_params(demo.other), packs, "other")},
                                  intra_op_threads=1)
    want = np.stack([demo.eager(demo.other_merged, demo.ids[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(session.run(ids, ["other"] * 3)["output"], want, atol=ATOL)
