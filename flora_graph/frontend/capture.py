"""``capture(model, example_inputs)``: a PyTorch model as a flora_graph ``Graph``.

Built on ``torch.export`` (no home-made tracer): the exported ATen graph is walked once and
each node converted through :data:`~flora_graph.frontend.aten.ATEN_TABLE`. Dims named
in ``dynamic_dims`` stay symbolic; ``dim_max`` bounds them from above where the model needs
it (a learned position table sliced by the sequence length) and is kept as ``Graph.dim_max``.
Adapters (any :class:`LoRAAdapter` in the model) come out as the pattern
:meth:`LoRAAdapter.export_graph` produces, with the same names and tags, found through the
``nn_module_stack`` metadata torch.export records. While tracing, each plain LoRA Linear
site (ours or PEFT's) calls one custom op (:mod:`flora_graph.frontend.lora_op`) that the
table expands back into that pattern: ``torch.export`` costs about a millisecond per traced
op, and LoRA sites are a large share of a transformer's ops. In-place ops that the export
leaves in its graph (``add_``, ``div_``, ``index_put_``) convert as their functional twins where
they write a tensor the model computed and no view shares (:mod:`.mutations`); the program is
made functional by ``run_decompositions({})``, a retrace, only where other in-place ops remain.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import operator
import re
import traceback
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import sympy
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._sympy.functions import FloorDiv

from flora_graph.adapters import adapters_of
from flora_graph.adapters.lora import is_conv1d
from flora_graph.adapters.peft import adapter_label, peft_lora_layers
from flora_graph.errors import ChunkCountFixedError, FloraGraphError, GraphError, ShapeError, UnsupportedOpError
from flora_graph.frontend import mutations, selected_rows
from flora_graph.frontend.aten import ATEN_TABLE, NO_TENSOR_OPS, SymDim, aten_name, refusal_of
from flora_graph.frontend.aten.complex import COMPLEX_TABLE, complex_converter, touches_complex
from flora_graph.frontend.aten.registry import chunk_samples
from flora_graph.frontend.lora_op import lora_sites_as_op
from flora_graph.frontend.model_outputs import leaf_keys, no_kv_cache
from flora_graph.frontend.traceable import (
    broadcast_masks,
    merged_peft_layers,
    sized_len,
    traceable_experts,
    traceable_modules,
    traceable_scans,
)
from flora_graph.ir import ComputationNode, Graph, Op, verify
from flora_graph.ir.shapes import (
    Dim,
    add_dims,
    canonical_dim,
    dim_names,
    dim_product,
    floor_div_parts,
    floor_divide_dim,
    format_shape,
    is_dim_name,
    is_rounded_down,
)

__all__ = ["CaptureContext", "Traced", "capture", "convert_fx_graph", "decompose_unconverted", "suggested_bounds",
           "torch_dtype_name", "trace_with_torch_export"]

DynamicDims = Mapping[str, Any]  # {input: {axis: dim name}}, or a list of those for a list input


def flat_dynamic_dims(dynamic_dims: DynamicDims | None) -> dict[str, Mapping[int, str]]:
    """``dynamic_dims`` with list inputs spelled out: ``{"past": [{0: "batch"}]}`` -> ``{"past.0": {0: "batch"}}``."""
    out: dict[str, Mapping[int, str]] = {}
    for name, axes in (dynamic_dims or {}).items():
        if isinstance(axes, list | tuple):
            for i, a in enumerate(axes):
                out.update(flat_dynamic_dims({f"{name}.{i}": a}))
        else:
            out[name] = axes
    return out
DimMax = Mapping[str, int]


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _to_numpy(t: torch.Tensor, name: str, copy: bool = True) -> np.ndarray:
    """``t`` as a numpy array: a copy, or (``copy=False``) a view of its memory where it is on the CPU."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise GraphError(f"param {name!r} is bfloat16, which the numpy side cannot hold; cast the model to float32/float16")
    return t.numpy().copy() if copy else t.numpy()


def _prefix(path: str) -> str:
    """``"fc1"`` -> ``"fc1."``; the root module (``""``) has no prefix, as in ``export_graph``."""
    return f"{path}." if path else ""


class CaptureContext:
    """State of one capture: the graph being built and the fx node being converted."""

    def __init__(self, graph: Graph, adapters: Mapping[str, Any], symbols: dict[str, str],
                 share_weights: bool = False, dim_max: Mapping[str, int] | None = None) -> None:
        self.graph = graph
        self.dim_max = dict(dim_max or {})  # IR dim name -> the largest size asked for (capture's dim_max)
        self._one_values: dict[Any, int | None] = {}  # size expression -> its one value up to dim_max, if it has one
        self.share_weights = share_weights  # the graph's weights are views of the model's tensors
        self.adapters = dict(adapters)
        self.symbols = symbols  # sympy symbol name -> IR dim name
        self.unbacked: dict[Any, Any] = {}  # a symbol torch made for a size read back as a number -> that size
        self.in_place: Mapping[torch.fx.Node, Any] = {}  # in-place fx nodes -> their functional twin
        self.selected: dict[torch.fx.Node, Any] = {}  # fx nodes of rows a bool mask picked -> that mask (selected_rows)
        self.fx_node: torch.fx.Node | None = None

    # ------------------------------------------------------------------ where are we
    def module_path(self) -> str:
        """Innermost module path of the current fx node ('' at top level)."""
        stack = (self.fx_node.meta.get("nn_module_stack") or {}) if self.fx_node is not None else {}
        paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]
        return paths[-1] if paths else ""

    def where(self) -> str:
        """``module 'fc1' (node linear_2)`` style location of the current node."""
        name = self.fx_node.name if self.fx_node is not None else "?"
        path = self.module_path()
        return f"module {path!r} (node {name})" if path else f"node {name}"

    def adapter_path(self) -> str | None:
        """Path of the adapter whose forward the current node belongs to, if any."""
        stack = (self.fx_node.meta.get("nn_module_stack") or {}) if self.fx_node is not None else {}
        found = None
        for v in stack.values():
            if isinstance(v, tuple) and v and v[0] in self.adapters:
                found = v[0]
        return found

    # ------------------------------------------------------------------ building
    def new_param(self, base: str, value: np.ndarray) -> ComputationNode:
        """A ``Const`` over a new weight named after ``base`` (made unique)."""
        name, k = base, 0
        while name in self.graph.params:
            k += 1
            name = f"{base}_{k}"
        return self.graph.const(name, value)

    def scalar(self, value: float, dtype: str) -> ComputationNode:
        """A rank-0 constant; inside an adapter it is the adapter's ``scaling``."""
        adapter = self.adapter_path()
        base = f"{_prefix(adapter)}scaling" if adapter is not None else f"{self.fx_node.name}_scalar"
        return self.new_param(base, np.asarray(value, dtype=dtype))

    def tensor(self, value: Any, like: Any = None, shape: Sequence[Dim] | None = None) -> ComputationNode:
        """``value`` as a node: nodes pass through, Python numbers become constants."""
        if isinstance(value, ComputationNode):
            return value
        if isinstance(value, bool | int | float):
            dtype = like.dtype if isinstance(like, ComputationNode) else "float32"
            if shape is not None:
                return self.new_param(f"{self.fx_node.name}_fill", np.full(tuple(shape), value, dtype=dtype))
            return self.scalar(value, dtype)
        raise GraphError(f"{self.where()}: cannot use {type(value).__name__} {value!r} as a tensor")

    def emit(self, op: Op, inputs: Sequence[ComputationNode], attrs: Mapping[str, Any] | None = None, *,
             role: str | None = None) -> ComputationNode:
        """Add a node for the current fx node, tagged and named as adapters export it.

        ``role`` (``"base"``, ``"lora_down"``, ...) names the node's part in the adapter whose
        forward the fx node belongs to; by default it is read off the weights and module path.
        """
        name, meta = self.fx_node.name, {}
        adapter = self.adapter_path()
        if adapter is not None:
            role = role or self._role(adapter, op, inputs)
            if role is not None:
                name = f"{_prefix(adapter)}{role}"
                meta = {"adapter": adapter_label(self.adapters[adapter]), "role": role, "module": adapter}
        try:
            return self.graph.add(op, list(inputs), attrs, name=name, meta=meta)
        except ShapeError as exc:
            raise ShapeError(f"{self.where()}: {exc}") from None

    def _role(self, adapter: str, op: Op, inputs: Sequence[ComputationNode]) -> str | None:
        if op is Op.TRANSPOSE:  # a weight's view (an embedding LoRA's A.T), not a part of the branch
            return None
        # an embedding's branch gathers rows of A's transpose
        reads = [i.inputs[0] if op is Op.GATHER and i.op is Op.TRANSPOSE else i for i in inputs]
        params = {i.attrs["param"] for i in reads if i.op is Op.CONST}
        p = _prefix(adapter)
        # ours: "<m>.lora_A"; PEFT's: "<m>.lora_A.<adapter>.weight", an embedding's "<m>.lora_embedding_A.<adapter>"
        for param in params:
            for part, role in (("lora_A", "lora_down"), ("lora_B", "lora_up"), ("lora_embedding_A", "lora_down"),
                               ("lora_embedding_B", "lora_up")):
                if param == f"{p}{part}" or param.startswith(f"{p}{part}."):
                    return role
        if self.module_path().startswith(f"{p}base_layer") and op in (Op.LINEAR, Op.CONV2D, Op.GATHER):
            return "base"  # the base layer's own product (not, e.g., a Conv1D weight's transpose)
        if self.module_path() == adapter:
            return {Op.MUL: "lora_scale", Op.ADD: "lora_add"}.get(op)
        return None

    def realize(self, value: Any) -> Any:
        """``value`` with every weight it holds made a ``Const`` node (once per weight)."""
        return _realize(self, value)

    def size_expr(self, d: Any) -> Any:
        """The sympy expression of torch size ``d`` (a SymInt or an expression), the sizes read back as numbers
        (:attr:`unbacked`) written as what they are."""
        expr = d.node.expr if isinstance(d, torch.SymInt) else d
        if self.unbacked and isinstance(expr, sympy.Basic) and expr.free_symbols & self.unbacked.keys():
            expr = expr.xreplace(self.unbacked)
        return expr

    def ir_dim(self, d: Any, env: Any = None) -> Dim:
        """A torch size (int or SymInt) as an IR dim; ``env``: the shape env of a sympy expression ``d`` (a part of
        a SymInt's), which bounds it."""
        if isinstance(d, int):
            return d
        expr = self.size_expr(d)
        env = d.node.shape_env if isinstance(d, torch.SymInt) else env
        if isinstance(expr, sympy.Integer):
            return int(expr)
        if isinstance(expr, sympy.Symbol):
            return self.symbols.get(expr.name, expr.name)
        if (exact := _exact_rounding(expr)) is not None:  # math.ceil(0.5 * tokens): integer arithmetic
            return self.ir_dim(exact, env)
        if env is not None and type(expr).__name__ not in ("Min", "Max") and any(
                type(a).__name__ in ("Min", "Max") for a in sympy.preorder_traversal(expr)):
            # a Min / Max inside (DeBERTa's 64 - min(seq, 64)): each that one argument decides, that argument
            resolved = expr.xreplace({a: arg for a in sympy.preorder_traversal(expr) if type(a).__name__ in ("Min", "Max")
                                      and (arg := _dominant_arg(env, a)) is not None})
            if resolved != expr:
                return self.ir_dim(resolved, env)
        if env is not None and self.dim_max:  # one value up to the dim_max asked (one chunk of a scan)
            if expr not in self._one_values:
                self._one_values[expr] = _one_value(env, expr, {
                    s: self.dim_max[n] for s, n in self.symbols.items() if n in self.dim_max})
            if self._one_values[expr] is not None:
                return self._one_values[expr]
        if isinstance(expr, sympy.Add | sympy.Mul):  # a product (view(b * t, c)) or a sum (a cache: past + seq)
            const = sum(int(a) for a in expr.args if isinstance(a, sympy.Integer)) if isinstance(expr, sympy.Add) else 0
            parts = [self.ir_dim(a, env) for a in expr.args if not (const and isinstance(a, sympy.Integer))]
            try:
                if isinstance(expr, sympy.Mul):
                    return dim_product(parts)
                total = add_dims(*parts)
                return canonical_dim(f"{total}{const:+d}") if const < 0 else add_dims(total, const)  # seq - 2
            except ShapeError:
                pass
        if isinstance(expr, FloorDiv) and isinstance(expr.args[1], sympy.Integer):  # a strided conv's output length
            try:
                return floor_divide_dim(self.ir_dim(expr.args[0], env), int(expr.args[1]))
            except ShapeError:
                pass
        if type(expr).__name__ in ("Min", "Max") and env is not None:  # sympy's or torch's own
            arg = _dominant_arg(env, expr)
            if arg is not None:  # SEW's min(pooled, upsampled) of two spellings of one length
                return self.ir_dim(arg, env)
        if env is not None:  # one value over the dims' ranges (MPT's max(0, 1 - seq) for seq >= 2; one
            try:                         # chunk of a scan where seq is at most the chunk)
                rng = env.bound_sympy(expr)
            except Exception:  # a shape env that cannot bound it: spelled below
                rng = None
            if rng is not None and rng.is_singleton():
                return int(rng.lower)
        rounded = _rounded_up(self, expr)
        if rounded is not None:
            return rounded
        floored = _mod_as_floor(expr)
        if floored is not None:  # PegasusX's padded length d - d % m + m: m*(d//m) + m
            try:
                return canonical_dim(self.ir_dim(floored, env))
            except ShapeError:  # still no dim (a negative one): spelled below
                pass
        # no dim (a negative size: x[:, -seq:]): spelled in the IR's dim names, for a converter that can place it
        return str(expr.xreplace({s: sympy.Symbol(self.symbols[s.name]) for s in expr.free_symbols
                                  if isinstance(s, sympy.Symbol) and s.name in self.symbols}))


