"""Generate the context-transfer task: a private passage for the sharer, a question for the receiver.

    python examples/make_context_task.py data/context            # short answers
    python examples/make_context_task.py data/context_mc --mc    # 4-choice variant

Seeded and offline; train and test share no entity, value or fact. Same as
`agentmesh make-context-task` when the eval commands are mounted in the main CLI.
"""
from __future__ import annotations

import argparse

from agentmesh.tasks.context_task import write_context_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--mc", action="store_true", help="4-choice multiple choice instead of short answers")
    parser.add_argument("--min-facts", type=int, default=3, help="fewest facts per passage")
    parser.add_argument("--max-facts", type=int, default=6, help="most facts per passage")
    args = parser.parse_args()
    paths = write_context_task(args.out_dir, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                               multiple_choice=args.mc, min_facts=args.min_facts, max_facts=args.max_facts)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
