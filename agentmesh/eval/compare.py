"""`agentmesh compare`: the same questions answered by the receiver alone, over a text edge and over
a cache edge, side by side, each answer graded against the known one and timed.

Each question comes with a short private note that only the sharer reads. The receiver alone has
never seen it, so it can only guess (the floor); over a text edge the sharer writes what matters
as text and the receiver reads it; over a cache edge the receiver gets the sharer's KV cache
instead of text: `prefix` (same model, the receiver continues from the sharer's cache of the note)
or, given a trained fuser, `c2c` (the fuser rewrites the receiver's cache of its own prompt).
Every method answers every question with the very prompts, methods and grading `agentmesh eval`
uses, so what is printed here is what the evaluation measures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from agentmesh.progress import pace
from agentmesh.tasks.datasets import Item
from agentmesh.eval.methods import Method
from agentmesh.eval.metrics import ItemResult, Summary, summarize

if TYPE_CHECKING:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.models.loaded_model import LoadedModel


def _note(i: int, note: str, question: str, answer: str) -> Item:
    return Item(id=f"note{i}", question=question, choices=None, answer=answer, subject="private note",
                context=note, kind="short")


# Invented facts (no model can know them); the answers are short spans graded by containment.
NOTES: tuple[Item, ...] = (
    _note(1, "The team offsite is on Thursday in the Larkspur room on the third floor.",
          "Which room is the team offsite in?", "Larkspur"),
    _note(2, "Order 4471 was shipped with the courier Velox Freight and should arrive on Friday.",
          "Which courier shipped order 4471?", "Velox Freight"),
    _note(3, "The new office manager is called Marta Quintero. She starts next Monday.",
          "What is the name of the new office manager?", "Marta Quintero"),
    _note(4, "Dr. Okafor moved the dentist appointment to Wednesday at 14:30.",
          "On which day is the dentist appointment?", "Wednesday"),
    _note(5, "The prototype drone is named Kestrel and it weighs 900 grams.",
          "What is the prototype drone named?", "Kestrel"),
)

LABELS = {"receiver": "receiver alone", "t2t": "text edge", "prefix": "cache edge (prefix)",
          "c2c": "cache edge (c2c fuser)"}


@dataclass(frozen=True)
class Row:
    """One method's graded answer to one question."""

    item: Item
    result: ItemResult


def compare(items: Sequence[Item], methods: Sequence[Method], *,
            on_row: Callable[[Row], None] | None = None) -> Summary:
    """Every method on every item (item-major, so machine drift hits all alike), graded."""
    from agentmesh.eval.runner import run_item

    results: list[ItemResult] = []
    for item in items:
        for method in methods:
            r = run_item(method, item)
            results.append(r)
            if on_row is not None:
                on_row(Row(item, r))
    return summarize(results, meta={"items": len(items), "methods": [m.name for m in methods]})


def build(receiver: LoadedModel, *, fuser: Fuser | None = None, sharer: LoadedModel | None = None,
          max_new_tokens: int = 24, background_tokens: int = 48) -> list[Method]:
    """receiver alone, text edge, and a cache edge: `c2c` through `fuser` if given, else `prefix`."""
    from agentmesh.eval.adapters import C2CGenerator, ModelGenerator, PrefixGenerator
    from agentmesh.eval.methods import CacheToCache, Prefix, ReceiverOnly, TextToText

    sharer = receiver if sharer is None else sharer
    rgen, sgen = ModelGenerator(receiver), ModelGenerator(sharer)
    methods: list[Method] = [ReceiverOnly(rgen, max_new_tokens), TextToText(sgen, rgen, max_new_tokens, background_tokens)]
    if fuser is not None:
        from agentmesh.c2c.model import C2CModel

        methods.append(CacheToCache(C2CGenerator(C2CModel(receiver, [sharer], [fuser])), max_new_tokens))
    else:
        methods.append(Prefix(PrefixGenerator(sharer, receiver), max_new_tokens))
    return methods


def format_row(row: Row, width: int = 22) -> str:
    """`  label  ✓/✗  time  answer`, then, when the method reported it, the receiver's own prefill
    (`[read 41 tokens in 0.4 s (102 tokens/s)]`, the pace `agentmesh generate` shows); a long answer
    is cut to keep the row about 140 characters wide."""
    r = row.result
    mark = "✓" if r.correct else "✗"
    text = " ".join((r.output or r.error or "").split())
    read = ""
    if r.prompt_tokens is not None and r.prefill_s is not None:
        read = f"  [{pace(r.prompt_tokens, r.prefill_s)}]"
    limit = 60 if read else 90
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    latency = f"{r.latency_s:5.1f} s" if r.latency_s is not None else "    - "
    return f"  {LABELS.get(r.method, r.method):<{width}} {mark} {latency}  {text}{read}"


def format_question(item: Item, index: int, total: int) -> str:
    return (f"\n[{index}/{total}] {item.question}   (right answer: {item.answer})\n"
            f"  private note, read only by the sharer: {item.context}")


def format_summary(summary: Summary) -> str:
    from agentmesh.units import human_bytes

    lines = ["", f"{'method':<24}{'right':>8}{'mean time':>11}{'first token':>13}{'receiver read':>15}"
                 f"{'bytes to receiver':>19}"]
    for name, s in summary.methods.items():
        ttft = f"{s.ttft_mean_s:.1f} s" if s.ttft_mean_s is not None else "-"
        latency = f"{s.latency_mean_s:.1f} s" if s.latency_mean_s is not None else "-"
        # The mean prompt tokens the receiver read itself: what an edge spares or costs it.
        tokens = "-" if s.prompt_tokens_mean is None else f"{s.prompt_tokens_mean:.0f}"
        read = tokens if tokens == "-" else f"{tokens} token{'' if tokens == '1' else 's'}"
        lines.append(f"{LABELS.get(name, name):<24}{f'{s.correct}/{s.n}':>8}{latency:>11}{ttft:>13}{read:>15}"
                     f"{human_bytes(s.bytes_mean):>19}")
    return "\n".join(lines)


def closing_note(summary: Summary, *, fused: bool) -> str:
    """What the rows mean, in a few lines (no claim beyond what was just measured)."""
    lines = ["",
             "receiver alone: never sees the note, so it can only guess (the floor).",
             "text edge: the sharer reads the note and writes what matters as text; the receiver reads that text."]
    if fused:
        lines.append("cache edge (c2c): the sharer reads the note and the question; a fuser rewrites the receiver's "
                     "cache of the question with the sharer's (no text passes; the receiver's cache does not grow).")
    else:
        lines += ["cache edge (prefix): the receiver continues from the sharer's KV cache of the note (same model; "
                  "no text passes and the note is not read again).",
                  "No C2C fuser is shipped: the one trained that beats the receiver alone on held-out questions "
                  "makes everyday questions wrong (README, 'Training and evaluation'). Add one with --fuser DIR."]
    return "\n".join(lines)
