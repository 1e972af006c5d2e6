"""Models that ship with the package (no download): the demo default model."""

from __future__ import annotations

from flora_graph.models.demo import DemoNet, build_demo_model, demo_inputs
from flora_graph.models.mlp_stack import PROJECTIONS, MLPStack, build_mlp_stack

__all__ = ["PROJECTIONS", "DemoNet", "MLPStack", "build_demo_model", "build_mlp_stack", "demo_inputs"]
