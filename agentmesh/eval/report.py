"""Evaluation reports: `summary.json`, `items.csv`, two PNG plots, and a markdown table.

Plots are drawn on matplotlib's Agg canvas directly (no pyplot), so no global backend state is
touched and nothing needs a display.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import orjson

from agentmesh.eval.metrics import Summary
from agentmesh.units import human_bytes

CSV_COLUMNS = ("id", "subject", "method", "answer", "prediction", "correct", "latency", "ttft", "prompt_tokens",
               "prefill", "bytes", "error", "output")
SUMMARY_FILE, ITEMS_FILE = "summary.json", "items.csv"
ACCURACY_LATENCY_PNG, SUBJECT_PNG = "accuracy_latency.png", "subject_accuracy.png"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def write_summary(summary: Summary, out_dir: Path) -> Path:
    path = out_dir / SUMMARY_FILE
    path.write_bytes(orjson.dumps(summary.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return path


def write_items(summary: Summary, out_dir: Path) -> Path:
    path = out_dir / ITEMS_FILE
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in summary.results:
            w.writerow([r.item_id, r.subject, r.method, r.answer, r.prediction or "", int(r.correct),
                        _fmt(r.latency_s), _fmt(r.ttft_s), "" if r.prompt_tokens is None else r.prompt_tokens,
                        _fmt(r.prefill_s), r.bytes_exchanged, r.error or "", r.output])
    return path


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy_latency(summary: Summary, path: Path) -> Path:
    """Accuracy against mean latency, one point per method, with 95 % interval error bars."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for name, s in summary.methods.items():
        x = s.latency_mean_s if s.latency_mean_s is not None else 0.0
        lo, hi = s.ci95
        ax.errorbar([x], [s.accuracy], yerr=[[max(0.0, s.accuracy - lo)], [max(0.0, hi - s.accuracy)]],
                    fmt="o", capsize=4, label=f"{name} (n={s.n})")
        ax.annotate(name, (x, s.accuracy), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("mean latency per question (s)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    slowest = max((s.latency_mean_s or 0.0 for s in summary.methods.values()), default=0.0)
    ax.set_xlim(0, slowest * 1.2 if slowest > 0 else 1.0)  # room for the labels right of the points
    ax.grid(alpha=0.3)
    ax.set_title("accuracy vs latency (95 % Wilson intervals)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_subjects(summary: Summary, path: Path) -> Path:
    """Per-subject accuracy, bars grouped by subject with one bar per method."""
    subjects = sorted({s for m in summary.methods.values() for s in m.per_subject})
    methods = list(summary.methods)
    # Wide enough for every bar, capped so that 57 MMLU subjects still make a sane image.
    fig = _figure(min(30.0, max(6.0, 0.25 * len(subjects) * max(1, len(methods)) + 2)), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(methods))
    for j, name in enumerate(methods):
        acc = [summary.methods[name].per_subject.get(s, 0.0) for s in subjects]
        ax.bar([i + (j - (len(methods) - 1) / 2) * width for i in range(len(subjects))], acc, width, label=name)
    ax.set_xticks(list(range(len(subjects))))
    ax.set_xticklabels(subjects, rotation=45 if len(subjects) > 4 else 0, ha="right" if len(subjects) > 4 else "center",
                       fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("accuracy per subject")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_report(summary: Summary, out_dir: str | Path) -> dict[str, Path]:
    """Write every report file into `out_dir` (created); returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "summary": write_summary(summary, out),
        "items": write_items(summary, out),
        "accuracy_latency": plot_accuracy_latency(summary, out / ACCURACY_LATENCY_PNG),
        "subjects": plot_subjects(summary, out / SUBJECT_PNG),
    }



def format_table(summary: Summary) -> str:
    """A markdown table of the per-method summary (for the CLI and the README)."""
    head = ("method", "n", "accuracy", "95% CI", "latency mean (s)", "p50 (s)", "p95 (s)", "TTFT (s)",
            "prompt tokens", "prefill (s)", "bytes exchanged", "failed")
    rows = []
    for name, s in summary.methods.items():
        rows.append((name, str(s.n), f"{s.accuracy:.3f}", f"[{s.ci95[0]:.3f}, {s.ci95[1]:.3f}]",
                     _fmt(s.latency_mean_s, 3) or "-", _fmt(s.latency_p50_s, 3) or "-",
                     _fmt(s.latency_p95_s, 3) or "-", _fmt(s.ttft_mean_s, 3) or "-",
                     _fmt(s.prompt_tokens_mean, 1) or "-", _fmt(s.prefill_mean_s, 3) or "-",
                     human_bytes(s.bytes_mean), str(len(s.failed))))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])
