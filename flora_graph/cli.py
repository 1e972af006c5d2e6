"""``flora-graph``: a thin command line over the public functions."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

import flora_graph
from flora_graph.cli_types import int_at_least
from flora_graph.errors import FloraGraphError

__all__ = ["ARTIFACT_BACKENDS", "HelpFormatter", "Parser", "build_parser", "int_at_least", "main"]

ARTIFACT_BACKENDS = ("onnxruntime", "torchscript", "torch-export")
SEQ2SEQ_TASKS = ("text2text-generation-with-past", "automatic-speech-recognition-with-past", "image-to-text-with-past")
"""The export tasks that write an encoder-decoder package (:func:`flora_graph.serving.seq2seq.export_seq2seq`;
Optimum's names for the same models)."""
"""The backends ``export`` writes an artifact for and ``bench`` times (``model_export.SUFFIX``'s keys)."""


_SAYS_DEFAULT = re.compile(r"\bdefault\b[:;]?\s", re.IGNORECASE)  # "(default: 8)", "(default 200)", "lift (default; ..."


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its choices and its default, so no flag hides either.

    Choices are added unless the help already shows them (``%(choices)s``); the default is
    added where there is one (not ``None``, not a flag's ``False``) unless the help already
    states it ("default: ...", "default ...").
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text is argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            return text
        extra = []
        if action.choices is not None and "%(choices)" not in text:
            extra.append("choices: %(choices)s")
        default = action.default
        shown = default not in (None, argparse.SUPPRESS) and not (default is False and action.nargs == 0)
        if shown and not _SAYS_DEFAULT.search(text):
            extra.append("default: " + (" ".join(map(str, default)) if isinstance(default, list | tuple) else "%(default)s"))
        return f"{text} ({'; '.join(extra)})".strip() if extra else text


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with :class:`HelpFormatter`; its subcommands' parsers are ``Parser``\\ s too."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]




def _llm_demo(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from flora_graph.llm_demo import ADAPTERS, run_llm_demo

    with console.status("starting") as status:
        report = run_llm_demo(args.out, progress=lambda m: status.update(m))
    console.print(f"[bold]GenAI package[/bold] of the small Llama + adapters {', '.join(ADAPTERS)} exported in "
                  f"{report.export_s:.2f} s -> {report.package}")
    for what, same in report.checks.items():
        mark = "[green]equal[/green]" if same else "[red]DIFFERENT[/red]"
        console.print(f"{what}: greedy tokens vs eager transformers + PEFT {mark}")
    if report.genai:
        console.print(f"ONNX Runtime GenAI skipped: {escape(report.genai)}")
    table = Table(title="decode step, 1 thread (median ms)")
    for col in ("adapter", "flora_graph Generator", "eager PEFT + cache", "speed-up"):
        table.add_column(col)
    for adapter, (g, e) in report.step_ms.items():
        table.add_row(adapter, f"{g:.3f}", f"{e:.3f}", f"{e / g:.1f}x")
    console.print(table)
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace, console: Console) -> int:
    from flora_graph.demo import run_demo

    if args.model == "llm":
        given = [flag for flag, value in (("--save", args.save), ("--print-graph", args.print_graph),
                                          ("--rank", args.rank != 8)) if value]
        if given:
            raise FloraGraphError(f"{', '.join(given)}: options of the capture demos (--model decoder or cnn), "
                                  "not of --model llm")
        return _llm_demo(args, console)
    if args.out:
        raise FloraGraphError("--out: an option of --model llm (the GenAI package folder); the capture demos take --save")

    with console.status("starting") as status:
        report = run_demo(args.model, rank=args.rank, save=args.save, progress=lambda m: status.update(m))
    console.print(f"[bold]{report.graph.summary()}[/bold]")
    console.print(f"adapters captured: {report.adapters}; capture took {report.capture_s:.2f} s")
    if args.print_graph:
        console.print(report.graph.format(), markup=False, highlight=False, soft_wrap=True)
    for shape, d in report.max_abs_diff.items():
        mark = "[green]ok[/green]" if d <= report.tolerance else "[red]MISMATCH[/red]"
        console.print(f"input {list(shape)}: max |numpy reference - eager torch| = {d:.3e}  {mark}")
    if args.save:
        console.print(f"graph saved to {args.save}")
    return 0 if report.ok else 1


def _show(args: argparse.Namespace, console: Console) -> int:
    from flora_graph.ir import Graph

    graph = Graph.load(args.path)
    console.print(graph.summary())
    console.print(graph.format(meta=not args.no_meta), markup=False, highlight=False, soft_wrap=True)
    return 0


def _optimize(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from flora_graph.ir import Graph
    from flora_graph.passes import PASSES, optimize_with_report

    # every argument is checked before the graph loads or anything is written
    if args.print_after and args.print_after not in PASSES:
        console.print(f"[red]unknown pass {args.print_after!r}[/red]; passes: {', '.join(sorted(PASSES))}")
        return 2
    if args.draw and Path(args.draw).suffix.lower() not in (".png", ".svg"):
        console.print(f"[red]--draw {args.draw!r}: use a .png or .svg file name[/red]")
        return 2
    graph = Graph.load(args.path)

    def show(record, g) -> None:
        if record.name == args.print_after and record.changed:
            console.rule(f"after {record.name} (iteration {record.iteration})")
            console.print(g.format(), markup=False, highlight=False, soft_wrap=True)

    fbd = args.fuse_base_and_down
    options: dict[str, object] = {"fuse_base_and_down": True if fbd == "all" else fbd} if fbd else {}
    if args.slots != "none":
        options["slots"] = args.slots
    if args.pack_slots:
        if args.slots == "none":
            console.print("[red]--pack-slots packs adapter slots: give --slots swappable or --slots mixed too[/red]")
            return 2
        options["pack_slots"] = True
    out, report = optimize_with_report(graph, args.preset, verify_each=args.verify, on_pass=show, **options)
    slots = (f" --slots {args.slots}" if args.slots != "none" else "") + (" --pack-slots" if args.pack_slots else "")
    table = Table(title=f"optimize {graph.name!r} --preset {args.preset}{slots}")
    for col in ("pass", "runs", "changed", "ms", "rules fired"):
        table.add_column(col, no_wrap=col == "pass")
    totals = report.totals()
    for name, t in totals.items():
        fired = ", ".join(f"{k} x{v}" for k, v in t["fired"].items()) or "-"
        table.add_row(name, str(t["runs"]), str(t["changed"]), f"{t['time_s'] * 1e3:.2f}", fired)
    console.print(table)
    for t in totals.values():
        for why in sorted(set(t["refused"].values()))[:5]:
            console.print(f"  refused  {why}", markup=False, highlight=False, soft_wrap=True)
    last = {r.name: r for r in report.records}  # the final run of each pass
    for r in last.values():
        for node, d in list(r.stats.get("decisions", {}).items())[:20]:
            console.print(f"  {r.name}: {node}: {d['choice']} (low-rank {d['low_rank']:.2e} s, product {d['product']:.2e} s"
                          f" at {d['rows']} rows, in={d['in']} out={d['out']} r={d['rank']})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"nodes: {len(graph.nodes)} -> {len(out.nodes)}; {'converged' if report.converged else 'NOT converged'} "
                  f"after {report.iterations} iteration(s)")
    if args.draw:
        from flora_graph.ir.draw import draw_graphs

        draw_graphs([graph, out], args.draw, titles=[f"before ({len(graph.nodes)} nodes)", f"{args.preset} ({len(out.nodes)} nodes)"])
        console.print(f"drawing written to {args.draw}")
    if args.save:
        out.save(args.save)
        console.print(f"optimized graph saved to {args.save}")
    return 0


def _adapter_args(values: Sequence[str] | None) -> dict[str, str]:
    """``--adapter NAME=DIR`` (or ``DIR``, named after its folder) values as ``{name: folder}``."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, folder = v.partition("=")
        if not sep:
            name, folder = Path(v).name, v
        if name in out:
            raise FloraGraphError(f"--adapter: the name {name!r} is given twice (pass NAME=DIR to name each adapter)")
        out[name] = folder
    return out


def _export(args: argparse.Namespace, console: Console) -> int:
    from flora_graph.model_export import export_model

    if args.precision != "fp32" and args.format != "genai":
        raise FloraGraphError(f"--precision {args.precision} goes with --format genai (a GenAI package's base weights)")
    if args.precision != "int4" and (args.int4_block_size != 32 or args.int4_accuracy_level != 4):
        raise FloraGraphError("--int4-block-size and --int4-accuracy-level go with --precision int4")
    if args.merge_adapter and args.format != "genai" and args.task not in SEQ2SEQ_TASKS:
        raise FloraGraphError("--merge-adapter goes with a generation package (--format genai, or an encoder-decoder "
                              "task); a file export takes the adapter as --adapter and bakes it in with --preset merged")
    if args.trace_every_layer and args.format != "genai" and args.task not in SEQ2SEQ_TASKS:
        raise FloraGraphError("--trace-every-layer goes with a generation package (--format genai, or an "
                              "encoder-decoder --task): its capture with the key/value cache")
    if args.task in SEQ2SEQ_TASKS:
        return _export_seq2seq(args, console)
    if args.format == "genai" or args.task == "text-generation-with-past":
        return _export_genai(args, console)
    if args.adapter and len(args.adapter) > 1:
        raise FloraGraphError(f"--format file takes one --adapter, got {len(args.adapter)}; "
                              "several adapters go into a GenAI package (--format genai)")
    adapter_dir = next(iter(_adapter_args(args.adapter).values()), None)
    with console.status("starting") as status:
        report = export_model(args.model, args.out, adapter=adapter_dir, backend=args.backend, preset=args.preset,
                              progress=lambda m: status.update(m), attention_mask=args.attention_mask)
    adapter = f" + adapter {adapter_dir}" if adapter_dir else ""
    console.print(f"exported {args.model}{adapter} with preset {report.preset} for {report.backend}")
    console.print(report.summary)
    console.print("  ".join(f"{k} {v:.2f} s" for k, v in report.seconds.items()) + f"  (total {sum(report.seconds.values()):.2f} s)")
    console.print(f"wrote {report.path}")
    mark = "[green]ok[/green]" if report.ok else "[red]MISMATCH[/red]"
    console.print(f"parity: max |{args.backend} - eager torch| = {report.max_abs_diff:.3e} on a fresh input shape "
                  f"(tolerance {report.tolerance:.1e})  {mark}")
    return 0 if report.ok else 1


def _export_seq2seq(args: argparse.Namespace, console: Console) -> int:
    from flora_graph.serving.seq2seq import export_seq2seq

    if args.format != "file":
        raise FloraGraphError(f"--task {args.task} writes an encoder-decoder package folder (encoder.onnx, decoder.onnx, "
                              "adapters, seq2seq_config.json); drop --format genai")
    if args.model == "default":
        raise FloraGraphError(f"--task {args.task} takes a transformers model folder (config.json + safetensors)")
    given = [flag for flag, on in (("--adapters-only", args.adapters_only), ("--replace", args.replace)) if on]
    if given:
        raise FloraGraphError(f"{', '.join(given)} go with --format genai, not --task {args.task}")
    adapters = _adapter_args(args.adapter)
    with console.status("starting") as status:
        report = export_seq2seq(args.model, args.out, adapters, progress=lambda m: status.update(m), mixed=args.mixed,
                                stamp_layers=not args.trace_every_layer, merge=args.merge_adapter)
    merged = f" (base: {args.model} + {args.merge_adapter} merged)" if args.merge_adapter else ""
    console.print(f"exported {args.model} with {len(adapters)} adapter(s) as an encoder-decoder package{merged}")
    console.print(report.summary)
    console.print("  ".join(f"{k} {v:.2f} s" for k, v in report.seconds.items()) + f"  (total {sum(report.seconds.values()):.2f} s)")
    console.print(f"wrote {report.path}" + "".join(f"\n  adapter {n}: {', '.join(map(str, ps))}"
                                                   for n, ps in report.adapters.items()))
    for note in report.notes:
        console.print(f"note: {note}")
    return 0


def _export_genai(args: argparse.Namespace, console: Console) -> int:
    from flora_graph.serving.genai import export_genai

    if args.format != "genai" or args.task != "text-generation-with-past":
        raise FloraGraphError("a model with its key/value cache is exported as an ONNX Runtime GenAI package: pass "
                              "--task text-generation-with-past --format genai")
    if args.model == "default":
        raise FloraGraphError("--format genai takes a transformers model folder (config.json + safetensors)")
    adapters = _adapter_args(args.adapter)
    if args.replace and not args.adapters_only:
        raise FloraGraphError("--replace goes with --adapters-only (a full export writes the package anew)")
    if args.adapters_only and args.precision != "fp32":
        raise FloraGraphError("--adapters-only leaves the package's models as they are: drop --precision (adapters "
                              "are float in any package)")
    if args.adapters_only and args.merge_adapter:
        raise FloraGraphError("--adapters-only leaves the package's models as they are: drop --merge-adapter (it "
                              "changes the base model)")
    if args.adapters_only:
        from flora_graph.serving.genai import add_adapters

        with console.status("starting") as status:
            files = add_adapters(args.out, args.model, adapters, replace=args.replace, progress=lambda m: status.update(m))
        console.print(f"added {len(files)} adapter(s) to {args.out}" + "".join(f"\n  adapter {n}: {p}" for n, p in files.items()))
        return 0
    with console.status("starting") as status:
        report = export_genai(args.model, args.out, adapters, progress=lambda m: status.update(m),
                              contrib=args.ort_contrib, base_branch=args.base_branch, precision=args.precision,
                              int4_block_size=args.int4_block_size, int4_accuracy_level=args.int4_accuracy_level,
                              merge=args.merge_adapter, mixed=args.mixed, stamp_layers=not args.trace_every_layer)
    merged = f" (base: {args.model} + {args.merge_adapter} merged)" if args.merge_adapter else ""
    console.print(f"exported {args.model} with {len(adapters)} adapter(s) as an ONNX Runtime GenAI package "
                  f"(model type {report.model_type!r}){merged}")
    console.print(report.summary)
    console.print("  ".join(f"{k} {v:.2f} s" for k, v in report.seconds.items()) + f"  (total {sum(report.seconds.values()):.2f} s)")
    console.print(f"wrote {report.path}" + "".join(f"\n  adapter {n}: {p}" for n, p in report.adapters.items()))
    for note in [*report.notes, *([report.not_for_genai] if report.not_for_genai else [])]:
        console.print(f"note: {note}")
    return 0


def _bench(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from flora_graph.bench import bench_model
    from flora_graph.bench.pipeline import optimize_scaling, time_pipeline
    from flora_graph.bench.report import latency_table, plot_latency
    from flora_graph.models import build_demo_model, build_mlp_stack, demo_inputs

    out = Path(args.out)
    reports = []
    for shape in args.batch:
        if args.model == "demo":
            model, example, dyn = build_demo_model(), demo_inputs(2), {"image": {0: "batch"}}
            feeds = demo_inputs(shape, seed=7)
        else:
            import torch

            model, example, dyn = build_mlp_stack(args.layers), {"x": torch.randn(2, 128)}, {"x": {0: "batch"}}
            feeds = {"x": torch.randn(shape, 128, generator=torch.Generator().manual_seed(7))}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
            task = bar.add_task("building", total=1)

            def progress(stage: str, done: int, total: int, task=task, shape=shape) -> None:
                bar.update(task, description=f"batch {shape}: {stage}", completed=done, total=total)

            rep = bench_model(model, example, dyn, feeds, name=f"{args.model}-b{shape}", backends=args.backends,
                              threads=args.threads, rounds=args.rounds, inner=args.inner, progress=progress)
        console.print(latency_table(rep))
        rep.save(out / f"latency_{args.model}_b{shape}.json")
        reports.append(rep)
    plot_latency(reports, out / f"latency_{args.model}.png")
    console.print(f"reports and chart written to {out}/")
    if args.pipeline:
        with console.status("timing capture + optimize + lower of the 32-layer, 224-adapter stack"):
            t = time_pipeline(32)
        console.print(f"pipeline, {t.layers} layers / {t.adapters} adapters / {t.nodes} nodes: capture {t.capture_s:.2f} s; "
                      + "; ".join(f"optimize {k} {v:.2f} s" for k, v in t.optimize_s.items()) + "; "
                      + "; ".join(f"lower {k} {v:.2f} s" for k, v in t.lower_s.items()))
        for key in t.optimize_s:
            preset, backend = key.split("/")
            console.print(f"  total {key}: {t.total_s(preset, backend):.2f} s (target < 5 s)")
        with console.status("optimize time against graph size"):
            rows = optimize_scaling()
        for layers, nodes, s in rows:
            console.print(f"  optimize fused, {layers:3d} layers, {nodes:6d} nodes: {s * 1e3:8.1f} ms = {s / nodes * 1e6:6.1f} us/node")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flora-graph``.

    Every option with fixed values lists them (``choices``) and every default shows in the
    help (:class:`HelpFormatter`); values are checked by the parser (``choices``,
    :func:`int_at_least`), so a bad one exits with status 2, naming the option, before any
    handler runs.
    """
    from flora_graph.passes import PASSES, PRESETS  # no torch: the parser stays light

    presets = list(PRESETS)
    p = Parser(prog="flora-graph", description="A LoRA-aware graph compiler for PyTorch models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {flora_graph.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the main job: a small Llama with two PEFT adapters to a GenAI package and "
                                    "generation, checked against eager PEFT (or capture checks of other models)")
    d.add_argument("--model", choices=["llm", "decoder", "cnn"], default="llm",
                   help="llm: export the GenAI package, generate with the base, each adapter and a mixed batch, "
                        "time a decode step; decoder / cnn: capture the built-in Llama-style decoder or the small "
                        "CNN + MLP and check the numpy interpreter against eager torch")
    d.add_argument("--out", metavar="DIR", help="llm: keep the GenAI package in DIR (default: a temporary folder)")
    d.add_argument("--rank", type=int_at_least(1), default=8, help="LoRA rank")
    d.add_argument("--print-graph", action="store_true", help="print the captured graph")
    d.add_argument("--save", metavar="DIR", help="save the captured graph (JSON + safetensors) to DIR")
    d.set_defaults(func=_demo)
    s = sub.add_parser("show", help="print a saved graph")
    s.add_argument("path", help="directory written by Graph.save / demo --save")
    s.add_argument("--no-meta", action="store_true", help="leave out adapter tags")
    s.set_defaults(func=_show)
    o = sub.add_parser("optimize", help="run a preset's passes on a saved graph and show what each did")
    o.add_argument("path", help="graph directory (written by Graph.save or demo --save)")
    o.add_argument("--preset", choices=presets, default="fused", help="the passes to run")
    o.add_argument("--print-after", metavar="PASS", help="print the graph after every run of PASS that changed it "
                   f"(passes: {', '.join(sorted(PASSES))})")
    o.add_argument("--draw", metavar="FILE", help="render the graph before and after to FILE (.svg or .png)")
    o.add_argument("--save", metavar="DIR", help="save the optimized graph to DIR")
    o.add_argument("--fuse-base-and-down", nargs="?", const="all", choices=["all", "Conv2d", "Linear"],
                   help="also stack base W and LoRA A into one product, at every site (all, the value without "
                        "an argument) or at Conv2d or Linear sites only (default: off; onnxruntime's measured "
                        "default is Conv2d)")
    o.add_argument("--slots", choices=["swappable", "mixed", "none"], default="none",
                   help="first make every LoRA site an adapter slot whose weights are graph inputs (one adapter per "
                        "run, or per batch row), which every preset keeps, so serve-export keeps every adapter "
                        "swappable (default: %(default)s: the preset may fuse or merge the adapters)")
    o.add_argument("--pack-slots", action="store_true",
                   help="with --slots: pack sibling linear slots on one input (q/k/v, gate/up) into one slot over the "
                        "concatenated layer, fewer nodes per decode step; adapters are still given per module "
                        "(default: off; the GenAI export turns it on)")
    o.add_argument("--verify", action="store_true", help="verify the graph after every pass")
    o.set_defaults(func=_optimize)
    e = sub.add_parser("export", help="export a model (+ PEFT adapter) to optimized ONNX / TorchScript / pt2")
    e.add_argument("model", nargs="?", default="default",
                   help="a folder with config.json + safetensors (a token, image, video or audio model: it takes "
                        "input_ids, pixel_values, pixel_values_videos, input_values or input_features; a contrastive one such "
                        "as CLIP takes input_ids and pixel_values; a sentence-transformers folder exports with its "
                        "pooling: sentence_embedding out), or 'default' (the built-in decoder)")
    e.add_argument("--adapter", metavar="[NAME=]DIR", action="append",
                   help="a PEFT adapter folder (adapter_config.json + safetensors): LoRA (DoRA too) or AdaLoRA, or "
                        "for the default task one of PEFT's other weight adapters (IA3, LoHa, LoKr, VeRA, OFT, BOFT, "
                        "HRA, FourierFT, VB-LoRA, RandLoRA, SHiRA, C3A, MiSS, LN tuning, DeLoRA and the newer ones: "
                        "flora_graph.adapters.peft.THROUGH_PEFT), installed through "
                        "PEFT; --format genai and the encoder-decoder tasks take several, each NAME=DIR (NAME "
                        "defaults to the folder's name), hot-swappable: LoRA, AdaLoRA, and the other types whose "
                        "layers PEFT merges into a Linear's weight (all but LN tuning: --merge-adapter)")
    e.add_argument("--task", choices=["default", "text-generation-with-past", *SEQ2SEQ_TASKS], default="default",
                   help="text-generation-with-past: a causal LM with its key/value cache (inputs input_ids, "
                        "attention_mask, position_ids, past_key_values.N.key/value (and .indexer_key for DeepSeek-V3.2's sparse "
                        "attention), and a state-space or convolution "
                        "layer's past.N.conv/recurrent (.conv.1, ... for several); outputs logits, present.N.*); "
                        "text2text-generation-with-past / automatic-speech-recognition-with-past / "
                        "image-to-text-with-past: an encoder-decoder model (T5, BART, Marian, Whisper, TrOCR, Donut, "
                        "...) as a package folder: encoder.onnx (the cross-attention "
                        "keys and values), decoder.onnx with its cache, adapters/NAME.{encoder,decoder}.onnx_adapter, "
                        "seq2seq_config.json, for flora-graph generate")
    e.add_argument("--format", choices=["file", "genai"], default="file",
                   help="file: one artifact for --backend; genai: an ONNX Runtime GenAI package folder "
                        "(genai_config.json, model.onnx, adapters/NAME.onnx_adapter, tokenizer files)")
    e.add_argument("--backend", choices=ARTIFACT_BACKENDS, default="onnxruntime", help="the artifact's runtime (--format file)")
    e.add_argument("--preset", choices=presets, default="merged",
                   help="merged bakes the adapters in; fused keeps them apart (--format file; genai packages are fused)")
    e.add_argument("--ort-contrib", action=argparse.BooleanOptionalAction, default=True,
                   help="--format genai: use ONNX Runtime's contrib ops (GroupQueryAttention on right-padded caches, "
                        "SkipSimplifiedLayerNormalization), as the model builder does; --no-ort-contrib writes standard "
                        "ONNX only (left-padded caches), for runtimes without them")
    e.add_argument("--base-branch", action=argparse.BooleanOptionalAction, default=None,
                   help="--format genai with adapters: model.onnx is one If on the input flora_graph.adapter_active "
                        "(set by every adapter file), so the base model skips the empty adapter slots; "
                        "--no-base-branch runs the slots always (an active adapter then saves the If, 10-16 us a step). "
                        "Default: automatic, on for base weights up to 64 MiB (ONNX Runtime holds each branch's "
                        "weights apart: twice the memory, which pays only on small models)")
    e.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                   help="--format genai with adapters: also write mixed.onnx, which the Generator runs for batches whose "
                        "rows use different adapters; it holds its own copy of the base weights, so --no-mixed halves "
                        "a package served by ONNX Runtime GenAI alone (or the Generator, one adapter per batch); an "
                        "encoder-decoder package's encoder.mixed.onnx / decoder.mixed.onnx likewise")
    e.add_argument("--precision", choices=["fp32", "int4"], default="fp32",
                   help="--format genai: the base layers' weights; int4: 4-bit blocks (ONNX Runtime's MatMulNBits, as "
                        "the model builder's -p int4; the embedding table as GatherBlockQuantized, shared with a tied "
                        "output layer; a mixture of experts as QMoE; a GPTQ, AWQ or compressed-tensors 4-bit "
                        "checkpoint keeps its blocks), adapters staying float and swappable on top")
    e.add_argument("--int4-block-size", type=int, choices=[16, 32, 64, 128, 256], default=32,
                   help="--precision int4: input rows per quantization block (one scale each)")
    e.add_argument("--int4-accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4,
                   help="--precision int4: MatMulNBits' least activation precision; 4 computes in int8 (the model "
                        "builder's CPU default, the fastest), 0 keeps the input's (the float model of the 4-bit "
                        "weights, token for token)")
    e.add_argument("--trace-every-layer", action="store_true",
                   help="--format genai or an encoder-decoder --task: trace every layer with torch.export; by "
                        "default the first layers are traced, up to a template of each kind of layer, and the "
                        "others stamped from their kind's template (the same graph, checked, in a fraction of the "
                        "time on a deep model)")
    e.add_argument("--merge-adapter", metavar="DIR", default=None,
                   help="--format genai and the encoder-decoder tasks: a PEFT adapter folder baked into the "
                        "package's base weights by PEFT "
                        "(merge_and_unload): any adapter PEFT merges, DoRA, LoRA on expert tensors "
                        "(target_parameters), modules_to_save, LoRA biases, AdaLoRA and PEFT's other weight adapters "
                        "(LoHa, LoKr, VeRA, IA3, ...) included, and a fine-tune that added "
                        "tokens (the package takes its vocabulary and the tokenizer saved beside it); --adapter ones "
                        "swap on top (default: none)")
    e.add_argument("--adapters-only", action="store_true",
                   help="--format genai: write only the --adapter files into the existing package --out (exported from "
                        "this model), leaving its models as they are; their modules must be among its slots")
    e.add_argument("--replace", action="store_true", help="with --adapters-only: write adapters the package has anew")
    e.add_argument("--attention-mask", action="store_true",
                   help="a transformers model also takes attention_mask (and token_type_ids where it has segments, "
                        "as BERT does; an encoder-decoder model takes it always, beside decoder_input_ids); outputs "
                        "keep transformers' names (logits, last_hidden_state, pooler_output)")
    e.add_argument("--out", default="model", help="output file (the backend's suffix is added), or the package folder")
    e.set_defaults(func=_export)
    b = sub.add_parser("bench", help="time every preset x backend against eager torch (interleaved medians)")
    b.add_argument("--model", choices=["demo", "mlp-stack"], default="demo", help="built-in model")
    b.add_argument("--layers", type=int_at_least(1), default=32, help="blocks of the mlp-stack model")
    b.add_argument("--batch", type=int_at_least(1), nargs="+", default=[1, 16], help="batch sizes")
    b.add_argument("--backends", nargs="+", metavar="BACKEND", choices=ARTIFACT_BACKENDS, default=list(ARTIFACT_BACKENDS),
                   help="backends to time")
    b.add_argument("--threads", type=int_at_least(1), default=1, help="threads for torch and ONNX Runtime")
    b.add_argument("--rounds", type=int_at_least(1), default=200, help="timed rounds")
    b.add_argument("--inner", type=int_at_least(1), default=5, help="calls per variant per round")
    b.add_argument("--out", default="bench-out", help="directory for JSON reports and the PNG chart")
    b.add_argument("--pipeline", action="store_true", help="also time capture+optimize+lower of the 224-adapter stack")
    b.set_defaults(func=_bench)
    from flora_graph.serving.cli import add_cli

    add_cli(sub)  # serve-export, serve-package
    from flora_graph.training.cli import add_cli as add_train_cli

    add_train_cli(sub)  # train
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flora-graph`` console script."""
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)  # messages are not hard-wrapped: a path in one stays whole
    try:
        return args.func(args, console)
    except FloraGraphError as exc:
        # no hard wraps (a path in the message stays copyable) and the message is text, never markup
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}",
                                                   highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
