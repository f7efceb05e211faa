"""`python -m ablation.report`: see report/command.py."""
from ablation.core.cli import run
from ablation.report.command import cli

run(cli)
