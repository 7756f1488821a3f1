"""Reading a settings file (recipe, eval config) as plain YAML, with one-line errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agentmesh.errors import ConfigError


def read_yaml(path: str | Path, what: str) -> Any:
    """The data of the YAML file at `path` (safe_load: never Python objects); `what` names the
    file's role in errors, e.g. "recipe 'x.yaml' does not exist"."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
