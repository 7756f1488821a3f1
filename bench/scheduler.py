"""Benchmark: scheduler. See agentmesh/benchmarks/scheduler.py."""
import sys

from agentmesh.benchmarks import script_main

if __name__ == "__main__":
    sys.exit(script_main("scheduler"))
