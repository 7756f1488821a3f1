"""Fusion ceilings on the embedded model, before any fuser is trained: floor, sharer, text-to-text,
prefix, the two replacement oracles and a linear probe, on the same items.

    python bench/fusion_ceiling.py recipes/fusion_ceiling.yaml          # writes runs/fusion_ceiling/

Settings (the recipe lists them):
* knowledge: invented "the capital of X is Y" facts, entities split A/B, values from one pool of
  cities with distinct first tokens. A LoRA specialist (peft) is fine-tuned on every fact (A and B)
  in two training phrasings; items are facts B in three held-out phrasings. The receiver is the
  base model.
* context: the context-transfer task (`agentmesh make-context-task` generator, test split); the
  sharer is the same model, reading the passage first.

Format: plain text, no chat template (the cheapest form that asks for the fact, so that it fits a
shared 2-core machine): the prompt is the fact's own lead ("The capital of X is") and an item is
right when greedy decoding continues with exactly the answer's tokens (teacher-forced: the argmax at
every answer position is the gold token). Every method is scored the same way on the same items.

Methods: receiver (alone), sharer (alone, with its adapter or its passage), t2t (the sharer writes
<= N tokens under "Notes about X:", after its passage if any; the receiver reads that text before
the lead), prefix (same model only: identical to the sharer reading passage and lead), oracle (the
receiver reads the sharer's own K/V of the span, every prompt token but the last: the ceiling of a
prompt-mode fuser), oracle-response (every position's K/V, prompt, answer and the current token,
replaced by the sharer's before the receiver's attention reads them: the ceiling of
include-response), and a linear probe per layer from K/V of the span's last token to the answer's
first token, trained on other items (facts A / other passages), on the sharer's K/V and on the
receiver's own. Sharer keys read after a passage are rotated back to the receiver's positions with
the model's rotary parameters before the oracles use them.

Each finished step is saved under the output folder, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentmesh.tasks.context_task import ATTRIBUTES, generate_split, pools  # noqa: E402
from agentmesh.eval.metrics import wilson_interval  # noqa: E402

TRAIN_LEADS = ("The capital of {e} is", "{e}'s capital city is")
HELD_OUT_LEADS = ("The capital city of {e} is", "{e} has its capital in", "Everyone in {e} knows that the capital is")


@dataclass(frozen=True)
class Q:
    id: str
    entity: str         # what the fact is about
    lead: str           # the text the answer continues, e.g. "The capital of X is"
    answer: str         # continues `lead`, with its leading space
    context: str | None = None  # a passage only the sharer reads


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- tasks ----------------------------------------------------------------------------------------
def knowledge_task(tok: Any, n_per_split: int, n_values: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    countries = pools("train")["country"] + pools("test")["country"]
    cities, firsts = [], set()
    for c in pools("train")["city"] + pools("test")["city"]:
        first = tok.encode(" " + c, add_special_tokens=False)[0]
        if first not in firsts:
            firsts.add(first)
            cities.append(c)
    values = rng.sample(cities, n_values)
    entities = rng.sample(countries, 2 * n_per_split)
    facts = {e: rng.choice(values) for e in entities}
    a, b = entities[:n_per_split], entities[n_per_split:]

    def q(e: str, lead: str, i: int) -> Q:
        return Q(f"{e}-{i}", e, lead.format(e=e), " " + facts[e])

    return {
        "facts": facts, "values": values,
        "train_rows": [(lead.format(e=e), " " + facts[e]) for e in entities for lead in TRAIN_LEADS],
        "eval": [q(e, lead, i) for e in b for i, lead in enumerate(HELD_OUT_LEADS)],
        "probe_train": [q(e, lead, i) for e in a for i, lead in enumerate(TRAIN_LEADS + HELD_OUT_LEADS)],
        "seen_phrasing": [q(e, TRAIN_LEADS[0], 0) for e in b],
    }


def context_items(n: int, seed: int) -> list[Q]:
    out = []
    for r in generate_split("test", n, seed=seed):
        entity, attribute, value = r["target"]
        before, _, _ = ATTRIBUTES[attribute].fact.format(e=entity, v="\0").partition("\0")
        out.append(Q(r["id"], entity, before.rstrip(), " " + value, r["context"]))
    return out


# ---- encoding -------------------------------------------------------------------------------------
def encode(lm: Any, q: Q, *, background: str | None = None, with_context: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids ending with the lead, answer ids). Plain text, no chat template (the cheapest
    format that still asks for the fact); the passage, or a text edge's background, comes first."""
    head = lm.encode(q.context + "\n") if with_context and q.context else []
    if background is not None:
        head = lm.encode(background.strip() + "\n")
    lead = lm.encode(q.lead)
    full = lm.encode(q.lead + q.answer)
    return head + lead, full[len(lead):] if full[:len(lead)] == lead else lm.encode(q.answer)


