"""Apart: benchmarks and profilers. They use the layers; nothing imports them. `python -m
ablation.bench`.
"""
