"""Code generated from ``proto/agent.proto`` by ``scripts/regen.sh``; do not edit."""
