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

from .harness import Build, Case, In, const, family_tests, op

X = In(("batch", "seq", 6))
POS = In(("batch", "seq", 6), kind="positive")

SMALL = In(("batch", "seq", 6), kind="small_int")
INT = In(("batch", "seq"), "int64", "small_int")
BOOL = In(("batch", "seq"), "bool", "bool")
_HALF = np.array(0.5, np.float32)


def chain(*steps: Op | tuple[Op, np.ndarray]) -> Build:
    """Ops applied in turn to the input ``x``; a step ``(op, array)`` takes the array as its second operand."""

    def build(g, x, rng):
        y = x["x"] if "x" in x else x["a"]
        for k, step in enumerate(steps):
            o, *rest = step if isinstance(step, tuple) else (step,)
            y = g.add(o, [y, *(g.const(f"c{k}", c) for c in rest)])
        return y

    return build


def _bool_scalars(g, x, rng):
    """``((a & True) | False) ^ True``."""
    t, f = g.const("t", np.array(True)), g.const("f", np.array(False))
    return g.add(Op.XOR, [g.add(Op.OR, [g.add(Op.AND, [x["a"], t]), f]), t])


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
    # ------------------------------------------------------------------ rounding, more float math (Core ATen)
    Case("ceil", {"x": X}, op(Op.CEIL, "x"), torch.ceil, capture=("ceil.default",)),
    Case("floor", {"x": X}, op(Op.FLOOR, "x"), torch.floor, capture=("floor.default",)),
    Case("round_halves_to_even", {"x": SMALL}, chain((Op.MUL, _HALF), Op.ROUND), lambda x: torch.round(x * 0.5),
         capture=("round.default",)),
    Case("trunc", {"x": X}, op(Op.TRUNC, "x"), torch.trunc, capture=("trunc.default",)),
    Case("erf", {"x": X}, op(Op.ERF, "x"), lambda x: torch.erf(x.double()).float(), capture=("erf.default",)),
    Case("expm1", {"x": X}, op(Op.EXPM1, "x"), lambda x: torch.expm1(x.double()).float(), capture=("expm1.default",)),
    Case("expm1_tiny", {"x": X}, chain((Op.MUL, np.array(1e-6, np.float32)), Op.EXPM1),
         lambda x: torch.expm1(x * 1e-6), tol=1e-12, capture=("expm1.default",)),
    Case("log1p", {"x": POS}, op(Op.LOG1P, "x"), lambda x: torch.log1p(x.double()).float(), capture=("log1p.default",)),
    Case("log1p_tiny", {"x": X}, chain((Op.MUL, np.array(1e-6, np.float32)), Op.LOG1P),
         lambda x: torch.log1p(x * 1e-6), tol=1e-12, capture=("log1p.default",)),
    Case("log2", {"x": POS}, op(Op.LOG2, "x"), torch.log2, capture=("log2.default",)),
    Case("log10", {"x": POS}, op(Op.LOG10, "x"), torch.log10, capture=("log10.default",)),
    *[
        Case(f"{o.value.lower()}_of_tanh", {"x": X}, chain(Op.TANH, o), lambda x, fn=fn: fn(torch.tanh(x)),
             capture=(f"{fn.__name__}.default",))
        for o, fn in [(Op.TAN, torch.tan), (Op.ACOS, torch.acos), (Op.ASIN, torch.asin), (Op.ATANH, torch.atanh)]
    ],
    *[
        Case(o.value.lower(), {"x": X}, op(o, "x"), fn, capture=(f"{fn.__name__}.default",))
        for o, fn in [(Op.ATAN, torch.atan), (Op.COSH, torch.cosh), (Op.SINH, torch.sinh), (Op.ASINH, torch.asinh)]
    ],
    Case("acosh", {"x": POS}, chain((Op.ADD, np.array(1.0, np.float32)), Op.ACOSH), lambda x: torch.acosh(x + 1),
         capture=("acosh.default",)),
    Case("atan2", {"a": In(("batch", "seq")), "b": In((1, "seq"))}, op(Op.ATAN2, "a", "b"), torch.atan2,
         capture=("atan2.default",)),
    # ------------------------------------------------------------------ min/max, clamp, activations
    Case("max", {"a": In(("batch", "seq")), "b": In(("seq",))}, op(Op.MAX, "a", "b"), torch.maximum,
         capture=("maximum.default",)),
    Case("min", {"a": In(("batch", "seq")), "b": In(("seq",))}, op(Op.MIN, "a", "b"), torch.minimum,
         capture=("minimum.default",)),
    Case("max_other_int", {"a": INT, "b": INT}, op(Op.MAX, "a", "b"), lambda a, b: torch.max(a, b), capture=("max.other",)),
    Case("min_other_int", {"a": INT, "b": INT}, op(Op.MIN, "a", "b"), lambda a, b: torch.min(a, b), capture=("min.other",)),
    Case("clamp", {"x": X}, chain((Op.MAX, np.array(-0.5, np.float32)), (Op.MIN, np.array(0.7, np.float32))),
         lambda x: torch.clamp(x, -0.5, 0.7), capture=("clamp.default",)),
    Case("clamp_tensor", {"x": In(("batch", "seq")), "lo": In(("seq",)), "hi": In((1, "seq"))},
         lambda g, x, rng: g.add(Op.MIN, [g.add(Op.MAX, [x["x"], x["lo"]]), x["hi"]]), torch.clamp,
         capture=("clamp.Tensor",)),
    Case("hardtanh", {"x": X}, chain((Op.MAX, np.array(-0.5, np.float32)), (Op.MIN, np.array(0.5, np.float32))),
         lambda x: F.hardtanh(x, -0.5, 0.5), capture=("hardtanh.default",)),
    Case("elu", {"x": X}, op(Op.ELU, "x", alpha=0.7), lambda x: F.elu(x.double(), 0.7).float(), capture=("elu.default",)),
    Case("leaky_relu", {"x": X}, op(Op.LEAKY_RELU, "x", alpha=0.2), lambda x: F.leaky_relu(x, 0.2),
         capture=("leaky_relu.default",)),
    Case("fill", {"x": X}, lambda g, x, rng: g.add(Op.ADD, [
        x["x"], g.add(Op.EXPAND, [g.const("v", np.array(2.5, np.float32))], {"shape": ("batch", "seq", 6)})]),
         lambda x: x + torch.fill(x, 2.5), capture=("fill.Scalar",)),
    # ------------------------------------------------------------------ fmod, remainder, div with a rounding mode
    Case("fmod", {"a": X, "b": In((1, "seq", 6), kind="nonzero_int")}, op(Op.FMOD, "a", "b"), torch.fmod,
         capture=("fmod.Tensor",)),
    Case("fmod_scalar", {"a": X}, op(Op.FMOD, "a", np.array(-0.75, np.float32)), lambda a: torch.fmod(a, -0.75),
         capture=("fmod.Scalar",)),
    Case("fmod_int", {"a": INT, "b": In((1, "seq"), "int64", "nonzero_int")}, op(Op.FMOD, "a", "b"), torch.fmod),
    Case("remainder", {"a": X, "b": In((1, "seq", 6), kind="nonzero_int")}, op(Op.REMAINDER, "a", "b"), torch.remainder,
         capture=("remainder.Tensor",)),
    Case("remainder_scalar", {"a": X}, op(Op.REMAINDER, "a", np.array(-0.75, np.float32)), lambda a: a % -0.75,
         capture=("remainder.Scalar",)),
    Case("remainder_int", {"a": INT, "b": In((1, "seq"), "int64", "nonzero_int")}, op(Op.REMAINDER, "a", "b"),
         torch.remainder),
    Case("div_floor", {"a": X, "b": In((1, "seq", 6), kind="nonzero_int")},
         lambda g, x, rng: g.add(Op.FLOOR, [g.add(Op.DIV, [x["a"], x["b"]])]),
         lambda a, b: torch.div(a, b, rounding_mode="floor"), capture=("div.Tensor_mode",)),
    Case("div_trunc_scalar", {"a": X}, chain((Op.DIV, np.array(0.75, np.float32)), Op.TRUNC),
         lambda a: torch.ops.aten.div.Scalar_mode(a, 0.75, rounding_mode="trunc"), capture=("div.Scalar_mode",)),
    Case("div_floor_int", {"a": INT, "b": In((1, "seq"), "int64", "nonzero_int")},
         lambda g, x, rng: g.add(Op.DIV, [g.add(Op.SUB, [x["a"], g.add(Op.REMAINDER, [x["a"], x["b"]])]), x["b"]]),
         lambda a, b: torch.div(a, b, rounding_mode="floor"), capture=("div.Tensor_mode",)),
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
    Case("xor", {"a": In(("batch", 1), "bool", "bool"), "b": In(("seq",), "bool", "bool")}, op(Op.XOR, "a", "b"),
         torch.logical_xor, capture=("logical_xor.default",)),
    Case("xor_bitwise", {"a": BOOL, "b": BOOL}, lambda g, x, rng: g.add(Op.XOR, [x["a"], g.add(Op.XOR, [x["a"], x["b"]])]),
         lambda a, b: a ^ torch.bitwise_xor(a, b), capture=("bitwise_xor.Tensor", "__xor__.Tensor")),
    Case("bitwise_bool_scalars", {"a": BOOL}, _bool_scalars,
         lambda a: torch.bitwise_xor(torch.bitwise_or(torch.bitwise_and(a, True), False), True),
         capture=("bitwise_and.Scalar", "bitwise_or.Scalar", "bitwise_xor.Scalar")),
    Case("bool_scalar_operators", {"a": BOOL}, _bool_scalars, lambda a: ((a & True) | False) ^ True,
         capture=("__and__.Scalar", "__or__.Scalar", "__xor__.Scalar")),
    # integer bits (Qwen4-Exp's n-gram hashes): two's complement, negative values included
    Case("bitwise_int", {"a": In(("batch", "seq"), "int64", "small_int"), "b": In((1, "seq"), "int64", "small_int")},
         lambda g, x, rng: g.add(Op.BITWISE_XOR, [x["a"], g.add(Op.BITWISE_OR, [g.add(Op.BITWISE_AND, [x["a"], x["b"]]),
                                                                             g.add(Op.BITWISE_NOT, [x["b"]])])]),
         lambda a, b: torch.bitwise_xor(a, torch.bitwise_or(torch.bitwise_and(a, b), torch.bitwise_not(b))),
         capture=("bitwise_xor.Tensor", "bitwise_or.Tensor", "bitwise_and.Tensor", "bitwise_not.default")),
    Case("bitwise_int_scalars", {"a": In(("batch", "seq"), "int64", "small_int")},
         lambda g, x, rng: g.add(Op.BITWISE_XOR, [g.add(Op.BITWISE_OR, [
             g.add(Op.BITWISE_AND, [x["a"], g.const("six", np.array(6, np.int64))]),
             g.const("one", np.array(1, np.int64))]), g.const("three", np.array(3, np.int64))]),
         lambda a: torch.bitwise_xor(torch.bitwise_or(torch.bitwise_and(a, 6), 1), 3),
         capture=("bitwise_and.Scalar", "bitwise_or.Scalar", "bitwise_xor.Scalar")),
    Case("isinf", {"x": X}, chain((Op.MUL, np.array(100.0, np.float32)), Op.EXP, Op.IS_INF),
         lambda x: torch.isinf(torch.exp(x * 100.0)), capture=("isinf.default",)),
    Case("isnan", {"x": X}, chain(Op.SQRT, Op.IS_NAN), lambda x: torch.isnan(torch.sqrt(x)), capture=("isnan.default",)),
    Case("where", {"c": In(("batch", "seq"), "bool", "bool"), "a": In(("batch", "seq"))},
         lambda g, x, rng: g.add(Op.WHERE, [x["c"], x["a"], g.const("m", np.array(-1e9, np.float32))]),
         lambda c, a: torch.where(c, a, torch.tensor(-1e9))),
    Case("where_int", {"c": In(("seq",), "bool", "bool"), "a": In(("batch", "seq"), "int64", "small_int")},
         lambda g, x, rng: g.add(Op.WHERE, [x["c"], g.const("z", np.array(7, np.int64)), x["a"]]),
         lambda c, a: torch.where(c, torch.tensor(7), a)),
    # bool branches (a tril of a bool mask): ONNX Runtime's Where takes none, the lowering spells it with And/Or
    Case("where_bool", {"c": In(("seq",), "bool", "bool"), "a": In(("batch", "seq"), "bool", "bool"),
                        "b": In(("batch", "seq"), "bool", "bool")},
         lambda g, x, rng: g.add(Op.WHERE, [x["c"], x["a"], x["b"]]), lambda c, a, b: torch.where(c, a, b)),
    *[
        Case(f"cast_{src}_{dst}", {"x": In(("batch", "seq"), src, kind)}, op(Op.CAST, "x", to=dst),
             lambda x, dst=dst: x.to(getattr(torch, dst)), tol=1e-3 if dst == "float16" else 1e-5)
        for src, dst, kind in [("float32", "int64", "normal"), ("int64", "float32", "small_int"), ("float32", "bool", "small_int"),
                               ("bool", "float32", "bool"), ("float32", "float16", "normal"), ("int64", "int32", "small_int"),
                               ("bool", "int64", "bool"), ("float32", "float64", "normal")]
    ],
]


test_reference_matches_torch, test_backend_matches_reference = family_tests(CASES)
