"""The context-transfer task: the sharer holds a private passage, the receiver gets a question
whose answer is only in that passage. Generated here, seeded, with no download.

Facts are about fictional entities (invented countries, people, companies) and their attributes,
e.g. "The capital of Veltoria is Marrowby." A passage holds 3-6 facts: the one asked about,
one or two distractors with the same attribute about other entities, and unrelated facts. Every
name and every value pool is split in two once, by a hash of the string (independent of the seed),
so the train and test splits share no entity and no value - hence no fact.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agentmesh.errors import ConfigError
from agentmesh.files import make_folder, write_jsonl
from agentmesh.tasks.datasets import LETTERS, Item
from agentmesh.tasks.prompts import training_messages

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")

_COUNTRY_HEADS = ("Vel", "Quess", "Dor", "Ambr", "Kel", "Tir", "Zan", "Mor", "Ost", "Bry", "Cal", "Fen", "Gal",
                  "Hal", "Ist", "Jor", "Lum", "Nar", "Pel", "Ror", "Sar", "Tov", "Ulm", "Var", "Wen", "Yr", "Zel",
                  "Eld", "Cor", "Mal")
_COUNTRY_TAILS = ("oria", "avia", "enia", "ethia", "undia", "aria", "ovia", "estan", "mark", "oway")
_CITY_HEADS = ("Marrow", "Dunhal", "Quill", "Brisk", "Cobble", "Drem", "Fallow", "Gorse", "Hask", "Ivel",
               "Kettle", "Lorn", "Mossy", "Nettle", "Oaken", "Plover", "Rushy", "Sedge", "Thrush", "Umber",
               "Vetch", "Wold", "Yew", "Brackle", "Cinder", "Dapple", "Elder", "Furze", "Gannet", "Heron")
_CITY_TAILS = ("by", "holt", "mere", "wick", "ford", "stead", "haven", "thorpe", "moor", "gate")
_FIRST_NAMES = ("Anselm", "Beatrix", "Cosimo", "Delphine", "Evander", "Fenella", "Gideon", "Honora", "Ignatius",
                "Juniper", "Lucian", "Marisol", "Nestor", "Ottilie", "Percival", "Quentin", "Rosalind", "Silas",
                "Theodora", "Ulric", "Verity", "Wendell", "Ximena", "Yorick", "Zenobia")
_SURNAME_HEADS = ("Quil", "Thistle", "March", "Penny", "Bell", "Crane", "Dapple", "Fern", "Gil", "Hart", "Ivy",
                  "Lamb", "Moth", "Orch", "Pip", "Rook", "Sorrel", "Tansy", "Under", "Wick", "Yarrow", "Birch",
                  "Cask", "Dorm")
_SURNAME_TAILS = ("wood", "banks", "feather", "hurst", "combe", "ridge", "wright", "brook", "field", "ley")
_TITLES = ("Dr.", "Prof.", "Captain")
_COMPANY_CORES = ("Brindle", "Lantern", "Mosswell", "Quarry", "Thimble", "Gadwell", "Nimbus", "Orrery",
                  "Pellucid", "Sable", "Tinder", "Wrenfield", "Zephyr", "Alder", "Bramble", "Driftwood", "Ember",
                  "Flint", "Harrow", "Kestrel", "Loom", "Mallow", "Oxbow", "Quince")
_COMPANY_TAILS = ("Works", "Labs", "Industries", "Systems", "Foundry", "Holdings")
_VALUES: dict[str, tuple[str, ...]] = {
    "animal": ("otter", "heron", "lynx", "badger", "falcon", "ibex", "marmot", "pangolin", "tapir", "wombat",
               "okapi", "gecko", "puffin", "bison", "jackal", "narwhal", "ocelot", "quokka", "stoat", "walrus",
               "yak", "zebra", "salamander", "armadillo"),
    "export": ("copper", "saffron", "timber", "wool", "tin", "salt", "coffee", "cotton", "marble", "silk", "rice",
               "olive oil", "cocoa", "honey", "iron ore", "glass", "tea", "paper", "rubber", "pepper", "cinnamon",
               "linen", "coal", "barley"),
    "instrument": ("oboe", "cello", "harp", "bassoon", "clarinet", "trumpet", "viola", "flute", "banjo",
                   "accordion", "harpsichord", "tuba", "mandolin", "sitar", "ukulele", "xylophone", "bagpipes",
                   "lute", "trombone", "zither", "piccolo", "marimba"),
    "colour": ("crimson", "teal", "ochre", "indigo", "maroon", "turquoise", "lavender", "scarlet", "beige",
               "magenta", "violet", "mauve", "cerulean", "chartreuse", "vermilion", "emerald", "periwinkle",
               "sepia", "taupe", "lilac"),
    "product": ("umbrellas", "kettles", "telescopes", "bicycles", "lanterns", "typewriters", "compasses", "pianos",
                "skates", "clocks", "hammocks", "kites", "microscopes", "saddles", "teapots", "violins",
                "barometers", "candles", "sundials", "wheelbarrows"),
}


@dataclass(frozen=True)
class Attribute:
    entity: str     # entity pool: country, person, company
    values: str     # value pool
    fact: str       # sentence, with {e} and {v}
    question: str   # question about {e}


ATTRIBUTES: dict[str, Attribute] = {
    "capital": Attribute("country", "city", "The capital of {e} is {v}.", "What is the capital of {e}?"),
    "national animal": Attribute("country", "animal", "The national animal of {e} is the {v}.",
                                 "What is the national animal of {e}?"),
    "export": Attribute("country", "export", "The main export of {e} is {v}.", "What is the main export of {e}?"),
    "instrument": Attribute("person", "instrument", "{e}'s favourite instrument is the {v}.",
                            "What is {e}'s favourite instrument?"),
    "hometown": Attribute("person", "city", "{e} lives in {v}.", "In which town does {e} live?"),
    "colour": Attribute("person", "colour", "{e}'s favourite colour is {v}.", "What is {e}'s favourite colour?"),
    "headquarters": Attribute("company", "city", "{e} has its headquarters in {v}.",
                              "In which city is {e} headquartered?"),
    "product": Attribute("company", "product", "{e} makes {v}.", "What does {e} make?"),
    "founder": Attribute("company", "founder", "{e} was founded by {v}.", "Who founded {e}?"),
}


def _stable_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _half(names: tuple[str, ...] | list[str], split: Split) -> list[str]:
    """One of two fixed, disjoint, equal-sized halves of `names` (by hash, never by seed)."""
    ordered = sorted(set(names), key=_stable_key)
    return sorted(ordered[0::2] if split == "train" else ordered[1::2])


def _combine(heads: tuple[str, ...], tails: tuple[str, ...]) -> list[str]:
    return [h + t for h in heads for t in tails]


def pools(split: Split) -> dict[str, list[str]]:
    """Entity and value pools of one split; the two splits' pools are disjoint."""
    if split not in SPLITS:
        raise ConfigError(f"context task split {split!r} is unknown; expected 'train' or 'test'")
    surnames = _half(_combine(_SURNAME_HEADS, _SURNAME_TAILS), split)
    cores = _half(_COMPANY_CORES, split)
    founders = [f"{first} {last}" for first in _FIRST_NAMES for last in surnames]
    # Person entities carry a title and founders do not, so a person and a founder never share a name.
    out = {
        "country": _half(_combine(_COUNTRY_HEADS, _COUNTRY_TAILS), split),
        "city": _half(_combine(_CITY_HEADS, _CITY_TAILS), split),
        "person": [f"{title} {name}" for title in _TITLES for name in founders],
        "founder": founders,
        "company": [f"{core} {tail}" for core in cores for tail in _COMPANY_TAILS],
    }
    out.update({k: _half(v, split) for k, v in _VALUES.items()})
    return out


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    def sentence(self) -> str:
        return ATTRIBUTES[self.attribute].fact.format(e=self.entity, v=self.value)