_PERIOD = 100_000
"""The largest product of floor divisors :func:`_dominant_arg` checks a period of."""


def _dominant_arg(shape_env: Any, expr: Any) -> Any:
    """The argument of ``Min``/``Max`` ``expr`` that it equals at every size of its one symbol, else ``None``.

    Each argument is integer-affine in the symbol through floor divisions by constants, so it repeats, less
    its slope, with the product of its divisors; ``P`` is their lcm over the arguments. An argument wins
    everywhere where its difference to each other argument repeats with ``P`` (the same slope) and has the
    winning sign over one period from the symbol's least size (over the whole range where that is shorter).
    SEW's ``min(a, b)`` of a pooled and an upsampled length, spelled ``((n - 1)//2) + 1`` and
    ``(n + 1)//2``, is ``a``; ``min(n//2, 5000)`` has no such argument."""
    import math

    if len(expr.free_symbols) != 1 or len(expr.args) < 2 or not all(
            isinstance(a, sympy.Add | sympy.Mul | sympy.Integer | sympy.Symbol | FloorDiv)
            for arg in expr.args for a in sympy.preorder_traversal(arg)):
        return None  # each argument affine through floor divisions (no nested Min, Mod, ...): periodic less its slope
    (sym,) = expr.free_symbols
    period = math.lcm(*(math.prod(int(a.args[1]) for a in sympy.preorder_traversal(arg)
                                  if isinstance(a, FloorDiv) and isinstance(a.args[1], sympy.Integer)
                                  and int(a.args[1]) > 0) for arg in expr.args))
    rng = getattr(shape_env, "var_to_range", {}).get(sym)

    def bound(v: Any) -> int | None:  # torch's int_oo and sympy's oo: no bound
        try:
            return int(v)
        except (TypeError, ValueError, OverflowError, AttributeError):
            return None

    lo = max(0, bound(getattr(rng, "lower", None)) or 0)
    hi = bound(getattr(rng, "upper", None))
    if hi is not None and not any(isinstance(a, FloorDiv) for arg in expr.args for a in sympy.preorder_traversal(arg)) \
            and all(sympy.Poly(arg, sym).degree() <= 1 for arg in expr.args):
        # affine arguments over a bounded range: one that wins at both ends wins everywhere between (DeBERTa's
        # min(seq, 64) where seq is at most 64)
        ends = [[int(arg.subs(sym, n)) for n in (lo, hi)] for arg in expr.args]
        wins = min if type(expr).__name__ == "Min" else max
        for k, mine in enumerate(ends):
            if all(wins(v, m) == m for other in ends for v, m in zip(other, mine, strict=True)):
                return expr.args[k]
        return None
    if period > _PERIOD:
        return None
    whole = hi is not None and hi - lo < 2 * period  # the range is short: every size of it is checked
    sizes = range(lo, hi + 1 if whole else lo + 2 * period)
    names = {"FloorDiv": lambda a, b: a // b, "Min": min, "Max": max}  # Python's // floors as FloorDiv does
    try:
        values = [[f(n) for n in sizes] for f in (sympy.lambdify([sym], a, modules=[names]) for a in expr.args)]
    except Exception:  # a function the table above does not name (CeilDiv, Mod): not this form
        return None
    wins = min if type(expr).__name__ == "Min" else max
    for k, mine in enumerate(values):
        if all(wins(v, m) == m for other in values for v, m in zip(other, mine, strict=True)) and (whole or all(
                other[i] - mine[i] == other[i + period] - mine[i + period] for other in values for i in range(period))):
            return expr.args[k]
    return None


_FEW = 512
"""The most sizes a dim may range over for :func:`_one_value` to try them all."""
_LOOSE = ("Mod", "PythonMod", "FloorDiv", "CeilDiv", "Max", "Min")
"""The sympy functions torch's range arithmetic bounds loosely."""


def _one_value(shape_env: Any, expr: Any, asked: Mapping[str, int]) -> int | None:
    """The one value ``expr`` (of one dim) takes over the dim's whole range (torch's, capped by the ``asked``
    maximum of its symbol's name), where that range is at most :data:`_FEW` sizes wide, else ``None``: torch's
    range arithmetic is loose for ``Mod``, so a scan padded to whole chunks of 64 over ``seq <= 64`` (one chunk,
    ``seq + (64 - seq % 64) % 64``) bounds to ``[2, oo]``; torch.export then cannot prove its one-chunk guards
    within the dim_max asked, infers the range itself, and keeps the guards."""
    import sympy

    if len(expr.free_symbols) != 1 or not any(type(a).__name__ in _LOOSE for a in sympy.preorder_traversal(expr)):
        return None  # torch bounds sums and products exactly
    (sym,) = expr.free_symbols
    if sym.name not in asked:
        return None
    from torch.utils._sympy.numbers import int_oo

    rng = getattr(shape_env, "var_to_range", {}).get(sym)
    hi = asked[sym.name]
    try:
        lo = int(rng.lower)
        if rng.upper is not int_oo:
            hi = min(hi, int(rng.upper))
    except (AttributeError, TypeError, ValueError, OverflowError):  # no range to read
        return None
    if hi - lo >= _FEW:
        return None
    try:
        values = {int(expr.xreplace({sym: sympy.Integer(v)})) for v in range(lo, hi + 1)}
    except (TypeError, ValueError):
        return None
    return values.pop() if len(values) == 1 else None


def _mod_as_floor(expr: Any) -> Any:
    """``expr`` with each ``Mod(a, m)`` of a constant ``m > 0`` written ``a - m*(a//m)`` (torch's ``Mod`` and
    ``PythonMod`` floor as Python's ``%``), where it had one, expanded so that the terms of ``a`` cancel; else
    ``None``."""
    mods = {a for a in sympy.preorder_traversal(expr) if type(a).__name__ in ("Mod", "PythonMod")
            and isinstance(a.args[1], sympy.Integer) and int(a.args[1]) > 0}
    if not mods:
        return None
    return sympy.expand(expr.xreplace({a: a.args[0] - a.args[1] * FloorDiv(*a.args) for a in mods}))


def _exact_rounding(expr: Any) -> Any:
    """``math.ceil(c * n)`` or ``math.floor(c * n)`` of a size ``n`` and a float ``c = p / 2**k`` (torch spells it
    ``CeilToInt(c*ToFloat(n))``; NLLB-MoE's expert capacity, ``ceil(fraction * tokens)``) as integer arithmetic:
    ``(p*n + 2**k - 1) // 2**k`` or ``p*n // 2**k``, which Python's float product equals for every ``p*n`` below
    ``2**53``; ``None`` for any other expression (another ``c`` rounds its product)."""
    import fractions

    kind = type(expr).__name__
    if kind not in ("CeilToInt", "FloorToInt") or len(expr.args) != 1:
        return None
    coeff, rest = expr.args[0].as_coeff_Mul()
    if type(rest).__name__ != "ToFloat" or not isinstance(coeff, sympy.Number) or not coeff > 0:
        return None
    c = fractions.Fraction(float(coeff))
    p, q = c.numerator, c.denominator
    if q & (q - 1) or p > 2**20:  # not p / 2**k, or a product that may pass 2**53
        return None
    n = rest.args[0]
    if not n.is_integer:
        return None
    total = p * n + (q - 1 if kind == "CeilToInt" else 0)
    return FloorDiv(total, q) if q > 1 else total


def _rounded_up(ctx: CaptureContext, expr: Any) -> Dim | None:
    """A size of one dynamic dim ``d`` that rounds it up to a multiple of ``m`` as torch spells it with ``Mod``
    (``d + (m - d % m) % m``, and that over ``m``: a chunked scan's padded length and chunk count), as the IR's
    ``m*((d+m-1)//m)`` or ``((d+m-1)//m)``, or that is one number (the padded length over the chunk count: ``m``);
    ``None`` for any other. Checked on :func:`chunk_samples` of the dim."""
    import sympy

    if not any(type(a).__name__ in ("Mod", "PythonMod") for a in sympy.preorder_traversal(expr)) \
            or len(expr.free_symbols) != 1:
        return None
    (sym,) = expr.free_symbols
    name = ctx.symbols.get(sym.name)
    if name is None:
        return None
    for m in sorted({int(abs(a)) for a in expr.atoms(sympy.Integer) if abs(a) > 1}):
        values = chunk_samples(m)
        chunks = [-(-v // m) for v in values]
        try:
            got = [int(expr.subs(sym, v)) for v in values]
        except (TypeError, ValueError):
            return None
        if len(set(got)) == 1 and got[0] >= 0:  # the chunk size itself: padded length // chunk count
            return got[0]
        for k in (1, m):
            if got == [k * c for c in chunks]:
                return canonical_dim(f"{k}*(({name}+{m - 1})//{m})")
    return None


def _check_bounds(dynamic_dims: DynamicDims | None, bounds: DimMax | None, what: str = "dim_max") -> dict[str, int]:
    """``dim_max`` / ``dim_min`` as a plain dict, refusing names no input dim carries and sizes
    torch cannot take (a maximum below 2, a negative minimum)."""
    if not bounds:
        return {}
    named = {dn for axes in flat_dynamic_dims(dynamic_dims).values() for dn in axes.values()}
    unknown = sorted(set(bounds) - named)
    if unknown:
        raise GraphError(f"{what} names {unknown}, which dynamic_dims does not name (it names {sorted(named)})")
    least = 2 if what == "dim_max" else 0
    for dn, v in bounds.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            why = " (torch specialises sizes 0 and 1)" if what == "dim_max" else ""
            raise GraphError(f"{what}[{dn!r}] = {v!r}: expected an int >= {least}{why}")
    return dict(bounds)


_FIX = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*Dim\(\s*'([^']+)'\s*((?:,\s*(?:min|max)\s*=\s*\d+\s*)*)\)\s*$")


def suggested_bounds(message: str) -> dict[str, dict[str, int]]:
    """The dim bounds torch.export suggests in ``message`` ("Suggested fixes: seq = Dim('seq', min=3)"):
    ``{"seq": {"min": 3}}``. Other suggestions (a dim made static, or derived from another) are not bounds."""
    out: dict[str, dict[str, int]] = {}
    for line in message.split("Suggested fixes:", 1)[-1].splitlines() if "Suggested fixes:" in message else []:
        m = _FIX.match(line)
        if m and m.group(1) == m.group(2):
            out[m.group(2)] = {k: int(v) for k, v in re.findall(r"(min|max)\s*=\s*(\d+)", m.group(3))}
    return out


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, dynamic_dims: DynamicDims | None,
                    dim_max: DimMax | None = None, dim_min: DimMax | None = None, auto: bool = False):
    """torch.export's ``dynamic_shapes`` for ``dynamic_dims``: one ``Dim`` per name, bounded by ``dim_max`` /
    ``dim_min``; ``auto``: ``Dim.AUTO`` for every dim, whose range torch.export infers from the model's guards."""
    if not dynamic_dims:
        return None
    names = list(inspect.signature(model.forward).parameters)
    dims: dict[str, torch.export.Dim] = {}
    hi, lo = dim_max or {}, dim_min or {}

    def dim(dn: str) -> Any:
        if auto or not is_dim_name(dn):  # an expression ("past_seq+seq"): torch.export relates it to the other dims
            return torch.export.Dim.AUTO
        if dn not in dims:
            dims[dn] = torch.export.Dim(dn, min=lo.get(dn, 0), max=hi.get(dn)) if dn in lo else \
                torch.export.Dim(dn, max=hi.get(dn))
        return dims[dn]

    def spec_for(name: str, value: Any) -> Any:
        def of(axes: Any) -> Any:
            if isinstance(axes, list | tuple):  # a list input: one spec per element
                return [of(a) for a in axes]
            return {int(ax): dim(dn) for ax, dn in axes.items()}

        axes = dynamic_dims.get(name)
        if axes is not None:
            return of(axes)
        if isinstance(value, torch.Tensor) or value is None:
            return None
        # a container without dynamic dims (a dict of conditions): torch.export wants its structure, all static
        from torch.utils import _pytree as pytree

        return pytree.tree_map(lambda _: None, value)

    known = set(names[: len(args)]) | set(kwargs)
    unknown = set(dynamic_dims) - known
    if unknown:
        raise GraphError(f"dynamic_dims names unknown inputs {sorted(unknown)}; the model takes {sorted(known)}")
    spec: dict[str, Any] = {n: spec_for(n, a) for n, a in zip(names, args, strict=False)}
    params = inspect.signature(model.forward).parameters
    var_kw = next((n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    named = {k: spec_for(k, v) for k, v in kwargs.items() if k in params and k != var_kw}
    extra = {k: spec_for(k, v) for k, v in kwargs.items() if k not in named}
    spec.update(named)
    if extra:  # keywords that land in forward(**kwargs) are specified under that parameter's name
        spec[var_kw or "kwargs"] = extra
    return spec


def _linear_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, self.weight.t(), self.bias)


@contextlib.contextmanager
def _conv1d_as_linear(model: nn.Module):
    """Trace each ``Conv1D`` as the ``Linear(x, W.T, b)`` it is, not as addmm over flattened views
    (which would hide the Linear from the LoRA passes and tie batch and sequence into one dim)."""
    patched = [m for m in model.modules() if is_conv1d(m) and "forward" not in vars(m)]
    for m in patched:
        m.forward = _linear_forward.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@contextlib.contextmanager
def _no_stack_traces():
    """Skip recording a Python stack trace per fx node (``node.meta["stack_trace"]``), which the
    conversion never reads: about 10% of torch.export's time on a 4-layer Llama."""
    import torch.fx.config as fx_config

    if not hasattr(fx_config, "do_not_emit_stack_traces"):  # older torch: nothing to switch off
        yield
        return
    was = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = was


@contextlib.contextmanager
def _no_fake_tensor_cache():
    """Trace without the fake-tensor dispatch cache. A one-shot export has few repeated ops to
    hit it, and rebuilding a cached output with symbolic sizes costs more than running the meta
    kernel again: a 4-layer Llama exports 10-15% faster without it."""
    import torch._dynamo.config as dynamo_config

    if not hasattr(dynamo_config, "fake_tensor_cache_enabled"):
        yield
        return
    with dynamo_config.patch(fake_tensor_cache_enabled=False):
        yield


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector: torch.export allocates enough objects to trigger
    many collections, each scanning the caller's whole heap (a 4-layer Llama: 5-10% of the export,
    spikes of +30% in a process holding a few model copies). Its garbage is collected afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    # each submodule's own flag: a model in train mode may hold submodules kept in eval
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def capture(
    model: nn.Module,
    example_inputs: Any,
    dynamic_dims: DynamicDims | None = None,
    *,
    name: str | None = None,
    dim_max: DimMax | None = None,
    dim_min: DimMax | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    share_weights: bool = False,
) -> Graph:
    """Export ``model`` with ``torch.export`` and convert it to a verified :class:`Graph`.

    Args:
        model: the module; captured in eval mode and, where it has a ``config.use_cache``
            (a Hugging Face model), with the key/value cache off (both restored after).
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors
            (keywords that land in ``forward(**kwargs)`` may be any string:
            ``"past_key_values.0.key"``). Graph inputs take the keyword or parameter names.
        dynamic_dims: ``{input_name: {axis: dim_name}}``; the same name on several inputs is
            one dim. Example sizes on dynamic dims should be >= 2 (torch specialises 0 and 1).
            A dim may be a sum or product of names (``"past_seq+seq"``: an attention mask over
            the cache and the new tokens); torch.export relates it to the other dims itself.
        name: graph name (defaults to the model's class name).
        dim_max: ``{dim_name: largest size}`` for dims the model bounds (BERT/GPT-2 slice a
            learned position table of ``max_position_embeddings`` rows by ``"seq"``:
            ``dim_max={"seq": 512}``). Stored as ``graph.dim_max``; the ``torch-export``
            backend exports with the same bound. Names must appear in ``dynamic_dims``.
        dim_min: ``{dim_name: smallest size}``, stored as ``graph.dim_min``. Where torch.export
            fails asking for a bound (its "Suggested fixes: seq = Dim('seq', min=3)"), the
            bound is applied and the export retried; the graph records it. Where it fails on a
            guard it suggests nothing for (OpenAI GPT's ``seq != n_positions``), the export is
            retried with ``Dim.AUTO`` (torch.onnx's way): the range it infers is recorded, a size it
            fixed to the example's value (a Python loop over a scan's chunks, unrolled once, as Qwen3.5's
            gated delta rule was before it became one op) bounds the dim to the sizes that keep that value
            (one chunk), and a dim the code fixes to the example's size is refused, naming it.
        input_names: names of the graph inputs in order, replacing the keyword and parameter
            names (``dynamic_dims`` still uses those; a list input ``past`` has ``past.0``, ...).
        output_names: names of the outputs in order (default ``output`` or ``output_{i}``).
        share_weights: the graph's weights are views of the model's tensors instead of copies: no second copy
            of the weights in memory, for a model used for nothing else afterwards (a change to its weights
            shows in the graph).

    Raises:
        UnsupportedOpError: listing every ATen op outside the table and where it occurs.
        GraphError: torch.export failed (with the fixes it suggests that were not applied),
            or the result does not verify.
    """
    traced = trace_with_torch_export(model, example_inputs, dynamic_dims, dim_max=dim_max, dim_min=dim_min)
    graph = _convert(traced, flat_dynamic_dims(dynamic_dims), name or type(traced.model).__name__, output_names,
                     share_weights)
    graph.dim_max, graph.dim_min = traced.dim_max, traced.dim_min
    if input_names is not None:
        if len(input_names) != len(graph.inputs):
            raise GraphError(f"{len(input_names)} input names for the {len(graph.inputs)} inputs "
                             f"{[i.name for i in graph.inputs]}")
        for node, new in zip(list(graph.inputs), input_names, strict=True):
            graph.rename_input(node.name, new)
    return graph


class Traced(NamedTuple):
    """What :func:`trace_with_torch_export` returns."""

    ep: torch.export.ExportedProgram
    model: nn.Module  # the module exported (a PeftModel's base model)
    adapters: dict[str, Any]  # module path -> adapter, for tags
    dim_max: dict[str, int]  # the bounds the program was exported with: given, or applied from torch's fixes
    dim_min: dict[str, int]
    input_names: list[str]  # one per user input tensor of the program, in order


_RETRIES = 3  # exports retried with torch.export's suggested bounds


def trace_with_torch_export(
    model: nn.Module, example_inputs: Any, dynamic_dims: DynamicDims | None = None, *, dim_max: DimMax | None = None,
    dim_min: DimMax | None = None,
) -> Traced:
    """The ``torch.export`` step of :func:`capture` (same arguments), for callers that convert later.

    Returns the exported program, the module exported (a PeftModel's base model), its
    adapters by module path (for tags), the dim bounds and the input names;
    :func:`convert_fx_graph` converts the program.
    A model with a ``config.use_cache`` (Hugging Face) is traced with it off, and restored after:
    the graph's outputs hold no key/value cache (see :mod:`flora_graph.frontend.model_outputs`).
    A region run with autocast off is inlined where it stands (:func:`_inlined_wrappers`) and a parameter set to
    itself dropped (:func:`_without_self_sets`); where the exported graph holds in-place ops (``add_``, ``index_put_``)
    that :mod:`.mutations` cannot convert or a region run with autocast on, the program is functionalized (no
    decompositions); a graph without them pays only the check. Where
    torch.export asks for a lower or upper bound on a named dim, it is applied and the export retried;
    where it refuses a guard without a bound to suggest, it infers the dims' ranges (``Dim.AUTO``).

    Raises:
        GraphError: torch.export failed, or the model writes a buffer or an input in place.
    """
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        model = model.get_base_model()  # a PeftModel: capture the adapted model it wraps
    hi = _check_bounds(dynamic_dims, dim_max)
    lo = _check_bounds(dynamic_dims, dim_min, "dim_min")
    for dn in sorted(set(lo) & set(hi)):
        if lo[dn] > hi[dn]:
            raise GraphError(f"dim_min[{dn!r}] = {lo[dn]} is above dim_max[{dn!r}] = {hi[dn]}: no size is left")
    named = {dn for axes in flat_dynamic_dims(dynamic_dims).values() for dn in axes.values() if is_dim_name(dn)}
    adapters = {**adapters_of(model), **peft_lora_layers(model)}
    applied: list[str] = []
    # no_kv_cache: a Hugging Face causal LM with use_cache on would return a DynamicCache torch.export cannot trace
    with (_eval_mode(model), no_kv_cache(model), traceable_experts(model), traceable_modules(model), traceable_scans(model),
          sized_len(model), broadcast_masks(),
          merged_peft_layers(model) as merged,
          _conv1d_as_linear(model), lora_sites_as_op({k: v for k, v in adapters.items() if not _inside(k, merged)}),
          _no_stack_traces(), _no_fake_tensor_cache(), _gc_paused(), torch.no_grad()):
        auto = first = None
        for attempt in range(_RETRIES + 2):
            spec = _dynamic_shapes(model, args, kwargs, dynamic_dims, hi, lo, auto=bool(auto))
            try:
                ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=spec, strict=False)
                if auto:
                    _bounds_inferred(ep, model, len(args), dynamic_dims, hi, lo, applied, first)
                ep = _without_self_sets(_inlined_wrappers(ep))
                if mutations.plan(ep.graph.nodes, ATEN_TABLE, _lifted(ep))[1] or _wrapped(ep):
                    # in-place ops capture cannot take as they are, or regions torch.export wrapped: retraced
                    ep = _functionalize(ep, type(model).__name__)
                ep = decompose_unconverted(ep)
                break
            except FloraGraphError:
                raise
            except Exception as raised:
                exc = first if auto else raised  # the inferred ranges did not help either: the first failure says more
                usable = {dn for dn in suggested_bounds(str(exc)) if dn in named}
                # torch fails while it writes its suggested fixes for a violated constraint (a derived dim's empty
                # range: "Cannot create Dim with inconsistent min=0, max=-oo"): the violation is inferred the same way
                violated = "Constraints violated" in str(exc) or (isinstance(exc, AssertionError)
                                                                  and str(exc).startswith("Cannot create Dim"))
                if not auto and violated and not usable and named:
                    # a guard torch.export suggests no bound for (GPT's position table: seq != 64): let it infer
                    # the range that holds around the example, as torch.onnx does (Dim.AUTO), and check it after
                    auto, first = True, exc
                    continue
                fixes = {dn: b for dn, b in suggested_bounds(str(exc)).items() if dn in named}
                changed = False
                for dn, b in fixes.items():
                    if "min" in b and b["min"] > lo.get(dn, 0):
                        lo[dn], changed = b["min"], True
                        applied.append(f"{dn} >= {b['min']}")
                    if "max" in b and b["max"] < hi.get(dn, b["max"] + 1):
                        hi[dn], changed = b["max"], True
                        applied.append(f"{dn} <= {b['max']}")
                if changed and attempt < _RETRIES:
                    continue
                hint = ""
                if "max=" in str(exc) and "Constraints violated" in str(exc):
                    hint = " (a dynamic dim needs an upper bound here: pass capture(..., dim_max={dim_name: largest_size}))"
                if applied:
                    hint += f" (bounds applied from torch.export's suggestions: {', '.join(applied)})"
                raise GraphError(f"torch.export could not export {type(model).__name__}{hint}: {_said(exc)}") from exc
    return Traced(ep, model, adapters, hi, lo, _user_input_names(ep, model, len(args)))


