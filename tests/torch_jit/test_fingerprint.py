"""Fingerprints: what changes a weight snapshot, and what does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora_graph.errors import FloraGraphError
from flora_graph.torch_jit.fingerprint import ModuleFingerprint, TensorFingerprint, check_mode, structure_epoch


def test_structure_epoch_counts_registrations() -> None:
    before = structure_epoch()
    m = nn.Linear(2, 2)  # registers two parameters
    m.extra = nn.Identity()
    assert structure_epoch() >= before + 3


def test_version_pointer_and_identity_changes() -> None:
    p = nn.Parameter(torch.zeros(3))
    fp = TensorFingerprint([p])
    assert not fp.changed()
    with torch.no_grad():
        p.add_(1)
    assert fp.changed()
    fp = TensorFingerprint([p])
    p.data = torch.ones(3)
    assert fp.changed()
    fp = TensorFingerprint([p])
    assert fp.changed([nn.Parameter(p.detach().clone())])  # another tensor in its place


def test_data_edits_need_content_mode() -> None:
    p = nn.Parameter(torch.zeros(4))
    fast, content = TensorFingerprint([p]), TensorFingerprint([p], "content")
    p.data.add_(1.0)  # .data has a fresh version counter
    assert not fast.changed()
    assert content.changed()


def test_inference_tensors_are_hashed() -> None:
    with torch.inference_mode():
        t = torch.zeros(3)
    fp = TensorFingerprint([t])
    with torch.inference_mode():
        t.add_(1)
    assert fp.changed()


def test_module_fingerprint_structure_and_values() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    fp = ModuleFingerprint(model)
    nn.Linear(4, 4)  # elsewhere in the process: the epoch moves, the structure does not
    assert not fp.changed()
    model[1] = nn.Tanh()
    assert fp.structure_changed()
    fp = ModuleFingerprint(model)
    model[0].weight.requires_grad_(False)
    assert not fp.changed() and fp.requires_grad()
    with torch.no_grad():
        model[0].bias.zero_()
    assert fp.changed()


def test_check_mode_validates() -> None:
    assert check_mode("version") == "version"
    with pytest.raises(FloraGraphError):
        check_mode("paranoid")