class _Passage:
    """Facts of one passage, kept unambiguous: one value per (entity, attribute), distinct values
    per attribute."""

    def __init__(self, rng: random.Random, pool: dict[str, list[str]]):
        self.rng, self.pool = rng, pool
        self.facts: list[Fact] = []

    def add(self, attribute: str, entity: str | None = None) -> Fact | None:
        spec = ATTRIBUTES[attribute]
        taken_entities = {f.entity for f in self.facts}
        taken_values = {f.value for f in self.facts if f.attribute == attribute}
        if entity is None:
            entity = self._pick(self.pool[spec.entity], taken_entities)
        elif any(f.entity == entity and f.attribute == attribute for f in self.facts):
            return None
        value = self._pick(self.pool[spec.values], taken_values | {entity})
        fact = Fact(entity, attribute, value)
        self.facts.append(fact)
        return fact

    def _pick(self, options: list[str], taken: set[str]) -> str:
        for _ in range(100):
            choice = self.rng.choice(options)
            if choice not in taken:
                return choice
        raise ConfigError("context task pools are too small for a passage of this size")


def make_item(rng: random.Random, pool: dict[str, list[str]], *, split: Split, index: int,
              multiple_choice: bool = False, min_facts: int = 3, max_facts: int = 6) -> dict[str, Any]:
    """One task record (a JSON-ready dict that `agentmesh.tasks.datasets` reads as "context" shape)."""
    attribute = rng.choice(sorted(ATTRIBUTES))
    n_facts = rng.randint(min_facts, max_facts)
    passage = _Passage(rng, pool)
    target = passage.add(attribute)
    assert target is not None
    for _ in range(min(rng.randint(1, 2), n_facts - 1)):  # same attribute, other entities
        passage.add(attribute)
    same_kind = [a for a in sorted(ATTRIBUTES) if a != attribute and ATTRIBUTES[a].entity == ATTRIBUTES[attribute].entity]
    if len(passage.facts) < n_facts and rng.random() < 0.5:  # the asked-about entity, another attribute
        passage.add(rng.choice(same_kind), entity=target.entity)
    while len(passage.facts) < n_facts:
        passage.add(rng.choice([a for a in sorted(ATTRIBUTES) if a != attribute]))
    facts = list(passage.facts)
    rng.shuffle(facts)
    record: dict[str, Any] = {
        "id": f"ctx-{split}-{index:05d}",
        "question": ATTRIBUTES[attribute].question.format(e=target.entity),
        "context": " ".join(f.sentence() for f in facts),
        "subject": attribute,
        "answer": target.value,
        "answer_text": target.value,
    }
    if multiple_choice:
        values = pool[ATTRIBUTES[attribute].values]
        # Distractors: first the same-attribute values in the passage (so only the passage decides),
        # then other values of the pool.
        others = [f.value for f in facts if f.attribute == attribute and f.value != target.value]
        while len(others) < 3:
            v = rng.choice(values)
            if v != target.value and v not in others:
                others.append(v)
        choices = [target.value, *others[:3]]
        rng.shuffle(choices)
        record["choices"] = choices
        record["answer"] = LETTERS[choices.index(target.value)]
    record["facts"] = [[f.entity, f.attribute, f.value] for f in facts]
    record["target"] = [target.entity, target.attribute, target.value]
    item = Item(record["id"], record["question"], record.get("choices"), record["answer"], attribute,
                context=record["context"], kind="mc" if multiple_choice else "short")
    record["messages"] = training_messages(item)
    return record


