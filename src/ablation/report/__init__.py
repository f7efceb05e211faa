"""Layer 7, report: tables, figures, PR comparisons and the experiments view, all built from run
records; `python -m ablation.report`.
"""
