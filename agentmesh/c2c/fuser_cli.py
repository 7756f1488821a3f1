"""`agentmesh fuser ...`: inspect, convert and download fuser checkpoints.

Every error agentmesh raises on purpose is one line on stderr and exit status 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from agentmesh.commands import Commands
from agentmesh.errors import CheckpointError
from agentmesh.units import human_bytes

app = Commands(no_args_is_help=True, help="Inspect, convert and download C2C fusers.")


def _gates(projector: Any) -> dict[str, bool] | None:
    if hasattr(projector, "gate_status"):
        return projector.gate_status()
    return None


@app.command()
def inspect(
    path: str = typer.Argument(..., help="A fuser folder (either layout), a published pair name or hf:// ref."),
    subfolder: Optional[str] = typer.Option(None, help="Published layout: checkpoint-N instead of final."),
) -> None:
    """Show a fuser's pair, size, dtype and which layers' gates are open."""
    from agentmesh.c2c.checkpoints import fuser_model_ids, load_any, locate, size_on_disk

    location = locate(path, subfolder=subfolder)
    fuser = load_any(location.folder, subfolder=location.subfolder)
    receiver_id, sharer_id = fuser_model_ids(fuser)
    cfg = fuser.config
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in fuser.parameters()})
    out = Console(highlight=False, soft_wrap=True)
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    layout = "published C2C" + (f" ({location.subfolder}/)" if location.layout == "published" else "")
    rows = [
        ("pair", location.folder.name),
        ("layout", layout if location.layout == "published" else "agentmesh"),
        ("receiver", f"{receiver_id}  ({cfg.receiver.num_layers} layers, {cfg.receiver.num_kv_heads} KV heads "
                     f"x {cfg.receiver.head_dim})"),
        ("sharer", f"{sharer_id}  ({cfg.sharer.num_layers} layers, {cfg.sharer.num_kv_heads} KV heads "
                   f"x {cfg.sharer.head_dim})"),
        ("projector", f"{cfg.projector} x {len(fuser.projectors)}"),
        ("layer map", cfg.layer_map),
        ("alignment", cfg.alignment),
        ("fusion", f"{cfg.fusion} (sharer keys at the {cfg.key_positions}'s positions)"),
        ("parameters", f"{fuser.num_parameters():,}"),
        ("dtype", ", ".join(dtypes)),
        ("size on disk", human_bytes(size_on_disk(location))),
    ]
    for key, value in rows:
        summary.add_row(key, value)
    out.print(summary)
    if cfg.warning:
        out.print(f"[bold yellow]warning:[/] {cfg.warning}", markup=True)

    table = Table(title="gates (open = the layer is fused)")
    for column in ("receiver layer", "sharer layer", "projector", "key gate", "value gate"):
        table.add_column(column, justify="right" if "layer" in column or column == "projector" else "center")
    open_k = open_v = 0
    for r in cfg.routes:
        gates = _gates(fuser.projectors[r.projector])
        k = "?" if gates is None else ("open" if gates["key"] else "closed")
        v = "?" if gates is None else ("open" if gates["value"] else "closed")
        open_k += k == "open"
        open_v += v == "open"
        table.add_row(str(r.receiver_layer), str(r.sharer_layer), str(r.projector), k, v)
    out.print(table)
    out.print(f"open gates: key {open_k}/{len(cfg.routes)}, value {open_v}/{len(cfg.routes)}")


@app.command()
def convert(
    src: str = typer.Argument(..., help="A fuser folder (published layout or ours), pair name or hf:// ref."),
    dst: Path = typer.Argument(..., help="Folder to write fuser.json and model.safetensors into."),
    subfolder: Optional[str] = typer.Option(None, help="Published layout: checkpoint-N instead of final."),
    force: bool = typer.Option(False, "--force", help="Write into DST even if it is not empty."),
) -> None:
    """Convert a fuser to the agentmesh layout, losslessly (the same tensors, bit for bit)."""
    from agentmesh.c2c.checkpoints import load_any, locate, save_fuser

    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} is a file; expected a folder (new or empty)")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise CheckpointError(f"destination {dst} is not empty; pass --force to write into it")
    location = locate(src, subfolder=subfolder)
    fuser = load_any(location.folder, subfolder=location.subfolder)
    save_fuser(fuser, dst, provenance={"converted_from": str(src)})
    typer.echo(f"wrote {dst} ({len(fuser.projectors)} projectors, {fuser.num_parameters():,} parameters)")


@app.command()
def pull(
    pair: str = typer.Argument(..., help="A published pair folder name, or hf://org/repo/<pair>[@revision]."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Download into this folder instead of the HF cache."),
    subfolder: str = typer.Option("final", help="Which checkpoint folder to fetch with config.json."),
    revision: Optional[str] = typer.Option(None, help="Branch, tag or commit of the hub repo."),
) -> None:
    """Download a published fuser (config.json and final/) and print its local folder."""
    from agentmesh.c2c.checkpoints import PUBLISHED_PAIRS, download_pair, parse_hub_ref

    if pair.startswith("hf://"):
        repo_id, name, rev = parse_hub_ref(pair)
    elif pair in PUBLISHED_PAIRS:
        repo_id, name, rev = parse_hub_ref(PUBLISHED_PAIRS[pair].ref)
    else:
        raise CheckpointError(f"unknown fuser pair {pair!r}; known pairs: {', '.join(PUBLISHED_PAIRS)} "
                              "(or give hf://org/repo/<pair>)")
    folder = download_pair(repo_id, name, revision=revision or rev, subfolder=subfolder, local_dir=dest)
    typer.echo(str(folder))
