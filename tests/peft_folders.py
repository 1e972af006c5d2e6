"""Editing a saved PEFT adapter folder in place, to test how loaders refuse a broken one."""

from __future__ import annotations

import json
from pathlib import Path


def edit_peft_folder(folder: Path, *, config: dict | None = None, drop: str | None = None,
                     reshape: str | None = None, shift: str | None = None) -> Path:
    """Update ``adapter_config.json`` with ``config``; drop the tensors whose key contains ``drop``;
    cut the last column off those whose key contains ``reshape``; add 0.25 to those whose key contains ``shift``.
    Returns ``folder``."""
    from safetensors.torch import load_file, save_file

    if config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if drop or reshape or shift:
        st = load_file(folder / "adapter_model.safetensors")
        if drop:
            st = {k: v for k, v in st.items() if drop not in k}
        if reshape:
            st = {k: (v[:, :-1].contiguous() if reshape in k else v) for k, v in st.items()}
        if shift:
            st = {k: (v + 0.25 if shift in k else v) for k, v in st.items()}
        save_file(st, folder / "adapter_model.safetensors")
    return folder