def _said(exc: BaseException) -> str:
    """``exc``'s message, or where it has none (a bare ``assert`` in the model's code), its type and the line that
    raised it: the innermost frame of its traceback, with the file's path from its package on."""
    if str(exc).strip():
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    path = Path(last.filename)
    short = "/".join(path.parts[-4:]) if "site-packages" in path.parts else str(path)
    return f"{type(exc).__name__} at {short}:{last.lineno}" + (f" ({last.line})" if last.line else "")


def _bounds_inferred(ep: torch.export.ExportedProgram, model: nn.Module, n_args: int, dynamic_dims: DynamicDims,
                     hi: dict[str, int], lo: dict[str, int], applied: list[str], first: Exception) -> None:
    """After an export with ``Dim.AUTO``: every named dim stayed dynamic (else :class:`GraphError` with the
    export's first failure), and the range torch.export inferred for it is kept in ``hi`` / ``lo``."""
    from torch.utils._sympy.numbers import int_oo

    flat = flat_dynamic_dims(dynamic_dims)
    inputs = set(ep.graph_signature.user_inputs)
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in inputs]
    specialized: list[str] = []
    examples: dict[str, int] = {}  # dim name -> the example's size
    for node, name in zip(user, _user_input_names(ep, model, n_args), strict=False):
        val = node.meta.get("val")
        for ax, dn in flat.get(name, {}).items():
            if not is_dim_name(dn) or not isinstance(val, torch.Tensor) or ax >= val.dim():
                continue
            d = val.shape[ax]
            if not isinstance(d, torch.SymInt) or d.node.expr.is_number:
                specialized.append(f"{dn} = {int(d)}")
                continue
            if isinstance(d.node.hint, int):
                examples[dn] = d.node.hint
            rng = ep.range_constraints.get(d.node.expr)
            if rng is None:
                continue
            if rng.upper is not int_oo and int(rng.upper) < hi.get(dn, int(rng.upper) + 1):
                hi[dn] = int(rng.upper)
                applied.append(f"{dn} <= {hi[dn]}")
            if rng.lower is not None and int(rng.lower) > max(2, lo.get(dn, 0)):
                lo[dn] = int(rng.lower)
                applied.append(f"{dn} >= {lo[dn]}")
    for dn, (low, high) in _guard_bounds(str(first), flat, examples).items():
        # guards torch.export kept as neither a range nor an assertion (a chunk count of one): the sizes around
        # the example where they hold
        if high is not None and high < hi.get(dn, high + 1):
            hi[dn] = high
            applied.append(f"{dn} <= {high}")
        if low > max(2, lo.get(dn, 0)):
            lo[dn] = low
            applied.append(f"{dn} >= {low}")
    if specialized:
        raise GraphError(f"torch.export could not export {type(model).__name__}: its code fixes "
                         f"{', '.join(sorted(set(specialized)))} (the example's size), which dynamic_dims names as "
                         f"dynamic: {first}") from first


