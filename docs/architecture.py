"""Draw docs/img/architecture.png: agentmesh's packages in their layers with the packages each one
imports (read from the source, as tests/test_architecture.py reads it), and the path a run's data
takes. Run `python docs/architecture.py` after moving code between packages."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_architecture import LAYERS, imports_of, layer_of, modules  # noqa: E402

JOBS = {
    "cli": "the typer app", "bench": "agentmesh bench and its benchmarks",
    "serve": "OpenAI-style server", "mesh": "runs across hosts", "eval": "methods, metrics, reports",
    "runtime": "plan, scheduler, endpoints", "graph": "agents, edges, YAML", "c2c": "fusers, C2CModel, training",
    "tasks": "datasets, prompts", "models": "loading, prefill, decode", "cache": "KVCache, codec",
    "transport": "links, MQTT", "types": "shared types", "units": "units", "yaml_file": "YAML settings",
    "errors": "typed errors", "files": "bounded file reads", "progress": "progress lines",
    "commands": "one-line command errors",
}
# A run's data, step by step: (what happens, the package doing it).
DATA_PATH = [
    ("YAML file or Python builder", "graph/"),
    ("Graph: agents, text and cache edges, validated", "graph/"),
    ("RunPlan; the scheduler starts every agent's task", "runtime/"),
    ("sharers and receiver prefill the same span", "runtime/ -> models/"),
    ("fusers rewrite the receiver's KVCache of the span", "c2c/"),
    ("receiver decodes; text edges fill prompts", "models/"),
    ("caches for other hosts: encoded once, chunked, sent", "cache/ codec -> mesh/ -> transport/"),
    ("RunResult: every agent's output and the trace", "runtime/"),
]


def package_edges() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for module, file in known.items():
        for target, _ in imports_of(module, file, known):
            a, b = layer_of(module), layer_of(target)
            if a != b and "__" not in a + b:
                edges.setdefault(a, set()).add(b)
    return edges


def _box(ax: plt.Axes, x: float, y: float, w: float, h: float, color: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#2b2d42", lw=0.9))


def main() -> None:
    present = {layer_of(m) for m in modules()}
    rows = [[n for n in row if n in present and "__" not in n] for row in LAYERS]
    rows = [r for r in rows if r]
    edges = package_edges()
    fig, (left, right) = plt.subplots(1, 2, figsize=(17, 0.62 * len(rows) + 1.4), dpi=120,
                                      gridspec_kw={"width_ratios": [1.9, 1]})
    for ax in (left, right):
        ax.set_axis_off()

    h, gap = 0.8, 0.25
    for i, row in enumerate(rows):
        y = -i * (h + gap)
        _box(left, 0, y, 10, h, "#edf2f4" if i % 2 else "#e3ebf2")
        names = "   ".join(n + ("/" if (ROOT / "agentmesh" / n).is_dir() else ".py") for n in row)
        left.text(0.15, y + h * 0.62, names, fontsize=10, weight="bold", va="center")
        left.text(0.15, y + h * 0.25, " · ".join(JOBS.get(n, "") for n in row), fontsize=7.5, color="#444",
                  va="center")
        below = sorted({t for n in row for t in edges.get(n, ())})
        if below:
            left.text(9.85, y + h * 0.62, "imports " + ", ".join(below), fontsize=7, color="#6c757d", ha="right",
                      va="center", wrap=True)
    left.annotate("", xy=(-0.35, -(len(rows) - 1) * (h + gap)), xytext=(-0.35, h),
                  arrowprops=dict(arrowstyle="-|>", color="#2b2d42", lw=1.2))
    left.text(-0.55, -(len(rows) - 1) * (h + gap) / 2, "imports point down only", rotation=90, ha="center",
              va="center", fontsize=8.5)
    left.set_xlim(-0.8, 10.1)
    left.set_ylim(-(len(rows) - 1) * (h + gap) - 0.1, h + 0.5)
    left.set_title("packages, top to bottom (tests/test_architecture.py enforces it)", fontsize=10, loc="left")

    step_h, step_gap = 0.9, 0.42
    for i, (what, where) in enumerate(DATA_PATH):
        y = -i * (step_h + step_gap)
        _box(right, 0, y, 10, step_h, "#fdf0d5")
        right.text(0.2, y + step_h * 0.62, what, fontsize=9, va="center")
        right.text(0.2, y + step_h * 0.25, where, fontsize=8, color="#d1495b", va="center", family="monospace")
        if i:
            right.annotate("", xy=(5, y + step_h), xytext=(5, y + step_h + step_gap),
                           arrowprops=dict(arrowstyle="-|>", color="#d1495b", lw=1.6))
    right.set_xlim(-0.2, 10.2)
    right.set_ylim(-(len(DATA_PATH) - 1) * (step_h + step_gap) - 0.1, step_h + 0.5)
    right.set_title("a run's data path", fontsize=10, loc="left")
    out = ROOT / "docs" / "img" / "architecture.png"
    fig.savefig(out, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
