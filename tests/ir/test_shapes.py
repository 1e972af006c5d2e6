"""Named dims: canonical spelling, products, division, broadcasting."""

from __future__ import annotations

import pytest

from flora_graph.errors import GraphError, ShapeError
from flora_graph.ir.shapes import (
    broadcast_shapes,
    canonical_dim,
    difference_range,
    dim_names,
    dim_product,
    dims_equal,
    divide_dims,
    eval_dim,
    floor_div_parts,
    floor_divide_dim,
    format_shape,
    is_static,
    normalize_axis,
    static_numel,
    window_count,
)


@pytest.mark.parametrize(
    ("dim", "want"),
    [
        (7, 7),
        (0, 0),
        ("batch", "batch"),
        ("seq*batch", "batch*seq"),
        ("batch*seq", "batch*seq"),
        (" seq * batch ", "batch*seq"),
        ("seq*4*batch", "4*batch*seq"),
        ("2*batch*3", "6*batch"),
        ("1*batch", "batch"),
        ("0*batch", 0),
        ("16", 16),
        ("2*8", 16),
        ("batch*batch", "batch*batch"),
        ("model.layers.0", "model.layers.0"),
    ],
)
def test_canonical_dim(dim, want):
    got = canonical_dim(dim)
    assert got == want
    assert type(got) is type(want)
    assert canonical_dim(got) == got  # canonical form is a fixed point


def test_commuted_products_are_equal():
    assert dims_equal("seq*batch", "batch*seq")
    assert dims_equal("4*seq*batch", "batch*4*seq")
    assert not dims_equal("batch", "seq")
    assert not dims_equal("batch*batch", "batch")
    assert not dims_equal("2*batch", "batch")


@pytest.mark.parametrize(
    "bad", [-1, True, False, 1.5, None, "", "*", "batch*", "2x", "a-b", "9batch", "²", "batch*²", "1" * 5000, ("b",)]
)
def test_invalid_dims_raise_shape_error(bad):
    with pytest.raises(ShapeError):
        canonical_dim(bad)


def test_a_module_path_led_by_a_number_is_a_dim_name():
    """``0.rank``: the rank dim of an adapter slot on the first layer of an ``nn.Sequential``."""
    assert canonical_dim("0.rank") == "0.rank"
    assert canonical_dim("2*0.attn.rank*batch") == "2*0.attn.rank*batch"
    for bad in ("1.5", "0.", "3.9x", "0.-a"):
        with pytest.raises(ShapeError):
            canonical_dim(bad)


def test_shape_error_is_a_graph_error():
    assert issubclass(ShapeError, GraphError)


@pytest.mark.parametrize(
    ("dims", "want"),
    [
        ([], 1),
        ([2, 3, 4], 24),
        ([2, 0, "batch"], 0),
        (["batch", 4], "4*batch"),
        (["seq", "batch"], "batch*seq"),
        (["batch", 2, "seq", 3], "6*batch*seq"),
        (["2*batch", "3*seq"], "6*batch*seq"),
        (["batch", "batch"], "batch*batch"),
    ],
)
def test_dim_product(dims, want):
    assert dim_product(dims) == want


@pytest.mark.parametrize(
    ("num", "den", "want"),
    [
        (12, 4, 3),
        (12, 5, None),
        (12, 0, None),
        (0, 3, 0),
        ("4*batch", 4, "batch"),
        ("4*batch", 2, "2*batch"),
        ("4*batch", 3, None),
        ("batch*seq", "seq", "batch"),
        ("seq*batch", "batch", "seq"),
        ("6*batch*seq", "2*batch", "3*seq"),
        ("batch", "batch", 1),
        ("batch", "seq", None),
        ("batch", "batch*batch", None),
        (8, "batch", None),
        ("batch", 2, None),
        ("32*t*batch-32*batch", "batch*t-batch", 32),  # conv-reduced frames less one, times the batch
        ("seq*seq-1", "seq-1", "seq+1"),
        ("seq*seq+1", "seq-1", None),  # a remainder
        ("3*seq+3", "2*seq+2", None),  # a fraction
    ],
)
def test_divide_dims(num, den, want):
    assert divide_dims(num, den) == want


def test_divide_then_multiply_round_trips():
    for num, den in [("6*batch*seq", "2*batch"), ("batch*seq", "seq"), (24, 6), ("seq*seq-1", "seq-1"),
                     ("2*batch*past+2*batch*seq", "past+seq")]:
        q = divide_dims(num, den)
        assert q is not None
        assert dims_equal(dim_product([q, den]), num)


@pytest.mark.parametrize(
    ("shapes", "want"),
    [
        ([(2, 3), (3,)], (2, 3)),
        ([(2, 1), (1, 3)], (2, 3)),
        ([(), (4,)], (4,)),
        ([("batch", 3), (1, 3)], ("batch", 3)),
        ([(1, 3), ("batch", 1)], ("batch", 3)),
        ([("batch", "seq", 8), (8,)], ("batch", "seq", 8)),
        ([("batch", 1, 8), ("seq", 1)], ("batch", "seq", 8)),
        ([("seq*batch", 4), ("batch*seq", 4)], ("batch*seq", 4)),
        ([("batch",), ("batch",), (1,)], ("batch",)),
    ],
)
def test_broadcast(shapes, want):
    assert broadcast_shapes(*shapes) == want


