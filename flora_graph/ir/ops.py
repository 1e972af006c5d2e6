"""The op set and its schemas: what the IR knows of an op without running it.

:class:`Op` is the open set of IR ops. The IR itself declares only the leaves (``Input``,
``Const``); every other op is declared, with its schema and its numpy, ONNX and torch rules
side by side, in one family module of :mod:`flora_graph.ops` through
:func:`flora_graph.ops.registry.define`, which calls :func:`register_op` here. Importing
``flora_graph`` imports :mod:`flora_graph.ops`, so the set is complete before any graph is
built.

Semantics follow ONNX where ONNX has the op (so lowering is direct), with weight layouts
taken from torch: ``Linear(x, W, b)`` is ``x @ W.T + b`` with ``W`` of shape ``[out, in]``.
Every node produces one value: ``Split`` carries the ``index`` of the piece it yields.

Sizes that depend on a dynamic dim are attributes of kind ``"dim"`` (one int or dim name)
or ``"dims"`` (a tuple of them), never shape tensors: ``Arange(end="seq")``,
``Expand(shape=("batch", 1, "seq", "seq"))``. Names are canonicalized like shape dims and
resolve at run time from the sizes the graph inputs bind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flora_graph.errors import GraphError, ShapeError
from flora_graph.ir.shapes import Dim, Shape, canonical_dim

__all__ = [
    "DTYPES", "FLOAT_DTYPES", "SCHEMAS", "AttrSpec", "InferFn", "Op", "OpGroup", "OpSchema", "register_op", "schema",
]

DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64", "bool")
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


class _OpSet(type):
    """Makes the class :class:`Op` iterable over its members, as an ``enum.Enum`` is."""

    def __iter__(cls) -> Iterator[Op]:
        return iter(list(cls._members.values()))  # type: ignore[attr-defined]

    def __len__(cls) -> int:
        return len(cls._members)  # type: ignore[attr-defined]


class Op(metaclass=_OpSet):
    """One IR op. ``Op.LINEAR`` is a member; ``.value`` (``"Linear"``) is its name in text and JSON.

    Behaves as an ``enum.Enum`` member would (``Op("Linear") is Op.LINEAR``, identity
    comparison, iteration over ``Op``), but the set is open: :func:`register_op` adds a member.
    """

    __slots__ = ("name", "value")
    _members: ClassVar[dict[str, Op]] = {}
    name: str
    value: str

    def __new__(cls, value: str) -> Op:
        try:
            return cls._members[value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not an op of the IR") from None

    @classmethod
    def _declare(cls, name: str, value: str) -> Op:
        if value in cls._members or hasattr(cls, name):
            raise GraphError(f"op {name} ({value!r}) is declared twice")
        if not (name.isidentifier() and name.isupper()) or not value.isidentifier():
            raise GraphError(f"op name {name!r} / value {value!r}: want an UPPER_CASE identifier and an identifier")
        op = object.__new__(cls)
        object.__setattr__(op, "name", name)
        object.__setattr__(op, "value", value)
        cls._members[value] = op
        setattr(cls, name, op)
        return op

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Op members are immutable")

    def __repr__(self) -> str:
        return f"<Op.{self.name}: {self.value!r}>"

    def __str__(self) -> str:
        return f"Op.{self.name}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Op, (self.value,))

    def __copy__(self) -> Op:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Op:
        return self


class OpGroup:
    """Membership sets, so passes test ``op in OpGroup.Binary`` rather than tuples inline.

    Filled by :func:`register_op` from each op's ``groups``.
    """

    Leaf: frozenset[Op] = frozenset()
    Binary: frozenset[Op] = frozenset()  # elementwise, broadcasting, two operands of one float dtype
    Commutative: frozenset[Op] = frozenset()
    Unary: frozenset[Op] = frozenset()  # elementwise, one operand, same shape and dtype
    Movement: frozenset[Op] = frozenset()  # data movement only: never computes, never widens a dtype
    Compare: frozenset[Op] = frozenset()
    Logical: frozenset[Op] = frozenset()
    Reduce: frozenset[Op] = frozenset()
    DynamicSize: frozenset[Op] = frozenset()  # ops with attributes of kind "dims"/"dim"
    Adapter: frozenset[Op] = frozenset()  # adapter slots: weights fed at run time, never folded or merged

    @classmethod
    def names(cls) -> list[str]:
        """The group names."""
        return [k for k, v in vars(cls).items() if isinstance(v, frozenset)]


@dataclass(frozen=True)
class AttrSpec:
    """One attribute: its kind and default (``required`` when it has none)."""

    kind: str  # "int", "float", "str", "ints", "dim" (an int or a dim name), "dims" (a tuple of those)
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] | None = None


InferFn = Callable[[Sequence[Shape], Sequence[str], dict[str, Any]], tuple[Shape, str]]


@dataclass(frozen=True)
class OpSchema:
    """What the IR knows of an op without running it."""

    op: Op
    min_inputs: int
    max_inputs: int | None  # None: variadic
    attrs: dict[str, AttrSpec] = field(default_factory=dict)
    infer: InferFn | None = None  # None for leaves: shape/dtype are given
    doc: str = ""

    def check_arity(self, n: int, where: str) -> None:
        """Raise ``GraphError`` naming ``where`` when ``n`` inputs do not fit."""
        hi = self.max_inputs
        if n < self.min_inputs or (hi is not None and n > hi):
            want = (
                f"{self.min_inputs}"
                if hi == self.min_inputs
                else f"{self.min_inputs}..{'n' if hi is None else hi}"
            )
            raise GraphError(f"node {where!r} ({self.op.value}) takes {want} inputs, got {n}")

    def normalize_attrs(self, attrs: dict[str, Any], where: str) -> dict[str, Any]:
        """Validate ``attrs`` against the schema, fill defaults, return a new dict."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise GraphError(
                f"node {where!r} ({self.op.value}) has unknown attribute(s) {sorted(unknown)}"
            )
        out: dict[str, Any] = {}
        for name, spec in self.attrs.items():
            if name not in attrs:
                if spec.required:
                    raise GraphError(
                        f"node {where!r} ({self.op.value}) is missing attribute {name!r}"
                    )
                out[name] = spec.default
                continue
            out[name] = _coerce_attr(attrs[name], spec, f"{where}.{name}")
        return out


