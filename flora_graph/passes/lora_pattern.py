"""The LoRA pattern, written once with :class:`~flora_graph.passes.rules.Pat`.

``Add(base(x, W[, b]), Mul(up(down(x, A), B), s))`` where ``base``/``down``/``up`` are all
``Linear`` or all ``Conv2d``, ``W``/``A``/``B`` are weights (``Const`` or expressions of
them), ``s`` is a scalar weight, and both branches read the same ``x`` node. Recognised
without tags: ``Add`` in either operand order, the scalar on either side of ``Mul``, and
the scale already folded (no ``Mul``). Tags (``meta["module"]``, ``meta["adapter"]``) are
used only to name what passes create.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.passes.rewrite import RewriteContext, static_nodes
from flora_graph.passes.rules import Match, Pat

__all__ = ["EMBEDDING_LORA", "EXPERT_LORA", "LORA", "LORA_BRANCH", "LORA_KINDS", "SCALED_BRANCH", "LoRAMatch", "find_lora", "match_lora"]

LORA_KINDS = (Op.LINEAR, Op.CONV2D)


def _is_scalar(n: ComputationNode) -> bool:
    return math.prod(int(d) for d in n.shape) == 1


def _no_broadcast(n: ComputationNode) -> bool:
    """``Mul`` by a scalar that does not add dims to its other operand."""
    return any(tuple(i.shape) == tuple(n.shape) for i in n.inputs)


def _branch(op: Op) -> Pat:
    down = Pat(op, (Pat.any("x"), Pat.weight("A")), name="down")
    return Pat(op, (down, Pat.weight("B")), name="up")


def _scaled(up: Pat) -> Pat:
    return Pat(Op.MUL, (up, Pat.weight("s", pred=_is_scalar)), name="scale", pred=_no_broadcast)


def _lora(op: Op) -> Pat:
    base = Pat(op, (Pat.any("x"), Pat.weight("W")), name="base", extra=True)
    up = _branch(op)
    return Pat(Op.ADD, (base, _scaled(up) | up), name="add")


LORA_BRANCH: Pat = _branch(Op.LINEAR) | _branch(Op.CONV2D)
"""``up(down(x, A), B)``: root is the up projection (``Linear`` or ``Conv2d``; ``down`` has no bias)."""

SCALED_BRANCH: Pat = _scaled(_branch(Op.LINEAR)) | _scaled(_branch(Op.CONV2D))
"""``Mul(up(down(x, A), B), s)`` with ``s`` a scalar weight; root is the ``Mul``."""

LORA: Pat = _lora(Op.LINEAR) | _lora(Op.CONV2D)
"""The whole adapter: root is the ``Add``."""


def _rows_by_id(n: ComputationNode) -> bool:
    return n.attrs.get("axis") == 0


def _tagged(n: ComputationNode) -> bool:
    """A node capture (or ``export_graph``) tagged as a LoRA adapter's."""
    return bool(n.meta.get("module")) and n.meta.get("role") == "lora_add"


def _embedding_lora() -> Pat:
    rows = Pat(Op.GATHER, (Pat.weight("W"), Pat.any("x")), name="base", pred=_rows_by_id)
    # a scaled embedding (Gemma 3's rows times sqrt(hidden)), whose base layer's own forward scales its rows
    scaled = Pat(Op.MUL, (Pat(Op.GATHER, (Pat.weight("W"), Pat.any("x")), name="rows", pred=_rows_by_id),
                          Pat.weight("embed_scale", pred=_is_scalar)), name="base", pred=_no_broadcast)
    base = rows | scaled
    down = Pat(Op.GATHER, (Pat.weight("A"), Pat.any("x")), name="down", pred=_rows_by_id)
    up = Pat(Op.LINEAR, (down, Pat.weight("B")), name="up")
    # PEFT scales the branch by the layer's embed_scale too (Gemma 3's embedding scales its own rows): a second scalar
    twice = Pat(Op.MUL, (_scaled(up), Pat.weight("s2", pred=_is_scalar)), name="scale2", pred=_no_broadcast)
    return Pat(Op.ADD, (base, twice | _scaled(up) | up), name="add", pred=_tagged)


EMBEDDING_LORA: Pat = _embedding_lora()
"""An embedding's adapter, ``Add(Gather(W, ids), Mul(Linear(Gather(A.T, ids), B), s))`` (PEFT's ``lora_embedding_A``
/ ``_B``, rows by token id; the base rows may be scaled by a scalar weight, as Gemma 3's embedding scales them, and the
branch by a second one, as PEFT scales it then, bound as ``s2``): root is the ``Add``, which must carry capture's
``lora_add`` tag (an untagged gather-and-project beside an embedding, a factorised embedding, is the model's own); ``A`` binds the static
``[vocab, r]`` table the ids index (``A.T`` of PEFT's ``[r, vocab]``). The adapter slots and ``merge-lora`` read
it; the fusing rules leave an embedding's branch as captured."""


def _plain_product(n: ComputationNode) -> bool:
    return not n.attrs.get("transposed")