def reading_ids(lm: Any, context: str) -> list[int]:
    return lm.encode(context + "\n")


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


class ReplacingCache(DynamicCache):
    """A cache whose update swaps in given K/V for positions below a per-row bound, before the
    attention reads them (positions count from the start of the forward pass)."""

    def __init__(self, config: Any, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], upto: torch.Tensor):
        super().__init__(config=config)
        self.rk, self.rv, self.upto = keys, values, upto  # (B, H, N, D) per layer; (B,)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        n = key_states.shape[2]
        pos = torch.arange(n)
        m = (pos[None, :] < self.upto[:, None])[:, None, :, None]  # (B, 1, N, 1)
        k = torch.where(m, self.rk[layer_idx][:, :, :n].to(key_states.dtype), key_states)
        v = torch.where(m, self.rv[layer_idx][:, :, :n].to(value_states.dtype), value_states)
        return super().update(k, v, layer_idx, *args, **kwargs)


def rotate_keys(lm: Any, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Keys (B, H, N, D) computed at positions p, moved to p + delta (B,) with the model's rotary."""
    rope = lm.model.model.rotary_emb
    pos = delta[:, None].expand(-1, k.shape[2]).to(torch.long)
    cos, sin = rope(k.transpose(1, 2), position_ids=pos)  # (B, N, D)
    cos, sin = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)
    half = k.shape[-1] // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return k * cos + rot * sin


