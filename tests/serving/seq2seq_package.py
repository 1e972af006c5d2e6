"""Tiny encoder-decoder folders (T5, BART, Marian, Whisper), PEFT adapters on each and their packages, built once."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

NEW = 32
PROMPTS = [[5, 9, 33, 70, 12, 8, 4], [7, 3, 44], [10, 11, 12, 13, 14]]
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TARGETS = {"t5": ["q", "k", "v", "o", "wi", "wo"], "whisper": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
           # BART's token embeddings too (both stacks' scaled embeddings): an embedding slot in each side's model
           "bart": [*DEFAULT_TARGETS, "embed_tokens"]}


def build(kind: str):
    """A tiny random model of ``kind`` with the special tokens and generation settings its family's checkpoints
    carry (BART's forced first and last tokens, Marian's pad token kept out of the output)."""
    import transformers

    torch.manual_seed(0)
    small = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64)
    if kind == "t5":
        cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    if kind == "bart":
        cfg = transformers.BartConfig(vocab_size=100, max_position_embeddings=64, forced_eos_token_id=2, **small)
        model = transformers.BartForConditionalGeneration(cfg).eval()
        model.generation_config.forced_bos_token_id = 0  # as bart-large's generation config has it
        return model
    if kind == "marian":
        cfg = transformers.MarianConfig(vocab_size=100, max_position_embeddings=64, pad_token_id=99,
                                        decoder_start_token_id=99, eos_token_id=0, forced_eos_token_id=0, **small)
        model = transformers.MarianMTModel(cfg).eval()
        model.generation_config.bad_words_ids = [[99]]  # as the opus-mt checkpoints keep the pad token out
        return model
    if kind == "whisper":
        cfg = transformers.WhisperConfig(vocab_size=100, num_mel_bins=8, max_source_positions=16,
                                         max_target_positions=64, pad_token_id=1, bos_token_id=2, eos_token_id=3,
                                         decoder_start_token_id=2, **small)
        return transformers.WhisperForConditionalGeneration(cfg).eval()
    raise ValueError(kind)


def adapter_specs(kind: str) -> dict[str, dict]:
    """Two adapters: every projection of both stacks at rank 8, and a subset (two projections of the second
    layers) at rank 4."""
    targets = TARGETS.get(kind, DEFAULT_TARGETS)
    return {"all": dict(r=8, lora_alpha=16, target_modules=targets),
            "some": dict(r=4, lora_alpha=4, target_modules=targets[:2], layers_to_transform=[1])}


def make_folders(root: Path, kind: str) -> Path:
    """``root/base`` and one PEFT folder per adapter of :func:`adapter_specs` (``B`` nonzero)."""
    import peft

    model = build(kind)
    model.save_pretrained(root / "base")
    for name, spec in adapter_specs(kind).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapted = peft.get_peft_model(type(model).from_pretrained(root / "base"), peft.LoraConfig(**spec))
        gen = torch.Generator().manual_seed(len(name))
        for mod in adapted.modules():
            if hasattr(mod, "lora_B"):
                for k in mod.lora_B:
                    mod.lora_B[k].weight.data.normal_(0, 0.3, generator=gen)
            for k in getattr(mod, "lora_embedding_A", {}):  # an embedding's A starts at zero: nonzero here
                mod.lora_embedding_A[k].data.normal_(0, 0.3, generator=gen)
        adapted.save_pretrained(root / name)
    return root


@pytest.fixture(scope="session")
def seq2seq_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{kind: root}`` with ``root/base``, ``root/all``, ``root/some`` and ``root/pkg`` (the package of both
    adapters, written by ``flora-graph export --task ...``)."""
    pytest.importorskip("peft")
    from flora_graph.cli import main

    out = {}
    for kind in ("t5", "bart", "marian", "whisper"):
        root = make_folders(tmp_path_factory.mktemp(kind), kind)
        task = "automatic-speech-recognition-with-past" if kind == "whisper" else "text2text-generation-with-past"
        args = ["export", str(root / "base"), "--task", task, "--out", str(root / "pkg"),
                *(a for n in adapter_specs(kind) for a in ("--adapter", f"{n}={root / n}"))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(args) == 0
        out[kind] = root
    return out


def eager_model(root: Path, kind: str, adapter: str | None):
    """The eager transformers model of ``root/base`` (+ PEFT ``adapter``)."""
    import peft

    model = build(kind)
    base = type(model).from_pretrained(root / "base").eval()
    base.generation_config = model.generation_config
    return peft.PeftModel.from_pretrained(base, root / adapter).eval() if adapter else base


def eager_tokens(root: Path, kind: str, adapter: str | None, prompts: list[list[int]], pad: int, eos: set[int],
                 model: Any = None, **kwargs) -> list[list[int]]:
    """Greedy tokens (or beam search's, by ``kwargs``) of eager transformers (+ PEFT) ``generate`` (of ``model``, else
    :func:`eager_model`'s) for the right-padded ``prompts``, each row cut after its first end-of-text token
    (``generate`` pads a finished row)."""
    model = eager_model(root, kind, adapter) if model is None else model
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **{"num_beams": 1, **kwargs})
    return [_cut(row[1:], eos) for row in out.tolist()]


