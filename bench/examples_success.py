"""How often the shipped examples do what their comments claim, on the embedded model.

    python bench/examples_success.py              # writes bench/results/examples/success.json

(A folder of its own: `agentmesh bench report` reads every bench/results/*.json as one of its
benchmarks, and this is not one.)

The model loads once; every graph runs in this process through the Python API (the edge-cloud
graphs with both hosts' agents here: over MQTT the lossless cache gives the same tokens). Decoding
is greedy, so each run differs by its input (day and time, question phrasing, the name), never by a
seed. Each check reads the answer the way a user would; the table shows the rate per set and the
JSON keeps every input and answer, so the checks can be audited.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import orjson
import torch

from agentmesh.files import write_atomic
from agentmesh.tasks.visit_task import (HOURS_SENTENCES, SYSTEM, Visit, clock, impossible_clock, verdict,
                                        write_visit_task)

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = ROOT / "graphs"

MONDAY = [
    "Can I visit the library at 10 am on Monday?",
    "Can I go to the library on Monday at 2 pm?",
    "Is the library open on Monday at 11 am?",
    "Could I drop by the library on Monday afternoon?",
    "Can I return a book at the library at 9:30 am on Monday?",
    "Will the library be open at 4 pm on Monday?",
    "Can I study at the library on Monday morning?",
    "Is it possible to visit the library at noon on Monday?",
    "Can I borrow a book at the library at 3 pm on Monday?",
    "Can I visit the Riverside library this Monday at 1 pm?",
    "Will I find the library open at 10:30 am on a Monday?",
    "Can I meet a friend at the library on Monday at 4 pm?",
]
OTHER_DAYS = [
    "Can I visit the library at 10 am on Tuesday?",
    "Is the library open on Friday at 11 am?",
    "Can I go to the library on Wednesday at 3 pm?",
    "Could I drop by the library on Thursday morning?",
    "Will the library be open at 4 pm on Saturday?",
    "Can I return a book at the library at 9:30 am on Sunday?",
]
WARRANTY = [
    "How long is the battery warranty?",
    "How long is the warranty on the battery pack?",
    "What warranty does the battery have?",
    "How many years of warranty does the battery pack get?",
    "What is the warranty period for the rover's battery?",
    "How long does the battery warranty last?",
    "What is the length of the battery pack warranty?",
    "For how long is the rover's battery covered by warranty?",
    "How long is the Kestrel R2 battery under warranty?",
    "Tell me the warranty period of the battery pack.",
]
# (what the user says, what they ask one turn later, the name, what it names)
NAMED = [
    ("My dog is called Rex.", "What is my dog called?", "Rex", "dog"),
    ("My sister's name is Priya.", "What is my sister's name?", "Priya", "sister"),
    ("My cat is named Miso.", "What is my cat's name?", "Miso", "cat"),
    ("My boss is called Mr. Okafor.", "What is my boss called?", "Okafor", "boss"),
    ("My best friend is named Lukas.", "Who is my best friend?", "Lukas", "friend"),
    ("I named my boat Seagull.", "What is the name of my boat?", "Seagull", "boat"),
    ("My teacher is called Mrs. Duarte.", "What is my teacher called?", "Duarte", "teacher"),
    ("My horse is named Thunder.", "What is my horse's name?", "Thunder", "horse"),
    ("My brother is called Kenji.", "What is my brother's name?", "Kenji", "brother"),
    ("My car is named Betsy.", "What did I name my car?", "Betsy", "car"),
]
# Asked only after the chat example's role was chosen: the inputs that role was never tuned on.
NAMED_NEW = [
    ("My parrot is called Kiwi.", "What is my parrot called?", "Kiwi", "parrot"),
    ("My grandmother's name is Ingrid.", "What is my grandmother's name?", "Ingrid", "grandmother"),
    ("My rabbit is named Clover.", "What is my rabbit's name?", "Clover", "rabbit"),
    ("My manager is called Mr. Haddad.", "What is my manager called?", "Haddad", "manager"),
    ("My neighbour is named Bruno.", "Who is my neighbour?", "Bruno", "neighbour"),
    ("I named my bike Arrow.", "What is the name of my bike?", "Arrow", "bike"),
    ("My doctor is called Dr. Lindqvist.", "What is my doctor called?", "Lindqvist", "doctor"),
    ("My goldfish is named Nemo.", "What is my goldfish's name?", "Nemo", "goldfish"),
    ("My cousin is called Aiko.", "What is my cousin's name?", "Aiko", "cousin"),
    ("My laptop is named Pixel.", "What did I name my laptop?", "Pixel", "laptop"),
]
OWN_NAMES_NEW = ["Hannah", "Arjun", "Yuki", "Piotr", "Leila", "Matteo", "Zainab", "Lucas", "Elena", "Ivan"]
OWN_NAMES = ["Alice", "Rahul", "Mei", "Tomasz", "Fatima", "Jonas", "Amara", "Diego", "Sofia", "Oleg"]
OWN_QUESTIONS = ["What is my name?", "Do you remember my name?", "What did I say my name was?"]


@dataclass
class Run:
    set: str
    input: str
    answer: str
    ok: bool     # what the example claims, read as a user would
    loose: bool  # the weaker reading (a "no" at all; the name anywhere in the answer)


def said_no(answer: str) -> bool:
    return verdict(answer) == "no"


def said_no_because_monday(answer: str) -> bool:
    """A no, with the Monday closure as the reason, and no impossible clock time ("17:00 AM")."""
    closure = re.search(r"closed (on|every) mondays?", answer.lower()) is not None
    return said_no(answer) and closure and not impossible_clock(answer)


def said_yes(answer: str) -> bool:
    return verdict(answer) == "yes"


def one_year(answer: str) -> bool:
    """The handbook's battery warranty (one year, or 12 months), and no other length for it."""
    a = answer.lower()
    right = re.search(r"\b(one|1)[- ]year|\b12[- ]months?\b", a) is not None
    other = re.search(r"\b(two|three|four|five|ten|[2-9]|1[0-9])[- ]years?\b|\b(?!12)\d+[- ]months?\b", a)
    return right and (other is None or "drive" in a)  # the drive train's three years may come along


