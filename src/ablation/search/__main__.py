from ablation.core.cli import run
from ablation.search.command import main

run(main)
