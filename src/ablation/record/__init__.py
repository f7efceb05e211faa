"""Layer 4, record: a run (its identity and what it recorded), DVC's experiment table read into
runs, the committed record of a report, the GPU archive format.
"""
