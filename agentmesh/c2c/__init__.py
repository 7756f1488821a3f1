"""Cache-to-Cache fusion: projectors, layer maps, fusers, alignment, checkpoints and training."""
from agentmesh.c2c.fuser import Fuser, FuserConfig, Route, SharerSpan, fuse
from agentmesh.c2c.layer_map import LAYER_MAPS, layer_map
from agentmesh.c2c.model import C2CModel, SharerInput
from agentmesh.c2c.projector import C2CProjector
from agentmesh.c2c.registry import build_projector, projector_class, register_projector

__all__ = [
    "C2CModel", "C2CProjector", "Fuser", "FuserConfig", "LAYER_MAPS", "Route", "SharerInput", "SharerSpan",
    "build_projector", "fuse", "layer_map", "projector_class", "register_projector",
]
