"""From a `ServeConfig` to a running server: load each served model into its engine, then uvicorn."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from agentmesh.errors import ConfigError
from agentmesh.serve.config import ServeConfig, ServedModel
from agentmesh.serve.engine import BatchEngine, Engine, PipelineEngine

if TYPE_CHECKING:
    from agentmesh.models.pool import ModelPool

log = logging.getLogger("agentmesh.serve")


def build_engine(name: str, entry: ServedModel, cfg: ServeConfig, *, pool: ModelPool | None = None) -> Engine:
    """Load what `entry` names (models come from `pool`, so a model served twice loads once)."""
    from agentmesh.models import default_pool

    pool = pool if pool is not None else default_pool()
    if entry.pipeline is not None:
        from agentmesh.graph import load_graph

        return PipelineEngine(name, load_graph(entry.pipeline), output=entry.output, pool=pool,
                              max_queue=cfg.limits.max_queue)
    from agentmesh.c2c.model import C2CModel

    model = C2CModel.build(entry.model, sharers=entry.sharers, fusers=entry.fusers, mode=entry.mode,
                           dtype=entry.dtype, device=entry.device, pool=pool)
    return BatchEngine(name, model, max_batch_size=cfg.batching.max_batch_size,
                       window_s=cfg.batching.window_ms / 1000, rejoin_s=cfg.batching.rejoin_ms / 1000,
                       max_queue=cfg.limits.max_queue,
                       default_temperature=entry.temperature)


def api_keys_from_env(variable: str) -> frozenset[str]:
    """The comma-separated keys in environment variable `variable` (none: no authentication)."""
    return frozenset(k.strip() for k in os.environ.get(variable, "").split(",") if k.strip())


def check_host(host: str, allow_public: bool) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not allow_public:
        raise ConfigError(f"--host {host} would accept connections from other machines; "
                          "add --public to mean it (and set API keys)")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one), so the real port is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def _uvicorn(app: Any) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                         timeout_graceful_shutdown=5))


def serve(cfg: ServeConfig, *, pool: ModelPool | None = None, allow_public: bool = False,
          on_loaded: Callable[[str, Engine], None] | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Load every model of `cfg` and serve until interrupted; `on_ready(base_url)` once listening."""
    from agentmesh.serve.app import create_app

    check_host(cfg.host, allow_public)
    keys = api_keys_from_env(cfg.api_keys_env)
    engines: dict[str, Engine] = {}
    for name, entry in cfg.models.items():
        engines[name] = build_engine(name, entry, cfg, pool=pool)
        if on_loaded is not None:
            on_loaded(name, engines[name])
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    log.info("serving %s on %s (API keys: %s)", ", ".join(engines), url,
             f"{len(keys)} from ${cfg.api_keys_env}" if keys else "none needed")
    if on_ready is not None:
        on_ready(url)
    try:
        _uvicorn(create_app(engines, limits=cfg.limits, api_keys=keys)).run(sockets=[sock])
    finally:
        sock.close()
        for engine in engines.values():
            engine.close()


class ServerThread:
    """An app served on a loopback port from a background thread (tests, benchmarks, the demo).

        with ServerThread(app) as server:
            httpx.get(server.url + "/models")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://{host}:{self.port}"
        self.url = self.base + "/v1"
        self.server = _uvicorn(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="agentmesh-server", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
