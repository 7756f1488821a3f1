"""Programmer and writer: the same task through a text edge and through a cache edge.

The programmer holds an HTML landing page as private context; the writer must write the paragraph
that goes into <p id="intro"> and name the page's business in it.

* text edge (graphs/programmer_writer_text.yaml): the programmer reads the page and writes a one-
  sentence note; the writer gets only that note, as text, in its prompt.
* cache edge (graphs/programmer_writer.yaml, mode prefix): the writer runs the same model and
  continues from the programmer's KV cache, so it has "read" the whole page without a word of
  text passing between them and without prefilling the page again.

Each answer is checked: is the text inside a <p id="intro"> element, and does that element name
the business? Runs offline on the embedded model (SmolLM2-135M-Instruct):

    python examples/programmer_writer.py                 # the shipped page, both edges
    python examples/programmer_writer.py --pages 20      # 20 generated pages per edge: success rates
"""
from __future__ import annotations

import argparse
import html
import re
import time
from dataclasses import dataclass
from pathlib import Path

import agentmesh
from agentmesh.graph import Graph, load_graph
from agentmesh.models import default_pool
from agentmesh.runtime import RunResult
from agentmesh.units import human_bytes

GRAPHS = Path(__file__).resolve().parent.parent / "graphs"
CHANNELS = (("text edge", "programmer_writer_text.yaml"), ("cache edge (prefix)", "programmer_writer.yaml"))
SHIPPED_BUSINESS = "Brightbean Coffee"

# (name, what it offers, two things on its list, street): the pages of --pages N.
BUSINESSES = (
    ("Brightbean Coffee", "Menu", ("Espresso", "Oat latte"), "12 Harbour Street"),
    ("Crumb & Crust Bakery", "Bread", ("Sourdough loaf", "Rye rolls"), "4 Mill Lane"),
    ("Spokeworks Bike Repair", "Services", ("Puncture repair", "Brake tuning"), "88 Canal Road"),
    ("Dog-Eared Books", "Shelves", ("Used novels", "Poetry"), "3 Market Square"),
    ("Lotus Flow Yoga", "Classes", ("Morning flow", "Gentle yoga"), "21 Elm Avenue"),
    ("Petal & Stem Florist", "Bouquets", ("Spring tulips", "Wedding roses"), "7 Garden Row"),
    ("Bright Smile Dental", "Treatments", ("Check-ups", "Teeth cleaning"), "150 High Street"),
    ("Fluffy Paws Grooming", "Services", ("Bath and brush", "Nail trim"), "9 Willow Way"),
    ("Nuts & Bolts Hardware", "Aisles", ("Hand tools", "Paint"), "60 Station Road"),
    ("Fornello Pizzeria", "Menu", ("Margherita", "Calzone"), "14 Olive Street"),
    ("Fine Thread Tailors", "Services", ("Alterations", "Made-to-measure suits"), "2 Button Lane"),
    ("Treble Clef Music School", "Lessons", ("Piano", "Guitar"), "33 Chord Street"),
    ("Sharp Edge Barbers", "Cuts", ("Skin fade", "Beard trim"), "5 Razor Road"),
    ("Greenhouse Plant Nursery", "Plants", ("Herbs", "Fruit trees"), "77 Meadow Lane"),
    ("Suds Laundromat", "Services", ("Self-service wash", "Ironing"), "19 Bubble Street"),
    ("Wind-Up Toy Store", "Toys", ("Wooden trains", "Puzzles"), "11 Carousel Court"),
    ("Summit Climbing Gym", "Walls", ("Bouldering", "Top rope"), "40 Quarry Road"),
    ("Jade Leaf Tea House", "Teas", ("Green tea", "Oolong"), "8 Lantern Alley"),
    ("Sparkle Car Wash", "Packages", ("Basic wash", "Full valet"), "101 Motor Way"),
    ("Ink Spot Print Shop", "Services", ("Business cards", "Posters"), "25 Paper Street"),
)


def page_html(name: str, heading: str, items: tuple[str, str], street: str) -> str:
    """A landing page in the shape of graphs/assets/landing_page.html, for another business."""
    e = html.escape
    li = "".join(f"<li>{e(i)}</li>" for i in items)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <title>{e(name)}</title>
</head>
<body>
  <header>
    <h1 id="title">{e(name)}</h1>
    <nav><a href="#offer">{e(heading)}</a> <a href="#visit">Visit us</a></nav>
  </header>
  <main>
    <!-- The writer fills this paragraph: two friendly sentences about the business. -->
    <p id="intro"></p>
    <section id="offer"><h2>{e(heading)}</h2><ul>{li}</ul></section>
    <section id="visit"><h2>Visit us</h2><p>{e(street)}, open 9:00 to 18:00.</p></section>
  </main>
