"""4-bit packages: flora_graph's ``--precision int4`` GenAI package against the model builder's ``-p int4``.

Builds the tiny Llama and PEFT adapters of ``benchmarks/generate.py`` in a temporary folder, then
exports, timed:

- flora_graph's package of the base + ``--adapters`` adapters, fp32 and int4 (``--int4-accuracy-level``
  4, the default: int8 activations as the builder's on CPU, and 0: float activations), adapters swappable;
- the ONNX Runtime GenAI model builder's ``-p int4 -e cpu`` base model and its model with the first
  adapter baked in (``--extra_options adapter_path=DIR``).

With ``--checkpoint gptq``, ``awq`` or ``compressed-tensors`` the base is a 4-bit checkpoint of that Llama in that
format instead (its intermediate width 768, whole groups of ``--group-size`` rows, which the builder needs; the
layers' codes, scales and zero points drawn at random, as ``tests/serving/int4_checkpoints.py`` writes them): both
exporters read the checkpoint (where the builder cannot, it says so and the builder's columns are left out),
flora_graph's int4 packages keep its blocks, and the fp32 package is its float model.

It prints the model files' sizes and, interleaved for ``--rounds`` rounds (each runner in an order and
then in reverse, medians of each round's ratio), onnxruntime-genai's time per decode step for
``--new`` greedy tokens after a ``--prompt``-token prompt: flora_graph's int4 package with no adapter
and with the first adapter against the builder's int4 base and baked-in models, and against
flora_graph's fp32 package; and that GenAI and flora_graph's Generator give the same greedy tokens on each
int4 package. 1 thread everywhere. Run: ``python benchmarks/int4.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _build():
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build, mod._genai_runner, mod._one_thread


def _size(folder: Path) -> float:
    """MB of the folder's ONNX model files (``model.onnx`` + external data)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 1e6


def _ratio(step: dict[tuple[str, str], list[float]], case: str, a: str, b: str) -> float:
    """Median over the rounds of ``a``'s step time over ``b``'s (each round's two runs of each, summed)."""
    pairs = zip(step[(case, a)][0::2], step[(case, a)][1::2], step[(case, b)][0::2], step[(case, b)][1::2], strict=True)
    return statistics.median((a1 + a2) / (b1 + b2) for a1, a2, b1, b2 in pairs)


def _checkpoint(root: Path, method: str, group: int) -> Path:
    """A ``method`` checkpoint of ``root / "base"`` (its layers' 4-bit blocks drawn at random) at ``root / method``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests package: its writer
    import transformers

    from tests.serving.int4_checkpoints import write_checkpoint

    write_checkpoint(root / method, method, group=group,
                     model=transformers.LlamaForCausalLM.from_pretrained(root / "base"))
    return root / method


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapters", type=int, default=3, help="PEFT adapters in flora_graph's packages")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per generation")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    p.add_argument("--checkpoint", choices=["float", "gptq", "awq", "compressed-tensors"], default="float",
                   help="the base folder: the float Llama, or a 4-bit checkpoint of it in that format")
    p.add_argument("--group-size", type=int, default=128, help="--checkpoint other than float: input rows per group")
    args = p.parse_args(argv)
    import onnxruntime_genai as og

    from flora_graph.serving.genai import export_genai

    build, genai_runner, one_thread = _build()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(tmp)
        peft_dirs = build(root, args.adapters, size=None if args.checkpoint == "float" else {"intermediate": 768})
        first = next(iter(peft_dirs))
        base = root / "base"
        if args.checkpoint != "float":
            base = _checkpoint(root, args.checkpoint, args.group_size)
        seconds: dict[str, float] = {}
        for label, kw in (("fp32", {}), ("int4", {"precision": "int4", "int4_accuracy_level": 0}),
                          ("int4 int8-activations", {"precision": "int4"})):
            t0 = time.perf_counter()
            report = export_genai(base, root / label, peft_dirs, **kw)
            seconds[label] = time.perf_counter() - t0
            if args.checkpoint != "float":
                print(f"{label}: " + "; ".join(n for n in report.notes if "checkpoint" in n))
        for label, extra in (("builder int4", []), ("builder int4 + adapter", ["--extra_options", f"adapter_path={root / first}"])):
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base),
                                   "-o", str(root / label), "-p", "int4", "-e", "cpu", *extra], capture_output=True, text=True)
            seconds[label] = time.perf_counter() - t0
            if done.returncode and args.checkpoint != "float":  # a checkpoint it cannot read, or bake an adapter into
                failed = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
                print(f"the model builder fails on the {args.checkpoint} checkpoint ({label}: {failed}): no "
                      f"{label} column")
                del seconds[label]
            elif done.returncode:
                print(f"the model builder failed ({label}):\n{done.stderr[-2000:]}")
                return 1
        prompt = [1, *range(5, 5 + args.prompt - 1)]
        runs = {}
        for label in ("fp32", "int4", "int4 int8-activations"):
            one_thread(root / label)
            runs[label] = genai_runner(og, root / label, peft_dirs, prompt)
        built = [label for label in ("builder int4", "builder int4 + adapter") if label in seconds]
        for label in built:
            one_thread(root / label)
            runs[label] = genai_runner(og, root / label, {}, prompt)
        cases = {"base": {"fp32": ("fp32", None), "int4": ("int4", None), "int4 int8-activations": ("int4 int8-activations", None),
                          "builder int4": ("builder int4", None)},
                 first: {"fp32": ("fp32", first), "int4": ("int4", first), "int4 int8-activations": ("int4 int8-activations", first),
                         "builder int4": ("builder int4 + adapter", None)}}
        for case, label in (("base", "builder int4"), (first, "builder int4 + adapter")):
            if label not in built:
                del cases[case]["builder int4"]
        step: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for case, runners in cases.items():
                for name in [*runners, *reversed(runners)]:
                    label, adapter = runners[name]
                    runs[label](adapter, 1)  # untimed: refills the caches the runner before evicted
                    _, full = runs[label](adapter, args.new)
                    _, one = runs[label](adapter, 1)
                    step.setdefault((case, name), []).append((full - one) / (args.new - 1))
        from flora_graph.serving.generate import Generator

        same = True
        for label in ("int4", "int4 int8-activations"):  # the Generator runs the same models on plain ONNX Runtime
            gen = Generator(root / label)
            for adapter in (None, first):
                same &= gen.generate([prompt], adapters=adapter, max_new_tokens=args.new, min_new_tokens=args.new)[0] \
                    == runs[label](adapter, args.new)[0]
        print(f"greedy tokens equal (GenAI and the Generator on each int4 package, base and {first}): {same}")
        print("export: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
              + f" (flora_graph's packages hold base + {args.adapters} swappable adapters)")
        print("model size: " + ", ".join(f"{k} {_size(root / k):.2f} MB" for k in ("fp32", "int4", *built)))
        for case, runners in cases.items():
            ms = {n: statistics.median(step[(case, n)]) * 1e3 for n in runners}
            against = "builder int4" in runners
            print(f"{case:>6}: per decode step " + ", ".join(f"{n} {v:.3f} ms" for n, v in ms.items())
                  + (f"; int4 int8-activations/builder int4 {_ratio(step, case, 'int4 int8-activations', 'builder int4'):.2f}x, "
                     f"int4/builder int4 {_ratio(step, case, 'int4', 'builder int4'):.2f}x" if against else "")
                  + f"; int4 int8-activations/fp32 {_ratio(step, case, 'int4 int8-activations', 'fp32'):.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
