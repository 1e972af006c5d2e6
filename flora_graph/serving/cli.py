"""``flora-graph serve-export`` / ``serve-package`` / ``generate``: the serving layer on the command line.

``flora_graph.cli`` stays a thin layer; it wires these in with ``add_cli(subparsers)``.
Each handler takes ``(args, console)`` and returns the exit status, as the others there do.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape

from flora_graph.cli_types import float_in, int_at_least

__all__ = ["add_cli"]


def _export(args: argparse.Namespace, console: Any) -> int:
    from flora_graph.ir import Graph
    from flora_graph.serving.adapter_file import write_adapter
    from flora_graph.serving.export import export_mixed, export_swappable
    from flora_graph.serving.slots import graph_adapter_params

    graph = Graph.load(args.graph)
    model = (export_mixed if args.mixed else export_swappable)(graph, args.out)
    kind = "mixed-adapter" if args.mixed else "swappable"
    console.print(f"{kind} model written to {args.out} ({len(model.graph.input)} inputs)")
    if args.adapter:
        swappable = model if not args.mixed else export_swappable(graph)
        write_adapter(args.adapter, graph_adapter_params(graph), model=swappable)
        console.print(f"the graph's own adapter written to {args.adapter}")
    return 0


def _refuse(console: Any, message: str) -> int:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return 2


def _package(args: argparse.Namespace, console: Any) -> int:
    # every argument is checked before anything is loaded or written
    from flora_graph.serving.errors import ServingError
    from flora_graph.storage import check_name

    name, source = args.name, Path(args.source)
    try:
        check_name(name, "--name", error=ServingError)
    except ServingError as exc:
        return _refuse(console, str(exc))
    if '"' in name:  # config.pbtxt quotes it
        return _refuse(console, f"--name {name!r} must not hold '\"'")
    if args.max_batch_size < 0:
        return _refuse(console, f"--max-batch-size must be >= 0, got {args.max_batch_size}")
    is_graph = (source / "graph.json").is_file()
    if not (is_graph or source.is_file()):
        return _refuse(console, f"SOURCE {str(source)!r} is neither a .onnx file nor a saved graph directory")
    if args.torchscript and not is_graph:
        return _refuse(console, f"--torchscript needs a saved graph directory as SOURCE, got {str(source)!r}")
    from flora_graph.serving.artifacts import package_torchscript, package_triton

    if args.torchscript:  # scripted and checked first: it refuses what the ONNX entry would refuse, and more
        from flora_graph.ir import Graph

        graph = Graph.load(source)
        ts = package_torchscript(graph, args.out, f"{name}_torchscript", max_batch_size=args.max_batch_size,
                                 archive_name=name)
    root = package_triton(graph if args.torchscript else source, args.out, name, max_batch_size=args.max_batch_size,
                          external_data=True if args.external_data else None)
    console.print(f"Triton model repository entry written to {root}")
    if args.torchscript:
        console.print(f"Triton TorchScript entry (pytorch_libtorch) written to {ts}; the archive alone: {ts / name}.pt "
                      f"(I/O in {ts / name}.json)")
    return 0


def _rows(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None, list[str | None]] | str:
    """The rows of ``generate``: ``(texts, ids, adapters)`` (one of ``texts``/``ids`` ``None``) or the refusal."""
    if sum(bool(x) for x in (args.prompt, args.ids, args.audio, args.image)) > 1:
        return "give the rows as --prompt texts, as --ids, as --audio files or as --image files, one kind only"
    files, flag = (args.audio, "--audio") if args.audio else (args.image, "--image")
    if args.decoder_ids and not files:
        return "--decoder-ids are an audio or image model's first decoder tokens: they go with --audio or --image"
    if files and (args.chat or args.system is not None):
        return f"--chat and --system format --prompt texts; {flag} is an audio or image model's input"
    if files:
        names = args.adapter or [None]
        if len(names) not in (1, len(files)):
            return f"{len(names)} --adapter for {len(files)} {flag} files: one for every row, or one per row"
        return None, None, [n or None for n in (names * len(files) if len(names) == 1 else names)]
    if args.ids and (args.chat or args.system is not None):
        return "--chat and --system format --prompt texts; --ids are token ids already"
    if args.system is not None and not args.chat:
        return "--system needs --chat (it is the chat's system message)"
    texts = None if args.ids else (args.prompt or ["Hello"])
    rows = len(args.ids or texts)
    names = args.adapter or [None]
    if len(names) not in (1, rows):
        return (f"{len(names)} --adapter for {rows} prompts: give one for every row, or one per row in order "
                f"('' for none)")
    return texts, args.ids, [n or None for n in (names * rows if len(names) == 1 else names)]


def _chat_ids(tokenizer: Any, package: str, system: str | None, text: str) -> list[int]:
    """``text`` as a user message in the chat template of ``package``'s tokenizer, ready for the reply."""
    from flora_graph.serving.errors import ServingError

    if not getattr(tokenizer, "chat_template", None):
        raise ServingError(f"{package}: its tokenizer has no chat template (chat_template.jinja or tokenizer_config.json's "
                           f"chat_template); give the prompt without --chat")
    messages = [*([{"role": "system", "content": system}] if system is not None else []), {"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class _Stream:
    """Prints one row's text as its tokens come: each token's new text once it decodes to whole
    characters (a token may end inside a multi-byte character); token ids without a tokenizer."""

    def __init__(self, console: Any, tokenizer: Any) -> None:
        self.console, self.tokenizer = console, tokenizer
        self.pending: list[int] = []  # since the last newline: decoded together, as word pieces need
        self.shown = 0  # characters of their text already printed

    def __call__(self, row: int, token: int) -> None:
        if self.tokenizer is None:
            self._show(f"{token} ")
            return
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._show(text[self.shown:])
        self.shown = len(text)
        if text.endswith("\n"):
            self.pending, self.shown = [], 0

    def _show(self, piece: str) -> None:
        if piece:
            self.console.out(piece, end="", highlight=False)  # as it is: no markup, emoji codes or wrapping


def _generate(args: argparse.Namespace, console: Any) -> int:
    import time

    from flora_graph.serving.errors import ServingError
    from flora_graph.serving.generate import Generator

    if args.min_new_tokens > args.max_new_tokens:  # checked before the package is loaded
        return _refuse(console, f"--min-new-tokens {args.min_new_tokens} is more than --max-new-tokens "
                                f"{args.max_new_tokens}")
    rows = _rows(args)
    if isinstance(rows, str):
        return _refuse(console, rows)
    texts, id_lists, adapters = rows
    prompts = [_ids(given, "--ids") for given in id_lists or []]
    from flora_graph.serving.seq2seq import SEQ2SEQ_CONFIG

    seq2seq = (Path(args.package) / SEQ2SEQ_CONFIG).is_file()
    if seq2seq and args.chat:
        return _refuse(console, "--chat formats a causal LM's prompt; an encoder-decoder package takes the input text "
                                "as it is")
    tokenizer = None
    if texts is not None:
        tokenizer = _tokenizer(Path(args.package))
        if tokenizer is None:
            raise ServingError(f"{args.package} has no tokenizer files (tokenizer.json); pass token ids with --ids")
        if args.chat:
            prompts = [_chat_ids(tokenizer, args.package, args.system, t) for t in texts]
        else:
            prompts = [tokenizer(t)["input_ids"] for t in texts]
    flag = "--audio" if args.audio else "--image" if args.image else None
    if flag and not seq2seq:
        return _refuse(console, f"{flag} is for an audio or image model's encoder-decoder package; {args.package} is "
                                "not one")
    if seq2seq:
        from flora_graph.serving.seq2seq import Seq2SeqGenerator

        gen: Any = Seq2SeqGenerator(args.package, threads=args.threads, huge_pages=args.huge_pages)
        main = gen.layout.main_input
        wants = None if main == "input_ids" else "--image" if main == "pixel_values" else "--audio"
        if wants is not None and flag != wants:
            kind = "an image model's package: give --image FILE (it takes images" if wants == "--image" else \
                "a speech model's package: give --audio FILE.wav (it takes audio"
            return _refuse(console, f"{args.package} is {kind}, not {'text' if flag is None else flag[2:]})")
        if flag and wants is None:
            return _refuse(console, f"{args.package} takes text (input_ids): give --prompt or --ids, not {flag}")
        if flag:
            return _transcribe(args, console, gen, adapters)
    else:  # the mixed model (its own copy of the weights) only where the rows' adapters differ
        gen = Generator(args.package, threads=args.threads, mixed="auto" if len(set(adapters)) > 1 else False,
                        huge_pages=args.huge_pages)
    settings = _settings(args)
    n = settings.get("num_return_sequences", 1)
    one = len(prompts) == 1 and n == 1
    t0 = time.perf_counter()
    out = gen.generate(prompts, adapters=adapters, on_token=_Stream(console, tokenizer) if one else None, **settings)
    seconds = time.perf_counter() - t0

    def text(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, tokens))

    if one:
        console.print()  # ends the streamed line
    else:
        for row, tokens in enumerate(out):
            i, j = divmod(row, n)
            console.out(f"[{_label(i, j, n)}] adapter {adapters[i] or 'none'}: {text(tokens)}", highlight=False)
    total = sum(map(len, out))
    which = f"adapter {adapters[0] or 'none'}" if one else f"adapters {', '.join(a or 'none' for a in adapters)}"
    console.print(f"{total} tokens in {seconds:.3f} s ({total / seconds:.1f} tokens/s, "
                  f"{len(out)} row{'s' * (len(out) != 1)}, prompt{'s' * (len(prompts) != 1)} "
                  f"{'/'.join(str(len(p)) for p in prompts)} tokens, {which})", highlight=False, markup=False)
    return 0


def _label(i: int, j: int, n: int) -> str:
    """How a printed row names prompt ``i``'s sequence ``j`` of ``n``: ``i``, or ``i.j`` where each has several."""
    return str(i) if n == 1 else f"{i}.{j}"


_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "spiece.model", "source.spm")
"""A package holds a tokenizer where one of these is there (fast, SentencePiece, T5's, Marian's)."""


