"""Tests of `agentmesh.eval`: extraction, datasets, prompts, metrics, methods, reports, the runner,
the CLI and the context-transfer task. Fake generators stand in for models, except in the last
tests, which run the real adapters on tiny random-weight models."""
from __future__ import annotations

import csv
import json
import math
import struct
import sys
import types
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from agentmesh.errors import ConfigError
from agentmesh.tasks import prompts
from agentmesh.eval.cli import app
from agentmesh.models.tiny import save_tiny_model
from agentmesh.tasks.context_task import SPLITS, generate_split, pools, write_context_task
from agentmesh.tasks.datasets import (
    DatasetConfig, Item, detect_shape, load_hf, load_items, load_jsonl, parse_rows, select)
from agentmesh.eval.extract import contains_answer, extract_letter, extract_number, grade
from agentmesh.eval.methods import (
    CacheGeneration, CacheToCache, MethodOutput, Prefix, ReceiverOnly, SharerOnly, TextToText, run_safely)
from agentmesh.eval.metrics import ItemResult, percentile, summarize, wilson_interval
from agentmesh.eval.report import CSV_COLUMNS, format_table, write_report
from agentmesh.eval.runner import EvalConfig, evaluate, parse_config, run_methods


# ---- fakes ------------------------------------------------------------------------------------------
def words(messages: list[dict[str, str]]) -> int:
    """The fakes' prompt length: one token per word of every message."""
    return sum(len(m["content"].split()) for m in messages)


class FakeGenerator:
    """Answers with `respond(prompt)`, streaming it word by word; reads one token per prompt word;
    records every call."""

    def __init__(self, name: str, respond: Callable[[str], str]):
        self.name = name
        self.respond = respond
        self.calls: list[tuple[list[dict[str, str]], int]] = []

    def generate_text(self, messages, *, max_new_tokens, on_token=None, on_prompt=None):
        self.calls.append((messages, max_new_tokens))
        if on_prompt is not None:
            on_prompt(words(messages))
        text = self.respond(messages[-1]["content"])
        for word in text.split(" "):
            if on_token is not None:
                on_token(word)
        return text


class FakeCacheGenerator:
    """Answers with `respond(prompt, sharer_context)`; reports no prompt tokens (they are optional)."""

    def __init__(self, respond: Callable[[str, str | None], str], nbytes: int = 4096):
        self.name = "fake-cache"
        self.respond = respond
        self.nbytes = nbytes
        self.calls: list[tuple[list[dict[str, str]], str | None]] = []

    def generate_with_cache(self, messages, *, sharer_context, max_new_tokens, on_token=None, on_prompt=None):
        self.calls.append((messages, sharer_context))
        text = self.respond(messages[-1]["content"], sharer_context)
        if on_token is not None:
            on_token(text[:1])
        return CacheGeneration(text, self.nbytes)


def mc_items(n: int = 6) -> list[Item]:
    return [Item(f"q{i}", f"Question number {i}?", ("w", "x", "y", "z"), "ABCD"[i % 4],
                 subject="alpha" if i % 2 else "beta") for i in range(n)]


def oracle(items: list[Item], wrong: set[str] = frozenset()) -> Callable[[str], str]:
    """Answers each item's question correctly (or wrongly for ids in `wrong`)."""
    def respond(prompt: str) -> str:
        for it in items:
            if it.question in prompt:
                letter = it.answer if it.id not in wrong else "ABCD"[("ABCD".index(it.answer) + 1) % 4]
                return f"The correct answer is {letter}"
        return "no idea"
    return respond


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- answer extraction ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The correct answer is B.", "B"),
    ("The correct answer is B", "B"),
    ("**C**", "C"),
    ("answer: (d)", "D"),
    ("Answer: A", "A"),
    ("the answer is c", "C"),
    ("The correct answer is **(B) Paris**", "B"),
    ("The correct answer is: D) 42", "D"),
    ("answer is option C", "C"),
    ("The correct answer is\n\nD", "D"),
    (" B", "B"),
    ("b", "B"),
    ("(c)", "C"),
    ("A. Paris", "A"),
    ("I think B is right", "B"),
    ("The answer is a.", "A"),
    ("I don't know", None),
    ("", None),
    ("A cat sat on the mat", None),          # "A" as an article is not an answer
    ("The answer is a hat", None),
    ("None of these", None),
    ("The correct answer is E", None),       # out of range for 4 choices
    ("The correct answer is A/B/C/D.", None),  # the prompt's format echoed back
    ("B/C/D", None),
    ("B/D", None),
    ("B/Woldholt", "B"),
    ("B. The correct answer is B.", "B"),
])
def test_extract_letter(text: str, expected: str | None) -> None:
    assert extract_letter(text, 4) == expected


