"""`python -m ablation.models`: see models/command.py."""
from ablation.core.cli import run
from ablation.models.command import cli

run(cli)
