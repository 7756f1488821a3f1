"""The `agentmesh` command line. Every error agentmesh raises on purpose becomes one line on stderr
and exit status 2; nothing prints a traceback at a user."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

import typer
from rich.console import Console

from agentmesh import __version__
from agentmesh.commands import Commands, show_error
from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.progress import Interrupted

if TYPE_CHECKING:
    from agentmesh.c2c.pretrained import ModelLike

def _run_remote(*args: Any, **kwargs: Any) -> Any:
    from agentmesh.mesh.remote import run_remote  # imported on use: the bare CLI starts fast

    return run_remote(*args, **kwargs)


@dataclass(frozen=True)
class Services:
    """Code above a package that its commands need, handed down through the click context
    (`ctx.obj`): `agentmesh run --broker` lives in the runtime, runs across hosts live in the mesh."""

    run_remote: Callable[..., Any] = _run_remote


app = Commands(name="agentmesh", no_args_is_help=True, context_settings={"obj": Services()})
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _quiet_libraries(verbose: bool) -> None:
    """Library warnings (deprecations, transformers' notices) go to the log, which only --verbose shows,
    so normal output holds what agentmesh says and nothing else."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.captureWarnings(True)
    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL, format="%(name)s: %(message)s",
                        stream=sys.stderr)
    if not verbose:
        warnings.filterwarnings("ignore")


