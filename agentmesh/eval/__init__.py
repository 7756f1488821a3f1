"""Evaluation: datasets, prompts, answer extraction, the compared methods, metrics and reports.

Importing this package loads no model and no plotting library; `agentmesh.eval.adapters` is
the only module that runs models, `agentmesh.eval.report` the only one that draws.
"""
from agentmesh.tasks.datasets import DatasetConfig, Item, load_items, load_jsonl
from agentmesh.eval.extract import extract_letter, extract_number, grade
from agentmesh.eval.methods import (
    CacheGeneration, CacheGenerator, CacheToCache, Generator, Method, MethodOutput, Prefix, ReceiverOnly,
    SharerOnly, TextToText)
from agentmesh.eval.metrics import ItemResult, MethodSummary, Summary, summarize, wilson_interval
from agentmesh.eval.runner import EvalConfig, evaluate, load_config

__all__ = [
    "CacheGeneration", "CacheGenerator", "CacheToCache", "DatasetConfig", "EvalConfig", "Generator", "Item",
    "ItemResult", "Method", "MethodOutput", "MethodSummary", "Prefix", "ReceiverOnly", "SharerOnly", "Summary",
    "TextToText", "evaluate", "extract_letter", "extract_number", "grade", "load_config", "load_items",
    "load_jsonl", "summarize", "wilson_interval",
]
