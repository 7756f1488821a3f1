"""Benchmark: codec. See agentmesh/benchmarks/codec.py."""
import sys

from agentmesh.benchmarks import script_main

if __name__ == "__main__":
    sys.exit(script_main("codec"))
