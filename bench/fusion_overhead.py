"""Benchmark: fusion_overhead. See agentmesh/benchmarks/fusion_overhead.py."""
import sys

from agentmesh.benchmarks import script_main

if __name__ == "__main__":
    sys.exit(script_main("fusion_overhead"))
