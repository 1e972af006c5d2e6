"""Pipeline: fixed point, verify after each pass, PassError naming the pass and the ones before it."""

from __future__ import annotations

import pytest

from flora_graph.errors import GraphError
from flora_graph.ir import Graph
from flora_graph.passes import PASSES, PassError, PassResult, Pipeline, register_pass
from flora_graph.passes.base import get_pass

from .helpers import assert_same_numbers, demo_graph, lora_linear


@pytest.fixture
def temp_passes():
    """Register test passes for one test; unregister them afterwards."""
    added: list[str] = []

    def add(name, fn):
        register_pass(name)(fn)
        added.append(name)
        return fn

    yield add
    for name in added:
        PASSES.pop(name, None)


def _break_shape(graph: Graph) -> PassResult:
    """A deliberately wrong pass: declares a wrong shape on the last node."""
    graph.nodes[-1].shape = (1, 2, 3)
    return PassResult(graph, True, {})


def test_fixed_point_reached_and_stats_recorded():
    before = demo_graph()
    pipe = Pipeline(["fold-lora-scale", "merge-lora", "cse", "dce"], verify_each=True)
    g, report = pipe.run(before.copy())
    assert report.converged and report.iterations == 2
    first = report.records[0]
    assert (first.name, first.iteration, first.nodes_before, first.nodes_after) == ("fold-lora-scale", 1, 32, 27)
    assert first.fired == {"fold-lora-scale": 5} and first.time_s >= 0
    assert report.fired() == {"fold-lora-scale": 5, "merge-lora": 5}
    assert report.totals()["merge-lora"]["runs"] == 2
    assert "merge-lora" in report.format() and "converged after 2" in str(report)
    again = pipe(g)
    assert not again.changed and again.stats["report"].iterations == 1
    assert_same_numbers(before, g, atol=1e-5, rtol=1e-5)


def test_verify_each_catches_a_broken_pass(temp_passes):
    temp_passes("break-shape", _break_shape)
    pipe = Pipeline(["fold-lora-scale", "dce", "break-shape", "cse"], verify_each=True)
    with pytest.raises(PassError) as err:
        pipe.run(lora_linear())
    e = err.value
    assert isinstance(e, GraphError)
    assert e.pass_name == "break-shape" and e.previous == ["fold-lora-scale", "dce"]
    msg = str(e)
    assert "pass 'break-shape'" in msg and "['fold-lora-scale', 'dce']" in msg and "left an invalid graph" in msg
    assert "node 'add'" in msg  # the verify message naming the node at fault comes along
    Pipeline(["break-shape"], max_iterations=1).run(lora_linear())  # without verify_each it goes unnoticed


def test_a_raising_pass_is_named(temp_passes):
    def boom(graph):
        raise ValueError("kaput")

    temp_passes("boom", boom)
    with pytest.raises(PassError, match=r"pass 'boom' \(iteration 1; passes run before it: \['dce'\]\) failed: ValueError: kaput") as err:
        Pipeline(["dce", "boom"]).run(lora_linear())
    assert isinstance(err.value.__cause__, ValueError)


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(PassError, match="returned Graph, not a PassResult"):
        Pipeline([lambda g: g]).run(lora_linear())


def test_iterations_are_bounded(temp_passes):
    def always(graph):
        return PassResult(graph, True, {})

    temp_passes("always-changes", always)
    _, report = Pipeline(["always-changes"], max_iterations=4).run(lora_linear())
    assert not report.converged and report.iterations == 4 and len(report.records) == 4
    with pytest.raises(ValueError):
        Pipeline(["dce"], max_iterations=0)


def test_options_go_only_to_passes_that_declare_them(temp_passes):
    seen = {}

    def wants(graph, *, swappable=False):
        seen["swappable"] = swappable
        return PassResult(graph, False, {})

    temp_passes("wants-swappable", wants)
    Pipeline(["wants-swappable", "dce"], options={"swappable": True, "peak_flops": 1.0}).run(lora_linear())
    assert seen == {"swappable": True}


def test_registry():
    assert get_pass("dce") == ("dce", PASSES["dce"])
    with pytest.raises(KeyError, match="unknown pass 'nope'"):
        Pipeline(["nope"])
    with pytest.raises(ValueError, match="already registered"):
        register_pass("dce")(lambda g: PassResult(g, False))
    with pytest.raises(TypeError):
        get_pass(3)  # type: ignore[arg-type]


def test_callables_and_nested_pipelines():
    inner = Pipeline(["fold-lora-scale"])
    g, report = Pipeline([inner, "merge-lora"]).run(lora_linear())
    assert g.ops() == ["Linear"] and report.converged
    assert [r.name for r in report.records[:2]] == ["pipeline[fold-lora-scale]", "merge-lora"]
    assert report.records[0].stats["report"].fired() == {"fold-lora-scale": 1}