def test_extract_letter_respects_number_of_choices() -> None:
    assert extract_letter("The correct answer is E", 5) == "E"
    assert extract_letter("The correct answer is C", 2) is None
    # The "answer is" pattern wins over an earlier lone letter.
    assert extract_letter("B looks tempting, but the answer is D", 4) == "D"


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.", "1234"),
    ("The answer is -5", "-5"),
    ("The answer is $1,200.50", "1200.5"),
    ("answer: 3.0", "3"),
    ("so 3 + 4 = 7", "7"),
    ("First 12, then 1,000,000 apples.", "1000000"),
    ("It drops to \u221212 degrees", "-12"),
    ("The answer is 42. Check: 40 + 2 = 42, and 7 more is 49", "42"),
    ("no numbers here", None),
])
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected


def test_short_answer_containment() -> None:
    assert contains_answer("It is Marrowby.", "Marrowby")
    assert contains_answer("the OLIVE-oil, of course", "olive oil")
    assert contains_answer("The heron", "the heron")
    assert not contains_answer("Marrowbyville", "Marrowby")  # whole words only
    assert not contains_answer("anything", "")


def test_grade_by_kind() -> None:
    mc = Item("m", "Q?", ("a", "b", "c", "d"), "C")
    assert grade(mc, "The correct answer is C").correct
    assert grade(mc, "The correct answer is D") == type(grade(mc, ""))(prediction="D", correct=False)
    num = Item("n", "How many?", None, "1200")
    assert num.kind == "numeric"
    assert grade(num, "... The answer is 1,200.").correct
    assert not grade(num, "The answer is 120").correct
    short = Item("s", "Capital?", None, "Marrowby", context="The capital of X is Marrowby.")
    assert short.kind == "short"
    g = grade(short, "Marrowby\nbecause the passage says so")
    assert g.correct and g.prediction == "Marrowby"
    assert grade(short, "", ).prediction is None


