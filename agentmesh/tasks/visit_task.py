"""The visit task: may I visit this place on this day at this time? The planner of
`graphs/combined_reasoning.yaml` answers it from two facts that reach it by different edges.

Each conversation is the planner's input exactly as that graph builds it:

* system: the place's closing-day rule, the reading of the `closures` agent, whose cache the
  planner continues from (a prefix edge);
* user: the opening hours as the `hours` agent writes them (a text edge), then the question and
  the instruction to give the facts, then yes or no;
* assistant (the label): the day and time asked, the closing day and the hours, then the verdict
  and its reason: "You asked about Monday at 10 am. The library is closed on Mondays and open from
  9 am to 5 pm. So no: it is closed on Mondays." ("So yes: it is open then.", "So no: 7 pm is
  after its opening hours.")

The embedded 135M model cannot do this from the prompt alone: it answers "no" to every day
(README, "The other examples, measured"). A small LoRA adapter fine-tuned on `train.jsonl` is what
lets it. `test.jsonl` holds what training never shows: the graph's own place (the Riverside
library), its question phrasings, and hours/day combinations drawn apart from training's.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentmesh.errors import ConfigError
from agentmesh.files import make_folder, write_jsonl

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLACES = ("library", "museum", "swimming pool", "bakery", "post office", "town hall", "bookshop", "gallery",
          "pharmacy", "sports centre")
NAMES = ("Oakwood", "Hillcrest", "Northgate", "Maple", "Harbour", "Westfield", "Lakeside", "Old Town", "Elmfield",
         "Bridgeport")
# The graph's own place, kept out of training.
GRAPH_PLACE = ("Riverside", "library")

# The planner's user message; `graphs/combined_reasoning.yaml` writes the same template with
# {hours} and {input} (a test holds the two together).
PLANNER_PROMPT = "{hours}\n\nQuestion: {input}\nGive the facts, then answer yes or no."
SYSTEM = "You are the assistant of the {name} {place}. Rule: the {place} is closed every {day}."
# How the `hours` agent tends to put the hours in one sentence.
HOURS_SENTENCES = ("The {name} {place} opens at {o} and closes at {c}.",
                   "The {name} {place} is open from {o} to {c}.",
                   "The {name} {place} is open from {o} to {c}, and it closes at {c}.",
                   "The {place} opens at {o} and closes at {c}.")
TRAIN_QUESTIONS = ("Can I come to the {place} on {day} at {t}?", "Is the {place} open at {t} on {day}?",
                   "Could I visit the {place} on {day} at {t}?", "Will the {place} be open on {day} at {t}?",
                   "Can I go to the {place} at {t} on {day}?",
                   "Is it possible to come by the {place} at {t} on a {day}?")
# Held out: the phrasings `bench/examples_success.py` asks the graph.
TEST_QUESTIONS = ("Can I visit the {place} at {t} on {day}?", "Can I go to the {place} on {day} at {t}?",
                  "Is the {place} open on {day} at {t}?", "Will the {place} be open at {t} on {day}?",
                  "Can I return a book at the {place} at {t} on {day}?",
                  "Is it possible to visit the {place} at {t} on {day}?")


def clock(hour: int, minute: int = 0) -> str:
    """24-hour time as people write it: 9 -> "9 am", 14:30 -> "2:30 pm", 12 -> "noon"."""
    if hour == 12 and minute == 0:
        return "noon"
    h = hour % 12 or 12
    return f"{h}{f':{minute:02d}' if minute else ''} {'am' if hour < 12 else 'pm'}"


def impossible_clock(answer: str) -> bool:
    """Whether `answer` gives a time no clock shows: a 24-hour hour with "am" ("17:00 am")."""
    return re.search(r"\b(1[3-9]|2[0-4])(:\d\d)?\s*am\b", answer.lower()) is not None


def verdict(answer: str) -> str | None:
    """"yes" or "no" as a reader takes it from an answer: its "so yes" / "so no", else a leading
    yes or no; None when it gives neither, or both."""
    a = " ".join(answer.lower().split())
    found = set(re.findall(r"\bso (yes|no)\b", a) or re.findall(r"^(yes|no)\b", a))
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class Visit:
    name: str
    place: str
    opens: int        # hour, 24-hour clock
    closes: int
    closed_day: str
    day: str          # the day asked about
    hour: int         # the time asked about
    minute: int

    @property
    def case(self) -> str:
        """"closed day", "outside hours" or "open": which fact decides the answer."""
        if self.day == self.closed_day:
            return "closed day"
        return "open" if self.opens * 60 <= self.hour * 60 + self.minute < self.closes * 60 else "outside hours"

    def answer(self) -> str:
        """Both facts written out before any verdict, then the verdict and its reason: a small model
        compares two days or two times it has just written far better than two it must find across
        the prompt (and a connective like "but" would make it decide before it has copied them)."""
        o, c, p, t = clock(self.opens), clock(self.closes), self.place, clock(self.hour, self.minute)
        facts = f"You asked about {self.day} at {t}. The {p} is closed on {self.closed_day}s and open from {o} to {c}."
        if self.case == "closed day":
            return f"{facts} So no: it is closed on {self.day}s."
        if self.case == "outside hours":
            return f"{facts} So no: {t} is {'before' if self.hour < self.opens else 'after'} its opening hours."
        return f"{facts} So yes: it is open then."

    def is_right(self, answer: str) -> bool:
        """Whether `answer` comes to the verdict `answer()` comes to, never with an impossible clock
        time ("17:00 am")."""
        return not impossible_clock(answer) and verdict(answer) == ("yes" if self.case == "open" else "no")

    def messages(self, hours: str, question: str) -> list[dict[str, str]]:
        """The planner's conversation, given the `hours` agent's sentence and the question."""
        return [{"role": "system", "content": SYSTEM.format(name=self.name, place=self.place, day=self.closed_day)},
                {"role": "user", "content": PLANNER_PROMPT.format(hours=hours, input=question)},
                {"role": "assistant", "content": self.answer()}]


def draw_visit(rng: random.Random, name: str, place: str, case: str) -> Visit:
    """A visit of `case` ("closed day", "open" or "outside hours")."""
    opens, closes = rng.randint(7, 11), rng.randint(15, 20)
    closed_day = rng.choice(DAYS)
    day = closed_day if case == "closed day" else rng.choice([d for d in DAYS if d != closed_day])
    if case == "outside hours":
        hour = rng.choice([h for h in range(6, 23) if h < opens or h >= closes])
    else:
        hour = rng.randint(opens, closes - 1)
    minute = rng.choice((0, 0, 0, 30))
    return Visit(name, place, opens, closes, closed_day, day, hour, minute)


# Shares of each case: the two "no"s together match the "yes"es, so a planner that always says no
# (the untuned model) scores half, not more.
CASES = ("closed day",) * 3 + ("open",) * 4 + ("outside hours",)


def _row(visit: Visit, rng: random.Random, questions: tuple[str, ...], row_id: str) -> dict[str, Any]:
    o, c = clock(visit.opens), clock(visit.closes)
    hours = rng.choice(HOURS_SENTENCES).format(name=visit.name, place=visit.place, o=o, c=c)
    question = rng.choice(questions).format(place=visit.place, day=visit.day, t=clock(visit.hour, visit.minute))
    return {"id": row_id, "case": visit.case, "visit": asdict(visit), "question": question,
            "messages": visit.messages(hours, question)}


def write_visit_task(out_dir: str | Path, *, n_train: int = 1200, n_test: int = 48, seed: int = 0) -> dict[str, Path]:
    """Write `train.jsonl` (chat rows for `agentmesh train` with a `kind: finetune` recipe) and
    `test.jsonl` (the graph's own place and question phrasings, never trained on) into `out_dir`."""
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"visit task: n_train={n_train} and n_test={n_test} must both be >= 1")
    rng = random.Random(f"agentmesh-visit-task/{seed}")
    train = []
    for i in range(n_train):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        visit = draw_visit(rng, name, place, CASES[i % len(CASES)])
        train.append(_row(visit, rng, TRAIN_QUESTIONS, f"visit-train-{i}"))
    test = [_row(draw_visit(rng, *GRAPH_PLACE, CASES[i % len(CASES)]), rng, TEST_QUESTIONS, f"visit-test-{i}")
            for i in range(n_test)]
    out = make_folder(out_dir, "visit task folder")
    return {split: write_jsonl(out / f"{split}.jsonl", rows) for split, rows in (("train", train), ("test", test))}