def _cut(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


_E = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
          encoder_ffn_dim=64, decoder_ffn_dim=64)
_T = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
_GEMMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
_BERT = dict(model_type="bert", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64)
_PARAKEET = dict(model_type="parakeet_encoder", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, subsampling_conv_channels=8, num_mel_bins=16, conv_kernel_size=3,
                 max_position_embeddings=256)
ARCHITECTURES = {
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", _T),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", _T),
    "longt5": ("LongT5Config", "LongT5ForConditionalGeneration", _T),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", dict(vocab_size=100, max_position_embeddings=64, **_E)),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration",
                dict(vocab_size=100, max_position_embeddings=64, **_E)),
    "pegasus-x": ("PegasusXConfig", "PegasusXForConditionalGeneration",
                  dict(vocab_size=100, max_position_embeddings=64, num_global_tokens=4, block_size=4,
                       stagger_local_blocks=True, **_E)),
    "blenderbot": ("BlenderbotConfig", "BlenderbotForConditionalGeneration",
                   dict(vocab_size=100, max_position_embeddings=64, **_E)),
    "blenderbot-small": ("BlenderbotSmallConfig", "BlenderbotSmallForConditionalGeneration",
                         dict(vocab_size=100, max_position_embeddings=64, **_E)),
    "m2m100": ("M2M100Config", "M2M100ForConditionalGeneration", dict(vocab_size=100, max_position_embeddings=64, **_E)),
    "plbart": ("PLBartConfig", "PLBartForConditionalGeneration", dict(vocab_size=100, max_position_embeddings=64, **_E)),
    "fsmt": ("FSMTConfig", "FSMTForConditionalGeneration",
             dict(src_vocab_size=100, tgt_vocab_size=100, max_position_embeddings=64, langs=["en", "de"], **_E)),
    "bigbird-pegasus": ("BigBirdPegasusConfig", "BigBirdPegasusForConditionalGeneration",
                        dict(vocab_size=100, max_position_embeddings=64, attention_type="original_full", **_E)),
    "nllb-moe": ("NllbMoeConfig", "NllbMoeForConditionalGeneration",
                 dict(vocab_size=100, max_position_embeddings=64, num_experts=4, expert_capacity=8, **_E)),
    # its second layers sparse (top-2 routing into 4 experts, capacity ceil(0.5 * tokens), token dropout's eval scale)
    "nllb-moe-experts": ("NllbMoeConfig", "NllbMoeForConditionalGeneration",
                         dict(vocab_size=100, max_position_embeddings=64, num_experts=4, expert_capacity=8,
                              encoder_sparse_step=2, decoder_sparse_step=2, moe_eval_capacity_token_fraction=0.5,
                              moe_token_dropout=0.2, **_E)),
    "speech-to-text": ("Speech2TextConfig", "Speech2TextForConditionalGeneration",
                       dict(vocab_size=100, input_feat_per_channel=8, max_source_positions=64, max_target_positions=64,
                            conv_channels=16, input_channels=1, **_E)),
    "switch-transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
                            dict(**_T, num_decoder_layers=2, num_experts=4, expert_capacity=8, encoder_sparse_step=1,
                                 decoder_sparse_step=1)),
    "mvp": ("MvpConfig", "MvpForConditionalGeneration", dict(vocab_size=100, max_position_embeddings=64, **_E)),
    # its start token is the beginning-of-text one; the encoder's and decoder's configs of their own
    "t5gemma": ("T5GemmaConfig", "T5GemmaForConditionalGeneration",
                dict(encoder=_GEMMA, decoder=_GEMMA, vocab_size=100)),
    # its encoder's sliding window a mask function of its own (built by vmap in transformers), an image encoder beside
    "t5gemma2": ("T5Gemma2Config", "T5Gemma2ForConditionalGeneration",
                 dict(encoder=dict(text_config=_GEMMA, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                                          num_hidden_layers=1, num_attention_heads=2,
                                                                          image_size=32, patch_size=8)),
                      decoder=_GEMMA)),
    # BERT2BERT: transformers' generic encoder-decoder of two BERTs, the decoder's cross-attention added
    "encoder-decoder": ("EncoderDecoderConfig", "EncoderDecoderModel",
                        dict(encoder=_BERT, decoder={**_BERT, "is_decoder": True, "add_cross_attention": True},
                             decoder_start_token_id=2, pad_token_id=0)),
    # raw samples through a convolutional feature encoder (a length less one after its positions)
    "speecht5": ("SpeechT5Config", "SpeechT5ForSpeechToText",
                 dict(vocab_size=100, hidden_size=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, conv_dim=(16, 16),
                      conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2, max_speech_positions=512, max_text_positions=64)),
    # SeamlessM4T's text-to-text model (its speech encoder unused)
    "seamless-m4t": ("SeamlessM4TConfig", "SeamlessM4TForTextToText",
                     dict(vocab_size=100, hidden_size=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                          speech_encoder_layers=1, speech_encoder_attention_heads=4,
                          speech_encoder_intermediate_size=64)),
    # Canary and Cohere's ASR: a FastConformer (Parakeet) encoder over filterbank frames
    "canary": ("CanaryConfig", "CanaryForConditionalGeneration",
               dict(encoder_config=_PARAKEET, decoder_config=dict(_GEMMA, num_key_value_heads=4), vocab_size=100,
                    pad_token_id=2, bos_token_id=4, eos_token_id=3, decoder_start_token_id=4)),
    "cohere-asr": ("CohereAsrConfig", "CohereAsrForConditionalGeneration",
                   dict(encoder_config=_PARAKEET, vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, intermediate_size=64, head_dim=8,
                        max_position_embeddings=64)),
    # raw samples cut into frames of 80 by a reshape
    "moonshine-streaming": ("MoonshineStreamingConfig", "MoonshineStreamingForConditionalGeneration",
                            dict(encoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=4, head_dim=8),
                                 vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64)),
    "moonshine": ("MoonshineConfig", "MoonshineForConditionalGeneration",
                  dict(vocab_size=100, hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=2,
                       decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4)),
    # Longformer's windowed attention in its encoder (windows of 4 tokens, shorter than the prompts), no global token
    "led": ("LEDConfig", "LEDForConditionalGeneration",
            dict(vocab_size=100, max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
                 attention_window=4, **_E)),
    # vision encoder-decoders on 32x32 images: TrOCR's (a ViT encoder, TrOCR's decoder) and Donut's (a Swin encoder,
    # an mBART decoder); weights drawn wider than the checkpoints', so that greedy decoding does not repeat one token
    "trocr": ("VisionEncoderDecoderConfig", "VisionEncoderDecoderModel",
              dict(encoder=dict(model_type="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, image_size=32, patch_size=8, initializer_range=0.2),
                   decoder=dict(model_type="trocr", vocab_size=100, d_model=32, decoder_layers=2,
                                decoder_attention_heads=4, decoder_ffn_dim=64, max_position_embeddings=64,
                                init_std=0.2, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                   decoder_start_token_id=2, pad_token_id=1, eos_token_id=2)),
    "donut": ("VisionEncoderDecoderConfig", "VisionEncoderDecoderModel",
              dict(encoder=dict(model_type="donut-swin", embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2,
                                image_size=[32, 32], patch_size=4, initializer_range=0.2),
                   decoder=dict(model_type="mbart", vocab_size=100, d_model=32, decoder_layers=2,
                                decoder_attention_heads=4, decoder_ffn_dim=64, encoder_layers=2,
                                encoder_attention_heads=4, encoder_ffn_dim=64, max_position_embeddings=64,
                                init_std=0.2, is_decoder=True, add_cross_attention=True),
                   decoder_start_token_id=2, pad_token_id=1, eos_token_id=2)),
}
"""More encoder-decoder families, tiny: ``(config class, model class, config)``, each with PEFT's ``all-linear`` LoRA."""


def nonzero_b(adapted, std: float = 0.3, seed: int = 1) -> None:
    """Every LoRA ``B`` of the PEFT model ``adapted`` drawn from a seeded normal (PEFT starts them at zero)."""
    gen = torch.Generator().manual_seed(seed)
    for mod in adapted.modules():
        if hasattr(mod, "lora_B"):
            for k in mod.lora_B:
                mod.lora_B[k].weight.data.normal_(0, std, generator=gen)


def architecture_matches_eager(root: Path, kind: str, new: int = 12) -> None:
    """Export ``ARCHITECTURES[kind]`` with an ``all-linear`` PEFT adapter (nonzero ``B``) and assert that the
    package's greedy tokens, base and adapter, equal eager transformers + PEFT ``generate`` on a padded batch (or
    two speech rows: Speech2Text's 40 frames, Moonshine's and SpeechT5's 3,200 samples), and for token inputs that a batch mixing
    rows with and without the adapter gives each row those tokens and that beam search (no repeated n-grams of the
    output or of the input) gives eager's tokens with the adapter."""
    import peft
    import transformers

    from flora_graph.serving.seq2seq import Seq2SeqGenerator, export_seq2seq

    config_cls, model_cls, cfg = ARCHITECTURES[kind]
    cls = getattr(transformers, model_cls)
    torch.manual_seed(0)
    cls(getattr(transformers, config_cls)(**cfg)).eval().save_pretrained(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(cls.from_pretrained(root / "base"),
                                      peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    nonzero_b(adapted)
    adapted.save_pretrained(root / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_seq2seq(root / "base", root / "pkg", {"ad": root / "ad"})
    served = Seq2SeqGenerator(root / "pkg")
    main = served.layout.main_input
    alone = {}
    for adapter in (None, "ad"):
        model = cls.from_pretrained(root / "base").eval()
        model = peft.PeftModel.from_pretrained(model, root / "ad").eval() if adapter else model
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
        if main == "input_ids":
            ours = alone[adapter] = served.generate(PROMPTS, adapters=adapter, max_new_tokens=new, min_new_tokens=new,
                                                    num_beams=1)  # greedy, where the config asks for beams too (FSMT)
            assert ours == eager_tokens(root, kind, adapter, PROMPTS, served.pad, set(), model=model,
                                        max_new_tokens=new, min_new_tokens=new)
            continue
        shape = [(40 if main == "input_features" else 3200) if d is None else d for d in served.layout.feature_shape]
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        ours = served.generate(x.numpy(), adapters=adapter, max_new_tokens=new, min_new_tokens=new, num_beams=1)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = model.generate(**{main: x}, **kwargs)
        assert ours == [row[-new:] for row in ref.tolist()]
    if main == "input_ids":  # rows with and without the adapter in one batch (the mixed-adapter models)
        rows = ["ad", None, "ad"]
        mixed = served.generate(PROMPTS, adapters=rows, max_new_tokens=new, min_new_tokens=new, num_beams=1)
        assert mixed == [alone[a][i] for i, a in enumerate(rows)]
        # beam search with the adapter, n-grams of the output and of the input kept from repeating
        search = dict(num_beams=3, length_penalty=0.8, no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=2)
        ours = served.generate(PROMPTS[:1], adapters="ad", max_new_tokens=new, **search)
        assert ours == eager_tokens(root, kind, "ad", PROMPTS[:1], served.pad, set(served.eos), model=model,
                                    max_new_tokens=new, **search)
