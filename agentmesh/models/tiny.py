"""Tiny random-weight models and test tokenizers, for tests, benchmarks and examples.

`build_tiny_model` makes a real transformers model of a supported architecture with a few small
layers, so caches have the real layouts (GQA heads, q/k-norm, Gemma3's sliding layers) while a
forward pass takes milliseconds. Two tokenizers to pair them with:

* `smollm2_tokenizer` — SmolLM2's real tokenizer and chat template, read once from the GGUF file of
  the built-in model (a few seconds) and saved with `save_pretrained` for fast later loads;
* `train_tiny_tokenizer` — a small byte-level BPE trained on the spot (a different vocabulary
  from SmolLM2's, for cross-tokenizer tests), with a ChatML chat template.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from agentmesh.errors import ConfigError, ModelLoadError, error_line
from agentmesh.models.builtin import DEFAULT_MODEL, builtin_gguf_path
from agentmesh.models.loaded_model import LoadedModel, pad_token_id
from agentmesh.models.load import finish_loaded, progress_bars

TINY_ARCHS = ("qwen3", "qwen2", "llama", "gemma3")

# Gemma3 mixes sliding-window and full-attention layers; tiny models alternate them, with a
# window far longer than any test prompt so both kinds see the whole prompt.
TINY_SLIDING_WINDOW = 1024

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The part of Qwen3's template that matters here: with enable_thinking=False the assistant turn
# opens with an empty think block, which tells the model to answer without reasoning.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

_DEFAULT_CORPUS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.",
    "Question: What is two plus three? Answer: Two plus three is five.",
    "A cache stores keys and values so that a model does not compute them again.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 3.14 2.71",
    "You are a helpful assistant. Please answer the question step by step.",
    "The answer is (A). The answer is (B). The answer is (C). The answer is (D).",
    "Agents talk to each other by sharing their memory instead of writing long messages.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero.",
    "system user assistant tool: hello, hi there! How are you today? I am fine, thanks.",
    "Write a short poem about the sea, the wind and the stars above the quiet town.",
)


def tiny_config(
    arch: str,
    *,
    vocab_size: int,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    **overrides: Any,
) -> Any:
    """A transformers config for a tiny model of `arch` (one of `TINY_ARCHS`).

    ``"gemma3"`` is the text-only `Gemma3ForCausalLM` (`Gemma3TextConfig`), with alternating
    sliding/full layers and `TINY_SLIDING_WINDOW`. `overrides` are passed to the config class.
    """
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig, "gemma3": Gemma3TextConfig}
    if arch not in classes:
        raise ConfigError(f"tiny model architecture {arch!r} is not supported; use one of {', '.join(TINY_ARCHS)}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"tiny {arch}: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
    )
    if arch == "gemma3":
        kwargs.update(sliding_window=TINY_SLIDING_WINDOW, query_pre_attn_scalar=head_dim,
                      layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)])
    kwargs.update(overrides)
    try:
        return classes[arch](**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tiny {arch} config is invalid: {e}") from e


def build_tiny_model(arch: str, tokenizer: Any, *, seed: int = 0, name: str | None = None, **cfg: Any) -> LoadedModel:
    """A float32 random-weight model of `arch` sized for `tokenizer` (vocab = ``len(tokenizer)``).

    The same `arch`, `seed` and `cfg` give the same weights; the global RNG is left untouched.
    `cfg` goes to `tiny_config` (num_layers, num_kv_heads, head_dim, ...). A tokenizer without a
    pad token is copied before its pad is set to eos.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id(tokenizer, default=None),
        **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer = copy.deepcopy(tokenizer)
    name = name or f"tiny-{arch}-s{seed}"
    return finish_loaded(model, tokenizer, name=name, source=f"tiny:{arch}:seed={seed}")


def save_tiny_model(path: str | Path, arch: str, tokenizer: Any, *, seed: int = 0, **cfg: Any) -> Path:
    """Build a tiny model and save it with its tokenizer as a folder `load_model` can read."""
    path = Path(path)
    loaded = build_tiny_model(arch, tokenizer, seed=seed, **cfg)
    with progress_bars(verbose=False):
        loaded.model.save_pretrained(path)
        loaded.tokenizer.save_pretrained(path)
    return path


def default_tokenizer_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "agentmesh" / "tokenizers"


def smollm2_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """A folder with SmolLM2-135M-Instruct's tokenizer in `save_pretrained` form.

    Extracted from the built-in GGUF file on first call (about 8 s on one shared core) into
    ``cache_dir/smollm2-135m-instruct`` (default `default_tokenizer_cache()`), then reused.
    The folder is written to a temporary sibling and renamed, so concurrent test runs never see
    half a tokenizer; a stamp of the GGUF file's size/mtime makes a stale copy be rebuilt.
    """
    from transformers import AutoTokenizer

    gguf = builtin_gguf_path(DEFAULT_MODEL)
    root = Path(cache_dir) if cache_dir is not None else default_tokenizer_cache()
    target = root / DEFAULT_MODEL
    stat = gguf.stat()
    stamp: dict[str, Any] = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stamp_file = target / "agentmesh-source.json"
    if stamp_file.is_file() and (target / "tokenizer.json").is_file():
        try:
            old = json.loads(stamp_file.read_text())
            if all(old.get(k) == v for k, v in stamp.items()):
                return target
        except ValueError:
            pass  # a damaged stamp: rebuild below
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise ModelLoadError(f"could not read the tokenizer of {gguf}: {error_line(e)}") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=root))
    tokenizer.save_pretrained(tmp)
    # Kept for the record (how long a cold test session pays); not part of the freshness check.
    stamp = {**stamp, "extract_seconds": round(time.perf_counter() - started, 2)}
    (tmp / "agentmesh-source.json").write_text(json.dumps(stamp))
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer(cache_dir: str | Path | None = None) -> Any:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template); see `smollm2_tokenizer_dir`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))


def train_tiny_tokenizer(
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
    *,
    chat_template: str = CHATML_TEMPLATE,
) -> Any:
    """A byte-level BPE tokenizer trained now on `corpus` (a built-in English/code sample by
    default), as a transformers fast tokenizer.

    Deterministic for the same corpus and size. Special tokens: ``<|endoftext|>`` (bos),
    ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<|pad|>`` (pad); `chat_template` is ChatML-like
    unless given. Any text encodes (byte fallback), but its vocabulary differs from SmolLM2's.
    `len()` may be below `vocab_size` when the corpus runs out of merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = list(corpus) if corpus is not None else list(_DEFAULT_CORPUS)
    if not lines:
        raise ConfigError("train_tiny_tokenizer: the corpus is empty; give at least one line of text")
    backend.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        extra_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = chat_template
    return tokenizer
