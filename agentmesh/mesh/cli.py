"""`agentmesh worker FILE.yaml --host NAME`: serve one host's agents over MQTT until stopped.

The main app registers it with `app.command("worker")(worker_command)`; this module's own `app`
holds it too (for tests and `python -m agentmesh.mesh.cli`). It prints one line when it is
ready, one per served call (bytes in and out, time), and stops cleanly on Ctrl-C or SIGTERM.
Every error is one line on stderr and exit status 2.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from agentmesh.commands import Commands, fail
from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.mesh.settings import DEFAULT_MAX_CALLS, DEFAULT_MAX_REQUEST_BYTES
from agentmesh.transport.config import BrokerConfig
from agentmesh.units import parse_bytes

LOOPBACK = ("127.0.0.1", "localhost", "::1")

WIRE_DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8")
MIN_QUEUED_BYTES: int = next(m.ge for m in BrokerConfig.model_fields["max_buffered_bytes"].metadata
                             if getattr(m, "ge", None) is not None)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def worker_command(
    file: Annotated[Path, typer.Argument(help="Pipeline file (YAML), the same on every host.", show_default=False)],
    host: Annotated[str, typer.Option("--host", help="The host (under hosts: in the file) whose agents this "
                                      "machine runs.", show_default=False)],
    broker: Annotated[Optional[str], typer.Option("--broker", help="MQTT broker, mqtt://HOST:PORT or mqtts://... "
                                                  "(default: the host's or the file's broker:).")] = None,
    username: Annotated[Optional[str], typer.Option("--username", help="Broker user (default: the file's).")] = None,
    password_env: Annotated[Optional[str], typer.Option("--password-env", help="Environment variable holding the "
                                                        "broker password (default: the file's).")] = None,
    wire_dtype: Annotated[Optional[str], typer.Option("--wire-dtype", help="Encoding of the caches this worker "
                                                      "sends: fp32, bf16, fp16, int8 or fp8 (default: the "
                                                      "cache's own dtype, lossless).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve without a key (the file has no auth:): "
                                           "anyone on the broker could drive this worker. Loopback "
                                           "development only.")] = False,
    max_calls: Annotated[str, typer.Option("--max-calls", help="Calls served at once; more are refused with a "
                                           "'busy' reply.")] = str(DEFAULT_MAX_CALLS),
    max_request_bytes: Annotated[str, typer.Option("--max-request-bytes", help="Bytes the requests of the calls "
                                                   "in flight may hold together (e.g. 512MiB); a request "
                                                   "beyond is refused.")] = f"{DEFAULT_MAX_REQUEST_BYTES >> 20}MiB",
    max_queued_bytes: Annotated[Optional[str], typer.Option("--max-queued-bytes", help="Bytes of messages not "
                                                            "yet read that the link holds (at least 1MiB); chunks "
                                                            "beyond are dropped (default: the file's "
                                                            "broker.max_buffered_bytes, else 1GiB).")] = None,
) -> None:
    """Serve the agents FILE places on HOST: answer runs started on any host (`agentmesh run FILE
    --broker ...`) until Ctrl-C or SIGTERM."""
    from agentmesh.graph import load_graph
    from agentmesh.mesh.auth import make_guard
    from agentmesh.mesh.settings import broker_config
    from agentmesh.mesh.worker import Worker, served_agents
    from agentmesh.transport.mqtt import MqttLink

    if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
        fail(ConfigError(f"--wire-dtype {wire_dtype!r} is unknown; use one of {', '.join(WIRE_DTYPES)}"))
    limits = worker_limits(max_calls, max_request_bytes, max_queued_bytes)
    queued = {} if limits.queued_bytes is None else {"max_buffered_bytes": limits.queued_bytes}
    try:
        graph = load_graph(file)
        served_agents(graph, host)
        config = broker_config(graph, url=broker, host=host, username=username, password_env=password_env,
                               **queued)
        guard = make_guard(graph, host, insecure=insecure)
    except AgentMeshError as e:
        fail(e)
    if not guard.secure:
        warn_insecure(config)
    logging.basicConfig(level=logging.WARNING, format="worker: %(message)s", stream=sys.stderr)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
                pass
        async with MqttLink(config, graph=graph.name) as link:
            worker = Worker(graph, host, link, wire_dtype=wire_dtype, on_served=lambda call: _say(call.line()),
                            key=guard.key, insecure=insecure, max_calls=limits.calls,
                            max_request_bytes=limits.request_bytes)
            await worker.preload()
            models = ", ".join(f"{n} ({graph.model_of(n).alias or graph.model_of(n).ref})" for n in worker.agents)
            serving = asyncio.create_task(worker.serve(ready=lambda: _say(
                f"worker {host} of graph {graph.name!r} serves {models} on {config.url} "
                f"(topic {link.topic(worker.inbox)}); Ctrl-C stops")))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if serving.done():
                serving.result()  # the link closed under it: raise why
            worker.stop()
            await serving
            _say(f"worker {host} stopped after {worker.served} call(s)")

    try:
        asyncio.run(main())
    except AgentMeshError as e:
        fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@dataclass(frozen=True)
class WorkerLimits:
    calls: int
    request_bytes: int
    queued_bytes: int | None  # None: the file's broker.max_buffered_bytes


def worker_limits(calls: str, request_bytes: str, queued_bytes: str | None) -> WorkerLimits:
    """The load limits from the command line, or one line and exit 2 naming the option."""
    def count(option: str, text: str) -> int:
        if not text.strip().isdigit() or int(text) < 1:
            fail(ConfigError(f"{option} {text!r} is not a whole number of at least 1"))
        return int(text)

    def size(option: str, text: str, least: int) -> int:
        try:
            value = parse_bytes(text)
        except ValueError as e:
            fail(ConfigError(f"{option}: {e}"))
        if value < least:
            fail(ConfigError(f"{option} {text!r} is {value} bytes; the least is {least} bytes"))
        return value

    return WorkerLimits(calls=count("--max-calls", calls),
                        request_bytes=size("--max-request-bytes", request_bytes, 1),
                        queued_bytes=None if queued_bytes is None else size("--max-queued-bytes", queued_bytes,
                                                                            MIN_QUEUED_BYTES))


def keygen_command(
    file: Annotated[Path, typer.Argument(help="Where to write the new private key (mode 600); it must not exist.",
                                         show_default=False)],
    host: Annotated[str, typer.Option("--host", help="The host the key is for (printed in the YAML lines).")] = "HOST",
) -> None:
    """Make a host's own signing key (Ed25519) for `auth: hosts:` and print the lines for the pipeline file.
    The private key stays on that host; the public key goes in the file every host reads."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agentmesh.mesh.auth import private_key_text, public_key_text

    key = Ed25519PrivateKey.generate()
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{file} exists; keygen never overwrites a key (remove it first, or pick another name)")
    except OSError as e:
        fail(f"cannot create {file}: {e.strerror or e}")
    with os.fdopen(fd, "w") as f:
        f.write(private_key_text(key) + "\n")
    _say(f"wrote the private key of host {host} to {file} (mode 600); keep it on that host only. "
         "In the pipeline file:")
    _say(f"auth:\n  hosts:\n    {host}: {{key_file: {file}, public_key: {public_key_text(key)}}}")


def warn_insecure(config: BrokerConfig) -> None:
    """One line on stderr: without a key, nothing stops another client of the broker."""
    where = "" if config.host in LOOPBACK else f" on {config.host}, which is not this machine"
    typer.echo(f"warning: --insecure: messages are not authenticated; any client of the broker{where} can "
               "drive this pipeline's workers", err=True)


app = Commands(no_args_is_help=True, help="Serve a host's agents over MQTT.")


@app.callback()
def _group() -> None:
    """Serve a host's agents over MQTT (`worker`)."""  # a group, so the command keeps its name


app.command("worker")(worker_command)
app.command("keygen")(keygen_command)


if __name__ == "__main__":
    app()
