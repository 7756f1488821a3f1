"""Combined reasoning: two senders, one receiver (graphs/combined_reasoning.yaml).

`hours` knows the library's opening hours and tells the planner in one sentence (text edge);
`closures` knows the closing day and hands the planner its KV cache (cache edge, prefix mode), so
the planner has read that fact without it ever being written out. The planner (the embedded model
plus the visit adapter, adapters/smollm2_visit_planner) writes both facts out, then yes or no:
asked about a Monday visit it answers no for the closure (README, "The other examples, measured").

The graph is also built here in Python, to show the API next to the YAML:

    python examples/combined_reasoning.py [--max-new-tokens 40] [--question "..."]
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import agentmesh
from agentmesh.graph import Graph, load_graph, validate_graph
from agentmesh.models import default_pool
from agentmesh.runtime import AgentFinished, RunFinished, Token
from agentmesh.units import human_bytes

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = ROOT / "graphs"


def build(max_new_tokens: int) -> Graph:
    """The same pipeline as graphs/combined_reasoning.yaml, in Python."""
    g = Graph("combined_reasoning")
    g.input("input", "Can I visit the library at 10 am on Monday?")
    smol = g.model("smol", "smollm2-135m-instruct")
    # The planner's model is the base plus the visit adapter; the cache it continues from is read with it too.
    tuned = g.model("planner", "smollm2-135m-instruct", adapter=ROOT / "adapters" / "smollm2_visit_planner")
    hours = g.agent("hours", model=smol, role="You answer in one short sentence.",
                    context="The Riverside library opens at 9 am and closes at 5 pm.",
                    prompt="When does the library open and close?", max_new_tokens=min(32, max_new_tokens))
    closures = g.agent("closures", model=tuned, role="You are the assistant of the Riverside library. "
                                        "Rule: the library is closed every Monday.")
    planner = g.agent("planner", model=tuned,
                      prompt="{hours}\n\nQuestion: {input}\nGive the facts, then answer yes or no.",
                      max_new_tokens=max_new_tokens)
    g.text(hours, planner)
    g.cache(closures, planner, mode="prefix")
    validate_graph(g)
    return g


async def run(graph: Graph, question: str | None) -> None:
    pool = default_pool()
    started = time.perf_counter()
    model = graph.model_of("planner")
    await asyncio.to_thread(pool.get, model.ref, dtype=model.dtype, device=model.device, adapter=model.adapter)
    print(f"loaded {model.ref} in {time.perf_counter() - started:.1f} s\n")
    streaming = None
    async for event in agentmesh.stream(graph, question, pool=pool):
        if isinstance(event, Token):
            if streaming != event.agent:
                print(("\n" if streaming else "") + f"[{event.agent}] ", end="")
                streaming = event.agent
            print(event.text, end="", flush=True)
        elif isinstance(event, AgentFinished) and event.result.work != "decode":
            print(("\n" if streaming else "") + f"({event.agent} read {event.result.prompt_tokens} tokens; "
                  "the planner continues from that cache)")
            streaming = None
        elif isinstance(event, RunFinished):
            result = event.result.raise_for_error()
            print("\n")
            for name, r in result.items():
                print(f"  {name:<9} {r.latency_s:6.2f} s  ({r.work}, read {r.prompt_tokens}, "
                      f"prefilled {r.prefilled_tokens}, wrote {r.tokens} tokens)")
            for edge, n in result.bytes_by_edge().items():
                print(f"  edge {edge} [{result.trace.edges[edge].label}] carried {human_bytes(n)}")
            print(f"  total {result.latency_s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=56)
    parser.add_argument("--question", default=None, help="default: the graph's input")
    args = parser.parse_args()
    graph = build(args.max_new_tokens)
    yaml_graph = load_graph(GRAPHS / "combined_reasoning.yaml")
    assert [e.label for e in graph.edges] == [e.label for e in yaml_graph.edges]
    same = lambda a: (a.role, a.context, a.prompt)  # noqa: E731
    assert all(same(a) == same(yaml_graph.agents[n]) for n, a in graph.agents.items()), "out of step with the YAML"
    assert all(graph.model_of(n) == yaml_graph.model_of(n) for n in graph.agents), "models out of step with the YAML"
    asyncio.run(run(graph, args.question))


if __name__ == "__main__":
    main()