def names(name: str) -> Callable[[str], bool]:
    return lambda answer: name.lower() in answer.lower()


def answers_with(name: str, noun: str) -> Callable[[str], bool]:
    """The name, given as that of the thing asked about ("Your dog is called Rex"), not of something
    else ("Mr. Okafor is a friendly and helpful AI assistant")."""
    return lambda answer: names(name)(answer) and noun in answer.lower()


def names_user(name: str) -> Callable[[str], bool]:
    """The user's own name, not taken by the assistant for its own ("I'm Alice") nor given to
    something else ("Oleg is a helpful AI assistant")."""
    n = re.escape(name.lower())
    other = re.compile(rf"\b(i'm|i am|my name is)\s+{n}\b|\b{n} is (a|an|the)\b")
    return lambda answer: names(name)(answer) and other.search(answer.lower()) is None


Check = Callable[[str], bool]


def run_graph_set(file: str, label: str, inputs: list[str], check: Check, loose: Check, output: str) -> list[Run]:
    from agentmesh.graph import load_graph
    from agentmesh.runtime import run_graph

    graph = load_graph(GRAPHS / file)
    runs = []
    for text in inputs:
        result = run_graph(graph, text).raise_for_error()
        answer = result[output].text
        runs.append(Run(label, text, answer, check(answer), loose(answer)))
        print(f"  [{label}] {text!r} -> {answer!r} {'ok' if runs[-1].ok else 'MISS'}", flush=True)
    return runs


