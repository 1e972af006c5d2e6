"""Shared caches: decode steps whose past and present are one buffer (IOBinding, in place) equal ONNX
Runtime's plain runs on concatenated caches, and follow an adapter that is loaded again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from flora_graph.runtimes.ort_contrib import CACHE_PADDING_KEY
from flora_graph.serving.session import AdapterSession, load_params
from flora_graph.serving.shared_cache import SharedCache
from flora_graph.serving.slots import ADAPTER_FLAG
from tests.serving.genai_package import PROMPT


def test_in_place_steps_equal_plain_runs_and_follow_a_reloaded_adapter(package: Path) -> None:
    dec = json.loads((package / "genai_config.json").read_text())["model"]["decoder"]
    layers = dec["num_hidden_layers"]
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    sess = AdapterSession(package / "model.onnx", intra_op_threads=1)
    assert sess.model.metadata[CACHE_PADDING_KEY] == "right"
    adapter = package / "adapters" / "all7.onnx_adapter"
    sess.load_adapter("all7", adapter)
    empty = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)

    def plain(ids: list[int], caches: list[np.ndarray], length: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, length), np.int64), **dict(zip(past, caches, strict=True))}
        return sess.run(feeds, "all7")

    n = len(PROMPT)
    out = plain(PROMPT, [empty] * len(past), n)
    caches = [out[k] for k in present]
    shared = SharedCache(past, present, np.dtype(np.int64), np.dtype(np.int64))
    capacity = n + 6
    shared.set([np.concatenate([c, np.zeros((*c.shape[:2], capacity - n, c.shape[3]), c.dtype)], axis=2) for c in caches],
               np.array([n]))
    vocab = (out["logits"].shape[-1], out["logits"].dtype)
    token = int(out["logits"][0, -1].argmax())

    def step(length: int) -> np.ndarray:
        key, inputs = sess.adapter_inputs("all7")
        return shared.run(sess.model.session, "all7", key, lambda: inputs, [token], np.array([length]), vocab,
                          lambda: "test step").copy()

    for _ in range(3):
        want = plain([token], caches, n + 1)
        got = step(n)
        np.testing.assert_allclose(got[0, -1], want["logits"][0, -1], atol=2e-5, rtol=1e-4)
        caches = [want[k] for k in present]
        for buf, c in zip(shared.arrays, caches, strict=True):  # the new position written in place
            np.testing.assert_allclose(buf[:, :, :n + 1], c, atol=2e-5, rtol=1e-4)
            assert not buf[:, :, n + 1:].any()
        token, n = int(got[0, -1].argmax()), n + 1
    before = step(n)
    doubled = {k: v * 2 for k, v in load_params(adapter, sess.model.spec, "all7").items() if k != ADAPTER_FLAG}
    sess.load_adapter("all7", doubled, replace=True)  # the binding made for the old weights is made again
    after = step(n)
    want = plain([token], caches, n + 1)
    np.testing.assert_allclose(after[0, -1], want["logits"][0, -1], atol=2e-5, rtol=1e-4)
    assert np.abs(after - before).max() > 1e-3