# ---- datasets --------------------------------------------------------------------------------------
def test_jsonl_shapes(tmp_path: Path) -> None:
    mmlu = write_jsonl(tmp_path / "mmlu.jsonl", [
        {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "error_type": "ok", "subject": "math"},
        {"question": "bad", "choices": ["a", "b", "c", "d"], "answer": 0, "error_type": "no_correct_answer"},
        {"question": "hard", "choices": ["a", "b", "c", "d"], "answer": 2, "error_type": "expert"},
        {"question": "typo", "choices": ["a", "b", "c", "d"], "answer": 3, "error_type": "bad_question_clarity"},
    ])
    items = load_jsonl(mmlu)
    assert [(i.question, i.answer, i.subject) for i in items] == [("2+2?", "B", "math"), ("typo", "D", "")]
    assert all(i.kind == "mc" for i in items)

    arc = write_jsonl(tmp_path / "arc.jsonl", [
        {"id": "Mercury_1", "question": "Which?", "choices": {"text": ["p", "q", "r", "s"], "label": ["A", "B", "C", "D"]},
         "answerKey": "C"},
        {"id": "Mercury_2", "question": "Numbered?", "choices": {"text": ["p", "q", "r"], "label": ["1", "2", "3"]},
         "answerKey": "3"},
    ])
    items = load_jsonl(arc)
    assert detect_shape(json.loads(arc.read_text().splitlines()[0])) == "arc"
    assert [(i.id, i.answer, len(i.choices or ())) for i in items] == [("Mercury_1", "C", 4), ("Mercury_2", "C", 3)]

    obqa = write_jsonl(tmp_path / "obqa.jsonl", [
        {"id": "7-980", "question_stem": "The sun is a", "choices": {"text": ["star", "moon", "rock", "gas"],
                                                                       "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    ])
    (it,) = load_jsonl(obqa)
    assert (it.question, it.answer, it.answer_text) == ("The sun is a", "A", "star")

    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 1,000 apples and buys 200 more?", "answer": "1000+200=<<1000+200=1200>>1200\n#### 1,200"},
    ])
    (it,) = load_jsonl(gsm)
    assert (it.kind, it.answer, it.id) == ("numeric", "1200", "gsm8k-0")

    ctx = write_jsonl(tmp_path / "ctx.jsonl", [
        {"id": "c1", "question": "Capital of Veltoria?", "answer": "Marrowby", "context": "The capital of Veltoria is Marrowby.",
         "subject": "capital"},
        {"id": "c2", "question": "Capital of Veltoria?", "answer": "B", "choices": ["Dunholt", "Marrowby", "Ashby", "Kelmere"],
         "context": "The capital of Veltoria is Marrowby.", "subject": "capital"},
    ])
    short, mc = load_jsonl(ctx)
    assert (short.kind, short.answer, short.context) == ("short", "Marrowby", "The capital of Veltoria is Marrowby.")
    assert (mc.kind, mc.answer, mc.answer_text) == ("mc", "B", "Marrowby")


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot tell the dataset shape"):
        parse_rows([{"prompt": "x", "completion": "y"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        load_jsonl(bad)
    with pytest.raises(ConfigError, match="out of range"):
        parse_rows([{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(ConfigError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="answerKey 'E'"):
        parse_rows([{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}])


def test_select_and_load_items(tmp_path: Path) -> None:
    rows = [{"id": f"i{k}", "question": f"q{k}", "choices": ["a", "b"], "answer": k % 2} for k in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_items(DatasetConfig(path=path, limit=5, seed=3))
    b = load_items(DatasetConfig(path=path, limit=5, seed=3))
    c = load_items(DatasetConfig(path=path, limit=5, seed=4))
    assert [i.id for i in a] == [i.id for i in b] and len(a) == 5
    assert [i.id for i in a] != [i.id for i in c]
    assert [i.id for i in load_items(DatasetConfig(path=path, limit=3, shuffle=False))] == ["i0", "i1", "i2"]
    assert select(a, limit=None) == a
    with pytest.raises(ValueError, match="exactly one"):
        DatasetConfig()


def test_load_hf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ConfigError, match="optional package 'datasets'"):
        load_hf("edinburgh-dawg/mmlu-redux-2.0", "anatomy")

    seen: list[tuple[Any, ...]] = []

    def load_dataset(name: str, config: str | None, split: str, **kwargs: Any) -> list[dict[str, Any]]:
        seen.append((name, config, split, kwargs))
        if config == "missing":
            raise FileNotFoundError("Couldn't find a dataset script\nmore lines")
        return [{"question": f"{config} q", "choices": ["a", "b", "c", "d"], "answer": 3, "error_type": "ok"},
                {"question": "x", "choices": ["a", "b", "c", "d"], "answer": 0, "error_type": "expert"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = load_hf("edinburgh-dawg/mmlu-redux-2.0", ["anatomy", "virology"], split="test")
    assert [(i.id, i.subject, i.answer) for i in items] == [("anatomy-0", "anatomy", "D"), ("virology-0", "virology", "D")]
    assert seen[0][3] == {"download_mode": "reuse_cache_if_exists"}
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE.*Couldn't find a dataset script$"):
        load_hf("x/y", "missing")


# ---- prompts ---------------------------------------------------------------------------------------
def test_spec_mc_prompt_text() -> None:
    expected = (
        "Accurately answer the following question:\n\n"
        "What is 2+2?\n\n"
        "Choices:\nA. 3\nB. 4\nC. 5\nD. 6\n\n"
        "Instructions:\n"
        "- Carefully read the question and all options.\n"
        "- Select the single most correct answer.\n"
        "- Respond ONLY in the following format: \"The correct answer is A/B/C/D\".\n"
        "- Do not include any explanations, additional text, or punctuation besides the answer.\n\n"
        "The correct answer is")
    assert prompts.mc_prompt("What is 2+2?", ["3", "4", "5", "6"]) == expected
    assert "The correct answer is A/B/C/D/E" in prompts.mc_prompt("q", list("vwxyz"))


def test_background_and_context_prompts() -> None:
    item = Item("i", "Why is the sky blue?", ("a", "b", "c", "d"), "A")
    assert prompts.background_prompt(item) == (
        "In one clear sentence, describe the most essential background knowledge needed to answer the question:"
        "\n\nWhy is the sky blue?\n\nDo NOT directly solve or give answer to the question.")
    with_bg = prompts.with_background(item, "  Light scatters.  ")
    assert with_bg.startswith("Background knowledge from another assistant:\nLight scatters.\n\n")
    assert with_bg.endswith(prompts.mc_prompt(item.question, item.choices or ()))
    ctx = Item("c", "What is the capital of Veltoria?", None, "Marrowby", context="The capital of Veltoria is Marrowby.")
    assert "Marrowby" not in prompts.receiver_messages(ctx)[0]["content"]
    assert "The capital of Veltoria is Marrowby." in prompts.sharer_messages(ctx)[0]["content"]
    assert "The capital of Veltoria is Marrowby." in prompts.background_prompt(ctx)
    assert "'The answer is N'" in prompts.numeric_prompt("How many?")
    assert prompts.training_messages(ctx)[-1] == {"role": "assistant", "content": "Marrowby"}


# ---- metrics ---------------------------------------------------------------------------------------
def test_wilson_interval_known_values() -> None:
    # By hand, z = 1.96: 8/10 -> p = .8, z^2/n = .38416, centre = (.8 + .19208) / 1.38416 = .71679,
    # half = 1.96 / 1.38416 * sqrt(.016 + .009604) = .22665 -> [.4901, .9434].
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4901, abs=2e-4) and hi == pytest.approx(0.9434, abs=2e-4)
    # 0/10: centre = .19208 / 1.38416 = .13877 = half -> [0, .2775].
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(0.2775, abs=2e-4)
    # 50/100: centre .5, half = 1.96 / 1.038416 * sqrt(.0025 + .000096) = .09617 -> [.4038, .5962].
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=2e-4) and hi == pytest.approx(0.5962, abs=2e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_percentile() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(1, 101))), 95) == pytest.approx(95.05)
    assert percentile([], 50) is None


def test_failed_item_counted_wrong_and_listed() -> None:
    items = mc_items(4)

    def respond(prompt: str) -> str:
        if items[2].question in prompt:
            raise RuntimeError("model exploded\nwith a traceback")
        return oracle(items)(prompt)

    results = run_methods(items, [ReceiverOnly(FakeGenerator("r", respond))], progress=False)
    s = summarize(results).methods["receiver"]
    assert (s.n, s.correct, s.failed) == (4, 3, ["q2"])
    assert s.accuracy == pytest.approx(0.75)
    bad = [r for r in results if r.item_id == "q2"][0]
    assert bad.error == "RuntimeError: model exploded" and not bad.correct and bad.prediction is None
    # The failed item's timing does not enter the latency statistics, but it stays in n.
    assert s.latency_mean_s is not None and s.ttft_mean_s is not None


def test_run_safely_never_raises() -> None:
    class Boom:
        name = "boom"

        def run(self, item: Item) -> MethodOutput:
            raise ValueError("")

    out = run_safely(Boom(), mc_items(1)[0])
    assert out.error == "ValueError" and out.text == "" and out.latency_s >= 0


# ---- methods --------------------------------------------------------------------------------------
def test_methods_prompts_bytes_and_timing() -> None:
    ctx = Item("c", "What is the capital of Veltoria?", None, "Marrowby", subject="capital",
               context="The capital of Veltoria is Marrowby. The capital of Quessor is Dunby.")
    receiver = FakeGenerator("r", lambda p: "Marrowby" if "Marrowby" in p else "Paris")
    sharer = FakeGenerator("s", lambda p: "The capital of Veltoria is Marrowby.")

    out = ReceiverOnly(receiver, max_new_tokens=7).run(ctx)
    assert out.text == "Paris" and out.bytes_exchanged == 0 and receiver.calls[-1][1] == 7
    assert 0 <= out.ttft_s <= out.latency_s
    # The receiver's prefill: the prompt tokens it reported, timed from then to its first token.
    assert out.prompt_tokens == words(receiver.calls[-1][0]) > 0 and 0 <= out.prefill_s <= out.ttft_s

    assert SharerOnly(sharer).run(ctx).text.endswith("Marrowby.")
    assert "Passage:" in sharer.calls[-1][0][0]["content"]

    t2t = TextToText(sharer, receiver, max_new_tokens=9, background_tokens=33).run(ctx)
    assert t2t.text == "Marrowby"
    assert t2t.bytes_exchanged == len("The capital of Veltoria is Marrowby.".encode())
    assert sharer.calls[-1][1] == 33 and receiver.calls[-1][1] == 9
    assert receiver.calls[-1][0][0]["content"].startswith("Background knowledge from another assistant:")
    # Its prefill is the receiver's read of the background, not the sharer's read of the passage.
    assert t2t.prompt_tokens == words(receiver.calls[-1][0]) != words(sharer.calls[-1][0])
    assert 0 <= t2t.prefill_s <= t2t.ttft_s

    cache = FakeCacheGenerator(lambda p, c: "Marrowby" if (c and "Marrowby" in c) or "Marrowby" in p else "?")
    c2c = CacheToCache(cache).run(ctx)
    msgs, context = cache.calls[-1]
    assert (c2c.text, c2c.bytes_exchanged) == ("Marrowby", 4096)
    assert (c2c.prompt_tokens, c2c.prefill_s) == (None, None)  # a generator need not report its prompt
    assert "Marrowby" not in msgs[0]["content"] and context == ctx.context
    prefix = Prefix(cache).run(ctx)
    msgs, context = cache.calls[-1]
    # prefix: the passage is the sharer's reading (as in a graph's prefix edge); the question is the receiver's turn.
    assert prefix.text == "Marrowby" and context == ctx.context and "Marrowby" not in msgs[0]["content"]


# ---- report and runner -----------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_evaluate_writes_report(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "question": f"Question number {i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4,
             "subject": "alpha" if i % 2 else "beta"} for i in range(6)]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    items = load_jsonl(data)
    config = EvalConfig(dataset=DatasetConfig(path=data), output=tmp_path / "out", methods=["receiver"])
    methods = [ReceiverOnly(FakeGenerator("r", oracle(items, wrong={"q1"}))),
               SharerOnly(FakeGenerator("s", oracle(items)), name="sharer"),
               TextToText(FakeGenerator("s", lambda p: "Some background."), FakeGenerator("r", oracle(items, {"q0", "q3"})))]
    summary = evaluate(config, methods=methods, progress=False)

    out = tmp_path / "out"
    js = json.loads((out / "summary.json").read_text())
    assert list(js["methods"]) == ["receiver", "sharer", "t2t"]
    rec = js["methods"]["receiver"]
    for key in ("n", "correct", "accuracy", "ci95", "latency_mean_s", "latency_p50_s", "latency_p95_s", "ttft_mean_s",
                "prompt_tokens_mean", "prefill_mean_s", "bytes_mean", "failed", "per_subject"):
        assert key in rec
    read = [words(prompts.receiver_messages(it)) for it in items]
    assert rec["prompt_tokens_mean"] == pytest.approx(sum(read) / len(read)) and rec["prefill_mean_s"] >= 0
    assert (rec["n"], rec["correct"]) == (6, 5)
    assert js["methods"]["sharer"]["accuracy"] == 1.0 and js["methods"]["t2t"]["correct"] == 4
    assert js["methods"]["t2t"]["bytes_mean"] == len(b"Some background.")
    assert rec["ci95"] == pytest.approx(list(wilson_interval(5, 6)))
    assert js["meta"]["items"] == 6

    with (out / "items.csv").open() as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert tuple(header) == CSV_COLUMNS and len(body) == 6 * 3
    q1 = [r for r in body if r[0] == "q1" and r[2] == "receiver"][0]
    assert (q1[3], q1[4], q1[5]) == ("B", "C", "0")
    assert q1[CSV_COLUMNS.index("prompt_tokens")] == str(read[1]) and float(q1[CSV_COLUMNS.index("prefill")]) >= 0
    for name in ("accuracy_latency.png", "subject_accuracy.png"):
        w, h = _png_size(out / name)
        assert w > 100 and h > 100

    table = format_table(summary)
    assert table.splitlines()[0].startswith("| method") and len(table.splitlines()) == 2 + 3
    assert "0.833" in table


def test_write_report_with_failures_and_no_latency(tmp_path: Path) -> None:
    results = [ItemResult("a", "s", "m", "A", None, False, None, None, 0, error="Boom: x"),
               ItemResult("b", "", "m", "B", "B", True, 0.5, 0.1, 10)]
    summary = summarize(results)
    paths = write_report(summary, tmp_path / "r")
    assert json.loads(paths["summary"].read_text())["methods"]["m"]["failed"] == ["a"]
    assert _png_size(paths["accuracy_latency"])[0] > 0
    assert math.isclose(summary.methods["m"].bytes_mean, 10.0)


def test_eval_config_validation() -> None:
    ds = {"path": "x.jsonl"}
    with pytest.raises(ConfigError, match="unknown key 'bogus'; allowed keys: receiver, sharer"):
        parse_config({"dataset": ds, "bogus": 1})
    with pytest.raises(ConfigError, match="unknown key 'dataset.size'; allowed keys: path, hf"):
        parse_config({"dataset": {"path": "x", "size": 3}})
    with pytest.raises(ConfigError, match="need a 'sharer'"):
        parse_config({"dataset": ds, "methods": ["receiver", "t2t"]})
    with pytest.raises(ConfigError, match="needs a 'fuser'"):
        parse_config({"dataset": ds, "sharer": "m", "methods": ["c2c"]})
    with pytest.raises(ConfigError, match="dataset"):
        parse_config({"dataset": {"path": "x", "hf": "y"}})
    cfg = parse_config({"dataset": ds, "sharer": "m", "fuser": "f", "methods": ["receiver", "sharer", "t2t", "c2c", "prefix"]})
    assert cfg.max_new_tokens == 64 and cfg.t2t_background_tokens == 256


def test_cli(tmp_path: Path, tiny_tokenizer: Any) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {path: x.jsonl}\nmethods: [telepathy]\n")
    result = runner.invoke(app, ["eval", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "methods" in lines[0]
    result = runner.invoke(app, ["eval", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output

    result = runner.invoke(app, ["make-context-task", str(tmp_path / "ctx"), "--n-train", "4", "--n-test", "3", "--mc"])
    assert result.exit_code == 0, result.output
    items = load_jsonl(tmp_path / "ctx" / "test.jsonl")
    assert len(items) == 3 and all(i.kind == "mc" and i.context for i in items)

    result = runner.invoke(app, ["make-knowledge-task", str(tmp_path / "kt"), "--facts-a", "3", "--facts-b", "2", "--capitals", "3"])
    assert result.exit_code == 0, result.output
    assert len(load_jsonl(tmp_path / "kt" / "test.jsonl")) == 2 * 3  # facts B, three held-out phrasings
    result = runner.invoke(app, ["make-visit-task", str(tmp_path / "vt"), "--n-train", "8", "--n-test", "4"])
    assert result.exit_code == 0 and len((tmp_path / "vt" / "test.jsonl").read_text().splitlines()) == 4
    tiny = save_tiny_model(tmp_path / "tiny", "llama", tiny_tokenizer)
    result = runner.invoke(app, ["make-memory-task", str(tmp_path / "mt"), "--n", "8", "--model", str(tiny)])
    assert result.exit_code == 0 and len((tmp_path / "mt" / "train.jsonl").read_text().splitlines()) == 8
    for command in ("make-knowledge-task", "make-context-task", "make-visit-task", "make-memory-task"):
        result = runner.invoke(app, [command, str(tmp_path / "kt" / "test.jsonl")])  # a file, not a folder
        assert result.exit_code == 2 and "is a file; give a folder" in result.output, result.output
        assert "Traceback" not in result.output


# ---- context-transfer task -------------------------------------------------------------------------
def test_context_task_deterministic_and_disjoint(tmp_path: Path) -> None:
    a = generate_split("train", 50, seed=1)
    assert a == generate_split("train", 50, seed=1)
    assert a != generate_split("train", 50, seed=2)
    train, test = generate_split("train", 300, seed=0), generate_split("test", 100, seed=0)

    def facts(records: list[dict[str, Any]]) -> tuple[set[tuple[str, ...]], set[str], set[str]]:
        fs = {tuple(f) for r in records for f in r["facts"]}
        return fs, {f[0] for f in fs}, {f[2] for f in fs}

    (tr_facts, tr_ent, tr_val), (te_facts, te_ent, te_val) = facts(train), facts(test)
    assert not tr_facts & te_facts and not tr_ent & te_ent and not tr_val & te_val
    # The pools themselves are disjoint, whatever the seed.
    p_train, p_test = pools("train"), pools("test")
    for key in p_train:
        assert not set(p_train[key]) & set(p_test[key]), key

    for r in train[:100]:
        entity, _, value = r["target"]
        assert value in r["context"] and entity in r["question"] and value not in r["question"]
        assert 3 <= len(r["facts"]) <= 6
        assert 12 <= len(r["context"].split()) <= 80  # short: 20-90 SmolLM2 tokens
        # one value per (entity, attribute): the question is unambiguous
        keys = [(f[0], f[1]) for f in r["facts"]]
        assert len(keys) == len(set(keys))

    mc = generate_split("test", 30, seed=0, multiple_choice=True)
    for r in mc:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["choices"]["ABCD".index(r["answer"])] == r["answer_text"] == r["target"][2]
    paths = write_context_task(tmp_path, seed=0, n_train=5, n_test=4)
    assert sorted(p.name for p in paths.values()) == ["test.jsonl", "train.jsonl"]
    loaded = load_jsonl(paths["train"])
    assert [i.id for i in loaded] == [f"ctx-train-{k:05d}" for k in range(5)]
    assert all(i.kind == "short" and i.context for i in loaded)
    assert set(SPLITS) == {"train", "test"}


# ---- real adapters on tiny models --------------------------------------------------------------------
def test_adapters_on_tiny_models(tiny_model_factory: Callable[..., Any]) -> None:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.c2c.model import C2CModel
    from agentmesh.eval.adapters import C2CGenerator, ModelGenerator, PrefixGenerator, kv_nbytes

    receiver = tiny_model_factory("llama", seed=0)
    sharer = tiny_model_factory("llama", seed=1)
    messages = prompts.receiver_messages(Item("i", "What is the capital of Veltoria?", None, "Marrowby",
                                              context="The capital of Veltoria is Marrowby."))
    n_prompt = len(receiver.chat_ids(messages))
    pieces: list[str] = []
    read: list[int] = []
    alone = ModelGenerator(receiver).generate_text(messages, max_new_tokens=6, on_token=pieces.append,
                                                   on_prompt=read.append)
    assert len(pieces) >= 1 and alone.startswith("".join(pieces).strip()[:1])
    assert read == [n_prompt]  # reported once, before the prompt is read

    # prefix, same model, no passage: the receiver computes exactly what it would alone.
    prefix = PrefixGenerator(receiver).generate_with_cache(messages, sharer_context=None, max_new_tokens=6)
    assert prefix.text == alone
    assert prefix.bytes_exchanged == kv_nbytes(receiver.signature, n_prompt - 1, receiver.dtype)
    with_passage = PrefixGenerator(receiver).generate_with_cache(
        messages, sharer_context="The capital of Veltoria is Marrowby.", max_new_tokens=6, on_prompt=read.append)
    assert read[-1] == 1  # prefix: the receiver reads only the last token; the sharer read the rest
    assert with_passage.bytes_exchanged > prefix.bytes_exchanged  # the cache grows by the passage
    with pytest.raises(ConfigError, match="same model"):
        PrefixGenerator(sharer, receiver)  # same architecture, other weights

    # A fresh fuser has closed gates (logits 0): C2C answers like the receiver alone; the sharer's
    # span cache is what crosses, whether or not the sharer holds a passage.
    fuser = Fuser.build(receiver.signature, sharer.signature, hidden_dim=16, intermediate_dim=16)
    c2c = C2CGenerator(C2CModel(receiver, [sharer], [fuser]))
    for context in (None, "The capital of Veltoria is Marrowby."):
        got = c2c.generate_with_cache(messages, sharer_context=context, max_new_tokens=6, on_prompt=read.append)
        assert got.text == alone
        assert read[-1] == n_prompt  # c2c: the receiver reads its whole prompt; the passage stays with the sharer
        assert got.bytes_exchanged == kv_nbytes(sharer.signature, n_prompt - 1, sharer.dtype)


def test_evaluate_builds_real_methods(tmp_path: Path, tiny_model_factory: Callable[..., Any],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.eval import runner
    from agentmesh.models.pool import ModelPool

    model = tiny_model_factory("llama", seed=0)
    pool = ModelPool()
    pool.put("tiny", model)
    monkeypatch.setattr(runner, "load_fuser", lambda ref, receiver, sharer: Fuser.build(
        receiver.signature, sharer.signature, hidden_dim=16, intermediate_dim=16))
    paths = write_context_task(tmp_path / "ctx", seed=0, n_train=0, n_test=3)
    config = parse_config({
        "receiver": "tiny", "sharer": "tiny", "fuser": "unused", "methods": ["receiver", "sharer", "t2t", "c2c", "prefix"],
        "dataset": {"path": str(paths["test"])}, "max_new_tokens": 3, "t2t_background_tokens": 3,
        "output": str(tmp_path / "out"), "wire_dtype": "bfloat16"})
    summary = evaluate(config, pool=pool, progress=False)
    assert list(summary.methods) == ["receiver", "sharer", "t2t", "c2c", "prefix"]
    assert len(summary.results) == 15 and all(r.error is None for r in summary.results)
    by_method = {m: [r for r in summary.results if r.method == m] for m in summary.methods}
    # A closed-gate fuser leaves the receiver's answers unchanged.
    assert [r.output for r in by_method["c2c"]] == [r.output for r in by_method["receiver"]]
    per_token = 2 * model.signature.num_layers * model.signature.num_kv_heads * model.signature.head_dim * 2  # bf16
    assert all(r.bytes_exchanged > 0 and r.bytes_exchanged % per_token == 0 for r in by_method["c2c"] + by_method["prefix"])
    assert all(p.bytes_exchanged > c.bytes_exchanged for p, c in zip(by_method["prefix"], by_method["c2c"]))
    assert all(r.ttft_s is not None and r.ttft_s <= r.latency_s for r in summary.results)
    # Every real method reports the receiver's prefill; prefix's receiver reads one token.
    assert all(r.prompt_tokens and r.prefill_s is not None and r.prefill_s <= r.ttft_s for r in summary.results)
    assert {r.prompt_tokens for r in by_method["prefix"]} == {1}
    assert [r.prompt_tokens for r in by_method["c2c"]] == [r.prompt_tokens for r in by_method["receiver"]]
    assert all(t.prompt_tokens > r.prompt_tokens for t, r in zip(by_method["t2t"], by_method["receiver"]))
    assert (tmp_path / "out" / "summary.json").is_file() and (tmp_path / "out" / "subject_accuracy.png").is_file()
