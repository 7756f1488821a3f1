"""Benchmark 1: T2T vs C2C end-to-end latency per question. See agentmesh/benchmarks/c2c_vs_t2t.py."""
import sys

from agentmesh.benchmarks import script_main

if __name__ == "__main__":
    sys.exit(script_main("c2c_vs_t2t"))
