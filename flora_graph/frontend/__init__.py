"""Frontend: capture PyTorch models as flora_graph graphs through ``torch.export``."""

from __future__ import annotations

from flora_graph.frontend.aten import ATEN_TABLE
from flora_graph.frontend.capture import capture
from flora_graph.frontend.model_outputs import max_abs_diff, no_kv_cache, output_tensors

__all__ = ["ATEN_TABLE", "capture", "max_abs_diff", "no_kv_cache", "output_tensors"]
