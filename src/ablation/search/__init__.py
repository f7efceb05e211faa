"""Searching a grid file's space with pruning, and confirming the best settings (grid search)."""