def generate_split(split: Split, n: int, *, seed: int = 0, multiple_choice: bool = False,
                   min_facts: int = 3, max_facts: int = 6) -> list[dict[str, Any]]:
    """`n` records of `split`; the same arguments always give the same records.

    With SmolLM2's tokenizer a fact is about 12 tokens: 3-6 facts make passages of 20-90 tokens.
    """
    if n < 0:
        raise ConfigError(f"context task size {n} must be >= 0")
    if not 2 <= min_facts <= max_facts <= 12:
        raise ConfigError(f"context task facts per passage {min_facts}..{max_facts} must satisfy 2 <= min <= max <= 12")
    rng = random.Random(f"agentmesh-context-task/{seed}/{split}")
    pool = pools(split)
    return [make_item(rng, pool, split=split, index=i, multiple_choice=multiple_choice, min_facts=min_facts,
                      max_facts=max_facts) for i in range(n)]


def write_context_task(out_dir: str | Path, *, seed: int = 0, n_train: int = 2000, n_test: int = 200,
                       multiple_choice: bool = False, min_facts: int = 3, max_facts: int = 6) -> dict[str, Path]:
    """Write `train.jsonl` and `test.jsonl` into `out_dir`; returns their paths."""
    out = make_folder(out_dir, "context task folder")
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        path = out / f"{split}.jsonl"
        records = generate_split(split, n, seed=seed, multiple_choice=multiple_choice,  # type: ignore[arg-type]
                                 min_facts=min_facts, max_facts=max_facts)
        paths[split] = write_jsonl(path, records)
    return paths