@pytest.mark.parametrize(
    "shapes",
    [
        [(2,), (3,)],
        [("batch",), (3,)],
        [(3,), ("batch",)],
        [("batch",), ("seq",)],
        [("batch", 4), ("seq", 4)],
        [("batch",), ("2*batch",)],
        [(2, 3), (4, 3)],
    ],
)
def test_broadcast_mismatch_raises(shapes):
    with pytest.raises(ShapeError, match="do not broadcast"):
        broadcast_shapes(*shapes)


def test_broadcast_agrees_with_numpy_on_static_shapes():
    import numpy as np
    cases = [[(5, 1, 4), (3, 1)], [(1,), (2, 2)], [(7, 1, 1), (1, 6, 1), (5,)], [(0, 3), (1, 3)]]
    for shapes in cases:
        assert broadcast_shapes(*shapes) == np.broadcast_shapes(*shapes)


def test_normalize_axis():
    assert normalize_axis(-1, 3) == 2
    assert normalize_axis(0, 3) == 0
    assert normalize_axis(-3, 3) == 0
    for bad in (3, -4):
        with pytest.raises(ShapeError, match="out of range"):
            normalize_axis(bad, 3)
    with pytest.raises(ShapeError):
        normalize_axis(0, 0)


def test_static_helpers_and_format():
    assert is_static((1, 2, 3)) and not is_static(("batch", 2))
    assert static_numel((2, 3, 4)) == 24
    assert static_numel(()) == 1
    assert static_numel(("batch", 2)) is None
    assert format_shape(("batch", 16)) == "[batch, 16]"
    assert format_shape(()) == "[]"
    assert format_shape(None) == "[?]"


# --------------------------------------------------------------------------- floor division
@pytest.mark.parametrize(
    ("num", "den", "want"),
    [
        ("samples-10", 5, "((samples)//5)-2"),  # the constant's multiple of 5 comes out
        ("samples-9", 5, "((samples+1)//5)-2"),  # the atom keeps a constant in [0, 5)
        ("5*a+3", 5, "a"),  # exact terms divide, the rest is 0
        ("10*a+b", 5, "((b)//5)+2*a"),
        (17, 5, 3),
        ("seq", 1, "seq"),
        ("((samples)//5)-2", 2, "((samples)//10)-1"),  # floor(floor(x/5)/2) = floor(x/10)
    ],
)
def test_floor_divide_dim(num, den, want):
    got = floor_divide_dim(num, den)
    assert got == want
    assert canonical_dim(got) == got  # the spelling reads back as itself


def test_floor_division_atoms_evaluate_like_python_at_every_size():
    dims = [window_count("samples", 10, 5, 0), window_count(window_count("samples", 10, 5, 0), 3, 2, 0)]
    assert dims == ["((samples)//5)-1", "((samples)//10)-1"]
    for samples in range(20, 90):
        l1 = (samples - 10) // 5 + 1
        assert [eval_dim(d, {"samples": samples}) for d in dims] == [l1, (l1 - 3) // 2 + 1]
        assert eval(dims[1], {"samples": samples}) == (l1 - 3) // 2 + 1  # the spelling is Python too
    assert dim_names(dims[1]) == {"samples"}
    assert floor_div_parts("((samples+1)//5)") == ("samples+1", 5)
    assert floor_div_parts("samples") is None and floor_div_parts("((a)//b)") is None


def test_window_count_static_and_dynamic():
    assert window_count(9, 3, 2, 1) == 5 and window_count("seq", 3, 1, 1) == "seq" and window_count("seq", 3, 1, 0) == "seq-2"
    with pytest.raises(ShapeError, match="too small"):
        window_count(2, 5, 1, 0)
    with pytest.raises(ShapeError, match="divisor"):
        floor_divide_dim("seq", 0)


def test_a_negative_term_is_a_dim_only_under_a_multiple_of_it():
    assert dim_product(["batch", "seq-1", 4]) == "-4*batch+4*batch*seq"  # batch * (seq - 1)
    assert canonical_dim("4*batch*seq-4*batch") == "-4*batch+4*batch*seq"
    for bad in ("a-b", "batch-batch*seq", "((a)//2)-b"):
        with pytest.raises(ShapeError):
            canonical_dim(bad)
    for bad in ("((a)//0)", "((a)//x)", "(a", "a)//2"):
        with pytest.raises(ShapeError):
            canonical_dim(bad)


@pytest.mark.parametrize(("a", "b", "want"), [
    ("seq+16", "16*((seq)//16)+16", (0, 15)),  # a padded length's headroom
    ("16*((seq)//16)+16", "seq", (1, 16)),  # PegasusX: padded by 16 - seq % 16
    ("((n)//10)-1", "2*((n+10)//20)-2", (0, 1)),  # SEW: frames against their pooled-and-upsampled count
    ("((((n)//5)-1)//2)", "((n)//10)", (-1, 0)),  # nested divisions repeat with the product of the divisors
    ("seq", "seq", (0, 0)),
    (7, 3, (4, 4)),
])
def test_difference_range(a, b, want):
    assert difference_range(a, b) == want
    for v in range(0, 200):  # against the sizes themselves
        assert want[0] <= eval_dim(a, {"seq": v, "n": v}) - eval_dim(b, {"seq": v, "n": v}) <= want[1]


@pytest.mark.parametrize(("a", "b"), [("2*seq", "seq"), ("seq", "batch"), ("batch*seq", "seq"), ("seq", 4)])
def test_a_difference_that_grows_has_no_range(a, b):
    assert difference_range(a, b) is None