def run_visit_set(label: str, n: int, *, cache: bool = True) -> list[Run]:
    """combined_reasoning with facts it was never shown: the visit task's test split (the graph's own
    place and question phrasings; hours, closing day and the day and time asked drawn anew), each
    visit's hours given to `hours` and its closing day to `closures` (`cache=False`: no `closures`
    and no cache edge, so the planner never reads the closing day)."""
    from agentmesh.graph import load_graph
    from agentmesh.runtime import run_graph

    test = write_visit_task(Path(tempfile.mkdtemp()), n_test=n)["test"]
    runs = []
    for row in map(orjson.loads, test.read_bytes().splitlines()):
        visit, question = Visit(**row["visit"]), row["question"]
        graph = load_graph(GRAPHS / "combined_reasoning.yaml")
        o, c = clock(visit.opens), clock(visit.closes)
        # The graph's own wording of the hours ("The Riverside library opens at 9 am and closes at 5 pm.").
        graph.agents["hours"].context = HOURS_SENTENCES[0].format(name=visit.name, place=visit.place, o=o, c=c)
        graph.agents["closures"].role = SYSTEM.format(name=visit.name, place=visit.place, day=visit.closed_day)
        if not cache:
            graph.edges = [e for e in graph.edges if e.sender != "closures"]
            del graph.agents["closures"]
        answer = run_graph(graph, question).raise_for_error()["planner"].text
        facts = f"open {o}-{c}, closed {visit.closed_day}s ({visit.case})"
        said_it = said_yes if visit.case == "open" else said_no
        runs.append(Run(label, f"{facts}: {question}", answer, visit.is_right(answer), said_it(answer)))
        print(f"  [{label}] {facts}: {question!r} -> {answer!r} {'ok' if runs[-1].ok else 'MISS'}", flush=True)
    return runs


def run_chat_set(label: str, turns: list[tuple[str, str, Check, Check]]) -> list[Run]:
    from agentmesh.graph import load_graph
    from agentmesh.runtime import ChatSession

    graph = load_graph(GRAPHS / "chat.yaml")
    runs = []
    for first, second, check, loose in turns:
        session = ChatSession(graph)
        session.send(first).raise_for_error()
        answer = session.send(second).raise_for_error()["assistant"].text
        runs.append(Run(label, f"{first} / {second}", answer, check(answer), loose(answer)))
        print(f"  [{label}] {first!r} then {second!r} -> {answer!r} {'ok' if runs[-1].ok else 'MISS'}", flush=True)
    return runs


def run_general_set(label: str) -> list[Run]:
    """chat on everyday questions with one short answer (the knowledge task's 30): what the chat
    example must keep answering whatever it is tuned for."""
    from agentmesh.graph import load_graph
    from agentmesh.runtime import ChatSession
    from agentmesh.tasks.knowledge_task import GENERAL_QUESTIONS

    graph = load_graph(GRAPHS / "chat.yaml")
    runs = []
    for question, expected in GENERAL_QUESTIONS:
        answer = ChatSession(graph).send(question).raise_for_error()["assistant"].text
        ok = expected.lower() in answer.lower()
        runs.append(Run(label, question, answer, ok, ok))
        print(f"  [{label}] {question!r} -> {answer!r} {'ok' if ok else 'MISS'}", flush=True)
    return runs


def own(names_: list[str]) -> list[tuple[str, str, Check, Check]]:
    return [(f"Hi, my name is {n}.", OWN_QUESTIONS[i % len(OWN_QUESTIONS)], names_user(n), names(n))
            for i, n in enumerate(names_)]


def named(rows: list[tuple[str, str, str, str]]) -> list[tuple[str, str, Check, Check]]:
    return [(a, b, answers_with(n, noun), names(n)) for a, b, n, noun in rows]


@dataclass(frozen=True)
class ExampleSet:
    key: str
    claim: str
    weaker: str | None  # what the weaker reading counts (None: there is none)
    run: Callable[[str], list[Run]]  # key -> its runs