def _expert_lora() -> Pat:
    down = Pat(Op.EXPERT_LINEAR, (Pat.any("x"), Pat.weight("A"), Pat.any("ids")), name="down", pred=_plain_product)
    up = Pat(Op.EXPERT_LINEAR, (down, Pat.weight("B"), Pat.any("ids")), name="up", pred=_plain_product)
    return Pat(Op.ADD, (Pat.any("base"), _scaled(up) | up), name="add", pred=_tagged)


EXPERT_LORA: Pat = _expert_lora()
"""LoRA on a mixture of experts' expert tensor (PEFT's ``target_parameters``), as
:func:`~flora_graph.passes.param_lora.split_param_lora` writes it: ``Add(base, Mul(ExpertLinear(ExpertLinear(x, A,
ids), B, ids), s))`` with ``A`` ``[experts, r, in]`` and ``B`` ``[experts, out, r]``, each (token, expert) pair's
own expert's factors; root is the ``Add``, which must carry the ``lora_add`` tag. The adapter slots read it; no
fusing or merging rule does."""


@dataclass
class LoRAMatch:
    """One recognised adapter (or bare branch when ``add``/``base`` are ``None``)."""

    op: Op
    x: ComputationNode
    down: ComputationNode
    up: ComputationNode
    A: ComputationNode
    B: ComputationNode
    base: ComputationNode | None = None
    W: ComputationNode | None = None
    bias: ComputationNode | None = None
    scale: ComputationNode | None = None
    s: ComputationNode | None = None
    add: ComputationNode | None = None
    scale2: ComputationNode | None = None  # an embedding's branch scaled once more (PEFT's embed_scale)
    s2: ComputationNode | None = None

    @classmethod
    def from_match(cls, m: Match) -> LoRAMatch:
        """Build from a match of :data:`LORA`, :data:`EMBEDDING_LORA`, :data:`EXPERT_LORA`, :data:`LORA_BRANCH` or
        :data:`SCALED_BRANCH`."""
        base = m.get("base")
        if m["down"].op is Op.EXPERT_LINEAR:  # the base is the experts' product, whatever its form
            return cls(op=Op.EXPERT_LINEAR, x=m["x"], down=m["down"], up=m["up"], A=m["A"], B=m["B"], base=base,
                       scale=m.get("scale"), s=m.get("s"), add=m.get("add"))
        return cls(
            # the down projection's op: Gather for an embedding's adapter, whose up projection is a Linear
            op=m["down"].op, x=m["x"], down=m["down"], up=m["up"], A=m["A"], B=m["B"], base=base, W=m.get("W"),
            bias=base.inputs[2] if base is not None and len(base.inputs) == 3 else None,
            scale=m.get("scale"), s=m.get("s"), add=m.get("add"), scale2=m.get("scale2"), s2=m.get("s2"),
        )

    @property
    def rank(self) -> int:
        """``r``: rows of ``A`` (columns of an embedding's ``[vocab, r]`` table; an expert's rows of ``A[e]``)."""
        return int(self.A.shape[1] if self.op in (Op.GATHER, Op.EXPERT_LINEAR) else self.A.shape[0])

    @property
    def ids(self) -> ComputationNode | None:
        """An expert site's per-pair expert ids (``None`` for other sites)."""
        return self.down.inputs[2] if self.op is Op.EXPERT_LINEAR else None

    @property
    def nodes(self) -> list[ComputationNode]:
        """The non-weight nodes of the match, root last."""
        return [n for n in (self.base, self.down, self.up, self.scale, self.scale2, self.add) if n is not None]

    @property
    def module(self) -> str:
        """``meta["module"]`` of a tagged node, else the name of the base (or up) node."""
        for n in self.nodes:
            if n.meta.get("module"):
                return str(n.meta["module"])
        return (self.base or self.up).name

    @property
    def adapter(self) -> str | None:
        """``meta["adapter"]`` of a tagged node, if any."""
        for n in self.nodes:
            if n.meta.get("adapter"):
                return str(n.meta["adapter"])
        return None

    def scale_value(self, ctx: RewriteContext) -> float:
        """The scalar ``s`` (``1.0`` when the scale is folded away), times ``s2`` where the branch has it."""
        return math.prod(float(np.asarray(ctx.value(v), dtype=np.float64).reshape(()))
                         for v in (self.s, self.s2) if v is not None)


def match_lora(node: ComputationNode, static: set[ComputationNode], pattern: Pat = LORA) -> LoRAMatch | None:
    """The first way ``node`` matches ``pattern`` (default: the whole adapter), as a :class:`LoRAMatch`."""
    for b in pattern.match(node, static):
        return LoRAMatch.from_match(Match(node, b))
    return None


def find_lora(graph: Graph, pattern: Pat = LORA) -> Iterator[LoRAMatch]:
    """Every node of ``graph`` matching ``pattern``, in graph order."""
    static = static_nodes(graph)
    ops = pattern.root_ops()
    for n in graph.nodes:
        if ops is None or n.op in ops:
            m = match_lora(n, static, pattern)
            if m is not None:
                yield m
