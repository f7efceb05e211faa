"""`python -m ablation.grid`: see grid/command.py."""
from ablation.core.cli import run
from ablation.grid.command import main

run(main)