# ---- one batch of teacher-forced forwards ---------------------------------------------------------
@torch.no_grad()
def forward(lm: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
    out = lm.model(input_ids=ids, attention_mask=mask, cache=cache if cache is not None else DynamicCache(config=lm.model.config),
                   use_cache=True)
    return out.logits.float(), out.cache if hasattr(out, "cache") else out.past_key_values


def layers_of(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def correct_rows(logits: torch.Tensor, rows: Sequence[tuple[list[int], list[int]]]) -> list[bool]:
    """Whether greedy decoding continues every row's prompt with exactly its answer ids."""
    out = []
    for i, (prompt, answer) in enumerate(rows):
        start = len(prompt) - 1
        pred = logits[i, start:start + len(answer)].argmax(-1).tolist()
        out.append(pred == answer)
    return out


class Scorer:
    """Every method on a list of items, batched; the sharer is `with_sharer()` (a context manager)."""

    def __init__(self, lm: Any, sharer_ctx: Any, receiver_ctx: Any, batch: int):
        self.lm, self.sharer_ctx, self.receiver_ctx, self.batch = lm, sharer_ctx, receiver_ctx, batch
        self.pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    def chunks(self, items: Sequence[Q]) -> Any:
        for i in range(0, len(items), self.batch):
            yield items[i:i + self.batch]

    def plain(self, items: Sequence[Q], *, sharer: bool, with_context: bool, backgrounds: Sequence[str] | None = None) -> list[bool]:
        """The receiver or sharer alone (reading its passage first when `with_context`)."""
        ok: list[bool] = []
        for j, chunk in enumerate(self.chunks(items)):
            bgs = backgrounds[j * self.batch:(j + 1) * self.batch] if backgrounds is not None else [None] * len(chunk)
            rows = [encode(self.lm, q, background=t, with_context=with_context) for q, t in zip(chunk, bgs)]
            ids, mask = right_pad([a + b for a, b in rows], self.pad)
            with (self.sharer_ctx() if sharer else self.receiver_ctx()):
                logits, _ = forward(self.lm, ids, mask)
            ok += correct_rows(logits, rows)
        return ok

    def sharer_span_kv(self, chunk: Sequence[Q], rows: Sequence[tuple[list[int], list[int]]]) -> tuple[list, list, list[int]]:
        """The sharer's K/V of each row's prompt + answer (after its passage, keys rotated back to
        positions from 0), right-padded to the rows' length."""
        pre = [reading_ids(self.lm, q.context) if q.context else [] for q in chunk]
        ids, mask = right_pad([p + a + b for p, (a, b) in zip(pre, rows)], self.pad)
        with self.sharer_ctx():
            _, cache = forward(self.lm, ids, mask)
        ks, vs = layers_of(cache)
        n = max(len(a) + len(b) for a, b in rows)
        off = torch.tensor([len(p) for p in pre])
        idx = (off[:, None] + torch.arange(n)[None, :]).clamp(max=ids.shape[1] - 1)  # (B, n)
        take = lambda t: t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))  # noqa: E731
        keys = [rotate_keys(self.lm, take(k), -off) if int(off.max()) > 0 else take(k) for k in ks]
        return keys, [take(v) for v in vs], [len(p) for p in pre]

    def oracles(self, items: Sequence[Q]) -> tuple[list[bool], list[bool]]:
        """(oracle, oracle-response) over the same sharer forward."""
        span_ok: list[bool] = []
        resp_ok: list[bool] = []
        for chunk in self.chunks(items):
            rows = [encode(self.lm, q) for q in chunk]
            keys, values, _ = self.sharer_span_kv(chunk, rows)
            ids, mask = right_pad([a + b for a, b in rows], self.pad)
            for upto, ok in ((torch.tensor([len(a) - 1 for a, _ in rows]), span_ok),
                             (torch.tensor([len(a) + len(b) for a, b in rows]), resp_ok)):
                cache = ReplacingCache(self.lm.model.config, keys, values, upto)
                with self.receiver_ctx():
                    logits, _ = forward(self.lm, ids, mask, cache)
                ok += correct_rows(logits, rows)
        return span_ok, resp_ok

    def backgrounds(self, items: Sequence[Q], tokens: int) -> list[str]:
        """The sharer's text for t2t: what it writes, after its passage if any, under "Notes about X:"."""
        from agentmesh.c2c.model import C2CModel
        from agentmesh.models.inference import pad_sequences

        engine = C2CModel(self.lm)
        out: list[str] = []
        for chunk in self.chunks(items):
            rows = [(reading_ids(self.lm, q.context) if q.context else []) + self.lm.encode(f"Notes about {q.entity}:")
                    for q in chunk]
            ids, mask = pad_sequences(rows, self.pad)
            with self.sharer_ctx():
                new = engine.generate(ids, mask, max_new_tokens=tokens, do_sample=False)
            out += [f"Notes about {q.entity}: " + self.lm.decode(r).strip() for q, r in zip(chunk, new)]
        return out

    def probe_features(self, items: Sequence[Q], *, sharer: bool) -> tuple[torch.Tensor, list[int]]:
        """(L, B, 2*H*D) K/V of each item's last span token (the prompt's second-to-last), and the
        answer's first token per item."""
        feats, labels = [], []
        for chunk in self.chunks(items):
            rows = [encode(self.lm, q) for q in chunk]
            if sharer:
                keys, values, _ = self.sharer_span_kv(chunk, rows)
            else:
                ids, mask = right_pad([a + b for a, b in rows], self.pad)
                with self.receiver_ctx():
                    _, cache = forward(self.lm, ids, mask)
                keys, values = layers_of(cache)
            last = torch.tensor([len(a) - 2 for a, _ in rows])
            b = torch.arange(len(rows))
            feats.append(torch.stack([torch.cat([k[b, :, last].flatten(1), v[b, :, last].flatten(1)], -1)
                                      for k, v in zip(keys, values)]).float())
            labels += [r[1][0] for r in rows]
        return torch.cat(feats, 1), labels


