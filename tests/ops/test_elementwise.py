"""The elementwise family (:mod:`flora_graph.ops.elementwise`): arithmetic, activations, float
math, comparisons, logic, ``Where``, ``Cast``.

Numpy reference against torch, then every backend against the reference; see
:mod:`tests.ops.harness`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from flora_graph.ir import Op

from .harness import Case, In, const, family_tests, op

X = In(("batch", "seq", 6))
POS = In(("batch", "seq", 6), kind="positive")

_C4, _C31 = const(11, 4), const(12, 3, 1)
_DIVISORS = np.array([0.5, 2.0, 4.0], np.float32)

CASES = [
    # ------------------------------------------------------------------ arithmetic (broadcasting)
    Case("add_broadcast_const", {"a": In(("batch", "seq", 4))}, op(Op.ADD, "a", _C4), lambda a: a + torch.from_numpy(_C4)),
    Case("add_broadcast_inputs", {"a": In(("batch", "seq", 4)), "b": In(("batch", 1, 4))}, op(Op.ADD, "a", "b"), torch.add),
    Case("add_int", {"a": In(("batch", "seq"), "int64", "small_int"), "b": In((1, "seq"), "int64", "small_int")},
         op(Op.ADD, "a", "b"), torch.add),
    Case("sub_const", {"a": In(("batch", 3, 4))}, op(Op.SUB, "a", _C31), lambda a: a - torch.from_numpy(_C31)),
    Case("sub_inputs", {"a": In(("batch", "seq")), "b": In(("seq",))}, op(Op.SUB, "a", "b"), torch.sub),
    Case("mul_scalar", {"a": In(("batch", "seq", 4))}, op(Op.MUL, "a", np.array(0.5, np.float32)), lambda a: a * 0.5),
    Case("mul_inputs", {"a": In(("batch", "seq", 1)), "b": In(("seq", 4))}, op(Op.MUL, "a", "b"), torch.mul),
    Case("mul_int32", {"a": In(("batch", "seq"), "int32", "small_int"), "b": In(("batch", 1), "int32", "small_int")},
         op(Op.MUL, "a", "b"), torch.mul),
    Case("div_inputs", {"a": In(("batch", "seq", 4)), "b": In(("batch", "seq", 1), kind="positive")}, op(Op.DIV, "a", "b"),
         torch.div),
    Case("div_const", {"a": In(("batch", 3))}, op(Op.DIV, "a", _DIVISORS), lambda a: a / torch.from_numpy(_DIVISORS)),
    *[
        Case(f"div_{dt}_truncates", {"a": In(("batch", "seq"), dt, "small_int"), "b": In((1, "seq"), dt, "nonzero_int")},
             op(Op.DIV, "a", "b"), lambda a, b: torch.div(a, b, rounding_mode="trunc"))
        for dt in ("int64", "int32")
    ],
    # ------------------------------------------------------------------ activations
    Case("neg", {"x": X}, op(Op.NEG, "x"), torch.neg),
    Case("neg_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.NEG, "x"), torch.neg),
    Case("relu", {"x": X}, op(Op.RELU, "x"), torch.relu),
    Case("gelu_exact", {"x": X}, op(Op.GELU, "x"), lambda x: F.gelu(x.double()).float()),
    Case("gelu_tanh", {"x": X}, op(Op.GELU, "x", approximate="tanh"), lambda x: F.gelu(x.double(), approximate="tanh").float()),
    Case("silu", {"x": X}, op(Op.SILU, "x"), lambda x: F.silu(x.double()).float()),
    Case("sigmoid", {"x": X}, op(Op.SIGMOID, "x"), lambda x: torch.sigmoid(x.double()).float()),
    Case("tanh", {"x": X}, op(Op.TANH, "x"), lambda x: torch.tanh(x.double()).float()),
    Case("identity", {"x": X}, op(Op.IDENTITY, "x"), lambda x: x),
    Case("identity_bool", {"x": In(("batch", "seq"), "bool", "bool")}, op(Op.IDENTITY, "x"), lambda x: x),
    # ------------------------------------------------------------------ float math, comparisons, logic, Where, Cast
    Case("exp", {"x": X}, op(Op.EXP, "x"), torch.exp),
    Case("log", {"x": POS}, op(Op.LOG, "x"), torch.log),
    Case("sqrt", {"x": POS}, op(Op.SQRT, "x"), torch.sqrt),
    Case("rsqrt", {"x": POS}, op(Op.RSQRT, "x"), torch.rsqrt),
    Case("reciprocal", {"x": POS}, op(Op.RECIPROCAL, "x"), torch.reciprocal),
    Case("cos", {"x": X}, op(Op.COS, "x"), torch.cos),
    Case("sin", {"x": X}, op(Op.SIN, "x"), torch.sin),
    Case("abs", {"x": X}, op(Op.ABS, "x"), torch.abs),
    Case("abs_int", {"x": In(("batch", "seq"), "int64", "small_int")}, op(Op.ABS, "x"), torch.abs),
    Case("sign", {"x": In(("batch", "seq", 6), kind="small_int")}, op(Op.SIGN, "x"), torch.sign, capture=("sign.default",)),
    Case("pow_scalar", {"x": X}, lambda g, x, rng: g.add(Op.POW, [x["x"], g.const("e", np.array(2.0, np.float32))]),
         lambda x: x**2),
    Case("pow_tensors", {"x": POS, "e": In(("seq", 1))}, op(Op.POW, "x", "e"), torch.pow),
    *[
        Case(f"{o.value.lower()}_{kind}", {"a": In(("batch", "seq"), dt, kind), "b": In((1, "seq"), dt, kind)}, op(o, "a", "b"), fn)
        for o, fn in [(Op.EQUAL, torch.eq), (Op.LESS, torch.lt), (Op.LESS_OR_EQUAL, torch.le), (Op.GREATER, torch.gt),
                      (Op.GREATER_OR_EQUAL, torch.ge)]
        for dt, kind in [("int64", "small_int"), ("float32", "normal")]
    ],
    Case("not", {"a": In(("batch", "seq"), "bool", "bool")}, op(Op.NOT, "a"), torch.logical_not),
    Case("and", {"a": In(("batch", "seq"), "bool", "bool"), "b": In(("seq",), "bool", "bool")}, op(Op.AND, "a", "b"),
         torch.logical_and),
    Case("or", {"a": In(("batch", 1), "bool", "bool"), "b": In(("seq",), "bool", "bool")}, op(Op.OR, "a", "b"),
         torch.logical_or),
    Case("where", {"c": In(("batch", "seq"), "bool", "bool"), "a": In(("batch", "seq"))},
         lambda g, x, rng: g.add(Op.WHERE, [x["c"], x["a"], g.const("m", np.array(-1e9, np.float32))]),
         lambda c, a: torch.where(c, a, torch.tensor(-1e9))),
    Case("where_int", {"c": In(("seq",), "bool", "bool"), "a": In(("batch", "seq"), "int64", "small_int")},
         lambda g, x, rng: g.add(Op.WHERE, [x["c"], g.const("z", np.array(7, np.int64)), x["a"]]),
         lambda c, a: torch.where(c, torch.tensor(7), a)),
    *[
        Case(f"cast_{src}_{dst}", {"x": In(("batch", "seq"), src, kind)}, op(Op.CAST, "x", to=dst),
             lambda x, dst=dst: x.to(getattr(torch, dst)), tol=1e-3 if dst == "float16" else 1e-5)
        for src, dst, kind in [("float32", "int64", "normal"), ("int64", "float32", "small_int"), ("float32", "bool", "small_int"),
                               ("bool", "float32", "bool"), ("float32", "float16", "normal"), ("int64", "int32", "small_int"),
                               ("bool", "int64", "bool"), ("float32", "float64", "normal")]
    ],
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
