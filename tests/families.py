"""Tiny local checkpoints of the model families users prune, set up as each family's real ones are.

Each family's checkpoint is written as `save_pretrained` writes it (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json): random weights from the family's
config class, a few layers, and a tokenizer trained in-process on Python's docs with the family's
tokenizer class, vocabulary layout, special tokens and BOS convention. The conventions come from
the families' published config.json / tokenizer_config.json / tokenizer.json and from transformers'
own code:

- llama3 (Llama 3.2 1B/3B): byte-level BPE, `<|begin_of_text|>` added by a TemplateProcessing
  post-processor (tokenizer_class PreTrainedTokenizerFast), special tokens after the BPE vocabulary,
  eos `<|end_of_text|>`, no pad; tied embeddings, rope_type llama3.
- gemma2 / gemma3 (Gemma 2 2B, Gemma 3 1B text): sentencepiece-style BPE with byte fallback and no
  pre-tokenizer split, ids pad 0 / eos 1 / bos 2 / unk 3, `<bos>` added; GeGLU (gelu_pytorch_tanh),
  tied embeddings, sliding-window layers (Gemma 2 alternates with full ones; Gemma 3 has five
  sliding for one full), Gemma 2 soft-caps attention and final logits.
- mistral (Mistral 7B v0.3): sentencepiece-style BPE (Metaspace, byte fallback), `<unk>` 0 / `<s>` 1 /
  `</s>` 2, `<s>` added; untied embeddings, no sliding window.
- qwen2 (Qwen2.5 0.5B) / qwen3 (Qwen3 0.6B): byte-level BPE with Qwen's split regex, no BOS token
  at all, `<|endoftext|>` / `<|im_start|>` / `<|im_end|>` after the BPE vocabulary; config.bos_token_id
  is `<|endoftext|>` as in the real config.json, though the tokenizer never adds it; tied embeddings;
  Qwen2 has q/k/v biases, Qwen3 q/k norms and a head_dim larger than hidden / heads.
- smollm2 (SmolLM2-135M-Instruct, the pipeline's default model): LlamaForCausalLM with a GPT-2
  byte-level tokenizer, `<|endoftext|>` 0 / `<|im_start|>` 1 / `<|im_end|>` 2 first; bos `<|im_start|>`
  but never added (as the tokenizer pipeline/download.py converts from the GGUF); tied embeddings.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch

# Every family's model has this many embedding rows; its tokenizer fills at most that many ids.
VOCAB_SIZE = 512

_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# The split regexes of the real tokenizer.json files (Llama 3 splits digits by three, Qwen one by one).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTES = tuple(f"<0x{byte:02X}>" for byte in range(256))  # sentencepiece's byte-fallback pieces


@dataclass(frozen=True)
class Family:
    """One family's conventions: architecture, tokenizer layout and special tokens, config settings."""

    model_type: str
    architecture: str
    tokenizer: str  # how the tokenizer is built: see family_tokenizer
    adds_bos: bool
    # Special tokens: `first` take ids 0, 1, ... before the learned vocabulary, `last` follow it.
    first: Tuple[str, ...] = ()
    last: Tuple[str, ...] = ()
    bos: Optional[str] = None
    eos: Optional[str] = None
    pad: Optional[str] = None
    unk: Optional[str] = None
    # config.bos_token_id when the tokenizer has no BOS token (Qwen's config names `<|endoftext|>`).
    config_bos: Optional[str] = None
    config: dict = field(default_factory=dict)
    # tokenizer_config.json entries of the published files that this transformers' save_pretrained
    # writes otherwise or drops, so the files read as the users' do. transformers 5 ignores
    # add_bos_token when a tokenizer.json is there (its post-processor decides, and
    # `tokenizer.add_bos_token` then reads False even for Gemma): BOS is known only by encoding.
    published: dict = field(default_factory=dict)


