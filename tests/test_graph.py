"""Graph builder, pipeline schema and validation, YAML round trips, views and the `graph` CLI."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest
from typer.testing import CliRunner

from agentmesh.errors import ConfigError, GraphError
from agentmesh.graph import (Agent, Edge, Graph, GraphSpec, describe, dump_spec, load_graph, load_spec, mermaid,
                             validate_graph)
from agentmesh.graph.cli import app
from agentmesh.graph.template import placeholders, render

ROOT = Path(__file__).resolve().parents[1]
GRAPH_FILES = sorted((ROOT / "graphs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def load_error(path: Path, **kw) -> GraphError:
    with pytest.raises(GraphError) as info:
        load_graph(path, **kw)
    return info.value


# ---------------------------------------------------------------------------------------------
# Builder API


def test_builder_structure_and_queries():
    g = Graph(name="site")
    p = g.agent("programmer", context="<p id='intro'></p>", role="You are a programmer.", max_new_tokens=16)
    c = g.agent("critic", prompt="Check: {input}")
    w = g.agent("writer", prompt="{critic}\n{input}", stop="\n\n")
    assert isinstance(p, Agent) and p.context.startswith("<p")
    e1 = g.cache(p, w, mode="prefix")
    e2 = g.text(c, "writer")
    assert isinstance(e1, Edge) and e1.is_prefix and not e1.is_fuse and e2.is_text
    validate_graph(g)

    assert [a.name for a in g.order()] == ["programmer", "critic", "writer"]
    assert g.sharers_of(w) == [p] and g.prefix_of(w) is p and g.prefix_of(c) is None
    assert g.text_inputs_of("writer") == [c]
    assert g.sinks() == [w] and g.output_agents() == [w]
    assert {a.name for a in g.sources()} == {"programmer", "critic"}
    assert isinstance(g.nx, nx.DiGraph)
    assert set(g.nx.edges) == {("programmer", "writer"), ("critic", "writer")}
    assert g.nx.edges["programmer", "writer"]["edge"] == e1
    assert w.stop == ("\n\n",)
    assert w.generation() == {"max_new_tokens": 128, "do_sample": False, "stop": ["\n\n"]}
    hot = g.agent("hot", temperature=0.7, top_p=0.9)
    assert hot.generation() == {"max_new_tokens": 128, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert g.model_of(p).ref == "smollm2-135m-instruct"


def test_builder_rejects_duplicates_unknown_agents_and_bad_names():
    g = Graph(name="g")
    g.agent("a")
    with pytest.raises(GraphError, match="duplicate agent name 'a'"):
        g.agent("a")
    with pytest.raises(GraphError, match=r"unknown agent 'wrtier'.*did you mean 'writer'"):
        g.agent("writer")
        g.text("a", "wrtier")
    with pytest.raises(GraphError, match="not a valid name"):
        g.agent("9lives")
    with pytest.raises(GraphError, match="unknown cache mode"):
        g.cache("a", "writer", mode="copy")  # type: ignore[arg-type]


def test_builder_validation_errors_name_key_path():
    g = Graph(name="demo")
    a, b = g.agent("a"), g.agent("b")
    g.cache(a, b, mode="prefix")
    g.cache(b, a, mode="prefix")
    with pytest.raises(GraphError) as info:
        validate_graph(g)
    assert str(info.value).startswith("graph 'demo': edges[0]: cycle a -> b -> a")
    with pytest.raises(GraphError, match="cycle"):
        g.order()

    g2 = Graph(name="demo")
    g2.agent("a", max_new_tokens=0)
    with pytest.raises(GraphError, match=r"graph 'demo': agents\.a\.max_new_tokens: .*greater than or equal to 1"):
        validate_graph(g2)


def test_prompts_inputs_and_templates():
    g = Graph(name="g")
    g.input("topic", "coffee")
    s = g.agent("summary")
    w = g.agent("writer")
    g.text(s, w)
    assert g.prompt_template_of(w) == "summary wrote:\n{summary}\n\n{input}"
    values = g.resolve_inputs("Write the intro")
    assert values == {"topic": "coffee", "input": "Write the intro"}
    assert g.render_prompt(w, values, {"summary": "A cafe page."}) == "summary wrote:\nA cafe page.\n\nWrite the intro"
    assert g.resolve_inputs({"input": "x", "topic": "tea"})["topic"] == "tea"
    with pytest.raises(GraphError, match="has no input 'topc'.*did you mean 'topic'"):
        g.resolve_inputs({"topc": "tea"})
    with pytest.raises(GraphError, match=r"no value for input \{input\}"):
        g.resolve_inputs(None)
    # Only {identifier} is a placeholder: JSON and code braces pass through; {{ }} escape.
    t = 'Return {"a": 1} for {input} {{input}} {my-agent}'
    assert placeholders(t) == ["input", "my-agent"]
    assert render(t, {"input": "X", "my-agent": "Y"}) == 'Return {"a": 1} for X {input} Y'
    with pytest.raises(GraphError, match=r"placeholder \{input\} has no value"):
        render("{input}", {})


def test_running_is_the_runtimes_job():
    # A graph describes a pipeline; agentmesh.run/arun/stream are the runtime's functions.
    import agentmesh
    from agentmesh.runtime import scheduler

    assert (agentmesh.run, agentmesh.arun, agentmesh.stream) == (
        scheduler.run_graph, scheduler.arun_graph, scheduler.stream_graph)
    assert agentmesh.ChatSession is importlib.import_module("agentmesh.runtime.session").ChatSession
    assert not any(hasattr(Graph, name) for name in ("run", "arun", "stream", "chat"))


def test_broker_config_reads_password_from_environment(monkeypatch):
    g = Graph(name="g")
    g.agent("a")
    b = g.set_broker("mqtts://broker.local", username="mesh", password_env="MESH_PW", tls=True)
    assert (b.host, b.port, b.secure) == ("broker.local", 8883, True)
    monkeypatch.delenv("MESH_PW", raising=False)
    with pytest.raises(ConfigError, match="MESH_PW is not set"):
        b.password_value()
    monkeypatch.setenv("MESH_PW", "s3cret")
    assert b.password_value() == "s3cret"
    validate_graph(g)
    with pytest.raises(GraphError, match="broker.url: the broker url must not carry credentials"):
        g.set_broker("mqtt://bob:pw@broker.local:1883")


# ---------------------------------------------------------------------------------------------
# Fusers


FUSER_GRAPH = """
    version: 1
    name: fused
    models:
      qwen: Qwen/Qwen3-0.6B
      small: {ref: Qwen/Qwen2.5-0.5B-Instruct, dtype: bf16}
    fusers:
      pair: {path: fusers/pair, receiver: qwen, sharer: small}
      other: {path: hf://org/c2c/other, receiver: small, sharer: qwen}
    agents:
      sharer: {model: small, context: facts}
      receiver: {model: qwen}
    edges:
      - {from: sharer, to: receiver, type: cache%s}
"""


def test_fuser_from_table_matches_models(tmp_path):
    g = load_graph(write(tmp_path, FUSER_GRAPH % ""))
    edge = g.edges[0]
    assert edge.mode == "fuse"  # the default cache mode
    ref = g.fuser_for(edge)
    assert ref.alias == "pair" and ref.ref == str(tmp_path / "fusers" / "pair")
    assert g.models["small"].dtype == "bfloat16"
    g2 = load_graph(write(tmp_path, FUSER_GRAPH % ", fuser: other", "b.yaml"), validate=False)
    assert g2.fuser_for(g2.edges[0]).ref == "hf://org/c2c/other"


def test_fuser_declared_for_other_models(tmp_path):
    err = load_error(write(tmp_path, FUSER_GRAPH % ", fuser: other"))
    assert str(err).startswith(f"{tmp_path / 'pipe.yaml'}:13: edges[0].fuser: fuser 'other' is for receiver model")


def test_fuser_unknown_alias_has_did_you_mean(tmp_path):
    err = load_error(write(tmp_path, FUSER_GRAPH % ", fuser: pairr"))
    assert ":13: edges[0].fuser: unknown fuser 'pairr'" in str(err) and "did you mean 'pair'" in str(err)


def test_fuser_info_checks_trained_models(tmp_path):
    path = write(tmp_path, FUSER_GRAPH % "")
    seen = []

    def wrong(ref):
        seen.append(ref)
        return ("Qwen/Qwen3-4B", "Qwen/Qwen2.5-0.5B-Instruct")

    err = load_error(path, fuser_info=wrong)
    assert seen == [str(tmp_path / "fusers" / "pair")]
    assert ":13: edges[0].fuser: fuser pair was trained for receiver Qwen/Qwen3-4B, but receiver runs Qwen/Qwen3-0.6B" \
        in str(err)
    assert load_graph(path, fuser_info=lambda ref: ("hf://qwen/qwen3-0.6b", "Qwen/Qwen2.5-0.5B-Instruct"))
    assert load_graph(path, fuser_info=lambda ref: None)  # no metadata: nothing to compare


def test_fuse_by_path_pipeline_validates_without_the_fuser():
    g = load_graph(ROOT / "graphs" / "fuse_by_path.yaml", fuser_info=lambda ref: None)
    ref = g.fuser_for(g.fuse_edges_of("assistant")[0])
    assert ref.alias is None and Path(ref.ref).resolve() == ROOT / "fusers" / "smollm2_context"


# ---------------------------------------------------------------------------------------------
# Bad pipeline files: each error is FILE:LINE: key.path: message


BASE = """
        version: 1
        name: bad"""

BAD_CASES = {
    "bad_int": (BASE + """
        agents:
          writer:
            max_new_tokens: lots
        """, 5, "agents.writer.max_new_tokens", "valid integer"),
    "misspelt_key": (BASE + """
        agents:
          writer:
            max_new_token: 5
        """, 5, "agents.writer.max_new_token", "did you mean 'max_new_tokens'"),
    "misspelt_top_key": (BASE + """
        agents: {a: {}}
        edge: []
        """, 4, "edge", "did you mean 'edges'"),
    "bad_name": (BASE + """
        agents:
          "two words": {}
        """, 4, "agents.two words", "not a valid name"),
    "unknown_agent": (BASE + """
        agents:
          writer: {}
          reader: {}
        edges:
          - from: reader
            to: writr
        """, 8, "edges[0].to", "did you mean 'writer'"),
    "duplicate_name": (BASE + """
        agents:
          writer: {}
          reader: {}
          writer: {role: again}
        """, 6, "agents.writer", "duplicate agent name 'writer' (first on line 4)"),
    "self_loop": (BASE + """
        agents:
          writer: {}
        edges:
          - {from: writer, to: writer}
        """, 6, "edges[0]", "to itself"),
    "duplicate_edge": (BASE + """
        agents: {a: {}, b: {}}
        edges:
          - {from: a, to: b}
          - {from: a, to: b, type: cache, mode: prefix}
        """, 6, "edges[1]", "second edge a -> b"),
    "cycle": (BASE + """
        agents: {a: {}, b: {}, c: {}}
        edges:
          - {from: a, to: b}
          - {from: b, to: c}
          - {from: c, to: a}
        """, 5, "edges[0]", "cycle a -> b -> c -> a"),
    "fuse_without_fuser": (BASE + """
        agents: {a: {}, b: {}}
        edges:
          - {from: a, to: b, type: cache, mode: fuse}
        """, 5, "edges[0]", "fuse edge a -> b has no fuser"),
    "prefix_different_models": (BASE + """
        models:
          big: Qwen/Qwen3-0.6B
        agents:
          a: {model: big}
          b: {}
        edges:
          - {from: a, to: b, type: cache, mode: prefix}
        """, 9, "edges[0].mode", "joins different models (Qwen/Qwen3-0.6B and smollm2-135m-instruct)"),
    "prefix_different_dtype": (BASE + """
        models:
          s32: {ref: smollm2-135m-instruct, dtype: float32}
        agents:
          a: {model: s32}
          b: {}
        edges:
          - {from: a, to: b, type: cache, mode: prefix}
        """, 9, "edges[0].mode", "joins different models"),
    "mode_on_text_edge": (BASE + """
        agents: {a: {}, b: {}}
        edges:
          - from: a
            to: b
            mode: prefix
        """, 7, "edges[0].mode", "mode 'prefix' on a text edge"),
    "fuser_on_prefix_edge": (BASE + """
        agents: {a: {}, b: {}}
        edges:
          - {from: a, to: b, type: cache, mode: prefix, fuser: fusers/x}
        """, 5, "edges[0].fuser", "fuser on a prefix edge"),
    "two_prefix_senders": (BASE + """
        agents: {a: {}, b: {}, c: {}}
        edges:
          - {from: a, to: c, type: cache, mode: prefix}
          - {from: b, to: c, type: cache, mode: prefix}
        """, 6, "edges[1]", "c has prefix edges from several senders (a, b)"),
    "prefix_and_fuse": (BASE + """
        agents: {a: {}, b: {}, c: {}}
        edges:
          - {from: a, to: c, type: cache, mode: prefix}
          - {from: b, to: c, type: cache, mode: fuse, fuser: ./f}
        """, 6, "edges[1]", "both a prefix edge and fuse edges"),
    "placeholder_unknown": (BASE + """
        agents:
          a: {}
          b:
            prompt: "{a} and {answr}"
        edges:
          - {from: a, to: b, type: text}
        """, 6, "agents.b.prompt", "placeholder {answr} names no input"),
    "placeholder_cache_sender": (BASE + """
        agents:
          a: {}
          b: {prompt: "{a}"}
        edges:
          - {from: a, to: b, type: cache, mode: prefix}
        """, 5, "agents.b.prompt", "a sends a cache, not text, to b"),
    "placeholder_unconnected": (BASE + """
        agents:
          a: {}
          b: {prompt: "{a}"}
        """, 5, "agents.b.prompt", "no text edge a -> b"),
    "undeclared_host": (BASE + """
        hosts:
          cloud: {}
        agents:
          a: {host: edge}
        """, 6, "agents.a.host", "host 'edge' is not declared"),
    "password_literal": (BASE + """
        broker:
          url: mqtt://localhost:1883
          username: mesh
          password: hunter2
        agents: {a: {}}
        """, 6, "broker.password", "name it with password_env"),
    "bad_broker_url": (BASE + """
        broker: {url: "http://localhost:1883"}
        agents: {a: {}}
        """, 3, "broker.url", "invalid broker url"),
    "bad_literal": (BASE + """
        agents: {a: {}, b: {}}
        edges:
          - {from: a, to: b, type: cahce}
        """, 5, "edges[0].type", "did you mean 'cache'"),
    "context_twice": (BASE + """
        agents:
          a:
            context: hi
            context_file: x.txt
        """, 4, "agents.a", "both context and context_file"),
    "missing_context_file": (BASE + """
        agents:
          a: {context_file: nowhere.html}
        """, 4, "agents.a.context_file", "does not exist"),
    "unknown_model_alias": (BASE + """
        models: {small: smollm2-135m-instruct}
        agents:
          a: {model: smal}
        """, 5, "agents.a.model", "did you mean 'small'"),
    "fusion_unknown_agent": (BASE + """
        agents: {a: {}}
        fusion: {b: sequential}
        """, 4, "fusion.b", "unknown agent 'b'"),
    "fusion_without_fuse_edges": (BASE + """
        agents: {a: {}}
        fusion: {a: sequential}
        """, 4, "fusion.a", "no fuse edges"),
    "unknown_output": (BASE + """
        agents: {writer: {}}
        outputs: [writer, wrtier]
        """, 4, "outputs[1]", "did you mean 'writer'"),
    "input_named_like_agent": (BASE + """
        agents: {a: {}}
        inputs: {a: hello}
        """, 4, "inputs.a", "has the name of an agent"),
    "fuser_unknown_model": (BASE + """
        models: {m: smollm2-135m-instruct}
        fusers: {f: {path: ./f, receiver: m, sharer: mm}}
        agents: {a: {}}
        """, 4, "fusers.f.sharer", "unknown model alias 'mm'"),
    "wrong_version": ("""
        version: 2
        name: bad
        agents: {a: {}}
        """, 1, "version", "version: 1"),
    "missing_agents": (BASE, 1, "agents", "missing required key 'agents'"),
    "bad_device": (BASE + """
        models: {m: {ref: x, device: gpu}}
        agents: {a: {}}
        """, 3, "models.m.device", "use cpu, cuda"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_pipeline_errors_name_file_line_and_key(tmp_path, case):
    text, line, key, fragment = BAD_CASES[case]
    path = write(tmp_path, text)
    err = load_error(path)
    message = str(err)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert fragment in message, message
    assert "\n" not in message
    assert (err.file, err.line, err.key) == (str(path), line, key)


@pytest.mark.parametrize("text, fragment", [
    ("", ":1: the file is empty"),
    ("- a\n- b\n", ":1: a pipeline file must be a mapping"),
    ("version: 1\nname: x\nagents: {a: {context: [1, 2}\n", "invalid YAML"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "constructor for the tag"),
    ("version: 1\nname: x\nagents: !!python/name:os.system\n", "constructor for the tag"),
])
def test_unsafe_or_broken_yaml_is_a_graph_error(tmp_path, text, fragment):
    err = load_error(write(tmp_path, text))
    assert fragment in str(err) and str(err).startswith(str(tmp_path))


def test_missing_file(tmp_path):
    err = load_error(tmp_path / "nope.yaml")
    assert str(err).startswith(f"{tmp_path / 'nope.yaml'}: the pipeline file does not exist")


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("path", GRAPH_FILES, ids=lambda p: p.name)
def test_yaml_spec_round_trip(tmp_path, path):
    spec, _ = load_spec(path)
    again = tmp_path / path.name
    again.write_text(dump_spec(spec), encoding="utf-8")
    spec2, _ = load_spec(again)
    assert spec2 == spec
    assert dump_spec(spec2) == dump_spec(spec)


def full_graph(base_dir: Path) -> Graph:
    g = Graph(name="everything", description="all features", base_dir=base_dir)
    small = g.model("small", "smollm2-135m-instruct", dtype="float32")
    g.model("big", "Qwen/Qwen3-0.6B", device="cuda:0")
    g.fuser("ctx", "fusers/ctx", receiver="big", sharer="small")
    edge = g.host("edge")
    g.host("cloud", broker="mqtt://10.0.0.2:1883", description="GPU box")
    g.set_broker("mqtt://localhost:1883", username="mesh", password_env="MQTT_PASSWORD", chunk_bytes=65536)
    g.input("topic", "coffee")
    html = "<html>\n  <p id=\"intro\"></p>\n</html>\n"
    a = g.agent("reader", model=small, context=html, role="You read: {not a placeholder}", host=edge)
    b = g.agent("notes", model=small, prompt="Notes on {topic}:", temperature=0.5, top_k=20, stop=["END", "\n\n"])
    r = g.agent("writer-1", model="big", prompt="{notes}\n{input}", fusion="sequential", host="cloud",
                repetition_penalty=1.1)
    g.cache(a, r, mode="fuse")
    g.text(b, r)
    g.outputs = ["writer-1", "notes"]
    return g


def test_graph_yaml_graph_round_trip(tmp_path):
    g = full_graph(tmp_path)
    validate_graph(g)
    text = g.to_yaml(tmp_path / "everything.yaml")
    assert "password" not in text.replace("password_env", "")
    g2 = load_graph(tmp_path / "everything.yaml")
    assert g2 == g
    assert g2.to_yaml() == text
    assert g2.agents["reader"].context == g.agents["reader"].context  # multi-line text survives
    assert g2.fuser_for(g2.edges[0]).alias == "ctx"
    assert [a.name for a in g2.agents_on("cloud")] == ["writer-1"]
    assert Graph.from_spec(g.to_spec(), base_dir=tmp_path) == g


def test_spec_defaults_and_shorthands():
    spec = GraphSpec.model_validate({"version": 1, "name": "s", "models": {"m": "smollm2-135m-instruct"},
                                     "agents": {"a": None, "b": {"stop": "END"}},
                                     "edges": [{"from": "a", "to": "b", "type": "cache"}]})
    assert spec.models["m"].ref == "smollm2-135m-instruct" and spec.models["m"].dtype == "auto"
    assert spec.agents["a"].max_new_tokens == 128 and spec.agents["b"].stop == ["END"]
    assert spec.edges[0].mode == "fuse" and spec.edges[0].sender == "a"


# ---------------------------------------------------------------------------------------------
# Shipped pipelines and views


def test_shipped_pipelines_load_and_make_sense():
    names = {p.name for p in GRAPH_FILES}
    assert {"programmer_writer.yaml", "programmer_writer_text.yaml", "combined_reasoning.yaml",
            "fuse_by_path.yaml"} <= names
    pw = load_graph(ROOT / "graphs" / "programmer_writer.yaml")
    assert pw.prefix_of("writer").name == "programmer"
    assert 'id="intro"' in pw.context_of("programmer")
    assert pw.context_of("writer") is None
    pwt = load_graph(ROOT / "graphs" / "programmer_writer_text.yaml")
    assert [a.name for a in pwt.text_inputs_of("writer")] == ["programmer"]
    assert "{programmer}" in pwt.prompt_template_of("writer")
    cr = load_graph(ROOT / "graphs" / "combined_reasoning.yaml")
    assert [a.name for a in cr.order()][-1] == "planner"
    assert {a.name for a in cr.text_inputs_of("planner")} == {"hours"}
    assert cr.prefix_of("planner").name == "closures"
    assert cr.context_of("hours") != cr.context_of("closures")


def test_describe_and_mermaid():
    g = load_graph(ROOT / "graphs" / "combined_reasoning.yaml")
    text = describe(g)
    assert "hours" in text and "closures  planner  cache/prefix" in text and "order: hours, closures, planner" in text
    chart = mermaid(g)
    assert chart.startswith("flowchart LR\n")
    assert "hours -->|text| planner" in chart
    assert 'closures -.->|"prefix"| planner' in chart

    g2 = full_graph(Path.cwd())
    chart2 = mermaid(g2)
    assert 'reader -.->|"fuse: ctx"| writer_1' in chart2
    assert "notes -->|text| writer_1" in chart2
    assert 'subgraph host_cloud["host: cloud"]' in chart2
    g3 = Graph(name="g")
    g3.agent("end")
    g3.agent("x")
    g3.text("x", "end")
    assert "x -->|text| end_0" in mermaid(g3)  # mermaid reserves `end` as a node id


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_check_all_shipped_graphs():
    result = CliRunner().invoke(app, ["check", *map(str, GRAPH_FILES)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(GRAPH_FILES)
    assert "ok " + str(ROOT / "graphs" / "programmer_writer.yaml") + " (2 agents, 1 edge)" in lines
    folder = CliRunner().invoke(app, ["check", str(ROOT / "graphs")])
    assert folder.exit_code == 0 and folder.stdout.splitlines() == lines


@pytest.mark.parametrize("case", ["misspelt_key", "cycle", "password_literal", "fuse_without_fuser"])
def test_cli_check_bad_file(tmp_path, case):
    path = write(tmp_path, BAD_CASES[case][0])
    good = ROOT / "graphs" / "programmer_writer.yaml"
    result = CliRunner().invoke(app, ["check", str(good), str(path)])
    assert result.exit_code == 2
    assert result.stdout.startswith(f"ok {good}")
    err_lines = result.stderr.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith(f"{path}:{BAD_CASES[case][1]}: ")
    assert "Traceback" not in result.output


def test_cli_show_formats(tmp_path):
    path = ROOT / "graphs" / "programmer_writer.yaml"
    text = CliRunner().invoke(app, ["show", str(path)])
    assert text.exit_code == 0 and "programmer  writer  cache/prefix" in text.stdout
    chart = CliRunner().invoke(app, ["show", str(path), "--format", "mermaid"])
    assert chart.exit_code == 0 and 'programmer -.->|"prefix"| writer' in chart.stdout
    bad = CliRunner().invoke(app, ["show", str(write(tmp_path, BAD_CASES["cycle"][0]))])
    assert bad.exit_code == 2 and "cycle a -> b -> c -> a" in bad.stderr and "Traceback" not in bad.output


def test_cli_as_a_module_without_torch(tmp_path):
    bad = write(tmp_path, BAD_CASES["bad_int"][0])
    proc = subprocess.run([sys.executable, "-m", "agentmesh.graph.cli", "check", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "agents.writer.max_new_tokens" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Reading and checking pipelines must not pull in torch (CLI start-up stays fast).
    code = ("import sys; from agentmesh.graph import load_graph; "
            "[load_graph(p) for p in sys.argv[1:]]; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, GRAPH_FILES)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
