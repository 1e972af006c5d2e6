"""Graph.load on hostile input: it returns a graph that verifies, or raises GraphError. Nothing else."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flora_graph.errors import GraphError
from flora_graph.ir import DTYPES, Graph, Op, verify

from .helpers import rich_graph

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    """A saved rich graph: its directory and its parsed graph.json."""
    path = tmp_path_factory.mktemp("fuzz")
    rich_graph().save(path)
    return path, json.loads((path / "graph.json").read_text())


def load_or_graph_error(path: Path, raw: bytes) -> Graph | None:
    (path / "graph.json").write_bytes(raw)
    try:
        g = Graph.load(path)
    except GraphError:
        return None
    verify(g)  # whatever loads must be a valid graph
    return g


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_bytes(base, raw):
    path, _ = base
    assert load_or_graph_error(path, raw) is None


@FUZZ
@given(doc=json_values)
def test_random_json(base, doc):
    path, _ = base
    load_or_graph_error(path, json.dumps(doc).encode())


@FUZZ
@given(doc=st.fixed_dictionaries(
    {"format": st.just("flora_graph"), "version": st.just(1), "name": json_values, "inputs": json_values,
     "outputs": json_values, "nodes": st.lists(json_values, max_size=4), "weights": json_values}
))
def test_random_json_with_the_right_header(base, doc):
    path, valid = base
    doc["weights"] = copy.deepcopy(valid["weights"]) if isinstance(doc["weights"], dict) else doc["weights"]
    load_or_graph_error(path, json.dumps(doc).encode())


# ------------------------------------------------------------------ mutations of a valid document
def plausible(doc: dict) -> st.SearchStrategy[Any]:
    """Values that look like the real thing, so mutations get past the type checks into verify."""
    names = [n["name"] for n in doc["nodes"]]
    dims = st.sampled_from(["batch", "seq", "batch*seq", "2*batch", "16", "²", "k", "", "-1"]) | st.integers(-2, 12)
    return st.one_of(
        st.sampled_from(names),
        st.sampled_from([op.value for op in Op]),
        st.sampled_from([*list(DTYPES), "float8", "Float32"]),
        dims,
        st.lists(dims, max_size=5),
        st.lists(st.sampled_from(names), max_size=3),
        st.lists(st.integers(-3, 6), max_size=5),
        st.floats(allow_nan=True, allow_infinity=True),
        json_values,
    )


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (sequence of keys/indices) into a JSON value, the root included."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw, valid: dict) -> dict:
    doc = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p and p[:1] != ("weights",)] or [()]
        path = draw(st.sampled_from(paths))
        if not path:
            break
        parent = _parent(doc, path)
        key = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "drop", "duplicate", "add_field"]))
        if action == "replace":
            parent[key] = draw(plausible(valid))
        elif action == "drop":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(draw(st.integers(0, len(parent))), copy.deepcopy(parent[key]))
        elif action == "add_field" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(plausible(valid))
        else:
            parent[key] = draw(json_values)
    return doc


@FUZZ
@given(data=st.data())
def test_mutated_valid_document(base, data):
    path, valid = base
    doc = data.draw(mutated(valid))
    load_or_graph_error(path, json.dumps(doc).encode())


def test_unmutated_document_loads(base):
    """The fuzz base itself loads, so the mutation tests start from a valid file."""
    path, valid = base
    assert load_or_graph_error(path, json.dumps(valid).encode()) is not None
