"""The memory task: the assistant of `graphs/chat.yaml` is told a name and asked for it a turn later.

The embedded 135M model answers a bare statement ("My dog is called Rex.") with an invented story,
then repeats that story when asked (README, "The other examples, measured"). A small LoRA adapter
fine-tuned on these conversations makes it acknowledge what it was told and give it back. Rows,
all under the chat graph's own system role:

* `ack`: a statement, answered by an acknowledgement that repeats it;
* `recall`: a statement, its acknowledgement, possibly an everyday question in between, then the
  question about the name, answered with it;
* `general`: an everyday question answered as the base model answers it (self-distillation), so
  the adapter leaves those answers as they were (none of the questions is one of
  `knowledge_task.GENERAL_QUESTIONS`, which measure that).

Names, relations and question phrasings of `bench/examples_success.py` never appear in training.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Mapping

from agentmesh.errors import ConfigError
from agentmesh.files import make_folder, write_jsonl

# The system role of `graphs/chat.yaml`'s assistant (a test holds the two together).
CHAT_ROLE = "You are a helpful assistant. Answer the user's questions directly, in one short sentence."
# Of people and things a user may name (none of them is one the bench asks about).
RELATIONS = ("hamster", "uncle", "aunt", "daughter", "son", "colleague", "coach", "turtle", "guitar", "house",
             "plant", "robot", "tortoise", "pony", "nephew", "niece", "landlord", "dentist", "camera", "phone",
             "lizard", "puppy", "kitten", "grandfather", "partner", "trainer", "piano", "van", "canoe", "drone")
NAMES = ("Milo", "Ada", "Theo", "Nora", "Felix", "Iris", "Oscar", "Greta", "Hugo", "Lila", "Rafael", "Selma",
         "Victor", "Wanda", "Yusuf", "Zelda", "Bram", "Cleo", "Dmitri", "Esme", "Farid", "Gemma", "Hiro", "Ines",
         "Joaquin", "Kaia", "Lorenzo", "Mira", "Nikolai", "Olga", "Pablo", "Quinn", "Rosalind", "Stellan", "Tova",
         "Umberto", "Vera", "Wendell", "Ximena", "Yara", "Zoltan", "Anouk", "Bastian", "Celeste", "Dario", "Elif",
         "Fenna", "Gustav", "Hedda", "Ivo", "Juno", "Kasimir", "Linnea", "Magnus", "Nadia", "Orla", "Pim", "Rune")
STATEMENTS = ("My {rel} is called {name}.", "My {rel}'s name is {name}.", "I have a {rel} named {name}.",
              "I call my {rel} {name}.")
OWN_STATEMENTS = ("I'm {name}.", "My name is {name}.", "Hello, I am {name}.", "Call me {name}.")
QUESTIONS = ("What's my {rel}'s name?", "Can you tell me my {rel}'s name?", "How is my {rel} called?",
             "Remind me, what is my {rel}'s name?")
OWN_QUESTIONS = ("Who am I?", "Can you tell me my name?", "Remind me of my name.", "Do you know who I am?")

# Everyday questions (kept apart from the ones that measure the adapter). Their answers are the
# base model's own (`answer_everyday`): the adapter learns to keep them, not new ones.
EVERYDAY = (
    'What is the capital of Portugal?',
    'What is the capital of Norway?',
    'What is the capital of Kenya?',
    'What is the capital of Australia?',
    'What is the capital of Poland?',
    'What is the capital of Ireland?',
    'How many days are in a week?',
    'How many legs does a spider have?',
    'What is the boiling point of water at sea level?',
    'Which planet is closest to the Sun?',
    'What colour are bananas when they are ripe?',
    'What do cows drink?',
    'Who painted the Mona Lisa?',
    'What is the largest mammal?',
    'How many continents are there?',
    'What language is spoken in Austria?',
    'What is two plus three?',
    'What is the freezing point of water?',
    'Which animal is known for its long neck?',
    'What is the main ingredient of bread?',
    'How many hours are in a day?',
    'What is the chemical symbol for water?',
    'Which season comes after summer?',
    'What instrument has black and white keys?',
    'Who wrote Hamlet?',
    'What is the smallest prime number?',
    'What gas do humans breathe in to live?',
    'Which bird is a symbol of peace?',
    'What is the currency of the United Kingdom?',
    'How many sides does a triangle have?',
    'Give me a word that means happy.',
    'What do you call a baby dog?',
    'Name a fruit that is red.',
    'What is the opposite of up?',
    'What is the largest desert in Africa?',
    'Which metal is liquid at room temperature?',
)


def _conversation(role: str, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": role}]
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def _fact(rng: random.Random) -> tuple[str, str, str, str]:
    """(what the user says, the acknowledgement, a question about it, and its answer) for one name."""
    name = rng.choice(NAMES)
    if rng.random() < 0.35:
        return (rng.choice(OWN_STATEMENTS).format(name=name), f"Nice to meet you, {name}!",
                rng.choice(OWN_QUESTIONS), f"Your name is {name}.")
    rel = rng.choice(RELATIONS)
    return (rng.choice(STATEMENTS).format(rel=rel, name=name),
            f"Nice! I will remember that your {rel} is called {name}.",
            rng.choice(QUESTIONS).format(rel=rel), f"Your {rel} is called {name}.")


def memory_rows(n: int, everyday: Mapping[str, str], *, seed: int = 0, role: str = CHAT_ROLE) -> list[dict[str, Any]]:
    """`n` chat rows: a quarter acknowledgements, half recalls (a third of them with an everyday
    question in between), a quarter everyday questions; `everyday` maps each of `EVERYDAY` to its
    answer (`answer_everyday`)."""
    if n < 1:
        raise ConfigError(f"memory task: n={n} must be >= 1")
    missing = [q for q in EVERYDAY if not everyday.get(q)]
    if missing:
        raise ConfigError(f"memory task: no answer for {len(missing)} everyday questions, e.g. {missing[0]!r}")
    rng = random.Random(f"agentmesh-memory-task/{seed}")

    def everyday_turn() -> tuple[str, str]:
        question = rng.choice(EVERYDAY)
        return question, everyday[question]

    rows = []
    for i in range(n):
        kind = ("ack", "recall", "recall", "general")[i % 4]
        said, ack, question, answer = _fact(rng)
        if kind == "ack":
            turns = [(said, ack)]
        elif kind == "general":
            turns = [everyday_turn()]
        else:
            turns = [(said, ack)] + ([everyday_turn()] if rng.random() < 1 / 3 else []) + [(question, answer)]
        rows.append({"id": f"memory-{kind}-{i}", "kind": kind, "messages": _conversation(role, turns)})
    return rows


def answer_everyday(chat: Callable[[list[list[dict[str, str]]]], list[str]], role: str = CHAT_ROLE) -> dict[str, str]:
    """Each of `EVERYDAY` answered by `chat` (a batch of conversations -> their answers, e.g. the
    base model's `C2CModel.chat`) under the chat role."""
    answers = chat([_conversation(role, []) + [{"role": "user", "content": q}] for q in EVERYDAY])
    return {q: " ".join(a.split()) for q, a in zip(EVERYDAY, answers)}


def write_memory_task(out_dir: str | Path, everyday: Mapping[str, str], *, n: int = 1200, seed: int = 0) -> Path:
    """Write `train.jsonl` (chat rows for a `kind: finetune` recipe) into `out_dir`; returns its path."""
    out = make_folder(out_dir, "memory task folder")
    return write_jsonl(out / "train.jsonl", memory_rows(n, everyday, seed=seed))
