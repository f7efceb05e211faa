"""Layer 2, training: the registries (datasets, models), the params schema and its overrides, and
the engines (engine, smallmaps, svc). No file paths, no DVC.
"""
