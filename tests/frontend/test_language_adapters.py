"""X-MOD's per-language adapters (each row's chosen by its ``lang_ids``) captured through the dense swap of
:func:`~flora_graph.frontend.traceable.traceable_experts`, against eager PEFT on a batch of rows in different
languages (one left-padded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flora_graph.frontend import capture  # noqa: E402
from flora_graph.frontend.traceable import traceable_experts  # noqa: E402
from flora_graph.passes import optimize  # noqa: E402
from flora_graph.runtimes import compile  # noqa: E402

LANGUAGES = ("en_XX", "de_DE", "fr_XX")


def _xmod(ln_before_adapter: bool = True, adapter_layer_norm: bool = False):
    cfg = transformers.XmodConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, languages=LANGUAGES,
                                  default_language="en_XX", ln_before_adapter=ln_before_adapter,
                                  adapter_layer_norm=adapter_layer_norm)
    torch.manual_seed(0)
    base = transformers.XmodModel(cfg, add_pooling_layer=False).eval()
    spec = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense1", "dense2"],
                           init_lora_weights=False)
    return peft.get_peft_model(base, spec).eval()


@pytest.mark.parametrize("ln_before_adapter,adapter_layer_norm", [(True, False), (False, True)])
def test_rows_in_different_languages_match_eager_peft(ln_before_adapter: bool, adapter_layer_norm: bool) -> None:
    model = _xmod(ln_before_adapter, adapter_layer_norm)
    example = {"input_ids": torch.randint(3, 64, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long),
               "lang_ids": torch.tensor([0, 1])}
    g = capture(model, example, {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                 "lang_ids": {0: "batch"}})
    assert any(n.meta.get("adapter") for n in g.nodes if "dense1" in n.name)  # the adapters' own LoRA sites
    check = {"input_ids": torch.randint(3, 64, (4, 9), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.ones(4, 9, dtype=torch.long), "lang_ids": torch.tensor([2, 0, 1, 2])}
    check["attention_mask"][1, :3] = 0
    with torch.no_grad():
        want = model(**check).last_hidden_state.numpy()
        # every language's adapter matters: the rows would differ under another language
        other = model(**{**check, "lang_ids": torch.tensor([0, 1, 2, 0])}).last_hidden_state.numpy()
    assert np.abs(want - other).max() > 1e-2
    for preset in ("unfused", "merged"):
        got = compile(optimize(g, preset, backend="onnxruntime"), "onnxruntime")(**check)
        np.testing.assert_allclose(next(iter(got.values())), want, atol=1e-5, rtol=1e-5, err_msg=preset)


def test_the_swap_is_only_while_capturing() -> None:
    model = _xmod()
    outputs = [m for m in model.modules() if type(m).__name__ == "XmodOutput"]
    with traceable_experts(model) as switched:
        assert len(switched) == len(outputs) == 2
        assert all("lang_adapter" in vars(m) for m in outputs)
    assert not any("lang_adapter" in vars(m) for m in outputs)
