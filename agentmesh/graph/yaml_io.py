"""Pipeline files in and out.

Loading uses PyYAML's SafeLoader only (plain mappings, lists, strings, numbers: a pipeline file can
never construct Python objects or import code). The node tree is composed first so that every key
path keeps its line number; pydantic errors are mapped back to `FILE:LINE: key.path: message`.
Duplicate keys, which YAML loaders silently merge, are errors here.
"""
from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from agentmesh.errors import GraphError
from agentmesh.files import FileProblem, read_text_limited
from agentmesh.graph.source import KeyPath, SourceMap, did_you_mean, graph_error, one_line
from agentmesh.graph.spec import IDENT_HINT, IDENT_PATTERN, GraphSpec

_HIDDEN_KEYS = {"password"}  # fields that exist only to be rejected; never suggested


# Bounds on what a pipeline file may make the loader do, whatever it claims: its size, how deep its
# mappings and lists nest, and how many values it holds once aliases are expanded (a file of a few
# lines of nested aliases, "billion laughs", would otherwise expand to billions).
MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 64
MAX_NODES = 100_000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def read_yaml(path: str | Path) -> tuple[Any, SourceMap]:
    """Parse a YAML file safely; returns the data and the line of every key path."""
    file = str(path)
    try:
        text = read_text_limited(path, MAX_FILE_BYTES)
    except FileProblem as exc:
        raise GraphError(f"{file}: the pipeline file {exc}", hint="give the path of a YAML file") from None
    bad = _CONTROL.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise GraphError(f"{file}:{line}: control character U+{ord(bad.group()):04X} in the file",
                         hint="a pipeline file is plain text; write \\n or \\t escapes inside quotes") from None
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise GraphError(f"{file}: the file nests deeper than {MAX_DEPTH} levels") from None
        if node is None:
            raise GraphError(f"{file}:1: the file is empty", hint="a pipeline starts with version: 1, name: and agents:")
        _check_size(node, file)
        lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
        _index(node, (), lines, file)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = one_line(exc.problem or str(exc))
        if "constructor for the tag" in problem:
            raise GraphError(f"{file}:{line}: {problem}",
                             hint="pipeline files hold plain mappings, lists, strings and numbers only") from None
        raise GraphError(f"{file}:{line}: invalid YAML: {problem}",
                         hint="check the indentation, and quote values that contain ': ' or start with { [ * &") from None
    except yaml.YAMLError as exc:
        raise GraphError(f"{file}:1: invalid YAML: {one_line(str(exc))}") from None
    finally:
        loader.dispose()
    return data, SourceMap(file=file, lines=lines)


