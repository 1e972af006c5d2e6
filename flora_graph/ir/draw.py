"""Pictures of graphs: one panel per graph, adapter branches coloured by role."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import networkx as nx

from flora_graph.errors import GraphError
from flora_graph.ir.graph import Graph
from flora_graph.ir.ops import Op
from flora_graph.storage import atomic_write_figure

__all__ = ["ROLE_COLOURS", "draw_graphs"]

ROLE_COLOURS = {
    "base": "#9ecae1",
    "lora_down": "#fdae6b",
    "lora_up": "#fd8d3c",
    "lora_scale": "#e6550d",
    "lora_add": "#a63603",
    "merged": "#74c476",
}
_PLAIN, _INPUT = "#dddddd", "#ffffff"


def _view(graph: Graph) -> nx.DiGraph:
    """The graph without weights, each node at its depth (longest path from an input)."""
    g = nx.DiGraph()
    depth: dict[str, int] = {}
    for n in graph.nodes:
        if n.op is Op.CONST:
            continue
        reads = [i.name for i in n.inputs if i.op is not Op.CONST]
        depth[n.name] = 1 + max((depth[r] for r in reads), default=-1)
        g.add_node(n.name, layer=depth[n.name], op=n.op, role=n.meta.get("role", ""))
        g.add_edges_from((r, n.name) for r in reads)
    return g


def draw_graphs(graphs: Sequence[Graph], path: str | Path, titles: Sequence[str] | None = None) -> None:
    """Render ``graphs`` side by side to ``path`` (``.png`` or ``.svg``, written atomically).

    Weights (``Const``) are left out; nodes are coloured by ``meta["role"]``.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg"):
        raise GraphError(f"cannot draw to {path}: use a .png or .svg file name")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(graphs), figsize=(7 * len(graphs), 9), squeeze=False)
    for k, (ax, graph) in enumerate(zip(axes[0], graphs, strict=True)):
        g = _view(graph)
        pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal")
        pos = {name: (float(x), -float(y)) for name, (x, y) in pos.items()}
        colours = [_INPUT if d["op"] is Op.INPUT else ROLE_COLOURS.get(d["role"], _PLAIN) for _, d in g.nodes(data=True)]
        labels = {name: d["op"].value for name, d in g.nodes(data=True)}
        nx.draw_networkx(g, pos, ax=ax, node_color=colours, labels=labels, font_size=6, node_size=420,
                         edgecolors="#555555", arrowsize=8)
        ax.set_title(titles[k] if titles else f"{graph.name}: {len(graph.nodes)} nodes", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    atomic_write_figure(path, fig, fmt=fmt)