_GUARD = re.compile(r"satisfy the generated guard (.+?)\.?$", re.M)
_SOURCE = re.compile(r"L((?:\[[^\]]+\])+)\.size\(\)\[(\d+)\]")
_GUARD_TEXT = re.compile(r"^[\d\s()+\-*/%<>=!]*$")
_GUARD_REACH = 1 << 14  # the sizes past the example a guard is checked on


def _guard_bounds(message: str, flat: Mapping[str, Mapping[int, str]],
                  examples: Mapping[str, int]) -> dict[str, tuple[int, int | None]]:
    """For each named dim whose size torch.export's ``message`` says it fixed ("... satisfy the generated guard
    ((L['x'].size()[1] + ...) // 64) == 1": the count of chunks a Python loop ran over): the sizes around the
    example's where every such guard holds, ``(lowest, highest)`` (``None``: still holding :data:`_GUARD_REACH`
    sizes past the example). Torch's Python arithmetic, evaluated on sizes; a guard of other dims, or of anything
    but one equality, is left alone."""
    by_source = {f"{name}.{axis}": dn for name, axes in flat.items() for axis, dn in axes.items() if is_dim_name(dn)}
    guards: dict[str, list[str]] = {}
    for text in _GUARD.findall(message):
        sources = _SOURCE.findall(text)
        dims = {by_source.get(".".join(p.strip("'\"") for p in re.findall(r"\[([^\]]+)\]", chain)) + f".{axis}", "")
                for chain, axis in sources}
        expr = _SOURCE.sub("{d}", text)
        # a size of the dim fixed to the example's value ("... == 1": a loop unrolled that many times); the other
        # guards are torch's own branches, which the IR's shapes, derived anew and checked against torch's, need not
        # share (Mamba-2's scan runs one chunk as well as three)
        if len(dims) == 1 and "" not in dims and _GUARD_TEXT.match(expr.replace("{d}", "0")) \
                and re.fullmatch(r".+ == \d+", expr) and expr.count("==") == 1:
            guards.setdefault(dims.pop(), []).append(expr)
    out: dict[str, tuple[int, int | None]] = {}
    for dn, exprs in guards.items():
        if dn not in examples:
            continue

        try:  # digits, operators and the size alone (checked above): no names to reach
            checks = [eval(f"lambda d: {e.replace('{d}', 'd')}", {"__builtins__": {}}) for e in exprs]
        except SyntaxError:
            continue

        def holds(v: int, checks: list[Any] = checks) -> bool:
            try:
                return all(bool(c(v)) for c in checks)
            except (ArithmeticError, TypeError, ValueError):
                return False

        e = examples[dn]
        if not holds(e):
            continue
        low = e
        while low > 2 and holds(low - 1):
            low -= 1
        high = e
        while high < e + _GUARD_REACH and holds(high + 1):
            high += 1
        out[dn] = (low, None if high >= e + _GUARD_REACH else high)
    return out


