"""Benchmark 1: end-to-end latency per question of cache-to-cache against text-to-text.

Same receiver, same sharer (the embedded model on both ends), the held-out questions of the
context task: the sharer holds a passage, the receiver gets the question.

* `t2t`:      the sharer writes `background_tokens` tokens of background (its EOS ignored, like
              every other generation here), then the receiver prefills background + question and
              answers.
* `t2t_eos`:  the same, but the background stops at the sharer's EOS, as it would in a real run
              (the embedded model writes one short sentence, 10-20 tokens).
* `c2c`:      the sharer prefills passage + question, the receiver prefills the question, the
              fuser rewrites the receiver's cache, the receiver answers.
* `prefix`:   the sharer prefills passage + question, the receiver continues from that cache.
* `receiver`: the receiver answers alone (no sharer): the floor every method pays (full runs).

Every method writes exactly `answer_tokens` answer tokens (EOS is ignored, `eos_token_id=[]`), so
answers of different lengths never decide the ratio; a randomly initialised fuser (used until a
trained one exists) would otherwise answer at random lengths. Methods are interleaved per
question, after a warm-up question that is not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from agentmesh.bench.common import (
    BenchResult, ModelBench, Runs, Target, bench_models, interleave, median, pct, sync, timed)
from agentmesh.errors import ConfigError

if TYPE_CHECKING:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.models.loaded_model import LoadedModel
    from agentmesh.models.pool import ModelPool

NAME = "c2c_vs_t2t"
ALL_METHODS = ("t2t", "t2t_eos", "c2c", "prefix", "receiver")
TARGET_RATIO = 2.5


@dataclass(frozen=True)
class Config(ModelBench):
    questions: int = 30
    answer_tokens: int = 16
    background_tokens: int = 64
    repeats: int = 1                     # rounds per question (each question is a fresh sample)
    breakdown_questions: int = 5         # questions whose stages are also timed one by one
    sweep: tuple[int, ...] = (8, 32, 64)  # other answer lengths (t2t, c2c and prefix only)
    sweep_questions: int = 5
    methods: tuple[str, ...] = ("t2t", "t2t_eos", "c2c", "prefix", "receiver")  # c2c and t2t always run

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(**{"questions": 5, "breakdown_questions": 0, "sweep": (),
                      "methods": ("t2t", "t2t_eos", "c2c", "prefix"), **overrides})


@dataclass
class _Setup:
    receiver: LoadedModel
    sharer: LoadedModel
    fuser: Fuser
    fuser_source: str


def load_items(n: int, seed: int = 0) -> list[Any]:
    """`n` held-out questions of the context task (each with its private passage)."""
    from agentmesh.tasks.context_task import generate_split
    from agentmesh.tasks.datasets import parse_rows

    records = generate_split("test", n, seed=seed)
    return list(parse_rows(records, shape="auto", source="context-task"))


class Methods:
    """The four methods over one receiver/sharer pair; each call answers one question."""

    def __init__(self, setup: _Setup, cfg: Config):
        from agentmesh.c2c.model import C2CModel

        self.s, self.cfg = setup, cfg
        self.sharer_alone = C2CModel(setup.sharer)
        self.receiver_alone = C2CModel(setup.receiver)
        self.c2c = C2CModel(setup.receiver, [setup.sharer], [setup.fuser])
        self.last: dict[str, dict[str, int]] = {}

    def _ids(self, lm: LoadedModel, messages: list[dict[str, str]]) -> torch.Tensor:
        return torch.tensor([lm.chat_ids(messages)], dtype=torch.long)  # (1, N)

    def t2t(self, item: Any, answer_tokens: int, *, stop_at_eos: bool = False,
            background_tokens: int | None = None) -> torch.Tensor:
        from agentmesh.tasks import prompts

        sharer, receiver = self.s.sharer, self.s.receiver
        bg_ids = self._ids(sharer, prompts.background_messages(item))
        bg_max = self.cfg.background_tokens if background_tokens is None else background_tokens
        bg = self.sharer_alone.generate(bg_ids, max_new_tokens=bg_max, do_sample=False,
                                        eos_token_id=None if stop_at_eos else [])
        background = sharer.decode(bg[0]).strip()
        ids = self._ids(receiver, prompts.receiver_background_messages(item, background))
        out = self.receiver_alone.generate(ids, max_new_tokens=answer_tokens, do_sample=False, eos_token_id=[])
        self.last["t2t_eos" if stop_at_eos else "t2t"] = {
            "sharer_prompt": bg_ids.shape[1], "background": _length(bg[0], sharer) if stop_at_eos else bg.shape[1],
            "receiver_prompt": ids.shape[1], "answer": out.shape[1]}
        return out

    def t2t_eos(self, item: Any, answer_tokens: int) -> torch.Tensor:
        return self.t2t(item, answer_tokens, stop_at_eos=True)

    def c2c_inputs(self, item: Any) -> tuple[torch.Tensor, list[Any]]:
        from agentmesh.c2c.model import SharerInput
        from agentmesh.models.reading import reading_ids
        from agentmesh.tasks import prompts

        prompt = self.s.receiver.chat_ids(prompts.receiver_messages(item))
        row = torch.tensor([reading_ids(self.s.sharer, context=item.context) + prompt[:-1]], dtype=torch.long)
        return torch.tensor([prompt], dtype=torch.long), [SharerInput(row, torch.ones_like(row))]

    def run_c2c(self, item: Any, answer_tokens: int) -> torch.Tensor:
        ids, sharer_inputs = self.c2c_inputs(item)
        out = self.c2c.generate(ids, max_new_tokens=answer_tokens, do_sample=False, eos_token_id=[],
                                sharer_inputs=sharer_inputs)
        self.last["c2c"] = {"sharer_prompt": sharer_inputs[0].input_ids.shape[1], "receiver_prompt": ids.shape[1],
                            "answer": out.shape[1]}
        return out

    def prefix(self, item: Any, answer_tokens: int) -> torch.Tensor:
        from agentmesh.tasks import prompts
        from agentmesh.models.inference import decode, prefill

        ids = self._ids(self.s.receiver, prompts.sharer_messages(item))  # passage + question
        cache = prefill(self.s.sharer, ids[:, :-1])
        gen = self.receiver_alone.generation_config(max_new_tokens=answer_tokens, eos_token_id=[])
        out = decode(self.s.receiver, cache, ids[:, -1:], None, gen, pad_token_id=self.receiver_alone.receiver.pad_token_id,
                     prompt_ids=ids).tokens
        self.last["prefix"] = {"sharer_prompt": ids.shape[1] - 1, "receiver_prompt": 1, "answer": out.shape[1]}
        return out

    def receiver(self, item: Any, answer_tokens: int) -> torch.Tensor:
        from agentmesh.tasks import prompts

        ids = self._ids(self.s.receiver, prompts.receiver_messages(item))
        out = self.receiver_alone.generate(ids, max_new_tokens=answer_tokens, do_sample=False, eos_token_id=[])
        self.last["receiver"] = {"receiver_prompt": ids.shape[1], "answer": out.shape[1]}
        return out

    def warm_up(self, item: Any, names: tuple[str, ...]) -> None:
        """Every method once, with few tokens (first calls pay for allocations and lazy setup)."""
        for name in names:
            if name.startswith("t2t"):
                self.t2t(item, 2, background_tokens=2, stop_at_eos=name == "t2t_eos")
            else:
                self.table(2, (name,))[name](item)
        self.last.clear()

    def table(self, answer_tokens: int, names: tuple[str, ...]) -> dict[str, Callable[[Any], Any]]:
        every = {"t2t": self.t2t, "t2t_eos": self.t2t_eos, "c2c": self.run_c2c, "prefix": self.prefix,
                 "receiver": self.receiver}
        return {n: (lambda item, f=every[n]: f(item, answer_tokens)) for n in names}

    def c2c_stages(self, item: Any, answer_tokens: int) -> dict[str, float]:
        """Seconds of each C2C stage, run one by one (the same work `generate` does)."""
        from agentmesh.c2c.fuser import fuse
        from agentmesh.models.inference import decode, prefill

        dev = self.s.receiver.device
        ids, sharer_inputs = self.c2c_inputs(item)
        mask = torch.ones_like(ids)
        span_ids, span_mask = ids[:, :-1], mask[:, :-1]
        t_sharer, span = timed(lambda: self.c2c.sharer_span(0, span_ids, span_mask, sharer_inputs[0]), dev)
        t_receiver, cache = timed(lambda: prefill(self.s.receiver, span_ids, span_mask), dev)
        with torch.no_grad():
            t_fuse, fused = timed(lambda: fuse(cache, [span], "parallel"), dev)
        gen = self.c2c.generation_config(max_new_tokens=answer_tokens, eos_token_id=[])
        t_decode, _ = timed(lambda: decode(self.s.receiver, fused, ids[:, -1:], mask[:, -1:], gen,
                                           pad_token_id=self.c2c.receiver.pad_token_id, prompt_ids=ids), dev)
        return {"sharer_prefill": t_sharer, "receiver_prefill": t_receiver, "fusion": t_fuse, "answer": t_decode}

    def t2t_stages(self, item: Any, answer_tokens: int) -> dict[str, float]:
        from agentmesh.tasks import prompts

        dev = self.s.receiver.device
        sharer, receiver = self.s.sharer, self.s.receiver
        bg_ids = self._ids(sharer, prompts.background_messages(item))
        t_bg, bg = timed(lambda: self.sharer_alone.generate(
            bg_ids, max_new_tokens=self.cfg.background_tokens, do_sample=False, eos_token_id=[]), dev)
        background = sharer.decode(bg[0]).strip()
        ids = self._ids(receiver, prompts.receiver_background_messages(item, background))
        t_ans, _ = timed(lambda: self.receiver_alone.generate(ids, max_new_tokens=answer_tokens, do_sample=False,
                                                              eos_token_id=[]), dev)
        return {"sharer_background": t_bg, "receiver_prefill_and_answer": t_ans}


def _length(tokens: torch.Tensor, lm: LoadedModel) -> int:
    """Generated tokens up to and including the first EOS (batch-1 output is never padded)."""
    eos = set(lm.eos_token_ids)
    for i, t in enumerate(tokens.tolist()):
        if t in eos:
            return i + 1
    return int(tokens.shape[0])


def _measure(methods: Methods, items: list[Any], answer_tokens: int, names: tuple[str, ...], repeats: int,
             device: str) -> tuple[Runs, dict[str, list[dict[str, int]]]]:
    """Per method, the median wall-clock and CPU time of each question (methods interleaved per question)."""
    table = methods.table(answer_tokens, names)
    per_q = Runs({n: [] for n in names}, {n: [] for n in names})
    tokens: dict[str, list[dict[str, int]]] = {n: [] for n in names}
    for item in items:
        runs = interleave({n: (lambda f=table[n], it=item: f(it)) for n in names}, repeats=repeats, warmup=0,
                          device=device)
        for n in names:
            per_q.wall[n].append(median(runs.wall[n]))
            per_q.cpu[n].append(median(runs.cpu[n]))
            tokens[n].append(dict(methods.last.get(n, {})))
    return per_q, tokens


def run(cfg: Config = Config(), *, receiver: LoadedModel | None = None, sharer: LoadedModel | None = None,
        fuser: Fuser | None = None, pool: ModelPool | None = None) -> BenchResult:
    """Run the benchmark; models default to the embedded one (loaded once, used on both ends)."""
    receiver, sharer, fuser, source = bench_models(cfg, receiver, sharer, fuser, pool)
    methods = Methods(_Setup(receiver, sharer, fuser, source), cfg)
    n_items = max(cfg.questions, cfg.sweep_questions if cfg.sweep else 0, cfg.breakdown_questions)
    items = load_items(n_items + 1, cfg.seed)
    warm, items = items[0], items[1:]
    names = tuple(dict.fromkeys(("t2t", "c2c", *cfg.methods)))
    unknown = set(names) - set(ALL_METHODS)
    if unknown:
        raise ConfigError(f"c2c_vs_t2t methods {sorted(unknown)} are unknown; expected some of {', '.join(ALL_METHODS)}")
    with torch.no_grad():
        methods.warm_up(warm, names)
        sync(cfg.device)
        per_q, tokens = _measure(methods, items[:cfg.questions], cfg.answer_tokens, names, cfg.repeats, cfg.device)
        stages_c2c = [methods.c2c_stages(it, cfg.answer_tokens) for it in items[:cfg.breakdown_questions]]
        stages_t2t = [methods.t2t_stages(it, cfg.answer_tokens) for it in items[:cfg.breakdown_questions]]
        sweep_rows = []
        for length in cfg.sweep:
            sq, _ = _measure(methods, items[:cfg.sweep_questions], length, ("t2t", "c2c", "prefix"), cfg.repeats,
                             cfg.device)
            sweep_rows.append({"answer_tokens": length, "t2t_s": median(sq["t2t"]), "c2c_s": median(sq["c2c"]),
                               "prefix_s": median(sq["prefix"]), "t2t_over_c2c": sq.paired_ratio("t2t", "c2c"),
                               "t2t_over_c2c_cpu": sq.paired_ratio("t2t", "c2c", "cpu")})

    rows = []
    for n in names:
        lat = per_q[n]
        toks = tokens[n]
        rows.append({
            "method": n, "mean_s": sum(lat) / len(lat), "p50_s": median(lat), "p95_s": pct(lat, 0.95),
            "vs_c2c": per_q.paired_ratio(n, "c2c"), "cpu_p50_s": median(per_q.cpu[n]),
            "cpu_vs_c2c": per_q.paired_ratio(n, "c2c", "cpu"),
            "answer_tokens": median(t.get("answer", 0) for t in toks),
            "background_tokens": median(t["background"] for t in toks) if n.startswith("t2t") else 0,
            "sharer_prompt_tokens": median(t.get("sharer_prompt", 0) for t in toks),
            "receiver_prompt_tokens": median(t.get("receiver_prompt", 0) for t in toks),
        })
    stage_rows = []
    for method, stages in (("c2c", stages_c2c), ("t2t", stages_t2t)):
        for key in (stages[0] if stages else {}):
            stage_rows.append({"method": method, "stage": key, "median_s": median(s[key] for s in stages)})
    summary = {
        "t2t_over_c2c_median": per_q.paired_ratio("t2t", "c2c"),
        "t2t_over_c2c_cpu_median": per_q.paired_ratio("t2t", "c2c", "cpu"),
        "t2t_over_c2c_of_means": sum(per_q["t2t"]) / sum(per_q["c2c"]),
        **{f"{n}_over_c2c_median": per_q.paired_ratio(n, "c2c") for n in names if n not in ("t2t", "c2c")},
        **{f"{n}_over_c2c_cpu_median": per_q.paired_ratio(n, "c2c", "cpu") for n in names if n not in ("t2t", "c2c")},
        "per_question_s": per_q.wall, "per_question_cpu_s": per_q.cpu,
        "tokens": tokens,
    }
    notes = [
        f"every generation ignores EOS (eos_token_id=[]): answers are {cfg.answer_tokens} tokens for every "
        f"method, t2t background is {cfg.background_tokens} tokens; t2t_eos lets the background stop at the "
        "sharer's EOS (answers still fixed)",
        f"fuser: {source}; receiver and sharer: {receiver.name} (one model object)",
        f"{len(per_q['c2c'])} questions, {cfg.repeats} round(s) each, methods interleaved per question, after a "
        "warm-up question (2 tokens per generation) that is not counted; vs_c2c: median over questions of the "
        "per-question ratio; cpu_*: this process's CPU time (steadier than the wall clock on a shared machine)",
    ]
    extra: dict[str, tuple[list[str], list[dict[str, Any]]]] = {}
    if stage_rows:
        extra["Stages (median seconds)"] = (["method", "stage", "median_s"], stage_rows)
    if sweep_rows:
        extra["T2T / C2C by answer length"] = (
            ["answer_tokens", "t2t_s", "c2c_s", "prefix_s", "t2t_over_c2c", "t2t_over_c2c_cpu"], sweep_rows)
    return BenchResult(
        name=NAME, title=f"C2C vs T2T: end-to-end latency per question ({receiver.name}, batch 1)",
        config={**asdict(cfg), "device": cfg.device, "fuser": source},
        columns=["method", "mean_s", "p50_s", "p95_s", "vs_c2c", "cpu_p50_s", "cpu_vs_c2c", "answer_tokens",
                 "background_tokens",
                 "sharer_prompt_tokens", "receiver_prompt_tokens"],
        rows=rows, summary=summary,
        targets=[Target("T2T / C2C latency (median per question, wall clock)", summary["t2t_over_c2c_median"],
                        ">=", TARGET_RATIO, "x"),
                 Target("T2T / C2C latency (median per question, CPU time)", summary["t2t_over_c2c_cpu_median"],
                        ">=", TARGET_RATIO, "x"),
                 *([Target("T2T with background stopping at EOS / C2C (wall clock)",
                           summary["t2t_eos_over_c2c_median"], ">=", TARGET_RATIO, "x")] if "t2t_eos" in names else [])],
        notes=notes, extra_tables=extra)