def _show_version(value: bool) -> None:
    if value:
        print(f"agentmesh {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show library warnings and log messages."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """LLM agents that talk through their KV caches (Cache-to-Cache fusion)."""
    _quiet_libraries(verbose)


def _positive(name: str, *, at_most: float | None = None) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not value > 0 or (at_most is not None and value > at_most):
            where = f"in (0, {at_most:g}]" if at_most is not None else "above 0"
            raise typer.BadParameter(f"{value:g} is out of range; expected a number {where}", param_hint=name)
        return value
    return check


def read_text_arg(value: str | None, what: str) -> str:
    """A text argument, '-' for standard input."""
    if value == "-" or value is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise typer.BadParameter(f"give the {what} as an argument, or '-' to read it from standard input")
        return sys.stdin.read()
    return value


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The user message; '-' reads standard input."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Receiver: built-in name, folder, .gguf or hub id. Default: the fuser's receiver, else smollm2-135m-instruct."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A PEFT adapter folder merged into the receiver."),
    sharer: list[str] = typer.Option([], "--sharer", "-s", help="A sharer model (repeat for several)."),
    sharer_adapter: list[str] = typer.Option(
        [], "--sharer-adapter", help="A PEFT adapter folder per sharer, in --sharer order (repeat; '-' for none)."),
    fuser: list[str] = typer.Option([], "--fuser", "-f", help="A fuser folder or hf:// ref, one per sharer (repeat)."),
    mode: str = typer.Option("parallel", help="Multi-sharer fusion: parallel or sequential."),
    system: Optional[str] = typer.Option(None, help="A system message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=0),
    temperature: float = typer.Option(0.0, min=0.0, help="0 decodes greedily; above 0 samples."),
    top_k: int = typer.Option(0, min=0, help="Sample among the k likeliest tokens (0: all)."),
    top_p: float = typer.Option(1.0, callback=_positive("--top-p", at_most=1.0), help="Nucleus sampling mass."),
    repetition_penalty: float = typer.Option(1.0, callback=_positive("--repetition-penalty")),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
) -> None:
    """Answer PROMPT with a receiver model, optionally fused with sharers' KV caches."""
    import time

    from agentmesh.c2c.model import C2CModel
    from agentmesh.models.inference import check_context
    from agentmesh.models.builtin import DEFAULT_MODEL
    from agentmesh.models.load import model_size
    from agentmesh.models.streaming import TextDecoder
    from agentmesh.progress import Steps, pace
    from agentmesh.types import check_fusion_mode
    from agentmesh.units import human_bytes

    text = read_text_arg(prompt, "prompt")
    steps = Steps(err)
    check_fusion_mode(mode, "--mode")
    # Bad paths fail here, before anything is shown or loaded.
    size = model_size(model or DEFAULT_MODEL) if model is not None or not fuser else None
    for ref in fuser:
        if not ref.startswith("hf:") and not Path(ref).expanduser().is_dir():
            from agentmesh.c2c.checkpoints import locate

            locate(ref)
    sized = lambda name, n: name + (f" ({human_bytes(n)})" if n else "")  # noqa: E731
    what = [sized(model or DEFAULT_MODEL, size) if model is not None or not fuser else "the fuser's models"]
    what += [sized(f"fuser {ref}", _fuser_bytes(ref)) for ref in fuser]
    with steps.step("load", f"loading {' and '.join(what)}"):
        receiver, sharers = with_adapters(model, adapter, sharer, sharer_adapter, dtype=dtype)
        c2c = C2CModel.build(receiver, sharers=sharers, fusers=fuser, mode=mode, dtype=dtype)
    for ref, f in zip(fuser, c2c.fusers):
        if f.config.warning:
            err.print(f"[bold yellow]warning:[/] {ref}: {f.config.warning}", markup=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    prompt_tokens = len(c2c.receiver.chat_ids(messages))
    check_context(c2c.receiver, prompt_tokens, max_new_tokens)
    eos = set(c2c.receiver.eos_token_ids)
    decoder = TextDecoder(c2c.tokenizer) if stream else None
    prefill: list[str] = []  # how the prompt was read, once the first token is out
    with steps.step("answer", f"reading the prompt ({prompt_tokens} tokens)") as show:
        started = time.perf_counter()

        def on_token(step: int, tok: Any) -> None:
            if step == 0:
                prefill.append(pace(prompt_tokens, time.perf_counter() - started))
            if decoder is not None:
                if step == 0 and steps.live:
                    show("")  # the streamed text shows progress from here on
                elif step == 0:
                    show(f"decoding · {prefill[0]}")
                if int(tok[0]) not in eos:
                    print(decoder.push(int(tok[0])), end="", flush=True)
            else:
                show(f"decoding ({step + 1} tokens) · {prefill[0]}")

        answer = c2c.chat(messages, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                          temperature=temperature if temperature > 0 else None, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed, on_token=on_token)
    print() if stream else print(answer)
    err.print(f"[dim]model loading {steps.times['load']:.1f} s, answer {steps.times['answer']:.1f} s "
              f"({prefill[0] if prefill else f'{prompt_tokens} prompt tokens'})[/]", markup=True)


def _fuser_bytes(ref: str) -> int | None:
    """Bytes of a local fuser folder's files (None for a hub ref or a pair name: not fetched yet)."""
    if not Path(ref).expanduser().is_dir():
        return None
    from agentmesh.c2c.checkpoints import locate, size_on_disk

    return size_on_disk(locate(ref)) or None


def with_adapters(model: str | None, adapter: str | None, sharers: list[str], sharer_adapters: list[str], *,
                  dtype: str) -> tuple[ModelLike | None, list[ModelLike]]:
    """The receiver and sharers as references, or as loaded models where an adapter goes on top."""
    from agentmesh.models import DEFAULT_MODEL, default_pool

    if sharer_adapters and len(sharer_adapters) != len(sharers):
        raise ConfigError(f"{len(sharer_adapters)} --sharer-adapter for {len(sharers)} --sharer; give one per sharer, "
                          "'-' for a sharer without one")
    pool = default_pool()
    receiver: ModelLike | None = (model if adapter is None
                                  else pool.get(model or DEFAULT_MODEL, dtype=dtype, adapter=adapter))
    loaded: list[ModelLike] = list(sharers)
    for i, a in enumerate(sharer_adapters):
        if a != "-":
            loaded[i] = pool.get(sharers[i], dtype=dtype, adapter=a)
    return receiver, loaded


def _mount() -> None:
    """Attach the sub-command groups; each lives next to the code it drives."""
    from agentmesh.bench.cli import app as bench_app
    from agentmesh.c2c.fuser_cli import app as fuser_app
    from agentmesh.c2c.train.cli import app as train_app
    from agentmesh.eval.cli import app as eval_app
    from agentmesh.graph.cli import app as graph_app
    from agentmesh.runtime.cli import chat_command, run_command

    app.command("run")(run_command)
    app.command("chat")(chat_command)
    app.add_typer(graph_app, name="graph", help="Check and show pipeline files.")
    app.add_typer(fuser_app, name="fuser", help="Inspect, convert and download fusers.")
    app.add_typer(train_app, name="train")
    app.add_typer(eval_app)  # `eval` and `make-context-task`
    app.add_typer(bench_app, name="bench", help="Run the benchmarks (tables + JSON).")
    from agentmesh.mesh.cli import keygen_command, worker_command
    app.command("worker")(worker_command)
    app.command("keygen")(keygen_command)
    from agentmesh.serve.cli import bench_serve_command, demo_command, serve_command
    app.command("serve")(serve_command)
    app.command("demo")(demo_command)
    bench_app.command("serve")(bench_serve_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's multi-line usage errors become one line too."""
    _mount()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="agentmesh", standalone_mode=False)
    except typer.TyperException as e:  # click's usage errors, as typer vendors them
        if not e.format_message():  # `agentmesh` alone: the help was shown; nothing more to say
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"[bold red]error:[/] {e.format_message()}{where}", markup=True)
        code = getattr(e, "exit_code", 2)
    except AgentMeshError as e:  # raised outside a command (in an option's callback, say)
        show_error(e)
        code = 2
    except Interrupted as e:
        _exit_interrupted(str(e))
    except (KeyboardInterrupt, typer.Abort):
        _exit_interrupted("interrupted")
    if code == 130:  # Ctrl-C outside a named step, as the command-line framework reports it
        _exit_interrupted("interrupted")
    sys.exit(code or 0)


def _exit_interrupted(what: str) -> NoReturn:
    """One line, then exit at once: worker threads still loading a model would otherwise hold the
    process until they finish. Files are written atomically, so none is left half-written."""
    sys.stdout.flush()
    sys.stderr.write(what + "\n")
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    main()
