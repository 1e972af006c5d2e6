"""``flora_graph.jit`` is the function whatever was imported first (the JIT package is ``flora_graph.torch_jit``)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import torch
import flora_graph

model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
x = torch.randn(2, 4)
compiled = torch.compile(model, backend="flora_graph")  # imports flora_graph.torch_jit.dynamo
assert torch.allclose(compiled(x), model(x), atol=1e-5)
import flora_graph.torch_jit  # the subpackage, imported explicitly too
jitted = flora_graph.jit(model)
assert type(jitted).__name__ == "JitModule", type(jitted)
assert torch.allclose(jitted(x), model(x), atol=1e-5)
from flora_graph import jit
assert jit is flora_graph.jit and callable(jit)
print("ok")
"""


def test_jit_is_callable_after_torch_compile_used_the_backend() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
