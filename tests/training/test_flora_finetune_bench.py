"""``benchmarks/flora_finetune.py`` on a tiny config: every method and variant runs, results and cache are sound."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
METHODS = ["adam", "adafactor+m", "adafactor", "flora r=8", "lora r=8"]


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        yield importlib.import_module("flora_finetune")


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    argv = ["--hidden", "32", "--layers", "1", "--seq", "32", "--batch", "8", "--accum", "4", "--steps", "8",
            "--pretrain-steps", "30", "--pretrain-bytes", "65536", "--docs-bytes", "120000", "--eval-every", "4",
            "--eval-batches", "2", "--seeds", "0", "1", "--lrs", "4e-3", "8e-3", "--methods", *METHODS,
            "--cache", str(root / "cache"), "--out", str(root / "out")]
    record = bench.main(argv)
    return bench, root, argv, record


def test_every_method_and_variant_is_reported(tiny):
    _, root, _, record = tiny
    on_disk = json.loads((root / "out" / "flora_finetune.json").read_text())
    assert on_disk["summary"].keys() == record["summary"].keys()
    want = {f"{m}/none" for m in METHODS} | {f"{m}/full" for m in METHODS if not m.startswith("flora")}
    want |= {"flora r=8/compressed", "flora r=8/full"}
    assert set(record["summary"]) == want
    assert (root / "out" / "flora_finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key, s in record["summary"].items():
        assert s["seeds"] == [0, 1], key  # the best lr ran on every seed
        assert all(math.isfinite(x) for x in s["losses"]), key
        assert s["min"] <= s["mean"] <= s["max"]
        assert s["state_bytes"] > 0 and (s["accum_bytes"] > 0) == (s["variant"] != "none")
    # compressed buffers are smaller than full ones; Flora's state is smaller than Adafactor+m's
    summ = record["summary"]
    assert summ["flora r=8/compressed"]["accum_bytes"] < summ["flora r=8/full"]["accum_bytes"]
    assert summ["flora r=8/none"]["state_bytes"] < summ["adafactor+m/none"]["state_bytes"]
    assert summ["adafactor/none"]["state_bytes"] < summ["flora r=8/none"]["state_bytes"]


def test_fine_tuning_lowers_the_loss_from_the_pretrained_start(tiny):
    _, _, _, record = tiny
    start = record["runs"][0]["eval"][0]
    assert start[0] == 0
    for run in record["runs"]:
        assert run["eval"][0] == start  # one pretrained model (and one eval set) for every run
        assert run["eval"][-1][0] == 8 or run["error"]
    for key, s in record["summary"].items():
        assert s["max"] < start[1] - 0.05, key  # at its best lr, every seed of every method learned the new domain
        assert s["curve"][0][1] == pytest.approx(start[1]) and s["curve"][-1][1] == pytest.approx(s["mean"])


def test_targets_are_computed_from_the_runs(tiny):
    _, _, _, record = tiny
    s = record["summary"]
    checks = {c["name"]: c for c in record["targets"]}
    gap = checks["adafactor without momentum >= 2% worse than with momentum"]
    want = (s["adafactor/none"]["mean"] / s["adafactor+m/none"]["mean"] - 1) * 100
    assert gap["figure"] == pytest.approx(want) and gap["holds"] == (want >= 2.0)
    near = checks["flora r=8 within 1% of adafactor+m (mean of seeds)"]
    assert near["figure"] == pytest.approx((s["flora r=8/none"]["mean"] / s["adafactor+m/none"]["mean"] - 1) * 100)
    lora = checks["flora r=8 better than lora r=8 by more than the seed spread"]
    margin = s["lora r=8/none"]["mean"] - s["flora r=8/none"]["mean"]
    spread = max(x["max"] - x["min"] for x in (s["lora r=8/none"], s["flora r=8/none"]))
    assert lora["figure"] == pytest.approx(margin - spread) and lora["holds"] == (margin > spread)
    assert checks["flora r=8 better than galore r=8 by more than the seed spread"]["holds"] is None  # not run
    acc = checks["compressed accumulation within 3% of full buffers at r=8 (for reference)"]
    assert acc["figure"] == pytest.approx(
        (s["flora r=8/compressed"]["mean"] / s["flora r=8/full"]["mean"] - 1) * 100)


def test_pretrained_weights_are_cached_and_checked(tiny):
    bench, root, argv, record = tiny
    path = Path(record["pretrain"]["path"])
    assert path.parent == root / "cache" and path.suffix == ".safetensors" and not record["pretrain"]["cached"]
    args = bench.parser().parse_args(argv)
    state, info = bench.load_or_pretrain(bench.pretrain_config(args), args.cache, log=lambda _: None)
    assert info["cached"] and info["key"] == record["pretrain"]["key"]
    assert all(torch.isfinite(t).all() for t in state.values())
    path.write_bytes(path.read_bytes()[:100])  # a torn file is refused with its name
    with pytest.raises(bench.FinetuneBenchError, match="unreadable"):
        bench.load_or_pretrain(bench.pretrain_config(args), args.cache, log=lambda _: None)


def test_docs_corpus_is_another_domain(bench):
    corpus = bench.docs_corpus(budget_bytes=50_000)
    assert corpus.root.endswith("pydoc_data") and corpus.train.numel() > 1000 and corpus.eval.numel() > 100
    assert not set(corpus.train_files) & set(corpus.eval_files)
    with pytest.raises(bench.FinetuneBenchError, match="eval_fraction"):
        bench.docs_corpus(eval_fraction=1.5)


def test_bad_options_are_refused(bench):
    with pytest.raises(bench.FinetuneBenchError, match="multiple of --accum"):
        bench.main(["--batch", "10", "--accum", "4", "--cache", "/nonexistent", "--out", "/nonexistent"])
    assert "adafactor+m" in bench.parser().format_help()
