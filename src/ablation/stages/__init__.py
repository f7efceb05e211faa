"""Layer 3, stages: what dvc.yaml runs (prepare, train, svm): read params, call the engine, write
the outputs.
"""
