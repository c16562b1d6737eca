"""Consistent Self-Attention: pure torch core (csa.py) and its ModelPatcher integration (patch.py)."""