_SPECS = {
    "llama3": Family(
        "llama", "LlamaForCausalLM", "llama3", adds_bos=True,
        last=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>", eos="<|end_of_text|>",
        config=dict(
            hidden_act="silu", tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
        ),
        published=dict(tokenizer_class="PreTrainedTokenizerFast"),
    ),
    "gemma2": Family(
        "gemma2", "Gemma2ForCausalLM", "gemma", adds_bos=True,
        first=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"), last=("<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
        config=dict(
            head_dim=16, query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0, max_position_embeddings=8192,
        ),
        published=dict(add_bos_token=True, add_eos_token=False),
    ),
    "gemma3": Family(
        "gemma3_text", "Gemma3ForCausalLM", "gemma", adds_bos=True,
        first=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"), last=("<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
        config=dict(
            num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True, sliding_window=16, sliding_window_pattern=6, max_position_embeddings=32768,
        ),
        published=dict(add_bos_token=True, add_eos_token=False),
    ),
    "mistral": Family(
        "mistral", "MistralForCausalLM", "mistral", adds_bos=True, first=("<unk>", "<s>", "</s>"),
        bos="<s>", eos="</s>", unk="<unk>",
        config=dict(sliding_window=None, tie_word_embeddings=False, rope_theta=1000000.0,
                    max_position_embeddings=32768),
        published=dict(add_bos_token=True, add_eos_token=False),
    ),
    "qwen2": Family(
        "qwen2", "Qwen2ForCausalLM", "qwen", adds_bos=False, last=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|endoftext|>", pad="<|endoftext|>", config_bos="<|endoftext|>",
        config=dict(tie_word_embeddings=True, use_sliding_window=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    max_position_embeddings=32768),
    ),
    "qwen3": Family(
        "qwen3", "Qwen3ForCausalLM", "qwen", adds_bos=False, last=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>", pad="<|endoftext|>", config_bos="<|endoftext|>",
        config=dict(head_dim=32, tie_word_embeddings=True, use_sliding_window=False, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, max_position_embeddings=40960),
    ),
    "smollm2": Family(
        "llama", "LlamaForCausalLM", "gpt2", adds_bos=False, first=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", unk="<|endoftext|>",
        config=dict(hidden_act="silu", tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    ),
}

FAMILIES = tuple(_SPECS)


class FamilyModel(NamedTuple):
    """A saved tiny checkpoint: its family's name and its directory."""

    family: str
    path: Path


def family(name: str) -> Family:
    """The conventions of family `name` (one of FAMILIES)."""
    if name not in _SPECS:
        raise ValueError(f"unknown family {name!r}: choose one of {', '.join(FAMILIES)}")
    return _SPECS[name]


def family_adds_bos(name: str) -> bool:
    """Whether the real family's tokenizer puts a BOS token before the text it encodes."""
    return family(name).adds_bos


def _training_text():
    from pydoc_data.topics import topics

    return list(topics.values())[:50]


def _trained(model, normalizer, pre_tokenizer, trainer_kwargs):
    """(vocab, merges) of a BPE trained on the docs with this normalizer and pre-tokenizer."""
    from tokenizers import Tokenizer, trainers

    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(show_progress=False, **trainer_kwargs)
    tokenizer.train_from_iterator(_training_text(), trainer)
    bpe = json.loads(tokenizer.to_str())["model"]
    return bpe["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]


def _with_last(vocab: dict, spec: Family) -> dict:
    """`vocab` with the specials that follow the learned vocabulary, in the family's order.

    In the vocabulary before the tokenizer class sees it: the classes add their named specials
    (eos, pad) themselves, in their own order, which would shuffle Qwen's ids.
    """
    return {**vocab, **{token: len(vocab) + index for index, token in enumerate(spec.last)}}


def _byte_level(spec: Family, split: Optional[str]):
    """A byte-level BPE whose learned vocabulary leaves room for the specials.

    `split`: the regex the family splits words with (Llama 3, Qwen); None for GPT-2's own (SmolLM2).
    """
    from tokenizers import Regex, models, pre_tokenizers

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if split is not None:
        split = pre_tokenizers.Split(Regex(split), behavior="isolated")
        pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizer])
    return _trained(
        models.BPE(), None, pre_tokenizer,
        dict(vocab_size=VOCAB_SIZE - len(spec.last) - 16, special_tokens=list(spec.first),
             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )


def _sentencepiece_like(spec: Family, normalizer, pre_tokenizer):
    """A BPE with byte fallback, specials first then the 256 byte pieces, as sentencepiece lays them out."""
    from tokenizers import models

    return _trained(
        models.BPE(byte_fallback=True, unk_token=spec.unk), normalizer, pre_tokenizer,
        dict(vocab_size=VOCAB_SIZE - len(spec.last) - 16, special_tokens=[*spec.first, *_BYTES]),
    )


@functools.lru_cache(maxsize=None)
def family_tokenizer(name: str):
    """The family's tokenizer (trained once per session; callers must not modify it)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import GemmaTokenizer, GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    spec = family(name)
    specials = dict(bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, unk_token=spec.unk)
    if spec.tokenizer == "llama3":
        # As Llama 3's tokenizer.json: the BOS comes from the post-processor, not from an add_bos_token flag.
        vocab, merges = _byte_level(spec, _LLAMA3_SPLIT)
        backend = Tokenizer(models.BPE(vocab=_with_last(vocab, spec), merges=merges, ignore_merges=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in spec.last])
        bos_id = backend.token_to_id(spec.bos)
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{spec.bos}:0 $A:0", pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
                                          special_tokens=[(spec.bos, bos_id)]),
        ])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos, eos_token=spec.eos)
    elif spec.tokenizer == "gemma":
        vocab, merges = _sentencepiece_like(
            spec, normalizers.Replace(" ", "▁"), pre_tokenizers.Split("▁", behavior="merged_with_next")
        )
        tokenizer = GemmaTokenizer(vocab=_with_last(vocab, spec), merges=merges, add_bos_token=True, **specials)
    elif spec.tokenizer == "mistral":
        vocab, merges = _sentencepiece_like(spec, None, pre_tokenizers.Metaspace(prepend_scheme="first"))
        tokenizer = LlamaTokenizer(
            vocab=_with_last(vocab, spec), merges=merges, add_bos_token=True, legacy=False, **specials
        )
    elif spec.tokenizer == "qwen":
        vocab, merges = _byte_level(spec, _QWEN_SPLIT)
        tokenizer = Qwen2Tokenizer(vocab=_with_last(vocab, spec), merges=merges, **specials)
    else:  # gpt2: SmolLM2, as pipeline/download.py converts it from the GGUF
        vocab, merges = _byte_level(spec, None)
        tokenizer = GPT2Tokenizer(vocab=_with_last(vocab, spec), merges=merges, add_bos_token=False, **specials)
    if spec.last and spec.tokenizer != "llama3":
        tokenizer.add_special_tokens({"additional_special_tokens": list(spec.last)}, replace_extra_special_tokens=False)
    return tokenizer


def _config(name: str):
    from transformers import AutoConfig

    spec = family(name)
    tokenizer = family_tokenizer(name)
    ids = {key: tokenizer.convert_tokens_to_ids(token) if token else None
           for key, token in (("bos", spec.bos or spec.config_bos), ("eos", spec.eos), ("pad", spec.pad))}
    settings = {**_SHAPE, **spec.config}
    return AutoConfig.for_model(
        spec.model_type, vocab_size=VOCAB_SIZE, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], architectures=[spec.architecture], **settings,
    )


def save_family_model(name: str, directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of family `name` with its tokenizer into `directory`; returns it."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    config = _config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # Random init gives near-zero logits; larger weights make two inputs' logits differ visibly.
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if parameter.dim() >= 2 or parameter_name.endswith(".bias"):
                    parameter.normal_(0, 0.2)
    model.to(dtype).save_pretrained(directory)
    family_tokenizer(name).save_pretrained(directory)
    published = family(name).published
    if published:
        config_file = directory / "tokenizer_config.json"
        entries = {**json.loads(config_file.read_text(encoding="utf-8")), **published}
        config_file.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory
