"""`python -m agentmesh`: the same as the `agentmesh` command."""
from agentmesh.cli import main

main()
