"""Elementwise ops: arithmetic, activations, float math, comparisons, logic, ``Where``, ``Cast``.

* binary arithmetic (broadcasting): ``Add``, ``Sub``, ``Mul``, ``Div``, ``Pow``;
* unary activations: ``Neg``, ``Relu``, ``Gelu``, ``Silu``, ``Sigmoid``, ``Tanh``, ``Elu``, ``LeakyRelu``, ``Identity``;
* unary float math: ``Exp``, ``Log``, ``Sqrt``, ``Rsqrt``, ``Reciprocal``, ``Cos``, ``Sin``, ``Abs``, ``Sign``,
  rounding (``Ceil``, ``Floor``, ``Round``, ``Trunc``), ``Erf``, ``Expm1``, ``Log1p``, ``Log2``, ``Log10``,
  trigonometric and hyperbolic functions and their inverses;
* binary ``Max``, ``Min``, ``Atan2``, ``Fmod``, ``Remainder``; activations ``Elu``, ``LeakyRelu``;
* comparisons (broadcasting, result bool): ``Equal``, ``Less``, ``LessOrEqual``, ``Greater``,
  ``GreaterOrEqual``;
* boolean logic: ``Not``, ``And``, ``Or``, ``Xor``; integer bits: ``BitwiseNot``, ``BitwiseAnd``, ``BitwiseOr``,
  ``BitwiseXor``; float tests ``IsInf``, ``IsNaN``;
* ``Where`` (``cond ? a : b``) and ``Cast``.

Each op is declared once with :func:`~flora_graph.ops.registry.define`: schema, shape rule,
numpy semantics, ONNX rule and torch rule side by side. The one-liners are declared from
tables; the ops with more to say have their own rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from flora_graph.errors import ShapeError
from flora_graph.ir.node import ComputationNode
from flora_graph.ir.ops import DTYPES, AttrSpec
from flora_graph.ir.shapes import broadcast_shapes
from flora_graph.ops._infer import binary, same_dtype, unary
from flora_graph.ops._onnx import ONNX_DTYPES, simple
from flora_graph.ops._torch import call, float_literal, float_math, torch_dtype
from flora_graph.ops.registry import define

__all__: list[str] = []


def _float64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) if x.dtype.kind in "fV" else x


def _quiet(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` without numpy's warnings: log(0) is -inf and sqrt(-1) NaN, as in torch and ONNX."""

    def impl(x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return fn(x)

    return impl


# --------------------------------------------------------------------------- binary arithmetic
def _numpy_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":  # integer division truncates toward zero (C, ONNX Runtime)
        q = a // b
        return q + ((a % b != 0) & ((a < 0) != (b < 0)))
    return a / b


def _torch_div(node: ComputationNode, args: list[str]) -> str:
    if node.dtype.startswith(("int", "uint")):  # integer division truncates toward zero, as in the reference
        return f'torch.div({args[0]}, {args[1]}, rounding_mode="trunc")'
    return f"torch.div({args[0]}, {args[1]})"


def _numpy_pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.power(a, b)


def _logical_for_bool(op_type: str, logical: str | None) -> Any:
    """ONNX ``op_type``, or ``logical`` where the node is bool (ONNX's ``Add`` and ``Mul`` take no bool; torch's bool
    ``a + b`` is ``or`` and ``a * b`` is ``and``, as numpy's are: Mask2Former multiplies masks)."""
    plain = simple(op_type)
    if logical is None:
        return plain

    def lower(ctx: Any, node: ComputationNode, out: str) -> None:
        if node.dtype == "bool":
            ctx.emit(logical, ctx.args(node), [out])
        else:
            plain(ctx, node, out)

    lower.__doc__ = f"Lowers to ONNX ``{op_type}`` (``{logical}`` of bools)."
    return lower


for _name, _value, _doc, _numpy, _torch, _groups, _logical in (
    ("ADD", "Add", "a + b", np.add, call("torch.add"), ("Binary", "Commutative"), "Or"),
    ("SUB", "Sub", "a - b", np.subtract, call("torch.sub"), ("Binary",), None),
    ("MUL", "Mul", "a * b", np.multiply, call("torch.mul"), ("Binary", "Commutative"), "And"),
    ("DIV", "Div", "a / b", _numpy_div, _torch_div, ("Binary",), None),
):
    define(
        _name, _value, (2, 2),
        infer=binary, doc=f"{_doc}, broadcasting.",
        numpy=_numpy, onnx=_logical_for_bool(_value, _logical), torch=_torch, groups=_groups,
    )


# --------------------------------------------------------------------------- activations
def _numpy_sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


def _numpy_gelu(x: np.ndarray, *, approximate: str) -> np.ndarray:
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))
    else:
        from scipy.special import erf  # imported here: `import flora_graph` does not import scipy

        y = 0.5 * x64 * (1.0 + erf(x64 / math.sqrt(2.0)))
    return y.astype(x.dtype)