def _inside(path: str, roots: Sequence[str]) -> bool:
    """Whether module ``path`` is one of ``roots`` or below one."""
    return any(path == r or path.startswith(f"{r}.") for r in roots)


def _user_input_names(ep: torch.export.ExportedProgram, model: nn.Module, n_args: int) -> list[str]:
    """The name of each user input leaf of ``ep``, in placeholder order: a keyword's key, a positional
    parameter's name, ``name.i`` / ``name.key`` inside a list or dict input."""
    from torch.utils import _pytree as pytree

    spec = ep.call_spec.in_spec
    if spec is None:
        return list(ep.graph_signature.user_inputs)
    args, kwargs = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    params = list(inspect.signature(model.forward).parameters)
    names: dict[int, str] = {}
    roots = [(params[i] if i < len(params) else f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for root, value in roots:
        for keys, leaf in leaf_keys(value):
            names[leaf] = ".".join([root, *keys])
    order = [names[i] for i in range(spec.num_leaves) if i in names]
    user = [n for n in ep.graph_signature.user_inputs]
    if len(order) != len(user):
        order = user
    # only tensors become graph inputs: a number among the inputs (LTX-Video's frame count) is a constant there
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    return [name for name, u in zip(order, user, strict=True) if isinstance(vals.get(u), torch.Tensor)]


def _unconverted(ep: torch.export.ExportedProgram) -> set[Any]:
    """The ATen overloads of ``ep`` that :func:`_check_supported` would refuse (no converter, not folded)."""
    sig = ep.graph_signature
    const = {n for n in ep.graph.nodes if n.op == "placeholder" and n.name not in sig.user_inputs}
    in_place = mutations.plan(ep.graph.nodes, ATEN_TABLE, _lifted(ep))[0]
    return {n.target for n in _without_converter(ep.graph.nodes, const, in_place)
            if isinstance(n.target, torch._ops.OpOverload)}


def _lifted(ep: torch.export.ExportedProgram) -> set[str]:
    """The placeholders of ``ep``'s lifted tensor constants (tensors made during the call, as torch.export refuses
    a write into a constant the module holds)."""
    return set(ep.graph_signature.inputs_to_lifted_tensor_constants)


def _decompositions(ep: torch.export.ExportedProgram) -> dict[Any, Any]:
    """The decompositions in torch.export's default table of the ops of ``ep`` that have no converter (and that
    the IR does not refuse by name)."""
    missing = _unconverted(ep)
    if not missing:
        return {}
    table = torch.export.default_decompositions()
    return {op: table[op] for op in missing if op in table and refusal_of(op) is None}


def decompose_unconverted(ep: torch.export.ExportedProgram, rounds: int = 3) -> torch.export.ExportedProgram:
    """``ep`` with the ops that have no converter but a decomposition in torch.export's default table
    (``logsumexp``, ``softplus``, ``mish``, ``floor_divide``, ...) decomposed, and nothing else: the
    high-level ops the IR maps whole (``linear``, ``scaled_dot_product_attention``, ``layer_norm``, the
    LoRA op) stay as they are. Repeated while a decomposition leaves such ops behind; a graph whose ops
    all convert pays one walk of its nodes."""
    for _ in range(rounds):
        chosen = _decompositions(ep)
        if not chosen:
            break
        ep = ep.run_decompositions(chosen)
    return ep


def _without_dead_state(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` without the writes of buffers whose value on entry nothing reads: each call overwrites them
    before any read (transformers' longrope picks its frequencies so, ``inv_freq.copy_(where(...))``), so
    no call sees what an earlier one wrote and the write carries no state; and without the writes of a buffer's
    own value back into it (CTRL's ``self.pos_encoding = self.pos_encoding.to(dtype)`` in the dtype it has).
    Functionalized programs only."""
    sig = ep.graph_signature
    unread = {sig.inputs_to_buffers[n.name] for n in ep.graph.nodes
              if n.op == "placeholder" and n.name in sig.inputs_to_buffers and not n.users}
    out = next(n for n in ep.graph.nodes if n.op == "output")
    written = out.args[0]

    def unchanged(i: int, target: str) -> bool:
        value = written[i]
        return isinstance(value, torch.fx.Node) and value.op == "placeholder" \
            and sig.inputs_to_buffers.get(value.name) == target

    drop = [i for i, spec in enumerate(sig.output_specs)
            if spec.kind == torch.export.graph_signature.OutputKind.BUFFER_MUTATION
            and (spec.target in unread or unchanged(i, spec.target))]
    if not drop:
        return ep
    out.args = (tuple(v for i, v in enumerate(out.args[0]) if i not in drop), *out.args[1:])
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    keep = [spec for i, spec in enumerate(sig.output_specs) if i not in drop]
    return ep._update(ep.graph_module, torch.export.graph_signature.ExportGraphSignature(sig.input_specs, keep))


_WRAPPERS = frozenset(getattr(torch.ops.higher_order, name) for name in ("wrap_with_autocast", "wrap_with_set_grad_enabled")
                      if hasattr(torch.ops.higher_order, name))
"""Higher-order ops torch.export wraps a region of the model in (``with torch.autocast(..., enabled=False):``, as
Qwen3-MoE's experts run): :func:`_inlined_wrappers` inlines those whose region computes what its ops say, and the
retrace of :func:`_functionalize` the others (autocast on, which changes the ops' dtypes)."""

_AUTOCAST = getattr(torch.ops.higher_order, "wrap_with_autocast", None)


def _wrapped(ep: torch.export.ExportedProgram) -> bool:
    """Whether ``ep`` holds a region in one of the :data:`_WRAPPERS`."""
    return any(n.op == "call_function" and n.target in _WRAPPERS for n in ep.graph.nodes)


def _without_self_sets(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` without its ``x.set_(x)`` (``aten.set_.source_Tensor`` of a tensor to itself: no change; PEFT's LoRA on a
    parameter, ``ParamWrapper``, sets the parameter it wraps to itself), in place: what read the op reads ``x``. Saves
    the retrace an in-place op costs."""
    graph = ep.graph_module.graph
    found = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.set_.source_Tensor
             and len(n.args) == 2 and n.args[0] is n.args[1] and not n.kwargs]
    for n in found:
        n.replace_all_uses_with(n.args[0])
        graph.erase_node(n)
    if found:
        graph.lint()
        ep.graph_module.recompile()
    return ep


def _inlined_wrappers(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with each region of :data:`_WRAPPERS` that computes what its ops say put in place of its call, in place:
    a region with autocast off (``wrap_with_autocast(device, dtype, False, cache, body, *operands)``) or with gradients
    on or off (``wrap_with_set_grad_enabled(enabled, body, *operands)``: the same values in inference). Its body's
    nodes are copied before the call with their metadata (the body's placeholders, in order, are the operands), what
    read its results (``getitem`` of the call) reads the copies, and the call goes; nested regions are inlined in
    turn. A region with autocast on is left for the retrace. Saves the retrace such a region cost."""
    gm = ep.graph_module
    graph = gm.graph
    changed = False
    while True:
        call = next((n for n in graph.nodes if n.op == "call_function" and n.target in _WRAPPERS
                     and not (n.target is _AUTOCAST and n.args[2] is not False)), None)
        if call is None:
            break
        at = 4 if call.target is _AUTOCAST else 1  # the body's place among the call's arguments
        holder, operands = call.args[at], list(call.args[at + 1:])
        if call.kwargs or not isinstance(holder, torch.fx.Node) or holder.op != "get_attr":
            break  # not the form above: the retrace inlines it
        body = getattr(gm, holder.target)
        if not all(isinstance(getattr(body, n.target, None), nn.Module) for n in body.graph.nodes if n.op == "get_attr"):
            break  # a constant of its own in the body: the retrace inlines it
        env: dict[torch.fx.Node, Any] = {}
        results: Any = None
        with graph.inserting_before(call):
            for node in body.graph.nodes:
                if node.op == "placeholder":
                    env[node] = operands[len(env)]
                elif node.op == "output":
                    results = node.args[0]
                elif node.op == "get_attr":  # a nested region's body: held by the program's module under a new name
                    name = f"{holder.target}_{node.target}"
                    gm.register_module(name, getattr(body, node.target))
                    env[node] = graph.get_attr(name)
                    env[node].meta = dict(node.meta)
                else:
                    env[node] = graph.node_copy(node, env.__getitem__)
        outs = [env[r] if isinstance(r, torch.fx.Node) else r for r in (results if isinstance(results, tuple | list)
                                                                         else (results,))]
        for user in list(call.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise GraphError(f"a {call.target} region's results are read by {user.format_node()}, not by index")
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(call)
        if not holder.users:
            graph.erase_node(holder)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return ep


def _functionalize(ep: torch.export.ExportedProgram, model_name: str) -> torch.export.ExportedProgram:
    """``ep`` with its in-place ops made functional (``add_`` -> ``add``, ``index_put_`` -> ``index_put``).

    ``run_decompositions`` functionalizes; its table holds only the decompositions of the ops without a
    converter (:func:`_decompositions`, in the same retrace): ``linear``, ``scaled_dot_product_attention``,
    ``layer_norm`` and the LoRA op stay whole. Run only where the graph holds an in-place op that
    :func:`.mutations.plan` cannot convert as it is, or a region in one of the :data:`_WRAPPERS` (which the
    retrace inlines), as it retraces the program. A mutation that outlives
    the call (a buffer or an input written in place) has no place in a graph without state, and is refused,
    except a buffer's whose value on entry nothing reads (:func:`_without_dead_state`).
    """
    ep = _without_dead_state(ep.run_decompositions(_decompositions(ep)))
    sig = ep.graph_signature
    escaping = [f"buffer {b!r}" for b in sig.buffers_to_mutate.values()]
    escaping += [f"input {i!r}" for i in sig.user_inputs_to_mutate.values()]
    if escaping:
        raise GraphError(f"{model_name} writes {', '.join(escaping)} in place; a captured graph holds no state "
                         "(compute on a copy, or return the new value)")
    return ep


def _convert(traced: Traced, dynamic_dims: DynamicDims, name: str, output_names: Sequence[str] | None = None,
             share_weights: bool = False) -> Graph:
    ep = traced.ep
    sig = ep.graph_signature
    weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    state = {**ep.state_dict, **ep.constants}
    return convert_fx_graph(ep.graph, {n: (fqn, state[fqn]) for n, fqn in weights.items()}, traced.adapters,
                            dynamic_dims, name, input_names=traced.input_names, output_names=output_names,
                            share_weights=share_weights, dim_max=traced.dim_max, constants=_lifted(ep))


def convert_fx_graph(
    fx_graph: torch.fx.Graph,
    weights: Mapping[str, tuple[str, torch.Tensor]],
    adapters: Mapping[str, Any] | None = None,
    dynamic_dims: DynamicDims | None = None,
    name: str = "graph",
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    share_weights: bool = False,
    dim_max: Mapping[str, int] | None = None,
    constants: Collection[str] = (),
) -> Graph:
    """Convert an ATen-level fx graph (torch.export's, or AOT autograd's) to a verified :class:`Graph`.

    Args:
        fx_graph: the graph; every placeholder has ``meta["val"]`` (a fake tensor or a SymInt).
        weights: placeholder name -> (weight name, real tensor) for the placeholders that are weights;
            the other tensor placeholders become graph inputs, SymInt placeholders become dims.
        adapters: module path -> adapter, for tags (matched against ``nn_module_stack`` paths).
        dynamic_dims: ``{input name: {axis: dim name}}`` naming symbolic dims.
        name: graph name.
        input_names: the graph input names of the tensor placeholders that are not weights, in
            order (default: the placeholder names).
        output_names: the output names, in order (default ``output`` or ``output_{i}``).
        share_weights: the graph's weights are views of ``weights``' tensors, not copies (see :func:`capture`).
        dim_max: the largest size of each named dim the graph is for (the capture's ``dim_max``): a size that has
            one value up to it is that number.
        constants: the placeholders of constants made during the call (torch.export's lifted tensor constants),
            which an in-place op may write as its functional twin (:func:`.mutations.plan`).

    Raises:
        UnsupportedOpError: listing every ATen op outside the table and where it occurs.
    """
    adapters, dynamic_dims = adapters or {}, dynamic_dims or {}
    fx_nodes = list(fx_graph.nodes)
    in_place = mutations.plan(fx_nodes, ATEN_TABLE, constants)[0]
    _check_supported(fx_nodes, weights, in_place)

    graph = Graph(name)
    user = [n for n in fx_nodes if n.op == "placeholder" and n.name not in weights and isinstance(n.meta.get("val"), torch.Tensor)]
    if input_names is not None and len(input_names) != len(user):
        raise GraphError(f"{name}: {len(input_names)} input names for {len(user)} inputs")
    names = dict(zip(user, input_names if input_names is not None else [n.name for n in user], strict=True))
    symbols: dict[str, str] = {}
    for n in user:
        for ax, d in enumerate(n.meta["val"].shape):
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                symbols.setdefault(d.node.expr.name, dynamic_dims.get(names[n], {}).get(ax, d.node.expr.name))
    ctx = CaptureContext(graph, adapters, symbols, share_weights, dim_max)
    ctx.in_place = in_place
    env: dict[torch.fx.Node, Any] = {}
    for n in fx_nodes:
        ctx.fx_node = n
        if n.op == "placeholder":
            val = n.meta.get("val")
            if n.name in weights:
                env[n] = _LazyConst(*weights[n.name])
            elif isinstance(val, torch.Tensor):
                env[n] = graph.input(names[n], [ctx.ir_dim(d) for d in val.shape], torch_dtype_name(val.dtype))
            elif isinstance(val, torch.SymInt):  # a size passed as an input (AOT graphs with dynamic shapes)
                env[n] = SymDim(ctx.ir_dim(val))
            elif isinstance(val, bool | int | float) or val is None:  # a number torch.export fixed: its value
                env[n] = val
            else:
                raise GraphError(f"placeholder {n.name} of {name} is neither a tensor nor a size: {val!r}")
        elif n.op == "call_function":
            env[n] = _call(ctx, n, env)
        elif n.op == "output":
            outs = n.args[0] if isinstance(n.args[0], tuple | list) else (n.args[0],)
            # numbers among the outputs (MaskFormer's Swin returns its stages' spatial sizes) are no tensors of the
            # graph, nor named by output_names, which names the tensors
            outs = [o for o in outs if not (o is None or isinstance(o, bool | int | float) or (
                isinstance(o, torch.fx.Node) and isinstance(o.meta.get("val"), bool | int | float | torch.SymInt)))]
            if output_names is not None and len(output_names) != len(outs):
                raise GraphError(f"{name}: {len(output_names)} output names for {len(outs)} outputs")
            for i, o in enumerate(outs):
                if o in ctx.selected:
                    raise UnsupportedOpError(f"output {i} of {name} is rows picked by a bool mask, as many as the data "
                                             "decides", {"index (a bool mask's rows as an output)": [n.name]})
                node = _realize(ctx, env[o])
                if not isinstance(node, ComputationNode):
                    raise GraphError(f"output {i} of {name} is not a tensor")
                default = "output" if len(outs) == 1 else f"output_{i}"
                graph.set_output(output_names[i] if output_names is not None else default, node)
        else:
            raise GraphError(f"unexpected fx node {n.op} {n.name} in the exported program")
    graph.remove_dead()
    return verify(graph)


class _LazyConst:
    """A weight that becomes a ``Const`` node the first time something reads it."""

    def __init__(self, fqn: str, tensor: torch.Tensor) -> None:
        self.fqn, self.tensor, self.node = fqn, tensor, None


def _realize(ctx: CaptureContext, v: Any) -> Any:
    if isinstance(v, _LazyConst):
        if v.node is None:
            v.node = ctx.graph.const(v.fqn, _to_numpy(v.tensor, v.fqn, copy=not ctx.share_weights))
        return v.node
    if isinstance(v, list | tuple):
        return type(v)(_realize(ctx, x) for x in v)
    return v


def _is_const(v: Any) -> bool:
    if isinstance(v, list | tuple):
        return all(_is_const(x) for x in v)
    if isinstance(v, ComputationNode):
        return v.op is Op.CONST
    return not isinstance(v, SymDim)


def _call(ctx: CaptureContext, n: torch.fx.Node, env: dict) -> Any:
    def val(a: Any) -> Any:
        return env[a] if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(n.args, val)
    kwargs = torch.fx.node.map_aggregate(n.kwargs, val)
    if _checked_alone(n):
        return None
    if (value := _size_item(n)) is not None:  # a size torch.tensor() held, read back: the size
        if isinstance(n.meta["val"].node.expr, sympy.Symbol):
            ctx.unbacked[n.meta["val"].node.expr] = ctx.size_expr(value)
        return SymDim(ctx.ir_dim(value, n.meta["val"].node.shape_env))
    if n.target is torch.ops.aten.sym_size.int or _is_shape_arith(n):
        return SymDim(ctx.ir_dim(n.meta["val"]))
    if n.target in NO_TENSOR_OPS or _is_size_check(n) or _is_float_size(n):
        return None
    if ctx.selected and (own := selected_rows.check(ctx, n)) is not None:  # rows a bool mask picked: read one at
        out = own(lambda a: env[a])  # a time, regrouped per leading row (converted there), or refused
        _check_shape(ctx, n, out)
        return out
    twin = ctx.in_place.get(n)  # an in-place op converted as its functional twin (frontend.mutations)
    conv = complex_converter(ctx, n) or ATEN_TABLE.get(n.target if twin is None else twin)
    if conv is None or _reads_bfloat16_weights(args, kwargs):  # every input is constant: fold it (_check_supported
        return _fold(ctx, n, args, kwargs)  # let through an op without a converter only where it can)
    if getattr(conv, "realizes_args", False):  # it makes each weight's Const where the op-by-op trace would
        out = conv(ctx, *args, **kwargs)
    else:
        out = conv(ctx, *_realize(ctx, args), **_realize(ctx, kwargs))
    _check_shape(ctx, n, out)
    if twin is not None:  # every later reader of the written tensor sees the new value (through detach_ too)
        env[n.args[0]] = env[mutations.written_root(n.args[0])] = out
        if (cut := mutations.sliced_base(n.args[0])) is not None:  # a slice's write: scattered back into its base
            base, cuts = cut
            whole = out
            for i in range(len(cuts) - 1, -1, -1):  # the innermost cut first, into the one it was cut from
                c = cuts[i]
                outer = cuts[i - 1].node if i else base
                if c.select:
                    whole = ATEN_TABLE[torch.ops.aten.select_scatter.default](ctx, env[outer], whole, c.dim, c.start)
                else:
                    start, end = (env[b] if isinstance(b, torch.fx.Node) else b for b in (c.start, c.end))  # a size
                    whole = ATEN_TABLE[torch.ops.aten.slice_scatter.default](ctx, env[outer], whole, c.dim, start, end,
                                                                             c.step)
                env[outer] = whole  # a cut on the way that is read again sees the write
            env[base] = env[mutations.written_root(base)] = whole
    return out


def _torch_size(ctx: CaptureContext, dim: Dim, env: Any) -> Any:
    """IR dim ``dim`` as a sympy expression of torch's symbols (those of shape env ``env`` that
    :attr:`CaptureContext.symbols` names), or a symbol of its own where it names others."""
    if isinstance(dim, int):
        return sympy.Integer(dim)
    names = {ctx.symbols[sym.name]: sym for sym in getattr(env, "var_to_range", {})
             if isinstance(ctx.symbols.get(sym.name), str) and is_dim_name(ctx.symbols[sym.name])}
    try:
        expr = sympy.sympify(dim, locals=names)
    except (sympy.SympifyError, TypeError, SyntaxError):
        return sympy.Symbol(dim)
    return expr if expr.free_symbols <= set(names.values()) else sympy.Symbol(dim)


def _reads_bfloat16_weights(args: Any, kwargs: Any) -> bool:
    """Whether an op reads weights alone, one of them bfloat16 (RecurrentGemma's ``normalizer``, which its forward
    converts to the activations' type): torch computes it at capture, as the model would, so that the graph holds the
    result (an error names it where that is bfloat16 too), not the bfloat16 weight numpy cannot hold."""
    leaves: list[Any] = []
    torch.fx.node.map_aggregate((args, kwargs), leaves.append)
    return any(isinstance(a, _LazyConst) and a.tensor.dtype == torch.bfloat16 for a in leaves) and _is_const(leaves)


def _is_shape_arith(n: torch.fx.Node) -> bool:
    """Arithmetic on sizes (``operator.mul(sym_size, 4)`` from ``x.view(b * t, c)``): a dim, no tensor. Not a
    tensor's value read as a number (``item``: refused), whose result torch.export also keeps as a ``SymInt``."""
    return isinstance(n.meta.get("val"), torch.SymInt) and refusal_of(n.target) is None


def _is_float_size(n: torch.fx.Node) -> bool:
    """A size as a float on its way back to a size (``math.ceil(fraction * tokens)``: ``sym_float``, ``mul``): no
    value of its own, as the size it rounds to is read from that node's own expression (``CaptureContext.ir_dim``)."""
    return isinstance(n.meta.get("val"), torch.SymFloat) and refusal_of(n.target) is None and bool(n.users) \
        and all(_is_shape_arith(u) or _is_float_size(u) for u in n.users)


def _is_size_check(n: torch.fx.Node) -> bool:
    """A comparison of sizes that only runtime assertions read (``_assert_scalar(ge(u0, 0))``), or nothing: no tensor; or a
    tensor's value read as a number that only such checks read (XLM's and Flaubert's ``assert lengths.max().item()
    <= slen``), or a tensor's truth read so (``torch._check_tensor_all(cond)``, transformers'
    ``torch_compilable_check``: ``_is_all_true``, ``item``, ``sym_ite``, ``_assert_scalar``; RT-DETR's check that its
    levels' sizes add up to the encoder's length): the check holds for every input eager takes, and the graph keeps no Python
    assertion."""
    if n.target in _READS_A_NUMBER:
        return isinstance(n.meta.get("val"), torch.SymInt | torch.SymBool) and bool(n.users) \
            and all(u.target in NO_TENSOR_OPS or _is_size_check(u) for u in n.users)
    if n.target in _TRUTH_OF or n.target is torch.sym_ite:  # the truth as 1 or 0, which the checks compare
        return bool(n.users) and all(u.target in NO_TENSOR_OPS or _is_size_check(u) for u in n.users)
    return isinstance(n.meta.get("val"), torch.SymBool) \
        and all(u.target in NO_TENSOR_OPS or _is_size_check(u) for u in n.users)  # through and_ / or_; or read by none


_READS_A_NUMBER = (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
_TRUTH_OF = (torch.ops.aten._is_all_true.default, torch.ops.aten._is_any_true.default)

_SIZE_ARITH = {torch.ops.aten.add.Tensor: operator.add, torch.ops.aten.add.Scalar: operator.add,
               torch.ops.aten.sub.Tensor: operator.sub, torch.ops.aten.sub.Scalar: operator.sub,
               torch.ops.aten.rsub.Tensor: lambda a, b: b - a, torch.ops.aten.rsub.Scalar: lambda a, b: b - a,
               torch.ops.aten.mul.Tensor: operator.mul, torch.ops.aten.mul.Scalar: operator.mul}
_SIZE_SAME = (torch.ops.aten.clone.default, torch.ops.aten.alias.default, torch.ops.aten._to_copy.default,
              torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.detach.default, torch.ops.aten.detach_.default)


def _size_value(v: Any, depth: int = 0) -> Any:
    """The sympy expression of the integer ``v`` holds, where it is computed from sizes alone: a Python int, a size
    (a ``SymInt`` node), or an integer tensor of one value made from them (``torch.tensor(min(q_len, k_len))``:
    ``scalar_tensor``, then ``+``, ``-``, ``*`` with such values); else ``None``."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return sympy.Integer(v)
    if not isinstance(v, torch.fx.Node) or depth > 32:
        return None
    val = v.meta.get("val")
    if isinstance(val, torch.SymInt):
        return val.node.expr if v.op == "placeholder" or _is_shape_arith(v) or v.target is torch.ops.aten.sym_size.int \
            else None
    if not isinstance(val, torch.Tensor) or val.dim() != 0 or val.dtype.is_floating_point or val.dtype.is_complex \
            or val.dtype == torch.bool or v.op != "call_function":
        return None
    if v.target is torch.ops.aten.scalar_tensor.default:
        return _size_value(v.args[0], depth + 1)
    if (v.target in _SIZE_SAME or getattr(v.target, "overloadpacket", None) is torch.ops.aten.to) and v.args:
        return _size_value(v.args[0], depth + 1)  # an integer copy of it (its dtype checked above)
    if v.target in _SIZE_ARITH and len(v.args) == 2 and v.kwargs.get("alpha", 1) == 1:
        a, b = (_size_value(x, depth + 1) for x in v.args)
        return None if a is None or b is None else _SIZE_ARITH[v.target](a, b)
    return None


def _size_item(n: torch.fx.Node) -> Any:
    """Where ``n`` reads back as a number (``item``) an integer tensor holding a size (:func:`_size_value`): that
    size's expression, which torch.export keeps as a new symbol (DeBERTa's attention span, sliced by); else
    ``None``."""
    if n.op != "call_function" or n.target not in _READS_A_NUMBER or not n.args \
            or not isinstance(n.meta.get("val"), torch.SymInt):
        return None
    return _size_value(n.args[0])


def _checked_alone(n: torch.fx.Node) -> bool:
    """A tensor (or a piece of one, ``getitem``) that only runtime checks of its size read (BART's classification
    head: ``torch._check`` that ``unique_consecutive`` of the rows' end-of-sequence counts has one value), through
    its pieces, the unread ones too: no part of the graph, as :func:`_is_size_check`'s numbers are not."""
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        n = n.args[0]
        if not isinstance(n, torch.fx.Node) or n.op != "call_function":
            return False
    if n.target in NO_TENSOR_OPS or n.target is torch.ops.aten.sym_size.int or not n.users \
            or not isinstance(n.meta.get("val"), torch.Tensor | tuple | list):
        return False

    def checked_size(u: torch.fx.Node) -> bool:  # a size read that only checks read
        return u.target is torch.ops.aten.sym_size.int and bool(u.users) and all(_is_size_check(c) for c in u.users)

    return all(all(checked_size(c) for c in u.users) if u.target is operator.getitem else checked_size(u)
               for u in n.users) and any(u.users for u in n.users)


def _fold(ctx: CaptureContext, n: torch.fx.Node, args: Any, kwargs: Any) -> ComputationNode:
    def real(a: Any) -> Any:
        if isinstance(a, _LazyConst):
            return a.tensor
        if isinstance(a, ComputationNode):
            return torch.from_numpy(ctx.graph.param_of(a))
        return a

    result = n.target(*torch.fx.node.map_aggregate(args, real), **torch.fx.node.map_aggregate(kwargs, real))
    if isinstance(result, tuple | list) and result and all(isinstance(t, torch.Tensor) for t in result):
        return tuple(ctx.new_param(f"{n.name}_{i}", _to_numpy(t, f"{n.name}_{i}")) for i, t in enumerate(result))
    if not isinstance(result, torch.Tensor):
        raise UnsupportedOpError(f"{aten_name(n.target)} returns no tensor", {aten_name(n.target): [ctx.where()]})
    return ctx.new_param(n.name, _to_numpy(result, n.name))


def _check_shape(ctx: CaptureContext, n: torch.fx.Node, out: Any) -> None:
    val = n.meta.get("val")
    if not isinstance(out, ComputationNode) or not isinstance(val, torch.Tensor):
        return
    if len(out.shape) == val.dim() + (1 if val.dtype.is_complex else 0):
        for axis, d in enumerate(val.shape):  # a size torch cannot relate to the inputs' (a slice by a size read back
            expr = d.node.expr if isinstance(d, torch.SymInt) else None  # as a number): the IR's, which knows it
            if isinstance(expr, sympy.Symbol) and free_unbacked_symbols(expr) and expr not in ctx.unbacked:
                ctx.unbacked[expr] = _torch_size(ctx, out.shape[axis], d.node.shape_env)
    want = [ctx.ir_dim(d) for d in val.shape] + ([2] if val.dtype.is_complex else [])  # complex: real pairs
    try:
        want = [canonical_dim(d) for d in want]
    except ShapeError:
        return  # an expression beyond products: nothing to compare against
    if tuple(want) != out.shape and not (len(want) == len(out.shape) and all(
            # torch's shape of x[..., :n] along an axis k*(n//k) says n (it cannot compare the two); the IR's, the
            # whole axis (aten.slice in aten/movement.py), as the values are
            o == w or is_rounded_down(o, w) for o, w in zip(out.shape, want, strict=True))):
        fixed = [(o, w) for o, w in zip(out.shape, want, strict=False) if isinstance(w, int) and isinstance(o, str)
                 and "//" in o]
        message = f"{ctx.where()}: IR shape {format_shape(out.shape)} != torch shape {format_shape(want)} for " \
                  f"{aten_name(n.target)}"
        parts = floor_div_parts(fixed[0][0]) if fixed and len(want) == len(out.shape) else None
        names = dim_names(parts[0]) if parts is not None else set()
        if parts is None or len(names) != 1:
            raise ShapeError(message)
        raise ChunkCountFixedError(
            f"{message} (torch.export fixed {fixed[0][0]} to {fixed[0][1]}, the example's count of chunks: an "
            "example spanning several chunks helps where the scan runs over all chunks at once, as Mamba-2's does, "
            f"not where Python loops over them; dim_max={{{next(iter(names))!r}: {parts[1]}}} holds one chunk)",
            next(iter(names)), int(parts[1]))


def _without_converter(fx_nodes: Iterable[torch.fx.Node], const: set[torch.fx.Node],
                       in_place: Mapping[torch.fx.Node, Any] = {}) -> Iterator[torch.fx.Node]:
    """The call nodes of ``fx_nodes`` that no converter takes and capture cannot fold. ``const`` (the weight
    placeholders) grows with every op outside the table that reads weights alone: capture folds those to
    constants, unless the op is refused (``randn(3, 4)`` is never frozen). ``in_place`` nodes convert as
    their functional twin (:func:`.mutations.plan`)."""
    for n in fx_nodes:
        if n.op == "call_function" and n.target not in NO_TENSOR_OPS and touches_complex(n):
            if n.target not in COMPLEX_TABLE:
                yield n  # an op on complex values (carried as real pairs) that has no converter for them
            continue
        if (n.op != "call_function" or n.target in NO_TENSOR_OPS or n.target is torch.ops.aten.sym_size.int
                or _is_shape_arith(n) or _is_float_size(n) or _is_size_check(n) or _checked_alone(n)
                or _size_item(n) is not None or n.target in ATEN_TABLE or n in in_place):
            continue
        if refusal_of(n.target) is None and all(a in const for a in n.all_input_nodes):
            const.add(n)
            continue
        yield n


def _check_supported(fx_nodes: list[torch.fx.Node], weights: Mapping[str, str],
                     in_place: Mapping[torch.fx.Node, Any] = {}) -> None:
    """Raise one ``UnsupportedOpError`` naming every op outside the table and where it occurs."""
    const: set[torch.fx.Node] = {n for n in fx_nodes if n.op == "placeholder" and n.name in weights}
    missing: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for n in _without_converter(fx_nodes, const, in_place):
        refusal = refusal_of(n.target)
        stack = n.meta.get("nn_module_stack") or {}
        paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v]
        where = f"module {paths[-1]!r} (node {n.name})" if paths and paths[-1] else f"node {n.name}"
        name = f"{aten_name(n.target)} on complex values" if n.target in ATEN_TABLE and touches_complex(n) else aten_name(n.target)
        missing.setdefault(name, []).append(where)
        if refusal is not None:
            reasons[aten_name(n.target)] = f" (refused, {refusal.name}: {refusal.reason})"
    if missing:
        lines = "; ".join(f"{op}{reasons.get(op, '')} at {', '.join(w[:3])}{' ...' if len(w) > 3 else ''}"
                          for op, w in sorted(missing.items()))
        raise UnsupportedOpError(f"{len(missing)} unsupported op(s): {lines}", missing)