</body>
</html>
"""


@dataclass(frozen=True)
class Check:
    in_element: bool      # the answer has a non-empty <p id="intro"> element
    names_business: bool  # ... and that element names the business

    @property
    def ok(self) -> bool:
        return self.in_element and self.names_business


_INTRO = re.compile(r"<p\s+id\s*=\s*[\"']intro[\"']\s*>(.*?)(?:</p>|$)", re.S | re.I)


def check_intro(text: str, business: str) -> Check:
    """Whether `text` fills <p id="intro"> and that paragraph names `business` (case-insensitive;
    an unclosed element counts up to the end of the text)."""
    m = _INTRO.search(text)
    inner = html.unescape(m.group(1)).strip() if m else ""
    return Check(bool(inner), bool(inner) and business.lower() in inner.lower())


def load(name: str, max_new_tokens: int | None = None) -> Graph:
    graph = load_graph(GRAPHS / name)
    if max_new_tokens is not None:
        for agent in graph.agents.values():
            agent.max_new_tokens = min(agent.max_new_tokens, max_new_tokens)
    return graph


def with_page(graph: Graph, page: str) -> Graph:
    """The same pipeline with another page as the programmer's private context."""
    programmer = graph.agents["programmer"]
    programmer.context, programmer.context_file = page, None
    return graph


def report(label: str, result: RunResult, check: Check) -> None:
    print(f"\n=== {label} ===")
    for name, r in result.items():
        if r.work == "decode":
            print(f"[{name}] {r.text}")
    verdict = "yes" if check.ok else ("no: the paragraph does not name the business" if check.in_element
                                      else "no: no filled <p id=\"intro\"> element")
    print(f"  on topic (fills <p id=\"intro\"> and names {SHIPPED_BUSINESS}): {verdict}")
    for name, r in result.items():
        read = f"read {r.prompt_tokens} tokens (prefilled {r.prefilled_tokens})"
        made = f", wrote {r.tokens} tokens" if r.work == "decode" else ""
        print(f"  {name:<11} {r.latency_s:6.2f} s  {read}{made}")
    for edge, n in result.bytes_by_edge().items():
        kind = result.trace.edges[edge].label if result.trace else ""
        print(f"  edge {edge} [{kind}] carried {human_bytes(n)}")
    print(f"  total {result.latency_s:.2f} s")


def rates(pool: object, n: int) -> None:
    """Both edges on `n` generated pages; print each page's verdict and the success rates."""
    from agentmesh.eval.metrics import wilson_interval

    for label, name in CHANNELS:
        ok = element = 0
        started = time.perf_counter()
        for i, (business, heading, items, street) in enumerate(BUSINESSES[:n], 1):
            graph = with_page(load(name), page_html(business, heading, items, street))
            text = agentmesh.run(graph, pool=pool).raise_for_error()["writer"].text
            c = check_intro(text, business)
            ok, element = ok + c.ok, element + c.in_element
            print(f"  {label} {i:>2}/{n} {'ok ' if c.ok else 'NO '} {business:<26} {' '.join(text.split())[:100]}",
                  flush=True)
        lo, hi = wilson_interval(ok, n)
        print(f"{label}: on topic {ok}/{n} ({ok / n:.0%}, 95 % CI {lo:.0%}-{hi:.0%}); in the element {element}/{n}; "
              f"{(time.perf_counter() - started) / n:.1f} s a page\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap every agent's answer length")
    parser.add_argument("--pages", type=int, default=0, help=f"measure on N generated pages (1-{len(BUSINESSES)})")
    args = parser.parse_args()

    pool = default_pool()
    graphs = [(label, load(name, args.max_new_tokens)) for label, name in CHANNELS]
    model = graphs[0][1].model_of("writer")
    started = time.perf_counter()
    pool.get(model.ref, dtype=model.dtype, device=model.device)  # load once, outside the timings
    print(f"loaded {model.ref} in {time.perf_counter() - started:.1f} s")
    if args.pages:
        rates(pool, max(1, min(args.pages, len(BUSINESSES))))
        return

    results = []
    for label, graph in graphs:
        result = agentmesh.run(graph, pool=pool).raise_for_error()
        report(label, result, check_intro(result["writer"].text, SHIPPED_BUSINESS))
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
