"""`python -m ablation.bench`: the training loop's benchmark (bench/loop.py)."""
from ablation.bench.loop import _cli
from ablation.core.cli import run

run(_cli)
