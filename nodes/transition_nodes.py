"""Placeholder until the nodes land."""
NODES = []
