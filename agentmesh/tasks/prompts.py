"""Prompts of every evaluation method, as chat messages.

The multiple-choice prompt and the text-to-text background prompt are the published ones
(those of the C2C paper's evaluation), word for word; the others (numeric, short answer, passages) are ours. Training data
for the context task (`training_messages`) uses the same receiver prompts, so a fuser is trained
on exactly what it is evaluated on.
"""
from __future__ import annotations

from typing import Sequence

from agentmesh.tasks.datasets import LETTERS, Item
from agentmesh.types import Messages


# The published multiple-choice prompt, one user turn; for 4 choices "{letters}" is "A/B/C/D" as published.
MC_TEMPLATE = (
    "Accurately answer the following question:\n\n{question}\n\nChoices:\n{choices}\n\n"
    "Instructions:\n"
    "- Carefully read the question and all options.\n"
    "- Select the single most correct answer.\n"
    "- Respond ONLY in the following format: \"The correct answer is {letters}\".\n"
    "- Do not include any explanations, additional text, or punctuation besides the answer.\n\n"
    "The correct answer is"
)
# What the sharer is asked in the published text-to-text baseline.
BACKGROUND_TEMPLATE = (
    "In one clear sentence, describe the most essential background knowledge needed to answer "
    "the question:\n\n{question}\n\nDo NOT directly solve or give answer to the question."
)
# Ours: the sharer of the context task holds the passage the answer is in, so it is asked to pass
# the relevant fact on rather than general knowledge.
PASSAGE_BACKGROUND_TEMPLATE = (
    "{preamble}In one clear sentence, state the information from the passage that is needed to "
    "answer the question:\n\n{question}\n\nDo NOT add anything that is not in the passage."
)
NUMERIC_TEMPLATE = (
    "Solve the following problem step by step.\n\n{question}\n\n"
    "At the end, give the final answer as 'The answer is N', where N is a number."
)
SHORT_TEMPLATE = (
    "Answer the following question with a short phrase (a name, a place or a thing), nothing else.\n\n"
    "Question: {question}"
)
WITH_BACKGROUND_TEMPLATE = "Background knowledge from another assistant:\n{background}\n\n{prompt}"
PASSAGE_PREAMBLE = "Passage:\n{passage}\n\n"


def format_choices(choices: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def mc_prompt(question: str, choices: Sequence[str]) -> str:
    """The published multiple-choice prompt."""
    return MC_TEMPLATE.format(question=question, choices=format_choices(choices),
                              letters="/".join(LETTERS[:len(choices)]))


def numeric_prompt(question: str) -> str:
    return NUMERIC_TEMPLATE.format(question=question)


def short_answer_prompt(question: str) -> str:
    return SHORT_TEMPLATE.format(question=question)


def question_prompt(item: Item) -> str:
    """The question as the receiver sees it (no passage)."""
    if item.kind == "mc":
        return mc_prompt(item.question, item.choices or ())
    if item.kind == "numeric":
        return numeric_prompt(item.question)
    return short_answer_prompt(item.question)


def passage_preamble(passage: str) -> str:
    """The text a sharer reads before the shared prompt when it holds a private passage.

    C2C feeds it to the sharer ahead of the fused span; `prefix` and the sharer alone read it at
    the start of their user turn. Fuser training must use the same text.
    """
    return PASSAGE_PREAMBLE.format(passage=passage.strip())


def with_passage(item: Item) -> str:
    """The question prompt preceded by the item's passage (the prompt itself if it has none)."""
    prompt = question_prompt(item)
    return passage_preamble(item.context) + prompt if item.context else prompt


def background_prompt(item: Item) -> str:
    """What the sharer is asked in text-to-text: the published prompt, or its passage variant."""
    if item.context:
        return PASSAGE_BACKGROUND_TEMPLATE.format(preamble=passage_preamble(item.context), question=item.question)
    return BACKGROUND_TEMPLATE.format(question=item.question)


def with_background(item: Item, background: str) -> str:
    """The receiver's prompt in text-to-text: the sharer's background, then the full question."""
    return WITH_BACKGROUND_TEMPLATE.format(background=background.strip(), prompt=question_prompt(item))


def user(content: str) -> Messages:
    return [{"role": "user", "content": content}]


def receiver_messages(item: Item) -> Messages:
    return user(question_prompt(item))


def sharer_messages(item: Item) -> Messages:
    """The sharer answering alone, with its passage if it holds one."""
    return user(with_passage(item))


def background_messages(item: Item) -> Messages:
    return user(background_prompt(item))


def receiver_background_messages(item: Item, background: str) -> Messages:
    return user(with_background(item, background))


def gold_response(item: Item) -> str:
    """The assistant reply that counts as a perfect answer (training target of the context task)."""
    if item.kind == "mc":
        return f"The correct answer is {item.answer}"
    if item.kind == "numeric":
        return f"The answer is {item.answer}"
    return item.answer


def training_messages(item: Item) -> Messages:
    """Receiver prompt (no passage) and the gold reply, for fuser training on the context task."""
    return receiver_messages(item) + [{"role": "assistant", "content": gold_response(item)}]
