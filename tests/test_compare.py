"""`agentmesh compare` (the README's first command) on a tiny model, and the eval `prefix` layout
being the layout of a graph's prefix edge."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from typer.testing import CliRunner

import agentmesh

from agentmesh.eval import compare
from agentmesh.eval.cli import app
from agentmesh.models.tiny import save_tiny_model


def test_compare_cli_on_tiny_model(tmp_path: Path, tiny_tokenizer: Any) -> None:
    folder = save_tiny_model(tmp_path / "tiny", "llama", tiny_tokenizer, seed=0)
    questions = tmp_path / "q.jsonl"
    rows = [{"id": "a", "context": "The code word is Larkspur.", "question": "What is the code word?", "answer": "Larkspur"},
            {"id": "b", "context": "The ship is called Kestrel.", "question": "What is the ship called?", "answer": "Kestrel"},
            {"id": "c", "context": "unused", "question": "unused", "answer": "x"}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["compare", "--model", str(folder), "--questions", str(questions),
                                      "--limit", "2", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[1/2] What is the code word?" in out and "[2/2] What is the ship called?" in out and "[3/" not in out
    # One graded, timed row per method per question, then a summary row per method.
    for label in ("receiver alone", "text edge", "cache edge (prefix)"):
        graded = [line for line in out.splitlines() if line.strip().startswith(label) and (" ✓ " in line or " ✗ " in line)]
        assert len(graded) == 2, (label, out)
        assert all(" s  " in line for line in graded)
        # Each row ends with the receiver's own prefill; prefix's receiver reads one token.
        assert all(re.search(r"  \[read \d+ tokens? in \d+\.\d s( \(\d+ tokens/s\))?\]$", line) for line in graded), out
        assert all(("[read 1 token in" in line) == (label == "cache edge (prefix)") for line in graded), out
        summary = [line for line in out.splitlines() if line.startswith(label) and "/2" in line]
        assert len(summary) == 1, (label, out)
    assert "No C2C fuser is shipped" in out
    prefix_summary = [line for line in out.splitlines() if line.startswith("cache edge (prefix)") and "/2" in line]
    assert "receiver read" in out and " 1 token " in prefix_summary[0], out

    bad = CliRunner().invoke(app, ["compare", "--model", str(folder), "--questions", str(tmp_path / "none.jsonl")])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and "none.jsonl" in bad.output


def test_compare_counts_right_answers(tiny_model_factory: Callable[..., Any]) -> None:
    from agentmesh.tasks.datasets import Item
    from agentmesh.eval.methods import MethodOutput

    class Echo:
        """Answers with the item's passage: right exactly when the answer is in it."""

        name = "prefix"

        def run(self, item: Item) -> MethodOutput:
            return MethodOutput(text=item.context or "", latency_s=0.5, ttft_s=0.1, bytes_exchanged=10)

    items = [compare.NOTES[0], compare.Item("x", "q?", None, "absent", context="nothing here", kind="short")]
    rows: list[compare.Row] = []
    summary = compare.compare(items, [Echo()], on_row=rows.append)
    assert [r.result.correct for r in rows] == [True, False]
    assert summary.methods["prefix"].correct == 1 and summary.methods["prefix"].n == 2
    assert "1/2" in compare.format_summary(summary) and "✓" in compare.format_row(rows[0])
    assert "[read" not in compare.format_row(rows[0])  # a method that reports no prefill shows none


def test_compare_rows_show_the_receivers_prefill(tiny_model_factory: Callable[..., Any]) -> None:
    from agentmesh.progress import pace
    from agentmesh.tasks import prompts

    lm = tiny_model_factory("llama", seed=0)
    item = compare.NOTES[0]
    rows: list[compare.Row] = []
    summary = compare.compare([item], compare.build(lm, max_new_tokens=2, background_tokens=4), on_row=rows.append)
    read = {row.result.method: row.result.prompt_tokens for row in rows}
    # The receiver alone reads its question; over the text edge it reads the sharer's text too;
    # over the prefix edge only the last token, on top of the sharer's cache of the rest.
    assert read["receiver"] == len(lm.chat_ids(prompts.receiver_messages(item)))
    assert read["t2t"] > read["receiver"] and read["prefix"] == 1
    for row in rows:
        r = row.result
        assert r.prefill_s is not None and 0 <= r.prefill_s <= r.ttft_s
        assert compare.format_row(row).endswith(f"  [{pace(r.prompt_tokens, r.prefill_s)}]")
    table = compare.format_summary(summary).splitlines()
    assert "receiver read" in table[1]
    assert f"{read['receiver']} tokens" in next(line for line in table if line.startswith("receiver alone"))


def test_eval_prefix_reads_what_a_graph_prefix_edge_reads(tiny_model_factory: Callable[..., Any]) -> None:
    from agentmesh.models.reading import reading_ids
    from agentmesh.eval.adapters import PrefixGenerator, prefix_ids
    from agentmesh.graph import Graph
    from agentmesh.models.pool import ModelPool

    lm = tiny_model_factory("llama", tokenizer="smol", seed=3)
    note, question = "The code word is Larkspur.", "What is the code word?"
    pool = ModelPool()
    pool.put("tiny", lm)
    g = Graph("prefix_layout")
    g.model("tiny", ref="tiny")
    reader = g.agent("reader", model="tiny", context=note)
    answerer = g.agent("answerer", model="tiny", max_new_tokens=5)  # prompt: the run input
    g.cache(reader, answerer, mode="prefix")
    result = agentmesh.run(g, question, pool=pool).raise_for_error()

    turn = [{"role": "user", "content": question}]
    ids = prefix_ids(lm, note, turn)
    assert result["reader"].prompt_tokens == len(reading_ids(lm, context=note))
    assert result["answerer"].prompt_tokens == len(ids) and ids[:len(reading_ids(lm, context=note))] == reading_ids(lm, context=note)
    got = PrefixGenerator(lm).generate_with_cache(turn, sharer_context=note, max_new_tokens=5)
    assert got.text == result["answerer"].text.strip()


def test_negative_result_fuser_says_so(tmp_path: Path) -> None:
    from agentmesh.c2c.checkpoints import load_fuser, save_fuser
    from agentmesh.c2c.fuser_cli import app as fuser_app

    shipped = Path(__file__).resolve().parent.parent / "fusers" / "smollm2_context"
    fuser = load_fuser(shipped)
    assert fuser.config.warning and "negative result" in fuser.config.warning
    result = CliRunner().invoke(fuser_app, ["inspect", str(shipped)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "warning:" in result.output and "negative result" in result.output
    # The warning is provenance: it survives a save, and a fuser without one prints none.
    save_fuser(fuser, tmp_path / "copy")
    assert load_fuser(tmp_path / "copy").config.warning == fuser.config.warning
    fuser.config.provenance.pop("warning")
    save_fuser(fuser, tmp_path / "clean")
    clean = CliRunner().invoke(fuser_app, ["inspect", str(tmp_path / "clean")], env={"COLUMNS": "200"})
    assert clean.exit_code == 0 and "warning:" not in clean.output
