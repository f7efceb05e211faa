"""Layer 5, grid: grid files (schema), queueing rows on DVC, running them on Ray; `python -m
ablation.grid`.
"""
