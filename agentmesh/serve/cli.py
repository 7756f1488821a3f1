"""`agentmesh serve`, `agentmesh demo` and `agentmesh bench serve`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from agentmesh.commands import fail
from agentmesh.errors import AgentMeshError


def _need(extra: str, *modules: str) -> None:
    """Fail in one line when an optional dependency is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        fail(AgentMeshError(f"this command needs {', '.join(missing)}: pip install 'agentmesh[{extra}]'"))


def _log_to_stderr() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("agentmesh.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def serve_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="serve YAML (see configs/serve.yaml)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Receiver or plain model: built-in name, folder, .gguf or hub id."),
    sharer: list[str] = typer.Option([], "--sharer", "-s", help="A sharer model (repeat; one --fuser each)."),
    fuser: list[str] = typer.Option([], "--fuser", "-f", help="A fuser folder or hf:// ref, one per sharer."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Serve a pipeline file's output agent."),
    name: Optional[str] = typer.Option(None, "--name", help="The served model name (default from the model)."),
    mode: str = typer.Option("parallel", help="Multi-sharer fusion: parallel or sequential."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    host: Optional[str] = typer.Option(None, help="Address to bind (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000; 0 picks a free one)."),
    public: bool = typer.Option(False, "--public", help="Allow a --host other than loopback."),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", min=1,
                                                 help="Most requests batched into one generation (default 16)."),
    batch_window_ms: Optional[float] = typer.Option(None, "--batch-window-ms", min=0,
                                                    help="How long a batch waits for more requests (default 10)."),
    api_keys_env: Optional[str] = typer.Option(None, "--api-keys-env",
                                               help="Environment variable with comma-separated API keys "
                                                    "(default AGENTMESH_API_KEYS; unset: no keys needed)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads."),
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health)."""
    _need("serve", "fastapi", "uvicorn")
    import torch

    from agentmesh.serve.config import config_from_flags, load_serve_config
    from agentmesh.serve.server import serve

    if config is not None:
        if model or sharer or fuser or pipeline:
            raise AgentMeshError("give either --config or --model/--sharer/--fuser/--pipeline, not both")
        cfg = load_serve_config(config)
    else:
        cfg = config_from_flags(name=name, model=model, sharers=sharer, fusers=fuser,
                                pipeline=None if pipeline is None else str(pipeline), mode=mode, dtype=dtype)
    changes = {k: v for k, v in {"host": host, "port": port, "api_keys_env": api_keys_env}.items() if v is not None}
    batching = {k: v for k, v in {"max_batch_size": max_batch_size, "window_ms": batch_window_ms}.items()
                if v is not None}
    cfg = cfg.model_copy(update={**changes, "batching": cfg.batching.model_copy(update=batching)})
    if threads is not None:
        torch.set_num_threads(threads)
    _log_to_stderr()
    serve(cfg, allow_public=public,
          on_loaded=lambda n, e: typer.echo(f"loaded {n}: {e.description}", err=True),
          on_ready=lambda url: typer.echo(f"ready: {url} (Ctrl-C stops)", err=True))


def bench_serve_command(
    quick: bool = typer.Option(False, "--quick", help="1 and 16 clients, 32 tokens, 2 rounds."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="JSON output (default bench/results/serve.json)."),
    url: Optional[str] = typer.Option(None, "--url", help="Drive a running server (its /v1 URL) instead."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (default 1)."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config field."),
) -> None:
    """Requests/s, tokens/s and p50/p95 latency with 1, 4 and 16 concurrent HTTP clients (target 16 >= 3x 1)."""
    _need("serve", "fastapi", "uvicorn", "httpx")
    from agentmesh.bench import DEFAULT_THREADS, _parse_overrides
    from agentmesh.bench.common import print_result, set_threads, write_json
    from agentmesh.serve import bench

    changes = _parse_overrides(bench.Config, overrides)
    if url is not None:
        changes["url"] = url
    cfg = bench.Config.quick(**changes) if quick else bench.Config(**changes)
    set_threads(threads if threads is not None else DEFAULT_THREADS)
    result = bench.run(cfg)
    result.config["quick"] = quick
    print_result(result)
    typer.echo(f"wrote {write_json(result, json_path)}")


def demo_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="demo YAML (default configs/demo.yaml)."),
    receiver: Optional[str] = typer.Option(None, "--receiver", "-m", help="The receiver model (overrides the YAML)."),
    sharer: Optional[str] = typer.Option(None, "--sharer", "-s", help="The sharer model."),
    fuser: Optional[str] = typer.Option(None, "--fuser", "-f", help="The fuser folder or hf:// ref."),
    receiver_adapter: Optional[str] = typer.Option(None, "--receiver-adapter", help="A PEFT adapter folder for the receiver."),
    sharer_adapter: Optional[str] = typer.Option(None, "--sharer-adapter", help="A PEFT adapter folder for the sharer."),
    dtype: Optional[str] = typer.Option(None, help="auto, float32, bfloat16 or float16."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: Optional[int] = typer.Option(None, help="Port (default: Gradio's 7860, or the next free one)."),
    public: bool = typer.Option(False, "--public", help="Allow a --host other than loopback."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads."),
) -> None:
    """The side-by-side web demo: receiver alone | text to text | cache to cache, streaming."""
    _need("demo", "gradio")
    import torch

    from agentmesh.serve.demo import DEFAULT_CONFIG, build_demo, launch, load_demo_config, preload
    from agentmesh.serve.server import check_host

    check_host(host, public)
    cfg = load_demo_config(config or DEFAULT_CONFIG, receiver=receiver, sharer=sharer, fuser=fuser,
                           receiver_adapter=receiver_adapter, sharer_adapter=sharer_adapter, dtype=dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    preload(cfg, echo=lambda line: typer.echo(line, err=True))
    launch(build_demo(cfg), host=host, port=port)
