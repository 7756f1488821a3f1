"""Task data below both training and evaluation: items and their loaders (local JSONL in known
shapes, Hugging Face datasets), the generated context-transfer task, and the prompts built from an
item. A fuser is trained and evaluated on the same prompts because both read them from here."""
from agentmesh.tasks.datasets import LETTERS, DatasetConfig, Item, load_items, load_jsonl

__all__ = ["LETTERS", "DatasetConfig", "Item", "load_items", "load_jsonl"]