def probe_accuracy(train_x: torch.Tensor, train_y: list[int], test_x: torch.Tensor, test_y: list[int],
                   l2: float = 1e-2, steps: int = 200) -> list[float]:
    """Per layer: held-out accuracy of a multinomial logistic regression (standardized features)."""
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in train_y])
    accs = []
    for layer in range(train_x.shape[0]):
        x, t = train_x[layer], test_x[layer]
        mu, sd = x.mean(0), x.std(0) + 1e-6
        x, t = (x - mu) / sd, (t - mu) / sd
        w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
        b0 = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.LBFGS([w, b0], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w + b0, y) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        pred = (t @ w + b0).argmax(-1).tolist()
        accs.append(sum(classes[p] == g for p, g in zip(pred, test_y)) / len(test_y))
    return accs


# ---- the specialist -------------------------------------------------------------------------------
def finetune(lm: Any, peft_model: Any, name: str, spec: dict[str, Any], rows: Sequence[tuple[str, str]],
             out: Path, seed: int) -> dict[str, Any]:
    """Train adapter `name` (already added) on (question, answer) rows; loss on the answer only."""
    done = out / "adapters" / name / "train.json"
    if done.exists():
        from safetensors.torch import load_file
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, load_file(str(out / "adapters" / name / "adapter_model.safetensors")),
                                  adapter_name=name)
        log(f"adapter {name}: loaded from {done.parent}")
        return json.loads(done.read_text())
    peft_model.set_adapter(name)
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    pad = lm.tokenizer.pad_token_id or 0
    examples = []
    for lead, answer in rows:
        head = lm.encode(lead)
        full = lm.encode(lead + answer)
        examples.append((full, len(head)))
    rng = random.Random(seed)
    steps, losses, started = 0, [], time.time()
    total = math.ceil(len(examples) / spec["batch_size"]) * spec["epochs"]
    lm.model.train()
    for epoch in range(spec["epochs"]):
        rng.shuffle(examples)
        for i in range(0, len(examples), spec["batch_size"]):
            batch = examples[i:i + spec["batch_size"]]
            ids, mask = right_pad([e for e, _ in batch], pad)
            labels = ids.clone()
            for r, (e, n) in enumerate(batch):
                labels[r, :n] = -100
                labels[r, len(e):] = -100
            loss = lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps += 1
            losses.append(float(loss.detach()))
            if steps % 10 == 0 or steps == total:
                log(f"adapter {name}: step {steps}/{total} loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    lm.model.eval()
    info = {"steps": steps, "seconds": round(time.time() - started, 1), "final_loss": round(sum(losses[-10:]) / 10, 4),
            "target_modules": spec["target_modules"], "r": spec["r"], "examples": len(examples),
            "trainable_parameters": sum(p.numel() for p in params)}
    folder = out / "adapters" / name
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out / "adapters"), selected_adapters=[name])
    done.write_text(json.dumps(info, indent=1))
    return info


