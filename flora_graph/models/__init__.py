"""Models that ship with the package (no download): the demo default model."""

from __future__ import annotations

from flora_graph.models.demo import DemoNet, build_demo_model, demo_inputs

__all__ = ["DemoNet", "build_demo_model", "demo_inputs"]