def _onnx_gelu(ctx: Any, node: ComputationNode, out: str) -> None:
    """Native ``Gelu`` from opset 20; before it the ``Erf``/``Tanh`` formula."""
    x, approximate = ctx.arg(node, 0), node.attrs["approximate"]
    if ctx.opset >= 20:
        ctx.emit("Gelu", [x], [out], approximate=approximate)
        return
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = ctx.emit("Mul", [ctx.emit("Mul", [x, x]), x])
        inner = ctx.emit("Add", [x, ctx.emit("Mul", [cube, ctx.scalar(0.044715)])])
        t = ctx.emit("Tanh", [ctx.emit("Mul", [inner, ctx.scalar(math.sqrt(2.0 / math.pi))])])
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        t = ctx.emit("Erf", [ctx.emit("Mul", [x, ctx.scalar(1.0 / math.sqrt(2.0))])])
    half_x = ctx.emit("Mul", [x, ctx.scalar(0.5)])
    ctx.emit("Mul", [half_x, ctx.emit("Add", [t, ctx.scalar(1.0)])], [out])


def _torch_gelu(node: ComputationNode, args: list[str]) -> str:
    return f"F.gelu({args[0]}, approximate={node.attrs['approximate']!r})"


def _onnx_silu(ctx: Any, node: ComputationNode, out: str) -> None:
    """``x * Sigmoid(x)``."""
    x = ctx.arg(node, 0)
    ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x])], [out])