SETS = (
    ExampleSet("combined_monday", "combined_reasoning, Monday visit: no + Monday closure", "a no",
        lambda k: run_graph_set("combined_reasoning.yaml", k, MONDAY, said_no_because_monday, said_no, "planner")),
    ExampleSet("combined_other", "combined_reasoning, other days: yes (control)", "a yes",
        lambda k: run_graph_set("combined_reasoning.yaml", k, OTHER_DAYS, said_yes, said_yes, "planner")),
    ExampleSet("combined_new_facts", "combined_reasoning, new facts: the right yes or no and reason", "the yes or no",
        lambda k: run_visit_set(k, 24)),
    ExampleSet("combined_new_facts_no_cache", "the same without the cache edge (control)", "the yes or no",
               lambda k: run_visit_set(k, 24, cache=False)),
    ExampleSet("edge_cloud", "edge_cloud (cache edge): battery warranty is one year", None,
        lambda k: run_graph_set("edge_cloud.yaml", k, WARRANTY, one_year, one_year, "assistant")),
    ExampleSet("edge_cloud_text", "edge_cloud_text (text edge): battery warranty is one year", None,
        lambda k: run_graph_set("edge_cloud_text.yaml", k, WARRANTY, one_year, one_year, "assistant")),
    ExampleSet("chat_named", "chat: a name from the turn before, as what was asked", "the name",
        lambda k: run_chat_set(k, named(NAMED))),
    ExampleSet("chat_own_name", "chat: the user's own name from the turn before", "the name",
        lambda k: run_chat_set(k, own(OWN_NAMES))),
    ExampleSet("chat_named_new", "chat, new conversations: a name, as what was asked", "the name",
        lambda k: run_chat_set(k, named(NAMED_NEW))),
    ExampleSet("chat_own_name_new", "chat, new conversations: the user's own name", "the name",
        lambda k: run_chat_set(k, own(OWN_NAMES_NEW))),
    ExampleSet("chat_general", "chat: everyday questions, the right answer", None, run_general_set),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/examples/success.json, "
                        "or success_partial.json (not tracked) with --only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a busy machine)")
    parser.add_argument("--only", nargs="+", metavar="PREFIX", help="only the sets whose name starts so "
                        "(combined, edge_cloud, chat, chat_general, ...)")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / "examples" / f"success{'_partial' if args.only else ''}.json"
    torch.set_num_threads(args.threads)

    from agentmesh.models import DEFAULT_MODEL, default_pool

    start = time.perf_counter()
    default_pool().get(DEFAULT_MODEL)
    load_s = time.perf_counter() - start
    print(f"loaded {DEFAULT_MODEL} in {load_s:.1f} s", flush=True)

    chosen = [st for st in SETS if not args.only or st.key.startswith(tuple(args.only))]
    runs = {st.key: st.run(st.key) for st in chosen}

    rows = []
    print(f"\n{'example and claim':<62} {'runs':>5} {'right':>6} {'weaker reading':>15}")
    for st in chosen:
        mine = runs[st.key]
        right, loose = sum(r.ok for r in mine), sum(r.loose for r in mine)
        rows.append({"set": st.key, "claim": st.claim, "runs": len(mine), "right": right,
                     "weaker_reading": st.weaker, "right_weaker": loose})
        shown = f"{loose}/{len(mine)} {st.weaker}" if st.weaker else "-"
        print(f"{st.claim:<62} {len(mine):>5} {right:>3}/{len(mine):<2} {shown:>15}")
    total_s = time.perf_counter() - start
    print(f"\nmodel loading {load_s:.0f} s, all runs {total_s - load_s:.0f} s")
    report = {"model": DEFAULT_MODEL, "decoding": "greedy", "threads": args.threads,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_s": round(load_s, 1),
              "runs_s": round(total_s - load_s, 1), "summary": rows,
              "runs": [asdict(r) for mine in runs.values() for r in mine]}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
