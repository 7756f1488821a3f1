"""Fuser training: the recipe, its data, the loss, resumable state and the loop (`agentmesh train`)."""
from agentmesh.c2c.train.data import (
    IGNORE_INDEX, Batch, ChatRow, Example, chat_row, collate, data_fingerprint, load_rows,
    prepend_context, shard, stream_rows, tokenize_rows,
)
from agentmesh.c2c.train.driver import drive, lr_factor, plot_loss_curve
from agentmesh.c2c.train.loop import FUSER_DIR, TrainResult, cast_fuser, train
from agentmesh.c2c.train.loss import batch_loss, checkpointed_projectors, held_out_loss
from agentmesh.c2c.train.recipe import (
    ContextTaskRecipe, DataRecipe, InitRecipe, ProjectorRecipe, RunRecipe, TrainRecipe,
)
from agentmesh.c2c.train.state import TrainState

__all__ = [
    "FUSER_DIR", "IGNORE_INDEX", "Batch", "ChatRow", "ContextTaskRecipe", "DataRecipe", "Example", "InitRecipe",
    "ProjectorRecipe", "RunRecipe", "TrainRecipe", "TrainResult", "TrainState", "batch_loss", "cast_fuser", "chat_row",
    "checkpointed_projectors", "collate", "data_fingerprint", "drive", "held_out_loss", "load_rows", "lr_factor",
    "plot_loss_curve", "prepend_context", "shard", "stream_rows", "tokenize_rows", "train",
]
