"""Benchmark: mqtt. See agentmesh/benchmarks/mqtt.py."""
import sys

from agentmesh.benchmarks import script_main

if __name__ == "__main__":
    sys.exit(script_main("mqtt"))