define(
    "NEG", "Neg", (1, 1),
    infer=unary, doc="-x.",
    numpy=np.negative, onnx=simple("Neg"), torch=call("torch.neg"), groups=("Unary",),
)
define(
    "RELU", "Relu", (1, 1),
    infer=unary, doc="max(x, 0).",
    numpy=lambda x: np.maximum(x, 0), onnx=simple("Relu"), torch=call("torch.relu"), groups=("Unary",),
)
define(
    "GELU", "Gelu", (1, 1),
    {"approximate": AttrSpec("str", "none", choices=("none", "tanh"))},
    infer=unary, doc="GELU, exact (erf) or tanh approximation.",
    numpy=_numpy_gelu, onnx=_onnx_gelu, torch=_torch_gelu, groups=("Unary",),
)
define(
    "SILU", "Silu", (1, 1),
    infer=unary, doc="x * sigmoid(x).",
    numpy=lambda x: x * _numpy_sigmoid(x), onnx=_onnx_silu, torch=call("F.silu"), groups=("Unary",),
)
define(
    "SIGMOID", "Sigmoid", (1, 1),
    infer=unary, doc="1 / (1 + exp(-x)).",
    numpy=_numpy_sigmoid, onnx=simple("Sigmoid"), torch=call("torch.sigmoid"), groups=("Unary",),
)
define(
    "TANH", "Tanh", (1, 1),
    infer=unary, doc="tanh(x).",
    numpy=np.tanh, onnx=simple("Tanh"), torch=call("torch.tanh"), groups=("Unary",),
)
def _numpy_elu(x: np.ndarray, *, alpha: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(x > 0, x, alpha * np.expm1(x)).astype(x.dtype)


define(
    "ELU", "Elu", (1, 1),
    {"alpha": AttrSpec("float", 1.0)},
    infer=unary, doc="x > 0 ? x : alpha * (exp(x) - 1).",
    numpy=_numpy_elu, onnx=simple("Elu", alpha="alpha"),
    torch=lambda node, args: f"F.elu({args[0]}, alpha={float_literal(node.attrs['alpha'])})", groups=("Unary",),
)
define(
    "LEAKY_RELU", "LeakyRelu", (1, 1),
    {"alpha": AttrSpec("float", 0.01)},
    infer=unary, doc="x > 0 ? x : alpha * x.",
    numpy=lambda x, *, alpha: np.where(x > 0, x, x * alpha).astype(x.dtype), onnx=simple("LeakyRelu", alpha="alpha"),
    torch=lambda node, args: f"F.leaky_relu({args[0]}, {float_literal(node.attrs['alpha'])})", groups=("Unary",),
)
define(
    "IDENTITY", "Identity", (1, 1),
    infer=unary, doc="x.",
    numpy=lambda x: x, onnx=simple("Identity"), torch=lambda node, args: args[0], groups=("Unary",),
)


# --------------------------------------------------------------------------- float math
def _onnx_rsqrt(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Reciprocal(Sqrt(x))``."""
    ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.arg(node, 0)])], [out])


def _onnx_trunc(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Where(x < 0, Ceil(x), Floor(x))`` (ONNX has no ``Trunc``)."""
    x = ctx.arg(node, 0)
    neg = ctx.emit("Less", [x, ctx.scalar(0.0)])
    ctx.emit("Where", [neg, ctx.emit("Ceil", [x]), ctx.emit("Floor", [x])], [out])


def _onnx_expm1(ctx: Any, node: ComputationNode, out: str) -> None:
    """Kahan's ``u = Exp(x)``, ``u == 1 ? x : (u - 1) * x / Log(u)`` for ``|x| < 1``, else ``u - 1``
    (ONNX has no ``Expm1``; ``Exp(x) - 1`` alone loses the digits of a small ``x``)."""
    x = ctx.arg(node, 0)
    u = ctx.emit("Exp", [x])
    um1 = ctx.emit("Sub", [u, ctx.scalar(1.0)])
    ratio = ctx.emit("Div", [ctx.emit("Mul", [um1, x]), ctx.emit("Log", [u])])
    small = ctx.emit("Where", [ctx.emit("Equal", [u, ctx.scalar(1.0)]), x, ratio])
    near = ctx.emit("Less", [ctx.emit("Abs", [x]), ctx.scalar(1.0)])
    ctx.emit("Where", [near, small, um1], [out])


def _onnx_log1p(ctx: Any, node: ComputationNode, out: str) -> None:
    """Kahan's ``u = 1 + x``, ``u == 1 ? x : Log(u) * x / (u - 1)`` for ``u <= 2``, else ``Log(u)``
    (ONNX has no ``Log1p``; ``Log(1 + x)`` alone loses the digits of a small ``x``)."""
    x = ctx.arg(node, 0)
    u = ctx.emit("Add", [x, ctx.scalar(1.0)])
    log_u = ctx.emit("Log", [u])
    ratio = ctx.emit("Mul", [log_u, ctx.emit("Div", [x, ctx.emit("Sub", [u, ctx.scalar(1.0)])])])
    small = ctx.emit("Where", [ctx.emit("Equal", [u, ctx.scalar(1.0)]), x, ratio])
    ctx.emit("Where", [ctx.emit("Greater", [u, ctx.scalar(2.0)]), log_u, small], [out])


def _onnx_log_base(base: float):
    def lower(ctx: Any, node: ComputationNode, out: str) -> None:
        ctx.emit("Mul", [ctx.emit("Log", [ctx.arg(node, 0)]), ctx.scalar(1.0 / math.log(base))], [out])

    lower.__doc__ = f"``Log(x) * (1 / ln {base:g})`` (ONNX has no log to base {base:g})."
    return lower


def _numpy_erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf  # imported here: `import flora_graph` does not import scipy

    return erf(x)


for _name, _value, _doc, _numpy, _onnx, _torch in (
    ("EXP", "Exp", "exp(x).", _quiet(np.exp), simple("Exp"), float_math("torch.exp")),
    ("LOG", "Log", "log(x).", _quiet(np.log), simple("Log"), float_math("torch.log")),
    ("SQRT", "Sqrt", "sqrt(x).", _quiet(np.sqrt), simple("Sqrt"), float_math("torch.sqrt")),
    ("RSQRT", "Rsqrt", "1 / sqrt(x).", _quiet(lambda x: 1.0 / np.sqrt(_float64(x))), _onnx_rsqrt,
     float_math("torch.rsqrt")),
    ("RECIPROCAL", "Reciprocal", "1 / x.", _quiet(lambda x: 1.0 / _float64(x)), simple("Reciprocal"),
     float_math("torch.reciprocal")),
    ("COS", "Cos", "cos(x).", np.cos, simple("Cos"), float_math("torch.cos")),
    ("SIN", "Sin", "sin(x).", np.sin, simple("Sin"), float_math("torch.sin")),
    ("ABS", "Abs", "|x|.", np.abs, simple("Abs"), call("torch.abs")),
    ("SIGN", "Sign", "sign(x): -1, 0 or 1, in x's dtype.", np.sign, simple("Sign"), call("torch.sign")),
    ("CEIL", "Ceil", "ceil(x).", np.ceil, simple("Ceil"), call("torch.ceil")),
    ("FLOOR", "Floor", "floor(x).", np.floor, simple("Floor"), call("torch.floor")),
    ("ROUND", "Round", "x rounded to the nearest integer, halves to even.", np.round, simple("Round"), call("torch.round")),
    ("TRUNC", "Trunc", "x rounded toward zero.", np.trunc, _onnx_trunc, call("torch.trunc")),
    ("ERF", "Erf", "erf(x).", _numpy_erf, simple("Erf"), float_math("torch.erf")),
    ("EXPM1", "Expm1", "exp(x) - 1, accurate near 0.", _quiet(np.expm1), _onnx_expm1, float_math("torch.expm1")),
    ("LOG1P", "Log1p", "log(1 + x), accurate near 0.", _quiet(np.log1p), _onnx_log1p, float_math("torch.log1p")),
    ("LOG2", "Log2", "log2(x).", _quiet(np.log2), _onnx_log_base(2.0), float_math("torch.log2")),
    ("LOG10", "Log10", "log10(x).", _quiet(np.log10), _onnx_log_base(10.0), float_math("torch.log10")),
    ("TAN", "Tan", "tan(x).", np.tan, simple("Tan"), float_math("torch.tan")),
    ("ACOS", "Acos", "acos(x).", _quiet(np.arccos), simple("Acos"), float_math("torch.acos")),
    ("ASIN", "Asin", "asin(x).", _quiet(np.arcsin), simple("Asin"), float_math("torch.asin")),
    ("ATAN", "Atan", "atan(x).", np.arctan, simple("Atan"), float_math("torch.atan")),
    ("COSH", "Cosh", "cosh(x).", _quiet(np.cosh), simple("Cosh"), float_math("torch.cosh")),
    ("SINH", "Sinh", "sinh(x).", _quiet(np.sinh), simple("Sinh"), float_math("torch.sinh")),
    ("ACOSH", "Acosh", "acosh(x).", _quiet(np.arccosh), simple("Acosh"), float_math("torch.acosh")),
    ("ASINH", "Asinh", "asinh(x).", np.arcsinh, simple("Asinh"), float_math("torch.asinh")),
    ("ATANH", "Atanh", "atanh(x).", _quiet(np.arctanh), simple("Atanh"), float_math("torch.atanh")),
):
    define(
        _name, _value, (1, 1),
        infer=unary, doc=_doc,
        numpy=_numpy, onnx=_onnx, torch=_torch, groups=("Unary",),
    )

define(
    "POW", "Pow", (2, 2),
    infer=binary, doc="a ** b, broadcasting.",
    numpy=_numpy_pow, onnx=simple("Pow"), torch=call("torch.pow"), groups=("Binary",),
)


def _onnx_atan2(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Atan(y / x)`` moved to its quadrant: ``+-pi`` where ``x < 0``, ``Sign(y) * pi / 2`` where ``x == 0``
    (ONNX has no ``Atan2``; unlike ``atan2``, ``y = -0`` with ``x <= 0`` and two infinities are not special)."""
    y, x = ctx.args(node)
    a = ctx.emit("Atan", [ctx.emit("Div", [y, x])])
    pi = ctx.scalar(math.pi)
    left = ctx.emit("Where", [ctx.emit("Less", [y, ctx.scalar(0.0)]), ctx.emit("Sub", [a, pi]), ctx.emit("Add", [a, pi])])
    axis = ctx.emit("Mul", [ctx.emit("Sign", [y]), ctx.scalar(math.pi / 2)])
    rest = ctx.emit("Where", [ctx.emit("Less", [x, ctx.scalar(0.0)]), left, a])
    ctx.emit("Where", [ctx.emit("Equal", [x, ctx.scalar(0.0)]), axis, rest], [out])


def _numpy_remainder(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.remainder(a, b)


def _numpy_fmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.fmod(a, b)


def _onnx_fmod(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Mod(fmod=1)``: C's fmod, for integers and floats."""
    ctx.emit("Mod", ctx.args(node), [out], fmod=1)


def _onnx_remainder(ctx: Any, node: ComputationNode, out: str) -> None:
    """Integers: ``Mod(fmod=0)``; floats (where ONNX allows only ``fmod=1``): ``r = Mod(a, b, fmod=1)``,
    plus ``b`` where ``r != 0`` and the signs of ``r`` and ``b`` differ."""
    a, b = ctx.args(node)
    if not node.dtype.startswith(("float", "bfloat")):
        ctx.emit("Mod", [a, b], [out], fmod=0)
        return
    r = ctx.emit("Mod", [a, b], fmod=1)
    zero = ctx.scalar(0.0)
    signs_differ = ctx.emit("Xor", [ctx.emit("Less", [r, zero]), ctx.emit("Less", [b, zero])])
    fix = ctx.emit("And", [ctx.emit("Not", [ctx.emit("Equal", [r, zero])]), signs_differ])
    ctx.emit("Where", [fix, ctx.emit("Add", [r, b]), r], [out])


for _name, _value, _doc, _numpy, _onnx, _torch, _groups in (
    ("MAX", "Max", "max(a, b) (NaN propagates)", np.maximum, simple("Max"), call("torch.maximum"), ("Binary", "Commutative")),
    ("MIN", "Min", "min(a, b) (NaN propagates)", np.minimum, simple("Min"), call("torch.minimum"), ("Binary", "Commutative")),
    ("ATAN2", "Atan2", "atan2(a, b): the angle of the point (b, a)", np.arctan2, _onnx_atan2, call("torch.atan2"),
     ("Binary",)),
    ("FMOD", "Fmod", "a - b * trunc(a / b): the remainder with a's sign (C fmod)", _numpy_fmod, _onnx_fmod,
     call("torch.fmod"), ("Binary",)),
    ("REMAINDER", "Remainder", "a - b * floor(a / b): the remainder with b's sign (Python %)", _numpy_remainder,
     _onnx_remainder, call("torch.remainder"), ("Binary",)),
):
    define(
        _name, _value, (2, 2),
        infer=binary, doc=f"{_doc}, broadcasting.",
        numpy=_numpy, onnx=_onnx, torch=_torch, groups=_groups,
    )


# --------------------------------------------------------------------------- comparisons, logic
def _infer_compare(shapes, dtypes, attrs):
    """Broadcasting comparison of two values of one dtype; the result is bool."""
    same_dtype(dtypes, "comparison")
    return broadcast_shapes(shapes[0], shapes[1]), "bool"


def _infer_logical(shapes, dtypes, attrs):
    """Broadcasting ``And``/``Or`` of bool values."""
    if any(d != "bool" for d in dtypes):
        raise ShapeError(f"logical ops take bool inputs, got {list(dtypes)}")
    return broadcast_shapes(shapes[0], shapes[1]), "bool"


def _infer_logical_not(shapes, dtypes, attrs):
    if dtypes[0] != "bool":
        raise ShapeError(f"Not takes a bool input, got {dtypes[0]}")
    return tuple(shapes[0]), "bool"


for _name, _value, _doc, _numpy, _torch in (
    ("EQUAL", "Equal", "a == b", np.equal, "torch.eq"),
    ("LESS", "Less", "a < b", np.less, "torch.lt"),
    ("LESS_OR_EQUAL", "LessOrEqual", "a <= b", np.less_equal, "torch.le"),
    ("GREATER", "Greater", "a > b", np.greater, "torch.gt"),
    ("GREATER_OR_EQUAL", "GreaterOrEqual", "a >= b", np.greater_equal, "torch.ge"),
):
    define(
        _name, _value, (2, 2),
        infer=_infer_compare, doc=f"{_doc}, broadcasting; the result is bool.",
        numpy=_numpy, onnx=simple(_value), torch=call(_torch), groups=("Compare",),
    )

define(
    "NOT", "Not", (1, 1),
    infer=_infer_logical_not, doc="Logical not of a bool value.",
    numpy=np.logical_not, onnx=simple("Not"), torch=call("torch.logical_not"), groups=("Logical",),
)
def _infer_bitwise(shapes, dtypes, attrs):
    """Broadcasting ``BitwiseAnd``/``Or``/``Xor`` of integers of one dtype; ``BitwiseNot`` of one."""
    dtype = same_dtype(dtypes, "bitwise op")
    if not dtype.startswith(("int", "uint")):
        raise ShapeError(f"bitwise ops take integer inputs, got {list(dtypes)}")
    return (broadcast_shapes(shapes[0], shapes[1]) if len(shapes) == 2 else tuple(shapes[0])), dtype


define(
    "BITWISE_NOT", "BitwiseNot", (1, 1),
    infer=_infer_bitwise, doc="Bitwise not of an integer value (its two's complement bits).",
    numpy=np.bitwise_not, onnx=simple("BitwiseNot"), torch=call("torch.bitwise_not"),
)
for _name, _value, _doc, _numpy, _torch, _infer, _groups in (
    ("AND", "And", "Logical and of bool values", np.logical_and, "torch.logical_and", _infer_logical, ("Logical",)),
    ("OR", "Or", "Logical or of bool values", np.logical_or, "torch.logical_or", _infer_logical, ("Logical",)),
    ("XOR", "Xor", "Logical exclusive or of bool values", np.logical_xor, "torch.logical_xor", _infer_logical,
     ("Logical",)),
    ("BITWISE_AND", "BitwiseAnd", "Bitwise and of integer values of one dtype", np.bitwise_and, "torch.bitwise_and",
     _infer_bitwise, ()),
    ("BITWISE_OR", "BitwiseOr", "Bitwise or of integer values of one dtype", np.bitwise_or, "torch.bitwise_or",
     _infer_bitwise, ()),
    ("BITWISE_XOR", "BitwiseXor", "Bitwise exclusive or of integer values of one dtype", np.bitwise_xor,
     "torch.bitwise_xor", _infer_bitwise, ()),
):
    define(
        _name, _value, (2, 2),
        infer=_infer, doc=f"{_doc}, broadcasting.",
        numpy=_numpy, onnx=simple(_value), torch=call(_torch), groups=_groups,
    )


def _infer_float_test(shapes, dtypes, attrs):
    if not dtypes[0].startswith(("float", "bfloat")):
        raise ShapeError(f"IsInf/IsNaN take a float input, got {dtypes[0]}")
    return tuple(shapes[0]), "bool"


for _name, _value, _doc, _numpy, _torch in (
    ("IS_INF", "IsInf", "x is +inf or -inf", np.isinf, "torch.isinf"),
    ("IS_NAN", "IsNaN", "x is NaN", np.isnan, "torch.isnan"),
):
    define(
        _name, _value, (1, 1),
        infer=_infer_float_test, doc=f"{_doc}: a bool of x's shape (x float).",
        numpy=_numpy, onnx=simple(_value), torch=call(_torch),
    )


# --------------------------------------------------------------------------- Where
def _infer_where(shapes, dtypes, attrs):
    """``Where(cond, a, b)``: cond is bool, a and b share a dtype; all three broadcast."""
    if dtypes[0] != "bool":
        raise ShapeError(f"Where: the condition must be bool, got {dtypes[0]}")
    return broadcast_shapes(*shapes), same_dtype(dtypes[1:], "Where branches")


def _onnx_where(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Where``; of bool branches ``(c and a) or (not c and b)``: ONNX Runtime's CPU ``Where`` takes no bools
    (a chunked scan's ``tril`` of a bool mask)."""
    c, a, b = (ctx.arg(node, i) for i in range(3))
    if node.inputs[1].dtype != "bool":
        ctx.emit("Where", [c, a, b], [out])
        return
    ctx.emit("Or", [ctx.emit("And", [c, a]), ctx.emit("And", [ctx.emit("Not", [c]), b])], [out])


define(
    "WHERE", "Where", (3, 3),
    infer=_infer_where, doc="cond ? a : b, broadcasting all three.",
    numpy=np.where, onnx=_onnx_where, torch=call("torch.where"),
)


# --------------------------------------------------------------------------- Cast
def _infer_cast(shapes, dtypes, attrs):
    return tuple(shapes[0]), attrs["to"]


def _onnx_cast(ctx: Any, node: ComputationNode, out: str) -> None:
    """``Cast`` to the compute dtype (float32 for a widened 16-bit target; the caller casts on)."""
    ctx.emit("Cast", [ctx.arg(node, 0)], [out], to=ONNX_DTYPES[ctx.dtype])


define(
    "CAST", "Cast", (1, 1),
    {"to": AttrSpec("str", required=True, choices=DTYPES)},
    infer=_infer_cast, doc="Convert to dtype `to` (float -> int truncates toward zero, nonzero -> True).",
    numpy=lambda x, *, to: x,  # eval_node casts every result to the node's dtype, which is `to`
    onnx=_onnx_cast, torch=lambda node, args: f"{args[0]}.to({torch_dtype(node.attrs['to'])})",
)

del _name, _value, _doc, _numpy, _onnx, _torch, _groups
