"""Models that ship with the package (no download): the demo default model, an MLP stack, a Llama-style decoder."""

from __future__ import annotations

from flora_graph.models.decoder import Decoder, DecoderConfig, build_decoder, byte_tokenize
from flora_graph.models.demo import DemoNet, build_demo_model, demo_inputs
from flora_graph.models.mlp_stack import PROJECTIONS, MLPStack, build_mlp_stack

__all__ = [
    "PROJECTIONS",
    "Decoder",
    "DecoderConfig",
    "DemoNet",
    "MLPStack",
    "build_decoder",
    "build_demo_model",
    "build_mlp_stack",
    "byte_tokenize",
    "demo_inputs",
]