def _tokenizer(package: Path) -> Any:
    """``package``'s tokenizer (transformers' ``AutoTokenizer``, no download), or ``None`` where it has no files."""
    if not any((package / f).is_file() for f in _TOKENIZER_MARKERS):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package, local_files_only=True)


def _ids(given: str, flag: str) -> list[int]:
    """``given`` (``1,15043,29892``) as token ids; :class:`ServingError` naming ``flag`` otherwise."""
    try:
        return [int(t) for t in given.split(",") if t.strip()]
    except ValueError:
        from flora_graph.serving.errors import ServingError

        raise ServingError(f"{flag} {given!r}: expected comma-separated token ids such as 1,15043,29892") from None


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The generation settings ``generate`` was given; what is not given stays the package's (its model's
    generation config: ``Generator.defaults``)."""
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens, "seed": args.seed}
    if args.temperature is not None:
        settings["do_sample"] = args.temperature > 0
        if args.temperature > 0:
            settings["temperature"] = args.temperature
    settings.update({k: getattr(args, k) for k in ("top_k", "top_p", "repetition_penalty", "num_beams", "length_penalty",
                                                   "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
                                                   "num_return_sequences")
                     if getattr(args, k) is not None})
    if args.early_stopping is not None:
        settings["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    if args.temperature is not None and args.temperature > 0 and args.num_beams is None:
        settings["num_beams"] = 1  # sampling asked for: one hypothesis a row, whatever the package's search says
    if args.num_beams is not None and args.num_beams > 1 and args.temperature is None:
        settings["do_sample"] = False  # beam search asked for: greedy, whatever the package's search says
    if args.ignore_eos:
        settings["stop_tokens"] = []
    return settings


def _transcribe(args: argparse.Namespace, console: Any, gen: Any, adapters: list[str | None]) -> int:
    """``generate --audio`` / ``--image``: each WAV file through the package's feature extractor and the speech model
    (each image file through its image processor and the vision encoder-decoder), one row a file (recordings of
    different lengths are not batched); prints each row's text (token ids without tokenizer files) and the
    tokens/s."""
    import time

    from flora_graph.serving.audio import read_wav, speech_inputs
    from flora_graph.serving.images import image_inputs

    package = Path(args.package)
    rows = []
    files = args.audio or args.image
    for path in files:  # every file read and checked before anything runs
        if args.image:
            rows.append(image_inputs(package, gen.layout.main_input, path))
            continue
        samples, rate = read_wav(path)
        rows.append(speech_inputs(package, gen.layout.main_input, samples, rate, what=str(path)))
    tokenizer = _tokenizer(package)
    prompt = _ids(args.decoder_ids, "--decoder-ids") if args.decoder_ids else None
    settings = _settings(args)
    total, t0 = 0, time.perf_counter()
    n = settings.get("num_return_sequences", 1)
    for i, (path, feats, adapter) in enumerate(zip(files, rows, adapters, strict=True)):
        for j, tokens in enumerate(gen.generate(feats, adapters=adapter, decoder_prompt=prompt, **settings)):
            total += len(tokens)
            text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, tokens))
            console.out(f"[{_label(i, j, n)}] {path} (adapter {adapter or 'none'}): {text}", highlight=False)
    seconds = time.perf_counter() - t0
    what = "image" if args.image else "recording"
    console.print(f"{total} tokens in {seconds:.3f} s ({total / seconds:.1f} tokens/s, {len(rows)} {what}"
                  f"{'s' * (len(rows) != 1)}, features included)", highlight=False, markup=False)
    return 0


def add_cli(subparsers: Any) -> None:
    """Add the ``serve-export``, ``serve-package`` and ``generate`` subcommands to ``subparsers`` (``add_subparsers()``)."""
    e = subparsers.add_parser("serve-export", help="export a saved graph with swappable (or per-row) LoRA adapters")
    e.add_argument("graph", help="graph directory (Graph.save / demo --save) with LoRA branches")
    e.add_argument("out", help="the .onnx file to write")
    e.add_argument("--mixed", action="store_true", help="per-row adapters (stacked weights + adapter_index)")
    e.add_argument("--adapter", metavar="FILE", help="also write the graph's own adapter as an .onnx_adapter file")
    e.set_defaults(func=_export)
    p = subparsers.add_parser("serve-package", help="write a Triton model repository (and TorchScript) for a model")
    p.add_argument("source", help="a .onnx file or a saved graph directory")
    p.add_argument("out", help="the model repository directory")
    p.add_argument("--name", required=True, help="the Triton model name")
    p.add_argument("--max-batch-size", type=int_at_least(0), default=0,
                   help="Triton max_batch_size (default 0: the batch dim stays in dims)")
    p.add_argument("--external-data", action="store_true", help="write the model as a directory with external data")
    p.add_argument("--torchscript", action="store_true",
                   help="also write the Triton PyTorch entry <name>_torchscript (config.pbtxt, 1/model.pt; with the "
                        "archive <name>.pt + <name>.json beside them); graph SOURCE only")
    p.set_defaults(func=_package)
    g = subparsers.add_parser("generate", help="generate text from a GenAI package (flora-graph export --format genai) "
                                               "or an encoder-decoder package (--task text2text-generation-with-past) "
                                               "on plain ONNX Runtime, with an adapter or none; several prompts "
                                               "decode as one batch, each row with its own adapter")
    g.add_argument("package", help="the package folder")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt text, one row each (needs the package's tokenizer files) (default: Hello)")
    g.add_argument("--ids", action="append", metavar="ID,ID,...",
                   help="a prompt as token ids instead of text, one row each")
    g.add_argument("--audio", action="append", metavar="FILE.wav",
                   help="a speech model's package: a PCM WAV file at its feature extractor's sampling rate, one row "
                        "each (the package's preprocessor_config.json makes its features)")
    g.add_argument("--image", action="append", metavar="FILE",
                   help="an image model's package (TrOCR, Donut: --task image-to-text-with-past): an image file "
                        "Pillow reads, one row each (the package's preprocessor_config.json makes its pixels)")
    g.add_argument("--decoder-ids", metavar="ID,ID,...",
                   help="with --audio or --image: the decoder's first tokens (Whisper's language and task tokens, "
                        "Donut's task prompt) (default: the package's decoder start token)")
    g.add_argument("--chat", action="store_true",
                   help="each --prompt is a user message, formatted by the tokenizer's chat template for the reply")
    g.add_argument("--system", metavar="TEXT", help="with --chat: the system message before each prompt (default: none)")
    g.add_argument("--adapter", action="append", metavar="NAME",
                   help="an adapter of the package (adapters/NAME.onnx_adapter): once for every row, or once per row "
                        "in order, '' for none (a mixed-adapter batch) (default: none)")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=32, help="tokens to generate at most")
    g.add_argument("--min-new-tokens", type=int_at_least(0), default=0,
                   help="tokens to generate before the end-of-text token may be chosen (at most --max-new-tokens)")
    g.add_argument("--temperature", type=float_in(0), help="0: greedy; > 0: sampling at that temperature (default: "
                                                            "the package's search settings, from its generation config)")
    g.add_argument("--top-k", type=int_at_least(0), help="sample among the k most likely tokens, 0: all (default: the package's)")
    g.add_argument("--top-p", type=float_in(0, 1, low_open=True),
                   help="sample within the smallest set reaching this probability (default: the package's)")
    g.add_argument("--repetition-penalty", type=float_in(0, low_open=True),
                   help="divide the positive logits (multiply the negative ones) of tokens already in the row, "
                        "1: none (default: the package's)")
    g.add_argument("--num-beams", type=int_at_least(1), help="beam search with this many hypotheses per prompt, 1: "
                                                            "none (default: the package's, from its generation config)")
    g.add_argument("--length-penalty", type=float_in(-float("inf"), low_open=True),
                   help="beam search: a finished hypothesis scores its summed log-probabilities over its length to "
                        "this power (default: the package's)")
    g.add_argument("--early-stopping", choices=("true", "false", "never"),
                   help="beam search: stop a prompt at --num-beams finished hypotheses (true), when no running one can "
                        "beat them (false), or only when none could at any length (never) (default: the package's)")
    g.add_argument("--no-repeat-ngram-size", type=int_at_least(0),
                   help="never repeat an n-gram of this size in a row, 0: allowed (default: the package's)")
    g.add_argument("--encoder-no-repeat-ngram-size", type=int_at_least(0),
                   help="an encoder-decoder package: never repeat an n-gram of this size of the input, 0: allowed "
                        "(default: the package's)")
    g.add_argument("--num-return-sequences", type=int_at_least(1),
                   help="sequences printed per prompt: beam search's best hypotheses (at most --num-beams), or draws "
                        "(default: 1)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument("--threads", type=int_at_least(1), default=1, help="ONNX Runtime intra-op threads")
    g.add_argument("--huge-pages", action="store_true",
                   help="load the model's weights into 2 MiB pages (Linux): each step reads them faster (1.21x on a "
                        "512 MB model's steps here), the load takes longer (3.5 ms a MB here; benchmarks/huge_pages.py): "
                        "worth it past a few hundred tokens (default: off for this one-shot command; Generator's "
                        "default is on)")
    g.set_defaults(func=_generate)