def _coerce_attr(value: Any, spec: AttrSpec, where: str) -> Any:
    bad = GraphError(f"attribute {where!r} = {value!r} is not a valid {spec.kind}")
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return int(value)
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if spec.kind == "str":
        if not isinstance(value, str):
            raise bad
        if spec.choices and value not in spec.choices:
            raise GraphError(
                f"attribute {where!r} = {value!r} must be one of {list(spec.choices or ())}"
            )
        return value
    if spec.kind == "ints":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        return tuple(int(v) for v in value)
    if spec.kind == "dim":
        return _coerce_dim(value, bad)
    if spec.kind == "dims":
        if not isinstance(value, list | tuple):
            raise bad
        return tuple(_coerce_dim(v, bad) for v in value)
    raise AssertionError(f"unknown attribute kind {spec.kind}")  # pragma: no cover


def _coerce_dim(value: Any, bad: GraphError) -> Dim:
    """An int (any sign: an op gives negatives their meaning) or a dim name, canonicalized."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise bad
    if isinstance(value, int):
        return int(value)
    try:
        return canonical_dim(value)
    except ShapeError:
        raise bad from None


SCHEMAS: dict[Op, OpSchema] = {}
"""The schema of every op, leaves included (filled by :func:`register_op`)."""
_ATTR_KINDS = frozenset({"int", "float", "str", "ints", "dim", "dims"})


def register_op(
    name: str,
    value: str,
    min_inputs: int,
    max_inputs: int | None,
    attrs: dict[str, AttrSpec] | None = None,
    infer: InferFn | None = None,
    doc: str = "",
    groups: Iterable[str] = (),
) -> OpSchema:
    """Declare op ``Op.<name>`` (text/JSON name ``value``) with its schema and group memberships.

    The one way an op enters the IR; :func:`flora_graph.ops.registry.define` calls it with the
    op's rules. Raises :class:`GraphError` for a duplicate op, an unknown group or attribute kind.
    """
    attrs = dict(attrs or {})
    for key, spec in attrs.items():
        if spec.kind not in _ATTR_KINDS:
            raise GraphError(f"op {value!r}: attribute {key!r} has unknown kind {spec.kind!r}")
    groups = tuple(groups)
    unknown = [g for g in groups if g not in OpGroup.names()]
    if unknown:
        raise GraphError(f"op {value!r}: unknown group(s) {unknown}; groups are {OpGroup.names()}")
    if not doc:
        raise GraphError(f"op {value!r} needs a one-line doc")
    op = Op._declare(name, value)
    if any(s.kind in ("dim", "dims") for s in attrs.values()):
        groups = (*groups, "DynamicSize")
    for g in groups:
        setattr(OpGroup, g, getattr(OpGroup, g) | {op})
    SCHEMAS[op] = OpSchema(op, min_inputs, max_inputs, attrs, infer, doc)
    return SCHEMAS[op]


def schema(op: Op) -> OpSchema:
    """The schema of ``op``."""
    return SCHEMAS[op]


register_op("INPUT", "Input", 0, 0, {}, None, "A graph input; shape and dtype are declared.", ["Leaf"])
register_op("CONST", "Const", 0, 0, {"param": AttrSpec("str", required=True)}, None,
            "A named weight from graph.params.", ["Leaf"])
