"""Sliding windows counted in tokens, not cache slots, in a captured causal LM.

transformers builds a sliding-window mask (Mistral, Qwen2, Gemma 2 and 3, ...) from cache
indices: key ``k`` is seen from query ``q`` when ``k > q - window``. That counts tokens only
while a row's tokens sit in consecutive cache slots: alone, or left-padded as
:class:`~flora_graph.serving.generate.Generator` batches them. ONNX Runtime GenAI pads a batch of
prompts on the right, so a shorter row's generated tokens follow its padding and an index window
covers padding instead of tokens.

:func:`windows_by_position` rewrites each such band, as :func:`~flora_graph.frontend.causal_lm.capture_causal_lm`
captures it, to compare token positions, ``cumsum(attention_mask) - 1`` over the cache::

    Greater(key index, Sub(query index, window))
      -> Greater(Unsqueeze(pos, [1, 2]), Sub(Unsqueeze(Slice(pos, past_seq, past_seq+seq), [1, 3]), window))

Where every slot before a row's last token is a token or left padding the two are equal (a row's
positions are its indices less its padding), so nothing changes there; the causal part
(``key index <= query index``) is left as it is, as cache order is token order either way.
:mod:`~flora_graph.runtimes.ort_contrib` reads the rewritten band as ``GroupQueryAttention``'s local window.
"""

from __future__ import annotations

import numpy as np

from flora_graph.ir import ComputationNode, Graph, Op
from flora_graph.ir.graph import infer_node
from flora_graph.ir.shapes import canonical_dim

__all__ = ["windows_by_position"]

MASK = "attention_mask"


def _strip(n: ComputationNode) -> ComputationNode:
    """``n`` under any ``Unsqueeze``\\ s."""
    while n.op is Op.UNSQUEEZE:
        n = n.inputs[0]
    return n


def _scalar(n: ComputationNode, graph: Graph) -> float | None:
    """The value of a one-element constant, else ``None``."""
    if n.op is not Op.CONST:
        return None
    v = np.asarray(graph.param_of(n))
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def _arange(n: ComputationNode, start: object, end: object) -> bool:
    """Whether ``n`` is ``Arange(start, end, 1)`` (dims compared canonically)."""
    a = n.attrs
    return (n.op is Op.ARANGE and a.get("step") == 1 and canonical_dim(a.get("start")) == canonical_dim(start)
            and canonical_dim(a.get("end")) == canonical_dim(end))


def _is_index(n: ComputationNode, graph: Graph, total: object) -> bool:
    """Whether ``n`` is the cache indices ``0 .. total - 1`` (an ``Arange``, plus 0 at most), under ``Unsqueeze``\\ s."""
    n = _strip(n)
    if n.op is Op.ADD and len(n.inputs) == 2 and _scalar(n.inputs[1], graph) == 0:
        n = n.inputs[0]
    return _arange(n, 0, total)


def _is_query_index(n: ComputationNode, past: object, seq: object) -> bool:
    """Whether ``n`` is the new tokens' cache indices ``past .. past + seq - 1``, under ``Unsqueeze``\\ s:
    ``Arange(past, past + seq)`` or ``Arange(0, seq)`` plus (a reshape of) ``Arange(past, past + 1)``."""
    n = _strip(n)
    if _arange(n, past, f"{past}+{seq}"):
        return True
    if n.op is not Op.ADD or len(n.inputs) != 2 or not _arange(n.inputs[0], 0, seq):
        return False
    off = n.inputs[1]
    while off.op is Op.RESHAPE:
        off = off.inputs[0]
    return _arange(off, past, f"{past}+1")


def windows_by_position(graph: Graph) -> int:
    """Rewrite ``graph`` (a :func:`~flora_graph.frontend.causal_lm.capture_causal_lm` capture) in place so
    every sliding window over cache indices counts token positions (see the module docstring); return
    how many bands it rewrote (0 for a model without a sliding window)."""
    mask = next((i for i in graph.inputs if i.name == MASK), None)
    if mask is None or len(mask.shape) != 2:
        return 0
    total = canonical_dim(mask.shape[1])
    ids = next((i for i in graph.inputs if i.name == "input_ids"), None)
    seq = canonical_dim(ids.shape[1]) if ids is not None and len(ids.shape) == 2 else None
    if seq is None or not isinstance(total, str) or not isinstance(seq, str) or not total.endswith(f"+{seq}"):
        return 0
    past = total.removesuffix(f"+{seq}")
    bands = []
    for n in graph.nodes:
        if n.op is not Op.GREATER or len(n.inputs) != 2:
            continue
        key, sub = n.inputs
        window = _scalar(sub.inputs[1], graph) if sub.op is Op.SUB and len(sub.inputs) == 2 else None
        if (window is not None and window == int(window) > 0 and _is_index(key, graph, total)
                and _is_query_index(sub.inputs[0], past, seq) and len(key.shape) == 4 and len(sub.shape) == 4):
            bands.append((n, sub.inputs[1]))
    if not bands:
        return 0
    counts = mask if mask.dtype == "int64" else graph.add(Op.CAST, [mask], {"to": "int64"}, name="window.mask")
    one = graph.const("window.one", np.array(1, np.int64), name="window.one")
    pos = graph.add(Op.SUB, [graph.add(Op.CUMSUM, [counts], {"axis": 1}, name="window.cumsum"), one],
                    name="window.positions")
    key_pos = graph.add(Op.UNSQUEEZE, [pos], {"axes": (1, 2)}, name="window.key_positions")
    new = graph.add(Op.SLICE, [pos], {"axes": (1,), "starts": (past,), "ends": (total,)}, name="window.new_positions")
    query_pos = graph.add(Op.UNSQUEEZE, [new], {"axes": (1, 3)}, name="window.query_positions")
    changed: set[ComputationNode] = set()
    for n, width in bands:
        low = graph.add(Op.SUB, [query_pos, width], name=f"{n.name}.by_position/low")
        band = graph.add(Op.GREATER, [key_pos, low], name=f"{n.name}.by_position")
        graph.replace_all_uses(n, band)
        changed.add(band)
    graph.toposort()
    graph.remove_dead()
    for n in graph.nodes:  # the masks the bands feed gain the batch dim the positions have
        if n.op is not Op.CONST and n.inputs and any(i in changed for i in n.inputs):
            _, shape, _ = infer_node(n.op, n.inputs, n.attrs, n.name)
            if shape != tuple(n.shape):
                n.shape = shape
                changed.add(n)
    return len(bands)
