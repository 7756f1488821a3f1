"""Programmer and writer: the same task through a text edge and through a cache edge.

The programmer holds an HTML page skeleton as private context; the writer must write the paragraph
that goes into <p id="intro">.

* text edge (graphs/programmer_writer_text.yaml): the programmer reads the page and writes a short
  note; the writer gets only that note, as text, in its prompt.
* cache edge (graphs/programmer_writer.yaml, mode prefix): the writer runs the same model and
  continues from the programmer's KV cache, so it has "read" the whole page without a word of
  text passing between them and without prefilling the page again.

Runs offline on the embedded model (SmolLM2-135M-Instruct):

    python examples/programmer_writer.py [--max-new-tokens 48]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import agentmesh
from agentmesh.graph import Graph
from agentmesh.models import default_pool
from agentmesh.runtime import RunResult
from agentmesh.units import human_bytes

GRAPHS = Path(__file__).resolve().parent.parent / "graphs"
CHANNELS = (("text edge", "programmer_writer_text.yaml"), ("cache edge (prefix)", "programmer_writer.yaml"))


def load(name: str, max_new_tokens: int) -> Graph:
    graph = Graph.from_yaml(GRAPHS / name)
    for agent in graph.agents.values():
        agent.max_new_tokens = min(agent.max_new_tokens, max_new_tokens)
    return graph


def report(label: str, result: RunResult) -> None:
    print(f"\n=== {label} ===")
    for name, r in result.items():
        if r.work == "decode":
            print(f"[{name}] {r.text}")
    for name, r in result.items():
        read = f"read {r.prompt_tokens} tokens (prefilled {r.prefilled_tokens})"
        made = f", wrote {r.tokens} tokens" if r.work == "decode" else ""
        print(f"  {name:<11} {r.latency_s:6.2f} s  {read}{made}")
    for edge, n in result.bytes_by_edge().items():
        kind = result.trace.edges[edge].label if result.trace else ""
        print(f"  edge {edge} [{kind}] carried {human_bytes(n)}")
    print(f"  total {result.latency_s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    pool = default_pool()
    graphs = [(label, load(name, args.max_new_tokens)) for label, name in CHANNELS]
    model = graphs[0][1].model_of("writer")
    started = time.perf_counter()
    pool.get(model.ref, dtype=model.dtype, device=model.device)  # load once, outside the timings
    print(f"loaded {model.ref} in {time.perf_counter() - started:.1f} s")

    results = []
    for label, graph in graphs:
        result = agentmesh.run(graph, pool=pool).raise_for_error()
        report(label, result)
        results.append((label, result))

    print("\n=== comparison ===")
    for label, result in results:
        moved = sum(result.bytes_by_edge().values())
        print(f"  {label:<20} latency {result.latency_s:6.2f} s   bytes moved {human_bytes(moved):>9}   "
              f"writer read {result['writer'].prompt_tokens} tokens, prefilled {result['writer'].prefilled_tokens}")
    print("  (a cache edge moves float KV tensors in memory; over a network link the codec can send them as "
          "bf16 or int8)")


if __name__ == "__main__":
    main()