def _check_size(root: yaml.Node, file: str) -> None:
    """Fail unless `root` nests at most MAX_DEPTH deep and holds at most MAX_NODES values with its
    aliases expanded. An alias is the same node object as its anchor, so sizes are memoised per
    node and the walk costs the file's size, not the expansion's."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values under it, expanded; levels under it)

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise GraphError(f"{file}:{node.start_mark.line + 1}: the file nests deeper than {MAX_DEPTH} levels "
                             "(or an alias refers to itself)")
        if id(node) in sizes:
            size, height = sizes[id(node)]
            if depth + height > MAX_DEPTH:
                return walk_children(node, depth)
            return size, height
        sizes[id(node)] = result = walk_children(node, depth)
        return result

    def walk_children(node: yaml.Node, depth: int) -> tuple[int, int]:
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            return 1, 0
        size, height = 1, 0
        for child in children:
            s, h = walk(child, depth + 1)
            size, height = size + s, max(height, h + 1)
            if size > MAX_NODES:
                raise GraphError(f"{file}:{node.start_mark.line + 1}: the file holds more than {MAX_NODES:,} values "
                                 "once its aliases are expanded",
                                 hint="a pipeline file needs far fewer; write the values out instead of nesting aliases")
        return size, height

    walk(root, 0)


def _index(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], file: str) -> None:
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first and key != "<<":
                what = "agent name" if path == ("agents",) else "key"
                raise graph_error(SourceMap(file, {(*path, key): line}), (*path, key),
                                  f"duplicate {what} {key!r} (first on line {first[key]})",
                                  "each key may appear once in a mapping")
            first[key] = line
            lines[(*path, key)] = line
            _index(value_node, (*path, key), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _index(item, (*path, i), lines, file)


def spec_from_data(data: Any, where: SourceMap | str) -> GraphSpec:
    """Check plain data against the schema; the error names the key path (and line, given a SourceMap)."""
    try:
        return GraphSpec.model_validate(data)
    except ValidationError as exc:
        errors = [(_clean_loc(e["loc"]), e) for e in exc.errors()]
        if isinstance(where, SourceMap):
            # Report the problem nearest the top of the file, as a reader would meet it; a missing
            # key last, since it is often a misspelled key reported on its own line ("agent:").
            errors.sort(key=lambda pe: (pe[1]["type"] == "missing", where.line_of(pe[0])))
        path, err = errors[0]
        message, hint = _explain(path, err)
        raise graph_error(where, path, message, hint) from None


def load_spec(path: str | Path) -> tuple[GraphSpec, SourceMap]:
    data, source = read_yaml(path)
    return spec_from_data(data, source), source


def _clean_loc(loc: tuple[Any, ...]) -> KeyPath:
    # Dict-key errors end in "[key]"; validator wrappers add "function-..." steps. Neither is a key.
    return tuple(p for p in loc if not (isinstance(p, str) and (p == "[key]" or p.startswith("function-"))))


def _explain(path: KeyPath, err: dict[str, Any]) -> tuple[str, str | None]:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    message = str(err["msg"]).removeprefix("Value error, ")
    last = path[-1] if path else ""
    if "agentmesh_hint" in ctx:
        return message, ctx["agentmesh_hint"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(path[:-1])
        return f"unknown key {last!r}", (did_you_mean(str(last), allowed)
                                          or (f"allowed keys: {', '.join(allowed)}" if allowed else None))
    if kind == "missing":
        return f"missing required key {last!r}", None
    if kind == "literal_error":
        if path == ("version",):
            return message, "this agentmesh reads pipeline files with version: 1"
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return message, did_you_mean(str(value), expected) if isinstance(value, str) else None
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == IDENT_PATTERN:
        return f"{value!r} is not a valid name", IDENT_HINT
    if kind.startswith("int_"):
        return message, "write a whole number, e.g. 128"
    if kind.startswith("float_"):
        return message, "write a number, e.g. 0.7"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        if path == ():
            return "a pipeline file must be a mapping", "start with version: 1, name: ... and agents:"
        return message, "write key: value lines indented under this key"
    if kind == "list_type":
        return message, "write a list: one '- item' per line, or [a, b]"
    if kind == "too_short" and path == ("agents",):
        return "no agents declared", "declare at least one agent under agents:"
    if kind == "string_type":
        return message, "quote the value to make it text" if value is not None else None
    return message, None


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else next(
                (a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), args[0])
        else:
            return tp


def _allowed_keys(path: KeyPath) -> list[str]:
    """The keys the schema allows in the mapping at `path` (for did-you-mean hints)."""
    tp: Any = GraphSpec
    for part in path:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {(f.alias or n): f for n, f in tp.model_fields.items()}
            if part not in fields:
                return []
            tp = fields[part].annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items() if n not in _HIDDEN_KEYS]
    return []


class _Dumper(yaml.SafeDumper):
    pass


class _Flow(dict):  # type: ignore[type-arg]
    """A mapping written on one line (edges)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Multi-line text (HTML context, prompts) reads best as a literal block.
    # Whitespace-only text with newlines (stop strings) reads best escaped: "\n\n".
    style = "|" if "\n" in value.strip() else ('"' if "\n" in value else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    # Short lists of names or stop strings read best on one line: outputs: [writer, critic].
    flow = all(isinstance(v, str) and "\n" not in v.strip() and len(v) < 40 for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_Dumper.add_representer(str, _str)
_Dumper.add_representer(list, _list)
_Dumper.add_representer(_Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))


def spec_to_data(spec: GraphSpec) -> dict[str, Any]:
    """Plain data for a spec, defaults left out (edges always say their type)."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if spec.edges:
        data["edges"] = [_Flow({"from": e.sender, "to": e.receiver, "type": e.type,
                                **spec.edges[i].model_dump(mode="json", include={"mode", "fuser"}, exclude_none=True)})
                         for i, e in enumerate(spec.edges)]
    return data


def dump_spec(spec: GraphSpec) -> str:
    """YAML text for a spec; loading it gives an equal spec."""
    return yaml.dump(spec_to_data(spec), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100,
                     default_flow_style=False)


__all__ = ["read_yaml", "spec_from_data", "load_spec", "dump_spec", "spec_to_data"]