# ---- driver ---------------------------------------------------------------------------------------
def wilson(ok: Sequence[bool]) -> dict[str, Any]:
    c, n = sum(ok), len(ok)
    lo, hi = wilson_interval(c, n)
    return {"correct": c, "n": n, "accuracy": round(c / n, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def run_setting(name: str, scorer: Scorer, items: list[Q], probe_items: list[Q], *, same_model: bool,
                t2t_tokens: int, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    path = out / f"{name}.json"
    if path.exists():
        log(f"{name}: done earlier ({path})")
        return json.loads(path.read_text())
    started = time.time()
    res: dict[str, Any] = {"setting": name, "items": len(items), **extra}
    ctx = any(q.context for q in items)
    res["receiver"] = wilson(scorer.plain(items, sharer=False, with_context=False))
    log(f"{name}: receiver {res['receiver']}")
    res["sharer"] = wilson(scorer.plain(items, sharer=True, with_context=ctx))
    log(f"{name}: sharer {res['sharer']}")
    span, resp = scorer.oracles(items)
    res["oracle"], res["oracle-response"] = wilson(span), wilson(resp)
    log(f"{name}: oracle {res['oracle']} oracle-response {res['oracle-response']}")
    if same_model:  # the receiver continuing from the sharer's cache of passage + lead is the sharer's own run
        res["prefix"] = res["sharer"]
    bgs = scorer.backgrounds(items, t2t_tokens)
    res["t2t"] = wilson(scorer.plain(items, sharer=False, with_context=False, backgrounds=bgs))
    res["t2t_background_examples"] = bgs[:3]
    log(f"{name}: t2t {res['t2t']}")
    for who in ("sharer", "receiver"):
        tx, ty = scorer.probe_features(probe_items, sharer=who == "sharer")
        ex, ey = scorer.probe_features(items, sharer=who == "sharer")
        accs = probe_accuracy(tx, ty, ex, ey)
        best = max(range(len(accs)), key=accs.__getitem__)
        res[f"probe_{who}"] = {"best_layer": best, "accuracy": round(accs[best], 4),
                               "per_layer": [round(a, 3) for a in accs],
                               "test_items_with_unseen_class": sum(y not in set(ty) for y in ey)}
        log(f"{name}: probe on {who} K/V: best layer {best} acc {accs[best]:.3f}")
    res["seconds"] = round(time.time() - started, 1)
    path.write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    out = args.out or Path(recipe.get("output", "runs/fusion_ceiling"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.get("seed", 0))
    torch.set_num_threads(recipe.get("threads", 1))

    from contextlib import nullcontext

    from peft import LoraConfig, get_peft_model

    from agentmesh.models import load_model

    log(f"loading {recipe['model']}")
    lm = load_model(recipe["model"], dtype="float32")
    k = recipe["knowledge"]
    task = knowledge_task(lm.tokenizer, k["entities_per_split"], k["values"], recipe.get("seed", 0))
    (out / "knowledge_facts.json").write_text(json.dumps({"facts": task["facts"], "values": task["values"]}, indent=1))
    results = []
    specs = recipe["specialists"]
    peft_model = None
    for name, spec in specs.items():
        cfg = LoraConfig(r=spec["r"], lora_alpha=spec.get("alpha", 2 * spec["r"]), lora_dropout=0.0,
                         target_modules=spec["target_modules"])
        if peft_model is None:
            peft_model = get_peft_model(lm.model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    lm.model.eval()
    for name, spec in specs.items():
        info = finetune(lm, peft_model, name, spec, task["train_rows"], out, recipe.get("seed", 0))
        peft_model.set_adapter(name)
        # peft's set_adapter marks the adapter trainable again; nothing here trains.
        for p in peft_model.parameters():
            p.requires_grad_(False)
        scorer = Scorer(lm, nullcontext, peft_model.disable_adapter, recipe.get("batch_size", 16))
        seen = wilson(scorer.plain(task["seen_phrasing"], sharer=True, with_context=False))
        log(f"knowledge/{name}: sharer on a training phrasing {seen}")
        results.append(run_setting(f"knowledge_{name}", scorer, task["eval"], task["probe_train"], same_model=False,
                                   t2t_tokens=recipe.get("t2t_background_tokens", 24), out=out,
                                   extra={"adapter": info, "sharer_seen_phrasing": seen}))
    c = recipe["context"]
    with peft_model.disable_adapter():
        scorer = Scorer(lm, nullcontext, nullcontext, recipe.get("batch_size", 16))
        items = context_items(c["items"], c.get("seed", 0))
        probe_items = context_items(c["probe_items"], c.get("probe_seed", 1))
        results.append(run_setting("context", scorer, items, probe_items, same_model=True,
                                   t2t_tokens=recipe.get("t2t_background_tokens", 24), out=out, extra={}))
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(format_table(results))


def format_table(results: Sequence[dict[str, Any]]) -> str:
    cols = ("receiver", "sharer", "t2t", "prefix", "oracle", "oracle-response")
    lines = ["| setting | items | " + " | ".join(cols) + " | probe: sharer K/V (layer) | probe: receiver K/V (layer) |",
             "|---" * (len(cols) + 4) + "|"]
    for r in results:
        cells = []
        for c in cols:
            s = r.get(c)
            cells.append("–" if s is None else f"{s['correct']}/{s['n']} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]")
        ps, pr = r["probe_sharer"], r["probe_receiver"]
        lines.append(f"| {r['setting']} | {r['items']} | " + " | ".join(cells)
                     + f" | {ps['accuracy']:.2f} ({ps['best_layer']}) | {pr['accuracy']:.2f} ({pr['best_layer']}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
